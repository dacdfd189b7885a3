"""R-Sparse linear layers, the tensors they are built from, and the checkpoint loader.

`RSparseLinear` replaces one `nn.Linear` of a Llama/Qwen2/Mistral block. Its `mode` says when
it is sparse:

* "auto" (default): a forward of more than one token per sequence (prefill, scoring a prompt)
  is dense; one token per sequence (decode) runs the sparse kernel.
* "sparse": every token is sparse, as the paper (and TEAL) score accuracy; prompts go through
  the masked reference, which is exact but saves nothing.
* "dense": always dense (W x + b), for A/B checks.

>>> model = load_model("llama-rsparse")                  # doctest: +SKIP
>>> set_mode(model, "sparse")                            # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .kernel import keep_mask, masked_reference, sparse_linear
from .search import LayerSetting

MODES = ("auto", "sparse", "dense")
MODE_ENV = "PDELTA_RSPARSE_MODE"  # the loader's default mode, e.g. for `pdelta eval`
SUFFIXES = ("weight_t", "col_norm", "lr_u", "lr_v")  # tensors stored per layer, beside the original bias


def factorize(weight: torch.Tensor, rank: int, *, score: str = "weighted",
              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The stored tensors of one layer from its dense W (m×n), in checkpoint order.

    weight_t = Wᵀ (n×m), col_norm = ‖W[:, j]‖ (ones for score "abs"), lr_u = U_r (m×r) and
    lr_v = Σ_r V_rᵀ (r×n), the latter two only when r > 0. The SVD runs in fp32 (fp64 for fp64 W).
    """
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    out = {"weight_t": w.t().contiguous().to(dtype),
           "col_norm": (w.norm(dim=0) if score == "weighted" else torch.ones(w.shape[1], dtype=w.dtype)).to(dtype)}
    if rank > 0:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        out["lr_u"] = u[:, :rank].contiguous().to(dtype)
        out["lr_v"] = (s[:rank, None] * vh[:rank]).contiguous().to(dtype)
    return out


class RSparseLinear(nn.Module):
    """y = W (x ⊙ keep) + U_r Σ_r V_rᵀ (x ⊙ ¬keep) + b at decode, W x + b at prefill (see module doc)."""

    def __init__(self, weight_t: torch.Tensor, col_norm: torch.Tensor, tau: float,
                 lr_u: torch.Tensor | None = None, lr_v: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, mode: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        frozen = {"requires_grad": False}
        self.weight_t = nn.Parameter(weight_t, **frozen)
        self.col_norm = nn.Parameter(col_norm, **frozen)
        self.lr_u = nn.Parameter(lr_u, **frozen) if lr_u is not None and lr_u.shape[1] else None
        self.lr_v = nn.Parameter(lr_v, **frozen) if self.lr_u is not None else None
        self.bias = nn.Parameter(bias, **frozen) if bias is not None else None
        self.tau = float(tau)
        self.mode = mode

    @classmethod
    def from_linear(cls, linear: nn.Linear, setting: LayerSetting, *, score: str = "weighted",
                    dtype: torch.dtype = torch.float32, mode: str = "auto") -> RSparseLinear:
        """Build from a dense layer and its setting: the in-memory twin of what the transform writes."""
        parts = factorize(linear.weight, setting.rank, score=score, dtype=dtype)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(parts["weight_t"], parts["col_norm"], setting.tau, parts.get("lr_u"), parts.get("lr_v"),
                   bias, mode)

    @property
    def rank(self) -> int:
        return 0 if self.lr_u is None else self.lr_u.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """W (m×n) as a view of the stored Wᵀ, for code that inspects `.weight`."""
        return self.weight_t.t()

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        return keep_mask(x.to(self.weight_t.dtype), self.col_norm, self.tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(self.weight_t.dtype)
        per_sequence = x.shape[-2] if x.dim() >= 2 else 1
        if self.mode == "dense" or (self.mode == "auto" and per_sequence > 1):
            y = torch.matmul(x, self.weight_t)
            if self.bias is not None:
                y = y + self.bias
        elif per_sequence > 1:  # "sparse" mode on a prompt: same function, computed densely
            y = masked_reference(x, self.weight_t, self.lr_u, self.lr_v, self.col_norm, self.tau, self.bias)
        else:
            y = sparse_linear(x, self.weight_t, self.lr_u, self.lr_v, self.col_norm, self.tau, self.bias)
        return y.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"tau={self.tau:.4g}, mode={self.mode}")


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every R-Sparse layer of `model` to "auto", "sparse" or "dense"."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, RSparseLinear):
            m.mode = mode
    return model


def sparsify(model: nn.Module, settings: dict[str, LayerSetting], *, score: str = "weighted",
             dtype: torch.dtype = torch.float32, mode: str = "auto") -> nn.Module:
    """Replace, in place, each linear named in `settings` by its R-Sparse twin (for benches and tests)."""
    for name, setting in settings.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, RSparseLinear.from_linear(getattr(owner, child), setting, score=score, dtype=dtype,
                                                        mode=mode))
    return model


