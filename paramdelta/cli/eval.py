"""`pdelta eval`: lm-eval on one or more checkpoints, side by side, optionally as a CI gate."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer


class TableFormat(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


def eval_command(
    models: list[str] = typer.Argument(..., metavar="MODEL...", help="Checkpoints to evaluate (folders or references); the first is the reference."),
    tasks: str = typer.Option(..., "--tasks", "-t", help="Comma-separated lm-eval tasks. Local: pdelta_mc, pdelta_qa, pdelta_ppl, pdelta_smoke; stock names (mmlu, gsm8k, ...) need --online."),
    limit: float | None = typer.Option(None, "--limit", help="At most this many examples per task (a fraction below 1)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Batch size for lm-eval."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    dtype: str | None = typer.Option(None, "--dtype", help="Load weights as bfloat16, float16 or float32 (default: the checkpoint's)."),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot", help="Few-shot examples per prompt (default: each task's own)."),
    require: list[str] = typer.Option([], "--require", help="TASK:METRIC OP VALUE that must hold, OP one of >= > <= <; VALUE a number or ref, ref-0.02, ref*0.95 (the first model's score). Repeatable; exit code 1 when one fails."),
    include_path: list[Path] = typer.Option([], "--include-path", help="Folder of extra lm-eval task YAMLs. Repeatable."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the full results (lm-eval's, plus provenance, versions, date, requirement outcomes) as JSON."),
    online: bool = typer.Option(False, "--online", help="Let lm-eval download datasets (offline by default)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show lm-eval's own log."),
    fmt: TableFormat = typer.Option(TableFormat.text, "--format", help="text for people, markdown for PR comments, json for machines (on stdout)."),
) -> None:
    """Evaluate MODELS with lm-eval and print them side by side; later models show their difference from the first.

    Example: pdelta eval base/ merged/ --tasks pdelta_smoke --limit 20 --require 'pdelta_mc:acc>=ref-0.02'
    """
    from ..evaluate import evaluate

    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    n = None if limit is None else int(limit) if limit >= 1 else limit
    report = evaluate(models, task_list, limit=n, batch_size=batch_size, device=device, num_fewshot=num_fewshot,
                      include_path=[str(p) for p in include_path], requires=require, online=online, dtype=dtype,
                      verbose=verbose)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report.table("json") + "\n")
        print(f"wrote {output}", file=sys.stderr)
    print(report.table(fmt.value))
    if report.failed:
        for line in report.failed:
            print(f"FAILED: {line}", file=sys.stderr)
        print(f"{len(report.failed)} requirement check(s) failed", file=sys.stderr)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
