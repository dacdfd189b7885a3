"""`pdelta apply` and `pdelta extract`: the ParamΔ arithmetic and stored deltas."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import ALLOW_PICKLE, FORMAT, MAX_SHARD_SIZE, NO_PROGRESS, OVERWRITE, Format, emit


def apply_command(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written beside as a temp folder, renamed when complete)."),
    new_base: str = typer.Option(..., "--new-base", help="The updated base model the post-training moves onto."),
    post: list[str] = typer.Option([], "--post", help="Post-trained model (instruct/chat/RL). Repeat with --base for several deltas."),
    base: list[str] = typer.Option([], "--base", help="The base that --post was trained from. One per --post, in order."),
    delta: list[str] = typer.Option([], "--delta", help="A stored delta folder from `pdelta extract`. Repeatable."),
    alpha: list[float] = typer.Option([], "--alpha", help="Scale of each term, in order: --post/--base pairs first, then "
                                      "--delta. Default 1.0 each; one value per term when given."),
    dtype: str = typer.Option("auto", "--dtype", help="Output dtype: auto (the new base's), bfloat16, float16, float32."),
    max_shard_size: str = MAX_SHARD_SIZE,
    config_from: str = typer.Option("new-base", "--config-from", help="Where config.json comes from: new-base or post."),
    tokenizer_from: str = typer.Option("post", "--tokenizer-from",
                                       help="Where tokenizer, chat template and generation_config come from: post or new-base."),
    new_token_policy: str = typer.Option("copy-post", "--new-token-policy",
                                         help="Embedding rows only the post model has: copy-post, zero-delta or mean."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Keep NaN/Inf found in inputs instead of failing."),
    allow_tie_mismatch: bool = typer.Option(False, "--allow-tie-mismatch",
                                            help="Drop an untied post lm_head delta when the new base ties embeddings."),
    hash_inputs: bool = typer.Option(False, "--hash-inputs", help="Record full sha256 of every input file (an extra read)."),
    max_cache: str | None = typer.Option(None, "--max-cache", help="Most disk the Hub inputs' shards may take while streaming, e.g. 40GB; "
                                         "each is deleted once the run is done with it."),
    push_to: str | None = typer.Option(None, "--push-to", help="Upload the result to this Hub repo (org/name) with a model card."),
    allow_pickle: bool = ALLOW_PICKLE,
    overwrite: bool = OVERWRITE,
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """Write NEW_BASE + Σ α·(POST − BASE): post-training moved onto a new base, tensor by tensor.

    Weights follow the formula (fp32 math, fp64 for fp32 inputs, rounded once); config.json
    comes from the new base; tokenizer, chat template and generation_config from the post model.
    Every model may be a local folder or a Hub reference org/name[@revision].
    """
    from ..delta import apply
    from ..errors import OptionError

    if len(post) != len(base):
        raise OptionError(f"got {len(post)} --post but {len(base)} --base", hint="pass them in pairs, in order")
    n_terms = len(post) + len(delta)
    if alpha and len(alpha) != n_terms:
        raise OptionError(f"got {len(alpha)} --alpha for {n_terms} terms",
                          hint="give one --alpha per --post/--base pair and per --delta, or none for 1.0")
    alphas = alpha or [1.0] * n_terms
    if push_to is not None:
        from ..hub import check_repo_id

        check_repo_id(push_to)
    report = apply(
        out, new_base=new_base, terms=[(p, b, a) for p, b, a in zip(post, base, alphas)],
        deltas=list(zip(delta, alphas[len(post):])), dtype=dtype, max_shard_size=max_shard_size,
        config_from=config_from, tokenizer_from=tokenizer_from, new_token_policy=new_token_policy,
        overwrite=overwrite, allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle,
        allow_tie_mismatch=allow_tie_mismatch, hash_inputs=hash_inputs, max_cache=max_cache, progress=not no_progress)
    lines = [f"wrote {report.out}: {report.tensors} tensors, {report.bytes_written / 1e9:.3f} GB in {report.seconds:.1f}s",
             f"formula: {report.formula}"]
    lines += [f"  {k}: {v}" for k, v in report.counts.items()] + [f"  note: {n}" for n in report.notes]
    data = dict(report.__dict__)
    if push_to is not None:
        from ..hub import push

        data["commit_url"] = push(report.out, push_to, progress=not no_progress)
        lines.append(f"pushed: {data['commit_url']}")
    emit(data, fmt, "\n".join(lines))


def extract_command(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the stored delta."),
    post: str = typer.Option(..., "--post", help="Post-trained model."),
    base: str = typer.Option(..., "--base", help="The base it was trained from."),
    rank: int | None = typer.Option(None, "--rank", help="Store each 2-D delta as rank-R factors (torch.svd_lowrank)."),
    energy: float | None = typer.Option(None, "--energy",
                                        help="Store each 2-D delta at the lowest rank keeping this share of its energy, "
                                             "e.g. 0.9."),
    dtype: str = typer.Option("float32", "--dtype", help="Dtype of the stored delta: float32, bfloat16 or float16."),
    max_shard_size: str = MAX_SHARD_SIZE,
    allow_pickle: bool = ALLOW_PICKLE,
    overwrite: bool = OVERWRITE,
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """Store POST − BASE as a delta, in full or low-rank, to apply later with `pdelta apply --delta`."""
    from ..extraction import extract

    report = extract(out, post=post, base=base, rank=rank, energy=energy, dtype=dtype,
                     max_shard_size=max_shard_size, overwrite=overwrite, allow_pickle=allow_pickle,
                     progress=not no_progress)
    text = (f"wrote {report.out}: {report.full} full and {report.lowrank} low-rank tensors, "
            f"{report.bytes_written / 1e6:.1f} MB ({report.ratio:.1%} of the full delta)")
    if report.lowrank:
        text += f"; captured energy min {report.min_energy:.4f}, mean {report.mean_energy:.4f}"
    emit(report.__dict__, fmt, text)


def demo_command(
    out: Path = typer.Option(Path("pdelta-demo"), "--out", "-o",
                             help="Folder for results.json, the chart and the merged model; a previous demo's folder is replaced."),
    rebuild: bool = typer.Option(False, "--rebuild", help="First train the four toy models with the toy-world recipe "
                                 "(several minutes on a CPU) instead of using the shipped ones."),
    limit: int | None = typer.Option(None, "--limit", help="Questions per task (default: all of them)."),
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """ParamΔ on the toy world: post − base + new base from four small shipped models, five models
    evaluated with lm-eval on questions about facts only the new base knows, an α sweep, a chart.
    Offline; under a minute on a laptop CPU."""
    from ..demo import run_demo, table

    result = run_demo(out, rebuild=rebuild, limit=limit, progress=not no_progress)
    files = [f"{result['out']}/results.json"] + ([result["plot"]] if result["plot"] else [])
    emit(result, fmt, f"{table(result)}\n\nwrote {', '.join(files)} ({result['seconds']['total']:.0f}s)")
    if result.get("expected") and not result["expected"]["ok"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("apply")(apply_command)
    app.command("extract")(extract_command)
    app.command("demo")(demo_command)
