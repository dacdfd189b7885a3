"""The plugin door: checkpoint transforms found through the entry-point group `paramdelta.transforms`.

A transform is any object with the members of `Transform` below (a protocol, no base
class). Our own `cast` comes in through the same door a third-party package uses:

    [project.entry-points."paramdelta.transforms"]
    cast = "paramdelta.builtin.cast:CastTransform"

Discovery reads entry-point metadata only; a plugin's code is imported when it is used.
Two plugins claiming one name is an error; an unknown name gets "did you mean".

>>> from paramdelta import plugins
>>> sorted(plugins.available())                       # doctest: +SKIP
['cast', 'rsparse', 'tapa']
>>> plugins.get("cast").name                          # doctest: +SKIP
'cast'
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import PdeltaError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    import torch

    from .checkpoint import Checkpoint
    from .writer import OutTensor

GROUP = "paramdelta.transforms"
CLI_GROUP = "paramdelta.cli"
NEEDS = frozenset({"calibration", "training", "gpu"})
CONFIG_KEY = "paramdelta"  # config.json section naming the transform that made a checkpoint


class PluginError(PdeltaError):
    """A plugin is unknown, duplicated or broken."""


@dataclass
class TransformPlan:
    """What a transform will write, known from headers before any tensor is read."""

    tensors: list[OutTensor]
    notes: list[str] = field(default_factory=list)


@runtime_checkable
class Transform(Protocol):
    """A checkpoint transform. `Options` is a frozen keyword-only dataclass: its fields are the
    recipe keys and the CLI flags, with help in `field(metadata={"help": ...})`."""

    name: str
    Options: type
    needs: frozenset[str]

    def check(self, ckpt: Checkpoint, options: Any) -> TransformPlan:
        """Validate options against the checkpoint's headers and plan the output tensors."""
        ...

    def update_config(self, config: dict[str, Any], options: Any) -> dict[str, Any]:
        """The output's config.json."""
        ...

    def apply(self, ckpt: Checkpoint, options: Any) -> Iterable[tuple[str, torch.Tensor]]:
        """Yield output tensors (or consecutive pieces of them) in plan order."""
        ...


@dataclass(frozen=True)
class PluginInfo:
    name: str
    target: str  # "module:attr" from the entry point
    package: str
    version: str


def find_entry_points(group: str, kind: str) -> dict[str, EntryPoint]:
    """Name -> entry point for one group; two packages claiming one name is an error."""
    from importlib.metadata import entry_points

    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        if ep.name in found and found[ep.name].value != ep.value:
            raise PluginError(f"two plugins claim the {kind} name {ep.name!r}: {found[ep.name].value} and "
                              f"{ep.value}", hint="uninstall one of the two packages")
        found[ep.name] = ep
    return found


@cache
def _entry_points() -> dict[str, EntryPoint]:
    return find_entry_points(GROUP, "transform")


def available() -> dict[str, PluginInfo]:
    """Every registered transform, from package metadata alone (nothing imported)."""
    out = {}
    for name, ep in sorted(_entry_points().items()):
        dist = getattr(ep, "dist", None)
        out[name] = PluginInfo(name, ep.value, dist.name if dist else "?", dist.version if dist else "?")
    return out


def suggest(name: str, choices: Iterable[str]) -> str | None:
    """A "did you mean" hint for a mistyped name, or None."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else None


@cache
def get(name: str) -> Transform:
    """Load a transform by name (importing its module now), checked against the protocol."""
    eps = _entry_points()
    if name not in eps:
        raise PluginError(f"unknown transform {name!r}", hint=suggest(name, eps) or
                          f"installed: {', '.join(sorted(eps)) or 'none'}; see `pdelta plugins list`")
    try:
        obj = eps[name].load()
    except Exception as e:  # noqa: BLE001 - a broken plugin must not look like our bug
        raise PluginError(f"plugin {name!r} ({eps[name].value}) failed to import: {type(e).__name__}: {e}",
                          hint="reinstall or update that package") from e
    transform = obj() if isinstance(obj, type) else obj
    if not isinstance(transform, Transform) or transform.name != name:
        raise PluginError(f"plugin {name!r} ({eps[name].value}) is not a valid transform",
                          hint="it needs name, Options, needs, check(), update_config() and apply()")
    bad = set(transform.needs) - NEEDS
    if bad:
        raise PluginError(f"plugin {name!r} declares unknown needs {sorted(bad)}", hint=f"use {sorted(NEEDS)}")
    return transform


def transform_of(path: str | Path) -> str | None:
    """The name of the transform that produced a checkpoint, read from its config.json."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return None
    section = json.loads(f.read_text()).get(CONFIG_KEY) or {}
    return section.get("transform")


def load_model(path: str | Path, *, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any]:
    """Load (model, tokenizer) for inference, through the producing plugin's `load_model` when it has one.

    Never runs remote code. `dtype` may be a torch dtype or a name ("bfloat16"); None keeps the
    checkpoint's own.

    >>> model, tok = load_model("merged")                 # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hub import is_ref, local_folder

    if is_ref(path):  # a Hub reference is pulled into the cache first
        path = local_folder(path)
    name = transform_of(path)
    loader = getattr(get(name), "load_model", None) if name else None
    if loader is not None:
        model = loader(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", trust_remote_code=False)
    if dtype is not None:
        model = model.to(dtype=_torch_dtype(dtype))
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _torch_dtype(dtype: Any):
    import torch

    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def register_cli(app: Any) -> None:
    """Let installed plugins add their own command groups (entry-point group `paramdelta.cli`).

    Plugin CLI modules must import heavy libraries inside their commands to keep `--help` fast.
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group=CLI_GROUP):
        try:
            ep.load()(app)
        except Exception as e:  # noqa: BLE001 - one broken plugin must not break the CLI
            import sys

            print(f"warning: plugin CLI {ep.name!r} ({ep.value}) failed to load: {e}", file=sys.stderr)
