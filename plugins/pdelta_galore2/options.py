"""GaLore 2's options, checked against a checkpoint's headers before any model loads (no torch import here,
so `pdelta --help` and `pdelta galore2 apply --dry-run`-style checks stay fast).

>>> check({}, {"model.layers.0.self_attn.q_proj.weight": (64, 64)}, rank=16)
['model.layers.0.self_attn.q_proj.weight']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from paramdelta.errors import OptionError
from paramdelta.optionspec import LINEAR_TARGETS
from paramdelta.optionspec import parse_targets as _parse_targets
from paramdelta.plugins import suggest

TARGETS = LINEAR_TARGETS
ATTENTION = {"q", "k", "v", "o"}
LINEAR = re.compile(r"(^|\.)layers\.\d+\.(self_attn|attention|attn|mlp|feed_forward)\.(\w+?)_proj\.weight$")


# -- options, checked before anything heavy -----------------------------------------------------------
def parse_betas(betas: Any) -> tuple[float, float]:
    try:
        b1, b2 = (float(b) for b in (betas.split(",") if isinstance(betas, str) else betas))
    except (TypeError, ValueError):
        raise OptionError(f"galore2: betas must be two numbers like 0.9,0.999, got {betas!r}") from None
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise OptionError(f"galore2: betas must lie in [0, 1), got {b1}, {b2}")
    return b1, b2


def check_values(*, rank: Any, update_period: Any, scale: Any, proj_bits: Any, side: Any, oversample: Any,
                 niter: Any) -> None:
    """Each option value on its own (shapes are checked by `targeted`)."""
    for name, value in (("rank", rank), ("update_period", update_period), ("oversample", oversample),
                        ("niter", niter)):
        low = 0 if name in ("oversample", "niter") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise OptionError(f"galore2: {name} must be an integer ≥ {low}, got {value!r}",
                              hint=f"e.g. --opt {name}=" + {"rank": "128", "update_period": "200"}.get(name, "8"))
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise OptionError(f"galore2: scale must be a positive number, got {scale!r}", hint="the paper uses 0.25")
    if proj_bits not in (8, 32):
        raise OptionError(f"galore2: proj_bits must be 8 or 32, got {proj_bits!r}")
    if side not in ("auto", "left", "right"):
        raise OptionError(f"galore2: side must be auto, left or right, got {side!r}")


def targeted(shapes: Mapping[str, tuple[int, ...]], targets: tuple[str, ...], rank: int) -> list[str]:
    """Names of the decoder-layer attention/MLP matrices selected by `targets`, each checked against `rank`."""
    names = []
    for name, shape in shapes.items():
        hit = LINEAR.search(name)
        if hit is None or len(shape) != 2 or hit.group(3) not in targets:
            continue
        if rank > min(shape):
            raise OptionError(f"galore2: rank {rank} is larger than {name} ({shape[0]}×{shape[1]})",
                              hint=f"use rank {min(shape)} or less, or leave {hit.group(3)} out of targets")
        names.append(name)
    if not names:
        raise OptionError(f"galore2: no decoder-layer matrix matches targets {','.join(targets)}",
                          hint="GaLore targets `model.layers.N.self_attn.q_proj.weight`-style linears")
    return names


def check(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], **options: Any) -> list[str]:
    """Validate galore2 options against a checkpoint's tensor shapes (from headers) before any model loads.

    >>> ckpt = Checkpoint.open("base")                                        # doctest: +SKIP
    >>> check(ckpt.config, {n: t.shape for n, t in ckpt.tensors.items()}, rank=32)  # doctest: +SKIP
    """
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        key = sorted(unknown)[0]
        raise OptionError(f"optimizer 'galore2' has no option {key!r}",
                          hint=suggest(key, DEFAULTS) or f"its options: {', '.join(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    check_values(rank=o["rank"], update_period=o["update_period"], scale=o["scale"], proj_bits=o["proj_bits"],
                 side=o["side"], oversample=o["oversample"], niter=o["niter"])
    parse_betas(o["betas"])
    return targeted(shapes, parse_targets(o["targets"]), o["rank"])


DEFAULTS: dict[str, Any] = {"rank": 128, "update_period": 200, "scale": 0.25, "targets": TARGETS, "per_layer": False,
                            "proj_bits": 32, "side": "auto", "betas": (0.9, 0.999), "eps": 1e-8, "oversample": 8,
                            "niter": 2, "seed": 0}


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """`targets` as the ordered short names ("q", "up", ...); see `paramdelta.optionspec.parse_targets`."""
    return _parse_targets(targets, "galore2")
