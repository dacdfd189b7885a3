"""ParamΔ: Θ_out = Θ'_base + Σ_i α_i (Θ_post,i − Θ_base,i), streamed tensor by tensor.

The main path reads top to bottom: open the inputs from their headers, plan every output
tensor (pre-flight), then walk the new base's tensors in on-disk order, computing each in
cache-sized chunks into preallocated buffers (fp32, or fp64 when an input is fp32), rounding
once to the output dtype and handing the bytes to the streaming writer.

>>> import paramdelta
>>> paramdelta.apply("merged", post="org-instruct", base="org-base",    # doctest: +SKIP
...                  new_base="org-base-v2")
ApplyReport(out='merged', tensors=291, ...)
"""

from __future__ import annotations

import math
import os
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import hub
from .checkpoint import Checkpoint, torch_dtype
from .errors import NonFiniteError, OptionError
from .plan import Job, Plan, Term, describe_sources, input_paths, job_reads, make_plan
from .progress import progress_bar
from .provenance import copy_tokenizer, input_record, model_card, shard_metadata, write_config
from .writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, parse_size

if TYPE_CHECKING:
    import torch

CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32: stays in cache across the few passes per chunk
OUT_ELEMENTS = 1 << 21  # output buffers handed to the writer thread (4 MiB of bf16)
POOL_BUFFERS = 6


@dataclass
class ApplyReport:
    """What `apply` did: where it wrote, how much, and every deviation from the plain formula."""

    out: str
    tensors: int
    bytes_written: int
    seconds: float
    formula: str
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def apply(out: str | Path, *, new_base: str | Path, post: str | Path | None = None, base: str | Path | None = None,
          alpha: float = 1.0, terms: Sequence[tuple[str | Path, str | Path, float]] = (),
          deltas: Sequence[tuple[str | Path, float]] = (), dtype: str = "auto",
          max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, config_from: str = "new-base",
          tokenizer_from: str = "post", new_token_policy: str = "copy-post", overwrite: bool = False,
          allow_nonfinite: bool = False, allow_pickle: bool = False, allow_tie_mismatch: bool = False,
          hash_inputs: bool = False, max_cache: str | int | None = None, progress: bool = True) -> ApplyReport:
    """Write new_base + Σ α·(post − base) (plus Σ α·stored delta) to `out`.

    `post`/`base`/`alpha` give one term; `terms` gives more as (post, base, alpha) triples;
    `deltas` adds (folder from `extract`, alpha) pairs. Nothing is written unless every
    check passes, and a failure mid-way leaves no folder at `out`. Any input may be a Hub
    reference `org/name[@revision]`: its shards download while the engine works, and
    `max_cache` (e.g. "40GB") bounds the disk they take, deleting each once it is done.

    >>> apply("merged", post="inst", base="base", new_base="base-v2")          # doctest: +SKIP
    >>> apply("mix", new_base="v2", terms=[("a", "base", 0.7), ("b", "base", 0.3)])  # doctest: +SKIP
    """
    start = time.perf_counter()
    if config_from not in ("new-base", "post"):
        raise OptionError(f"unknown --config-from {config_from!r}", hint="use new-base or post")
    budget = parse_size(max_cache) if max_cache is not None else None
    all_terms = ([(post, base, alpha)] if post is not None or base is not None else []) + list(terms)
    for p, b, _ in all_terms:
        if p is None or b is None:
            raise OptionError("each --post needs a --base (and the other way round)",
                              hint="pass them in pairs, in order")
    opened: dict[str, Checkpoint] = {}

    def open_(ref: str | Path) -> Checkpoint:
        key = str(Path(ref).resolve())
        if key not in opened:
            opened[key] = Checkpoint.open(ref, allow_pickle=allow_pickle)
        return opened[key]

    nb = open_(new_base)
    plan_terms = [Term(float(a), post=open_(p), base=open_(b)) for p, b, a in all_terms]
    plan_terms += [Term(float(a), delta=open_(d)) for d, a in deltas]
    plan = make_plan(nb, plan_terms, dtype=dtype, tokenizer_from=tokenizer_from,
                     new_token_policy=new_token_policy, allow_tie_mismatch=allow_tie_mismatch)
    formula = formula_text(plan)
    records = [input_record("new_base", nb, str(new_base), hash_inputs)]
    for i, (p, b, _) in enumerate(all_terms):
        records += [input_record(f"post[{i}]", open_(p), str(p), hash_inputs),
                    input_record(f"base[{i}]", open_(b), str(b), hash_inputs)]
    for i, (d, _) in enumerate(deltas):
        records.append(input_record(f"delta[{i}]", open_(d), str(d), hash_inputs))
    alphas = [t.alpha for t in plan.terms]
    meta = shard_metadata("merge", formula, alphas, records,
                          {"config_from": config_from, "tokenizer_from": tokenizer_from,
                           "new_token_policy": new_token_policy})
    writer = CheckpointWriter(out, [j.out for j in plan.jobs], max_shard_size=max_shard_size, metadata=meta,
                              overwrite=overwrite, inputs=input_paths(plan))
    with writer, hub.stream(plan, budget, progress) as on_job:  # Hub shards download while the engine works
        counts = run_plan(plan, writer, allow_nonfinite=allow_nonfinite, progress=progress, on_job=on_job)
        counts.update(plan.vocab_counts)
        _write_side_files(plan, writer.dir, config_from, tokenizer_from, dtype, counts, formula,
                          [str(new_base)] + [str(p) for p, _, _ in all_terms])
        writer.commit()
        written = writer.total_size
    return ApplyReport(str(out), len(plan.jobs), written, time.perf_counter() - start, formula, counts, plan.notes)


