"""Option definitions shared by several commands, declared once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class Format(str, Enum):
    text = "text"
    json = "json"


FORMAT = typer.Option(Format.text, "--format", help="text for people, json for machines (on stdout).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace a non-empty output folder (only once the new one is complete).")
ALLOW_PICKLE = typer.Option(False, "--allow-pickle",
                            help="Accept pickled .bin checkpoints, loaded with torch.load(weights_only=True).")
MAX_SHARD_SIZE = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB, 2GiB.")
NO_PROGRESS = typer.Option(False, "--no-progress", help="Hide progress bars (also PDELTA_NO_PROGRESS=1).")


def emit(data: dict, fmt: Format, text: str) -> None:
    """Print a result on stdout, as JSON or as the given text."""
    import json

    if fmt == Format.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


# A command whose options include a transform's own dataclass fields, passed as --key value.
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def options_epilog(options_cls: type, title: str = "Options") -> str:
    """`--help` text listing a transform's option fields (flag, default, help), declared once in the dataclass."""
    from ..optionspec import describe

    rows = [f"{r['flag']} ({'required' if r['default'] == '(required)' else 'default ' + r['default']}): {r['help']}"
            for r in describe(options_cls)]
    return f"{title}:\n\n" + "\n\n".join(rows)


def run_and_report(name: str, src: str, out: Path, values: dict, *, max_shard_size: str, overwrite: bool,
                   no_progress: bool, fmt: Format, allow_pickle: bool = False) -> None:
    """Run transform `name` through the core runner and print its report: the body of every transform command.

    `--no-progress` also sets PDELTA_NO_PROGRESS for the rest of the process, so bars a transform opens
    itself (the fine-tune inside `tapa` or `galore2`, transformers' loading bars) stay quiet too.
    """
    import os

    from ..transform import run_transform

    if no_progress:
        os.environ["PDELTA_NO_PROGRESS"] = "1"
    report = run_transform(name, src, out, values, max_shard_size=max_shard_size, overwrite=overwrite,
                           allow_pickle=allow_pickle, progress=not no_progress)
    text = f"wrote {report.out}: {report.tensors} tensors by {name} in {report.seconds:.1f}s"
    emit(report.__dict__, fmt, "\n".join([text] + [f"  note: {n}" for n in report.notes]))
