"""The optimizer door: factories found through the entry-point group `paramdelta.optimizers`.

A factory is a plain function (a protocol, no base class) that builds a ready optimizer for a
model; `paramdelta.train.train` calls it once, before the first step:

    factory(model: torch.nn.Module, *, lr: float, weight_decay: float, **options) -> torch.optim.Optimizer

It chooses its own parameter groups (that is why it gets the model, not a parameter list),
reads `options` from `--opt key=value` on the CLI or `optimizer_options:` in a recipe, and
returns a plain `torch.optim.Optimizer` whose state holds tensors only. The training loop then
does the usual `zero_grad(set_to_none=True)`, backward, gradient clipping, `step()`; the LR
schedule scales each group's `lr` from the value the factory set. An optimizer that updates
inside backward (post-accumulate-grad hooks, GaLore's per-layer mode) says so with a true
attribute `updates_in_backward`: the loop then refuses `grad_accum > 1`, skips clipping and
still calls `step()` and reads `param_groups` for the schedule.

Our own `adamw` comes in through the same door a plugin uses:

    [project.entry-points."paramdelta.optimizers"]
    adamw = "paramdelta.optim:adamw"

>>> from paramdelta.optim import build_optimizer
>>> opt = build_optimizer("adamw", model, lr=1e-3, weight_decay=0.1, options={"betas": "0.9,0.95"})  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

from .errors import OptionError
from .plugins import PluginError, find_entry_points, suggest

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    import torch

GROUP = "paramdelta.optimizers"
OptimizerFactory = Callable[..., "torch.optim.Optimizer"]


@cache
def _entry_points() -> dict[str, EntryPoint]:
    return find_entry_points(GROUP, "optimizer")


def available() -> dict[str, str]:
    """Every registered optimizer name -> its "module:function", from package metadata alone."""
    return {name: ep.value for name, ep in sorted(_entry_points().items())}


@cache
def get_optimizer(name: str) -> OptimizerFactory:
    """The factory registered as `name` (its module is imported now); unknown names get "did you mean".

    >>> get_optimizer("adamw").__name__
    'adamw'
    """
    eps = _entry_points()
    if name not in eps:
        raise PluginError(f"unknown optimizer {name!r}", hint=suggest(name, eps) or
                          f"installed: {', '.join(sorted(eps)) or 'none'}")
    try:
        factory = eps[name].load()
    except Exception as e:  # noqa: BLE001 - a broken plugin must not look like our bug
        raise PluginError(f"optimizer {name!r} ({eps[name].value}) failed to import: {type(e).__name__}: {e}",
                          hint="reinstall or update that package") from e
    if not callable(factory):
        raise PluginError(f"optimizer {name!r} ({eps[name].value}) is not callable",
                          hint="register a function factory(model, *, lr, weight_decay, **options)")
    return factory


def check_options(name: str, options: dict[str, Any]) -> OptimizerFactory:
    """Find the factory and check that it accepts every option key, before any model is loaded."""
    factory = get_optimizer(name)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
                 and k not in ("lr", "weight_decay")]
        for key in options:
            if key not in known:
                raise OptionError(f"optimizer {name!r} has no option {key!r}",
                                  hint=suggest(key, known) or f"its options: {', '.join(known) or 'none'}")
    return factory


def build_optimizer(name: str, model: torch.nn.Module, *, lr: float, weight_decay: float,
                    options: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """Call the registered factory `name` for `model`, checking option names first."""
    options = dict(options or {})
    return check_options(name, options)(model, lr=lr, weight_decay=weight_decay, **options)


def parse_options(items: list[str]) -> dict[str, Any]:
    """`["betas=0.9,0.95", "eps=1e-6"]` (CLI `--opt`) -> a dict, each value read as YAML scalar.

    >>> parse_options(["eps=1e-6", "foreach=false"])
    {'eps': 1e-06, 'foreach': False}
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--opt {item!r} is not key=value", hint="write e.g. --opt betas=0.9,0.95")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: weight decay on matrices of linear layers, none on the rest.

    Biases and norm scales (1-D) and embedding tables (an `nn.Embedding`, and so a tied lm_head)
    get no decay: decaying a norm scale pulls it toward zero rather than toward "no change", and
    decaying embeddings shrinks the rows of rare tokens, which are the ones updated least often.
    An untied lm_head is a linear layer and is decayed.
    """
    import torch

    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, keep = [], []
    for p in model.parameters():  # each tensor once, tied ones included
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embeddings else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: Any = (0.9, 0.999),
          eps: float = 1e-8, foreach: bool | None = None) -> torch.optim.Optimizer:
    """torch.optim.AdamW with decoupled weight decay on linear matrices only (see `decay_groups`).

    `betas` may be a pair or the string "0.9,0.95". State: two fp32 moments per parameter.
    """
    import torch

    if isinstance(betas, str):
        betas = betas.split(",")
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise OptionError(f"adamw: betas must be two numbers like 0.9,0.95, got {betas!r}") from None
    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=(b1, b2), eps=float(eps),
                             foreach=foreach)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds in the optimizer's tensor state (moments, projectors, step counters).

    Sharded state (FSDP2 DTensors) counts this rank's shard: that is the memory the process pays.
    """
    import torch
    from torch.distributed.tensor import DTensor

    total = 0
    for per_param in optimizer.state_dict()["state"].values():
        for v in per_param.values():
            if isinstance(v, DTensor):
                v = v.to_local()
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total