def formula_text(plan: Plan) -> str:
    parts, pairs, deltas = [], 0, 0  # numbered like the provenance roles: post[i]/base[i], delta[j]
    for t in plan.terms:
        if t.delta is None:
            inner, pairs = f"post[{pairs}] - base[{pairs}]", pairs + 1
        else:
            inner, deltas = f"delta[{deltas}]", deltas + 1
        parts.append(f"{t.alpha:g}*({inner})")
    return "new_base + " + " + ".join(parts)


def run_plan(plan: Plan, writer: CheckpointWriter, *, allow_nonfinite: bool = False,
             progress: bool = True, on_job: Callable[[int], None] | None = None) -> dict[str, int]:
    """Compute every job in order and stream it to `writer`; returns counts by kind of tensor.
    `on_job(i)` is told when job i starts (all before it are done): the Hub stream frees shards then."""
    import torch

    counts = {"formula": 0, "copied from new base (non-float)": 0, "vocab-aligned": 0}
    bufs = _Buffers()
    total = sum(j.out.nbytes for j in plan.jobs)
    threads = torch.get_num_threads()
    # Leave a core to the writer thread and the kernel's page-cache copies on small machines.
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    try:
        with progress_bar(total, "apply", enabled=progress) as bar:
            for i, job in enumerate(plan.jobs):
                if on_job is not None:
                    on_job(i)
                if i + 1 < len(plan.jobs):
                    _prefetch(plan, plan.jobs[i + 1])
                out = _OutStream(writer, bufs.pool(torch_dtype(job.out.dtype)), bar, job.out.name, allow_nonfinite)
                if job.mode == "copy":
                    out.put(plan.new_base.read(job.out.name).reshape(-1))
                    counts["copied from new base (non-float)"] += 1
                elif job.mode == "vocab":
                    from .rows import compute_vocab_rows

                    math_dtype = torch.float64 if job.math_dtype == "F64" else torch.float32
                    for block in compute_vocab_rows(plan, job, math_dtype, CHUNK_ELEMENTS):
                        _check_finite(block, job, plan, allow_nonfinite)
                        out.put(block.reshape(-1))
                    counts["vocab-aligned"] += 1
                else:
                    _formula(plan, job, bufs, out, allow_nonfinite)
                    counts["formula"] += 1
                out.flush()
    finally:
        torch.set_num_threads(threads)
    return {k: v for k, v in counts.items() if v}


