"""`pdelta verify`: check an output against the inputs its provenance names, trusting nothing in it.

An output records its formula, α values and inputs (paths, shard sizes, header hashes) in
every shard's metadata. Verify re-opens those inputs, refuses if any changed, then runs
three checks and reports each: sampled rows of every float tensor recomputed in fp64 and
compared after rounding to the output dtype (1 ulp allowed: `apply` rounds fp32 math once,
the reference rounds fp64 math); NaN/Inf over every output element, streamed; and a smoke
load in transformers with one forward pass.

>>> verify("merged", samples=8)["ok"]                                     # doctest: +SKIP
True
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint, read_shard_header
from .errors import CheckpointError, OptionError, VerifyError
from .plan import embedding_name, resolve_name
from .progress import progress_bar, progress_enabled
from .provenance import read_provenance
from .vocab import is_vocab_tensor

if TYPE_CHECKING:
    import torch

CHUNK_ELEMENTS = 1 << 20
MAX_EXAMPLES = 10
SMOKE_TOKENS = (1, 2, 3, 4, 5)
_ROLE = re.compile(r"^(new_base|post|base|delta)(?:\[(\d+)\])?$")
_HINTS = {
    "recompute": "the output or an input was modified after the merge; re-run `pdelta apply` (pass --hash-inputs "
                 "to record full input hashes, so in-place edits of an input are caught up front)",
    "finite": "re-run `pdelta apply` without --allow-nonfinite to find the input holding NaN/Inf",
    "load": "check config.json against the tensor names and shapes (`pdelta inspect OUT`)",
}


@dataclass
class Sources:
    """The inputs re-opened from provenance: new base (None for a stored delta) and the α-scaled terms."""

    new_base: Checkpoint | None
    pairs: list[tuple[float, Checkpoint, Checkpoint]]
    deltas: list[tuple[float, Checkpoint]]

    def all(self) -> list[Checkpoint]:
        cks = [self.new_base] if self.new_base is not None else []
        return cks + [c for _, p, b in self.pairs for c in (p, b)] + [d for _, d in self.deltas]


def verify(path: str | os.PathLike, samples: int = 8, load: bool = True, seed: int = 0,
           progress: bool = True) -> dict[str, Any]:
    """Check an output of `pdelta apply` (or `extract`) against its recorded inputs.

    Returns the report when every check passes; raises VerifyError (with `.report`) when one
    fails, and before any check when the output has no provenance or an input is missing or
    changed.

    >>> report = verify("merged", samples=16, load=False)                 # doctest: +SKIP
    >>> report["checks"]["recompute"]["mismatched"]                       # doctest: +SKIP
    0
    """
    if samples < 1:
        raise OptionError(f"--samples must be at least 1, got {samples}")
    out = Checkpoint.open(path)
    prov = read_provenance(out)
    if not isinstance(prov.get("inputs"), list):
        raise VerifyError(f"{out.path}: no paramdelta provenance in the shard metadata",
                          hint="verify checks outputs written by `pdelta apply` or `pdelta extract`")
    kind = prov.get("kind")
    if kind not in ("merge", "delta"):
        raise VerifyError(f"{out.path}: cannot recompute an output of kind {kind!r}",
                          hint="verify supports outputs of `pdelta apply` and `pdelta extract`")
    src = open_sources(prov)
    checks: dict[str, dict[str, Any]] = {"inputs": {
        "ok": True, "inputs": [{"role": r["role"], "path": r["path"], "shards": len(r.get("files") or {}),
                                "full_hash": any("sha256" in f for f in (r.get("files") or {}).values())}
                               for r in prov["inputs"]]}}
    checks["recompute"] = recompute(out, src, samples, seed)
    checks["finite"] = check_finite(out, progress)
    if not load:
        checks["load"] = {"ok": True, "skipped": "--no-load"}
    elif kind == "delta":
        checks["load"] = {"ok": True, "skipped": "a stored delta is not a model"}
    else:
        checks["load"] = smoke_load(out.path, progress)
    report = {"path": str(out.path), "kind": kind, "formula": prov.get("formula"), "alpha": prov.get("alpha"),
              "ok": all(c["ok"] for c in checks.values()), "checks": checks}
    if not report["ok"]:
        failed = [k for k, c in checks.items() if not c["ok"]]
        raise VerifyError(f"{out.path}: verify failed: " + "; ".join(f"{k}: {checks[k]['problem']}" for k in failed),
                          hint="; ".join(_HINTS[k] for k in failed), report=report)
    return report


# -- inputs -------------------------------------------------------------------------------------
def open_sources(prov: dict[str, Any]) -> Sources:
    """Re-open every recorded input, refusing any that is missing or differs from what was read."""
    opened: dict[str, Checkpoint] = {}
    new_base: Checkpoint | None = None
    found: dict[str, dict[int, Checkpoint]] = {"post": {}, "base": {}, "delta": {}}
    for rec in prov["inputs"]:
        m = _ROLE.match(str(rec.get("role", "")))
        if m is None or "path" not in rec:
            raise VerifyError(f"provenance names an input this version cannot read: {rec.get('role')!r}",
                              hint="verify with the paramdelta version that wrote the output")
        ck = _reopen(rec, opened)
        if m.group(1) == "new_base":
            new_base = ck
        else:
            found[m.group(1)][int(m.group(2) or 0)] = ck
    alphas = [float(a) for a in prov.get("alpha") or []]
    n_pairs = len(found["post"])
    if sorted(found["post"]) != sorted(found["base"]) or len(alphas) != n_pairs + len(found["delta"]) \
            or (prov.get("kind") == "merge" and new_base is None):
        raise VerifyError("the provenance is inconsistent: its inputs and α values do not form a formula",
                          hint="the shard metadata was edited; re-run `pdelta apply`")
    pairs = [(alphas[k], found["post"][i], found["base"][i]) for k, i in enumerate(sorted(found["post"]))]
    deltas = [(alphas[n_pairs + k], found["delta"][j]) for k, j in enumerate(sorted(found["delta"]))]
    return Sources(new_base, pairs, deltas)


def _reopen(rec: dict[str, Any], opened: dict[str, Checkpoint]) -> Checkpoint:
    path, role = Path(rec["path"]), rec["role"]
    gone = not path.is_dir() or any(not (path / n).is_file() for n in rec.get("files") or {})
    if gone and rec.get("repo") and rec.get("revision"):  # a Hub input whose shards left the cache
        from .hub import local_folder

        path = local_folder(f"{rec['repo']}@{rec['revision']}")
    if str(path) in opened:
        return opened[str(path)]
    if not path.is_dir():
        raise VerifyError(f"input {role} is missing: {path} (given as {rec.get('ref')!r})",
                          hint="restore it at that path; verify re-reads the inputs the output was made from")
    files: dict[str, dict[str, Any]] = rec.get("files") or {}
    changed = "verify needs the exact inputs: restore them, or re-run `pdelta apply` on the current ones"
    for name, fingerprint in files.items():
        problem = _file_problem(path / name, fingerprint)
        if problem:
            raise VerifyError(f"input {role} changed since the output was written: {path / name} {problem}",
                              hint=changed)
    try:
        ck = Checkpoint.open(path, allow_pickle=any(n.endswith(".bin") for n in files))
    except CheckpointError as e:
        raise VerifyError(f"input {role}: {e.message}", hint=e.hint) from None
    now = sorted(f.name for f in ck.files)
    if files and now != sorted(files):
        raise VerifyError(f"input {role} changed since the output was written: {path} now has shards {now}, "
                          f"the output was made from {sorted(files)}", hint=changed)
    opened[str(path)] = ck
    return ck


def _file_problem(file: Path, fingerprint: dict[str, Any]) -> str | None:
    """Why `file` differs from its recorded fingerprint, or None when it matches."""
    if not file.is_file():
        return "is missing"
    size = file.stat().st_size
    if "size" in fingerprint and size != fingerprint["size"]:
        return f"has {size} bytes, {fingerprint['size']} when the output was written"
    if file.suffix == ".safetensors" and "header_sha256" in fingerprint:
        try:
            header = read_shard_header(file).header_bytes
        except CheckpointError as e:
            return f"is unreadable now ({e.message})"
        if hashlib.sha256(header).hexdigest() != fingerprint["header_sha256"]:
            return "has a different header (tensor names, dtypes, shapes or offsets changed)"
    if "sha256" in fingerprint:
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
        if h.hexdigest() != fingerprint["sha256"]:
            return "has different contents (its sha256 differs from the recorded one)"
    return None


# -- recompute ----------------------------------------------------------------------------------
class _Mismatch(Exception):
    """A tensor the recorded inputs cannot produce (missing or reshaped since)."""


def recompute(out: Checkpoint, src: Sources, samples: int, seed: int) -> dict[str, Any]:
    """Recompute `samples` seeded rows (elements, for 1-D) of every float tensor in fp64 and compare."""
    import torch

    res: dict[str, Any] = {"ok": True, "tensors": 0, "rows": 0, "elements": 0, "exact": 0, "within_1ulp": 0,
                           "mismatched": 0, "copied": 0, "finite_only": [], "problems": [], "examples": []}
    vocabs = [ck.vocab for ck in [out, *src.all()] if ck.vocab is not None]
    vocabs_differ = any(v != vocabs[0] for v in vocabs[1:])
    if src.new_base is not None:
        res["problems"] += [f"{n}: in new base {src.new_base.path} but not in the output"
                            for n in src.new_base.tensors if n not in out.tensors]
    for name, info in out.tensors.items():
        if not info.is_float:
            problem = _copy_problem(out, src, name)
            res["copied"] += problem is None
            res["problems"] += [problem] if problem else []
            continue
        nb = src.new_base.tensors.get(name) if src.new_base is not None else None
        if src.new_base is None and name.endswith(("@U", "@V")):
            res["finite_only"].append({"name": name, "reason": "low-rank factor (from an SVD, not row by row)"})
            continue
        if is_vocab_tensor(name, info.shape) and (vocabs_differ or (nb is not None and nb.shape != info.shape)):
            res["finite_only"].append({"name": name, "reason": "vocab-aligned rows follow the output tokenizer"})
            continue
        if info.numel == 0:
            continue
        rows = info.shape[0] if info.shape else 1
        idx = torch.tensor(sorted(random.Random(f"{seed}:{name}").sample(range(rows), min(samples, rows))))
        try:
            ref = _reference(name, info.shape, src, idx)
        except _Mismatch as e:
            res["problems"].append(str(e))
            continue
        got = _take(out.read(name), idx)
        ulps = ulp_distance(got, ref.to(got.dtype))
        res["tensors"] += 1
        res["rows"] += len(idx)
        res["elements"] += ulps.numel()
        res["exact"] += int((ulps == 0).sum())
        res["within_1ulp"] += int((ulps == 1).sum())
        bad = (ulps > 1).nonzero().tolist()
        res["mismatched"] += len(bad)
        for r, c in bad[:MAX_EXAMPLES - len(res["examples"])]:
            res["examples"].append({"tensor": name, "row": int(idx[r]), "column": c, "expected": float(ref[r, c]),
                                    "got": float(got[r, c]), "ulps": int(ulps[r, c])})
    if res["mismatched"]:
        first = res["examples"][0]
        res["problems"].insert(0, f"{res['mismatched']} of {res['elements']} sampled elements differ from the "
                                  f"recomputed formula by more than 1 ulp (first: {first['tensor']} "
                                  f"[{first['row']}, {first['column']}] is {first['got']:g}, "
                                  f"expected {first['expected']:g})")
    res["ok"] = not res["problems"]
    if res["problems"]:
        more = len(res["problems"]) - 3
        res["problem"] = "; ".join(res["problems"][:3]) + (f" (+{more} more)" if more > 0 else "")
    return res


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of `t` viewed as (rows, rest); for a 1-D tensor, elements as a column. Copies only those."""
    return t.reshape(t.shape[0] if t.dim() else 1, -1)[idx]


