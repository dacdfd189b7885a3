"""The TAPA score (Token-Aware Phase Attention, arXiv 2509.12635) as a transformers attention function.

With q = (q_A, q_P) and k = (k_A, k_P) split at θD (the first θD dims are the amplitude part):

    A(q, k) = (q_A·k_A / √(θD)) · cos(2π |m−n|^α · q_P·k_P / √((1−θ)D))

then the causal mask and a softmax, as usual. No rotary embedding is applied anywhere.

transformers 5.x wiring (DESIGN.md §9): the function is registered as attention implementation
"tapa" AND a mask function under the same name, because `create_causal_mask` returns no mask at
all for an implementation it has no mask function for — the attention would silently see the
future. Positions: TAPA depends on |m−n| only, so we use index distances inside the key/value
tensor: key j sits at j, query i at (s_k − s_q) + i. That is right for a growing (dynamic) KV
cache, for right padding and for left padding alike (pads are masked, and between real tokens the
index distance is the position distance); packed sequences are separated by the mask. A static,
pre-allocated cache (s_k fixed at its maximum) is not supported.

>>> scores = tapa_scores(q, k, theta=0.5, alpha=0.1)        # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

NAME = "tapa"  # attention implementation and mask function name in transformers' registries
CHUNK_SCORES = 1 << 22  # scores per (batch, head) above which no-grad attention runs in query chunks


def split_dim(head_dim: int, theta: float) -> int:
    """Amplitude dims θD; raises ValueError unless θ ∈ (0, 1) and θD is a whole number of dims in [1, D−1]."""
    if not 0.0 < theta < 1.0:
        raise ValueError(f"tapa_theta must be in (0, 1), got {theta}")
    a = theta * head_dim
    if abs(a - round(a)) > 1e-6 or not 1 <= round(a) <= head_dim - 1:
        raise ValueError(f"tapa_theta·head_dim must be a whole number of dims in [1, {head_dim - 1}], got "
                         f"{theta}·{head_dim} = {a:g}")
    return int(round(a))


def tapa_scores(query: torch.Tensor, key: torch.Tensor, *, theta: float, alpha: float,
                q_offset: int | None = None) -> torch.Tensor:
    """Pre-mask TAPA scores, fp32, shape (..., s_q, s_k), for query (..., s_q, D) and key (..., s_k, D).

    Query i sits at position `q_offset + i` (default s_k − s_q: the queries are the last rows), key j at j.
    """
    d = query.shape[-1]
    a = split_dim(d, theta)
    s_q, s_k = query.shape[-2], key.shape[-2]
    off = s_k - s_q if q_offset is None else q_offset
    q, k = query.float(), key.float()
    amplitude = q[..., :a] @ k[..., :a].transpose(-1, -2) / math.sqrt(a)
    phase = q[..., a:] @ k[..., a:].transpose(-1, -2) / math.sqrt(d - a)
    pos_q = torch.arange(s_q, device=q.device, dtype=torch.float32) + off
    pos_k = torch.arange(s_k, device=q.device, dtype=torch.float32)
    dist = (pos_q[:, None] - pos_k[None, :]).abs().pow(alpha)  # 0**0 == 1: α = 0 ignores distance entirely
    return amplitude * torch.cos(2 * math.pi * dist * phase)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, h_kv, s, d) -> (b, h_kv·groups, s, d), each kv head shared by `groups` query heads (GQA)."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def tapa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention-interface signature; `scaling` is ignored (TAPA scales each part itself).

    query (b, h, s_q, D), key/value (b, h_kv, s_k, D), attention_mask additive (b, 1, s_q, s_k) or None.
    Returns (output (b, s_q, h, D), attention weights (b, h, s_q, s_k), or None when computed in chunks).
    Without gradients, long inputs run in query chunks of at most CHUNK_SCORES scores per (batch, head),
    so evaluating at long context needs memory for s_k·chunk scores rather than s_q·s_k.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    s_q, s_k = query.shape[-2], key.shape[-2]
    rows = max(1, CHUNK_SCORES // s_k)
    if torch.is_grad_enabled() or s_q <= rows:
        return _attend(module, query, key, value, attention_mask, s_k - s_q, dropout)
    outs = [_attend(module, query[:, :, i:i + rows], key, value,
                    None if attention_mask is None else attention_mask[:, :, i:i + rows], s_k - s_q + i, 0.0)[0]
            for i in range(0, s_q, rows)]
    return torch.cat(outs, 1), None


def _attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: torch.Tensor | None, q_offset: int, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = module.config
    scores = tapa_scores(query, key, theta=cfg.tapa_theta, alpha=cfg.tapa_alpha, q_offset=q_offset)
    if mask is not None:
        scores = scores + mask[..., : key.shape[-2]].float()
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def register() -> None:
    """Register "tapa" as an attention function and as a mask function (an additive float mask,
    as eager attention uses). Idempotent; called on `import pdelta_tapa`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, tapa_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
