"""Pre-flight for ParamΔ: check every input from headers alone and decide what each output tensor is.

Nothing here reads a weight. All problems are collected and raised together, so a user
fixes them in one round instead of one per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .checkpoint import Checkpoint, dtype_tag
from .errors import OptionError, PreflightError
from .vocab import RowMap, build_row_map, check_policy, is_vocab_tensor, row_keys
from .writer import OutTensor

ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "head_dim")
DTYPES = ("auto", "bfloat16", "float16", "float32")
LM_HEAD = "lm_head.weight"


@dataclass
class Term:
    """One term of the sum: alpha·(post − base), or alpha·(a stored delta made by `extract`)."""

    alpha: float
    post: Checkpoint | None = None
    base: Checkpoint | None = None
    delta: Checkpoint | None = None

    @property
    def source(self) -> Checkpoint:
        """The checkpoint that carries this term's tokenizer and post config."""
        return self.post if self.post is not None else self.delta  # type: ignore[return-value]


@dataclass
class Job:
    """How to produce one output tensor."""

    out: OutTensor
    mode: Literal["formula", "copy", "vocab"]
    math_dtype: str  # "F32" or "F64"
    # per term: tensor names in (post, base), or in the stored delta ("full"/"lowrank")
    sources: list[tuple[str, ...]] = field(default_factory=list)
    rows: RowMap | None = None


@dataclass
class Plan:
    new_base: Checkpoint
    terms: list[Term]
    jobs: list[Job]
    notes: list[str]
    vocab_counts: dict[str, int]


def embedding_name(ckpt: Checkpoint) -> str | None:
    """The input embedding's tensor name, used as lm_head for tied checkpoints."""
    for name, info in ckpt.tensors.items():
        if is_vocab_tensor(name, info.shape) and name != LM_HEAD and not name.endswith("embed_out.weight"):
            return name
    return None


