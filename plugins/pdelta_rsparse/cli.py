"""`pdelta rsparse apply | bench | quality`: the plugin's command group (entry point `paramdelta.cli`).

The options of `apply` are the fields of `RSparseOptions` (declared once; the same keys work in a
recipe step `op: rsparse` and in `pdelta transform rsparse`). Heavy imports happen inside commands.
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

from .transform import RSparseOptions

app = typer.Typer(help="R-Sparse: rank-aware activation sparsity for fast batch-1 decoding (DESIGN.md §7).",
                  no_args_is_help=True)


@app.command("apply", context_settings=PASSTHROUGH, epilog=options_epilog(RSparseOptions, "Transform options"))
def apply_command(
    ctx: typer.Context,
    src: str = typer.Argument(..., help="Dense Llama/Qwen2/Mistral checkpoint folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    max_shard_size: str = MAX_SHARD_SIZE,
    overwrite: bool = OVERWRITE,
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """Write an R-Sparse checkpoint: Wᵀ, low-rank factors and per-layer τ/ρ/rank, calibrated on local text.

    Example: pdelta rsparse apply llama/ --out llama-rs --sparsity 0.5 --calibration notes.txt
    """
    from paramdelta.optionspec import parse_flags

    values = parse_flags(RSparseOptions, list(ctx.args), "rsparse")
    run_and_report("rsparse", src, out, values, max_shard_size=max_shard_size, overwrite=overwrite,
                   no_progress=no_progress, fmt=fmt)


@app.command("bench")
def bench_command(
    sparsities: str = typer.Option("0.4,0.5,0.7", "--sparsity", help="Comma-separated sparsities."),
    repeats: int = typer.Option(15, "--repeats", help="Timed calls per variant per round (medians are reported)."),
    rounds: int = typer.Option(3, "--rounds", help="Interleaved rounds over all variants."),
    tokens: int = typer.Option(24, "--tokens", help="Decode steps per end-to-end measurement."),
    skip_model: bool = typer.Option(False, "--skip-model", help="Only the Llama-7B-shaped layers."),
    skip_layers: bool = typer.Option(False, "--skip-layers", help="Only the ~100M-parameter model."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: leave as is)."),
    fmt: Format = FORMAT,
) -> None:
    """Batch-1 decode time of R-Sparse linears vs dense fp32, and end-to-end decode tokens/s, in one run."""
    from .bench import run_bench

    result = run_bench([float(s) for s in sparsities.split(",")], repeats=repeats, rounds=rounds, tokens=tokens,
                       layers=not skip_layers, model=not skip_model, threads=threads)
    emit(result, fmt, result["text"])


@app.command("quality")
def quality_command(
    model: str = typer.Argument(None, help="Dense checkpoint (a small trained Llama/Qwen2/Mistral)."),
    text: Path = typer.Option(None, "--text", help="Held-out .txt (a document per line) or .jsonl text to score."),
    calibration: Path = typer.Option(None, "--calibration", help="Calibration text (default: built-in sample)."),
    sparsities: str = typer.Option("0.4,0.5,0.7", "--sparsity", help="Comma-separated sparsities."),
    rho: str = typer.Option("best", "--rho", help="Uniform ρ to compare against: a number, or 'best' of the grid."),
    max_tokens: int = typer.Option(16384, "--max-tokens", help="Held-out tokens scored."),
    toy_world: bool = typer.Option(False, "--toy-world", help="The whole report on the toy world's ParamΔ model: "
                                   "builds it, calibrates on facts A, lm-eval + next-token on facts B."),
    out: Path = typer.Option(Path("rsparse-toyworld"), "--out", help="With --toy-world: work folder (replaced)."),
    limit: int = typer.Option(None, "--limit", help="With --toy-world: lm-eval examples per task (default all)."),
    fmt: Format = FORMAT,
) -> None:
    """Accuracy, perplexity and KL vs dense: R-Sparse with the search, uniform ρ, and sparse only (TEAL-style).

    Example: pdelta rsparse quality --toy-world        (the toy world's ParamΔ model, ~2 min on one core)
             pdelta rsparse quality MODEL --text heldout.txt --calibration cal.txt
    """
    from paramdelta.errors import OptionError

    spars = [float(s) for s in sparsities.split(",")]
    if toy_world:
        from .toyworld import toyworld_report

        if model is not None or text is not None or calibration is not None or rho != "best":
            raise OptionError("--toy-world builds its own model, held-out and calibration text and picks the best ρ",
                              hint="drop MODEL, --text, --calibration and --rho, or drop --toy-world")
        result = toyworld_report(out, sparsities=spars, limit=limit, max_tokens=max_tokens)
        emit(result, fmt, result["text"])
        return
    if model is None or text is None:
        raise OptionError("quality needs MODEL and --text HELDOUT", hint="or pass --toy-world for the toy world report")
    from .quality import quality_report

    result = quality_report(model, text, calibration=calibration, sparsities=spars, rho=rho, max_tokens=max_tokens)
    emit(result, fmt, result["text"])


def register(root: typer.Typer) -> None:
    """Entry point `paramdelta.cli`: adds `pdelta rsparse ...`."""
    root.add_typer(app, name="rsparse")
