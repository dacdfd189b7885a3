"""Evaluate checkpoints side by side with lm-eval, and gate CI on the results.

Each model is loaded through `paramdelta.plugins.load_model` (so plugin-made checkpoints get their
plugin's loader), wrapped in lm-eval's HFLM and run with `lm_eval.simple_evaluate`. The first
model is the reference: the table shows the others' differences from it, and requirements such
as ``pdelta_mc:acc>=ref-0.02`` compare against it.

Three small local tasks ship inside the package, shaped like the stock ones: ``pdelta_mc``
(multiple choice, like ARC/MMLU), ``pdelta_qa`` (generation + answer extraction, like GSM8K),
``pdelta_ppl`` (rolling perplexity, like wikitext) and the group ``pdelta_smoke``. Stock task
names (mmlu, gsm8k, ...) pass through to lm-eval, which downloads their data when online.

Example:
    >>> report = evaluate(["base/", "merged/"], ["pdelta_mc"], limit=20,
    ...                   requires=["pdelta_mc:acc>=ref-0.02"])
    >>> print(report.table())
    >>> report.failed
    []
"""

from __future__ import annotations

import difflib
import json
import operator
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import OptionError, PdeltaError

TASKS_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = ("pdelta_mc", "pdelta_qa", "pdelta_ppl", "pdelta_smoke")
OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_REQ = re.compile(r"^\s*([^:\s]+)\s*:\s*([^<>=\s]+)\s*(>=|<=|>|<)\s*(.+?)\s*$")
_REF = re.compile(r"^ref\s*(?:([-+*])\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+))?$")


class EvalError(PdeltaError):
    """A task cannot run: unknown name, or data that cannot be fetched."""


@dataclass(frozen=True)
class Requirement:
    """``TASK:METRIC OP BOUND``; the bound is a number, or `ref`, `ref-x`, `ref+x`, `ref*x` (the first model's value).

    `metric` is as lm-eval names it, without the default filter: ``acc``, ``exact_match,strict-match``.
    """

    text: str
    task: str
    metric: str
    op: str
    value: float  # the bound, or the offset/factor applied to the reference
    relative: str | None = None  # None (absolute), "+", "-" or "*"

    def bound(self, ref: float | None) -> float:
        if self.relative is None:
            return self.value
        assert ref is not None
        return ref * self.value if self.relative == "*" else ref + (self.value if self.relative == "+" else -self.value)


def parse_requirement(text: str) -> Requirement:
    """Parse ``TASK:METRIC>=VALUE`` (operators >=, >, <=, <; VALUE a number or ref[-+*]x).

    >>> parse_requirement("pdelta_mc:acc>=ref-0.02").bound(0.5)
    0.48
    """
    m = _REQ.match(text)
    if not m:
        raise OptionError(f"--require {text!r}: expected TASK:METRIC OP VALUE with OP one of >=, >, <=, <",
                          hint="e.g. --require 'pdelta_mc:acc>=0.3' or --require 'pdelta_mc:acc>=ref-0.02'")
    task, metric, op, rhs = m.groups()
    metric = metric.removesuffix(",none")
    try:
        return Requirement(text, task, metric, op, float(rhs))
    except ValueError:
        pass
    ref = _REF.match(rhs.replace(" ", ""))
    if not ref:
        raise OptionError(f"--require {text!r}: cannot read the bound {rhs!r}",
                          hint="use a number, or ref, ref-0.02, ref+0.01, ref*0.95 (ref = the first model's value)")
    sign, num = ref.groups()
    return Requirement(text, task, metric, op, float(num) if sign else 0.0, sign or "+")


@dataclass
class ModelResult:
    """One model's scores: `scores[task][metric] = (value, stderr or None)`, plus lm-eval's own output."""

    model: str
    scores: dict[str, dict[str, tuple[float, float | None]]]
    lm_eval: dict[str, Any]
    provenance: dict[str, Any]
    date: str
    seconds: float


