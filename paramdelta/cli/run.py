"""`pdelta run RECIPE.yaml [key=value ...]`: run a recipe, or print its plan with --dry-run."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import FORMAT, NO_PROGRESS, Format, emit


def run_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    overrides: list[str] = typer.Argument(None, help="var=value or step_id.key=value overrides."),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Folder for step outputs (default runs/RECIPE_NAME)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the plan from headers; write nothing."),
    from_step: str | None = typer.Option(None, "--from-step", help="Start at this step id (earlier outputs must exist)."),
    force: bool = typer.Option(False, "--force", help="Re-run steps even when their inputs and options are unchanged."),
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """Run a recipe's steps in order; steps whose inputs and options did not change are skipped."""
    from ..recipe import describe_results, load_recipe, run_recipe

    loaded = load_recipe(recipe, overrides or [])
    results = run_recipe(loaded, run_dir=run_dir, dry_run=dry_run, from_step=from_step, force=force,
                         progress=not no_progress)
    emit({"recipe": loaded.name, "steps": [r.__dict__ for r in results]}, fmt, describe_results(results))


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
