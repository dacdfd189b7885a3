"""Option definitions shared by several commands, declared once."""

from __future__ import annotations

from enum import Enum

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
