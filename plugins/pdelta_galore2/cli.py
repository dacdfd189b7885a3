"""`pdelta galore2 apply | bench`: the plugin's command group (entry point `paramdelta.cli`).

The options of `apply` are the fields of `GaLore2Options` (declared once; the same keys work in a recipe
step `op: galore2` and in `pdelta transform galore2`). Heavy imports happen inside commands.
"""

from __future__ import annotations

from pathlib import Path

import typer

from paramdelta.cli.options import (
    FORMAT,
    MAX_SHARD_SIZE,
    NO_PROGRESS,
    OVERWRITE,
    PASSTHROUGH,
    Format,
    emit,
    options_epilog,
    run_and_report,
)

from .transform import GaLore2Options

app = typer.Typer(help="GaLore 2: continued training with low-rank gradient projection (DESIGN.md §10).",
                  no_args_is_help=True)


@app.command("apply", context_settings=PASSTHROUGH, epilog=options_epilog(GaLore2Options, "Training options"))
def apply_command(
    ctx: typer.Context,
    src: str = typer.Argument(..., help="Checkpoint folder (or org/name@rev) to keep training; tokenizer inside."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    max_shard_size: str = MAX_SHARD_SIZE,
    overwrite: bool = OVERWRITE,
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """Keep training SRC on local data with GaLore 2 and write a checkpoint with the same tensors and dtypes.

    Example: pdelta galore2 apply base --out base-2 --data more.txt --steps 600 --rank 32 --update-period 200
    """
    from paramdelta.optionspec import parse_flags

    values = parse_flags(GaLore2Options, list(ctx.args), "galore2")
    run_and_report("galore2", src, out, values, max_shard_size=max_shard_size, overwrite=overwrite,
                   no_progress=no_progress, fmt=fmt)


@app.command("bench")
def bench_command(
    steps: int = typer.Option(100, "--steps", help="Training steps per optimizer."),
    rank: int = typer.Option(0, "--rank", help="GaLore rank (0: hidden_size / 4)."),
    update_period: int = typer.Option(50, "--update-period", help="Steps between subspace refreshes."),
    scale: float = typer.Option(0.25, "--scale", help="GaLore scale α."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW's learning rate (constant)."),
    galore_lr: float = typer.Option(0.0, "--galore-lr", help="GaLore 2's learning rate (0: the same as --lr)."),
    hidden: int = typer.Option(512, "--hidden", help="Llama hidden size (512: ~60M parameters with the defaults)."),
    layers: int = typer.Option(8, "--layers", help="Decoder layers."),
    batch_size: int = typer.Option(4, "--batch-size", help="Rows per step."),
    seq_len: int = typer.Option(64, "--seq-len", help="Tokens per row."),
    threads: int = typer.Option(1, "--threads", help="torch threads (0: leave as is)."),
    fmt: Format = FORMAT,
) -> None:
    """GaLore 2 against AdamW on one Llama and one token stream: state bytes, peak RSS, step time, SVD, loss."""
    from .bench import run_bench

    result = run_bench(steps=steps, rank=rank or None, update_period=update_period, scale=scale, lr=lr,
                       galore_lr=galore_lr or None, hidden=hidden, layers=layers, batch_size=batch_size,
                       seq_len=seq_len, threads=threads)
    emit(result, fmt, result["text"])


def register(root: typer.Typer) -> None:
    """Entry point `paramdelta.cli`: adds `pdelta galore2 ...`."""
    root.add_typer(app, name="galore2")
