"""`pdelta tapa retrofit | extend`: the plugin's command group (entry point `paramdelta.cli`).

Both run the `tapa` transform through the core runner; their flags are the fields of `TapaOptions`
(declared once: the same keys work in a recipe step `op: tapa`). Heavy imports happen inside commands.
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
    options_epilog,
    run_and_report,
)

from .transform import TapaOptions

app = typer.Typer(help="TAPA: Token-Aware Phase Attention for Llama-family models (DESIGN.md §9).",
                  no_args_is_help=True)


@app.command("retrofit", context_settings=PASSTHROUGH, epilog=options_epilog(TapaOptions))
def retrofit_command(
    ctx: typer.Context,
    src: str = typer.Argument(..., help="RoPE Llama/Mistral checkpoint folder (full rotary, no sliding window)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    train_data: Path = typer.Option(..., "--train-data", help="Local .txt/.jsonl text for the light fine-tune."),
    max_shard_size: str = MAX_SHARD_SIZE,
    overwrite: bool = OVERWRITE,
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """Convert a RoPE checkpoint to TAPA and fine-tune it (distillation from the RoPE model by default).

    Example: pdelta tapa retrofit llama/ --out llama-tapa --train-data text.txt --phase-init-scale 0.3 --steps 200
    """
    from paramdelta.optionspec import parse_flags

    values = parse_flags(TapaOptions, list(ctx.args), "tapa retrofit")
    run_and_report("tapa", src, out, {**values, "train_data": train_data}, max_shard_size=max_shard_size,
                   overwrite=overwrite, no_progress=no_progress, fmt=fmt)


@app.command("extend", context_settings=PASSTHROUGH, epilog=options_epilog(TapaOptions))
def extend_command(
    ctx: typer.Context,
    src: str = typer.Argument(..., help="TAPA checkpoint folder (model_type llama_tapa)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    train_data: Path = typer.Option(..., "--train-data", help="Local .txt/.jsonl text with long documents."),
    seq_len: int = typer.Option(..., "--seq-len", help="The longer training length, e.g. 4x the original."),
    max_shard_size: str = MAX_SHARD_SIZE,
    overwrite: bool = OVERWRITE,
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """Light long-context fine-tune of a TAPA model (LM loss), like the paper's 8k→32k step.

    Example: pdelta tapa extend llama-tapa/ --out llama-tapa-long --train-data long.txt --seq-len 512 --steps 50
    """
    from paramdelta.optionspec import parse_flags

    values = {"objective": "lm", **parse_flags(TapaOptions, list(ctx.args), "tapa extend")}
    run_and_report("tapa", src, out, {**values, "train_data": train_data, "seq_len": seq_len},
                   max_shard_size=max_shard_size, overwrite=overwrite, no_progress=no_progress, fmt=fmt)


def register(root: typer.Typer) -> None:
    """Entry point `paramdelta.cli`: adds `pdelta tapa ...`."""
    root.add_typer(app, name="tapa")
