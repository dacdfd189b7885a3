"""Training data: read a .txt/.jsonl file, check every record, tokenise into examples, pad into batches.

The rules (one example per row, eos at the end, loss masking by `loss_on`, `seq_len` windows) are
described in `paramdelta.train`'s docstring; they live here so the loop there stays one screen and
plugins with their own loops (TAPA's distillation) tokenise exactly as `pdelta train` does.

>>> examples, notes = tokenize(read_records(Path("facts.txt")), tokenizer, seq_len=64, loss_on="auto")  # doctest: +SKIP
>>> input_ids, labels = make_batch(examples[:8], pad_id=tokenizer.eos_token_id)                      # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OptionError, PdeltaError

IGNORE = -100
DATA_HINT = ('each line must be one JSON object: {"text": ...}, {"prompt": ..., "completion": ...} '
             'or {"messages": [...]}')


class DataError(PdeltaError):
    """The training data file is missing, empty or malformed."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (the loss shifts them); IGNORE where no loss


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line of a .txt or .jsonl file, each checked."""
    if not path.is_file():
        raise DataError(f"data file {path} not found", hint="pass a .txt (one document per line) or .jsonl file")
    if path.suffix not in (".txt", ".jsonl"):
        raise DataError(f"data file {path} is neither .txt nor .jsonl", hint="rename it to say which it is")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".txt":
                records.append((lineno, {"text": line.rstrip("\r\n")}))
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})", hint=DATA_HINT) from None
            if not _valid_record(rec):
                raise DataError(f"{path}:{lineno}: not a text, prompt/completion or messages record", hint=DATA_HINT)
            records.append((lineno, rec))
    if not records:
        raise DataError(f"data file {path} has no documents", hint="it is empty or holds only blank lines")
    return records


def _valid_record(rec: Any) -> bool:
    if not isinstance(rec, dict):
        return False
    if "text" in rec:
        return isinstance(rec["text"], str)
    if "prompt" in rec or "completion" in rec:
        return isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str)
    msgs = rec.get("messages")
    return isinstance(msgs, list) and bool(msgs) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)


def tokenize(records: list[tuple[int, dict[str, Any]]], tokenizer: Any, seq_len: int, loss_on: str,
             path: Path | str = "data") -> tuple[list[Example], list[str]]:
    """Token ids and labels for every record (see the module docstring), cut into `seq_len` windows."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token, so documents cannot end with one",
                        hint="set eos_token in the checkpoint's tokenizer_config.json")
    examples, split, dropped = [], 0, 0
    for lineno, rec in records:
        where = f"{path}:{lineno}"
        if "text" in rec:
            if loss_on == "completion":
                raise OptionError(f"{where}: loss_on='completion' needs prompt/completion or messages records",
                                  hint="use loss_on auto or all for plain text")
            ids = tokenizer(rec["text"], add_special_tokens=True)["input_ids"]
            labels = list(ids)
        elif "prompt" in rec:
            prompt = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
            answer = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"] + [eos]
            ids = prompt + answer
            labels = ([IGNORE] * len(prompt) if loss_on != "all" else prompt) + answer
        else:
            ids, labels = _render_messages(tokenizer, rec["messages"], where, mask=loss_on != "all")
        if not ids or ids[-1] != eos:
            ids, labels = ids + [eos], labels + [eos if not labels or labels[-1] != IGNORE else IGNORE]
        split += len(ids) > seq_len
        for i in range(0, len(ids), seq_len):
            window = Example(ids[i:i + seq_len], labels[i:i + seq_len])
            if any(label != IGNORE for label in window.labels[1:]):
                examples.append(window)
            else:
                dropped += 1
    if not examples:
        raise DataError(f"{path}: no example has a token to learn", hint="check the masking (loss_on) and the data")
    notes = [f"{split} examples longer than seq_len {seq_len} were cut into windows"] if split else []
    notes += [f"{dropped} windows without any trained token were dropped"] if dropped else []
    return examples, notes


def _render_messages(tokenizer: Any, messages: list[dict], where: str, mask: bool) -> tuple[list[int], list[int]]:
    """Chat-template ids; with `mask`, labels only on the assistant turns (found as character spans
    between the rendering up to the generation prompt and the rendering through that turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: messages need a chat template and the tokenizer has none",
                        hint="add chat_template to the tokenizer, or write prompt/completion records")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not mask:
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(f"{where}: the chat template renders earlier turns differently in longer chats, so "
                            "assistant turns cannot be located", hint="use loss_on all or prompt/completion records")
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not mask:
        return ids, list(ids)
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, (s, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def make_batch(rows: list[Example], pad_id: int):
    """(input_ids, labels) tensors, right-padded to the longest row; labels IGNORE on padding."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
    return input_ids, labels
