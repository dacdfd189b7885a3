"""`pdelta plugins list|info` and `pdelta transform NAME`: the registry from the command line."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import (
    ALLOW_PICKLE,
    FORMAT,
    MAX_SHARD_SIZE,
    NO_PROGRESS,
    OVERWRITE,
    PASSTHROUGH,
    Format,
    emit,
    run_and_report,
)

plugins_app = typer.Typer(help="List and describe installed transforms (entry-point group paramdelta.transforms).",
                          no_args_is_help=True)


@plugins_app.command("list")
def list_command(fmt: Format = FORMAT) -> None:
    """Every installed transform: name, package, version, needs and options."""
    from ..optionspec import describe
    from ..plugins import available, get

    rows = []
    for name, info in available().items():
        t = get(name)
        rows.append({"name": name, "package": info.package, "version": info.version,
                     "needs": sorted(t.needs), "options": [o["flag"] for o in describe(t.Options)]})
    text = "\n".join(f"{r['name']:<12} {r['package']} {r['version']:<10} needs: {','.join(r['needs']) or '-':<20} "
                     f"options: {' '.join(r['options'])}" for r in rows) or "no transforms installed"
    emit({"transforms": rows}, fmt, text)


@plugins_app.command("info")
def info_command(name: str = typer.Argument(..., help="Transform name."), fmt: Format = FORMAT) -> None:
    """A transform's options (the recipe keys and CLI flags), defaults and help."""
    from ..optionspec import describe
    from ..plugins import available, get

    t = get(name)
    info = available()[name]
    opts = describe(t.Options)
    lines = [f"{name} ({info.package} {info.version}, {info.target})", f"needs: {', '.join(sorted(t.needs)) or 'none'}",
             f"loader: {'yes' if hasattr(t, 'load_model') else 'transformers default'}", "options:"]
    lines += [f"  {o['flag']:<22} {o['type']:<24} default {o['default']:<12} {o['help']}" for o in opts]
    emit({"name": name, "package": info.package, "version": info.version, "target": info.target,
          "needs": sorted(t.needs), "options": opts}, fmt, "\n".join(lines))


def transform_command(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Transform name (see `pdelta plugins list`)."),
    src: str = typer.Option(..., "--in", "-i", help="Input checkpoint."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    max_shard_size: str = MAX_SHARD_SIZE,
    allow_pickle: bool = ALLOW_PICKLE,
    overwrite: bool = OVERWRITE,
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """Run transform NAME on a checkpoint; its own options follow as --key value (see `pdelta plugins info NAME`)."""
    from ..optionspec import parse_flags
    from ..plugins import get

    values = parse_flags(get(name).Options, list(ctx.args), name)
    run_and_report(name, src, out, values, max_shard_size=max_shard_size, overwrite=overwrite,
                   no_progress=no_progress, fmt=fmt, allow_pickle=allow_pickle)


def register(app: typer.Typer) -> None:
    app.add_typer(plugins_app, name="plugins")
    app.command("transform", context_settings=PASSTHROUGH)(
        transform_command)