@dataclass
class EvalReport:
    models: list[ModelResult]
    tasks: list[str]
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=lambda: _now())

    @property
    def failed(self) -> list[str]:
        """One line per failed requirement check (empty when every requirement holds)."""
        return [o["line"] for o in self.outcomes if not o["passed"]]

    def to_dict(self) -> dict[str, Any]:
        """The results file: lm-eval's results per model plus provenance, versions, date and outcomes."""
        versions = library_versions()
        return {
            "date": self.date, "tasks": self.tasks, "settings": self.settings, "library_versions": versions,
            "passed": not self.failed,
            "requirements": self.outcomes,
            "models": [{"model": r.model, "date": r.date, "seconds": round(r.seconds, 2), "provenance": r.provenance,
                        "library_versions": versions,
                        "requirements": [o for o in self.outcomes if o["model"] == r.model],
                        **r.lm_eval} for r in self.models],
        }

    def table(self, fmt: str = "text") -> str:
        """Models side by side, one row per task/metric; later models show their difference from the first."""
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2, default=str)
        ref = self.models[0].scores
        head = ["task", "metric"] + [r.model for r in self.models]
        rows = []
        for task, metrics in ref.items():
            for metric, (value, stderr) in metrics.items():
                row = [task, metric, _cell(value, stderr)]
                for other in self.models[1:]:
                    v, se = other.scores.get(task, {}).get(metric, (None, None))
                    row.append("n/a" if v is None else f"{_cell(v, se)} ({_num(v - value, '+')})")
                rows.append(row)
        lines = [f"{'PASS' if o['passed'] else 'FAIL'}  {o['line']}" for o in self.outcomes]
        if fmt == "markdown":
            md = ["| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows]]
            return "\n".join(md + ([""] + [f"- {x}" for x in lines] if lines else []))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        return "\n".join(text + ([""] + lines if lines else []))


def evaluate(models: list[str], tasks: list[str], *, limit: int | float | None = None, batch_size: int = 1,
             device: str = "cpu", num_fewshot: int | None = None, include_path: str | list[str] | None = None,
             requires: list[str | Requirement] | tuple = (), online: bool = False, dtype: str | None = None,
             verbose: bool = False) -> EvalReport:
    """Run lm-eval `tasks` on each model (the first is the reference) and check `requires`.

    Everything that can be checked before a model is loaded is: task names (with suggestions),
    datasets (offline unless `online` or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE are already set),
    requirement tasks and metrics.

    >>> evaluate(["ckpt/"], ["pdelta_smoke"], limit=10).table("markdown")
    """
    if not models or not tasks:
        raise OptionError("nothing to evaluate", hint="pass at least one MODEL and --tasks pdelta_smoke (or others)")
    models = [str(m) for m in models]
    reqs = [r if isinstance(r, Requirement) else parse_requirement(r) for r in requires]
    if any(r.relative for r in reqs) and len(models) < 2:
        raise OptionError("a requirement relative to `ref` needs a reference model",
                          hint="pass two or more models; the first is the reference")
    date = _now()
    extra = [include_path] if isinstance(include_path, str) else list(include_path or [])
    with _offline_unless(online) as download_hint, tempfile.TemporaryDirectory(prefix="pdelta-tasks-") as tmp:
        _quiet_lm_eval(verbose)
        _materialise_local_tasks(Path(tmp))
        manager = _task_manager(tasks, [tmp, *extra])
        _check_requirements(reqs, _metric_names(manager, tasks, download_hint))
        results = [_run_one(m, tasks, manager, limit=limit, batch_size=batch_size, device=device,
                            num_fewshot=num_fewshot, dtype=dtype) for m in models]
    settings = {"limit": limit, "batch_size": batch_size, "device": device, "num_fewshot": num_fewshot}
    report = EvalReport(results, list(tasks), settings=settings, date=date)
    report.outcomes = _check(reqs, results)
    return report


# -- tasks ------------------------------------------------------------------------------
def _materialise_local_tasks(dst: Path) -> None:
    """Copy the shipped task YAMLs into `dst` with data_files made absolute (lm-eval resolves them against the CWD)."""
    import yaml

    for src in sorted(TASKS_DIR.glob("*.yaml")):
        cfg = yaml.safe_load(src.read_text())
        files = cfg.get("dataset_kwargs", {}).get("data_files", {})
        for split, name in files.items():
            files[split] = str((TASKS_DIR / name).resolve())
        (dst / src.name).write_text(yaml.safe_dump(cfg, sort_keys=False))


def _task_manager(tasks: list[str], include: list[str]):
    """A TaskManager that knows every requested name; lm-eval's own ~15k stock tasks are indexed only when needed."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include, include_defaults=False)
    if all(t in manager.all_tasks for t in tasks):
        return manager
    manager = TaskManager(include_path=include)
    for t in tasks:
        if t not in manager.all_tasks and not Path(t).is_file():
            close = difflib.get_close_matches(t, manager.all_tasks, n=3, cutoff=0.6)
            raise EvalError(f"unknown task {t!r}: lm-eval has no task, group or tag of that name",
                            hint=_did_you_mean(close)
                            + f"local tasks: {', '.join(LOCAL_TASKS)}; or add your YAMLs with --include-path DIR")
    return manager


def _metric_names(manager, tasks: list[str], download_hint: str) -> dict[str, list[str]]:
    """Load each requested task once, before any model (this fetches data), and list the metrics it will report."""
    names: dict[str, list[str]] = {}
    for t in tasks:
        try:
            loaded = manager.load([t])
        except (ConnectionError, FileNotFoundError) as e:  # OfflineModeIsEnabled is a ConnectionError
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            if isinstance(e, FileNotFoundError) and "Hub" not in first:
                raise EvalError(f"task {t!r}: {first}", hint="check dataset_kwargs.data_files in its YAML") from None
            raise EvalError(f"task {t!r}: its dataset cannot be fetched ({first})", hint=download_hint) from None
        for name, task in loaded["tasks"].items():
            filters = [f["name"] for f in task.config.filter_list or []] or ["none"]
            names[name] = [_label(m, f) for f in filters for m in task.aggregation()]
        for name, group in loaded.get("groups", {}).items():
            aggs = group.aggregate_metric_list or []
            names[name] = [_label(a.metric, f) for a in aggs for f in (a.filter_list or ["none"])]
    return names


def _check_requirements(reqs: list[Requirement], metrics: dict[str, list[str]]) -> None:
    for r in reqs:
        if r.task not in metrics:
            close = difflib.get_close_matches(r.task, metrics, n=3, cutoff=0.5)
            raise OptionError(f"--require {r.text!r}: task {r.task!r} is not among the evaluated tasks "
                              f"({', '.join(metrics)})",
                              hint=_did_you_mean(close).strip() or "add the task to --tasks")
        if r.metric not in metrics[r.task]:
            close = difflib.get_close_matches(r.metric, metrics[r.task], n=3, cutoff=0.4)
            known = " ".join(metrics[r.task]) or "none"
            raise OptionError(f"--require {r.text!r}: task {r.task} reports no metric {r.metric!r}",
                              hint=_did_you_mean(close) + f"its metrics: {known}")


def _did_you_mean(close: list[str]) -> str:
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""


def _label(metric: str, filt: str) -> str:
    return metric if filt == "none" else f"{metric},{filt}"


# -- running ----------------------------------------------------------------------------
def _run_one(model_ref: str, tasks: list[str], manager, *, limit, batch_size, device, num_fewshot,
             dtype) -> ModelResult:
    import gc

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    date = _now()
    start = time.perf_counter()
    print(f"evaluating {model_ref} on {', '.join(tasks)}", file=sys.stderr)
    model, tok = _load_model(model_ref, device, dtype)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, backend="causal")
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False)
    del lm, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    scores: dict[str, dict[str, tuple[float, float | None]]] = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            scores.setdefault(task, {})[_label(metric, filt)] = (
                float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    kept = {k: json.loads(json.dumps(out.get(k, {}), default=str))  # lm-eval's own parts, made JSON-safe
            for k in ("results", "versions", "n-shot", "configs")}
    return ModelResult(model_ref, scores, kept, _provenance(model_ref), date, time.perf_counter() - start)


def _load_model(ref: str, device: str, dtype: str | None):
    """Through the plugin-aware loader, so a transformed checkpoint gets its own modules."""
    from .plugins import load_model

    return load_model(ref, device=device, dtype=dtype)


def _provenance(ref: str) -> dict[str, Any]:
    from .checkpoint import Checkpoint
    from .provenance import read_provenance

    try:
        return read_provenance(Checkpoint.open(ref)) if Path(ref).is_dir() else {}
    except PdeltaError:
        return {}


def _check(reqs: list[Requirement], results: list[ModelResult]) -> list[dict[str, Any]]:
    """Absolute requirements hold for every model; relative ones for every model after the reference."""
    outcomes = []
    for r in reqs:
        ref = results[0].scores.get(r.task, {}).get(r.metric, (None,))[0]
        for res in results[1:] if r.relative else results:
            value = res.scores.get(r.task, {}).get(r.metric, (None,))[0]
            if value is None or (r.relative and ref is None):
                outcomes.append({"requirement": r.text, "model": res.model, "value": value, "bound": None,
                                 "passed": False, "line": f"{r.text}: {res.model} reported no {r.task}:{r.metric}"})
                continue
            bound = r.bound(ref)
            passed = OPS[r.op](value, bound)
            rel = f" (ref {ref:.4f})" if r.relative else ""
            outcomes.append({"requirement": r.text, "model": res.model, "value": value, "bound": bound,
                             "passed": passed,
                             "line": f"{r.text}: {res.model} has {value:.4f}, needs {r.op} {bound:.4f}{rel}"})
    return outcomes


# -- environment ------------------------------------------------------------------------
@contextmanager
def _offline_unless(online: bool):
    """Offline for the duration (also for hub/datasets modules imported earlier), unless asked or already set.

    Yields the hint to give when a dataset cannot be fetched.
    """
    import importlib

    if online or "HF_HUB_OFFLINE" in os.environ or "HF_DATASETS_OFFLINE" in os.environ:
        yield ("check the network and the dataset name" if online else
               "unset HF_HUB_OFFLINE and HF_DATASETS_OFFLINE to let lm-eval download it, or use a local task")
        return
    saved = {}
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    for mod in ("huggingface_hub.constants", "datasets.config"):  # they read the variables when first imported
        m = importlib.import_module(mod)
        saved[mod] = m.HF_HUB_OFFLINE
        m.HF_HUB_OFFLINE = True
    try:
        yield "pass --online to let lm-eval download it, or use a local task such as pdelta_smoke"
    finally:
        del os.environ["HF_HUB_OFFLINE"], os.environ["HF_DATASETS_OFFLINE"]
        for mod, value in saved.items():
            sys.modules[mod].HF_HUB_OFFLINE = value


def _quiet_lm_eval(verbose: bool) -> None:
    import logging

    if verbose:
        from lm_eval.utils import setup_logging

        setup_logging(logging.INFO)
    else:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("paramdelta", "torch", "transformers", "lm_eval", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _num(x: float, sign: str = "") -> str:
    return f"{x:{sign}.1f}" if abs(x) >= 1000 else f"{x:{sign}.4f}"


def _cell(value: float, stderr: float | None) -> str:
    return _num(value) if stderr is None else f"{_num(value)} ± {_num(stderr)}"