def _reference(name: str, shape: tuple[int, ...], src: Sources, idx: torch.Tensor) -> torch.Tensor:
    """new_base + Σ α (post − base) + Σ α delta on rows `idx`, in fp64."""
    import torch

    f64 = torch.float64
    if src.new_base is not None:
        nb = src.new_base.tensors.get(name)
        if nb is None or nb.shape != shape:
            raise _Mismatch(f"{name}: " + (f"not in new base {src.new_base.path}" if nb is None else
                                           f"shape {list(shape)} in the output but {list(nb.shape)} in new base"))
        acc = _take(src.new_base.read(name), idx).to(f64)
    else:
        acc = torch.zeros(len(idx), math.prod(shape[1:]) if len(shape) > 1 else 1, dtype=f64)
    for alpha, post, base in src.pairs:
        pn, bn = resolve_name(post, name), resolve_name(base, name)
        for role, ck, key in (("post", post, pn), ("base", base, bn)):
            if key is None or ck.tensors[key].shape != shape:
                raise _Mismatch(f"{name}: " + ("missing" if key is None else f"shape {list(ck.tensors[key].shape)}")
                                + f" in {role} {ck.path}, output has {list(shape)}")
        diff = _take(post.read(pn), idx).to(f64).sub_(_take(base.read(bn), idx).to(f64))
        acc.add_(diff, alpha=alpha)
    for alpha, delta in src.deltas:
        if f"{name}@U" in delta.tensors and f"{name}@V" in delta.tensors:
            u = delta.read(f"{name}@U")[idx].to(f64)
            acc.add_(u @ delta.read(f"{name}@V").to(f64), alpha=alpha)
            continue
        key = name if name in delta.tensors else (embedding_name(delta) if name == "lm_head.weight" else None)
        if key is None or delta.tensors[key].shape != shape:
            raise _Mismatch(f"{name}: missing or reshaped in delta {delta.path}")
        acc.add_(_take(delta.read(key), idx).to(f64), alpha=alpha)
    return acc


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise distance in units in the last place between two tensors of one float dtype
    (0 for equal values, +0 vs −0 and NaN vs NaN).

    >>> import torch
    >>> x = torch.tensor([1.0, 1.0, -0.0], dtype=torch.bfloat16)
    >>> ulp_distance(x, torch.tensor([1.0, 1.0078125, 0.0], dtype=torch.bfloat16)).tolist()
    [0, 1, 0]
    """
    import torch

    size = a.element_size()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    mask = (1 << (8 * size - 1)) - 1
    ia, ib = (x.contiguous().view(ints).to(torch.int64) for x in (a, b))
    ma, mb = ia & mask, ib & mask
    same_sign = (ia < 0) == (ib < 0)
    cap = 1 << 40  # opposite signs: distance through zero, capped so int64 cannot overflow
    dist = torch.where(same_sign, (ma - mb).abs(), ma.clamp(max=cap) + mb.clamp(max=cap))
    return dist.masked_fill_(a.isnan() & b.isnan(), 0)


def _copy_problem(out: Checkpoint, src: Sources, name: str) -> str | None:
    """Non-float tensors are copied from the new base: check every byte, chunk by chunk."""
    ref = src.new_base if src.new_base is not None else (src.pairs[0][1] if src.pairs else None)
    if ref is None or name not in ref.tensors:
        return f"{name}: non-float tensor with no source among the inputs"
    a, b = out.read(name).reshape(-1), ref.read(name).reshape(-1)
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{name}: non-float tensor differs in shape or dtype from {ref.path}"
    for s in range(0, a.numel(), CHUNK_ELEMENTS):
        if not bool((a[s:s + CHUNK_ELEMENTS] == b[s:s + CHUNK_ELEMENTS]).all()):
            return f"{name}: non-float tensor differs from its copy source {ref.path}"
    return None


# -- finite, load -------------------------------------------------------------------------------
def check_finite(out: Checkpoint, progress: bool = True) -> dict[str, Any]:
    """Count NaN/Inf in every float output tensor, streaming ~1M elements at a time."""
    import torch

    floats = [t for t in out.tensors.values() if t.is_float]
    nonfinite: dict[str, int] = {}
    with progress_bar(sum(t.numel for t in floats), "verify", unit="el", enabled=progress) as bar:
        for info in floats:
            flat = out.read(info.name).reshape(-1)
            bad = 0
            for s in range(0, info.numel, CHUNK_ELEMENTS):
                chunk = flat[s:s + CHUNK_ELEMENTS]
                bad += chunk.numel() - int(torch.isfinite(chunk).sum())
                bar.update(chunk.numel())
            if bad:
                nonfinite[info.name] = bad
    res: dict[str, Any] = {"ok": not nonfinite, "tensors": len(floats), "elements": sum(t.numel for t in floats),
                           "nonfinite": nonfinite}
    if nonfinite:
        name, n = next(iter(nonfinite.items()))
        res["problem"] = f"{sum(nonfinite.values())} NaN/Inf in {len(nonfinite)} tensors (first: {name}, {n})"
    return res


def smoke_load(path: Path, progress: bool = True) -> dict[str, Any]:
    """Load with transformers on CPU and run one forward pass; missing or unused weights fail it."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    bars = hf_logging.is_progress_bar_enabled()
    if not progress_enabled(progress):
        hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype="auto", output_loading_info=True)
        model.eval()
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.tensor([[t % vocab for t in SMOKE_TOKENS]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding itself
        return {"ok": False, "problem": f"transformers cannot load or run it ({type(e).__name__}: {e})"[:600]}
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    res: dict[str, Any] = {"ok": True, "class": type(model).__name__, "logits_shape": list(logits.shape),
                           "seconds": round(time.perf_counter() - start, 2)}
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or []]
    problems = [f"{what}: {', '.join(sorted(keys)[:3])}" for what, keys in
                (("weights missing (randomly initialised)", missing), ("weights unused", unexpected),
                 ("weights with the wrong shape", mismatched)) if keys]
    if not bool(torch.isfinite(logits).all()):
        problems.append("the forward pass produced NaN/Inf logits")
    if problems:
        res.update(ok=False, problem="; ".join(problems))
    return res
