"""The R-Sparse decode kernel and its masked reference (DESIGN.md §7).

For one linear layer with weight W (m×n), stored as Wᵀ (n×m, one input channel per contiguous row),
low-rank factors U_r (m×r) and Σ_r V_rᵀ (r×n), column norms ‖W[:, j]‖ and threshold τ:

    score_j = |x_j| · ‖W[:, j]‖        keep = score > τ
    y = W (x ⊙ keep) + U_r Σ_r V_rᵀ (x ⊙ ¬keep) + bias

`sparse_linear` computes this while reading only the kept rows of Wᵀ: `F.embedding_bag` in "sum"
mode with the kept inputs as per-sample weights is a gather-and-accumulate over rows, so the bytes
read are k·m for the sparse part plus r·(m+n) for the low-rank part, (1 − s)·m·n in all. Each
token is one bag, so a batch of decode tokens (each with its own mask) is one call. On CUDA the
same ops dispatch to CUDA kernels (embedding_bag's CUDA kernel also reads only the indexed rows);
no Triton needed.

Measured on this project's 2 shared cores (fp32, batch 1; `pdelta rsparse bench` prints the
current numbers): one bag per token beat splitting a token's rows over several bags for the
threads, because a parallel region on busy shared cores stalls for a scheduler slice (~8 ms)
whenever one of its threads is descheduled, while the dense GEMV gains nothing from a second
thread there anyway.

>>> y = sparse_linear(x, weight_t, lr_u, lr_v, col_norm, tau)            # doctest: +SKIP
>>> torch.allclose(y, masked_reference(x, weight_t, lr_u, lr_v, col_norm, tau), atol=1e-5)  # doctest: +SKIP
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def keep_mask(x: torch.Tensor, col_norm: torch.Tensor, tau: float) -> torch.Tensor:
    """Channels read from Wᵀ: score |x_j|·‖W[:, j]‖ above τ (`col_norm` of ones gives TEAL's |x_j|)."""
    return (x.abs() * col_norm) > tau


def low_rank(z: torch.Tensor, lr_u: torch.Tensor | None, lr_v: torch.Tensor | None) -> torch.Tensor | None:
    """U_r (Σ_r V_rᵀ z) for the channels the sparse part skipped, or None at rank 0."""
    if lr_u is None or lr_u.shape[-1] == 0:
        return None
    return F.linear(F.linear(z, lr_v), lr_u)


def sparse_linear(x: torch.Tensor, weight_t: torch.Tensor, lr_u: torch.Tensor | None, lr_v: torch.Tensor | None,
                  col_norm: torch.Tensor, tau: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The decode kernel for tokens x (..., n): reads only the kept rows of `weight_t` (n×m).

    Every leading index is one token with its own mask; returns (..., m).
    """
    lead, n = x.shape[:-1], x.shape[-1]
    tokens = x.reshape(-1, n)
    mask = keep_mask(tokens, col_norm, tau)
    if tokens.shape[0] == 1:
        cols = mask[0].nonzero().squeeze(1)
        offsets = torch.zeros(1, dtype=torch.long, device=x.device)
        weights = tokens[0].index_select(0, cols)
    else:
        rows, cols = mask.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=tokens.shape[0])
        offsets = torch.cumsum(counts, 0) - counts
        weights = tokens[rows, cols]
    y = F.embedding_bag(cols, weight_t, offsets, mode="sum", per_sample_weights=weights)
    if lr_u is not None and lr_u.shape[-1]:
        y += low_rank(tokens.masked_fill(mask, 0), lr_u, lr_v)
    if bias is not None:
        y += bias
    return y.reshape(*lead, weight_t.shape[1])


def masked_reference(x: torch.Tensor, weight_t: torch.Tensor, lr_u: torch.Tensor | None,
                     lr_v: torch.Tensor | None, col_norm: torch.Tensor, tau: float,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same function computed densely: W (x ⊙ keep) + U_r Σ_r V_rᵀ (x ⊙ ¬keep) + bias.

    Reads all of W, so it saves nothing; used for prompts scored sparsely (`mode="sparse"`) and
    as the test oracle for `sparse_linear`.
    """
    mask = keep_mask(x, col_norm, tau)
    y = torch.matmul(x * mask, weight_t)
    rest = low_rank(x.masked_fill(mask, 0), lr_u, lr_v)
    if rest is not None:
        y = y + rest
    return y if bias is None else y + bias
