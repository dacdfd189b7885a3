"""`pdelta inspect` and `pdelta verify`: look at checkpoints, check outputs; results on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .options import FORMAT, NO_PROGRESS, Format, emit


def inspect_command(
    ckpt: str | None = typer.Argument(None, help="Checkpoint folder to summarise from its headers (no weight is read)."),
    post: str | None = typer.Option(None, "--post", help="Post-trained model: with --base and --new-base, show ParamΔ diagnostics."),
    base: str | None = typer.Option(None, "--base", help="The base --post was trained from."),
    new_base: str | None = typer.Option(None, "--new-base", help="The updated base."),
    plot: Path | None = typer.Option(None, "--plot", help="Also draw the diagnostics per group and per layer into this PNG."),
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """Summarise CKPT from its headers, or, given --post/--base/--new-base, measure how the deltas relate.

    Diagnostics per tensor group and per layer: ‖Δpost‖/‖Θbase‖, ‖Δupdate‖/‖Θbase‖,
    cos(Δpost, Δupdate) and sign agreement, with Δpost = post − base, Δupdate = new base − base.
    ParamΔ works well when both deltas are small and nearly orthogonal (cos ≈ 0).

    Example: pdelta inspect --post inst --base base --new-base base-v2 --plot delta.png
    """
    from ..errors import OptionError

    triple = (post, base, new_base)
    if any(x is not None for x in triple):
        if ckpt is not None or any(x is None for x in triple):
            raise OptionError("diagnostics need --post, --base and --new-base together, and no CKPT",
                              hint="pass all three, or only a checkpoint folder for its summary")
        from ..inspection import compare, plot_comparison

        result = compare(post, base, new_base, progress=not no_progress)
        if plot is not None:
            result["plot"] = str(plot_comparison(result, plot))
        emit(result, fmt, format_comparison(result))
        return
    if ckpt is None:
        raise OptionError("nothing to inspect", hint="pass a checkpoint folder, or --post, --base and --new-base")
    if plot is not None:
        raise OptionError("--plot draws the ParamΔ diagnostics", hint="pass --post, --base and --new-base with it")
    from ..inspection import inspect_checkpoint

    summary = inspect_checkpoint(ckpt)
    emit(summary, fmt, format_summary(summary))


def verify_command(
    out: Path = typer.Argument(..., help="An output folder of `pdelta apply` (or `pdelta extract`)."),
    samples: int = typer.Option(8, "--samples", help="Rows recomputed per tensor (elements, for 1-D tensors)."),
    no_load: bool = typer.Option(False, "--no-load", help="Skip loading the model in transformers."),
    seed: int = typer.Option(0, "--seed", help="Seed of the row sample."),
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """Check OUT against the inputs its provenance names: recompute sampled rows, scan for NaN/Inf, load it.

    Exits non-zero when any check fails, or when an input is missing or changed since OUT was written.

    Example: pdelta verify merged/ --samples 32
    """
    from ..errors import VerifyError
    from ..verification import verify

    try:
        report = verify(out, samples=samples, load=not no_load, seed=seed, progress=not no_progress)
    except VerifyError as e:
        if e.report is not None:
            emit(e.report, fmt, format_verify(e.report))
        raise
    emit(report, fmt, format_verify(report))


# -- text ---------------------------------------------------------------------------------------
def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _num(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def format_summary(s: dict[str, Any]) -> str:
    """The header-only summary as a few aligned lines."""
    arch, vocab = s["architecture"], s["vocab"]
    names = ", ".join(arch.get("architectures") or []) or "?"
    shape = ", ".join(f"{label} {arch[k]}" for k, label in (
        ("hidden_size", "hidden"), ("num_hidden_layers", "layers"), ("num_attention_heads", "heads"),
        ("num_key_value_heads", "kv heads")) if arch.get(k) is not None)
    sizes = ", ".join(f"{label} {vocab[k]}" for k, label in (
        ("config", "config"), ("embedding_rows", "embedding rows"), ("lm_head_rows", "lm_head rows"),
        ("tokenizer", "tokenizer")) if vocab.get(k) is not None)
    lines = [
        f"checkpoint   {s['path']}",
        f"parameters   {s['parameters']:,} in {s['tensors']} tensors, {_size(s['bytes'])} in {s['shards']} "
        f"shard{'s' if s['shards'] != 1 else ''}",
        "dtypes       " + ", ".join(f"{k}: {v['tensors']} tensors ({v['parameters']:,} params)"
                                    for k, v in s["dtypes"].items()),
        f"architecture {names} ({arch.get('model_type') or '?'})" + (f": {shape}" if shape else ""),
        f"vocab        {sizes or 'unknown'}",
        "embeddings   " + ("tied (no lm_head stored)" if s["tie_word_embeddings"] and not s["lm_head_stored"]
                           else "tied" if s["tie_word_embeddings"] else "untied (lm_head stored)"),
    ]
    prov = s.get("provenance")
    if prov:
        lines.append(f"provenance   {prov.get('tool', '?')} {prov.get('version', '?')} {prov.get('kind', '?')}: "
                     f"{prov.get('formula', '?')}  α={prov.get('alpha')}")
        for rec in prov.get("inputs") or []:
            lines.append(f"             {rec.get('role')}: {rec.get('ref')} ({rec.get('path')})")
        if "config_from" in prov:
            lines.append(f"             config from {prov['config_from']}, tokenizer from "
                         f"{prov.get('tokenizer_from')}, new tokens {prov.get('new_token_policy')}")
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]], label: str, key: str) -> list[str]:
    width = max([len(label)] + [len(str(r[key])) for r in rows])
    head = (f"{label:<{width}}  {'tensors':>7}  {'elements':>12}  {'‖Δpost‖/‖Θ‖':>11}  {'‖Δupd‖/‖Θ‖':>11}  "
            f"{'cos':>8}  {'sign agree':>10}")
    out = [head]
    for r in rows:
        out.append(f"{r[key]!s:<{width}}  {r['tensors']:>7}  {r['numel']:>12,}  {_num(r['post_rel']):>11}  "
                   f"{_num(r['update_rel']):>11}  {_num(r['cos'], '+.4f'):>8}  {_num(r['sign_agreement'], '.3f'):>10}")
    return out


def format_comparison(r: dict[str, Any]) -> str:
    """The diagnostics as two compact tables (per group, per layer) plus flagged and skipped tensors."""
    o = r["overall"]
    lines = [f"post {r['post']}  base {r['base']}  new base {r['new_base']}",
             f"overall: {o['tensors']} tensors, {o['numel']:,} elements: ‖Δpost‖/‖Θ‖ {_num(o['post_rel'])}, "
             f"‖Δupd‖/‖Θ‖ {_num(o['update_rel'])}, cos {_num(o['cos'], '+.4f')}, "
             f"sign agree {_num(o['sign_agreement'], '.3f')}", ""]
    lines += _table(r["groups"], "group", "group") + [""]
    if r["layers"]:
        lines += _table(r["layers"], "layer", "layer") + [""]
    lines += [f"flagged: {f['name']}: {f['reason']}" for f in r["flagged"]]
    lines += [f"skipped: {s['name']}: {s['reason']}" for s in r["skipped"]]
    if r.get("plot"):
        lines.append(f"plot: {r['plot']}")
    return "\n".join(lines).rstrip()


def format_verify(report: dict[str, Any]) -> str:
    """One line per check, then OK or FAILED."""
    c = report["checks"]
    rc, fin, load = c["recompute"], c["finite"], c["load"]

    def status(check: dict[str, Any]) -> str:
        return "ok    " if check["ok"] else "FAILED"

    lines = [f"verify {report['path']} ({report['kind']}: {report['formula']}, α={report['alpha']})",
             f"  inputs     ok     {len(c['inputs']['inputs'])} inputs re-opened; shard sizes and header hashes match",
             f"  recompute  {status(rc)} {rc['tensors']} tensors, {rc['rows']} sampled rows, {rc['elements']:,} "
             f"elements: {rc['exact']:,} exact, {rc['within_1ulp']:,} within 1 ulp, {rc['mismatched']:,} off"
             + (f"; {rc['copied']} non-float copies match" if rc["copied"] else "")]
    lines += [f"             finite check only: {f['name']} ({f['reason']})" for f in rc["finite_only"]]
    lines += [f"             {p}" for p in rc["problems"]]
    lines.append(f"  finite     {status(fin)} {fin['tensors']} tensors, {fin['elements']:,} elements"
                 + (": no NaN/Inf" if fin["ok"] else f": {fin['problem']}"))
    if "skipped" in load:
        lines.append(f"  load       skip   {load['skipped']}")
    elif load["ok"]:
        lines.append(f"  load       ok     {load['class']}: forward pass logits {load['logits_shape']} finite "
                     f"({load['seconds']}s)")
    else:
        lines.append(f"  load       FAILED {load['problem']}")
    lines.append("OK" if report["ok"] else "FAILED")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
    app.command("verify")(verify_command)
