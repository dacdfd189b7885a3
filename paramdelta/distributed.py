"""The torchrun / FSDP2 / DCP glue for `paramdelta.train`: thin calls into torch.distributed, no layer of our own.

One process per device, started by torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK:

    torchrun --nnodes 1 --nproc-per-node 2 -m paramdelta.cli.main train --model base --data d.txt --out o ...

With WORLD_SIZE > 1 `setup` opens the process group (gloo on CPU, nccl on CUDA with the LOCAL_RANK
device), `shard` applies `fully_shard` to each decoder layer and then the root, `my_rows` gives each
rank a contiguous slice of every micro-batch, and FSDP2 sums the gradients (divide factor 1), so
with the loss "sum of token losses / global target tokens" the step equals the single-process one.
`full_state` gathers the full state dict onto rank 0's CPU for the core writer. Training state
(model, optimizer, step, RNG, losses so far) is saved and loaded with torch.distributed.checkpoint
(DCP), in one process or many; DCP reshards, so a run may resume on another number of ranks.

>>> d = setup("cpu")                      # doctest: +SKIP
>>> d.rank, d.world, d.device             # doctest: +SKIP
(0, 1, 'cpu')
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OptionError, PdeltaError

if TYPE_CHECKING:
    import torch

STATE_FILE = "train_state.json"  # written last: a step folder holding it is complete


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: str
    started: bool = False  # we opened the process group, so we close it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> Dist:
    """Read torchrun's environment; with WORLD_SIZE > 1 open the process group and pick this rank's device."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device, started)


def teardown(d: Dist) -> None:
    if d.started:
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def shard(net: torch.nn.Module) -> None:
    """FSDP2: `fully_shard` each decoder layer (the classes transformers lists in `_no_split_modules`), then the
    root; gradients are reduced as sums (the loss is already normalised by the global target count)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    names = set(getattr(net, "_no_split_modules", None) or ())
    layers = [m for m in net.modules() if type(m).__name__ in names]
    if not layers:
        raise PdeltaError(f"{type(net).__name__} names no decoder layer class (_no_split_modules), so it cannot be "
                          "sharded per layer", hint="run it in one process, or use a transformers model class")
    for layer in layers:
        fully_shard(layer)
    fully_shard(net)
    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # a plain SUM: gloo has no PREMUL_SUM, and nothing to divide
            m.set_force_sum_reduction_for_comms(True)


def my_rows(rows: list[Any], d: Dist) -> list[Any]:
    """This rank's contiguous share of a micro-batch (sizes differ by at most one row)."""
    size, extra = divmod(len(rows), d.world)
    start = d.rank * size + min(d.rank, extra)
    return rows[start: start + size + (d.rank < extra)]


def sync_grads(net: torch.nn.Module, d: Dist, last: bool) -> None:
    """Reduce gradients only on the last micro-batch of a step (accumulate unsharded gradients before)."""
    if d.world > 1:
        net.set_requires_gradient_sync(last)


def all_sum(value: float, d: Dist) -> float:
    """Sum a Python float over ranks (the step loss: each rank holds its rows' share)."""
    if d.world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item())


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """`clip_grad_norm_` that also works on FSDP2's sharded (DTensor) gradients: the norm is made whole first."""
    import torch
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


def tied_names(net: torch.nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier one (a tied lm_head): written once, as transformers
    does. Read before `shard`, which gives every name its own gathered tensor."""
    seen, tied = set(), set()
    for name, t in net.state_dict().items():
        if t.numel() and t.data_ptr() in seen:
            tied.add(name)
        seen.add(t.data_ptr())
    return tied


def full_state(net: torch.nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU on rank 0 (a collective: every rank calls it; the others get {})."""
    if d.world == 1:
        return net.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# -- training state (DCP) ---------------------------------------------------------------------------
def save_state(folder: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, info: dict[str, Any],
               d: Dist) -> Path:
    """Write `folder` (model + optimizer shards through DCP, RNG, then `info` as train_state.json) into a temp
    folder that rank 0 renames when every rank is done: a folder with train_state.json is always complete."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tmp = folder.with_name(folder.name + ".tmp")
    if d.main and tmp.exists():
        shutil.rmtree(tmp)
    barrier(d)
    state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt),
             "rng": {"torch": torch.get_rng_state()}}
    with warnings.catch_warnings():  # DCP warns that one process is "assuming single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp, no_dist=d.world == 1)
    barrier(d)
    if d.main:
        (tmp / STATE_FILE).write_text(json.dumps(info, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    barrier(d)
    return folder


def find_state(path: Path) -> Path:
    """`path` itself when it is a saved step, else its latest complete step-* folder."""
    if (path / STATE_FILE).is_file():
        return path
    steps = sorted(p for p in path.glob("step-*") if p.name[5:].isdigit() and (p / STATE_FILE).is_file())
    if not steps:
        raise OptionError(f"no training state in {path}",
                          hint="pass the --state-dir of an earlier run (or one of its step-* folders)")
    return steps[-1]


def read_info(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())


def load_state(folder: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, d: Dist) -> None:
    """Load a `save_state` folder into `net` and `opt` in place (sharded or not; DCP reshards as needed)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_state_dict

    state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt),
             "rng": {"torch": torch.get_rng_state()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder, no_dist=d.world == 1)
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"]["torch"])
