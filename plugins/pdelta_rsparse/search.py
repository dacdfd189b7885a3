"""Per-layer budgets and the ρ search (DESIGN.md §7).

A layer with weight W (m×n) and sparsity s reads C = 1 − s of its weight bytes per decode token.
A split ρ spends ρ·C on kept input channels, k = ⌊ρ·C·n⌋ rows of Wᵀ, and the rest on a rank
r = ⌊(1 − ρ)·C·m·n / (m + n)⌋ approximation of W (r·(m+n) numbers). The threshold τ keeps, on
the calibration tokens, exactly k of n channels on average (the k·T-th largest score of T tokens).

The paper picks ρ per layer by an evolutionary search on perplexity; that code was never
released. Here each layer's ρ minimises that layer's relative output error on the calibration
tokens, ‖X Wᵀ − Ŷ‖² / ‖X Wᵀ‖², at the layer's budget C (so the model-level budget holds too).
The error of every rank comes from one matmul per ρ: with W = U S Vᵀ and Z = X ⊙ ¬keep, the
error is Z (W − W_r)ᵀ = Σ_{i ≥ r} s_i (Z v_i) u_iᵀ, whose squared norm is Σ_{i ≥ r} s_i² ‖Z v_i‖²
because the u_i are orthonormal.

>>> budget(4096, 4096, sparsity=0.5, rho=0.5)
Budget(keep=1024, rank=512)
>>> s = search_layer(x, w, sparsity=0.5, mode="layerwise")   # doctest: +SKIP
>>> s.rho, s.rank, s.rel_err                                 # doctest: +SKIP
(0.8, 102, 0.013)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

RHO_GRID = tuple(i / 10 for i in range(11))  # 0.0, 0.1, ..., 1.0
KEEP_ALL = -1.0  # τ below every score (scores are ≥ 0)
KEEP_NONE = 3.0e38  # τ above every finite fp32 score


class Budget(NamedTuple):
    keep: int  # k: input channels read from Wᵀ per token (on average)
    rank: int  # r: columns of U_r and rows of Σ_r V_rᵀ


def budget(m: int, n: int, *, sparsity: float, rho: float) -> Budget:
    """k and r for a layer W (m×n) at `sparsity` with split `rho` (the formulas of DESIGN.md §7)."""
    c = 1.0 - sparsity
    keep = min(n, int(rho * c * n + 1e-9))
    rank = min(min(m, n), int((1.0 - rho) * c * m * n / (m + n) + 1e-9))
    return Budget(keep, rank)


@dataclass(frozen=True)
class LayerSetting:
    """What a layer runs with; recorded per layer in config.json under `rsparse.layers`."""

    tau: float  # keep channel j when |x_j|·‖W[:, j]‖ > tau
    rho: float  # share of the budget spent on kept channels
    s: float  # the layer's sparsity (1 − share of weight bytes read)
    rank: int  # r
    keep: int  # k, the planned mean of kept channels per token
    rel_err: float  # relative output error on the calibration tokens (dense inputs)

    def to_json(self) -> dict:
        return asdict(self)


def threshold(scores: torch.Tensor, keep: int) -> float:
    """τ such that `keep` of the n channels per token score above it, on average over the tokens."""
    tokens, n = scores.shape
    if keep >= n:
        return KEEP_ALL
    if keep <= 0:
        return KEEP_NONE
    flat = scores.reshape(-1)
    # the (keep·T + 1)-th largest score: exactly keep·T scores lie above it (ties aside)
    return float(torch.kthvalue(flat, flat.numel() - keep * tokens).values)


def layer_errors(x: torch.Tensor, weight: torch.Tensor, col_norm: torch.Tensor, *, sparsity: float,
                 rhos: tuple[float, ...], svd: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> list[LayerSetting]:
    """The setting (τ, k, r) and relative output error of every ρ in `rhos` for one layer.

    x: calibration inputs (T×n, fp32); weight: W (m×n); svd: (S, Vh) of W if already computed.
    """
    m, n = weight.shape
    x = x.float()
    scores = x.abs() * col_norm
    dense_sq = float(torch.matmul(x, weight.t()).square().sum()) or 1.0
    if svd is None and any(budget(m, n, sparsity=sparsity, rho=r).rank for r in rhos):
        _, s_vals, vh = torch.linalg.svd(weight, full_matrices=False)
        svd = (s_vals, vh)
    out = []
    for rho in rhos:
        keep, rank = budget(m, n, sparsity=sparsity, rho=rho)
        tau = threshold(scores, keep)
        z = x.masked_fill(scores > tau, 0.0)
        if keep >= n:
            err = 0.0
        elif svd is not None:
            proj = torch.matmul(z, svd[1].t()).square().sum(0) * svd[0].square()  # s_i² ‖Z v_i‖²
            err = float(proj[rank:].sum())
        else:
            err = float(torch.matmul(z, weight.t()).square().sum())
        out.append(LayerSetting(tau, rho, sparsity, rank, keep, err / dense_sq))
    return out


def search_layer(x: torch.Tensor, weight: torch.Tensor, col_norm: torch.Tensor, *, sparsity: float,
                 mode: str = "layerwise", rho: float = 1.0, errors: dict[float, float] | None = None
                 ) -> LayerSetting:
    """One layer's setting: ρ from the grid with the least output error ("layerwise"), or the given ρ ("none").

    `errors`, when given, receives the relative error of every ρ tried (for reports).
    """
    if sparsity == 0.0:  # everything kept: the dense layer, exactly
        return LayerSetting(KEEP_ALL, 1.0, 0.0, 0, weight.shape[1], 0.0)
    rhos = RHO_GRID if mode == "layerwise" else (rho,)
    settings = layer_errors(x, weight, col_norm, sparsity=sparsity, rhos=rhos)
    if errors is not None:
        errors.update({s.rho: s.rel_err for s in settings})
    # least error; among near-ties the larger ρ (the sparse part reads faster per byte than a GEMV)
    best = min(s.rel_err for s in settings)
    return max((s for s in settings if s.rel_err <= best * (1 + 1e-6) + 1e-12), key=lambda s: s.rho)
