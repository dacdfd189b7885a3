"""`pdelta eval-length`: perplexity and key–value retrieval at several context lengths, models side by side."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .eval import TableFormat
from .options import NO_PROGRESS


def eval_length_command(
    models: list[str] = typer.Argument(..., metavar="CKPT...", help="Checkpoint folders. PATH@pi:F or PATH@yarn:F loads a RoPE model with that scaling (factor F; PATH@pi alone: longest length / training length); the same PATH may appear several times."),
    data: Path = typer.Option(..., "--data", "-d", help=".txt (one document per line) or .jsonl; documents are concatenated into one token stream."),
    lengths: str = typer.Option(..., "--lengths", "-l", help="Comma-separated context lengths in tokens, e.g. 64,128,256,512."),
    rope_scaling: str = typer.Option("none", "--rope-scaling", help="Scaling for CKPTs written without @: none, pi (linear position interpolation) or yarn."),
    factor: float | None = typer.Option(None, "--factor", help="Scaling factor for --rope-scaling (default: longest length / --train-length)."),
    train_length: int | None = typer.Option(None, "--train-length", help="The models' training length: YaRN's original_max_position_embeddings and the default factor's base (default: config max_position_embeddings)."),
    stride_fraction: float = typer.Option(0.5, "--stride-fraction", help="Window step as a share of the length; each token is scored once with ≥ (1 − this)·length tokens of context."),
    probe_trials: int = typer.Option(32, "--probe-trials", help="Key–value retrieval prompts per length (0: skip the probe)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Use only the first N tokens of the data stream."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed of the retrieval prompts."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the results as JSON."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG of perplexity (and retrieval accuracy) vs length (needs matplotlib)."),
    no_progress: bool = NO_PROGRESS,
    fmt: TableFormat = typer.Option(TableFormat.text, "--format", help="text, markdown or json (on stdout)."),
) -> None:
    """Sliding-window perplexity and a key–value retrieval probe for each CKPT at each length.

    Example: pdelta eval-length rope/ rope/@pi:8 rope/@yarn:8 tapa/ --data eval.txt --lengths 64,128,256,512 --plot ppl.png
    """
    from ..lengtheval import eval_length, parse_lengths, parse_spec
    from ..lengtheval import plot as make_plot

    specs = [parse_spec(m, rope_scaling, factor) for m in models]
    parsed = parse_lengths(lengths)
    report = eval_length(specs, data, parsed, stride_fraction=stride_fraction, probe_trials=probe_trials,
                         train_length=train_length, max_tokens=max_tokens, batch_size=batch_size, seed=seed,
                         device=device, progress=not no_progress)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report.table("json") + "\n")
        print(f"wrote {output}", file=sys.stderr)
    if plot is not None:
        print(f"wrote {make_plot(report, plot)}", file=sys.stderr)
    print(report.table(fmt.value))


def register(app: typer.Typer) -> None:
    app.command("eval-length")(eval_length_command)
