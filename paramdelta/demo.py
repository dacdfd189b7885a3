"""`pdelta demo`: ParamΔ on the toy world — four small trained models, one merge, five evaluations.

The four checkpoints shipped in `paramdelta/demo_data/` were trained by `recipes/toy-world.yaml`
(a copy ships as `demo_data/toy-world.yaml`; `demo_data/SOURCE.json` records the run): a base
pretrained on facts A, post = base + instruction tuning on questions about facts A, new base =
base + continued pretraining on facts A ∪ B, reference = new base + the same instruction tuning.
The demo computes ParamΔ = post − base + new base with `apply`, evaluates the five models with
lm-eval on questions about facts B in the chat format (exact match, format compliance), by
multiple choice, and by perplexity on facts B, sweeps α in new base + α·(post − base), and
writes `results.json` and `paramdelta-demo.png` into its output folder.

>>> result = run_demo("pdelta-demo")                          # doctest: +SKIP
>>> round(result["recovery"], 2)                              # doctest: +SKIP
1.03

`rebuild=True` first runs the recipe (training all four models, minutes on a CPU) in
`OUT/rebuild/` and uses its checkpoints instead of the shipped ones.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import OptionError
from .writer import fresh_work_folder

DEMO_DATA = Path(__file__).parent / "demo_data"
RECIPE = DEMO_DATA / "toy-world.yaml"
TRAINED = ("base", "post", "new_base", "reference")
LABELS = {"base": "base", "post": "post", "new_base": "new base", "paramdelta": "ParamΔ", "reference": "reference"}
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
COLUMNS = [  # (task, metric, header, format)
    ("toyworld_qa", "exact_match", "exact match", "{:.1%}"),
    ("toyworld_qa", "format", "format", "{:.1%}"),
    ("toyworld_qa", "prefix_match", "answer first", "{:.1%}"),
    ("toyworld_mc", "acc", "MC acc", "{:.1%}"),
    ("toyworld_ppl", "word_perplexity", "ppl (B facts)", "{:.2f}"),
]
# How far a fresh run of the shipped checkpoints may land from demo_data/expected.json (CPU, any
# supported torch/transformers): generation is greedy and the metrics are counts over hundreds of
# questions, so a difference is a flipped near-tie, a few questions at most.
TOLERANCE = {"exact_match": 0.02, "format": 0.02, "prefix_match": 0.02, "acc": 0.02, "word_perplexity": 0.01}


def run_demo(out: str | Path = "pdelta-demo", *, rebuild: bool = False, limit: int | None = None,
             batch_size: int = 64, threads: int | None = 1, progress: bool = True) -> dict[str, Any]:
    """Merge, evaluate, sweep α, plot; returns what `results.json` holds. `threads`: torch threads
    for the run (None: leave torch's setting)."""
    with _torch_threads(threads), _quiet(not progress):
        return _run_demo(Path(out), rebuild=rebuild, limit=limit, batch_size=batch_size, progress=progress)


def _run_demo(out: Path, *, rebuild: bool, limit: int | None, batch_size: int, progress: bool) -> dict[str, Any]:
    from .delta import apply
    from .evaluate import evaluate
    from .toyworld.tasks import TASKS, write_tasks

    if importlib.util.find_spec("lm_eval") is None:
        raise OptionError("the demo evaluates with lm-eval, which is not installed",
                          hint="pip install 'paramdelta[eval,plot]'")
    start = time.perf_counter()
    out = fresh_work_folder(out, "pdelta demo")
    seconds: dict[str, float] = {}
    if rebuild:
        t = time.perf_counter()
        models, data_dir = _rebuild(out / "rebuild", progress)
        seconds["rebuild"] = time.perf_counter() - t
    else:
        models, data_dir = {m: DEMO_DATA / m for m in TRAINED}, DEMO_DATA / "tasks"
    tasks_dir = write_tasks(out / "tasks", data_dir)

    t = time.perf_counter()
    models["paramdelta"] = apply(out / "paramdelta", post=models["post"], base=models["base"],
                                 new_base=models["new_base"], overwrite=True, progress=progress).out
    sweep_dir = out / "alpha-sweep"
    sweep = {a: sweep_dir / f"alpha-{a:g}" for a in ALPHAS if a not in (0.0, 1.0)}
    for a, path in sweep.items():
        apply(path, post=models["post"], base=models["base"], new_base=models["new_base"], alpha=a,
              overwrite=True, progress=False)
    seconds["apply"] = time.perf_counter() - t

    _log(f"evaluating {len(LABELS)} models on {', '.join(TASKS)}")
    t = time.perf_counter()
    order = list(LABELS)
    report = evaluate([str(models[m]) for m in order], list(TASKS), limit=limit, batch_size=batch_size,
                      include_path=[str(tasks_dir)])
    rows = {m: _scores(r.scores) for m, r in zip(order, report.models)}
    seconds["evaluate"] = time.perf_counter() - t
    _log(f"evaluating the α sweep ({len(sweep)} more merges) on toyworld_qa")
    t = time.perf_counter()
    swept = evaluate([str(p) for p in sweep.values()], ["toyworld_qa"], limit=limit, batch_size=batch_size,
                     include_path=[str(tasks_dir)])
    alpha = {**{a: _scores(r.scores) for a, r in zip(sweep, swept.models)},
             0.0: rows["new_base"], 1.0: rows["paramdelta"]}  # α = 0 is the new base, α = 1 ParamΔ, bit for bit
    seconds["alpha_sweep"] = time.perf_counter() - t

    ref = rows["reference"]["exact_match"]
    result: dict[str, Any] = {
        "models": rows, "recovery": rows["paramdelta"]["exact_match"] / ref if ref else None,
        "format_recovery": (rows["paramdelta"]["format"] / rows["reference"]["format"]
                            if rows["reference"]["format"] else None),
        "alpha_sweep": [{"alpha": a, **alpha[a]} for a in sorted(alpha)],
        "sources": {m: str(models[m]) for m in order}, "rebuilt": rebuild, "limit": limit,
        "library_versions": report.to_dict()["library_versions"], "lm_eval": report.to_dict()["models"],
    }
    if not rebuild and limit is None:
        result["expected"] = compare_expected(result)
    result["plot"] = _plot(result, out / "paramdelta-demo.png")
    seconds["total"] = time.perf_counter() - start
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    shutil.rmtree(sweep_dir, ignore_errors=True)  # reproducible from the inputs; keep the folder small
    result["out"] = str(out)
    return result


def table(result: dict[str, Any]) -> str:
    """The five models side by side, then the recovery ratio and the α sweep, as text."""
    head = ["model"] + [c[2] for c in COLUMNS]
    body = [[LABELS[m]] + [fmt.format(s[metric]) if s.get(metric) is not None else "n/a"
                           for _, metric, _, fmt in COLUMNS] for m, s in result["models"].items()]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
    if result["recovery"] is not None:
        lines += ["", f"recovery (ParamΔ / reference, exact match): {result['recovery']:.1%}"]
    lines += ["α sweep (new base + α·(post − base)), exact match / format: "
              + ", ".join(f"{r['alpha']:g}: {r['exact_match']:.0%}/{r['format']:.0%}" for r in result["alpha_sweep"])]
    exp = result.get("expected")
    if exp:
        lines += ["shipped numbers reproduced within tolerance" if exp["ok"] else
                  "differs from the shipped numbers: " + "; ".join(exp["outside"])]
    return "\n".join(lines)


def compare_expected(result: dict[str, Any], expected_file: Path = DEMO_DATA / "expected.json") -> dict[str, Any]:
    """Check every model's metrics against the numbers recorded when the checkpoints were shipped."""
    if not expected_file.is_file():
        return {"ok": False, "outside": [f"{expected_file} is missing"]}
    expected = json.loads(expected_file.read_text())["models"]
    outside = []
    for model, metrics in expected.items():
        for metric, want in metrics.items():
            got = result["models"].get(model, {}).get(metric)
            tol = TOLERANCE.get(metric, 0.0) * (abs(want) if metric == "word_perplexity" else 1.0)
            if got is None or abs(got - want) > tol + 1e-9:
                outside.append(f"{LABELS.get(model, model)} {metric}: {got} (shipped {want} ± {tol:.4g})")
    return {"ok": not outside, "outside": outside, "tolerance": TOLERANCE}


def _scores(scores: dict[str, dict[str, tuple[float, float | None]]]) -> dict[str, float]:
    return {metric: scores[task][metric][0] for task, metric, *_ in COLUMNS
            if metric in scores.get(task, {})}


def _rebuild(run_dir: Path, progress: bool) -> tuple[dict[str, Path], Path]:
    """Run the toy-world recipe (without its eval step: the demo evaluates) and return its outputs."""
    from .recipe import load_recipe, run_recipe

    recipe = load_recipe(RECIPE)
    recipe.steps = [s for s in recipe.steps if s.op != "eval"]
    _log(f"rebuilding the toy world with {RECIPE.name} in {run_dir} (several minutes on a CPU)")
    results = {r.id: Path(r.out) for r in run_recipe(recipe, run_dir=run_dir, progress=progress) if r.out}
    return {m: results[m] for m in TRAINED}, results["world"] / "tasks"


def _plot(result: dict[str, Any], path: Path) -> str | None:
    """Bars for the five models, lines for the α sweep; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed: no chart (pip install 'paramdelta[plot]')")
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    models = list(result["models"])
    metrics = [("exact_match", "exact match"), ("format", "format compliance")]
    width = 0.8 / len(metrics)
    for i, (metric, name) in enumerate(metrics):
        xs = [j + (i - 0.5) * width for j in range(len(models))]
        bars = left.bar(xs, [100 * result["models"][m][metric] for m in models], width, label=name)
        left.bar_label(bars, fmt="%.0f", fontsize=7)
    left.set_xticks(range(len(models)), [LABELS[m] for m in models])
    left.set_ylabel("% of questions about facts B")
    left.set_ylim(0, 110)
    left.legend(fontsize=8, loc="upper left")
    recovery = result["recovery"]
    title = "Toy world: questions about new facts, chat format"
    if recovery is not None:
        title += f"\nParamΔ recovers {recovery:.0%} of the reference's exact match"
    left.set_title(title, fontsize=10)
    sweep = result["alpha_sweep"]
    alphas = [r["alpha"] for r in sweep]
    right.plot(alphas, [100 * r["exact_match"] for r in sweep], "o-", label="exact match")
    right.plot(alphas, [100 * r["format"] for r in sweep], "s--", label="format compliance")
    right.axhline(100 * result["models"]["reference"]["exact_match"], color="gray", ls=":", label="reference (exact)")
    right.set_xlabel("α in new base + α·(post − base)")
    right.set_ylim(0, 105)
    right.set_title("α sweep", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


@contextmanager
def _quiet(enabled: bool):
    """Hide transformers' and datasets' progress bars for the duration (lm-eval's own bars stay)."""
    if not enabled:
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        datasets.enable_progress_bars()


@contextmanager
def _torch_threads(n: int | None):
    """Run with `n` torch threads. Models this small are fastest on one thread: a second thread adds
    only synchronisation, and costs ~4x when another process keeps the other core busy (measured)."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def ship(run_dir: str | Path, dst: Path = DEMO_DATA, recipe: Path | None = None) -> dict[str, Any]:
    """Copy a toy-world recipe run's four bf16 checkpoints and the world's eval data into `dst`
    (the package's demo data), record where they came from, then run the demo on them and store
    its numbers as `expected.json` (what a fresh `pdelta demo` is checked against).

    >>> ship("runs/toy-world")                         # doctest: +SKIP
    """
    import hashlib
    import tempfile

    from .evaluate import library_versions

    run_dir = Path(run_dir)
    recipe = Path(recipe or Path(__file__).resolve().parents[1] / "recipes" / "toy-world.yaml")
    stamps = {m: json.loads((run_dir / m / "pdelta-recipe.json").read_text()) for m in TRAINED}
    for m in TRAINED:
        shutil.rmtree(dst / m, ignore_errors=True)
        shutil.copytree(run_dir / m, dst / m)
    (dst / "tasks").mkdir(parents=True, exist_ok=True)
    for name in ("eval_b.jsonl", "bios_b.jsonl"):
        shutil.copy2(run_dir / "world" / "tasks" / name, dst / "tasks" / name)
    shutil.copy2(run_dir / "world" / "world.json", dst / "world.json")
    shutil.copy2(recipe, dst / "toy-world.yaml")
    source = {"recipe": stamps["base"]["recipe"], "recipe_file": "toy-world.yaml",
              "recipe_sha256": hashlib.sha256(recipe.read_bytes()).hexdigest(), "vars": stamps["base"]["vars"],
              "steps": {json.loads(f.read_text())["step"]: json.loads(f.read_text())["options"]
                        for f in sorted(run_dir.glob("*/pdelta-recipe.json"))},
              "library_versions": library_versions(),
              "note": "each checkpoint folder's pdelta-recipe.json is the recipe step that wrote it"}
    (dst / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
    (dst / "expected.json").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="pdelta-ship-") as tmp:
        result = run_demo(Path(tmp) / "demo", progress=False)
    expected = {"models": result["models"], "recovery": result["recovery"], "alpha_sweep": result["alpha_sweep"],
                "library_versions": result["library_versions"]}
    (dst / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    return expected

