"""The subspace of GaLore 2: which side to project, a seeded randomized SVD, 8-bit storage, owner-rank SVD.

For a weight W (m×n) with gradient G and rank r:

* left  projector P (m×r, top-r left singular vectors of G):  R = Pᵀ G (r×n),  update P N(R)
* right projector Q (n×r, top-r right singular vectors of G): R = G Q  (m×r),  update N(R) Qᵀ

`choose_side` keeps the state small. Per matrix it holds two moments and a projector: left costs
r(2n + m) numbers, right r(2m + n), so the moments go along the SMALLER side: left for m ≥ n,
right for m < n. (The GaLore paper and galore-torch's default do the reverse, left for m ≤ n,
which keeps the projector small and the moments large; both sides capture exactly the same
energy, the top-r singular values, since ‖PᵀG‖ = ‖GQ‖. On a 512×1408 MLP matrix at r = 128 the
state is 0.22× Adam's here against 0.30× with the paper's rule.) Under FSDP2 the parameters are
DTensors sharded on dim 0 (rows); there the right side is always taken: R = G Q has G's rows, so
the moments are sharded exactly like the parameter and each rank computes its rows from its own
gradient shard, while Q (n×r) is small and replicated. A left projector would need PᵀG, a sum
over every rank's rows: moments replicated on every rank and an all-reduce per step.

`randomized_svd` is the Halko–Martinsson–Tropp range finder (as `torch.svd_lowrank`) with a
seeded generator, so a refresh is reproducible: resuming from a checkpoint or running on another
rank draws the same sketch.

>>> import torch
>>> g = torch.randn(64, 256)
>>> choose_side(tuple(g.shape))
'right'
>>> q = projector(g, 8, "right", generator=torch.Generator().manual_seed(0))
>>> tuple(q.shape), captured_energy(g, q, "right") > 8 / 64
((256, 8), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Side = Literal["left", "right"]


def choose_side(shape: tuple[int, ...], *, sharded: bool = False) -> Side:
    """Left for m ≥ n (moments r×n), right for m < n (m×r); always right for dim-0 sharded (FSDP2) params."""
    m, n = shape
    return "right" if sharded or m < n else "left"


def moment_shape(shape: tuple[int, ...], rank: int, side: Side) -> tuple[int, int]:
    m, n = shape
    return (rank, n) if side == "left" else (m, rank)


def randomized_svd(a: torch.Tensor, rank: int, *, oversample: int = 8, niter: int = 2,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` left singular vectors (m×rank) and values of `a` (m×n) from a (rank+oversample)-column
    sketch with `niter` power iterations, re-orthonormalised each pass (as torch.svd_lowrank)."""
    a = a.float()
    m, n = a.shape
    q = min(rank + oversample, m, n)
    omega = torch.randn(n, q, generator=generator, dtype=a.dtype).to(a.device)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.T @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u_small, s, _ = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return (basis @ u_small)[:, :rank].contiguous(), s[:rank]


def exact_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` left singular vectors and values by a full (thin) SVD: the reference for the bench."""
    u, s, _ = torch.linalg.svd(a.float(), full_matrices=False)
    return u[:, :rank].contiguous(), s[:rank]


def projector(grad: torch.Tensor, rank: int, side: Side, *, oversample: int = 8, niter: int = 2,
              generator: torch.Generator | None = None, exact: bool = False) -> torch.Tensor:
    """P (m×rank) for the left side, Q (n×rank) for the right side, with orthonormal columns."""
    a = grad if side == "left" else grad.T
    if exact:
        return exact_svd(a, rank)[0]
    return randomized_svd(a, rank, oversample=oversample, niter=niter, generator=generator)[0]


def project(grad: torch.Tensor, proj: torch.Tensor, side: Side) -> torch.Tensor:
    """R = Pᵀ G (left) or G Q (right)."""
    return proj.T @ grad if side == "left" else grad @ proj


def project_back(low: torch.Tensor, proj: torch.Tensor, side: Side) -> torch.Tensor:
    """P N (left) or N Qᵀ (right): a low-rank direction back in the weight's shape."""
    return proj @ low if side == "left" else low @ proj.T


def captured_energy(grad: torch.Tensor, proj: torch.Tensor, side: Side) -> float:
    """‖R‖² / ‖G‖²: the share of the gradient's squared Frobenius norm inside the subspace."""
    total = grad.float().pow(2).sum()
    return float(project(grad.float(), proj, side).pow(2).sum() / total) if total > 0 else 1.0


# -- 8-bit storage -------------------------------------------------------------------------------
def quantize(proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and one fp32 absmax scale per column (each column is a unit vector, so a per-column
    scale keeps the relative error ~1/254 of its largest entry)."""
    scale = proj.abs().amax(dim=0).clamp_min(1e-12) / 127.0
    return torch.round(proj / scale).to(torch.int8), scale.float()


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale


# -- owner-rank SVD under torch.distributed -------------------------------------------------------
@dataclass
class Job:
    """One matrix to refresh: its key (same on every rank), this rank's gradient rows, the global
    row count and the rank of its subspace."""

    key: int
    local: torch.Tensor
    rows: int
    rank: int


def distributed_projectors(jobs: list[Job], *, oversample: int, niter: int, seed: int,
                           step: int) -> tuple[dict[int, torch.Tensor], int]:
    """Right projectors for dim-0 sharded gradients, each computed once, by its owner rank.

    `jobs` lists the same matrices in the same order on every rank. Job i is owned by rank
    i % world: the owner gathers the padded row shards (dist.gather), runs the SVD, and every rank
    receives Q by dist.broadcast. All gathers go first, then each rank's own SVDs, then the
    broadcasts, so the owners work in parallel. Returns (key -> Q, SVDs run on this rank).
    """
    import torch.distributed as dist

    world, me = dist.get_world_size(), dist.get_rank()
    gathered: dict[int, torch.Tensor] = {}
    for i, job in enumerate(jobs):
        owner, per = i % world, -(-job.rows // world)
        padded = torch.zeros(per, job.local.shape[1], dtype=torch.float32, device=job.local.device)
        padded[: job.local.shape[0]] = job.local.float()
        parts = [torch.empty_like(padded) for _ in range(world)] if me == owner else None
        dist.gather(padded, parts, dst=owner)
        if me == owner:
            gathered[job.key] = _unpad(parts, job.rows)
    out: dict[int, torch.Tensor] = {}
    for i, job in enumerate(jobs):
        if i % world == me:
            gen = torch.Generator().manual_seed(refresh_seed(seed, job.key, step))
            out[job.key] = projector(gathered.pop(job.key), job.rank, "right", oversample=oversample, niter=niter,
                                     generator=gen)
    runs = len(out)
    for i, job in enumerate(jobs):
        buf = out.get(job.key)
        if buf is None:
            buf = torch.empty(job.local.shape[1], job.rank, dtype=torch.float32, device=job.local.device)
        dist.broadcast(buf, src=i % world)
        out[job.key] = buf
    return out, runs


def refresh_seed(seed: int, key: int, step: int) -> int:
    """A sketch seed per (optimizer seed, matrix, step): the same on every rank and after a resume."""
    return (seed * 1_000_003 + key * 7919 + step) % (2**63 - 1)


def _unpad(parts: list[torch.Tensor], rows: int) -> torch.Tensor:
    """Rows of an FSDP2-style dim-0 sharding: rank k holds rows [k·per, min((k+1)·per, rows))."""
    per = parts[0].shape[0]
    return torch.cat([p[: max(0, min(per, rows - k * per))] for k, p in enumerate(parts)])
