"""A plugin's options dataclass is declared once and serves as recipe keys, CLI flags and help.

Values arrive as strings (CLI, `key=value` overrides) or YAML scalars (recipes); they are
checked against the dataclass fields and converted to the declared types here, with a
"did you mean" for unknown keys, before a transform reads any tensor.

>>> from dataclasses import dataclass, field
>>> @dataclass(frozen=True, kw_only=True)
... class Opts:
...     sparsity: float = field(default=0.5, metadata={"help": "share of weights skipped"})
>>> make_options(Opts, {"sparsity": "0.7"})
Opts(sparsity=0.7)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .errors import OptionError


def fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """Field name -> (resolved type, field) for an options dataclass."""
    hints = get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if f.init}


def make_options(cls: type, values: dict[str, Any], where: str = "options") -> Any:
    """Build `cls` from `values`, converting strings; unknown keys get a suggestion."""
    from .plugins import suggest

    spec = fields(cls)
    kwargs = {}
    for key, raw in values.items():
        name = key.replace("-", "_")
        if name not in spec:
            hint = suggest(name, spec) or f"known: {', '.join(spec) or 'none'}"
            raise OptionError(f"{where}: unknown option {key!r}", hint=hint)
        kwargs[name] = convert(spec[name][0], raw, f"{where}: {key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise OptionError(f"{where}: {e}") from None


def convert(tp: Any, raw: Any, what: str) -> Any:
    """Convert a string or YAML value to the annotated type (Optional, Literal, bool, tuples…)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return convert(inner[0], raw, what) if len(inner) == 1 else raw
    if origin is Literal:
        if raw not in args and str(raw) not in [str(a) for a in args]:
            raise OptionError(f"{what} must be one of {', '.join(map(str, args))}, got {raw!r}")
        return next(a for a in args if str(a) == str(raw))
    if origin in (tuple, list):
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        conv = [convert(args[0] if args else str, i.strip() if isinstance(i, str) else i, what) for i in items]
        return tuple(conv) if origin is tuple else conv
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"{what} must be true or false, got {raw!r}")
    if tp in (int, float):
        try:
            return tp(raw)
        except (TypeError, ValueError):
            raise OptionError(f"{what} must be a{'n integer' if tp is int else ' number'}, got {raw!r}") from None
    if tp is Path:
        return Path(raw)
    if tp is str:
        return str(raw)
    return raw


def parse_flags(cls: type, args: list[str], where: str) -> dict[str, Any]:
    """Read `--key value`, `--key=value`, `--flag` and `--no-flag` against the dataclass fields."""
    from .plugins import suggest

    spec = fields(cls)
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise OptionError(f"{where}: unexpected argument {arg!r}", hint="options look like --name value")
        key, _, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        negated = name.startswith("no_") and name[3:] in spec and spec[name[3:]][0] is bool
        if negated:
            out[name[3:]] = False
        elif name not in spec:
            flags = [f"--{k.replace('_', '-')}" for k in spec]
            raise OptionError(f"{where}: unknown option --{key}", hint=suggest(f"--{key}", flags) or
                              f"options: {', '.join(flags) or 'none'}")
        elif spec[name][0] is bool and not value:
            out[name] = True
        elif value:
            out[name] = value
        else:
            if i + 1 >= len(args):
                raise OptionError(f"{where}: --{key} needs a value")
            out[name] = args[i + 1]
            i += 1
        i += 1
    return out


LINEAR_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # a decoder layer's attention and MLP projections


def parse_targets(targets: str | Iterable[str], who: str) -> tuple[str, ...]:
    """`"q,k,v"` or `["q_proj", "up"]` -> `("q", "k", "v", "up")` in layer order; unknown names get "did you mean".

    The `--targets` option of every plugin that picks some of a layer's linears (rsparse, galore2).

    >>> parse_targets("up_proj,q", "rsparse")
    ('q', 'up')
    """
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [str(t).strip().removesuffix("_proj") for t in items if str(t).strip()]
    for t in names:
        if t not in LINEAR_TARGETS:
            close = difflib.get_close_matches(t, LINEAR_TARGETS, n=1, cutoff=0.4)
            raise OptionError(f"{who}: unknown target {t!r}", hint=(f"did you mean {close[0]!r}? " if close else "")
                              + f"known: {','.join(LINEAR_TARGETS)}")
    if not names:
        raise OptionError(f"{who}: --targets is empty", hint=f"pass some of {','.join(LINEAR_TARGETS)}")
    return tuple(t for t in LINEAR_TARGETS if t in names)


def describe(cls: type) -> list[dict[str, str]]:
    """One row per option: flag, type, default, help (for `pdelta plugins info`)."""
    rows = []
    for name, (tp, f) in fields(cls).items():
        if f.default is not dataclasses.MISSING:
            default = _shown(f.default)
        else:
            default = _shown(f.default_factory()) if f.default_factory is not dataclasses.MISSING else "(required)"
        rows.append({"flag": f"--{name.replace('_', '-')}", "key": name, "type": _type_name(tp),
                     "default": default, "help": f.metadata.get("help", "")})
    return rows


def _shown(value: Any) -> str:
    """A default as it would be typed on the command line: sequences comma-separated, like their flags."""
    return ",".join(map(str, value)) if isinstance(value, tuple | list) else repr(value)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "|".join(map(str, get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