class _Buffers:
    """Preallocated chunk buffers, reused for every tensor so the hot loop allocates nothing."""

    def __init__(self) -> None:
        self._scratch: dict[tuple[str, object, int], torch.Tensor] = {}
        self._pools: dict[object, queue.SimpleQueue] = {}

    def get(self, slot: str, dtype: torch.dtype, n: int) -> torch.Tensor:
        size = max(n, CHUNK_ELEMENTS)
        key = (slot, dtype, size)
        if key not in self._scratch:
            import torch

            self._scratch[key] = torch.empty(size, dtype=dtype)
        return self._scratch[key][:n]

    def pool(self, dtype: torch.dtype) -> queue.SimpleQueue:
        if dtype not in self._pools:
            import torch

            self._pools[dtype] = queue.SimpleQueue()
            for _ in range(POOL_BUFFERS):
                self._pools[dtype].put(torch.empty(OUT_ELEMENTS, dtype=dtype))
        return self._pools[dtype]


class _OutStream:
    """Packs computed chunks into large pooled output buffers and hands full ones to the writer.

    Rounding to fp16 can overflow even when the math did not, so fp16 buffers are checked
    for Inf right before they leave.
    """

    def __init__(self, writer: CheckpointWriter, pool: queue.SimpleQueue, bar, name: str,
                 allow_nonfinite: bool) -> None:
        self.writer, self.pool, self.bar = writer, pool, bar
        self.name, self.allow_nonfinite = name, allow_nonfinite
        self.buf: torch.Tensor | None = None
        self.fill = 0

    def put(self, chunk: torch.Tensor) -> None:
        """Round `chunk` (any dtype) into the output dtype and queue it."""
        done = 0
        while done < chunk.numel():
            if self.buf is None:
                self.buf, self.fill = self.pool.get(), 0
            n = min(chunk.numel() - done, self.buf.numel() - self.fill)
            self.buf[self.fill:self.fill + n].copy_(chunk[done:done + n])
            self.fill += n
            done += n
            if self.fill == self.buf.numel():
                self.flush()

    def flush(self) -> None:
        if self.buf is None or self.fill == 0:
            return
        buf, pool = self.buf, self.pool
        if buf.dtype == _float16() and not self.allow_nonfinite and not bool(buf[:self.fill].isfinite().all()):
            pool.put(buf)
            self.buf = None
            raise NonFiniteError(f"{self.name}: values overflow float16 in the output",
                                 hint="use --dtype bfloat16 or float32")
        self.writer.write(buf[:self.fill], release=lambda: pool.put(buf))
        self.bar.update(self.fill * buf.element_size())
        self.buf, self.fill = None, 0