def make_plan(new_base: Checkpoint, terms: list[Term], *, dtype: str = "auto", tokenizer_from: str = "post",
              new_token_policy: str = "copy-post", allow_tie_mismatch: bool = False) -> Plan:
    """Check all inputs against the new base and return one Job per output tensor, in the
    new base's on-disk order. Raises PreflightError listing every problem found."""
    if dtype not in DTYPES:
        raise OptionError(f"unknown --dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    if tokenizer_from not in ("post", "new-base"):
        raise OptionError(f"unknown --tokenizer-from {tokenizer_from!r}", hint="use post or new-base")
    check_policy(new_token_policy)
    if not terms:
        raise OptionError("nothing to apply", hint="pass --post and --base, or --delta")
    problems: list[str] = []
    notes: list[str] = []
    for term in terms:
        for role, ck in (("post", term.post), ("base", term.base), ("delta", term.delta)):
            if ck is not None:
                problems += architecture_problems(new_base, ck, role)

    out_keys_src = _output_vocab_source(new_base, terms, tokenizer_from)
    nb_tied = LM_HEAD not in new_base.tensors
    jobs: list[Job] = []
    vocab_counts: dict[str, int] = {}
    for name, info in new_base.tensors.items():
        out_dtype = info.dtype if (dtype == "auto" or not info.is_float) else dtype_tag(dtype)
        if not info.is_float:
            for term in terms:
                for role, ck in (("post", term.post), ("base", term.base)):
                    other = ck.tensors.get(name) if ck is not None else None
                    if other is not None and other.shape != info.shape:
                        problems.append(f"{name}: shape {list(other.shape)} in {role} {ck.path} but "
                                        f"{list(info.shape)} in new base {new_base.path}")
            jobs.append(Job(OutTensor(name, out_dtype, info.shape), "copy", "F32"))
            continue
        sources, wide, vocab_mismatch = [], info.dtype in ("F32", "F64"), False
        for i, term in enumerate(terms):
            if term.delta is not None:
                src = _delta_source(term.delta, name, info.shape, problems)
                sources.append(src)
                wide |= any(term.delta.tensors[s].dtype in ("F32", "F64") for s in src[1:])
                continue
            pair = []
            for role, ck in (("post", term.post), ("base", term.base)):
                key = resolve_name(ck, name)
                if key is None:
                    problems.append(f"tensor {name!r} is missing in {role} {ck.path}"
                                    + (f" (term {i + 1})" if len(terms) > 1 else ""))
                    continue
                other = ck.tensors[key]
                wide |= other.dtype in ("F32", "F64")
                if other.shape != info.shape:
                    if is_vocab_tensor(name, info.shape) and other.shape[1:] == info.shape[1:]:
                        vocab_mismatch = True
                    else:
                        problems.append(f"{name}: shape {list(other.shape)} in {role} {ck.path} but "
                                        f"{list(info.shape)} in new base {new_base.path}")
                pair.append(key)
            sources.append(("diff", *pair))
        job = Job(OutTensor(name, out_dtype, info.shape), "formula", "F64" if wide else "F32", sources)
        if is_vocab_tensor(name, info.shape) and (vocab_mismatch or _vocabs_differ(new_base, terms, out_keys_src)):
            rows = _row_map(name, new_base, terms, out_keys_src, new_token_policy, problems)
            if rows is not None:
                job.mode, job.rows = "vocab", rows
                job.out = OutTensor(name, out_dtype, (rows.rows, *info.shape[1:]))
                for k, v in rows.counts.items():
                    vocab_counts[f"{name}: {k}"] = v
        jobs.append(job)

    problems += _extra_tensor_problems(new_base, terms, nb_tied, allow_tie_mismatch, notes)
    arch = [p for p in problems if p.startswith("architecture mismatch")]
    if arch:  # shape problems then follow from the architecture; name them by count only
        shapes = [p for p in problems if ": shape " in p]
        problems = [p for p in problems if p not in shapes] + (
            [f"{len(shapes)} tensors differ in shape as a result"] if shapes else [])
    if problems:
        raise PreflightError(problems, hint="pass inputs that share one architecture, or see `pdelta inspect`")
    return Plan(new_base, terms, jobs, notes, vocab_counts)


def architecture_problems(new_base: Checkpoint, other: Checkpoint, role: str) -> list[str]:
    a, b = new_base.config, other.config
    if role == "delta":
        return []
    out = []
    for f in ARCH_FIELDS:
        if f in a and f in b and a[f] != b[f]:
            out.append(f"architecture mismatch: {f} is {b[f]!r} in {role} {other.path} but {a[f]!r} in "
                       f"new base {new_base.path}")
    return out


def resolve_name(ck: Checkpoint, name: str) -> str | None:
    """The tensor holding `name` in `ck`: itself, or the embedding when ck ties lm_head to it."""
    if name in ck.tensors:
        return name
    if name == LM_HEAD and ck.tie_word_embeddings:
        return embedding_name(ck)
    return None


def _delta_source(delta: Checkpoint, name: str, shape: tuple[int, ...], problems: list[str]) -> tuple[str, ...]:
    if name in delta.tensors:
        if delta.tensors[name].shape != shape:
            problems.append(f"{name}: shape {list(delta.tensors[name].shape)} in delta {delta.path} but "
                            f"{list(shape)} in the new base (stored deltas cannot realign vocabularies; "
                            "use --post/--base)")
        return ("full", name)
    u, v = f"{name}@U", f"{name}@V"
    if u in delta.tensors and v in delta.tensors:
        got = (delta.tensors[u].shape[0], delta.tensors[v].shape[1])
        if len(shape) != 2 or got != tuple(shape):
            problems.append(f"{name}: low-rank delta in {delta.path} is {list(got)}, new base has {list(shape)}")
        return ("lowrank", u, v)
    if name == LM_HEAD and embedding_name(delta):
        return ("full", embedding_name(delta))  # type: ignore[return-value]
    problems.append(f"tensor {name!r} is missing in delta {delta.path}")
    return ("full", name)


def _extra_tensor_problems(new_base: Checkpoint, terms: list[Term], nb_tied: bool, allow_tie_mismatch: bool,
                           notes: list[str]) -> list[str]:
    problems = []
    for term in terms:
        for role, ck in (("post", term.post), ("base", term.base)):
            if ck is None:
                continue
            for name, info in ck.tensors.items():
                if name in new_base.tensors or not info.is_float:
                    continue
                if name == LM_HEAD and nb_tied:
                    if allow_tie_mismatch:
                        notes.append(f"{role} {ck.path} has an untied lm_head; the new base ties it, so that "
                                     "lm_head delta is dropped (--allow-tie-mismatch)")
                    else:
                        problems.append(f"{role} {ck.path} has an untied lm_head but the new base ties "
                                        "embeddings: its lm_head delta would be lost (pass --allow-tie-mismatch "
                                        "to drop it)")
                    continue
                problems.append(f"tensor {name!r} of {role} {ck.path} is not in new base {new_base.path}")
    return problems


def _output_vocab_source(new_base: Checkpoint, terms: list[Term], tokenizer_from: str) -> Checkpoint:
    return new_base if tokenizer_from == "new-base" else terms[0].source


def _vocabs_differ(new_base: Checkpoint, terms: list[Term], out_src: Checkpoint) -> bool:
    vocabs = [new_base.vocab, out_src.vocab] + [ck.vocab for t in terms for ck in (t.post, t.base) if ck]
    known = [v for v in vocabs if v is not None]
    return any(v != known[0] for v in known[1:])


def _row_map(name: str, new_base: Checkpoint, terms: list[Term], out_src: Checkpoint, policy: str,
             problems: list[str]) -> RowMap | None:
    cks = [new_base, out_src] + [ck for t in terms for ck in (t.post, t.base) if ck is not None]
    missing = [ck.path for ck in cks if ck.vocab is None]
    if any(t.delta is not None for t in terms):
        problems.append(f"{name}: vocabularies differ, which stored deltas cannot realign; use --post/--base")
        return None
    if missing:
        problems.append(f"{name}: row counts or vocabularies differ but {missing[0]} has no tokenizer.json to "
                        "align rows by token")
        return None

    def keys(ck: Checkpoint) -> list[object]:
        return row_keys(ck.vocab, ck.tensors[resolve_name(ck, name) or name].shape[0])

    out_keys = keys(out_src) if name in out_src.tensors or resolve_name(out_src, name) else keys(new_base)
    return build_row_map(out_keys, keys(new_base), [(keys(t.post), keys(t.base)) for t in terms], policy)


def describe_sources(config_from: str, tokenizer_from: str) -> list[str]:
    """What came from where, printed for the user and written in the card."""
    return ["weights: new base + Σ α·(post − base)", f"config.json: {config_from}",
            f"tokenizer, chat template, generation_config: {tokenizer_from}"]


def job_reads(plan: Plan, job: Job) -> list[tuple[Checkpoint, str]]:
    """Every (checkpoint, tensor name) a job reads: what to prefetch, and which shards it needs on disk."""
    reads = [(plan.new_base, job.out.name)]
    for term, src in zip(plan.terms, job.sources):
        if src[0] == "diff":
            reads += [(term.post, src[1]), (term.base, src[2])]  # type: ignore[list-item]
        else:
            reads += [(term.delta, n) for n in src[1:]]  # type: ignore[misc]
    return reads


def input_paths(plan: Plan) -> list[Path]:
    paths = [plan.new_base.path]
    for t in plan.terms:
        paths += [ck.path for ck in (t.post, t.base, t.delta) if ck is not None]
    return paths
