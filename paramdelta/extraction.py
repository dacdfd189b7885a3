"""Store a post-training delta (post − base) to apply later onto any base: `apply --delta`.

Full deltas keep every element (fp32 by default, so nothing is lost); low-rank deltas keep
each 2-D tensor as factors U (m×r, singular values folded in) and V (r×n) from
`torch.svd_lowrank`, stored as `{name}@U` and `{name}@V`. Embeddings, 1-D tensors and
matrices where factors would not save space stay full. The factors are computed in a first
pass into a scratch folder, because with `energy=` the ranks, and so the output layout,
are known only after each SVD.

>>> extract("delta", post="inst", base="base", energy=0.9)    # doctest: +SKIP
ExtractReport(out='delta', full=12, lowrank=14, ...)
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Checkpoint, dtype_tag, torch_dtype
from .errors import OptionError, PreflightError
from .plan import architecture_problems, resolve_name
from .progress import progress_bar
from .provenance import copy_tokenizer, input_record, model_card, shard_metadata, write_config
from .vocab import is_vocab_tensor
from .writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, OutTensor

CHUNK_ELEMENTS = 1 << 20
OVERSAMPLE = 8


@dataclass
class ExtractReport:
    out: str
    full: int
    lowrank: int
    bytes_written: int
    ratio: float  # stored bytes / bytes of the full delta in the same dtype
    min_energy: float
    mean_energy: float
    seconds: float


def extract(out: str | Path, *, post: str | Path, base: str | Path, rank: int | None = None,
            energy: float | None = None, dtype: str = "float32", max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
            overwrite: bool = False, allow_pickle: bool = False, progress: bool = True) -> ExtractReport:
    """Write post − base to `out`, in full or as low-rank factors (`rank=` or `energy=`)."""
    import torch

    start = time.perf_counter()
    if rank is not None and energy is not None:
        raise OptionError("--rank and --energy exclude each other", hint="pass only one")
    if rank is not None and rank <= 0:
        raise OptionError(f"--rank must be positive, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise OptionError(f"--energy must be in (0, 1], got {energy}", hint="e.g. --energy 0.9")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise OptionError(f"unknown --dtype {dtype!r}", hint="use float32, bfloat16 or float16")
    post_ck = Checkpoint.open(post, allow_pickle=allow_pickle)
    base_ck = Checkpoint.open(base, allow_pickle=allow_pickle)
    names = _preflight(post_ck, base_ck)
    store = torch_dtype(dtype_tag(dtype))
    lowrank_wanted = rank is not None or energy is not None

    with tempfile.TemporaryDirectory(prefix=".pdelta-extract-", dir=Path(out).resolve().parent) as scratch:
        plan: list[OutTensor] = []
        energies: list[float] = []
        factor_files: dict[str, Path] = {}
        total = sum(post_ck.tensors[n].numel for n in names)
        with progress_bar(total, "factorise" if lowrank_wanted else "plan", unit="el", enabled=progress) as bar:
            for i, name in enumerate(names):
                info = post_ck.tensors[name]
                factors = None
                if lowrank_wanted and len(info.shape) == 2 and not is_vocab_tensor(name, info.shape):
                    base_t = base_ck.read(resolve_name(base_ck, name))
                    delta = post_ck.read(name).to(torch.float32) - base_t.to(torch.float32)
                    factors = _factorise(delta, rank, energy)
                if factors is None:
                    plan.append(OutTensor(name, dtype_tag(store), info.shape))
                else:
                    u, v, captured = factors
                    energies.append(captured)
                    f = Path(scratch) / f"{i}.safetensors"
                    from safetensors.torch import save_file

                    save_file({"U": u.to(store).contiguous(), "V": v.to(store).contiguous()}, str(f))
                    factor_files[name] = f
                    plan += [OutTensor(f"{name}@U", dtype_tag(store), tuple(u.shape)),
                             OutTensor(f"{name}@V", dtype_tag(store), tuple(v.shape))]
                bar.update(info.numel)

        meta = shard_metadata("delta", "post - base", [1.0],
                              [input_record("post", post_ck, str(post)), input_record("base", base_ck, str(base))],
                              {"rank": rank, "energy": energy})
        with CheckpointWriter(out, plan, max_shard_size=max_shard_size, metadata=meta, overwrite=overwrite,
                              inputs=[post_ck.path, base_ck.path]) as writer:
            with progress_bar(sum(t.nbytes for t in plan), "extract", enabled=progress) as bar:
                for name in names:
                    if name in factor_files:
                        factors_ck = Checkpoint.open(factor_files[name])
                        for part in ("U", "V"):
                            writer.write(factors_ck.read(part).contiguous())
                        continue
                    p = post_ck.read(name).reshape(-1)
                    b = base_ck.read(resolve_name(base_ck, name)).reshape(-1)
                    wide = torch.float64 if torch.float32 in (p.dtype, b.dtype) else torch.float32
                    for s in range(0, p.numel(), CHUNK_ELEMENTS):
                        d = p[s:s + CHUNK_ELEMENTS].to(wide)
                        d.sub_(b[s:s + CHUNK_ELEMENTS].to(wide))
                        writer.write(d.to(store))
                        bar.update(d.numel() * store.itemsize)
            if post_ck.config:
                write_config(post_ck.config, writer.dir, {})
            copy_tokenizer(post_ck.path, writer.dir)
            kind = "full" if not factor_files else f"low-rank ({'rank ' + str(rank) if rank else f'energy {energy}'})"
            (writer.dir / "README.md").write_text(model_card(
                base_models=[str(base)], title="ParamΔ delta", relation="adapter", tags=("paramdelta", "delta"),
                summary=[f"A stored {kind} delta `post − base`, to apply with "
                         "`pdelta apply --delta THIS --new-base NEW_BASE --out OUT`."],
                sections={"Inputs": [f"- post: `{post}`", f"- base: `{base}`"]}))
            writer.commit()
            written = writer.total_size
    full_bytes = sum(post_ck.tensors[n].numel for n in names) * store.itemsize
    return ExtractReport(str(out), len(names) - len(factor_files), len(factor_files), written,
                         written / max(full_bytes, 1), min(energies, default=1.0),
                         sum(energies) / len(energies) if energies else 1.0, time.perf_counter() - start)


def _preflight(post: Checkpoint, base: Checkpoint) -> list[str]:
    """Float tensors of post, each checked against base; every problem reported at once."""
    problems = architecture_problems(post, base, "base")
    names = []
    for name, info in post.tensors.items():
        if not info.is_float:
            continue
        key = resolve_name(base, name)
        if key is None:
            problems.append(f"tensor {name!r} is missing in base {base.path}")
        elif base.tensors[key].shape != info.shape:
            problems.append(f"{name}: shape {list(info.shape)} in post {post.path} but "
                            f"{list(base.tensors[key].shape)} in base {base.path} (extract needs one vocabulary; "
                            "use `pdelta apply --post/--base` to realign)")
        names.append(name)
    if problems:
        raise PreflightError(problems, hint="pass a post model and the base it was trained from")
    return names


def _factorise(delta, rank: int | None, energy: float | None):
    """Rank-r factors (U·diag(S), Vᵀ) and the captured energy, or None when full storage is smaller."""
    import torch

    m, n = delta.shape
    total = float(delta.double().pow(2).sum())
    if total == 0.0:
        return torch.zeros(m, 1), torch.zeros(1, n), 1.0
    limit = min(m, n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if rank is not None:
            r = min(rank, limit)
            u, s, v = _svd(delta, r)
        else:
            q = 16
            while True:
                u, s, v = _svd(delta, q)
                share = torch.cumsum(s.double() ** 2, 0) / total
                if share[-1] >= energy or q >= limit:
                    r = int((share < energy).sum()) + 1
                    r = min(r, len(s))
                    break
                q = min(q * 2, limit)
    if r * (m + n) >= m * n:
        return None
    u, s, v = u[:, :r], s[:r], v[:, :r]
    captured = float((s.double() ** 2).sum() / total)
    return u * s, v.T.contiguous(), min(captured, 1.0)


def _svd(delta, q: int):
    import torch

    limit = min(delta.shape)
    if q + OVERSAMPLE >= limit:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :q], s[:q], vh[:q].T
    return torch.svd_lowrank(delta, q=q + OVERSAMPLE, niter=2)
