"""`pdelta pull` and `pdelta push`: checkpoints to and from the Hugging Face Hub (or HF_ENDPOINT)."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import FORMAT, NO_PROGRESS, Format, emit


def pull_command(
    ref: str = typer.Argument(..., help="Hub reference org/name[@revision] (branch, tag or commit)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Copy the files into this folder (default: stay in the huggingface_hub cache)."),
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """Download a model's safetensors, json and tokenizer files; prints where they are.

    Tokens come from HF_TOKEN or `hf auth login`; HF_HUB_OFFLINE=1 resolves from the cache only.
    """
    from ..hub import parse_ref, pull

    path, commit = pull(ref, out, progress=not no_progress)
    emit({"ref": ref, "repo": parse_ref(ref)[0], "commit": commit, "path": str(path)}, fmt,
         f"pulled {parse_ref(ref)[0]}@{commit} to {path}")


def push_command(
    folder: Path = typer.Argument(..., help="Folder to upload (an apply or transform output)."),
    repo: str = typer.Argument(..., help="Hub repo id org/name; created if it does not exist."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: str | None = typer.Option(None, "--revision", help="Branch to commit to (created from main if missing)."),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """Upload a folder with a model card (base models, merge relation, what was done, eval scores).

    Prints the commit URL. Uploads to an endpoint other than huggingface.co use plain LFS, not Xet.
    """
    from ..hub import push

    url = push(folder, repo, private=private, revision=revision, message=message, progress=not no_progress)
    emit({"repo": repo, "commit_url": url}, fmt, url)


def register(app: typer.Typer) -> None:
    app.command("pull")(pull_command)
    app.command("push")(push_command)