def _formula(plan: Plan, job: Job, bufs: _Buffers, out: _OutStream, allow_nonfinite: bool) -> None:
    """One tensor by the plain formula, in flat chunks (whole rows when a term is low-rank)."""
    import torch

    math_dtype = torch.float64 if job.math_dtype == "F64" else torch.float32
    name = job.out.name
    nb_info = plan.new_base.tensors[name]
    row = math.prod(nb_info.shape[1:]) if len(nb_info.shape) > 1 else max(nb_info.numel, 1)
    lowrank = any(src[0] == "lowrank" for src in job.sources)
    step = max(1, CHUNK_ELEMENTS // row) * row if lowrank else CHUNK_ELEMENTS
    # (checkpoint, tensor name) pairs to read per chunk, each into its own staging slot
    reads = [(plan.new_base, name)]
    for term, src in zip(plan.terms, job.sources):
        if src[0] == "diff":
            reads += [(term.post, src[1]), (term.base, src[2])]
        elif src[0] == "full":
            reads.append((term.delta, src[1]))
    factors = [(t.alpha, t.delta.read(src[1]), t.delta.read(src[2]).to(math_dtype))
               for t, src in zip(plan.terms, job.sources) if src[0] == "lowrank"]
    n_total = nb_info.numel
    for s in range(0, n_total, step):
        n = min(step, n_total - s)
        staged = [ck.read_into(tname, s, bufs.get(f"in{k}", torch_dtype(ck.tensors[tname].dtype), n))
                  for k, (ck, tname) in enumerate(reads)]
        acc = bufs.get("acc", math_dtype, n).copy_(staged[0])
        tmp = bufs.get("tmp", math_dtype, n)
        k = 1
        for term, src in zip(plan.terms, job.sources):
            if src[0] == "diff":
                tmp2 = bufs.get("tmp2", math_dtype, n)
                tmp.copy_(staged[k]).sub_(tmp2.copy_(staged[k + 1]))
                acc.add_(tmp, alpha=term.alpha)
                k += 2
            elif src[0] == "full":
                acc.add_(tmp.copy_(staged[k]), alpha=term.alpha)
                k += 1
        for alpha, u, v in factors:
            r0, r1 = s // row, (s + n) // row
            acc.view(r1 - r0, row).addmm_(u[r0:r1].to(math_dtype), v, alpha=alpha)
        if not math.isfinite(float(acc.sum())):
            _check_finite(acc, job, plan, allow_nonfinite, (s, s + n))
        out.put(acc)


def _check_finite(block: torch.Tensor, job: Job, plan: Plan, allow_nonfinite: bool,
                  span: tuple[int, int] | None = None) -> None:
    """Raise NonFiniteError naming the input that holds NaN/Inf (or the arithmetic, if none does)."""
    if allow_nonfinite or bool(block.isfinite().all()):
        return
    name = job.out.name
    s, e = span if span is not None else (0, None)
    candidates = [("new base", plan.new_base, name)]
    for term, src in zip(plan.terms, job.sources):
        if src[0] == "diff":
            candidates += [("post", term.post, src[1]), ("base", term.base, src[2])]
        else:
            candidates += [("delta", term.delta, n) for n in src[1:]]
    for role, ck, tname in candidates:
        t = ck.read(tname).reshape(-1)
        whole = span is None or tname.endswith(("@U", "@V"))  # factors do not share the output's layout
        if not bool((t if whole else t[s:e]).isfinite().all()):
            raise NonFiniteError(f"{role} {ck.tensors[tname].file}: tensor {tname!r} holds NaN or Inf",
                                 hint="fix the input, or pass --allow-nonfinite to keep them")
    raise NonFiniteError(f"{name}: the arithmetic overflowed to Inf", hint="check --alpha values")


def _prefetch(plan: Plan, job: Job) -> None:
    """Start the kernel reading the next job's inputs while this one computes."""
    for ck, name in job_reads(plan, job):
        ck.prefetch(name)


def _float16():
    import torch

    return torch.float16


def _write_side_files(plan: Plan, dst: Path, config_from: str, tokenizer_from: str, dtype: str,
                      counts: dict[str, int], formula: str, refs: list[str]) -> None:
    """config from one source, tokenizer from another, and a model card saying which."""
    post_src = plan.terms[0].source
    cfg_src = plan.new_base if config_from == "new-base" else post_src
    tok_src = plan.new_base if tokenizer_from == "new-base" else post_src
    updates: dict = {"tie_word_embeddings": plan.new_base.tie_word_embeddings}
    if dtype != "auto":
        updates["dtype"] = dtype
    vocab_rows = [j.out.shape[0] for j in plan.jobs if j.mode == "vocab"]
    if vocab_rows:
        updates["vocab_size"] = vocab_rows[0]
    if tok_src is not cfg_src:  # special-token ids must match the tokenizer we ship
        updates.update({k: tok_src.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                        if k in tok_src.config})
    if cfg_src.config:
        write_config(cfg_src.config, dst, updates)
    copied = copy_tokenizer(tok_src.path, dst)
    card = model_card(
        base_models=[refs[0]] + refs[1:2], title="ParamΔ merge",
        summary=[f"`Θ_out = {formula}` computed tensor by tensor in fp32/fp64 and rounded once.",
                 "Post-training moved onto a new base with zero training (ParamΔ, arXiv 2504.21023)."],
        sections={"Inputs": [f"- new base: `{refs[0]}`"] + [f"- post[{i}]: `{r}`" for i, r in enumerate(refs[1:])],
                  "Where each part came from": [f"- {line}" for line in describe_sources(config_from, tokenizer_from)]
                  + [f"- tokenizer files copied: {', '.join(copied) or 'none'}"],
                  "Counts": [f"- {k}: {v}" for k, v in counts.items()] + [f"- note: {n}" for n in plan.notes]})
    (dst / "README.md").write_text(card)
