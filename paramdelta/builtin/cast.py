"""`cast`: change the dtype of a checkpoint's float tensors, optionally only of matching names.

The smallest useful transform, and the proof that the plugin door works end to end.

    pdelta transform cast --in model --out model-bf16 --dtype bfloat16 --only 'mlp\\.'
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from ..checkpoint import Checkpoint, dtype_tag, torch_dtype
from ..errors import OptionError
from ..plugins import TransformPlan
from ..writer import OutTensor

PIECE_ELEMENTS = 1 << 22


@dataclass(frozen=True, kw_only=True)
class CastOptions:
    dtype: Literal["bfloat16", "float16", "float32"] = field(
        default="bfloat16", metadata={"help": "Target dtype of the float tensors."})
    only: str | None = field(default=None, metadata={"help": "Regex: cast only tensors whose name matches."})

    def __post_init__(self) -> None:
        if self.only is not None:
            try:
                re.compile(self.only)
            except re.error as e:
                raise OptionError(f"cast: --only {self.only!r} is not a valid regex ({e})") from None


class CastTransform:
    name = "cast"
    Options = CastOptions
    needs: frozenset[str] = frozenset()
    summary = "Float tensors cast to another dtype by paramdelta's built-in `cast` transform."
    card_relation = "quantized"

    def _selected(self, name: str, options: CastOptions) -> bool:
        return options.only is None or re.search(options.only, name) is not None

    def check(self, ckpt: Checkpoint, options: CastOptions) -> TransformPlan:
        tag = dtype_tag(options.dtype)
        plan = [OutTensor(n, tag if t.is_float and self._selected(n, options) else t.dtype, t.shape)
                for n, t in ckpt.tensors.items()]
        changed = sum(p.dtype != ckpt.tensors[p.name].dtype for p in plan)
        notes = [f"{changed} of {len(plan)} tensors cast to {options.dtype}"]
        if options.only is not None and not any(self._selected(n, options) for n in ckpt.tensors):
            raise OptionError(f"cast: --only {options.only!r} matches no tensor in {ckpt.path}",
                              hint="check the regex against `pdelta inspect` names")
        return TransformPlan(plan, notes)

    def update_config(self, config: dict[str, Any], options: CastOptions) -> dict[str, Any]:
        if options.only is None:
            config["dtype"] = options.dtype
            config.pop("torch_dtype", None)
        return config

    def apply(self, ckpt: Checkpoint, options: CastOptions) -> Iterator[tuple[str, Any]]:
        target = torch_dtype(dtype_tag(options.dtype))
        for name, info in ckpt.tensors.items():
            flat = ckpt.read(name).reshape(-1)
            cast = info.is_float and self._selected(name, options)
            for s in range(0, max(flat.numel(), 1), PIECE_ELEMENTS):
                piece = flat[s:s + PIECE_ELEMENTS]
                yield name, (piece.to(target) if cast else piece.clone())
