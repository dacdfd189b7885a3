"""Align embedding rows by token string when the inputs' vocabularies differ.

Output rows follow the output tokenizer (the post model's by default). A row present in
the new base and in a term's post and base follows the formula; a row the new base lacks
(a chat token added in post-training) follows the new-token policy:

- ``copy-post``: the post model's row as it is (the first term's post that has the token; default);
- ``zero-delta``: the mean new-base row, i.e. the post-training delta of that row is dropped;
- ``mean``: mean new-base row + Σ α·(post row − mean base row) over the terms whose post has
  the token, the delta taken against the mean.

A row the new base has but some term lacks gets the delta of the terms that have it. Rows
that exist in an input but not in the output tokenizer are not reachable and are dropped;
every class is counted in the report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import OptionError

NEW_TOKEN_POLICIES = ("copy-post", "zero-delta", "mean")
VOCAB_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|tok_embeddings|output)\.weight$")


def is_vocab_tensor(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor has one row per token (input embedding or output head)."""
    return len(shape) == 2 and bool(VOCAB_TENSOR.search(name))


def check_policy(policy: str) -> str:
    if policy not in NEW_TOKEN_POLICIES:
        raise OptionError(f"unknown --new-token-policy {policy!r}", hint=f"use one of {', '.join(NEW_TOKEN_POLICIES)}")
    return policy


def row_keys(vocab: dict[str, int] | None, rows: int) -> list[object]:
    """The key of every row: its token string, or ("row", i) for rows no token uses (padding)."""
    keys: list[object] = [("row", i) for i in range(rows)]
    for token, i in (vocab or {}).items():
        if 0 <= i < rows:
            keys[i] = token
    return keys


def index_of(keys: list[object], other: list[object]) -> list[int]:
    """For each key in `keys`, its row in `other`, or -1."""
    where = {k: i for i, k in enumerate(other)}
    return [where.get(k, -1) for k in keys]


@dataclass
class RowMap:
    """Row sources for one vocab tensor: output row -> row in new base / each term's post and base."""

    rows: int
    new_base: list[int]
    posts: list[list[int]]
    bases: list[list[int]]
    policy: str
    counts: dict[str, int] = field(default_factory=dict)


def build_row_map(out_keys: list[object], new_base_keys: list[object],
                  terms: list[tuple[list[object], list[object]]], policy: str) -> RowMap:
    """Map every output row to its sources and count the rows of each class."""
    nb = index_of(out_keys, new_base_keys)
    posts = [index_of(out_keys, p) for p, _ in terms]
    bases = [index_of(out_keys, b) for _, b in terms]
    counts = {"formula": 0, "formula, from the terms that have the row": 0,
              "kept new base (no term has the row)": 0, f"new token ({policy})": 0}
    for r in range(len(out_keys)):
        if nb[r] < 0:
            counts[f"new token ({policy})"] += 1
            continue
        present = [p[r] >= 0 and b[r] >= 0 for p, b in zip(posts, bases)]
        key = "formula" if all(present) else (
            "formula, from the terms that have the row" if any(present) else "kept new base (no term has the row)")
        counts[key] += 1
    out_set = set(out_keys)
    counts["new base rows not in the output tokenizer, dropped"] = len(set(new_base_keys) - out_set)
    for i, (p, _) in enumerate(terms):
        counts[f"post[{i}] rows not in the output tokenizer, dropped"] = len(set(p) - out_set)
    return RowMap(len(out_keys), nb, posts, bases, policy, {k: v for k, v in counts.items() if v})
