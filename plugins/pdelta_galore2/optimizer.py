"""GaLore 2: Adam whose moments live in a rank-r subspace of each attention/MLP gradient (DESIGN.md §10).

For each targeted matrix W (m×n) with gradient G, every `update_period` steps (the first step
included) a seeded randomized SVD of G gives a projector (see `projection.py` for the side);
in between, G is projected to R (r×n or m×r), Adam's two moments are kept on R, and the
normalised step N is projected back:

    W ← W − lr·wd·W − lr·α·back(N),   N = m̂ / (√v̂ + eps),  m̂, v̂ bias-corrected

Embeddings, norms, biases, an untied lm_head and any matrix not named in `targets` get plain
AdamW (decay on linear matrices only, as `paramdelta.optim.decay_groups`). A rank equal to the
matrix's smaller side means the whole space: the identity basis is used (no SVD, no projector),
so with α = 1 the update is exactly AdamW's.

State per parameter is tensors only: `step` (fp32, 0-d), `exp_avg`, `exp_avg_sq`, and `proj` (fp32) or
`proj_q` (int8) + `proj_scale` (fp32) with `proj_bits=8`. `torch.load(weights_only=True)` reads
`opt.state_dict()`, and under FSDP2 the moments are DTensors sharded like their parameter, so
torch.distributed.checkpoint saves and reshards them. Sketches are seeded per (seed, matrix, step),
so a resumed run refreshes to the same subspace as an uninterrupted one.

>>> opt = galore2(model, lr=1e-3, weight_decay=0.1, rank=32, update_period=50)   # doctest: +SKIP

From the command line: `pdelta train ... --optimizer galore2 --rank 32` (or `--opt rank=32`).
"""

from __future__ import annotations

from typing import Any

import torch

from paramdelta.errors import OptionError

from .options import TARGETS, check, check_values, parse_betas, parse_targets, targeted
from .projection import (
    Job,
    choose_side,
    dequantize,
    distributed_projectors,
    moment_shape,
    project,
    project_back,
    projector,
    quantize,
    refresh_seed,
)


# -- the factory the training loop calls ------------------------------------------------------------
def galore2(model: torch.nn.Module, *, lr: float, weight_decay: float, rank: int = 128, update_period: int = 200,
            scale: float = 0.25, targets: Any = TARGETS, per_layer: bool = False, proj_bits: int = 32,
            side: str = "auto", betas: Any = (0.9, 0.999), eps: float = 1e-8, oversample: int = 8, niter: int = 2,
            seed: int = 0) -> GaLore2:
    """GaLore 2 on the attention/MLP matrices named in `targets`, AdamW on everything else.

    Options (`--opt key=value`): rank r; update_period T (steps between subspace refreshes); scale α;
    targets (q,k,v,o,gate,up,down); per_layer (update inside backward, single process); proj_bits
    (32, or 8 for int8 projectors); side (auto, left, right); betas, eps; oversample and niter of the
    randomized SVD; seed of its sketches. All values are checked before the first step.
    """
    from paramdelta.optim import decay_groups

    check_values(rank=rank, update_period=update_period, scale=scale, proj_bits=proj_bits, side=side,
                 oversample=oversample, niter=niter)
    b1, b2 = parse_betas(betas)
    named = dict(model.named_parameters())
    names = set(targeted({n: tuple(p.shape) for n, p in named.items()}, parse_targets(targets), rank))
    chosen = {id(named[n]) for n in names}
    rest = decay_groups(model, weight_decay)
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in chosen]} for g in rest]
    projected = {"params": [p for n, p in named.items() if n in names], "weight_decay": weight_decay, "rank": rank}
    return GaLore2([projected, *[g for g in groups if g["params"]]], lr=lr, betas=(b1, b2), eps=float(eps),
                   update_period=update_period, scale=float(scale), proj_bits=proj_bits, side=side,
                   oversample=oversample, niter=niter, seed=seed, per_layer=per_layer)


galore2.check = check  # the training loop may call it with the checkpoint's headers before loading the model


# -- the optimizer -------------------------------------------------------------------------------------
def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


