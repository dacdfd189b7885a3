"""Run any registered transform with the core's bookkeeping, so a plugin only yields tensors.

The runner validates options, asks the plugin for its header-only plan, then streams what
`apply()` yields into the core writer, checking names, shapes and dtypes against the plan
as they arrive. Temp folder, shards, index, config, tokenizer copy, provenance and model
card are all done here.

>>> run_transform("cast", "model", "model-bf16", {"dtype": "bfloat16"})   # doctest: +SKIP
TransformReport(out='model-bf16', transform='cast', tensors=291, ...)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, dtype_tag
from .errors import PdeltaError
from .optionspec import make_options
from .plugins import CONFIG_KEY, get
from .progress import progress_bar
from .provenance import copy_tokenizer, input_record, model_card, shard_metadata, write_config
from .writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter


class TransformError(PdeltaError):
    """A plugin yielded something other than what it planned."""


@dataclass
class TransformReport:
    out: str
    transform: str
    tensors: int
    bytes_written: int
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def run_transform(name: str, src: str | Path, out: str | Path, options: dict[str, Any] | Any = None, *,
                  max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                  allow_pickle: bool = False, progress: bool = True) -> TransformReport:
    """Apply transform `name` to checkpoint `src`, writing a complete checkpoint at `out`."""
    start = time.perf_counter()
    transform = get(name)
    opts = options if dataclasses.is_dataclass(options) else make_options(transform.Options, options or {}, name)
    ckpt = Checkpoint.open(src, allow_pickle=allow_pickle)
    plan = transform.check(ckpt, opts)
    config = transform.update_config(dict(ckpt.config), opts)
    opts_dict = {k: _plain(v) for k, v in dataclasses.asdict(opts).items()}
    config[CONFIG_KEY] = {**(config.get(CONFIG_KEY) or {}), "transform": name, "options": opts_dict}
    meta = shard_metadata("transform", f"{name}(input)", [], [input_record("input", ckpt, str(src))],
                          {"transform": name, "options": opts_dict})
    with CheckpointWriter(out, plan.tensors, max_shard_size=max_shard_size, metadata=meta, overwrite=overwrite,
                          inputs=[ckpt.path]) as writer:
        _stream(transform.apply(ckpt, opts), plan.tensors, writer, name, progress)
        write_config(config, writer.dir, {})
        copy_tokenizer(ckpt.path, writer.dir)
        relation = getattr(transform, "card_relation", None)
        (writer.dir / "README.md").write_text(model_card(
            base_models=[str(src)], title=f"{name} of {Path(src).name}", relation=relation,
            tags=("paramdelta", name), summary=[getattr(transform, "summary", f"Made by the `{name}` transform.")],
            sections={"Options": [f"- {k}: `{v}`" for k, v in opts_dict.items()],
                      "Notes": [f"- {n}" for n in plan.notes] or ["- none"]}))
        writer.commit()
        written = writer.total_size
    return TransformReport(str(out), name, len(plan.tensors), written, time.perf_counter() - start, opts_dict,
                           plan.notes)


def _stream(pieces, planned, writer: CheckpointWriter, name: str, progress: bool) -> None:
    """Write yielded (tensor name, piece) pairs, holding the plugin to its plan."""
    expected = iter(planned)
    current, due = None, 0
    with progress_bar(sum(t.nbytes for t in planned), name, enabled=progress) as bar:
        for tname, piece in pieces:
            if due == 0:
                current = next(expected, None)
                if current is None:
                    raise TransformError(f"transform {name!r} yielded {tname!r} after its planned tensors")
                due = current.nbytes
            if tname != current.name:
                raise TransformError(f"transform {name!r} yielded {tname!r} where its plan has {current.name!r}")
            if dtype_tag(piece.dtype) != current.dtype:
                raise TransformError(f"transform {name!r}: {tname!r} is {piece.dtype}, planned {current.dtype}")
            piece = piece.detach().to("cpu").contiguous()
            nbytes = piece.numel() * piece.element_size()
            whole = nbytes == current.nbytes and piece.dim() > 1  # flat pieces carry no shape to check
            if whole and tuple(piece.shape) != current.shape:
                raise TransformError(f"transform {name!r}: {tname!r} has shape {list(piece.shape)}, planned "
                                     f"{list(current.shape)}")
            if nbytes > due:
                raise TransformError(f"transform {name!r}: {tname!r} is larger than planned")
            writer.write(piece.reshape(-1) if piece.dim() else piece.reshape(1))
            due -= nbytes
            bar.update(nbytes)
        leftover = next(expected, None) if due == 0 else current
        if leftover is not None:
            raise TransformError(f"transform {name!r} stopped before writing {leftover.name!r}")


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    return v