def load_model(path: str | os.PathLike, *, mode: str | None = None) -> Any:
    """A transformers model from an R-Sparse checkpoint, its targeted linears as `RSparseLinear`.

    `mode` defaults to $PDELTA_RSPARSE_MODE, else "auto" (prefill dense, decode sparse). Builds the
    architecture from config.json without initialising weights, swaps in the R-Sparse layers,
    then fills every tensor from the checkpoint; missing or unexpected tensors are errors.

    >>> model = load_model("out/llama-rsparse")          # doctest: +SKIP
    >>> model.generate(ids, max_new_tokens=32)           # doctest: +SKIP
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from paramdelta.checkpoint import Checkpoint
    from paramdelta.errors import CheckpointError

    mode = mode or os.environ.get(MODE_ENV) or "auto"
    if mode not in MODES:
        raise CheckpointError(f"R-Sparse mode {mode!r} is not one of {', '.join(MODES)}",
                              hint=f"set {MODE_ENV} to auto, sparse or dense")
    path = Path(path)
    section = json.loads((path / "config.json").read_text()).get("rsparse")
    if not section or "layers" not in section:
        raise CheckpointError(f"{path}/config.json has no `rsparse.layers` section",
                              hint="load it with transformers; it was not made by the rsparse transform")
    ckpt = Checkpoint.open(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    state = {}
    for layer, raw in section["layers"].items():
        tensors = {s: ckpt.read(f"{layer}.{s}").clone() for s in SUFFIXES if f"{layer}.{s}" in ckpt.tensors}
        missing = [s for s in ("weight_t", "col_norm") if s not in tensors]
        if missing:
            raise CheckpointError(f"{path}: R-Sparse layer {layer!r} lacks {', '.join(missing)}",
                                  hint="the checkpoint is incomplete; rerun `pdelta rsparse apply`")
        old = model.get_submodule(layer)
        bias = None if getattr(old, "bias", None) is None else torch.empty_like(old.bias)
        parent, _, child = layer.rpartition(".")
        setattr(model.get_submodule(parent), child,
                RSparseLinear(tensors["weight_t"], tensors["col_norm"], raw["tau"], tensors.get("lr_u"),
                              tensors.get("lr_v"), bias, mode))
        state.update({f"{layer}.{s}": t for s, t in tensors.items()})
    state.update({n: ckpt.read(n).clone() for n in ckpt.tensors if n not in state})
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not fit the model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}", hint="the checkpoint is incomplete or was edited by hand")
    if tied:
        model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    ckpt.close()
    print(f"rsparse: {len(section['layers'])} R-Sparse linears at sparsity {section.get('sparsity')}, mode {mode} "
          f"({'prefill dense, decode sparse; ' if mode == 'auto' else ''}{MODE_ENV}=sparse scores every token "
          "sparse, as the paper's accuracy tables do)", file=sys.stderr)
    return model.eval()
