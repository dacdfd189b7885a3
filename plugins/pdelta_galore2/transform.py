"""`galore2`: continued training of a checkpoint on local data with the GaLore 2 optimizer, as a transform.

    pdelta galore2 apply base --out base-2 --data more.txt --steps 600 --rank 32
    pdelta transform galore2 --in base --out base-2 --data more.txt --steps 600 --rank 32   # via the core
    - op: galore2                                                                           # a recipe step
      in: ${base}
      data: ${world}/pretrain_ab.txt
      steps: 600
      rank: 32

The output has exactly the input's tensors, names, shapes and dtypes (a bf16 input stays bf16,
rounded once from the fp32 master weights). `check()` reads headers only: it validates every
option against the targeted matrices' shapes and the data file before the model loads.
`apply()` runs `paramdelta.train.train(..., optimizer="galore2")` into a temporary folder and
streams its tensors to the core writer in plan order; the temporary folder is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from paramdelta.checkpoint import Checkpoint, torch_dtype
from paramdelta.errors import CheckpointError, OptionError
from paramdelta.plugins import TransformPlan
from paramdelta.writer import OutTensor

from .options import TARGETS, check, parse_targets

OPTIMIZER_KEYS = ("rank", "update_period", "scale", "targets", "per_layer", "proj_bits")


@dataclass(frozen=True, kw_only=True)
class GaLore2Options:
    data: Path = field(metadata={"help": ".txt (one document per line) or .jsonl training data."})
    steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    batch_size: int = field(default=8, metadata={"help": "Rows per step."})
    seq_len: int = field(default=128, metadata={"help": "Longest row in tokens."})
    warmup: int = field(default=0, metadata={"help": "Steps of linear LR warmup."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay on matrices."})
    schedule: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata={"help": "LR schedule."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping (none: off; "
                                                                       "per_layer turns it off)."})
    loss_on: Literal["auto", "all", "completion"] = field(default="auto", metadata={"help": "Tokens with loss."})
    seed: int = field(default=0, metadata={"help": "Seed of batch order, dropout and SVD sketches."})
    rank: int = field(default=128, metadata={"help": "Rank r of the gradient subspace (≤ each targeted matrix's "
                                                     "smaller side; equal to it: plain AdamW basis)."})
    update_period: int = field(default=200, metadata={"help": "Steps between subspace refreshes (T)."})
    scale: float = field(default=0.25, metadata={"help": "Scale α of the projected update."})
    targets: tuple[str, ...] = field(default=TARGETS, metadata={"help": "Projected linears: q,k,v,o,gate,up,down."})
    per_layer: bool = field(default=False, metadata={"help": "Update each parameter inside backward (less memory)."})
    proj_bits: Literal[8, 32] = field(default=32, metadata={"help": "Projector storage: 32 (fp32) or 8 (int8)."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "targets", parse_targets(self.targets))
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise OptionError(f"galore2: --{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise OptionError(f"galore2: --lr must be positive, got {self.lr}")

    def optimizer_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in OPTIMIZER_KEYS} | {"seed": self.seed}


class GaLore2Transform:
    name = "galore2"
    Options = GaLore2Options
    needs: frozenset[str] = frozenset({"training"})
    summary = ("Continued training with GaLore 2 (low-rank gradient projection, arXiv 2504.20437) by paramdelta's "
               "`galore2` transform.")
    card_relation = "finetune"

    def check(self, ckpt: Checkpoint, options: GaLore2Options) -> TransformPlan:
        """Options against the headers (targeted shapes, rank) and the data file; nothing is loaded."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would run the transform runner and write OUT
            raise OptionError("galore2: the transform runs in one process, not under torchrun",
                              hint="under torchrun use `pdelta train --optimizer galore2 --rank R ...` (FSDP2)")
        if not options.data.is_file():
            raise OptionError(f"galore2: data file {options.data} not found",
                              hint="pass --data a .txt (one document per line) or .jsonl file")
        names = check(ckpt.config, {n: t.shape for n, t in ckpt.tensors.items()}, **options.optimizer_options())
        plan = [OutTensor(t.name, t.dtype, t.shape) for t in ckpt.tensors.values()]
        return TransformPlan(plan, [f"{len(names)} matrices trained in a rank-{options.rank} subspace, refreshed "
                                    f"every {options.update_period} steps; {options.steps} steps on "
                                    f"{options.data.name}"])

    def update_config(self, config: dict[str, Any], options: GaLore2Options) -> dict[str, Any]:
        return config

    def apply(self, ckpt: Checkpoint, options: GaLore2Options) -> Iterator[tuple[str, Any]]:
        from paramdelta.train import train

        tmp = Path(tempfile.mkdtemp(prefix="pdelta-galore2-"))
        try:
            trained = tmp / "trained"
            o = options
            train(ckpt.path, o.data, trained, steps=o.steps, lr=o.lr, batch_size=o.batch_size, seq_len=o.seq_len,
                  seed=o.seed, optimizer="galore2", optimizer_options=o.optimizer_options(), warmup=o.warmup,
                  weight_decay=o.weight_decay, schedule=o.schedule,
                  max_grad_norm=None if o.per_layer else o.max_grad_norm, loss_on=o.loss_on)
            out = Checkpoint.open(trained)
            for name, info in ckpt.tensors.items():
                if name not in out.tensors:
                    raise CheckpointError(f"galore2: the trained model has no tensor {name!r}",
                                          hint="the checkpoint holds a tensor transformers does not load")
                yield name, out.read(name).to(torch_dtype(info.dtype))
            out.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