class GaLore2(torch.optim.Optimizer):
    """Adam with low-rank moments for groups that set `rank` (None: plain AdamW for that group).

    `svd_calls` counts the SVDs this process ran (under torch.distributed, only the owner's).
    """

    def __init__(self, params: Any, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int | None = None, update_period: int = 200,
                 scale: float = 0.25, proj_bits: int = 32, side: str = "auto", oversample: int = 8, niter: int = 2,
                 seed: int = 0, per_layer: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, update_period=update_period,
                        scale=scale, proj_bits=proj_bits, side=side, oversample=oversample, niter=niter)
        super().__init__(params, defaults)
        self.seed, self.svd_calls, self.updates_in_backward = seed, 0, bool(per_layer)
        self._keys: dict[int, int] = {}
        self._groups: dict[int, dict[str, Any]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                self._keys[id(p)], self._groups[id(p)] = len(self._keys), group
                if group["rank"] is None or not _is_dtensor(p):
                    continue
                if group["side"] == "left":
                    raise OptionError("galore2: side=left would replicate the moments of dim-0 sharded (FSDP2) "
                                      "parameters", hint="use side=auto or right under FSDP2")
                if p.device_mesh.ndim != 1 or [type(x).__name__ for x in p.placements] != ["Shard"] \
                        or p.placements[0].dim != 0:
                    raise OptionError(f"galore2: parameters must be sharded on dim 0 over a 1-D mesh (FSDP2 "
                                      f"fully_shard), got placements {p.placements}",
                                      hint="HSDP / tensor parallel layouts are not supported yet")
        if self.updates_in_backward:
            if any(_is_dtensor(p) for g in self.param_groups for p in g["params"]):
                raise OptionError("galore2: per_layer updates are for single-process runs",
                                  hint="drop --opt per_layer=true under torchrun/FSDP2")
            for group in self.param_groups:
                for p in group["params"]:
                    p.register_post_accumulate_grad_hook(self._hook)

    # -- public API ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # In per-layer mode the hooks updated every parameter during backward and dropped its gradient;
        # a gradient still here was set by hand (e.g. DCP's zero-gradient step that creates the state).
        fresh = self._distributed_refresh()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, fresh.get(self._keys[id(p)]))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, keeping int8 projector codes int8 (torch casts float params' state to their dtype)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "proj_q" in state:
                state["proj_q"] = state["proj_q"].to(torch.int8)

    def projector_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The projector in use for `p` (dequantized), or None for AdamW parameters and full rank."""
        state = self.state.get(p, {})
        if "proj_q" in state:
            return dequantize(state["proj_q"], state["proj_scale"])
        return state.get("proj")

    def side_of(self, p: torch.Tensor) -> str:
        group = self._groups[id(p)]
        return group["side"] if group["side"] != "auto" else choose_side(tuple(p.shape), sharded=_is_dtensor(p))

    # -- internals -----------------------------------------------------------------------------------
    def _hook(self, p: torch.Tensor) -> None:
        with torch.no_grad():
            self._update(p, self._groups[id(p)], None)
        p.grad = None  # freed at once: per-layer mode never holds every gradient

    @staticmethod
    def _due(state: dict[str, Any], group: dict[str, Any]) -> bool:
        done = int(state["step"]) if state else 0
        return done % group["update_period"] == 0

    def _full(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return group["rank"] is None or group["rank"] >= min(p.shape)

    def _distributed_refresh(self) -> dict[int, torch.Tensor]:
        """Owner-rank SVDs for the DTensor matrices refreshing this step (empty in a single process)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return {}
        jobs, step = [], None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or self._full(p, group) or not _is_dtensor(p) or not self._due(self.state[p], group):
                    continue
                state = self.state[p]
                step = int(state["step"]) + 1 if state else 1
                jobs.append(Job(self._keys[id(p)], _local(p.grad), p.shape[0], group["rank"]))
        if not jobs:
            return {}
        g = self.param_groups[0]
        out, runs = distributed_projectors(jobs, oversample=g["oversample"], niter=g["niter"], seed=self.seed,
                                           step=step)
        self.svd_calls += runs
        return out

    def _update(self, p: torch.Tensor, group: dict[str, Any], fresh: torch.Tensor | None) -> None:
        state, grad = self.state[p], p.grad
        if grad.is_sparse:
            raise RuntimeError("galore2 does not support sparse gradients")
        lr, wd, eps, (b1, b2) = group["lr"], group["weight_decay"], group["eps"], group["betas"]
        if self._full(p, group):  # AdamW (with α for full-rank targeted matrices)
            alpha = 1.0 if group["rank"] is None else group["scale"]
            if not state:
                state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                             exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            t = int(state["step"])
            if wd:
                p.mul_(1 - lr * wd)
            _adam(p, grad, state["exp_avg"], state["exp_avg_sq"], t, b1, b2, eps, lr * alpha)
            return
        side, rank, sharded = self.side_of(p), group["rank"], _is_dtensor(p)
        refresh = self._due(state, group)
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = self._zeros_moment(p, rank, side)
        state["step"] += 1
        t = int(state["step"])
        g_local, w_local = _local(grad).float(), _local(p)
        if refresh:
            if fresh is None:
                if sharded:
                    raise RuntimeError("galore2: a sharded parameter needs torch.distributed to refresh its subspace")
                gen = torch.Generator().manual_seed(refresh_seed(self.seed, self._keys[id(p)], t))
                fresh = projector(g_local, rank, side, oversample=group["oversample"], niter=group["niter"],
                                  generator=gen)
                self.svd_calls += 1
            self._store_projector(state, fresh, group["proj_bits"])
        proj = self.projector_of(p).to(g_local.device)
        low = project(g_local, proj, side)
        m, v = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        m.lerp_(low, 1 - b1)
        v.mul_(b2).addcmul_(low, low, value=1 - b2)
        norm = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt_().add_(eps))
        if wd:
            w_local.mul_(1 - lr * wd)
        w_local.add_(project_back(norm, proj, side).to(w_local.dtype), alpha=-lr * group["scale"])

    @staticmethod
    def _store_projector(state: dict[str, Any], proj: torch.Tensor, bits: int) -> None:
        if bits == 8:
            state["proj_q"], state["proj_scale"] = quantize(proj)
        else:
            state["proj"] = proj.float().contiguous()

    @staticmethod
    def _zeros_moment(p: torch.Tensor, rank: int, side: str) -> torch.Tensor:
        """Moments of R; for a dim-0 sharded DTensor, a DTensor sharded the same way (m×r, right side)."""
        if not _is_dtensor(p):
            return torch.zeros(moment_shape(tuple(p.shape), rank, side), dtype=torch.float32, device=p.device)
        from torch.distributed.tensor import DTensor

        local = torch.zeros(p.to_local().shape[0], rank, dtype=torch.float32, device=p.to_local().device)
        return DTensor.from_local(local, p.device_mesh, p.placements, shape=torch.Size((p.shape[0], rank)),
                                  stride=(rank, 1), run_check=False)


def _adam(p, grad, m, v, t, b1, b2, eps, step_lr) -> None:
    """One AdamW moment update and step (as torch.optim.AdamW, weight decay applied by the caller)."""
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = v.sqrt().div_((1 - b2**t) ** 0.5).add_(eps)
    p.addcdiv_(m, denom, value=-step_lr / (1 - b1**t))
