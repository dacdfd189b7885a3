"""Recipes: a versioned, linear YAML list of steps that `pdelta run` executes in order.

    version: 1
    name: llama3-to-3.1
    vars: {post: org/Instruct, base: org/Base, new_base: org/Base-v2}
    steps:
      - {id: merge, op: apply, post: "${post}", base: "${base}", new_base: "${new_base}"}
      - {id: small, op: cast, in: "${merge}", dtype: bfloat16}
      - {id: gate, op: eval, models: ["${small}"], tasks: [pdelta_mc], require: ["pdelta_mc:acc>=0.5"]}

`op` is a core step (pull, apply, extract, eval, push, ...) or a registered transform; a recipe never names
code to import. `${var}` reads `vars`, `${step_id}` is that step's output. Every key is
checked before anything runs (with "did you mean"). Each output gets the resolved recipe
beside it, with a fingerprint of the step's options and its inputs' content, so a re-run
skips steps whose inputs and options did not change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OptionError, PdeltaError
from .optionspec import fields, make_options
from .plugins import available, get, suggest
from .toyworld.world import WorldSpec  # the toy-world op's keys

RECIPE_VERSION = 1
STAMP = "pdelta-recipe.json"  # written inside each step's output folder (or beside an eval result)
_REF = re.compile(r"\$\{([A-Za-z_][\w-]*)\}")


class RecipeError(PdeltaError):
    """A recipe is malformed; every problem is listed."""


# -- the core steps' keys, declared once like a plugin's options ---------------------------
@dataclass(frozen=True, kw_only=True)
class ApplyStep:
    new_base: str
    post: str | None = None
    base: str | None = None
    alpha: float = 1.0
    terms: list = field(default_factory=list)  # [{post, base, alpha}, ...]
    deltas: list = field(default_factory=list)  # [{delta, alpha}, ...]
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    config_from: str = "new-base"
    tokenizer_from: str = "post"
    new_token_policy: str = "copy-post"
    allow_nonfinite: bool = False
    allow_tie_mismatch: bool = False
    max_cache: str | None = None  # disk bound for Hub inputs' shards while streaming, e.g. 40GB


@dataclass(frozen=True, kw_only=True)
class ExtractStep:
    post: str
    base: str
    rank: int | None = None
    energy: float | None = None
    dtype: str = "float32"
    max_shard_size: str = "5GB"


@dataclass(frozen=True, kw_only=True)
class EvalStep:
    models: list
    tasks: list
    limit: int | None = None
    batch_size: int = 1
    device: str = "cpu"
    num_fewshot: int | None = None
    include_path: str | None = None
    require: list = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class TrainStep:  # the keys of paramdelta.train.train
    model: str
    data: str
    steps: int
    lr: float = 1e-3
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    dtype: str = "float32"
    seed: int = 0
    optimizer: str = "adamw"
    optimizer_options: dict = field(default_factory=dict)
    warmup: int = 0
    weight_decay: float = 0.0
    schedule: str = "cosine"
    max_grad_norm: float | None = 1.0
    loss_on: str = "auto"
    max_shard_size: str = "5GB"
    save_state_every: int | None = None  # DCP training state every K steps, in state_dir (default OUT.state)
    state_dir: str | None = None
    resume: str | None = None  # a state folder from an interrupted run of this same step


@dataclass(frozen=True, kw_only=True)
class InitStep:  # the keys of paramdelta.train.init_model; config is a mapping or a config.json path
    config: dict | str
    tokenizer: str
    seed: int = 0
    dtype: str = "float32"
    max_shard_size: str = "5GB"


@dataclass(frozen=True, kw_only=True)
class EvalLengthStep:  # paramdelta.lengtheval.eval_length; writes JSON at the output (+ .png with plot)
    models: list  # paths, or PATH@pi:F / PATH@yarn:F
    data: str
    lengths: list
    stride_fraction: float = 0.5
    probe_trials: int = 32
    train_length: int | None = None
    max_tokens: int | None = None
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    plot: bool = True


@dataclass(frozen=True, kw_only=True)
class PackDocsStep:  # paramdelta.lengtheval.pack_documents: train.txt + eval.txt of long documents
    data: str
    tokenizer: str
    min_tokens: int
    holdout: float = 0.1


@dataclass(frozen=True, kw_only=True)
class PullStep:  # paramdelta.hub.pull: the step's output folder receives the files
    ref: str  # org/name[@revision]


@dataclass(frozen=True, kw_only=True)
class PushStep:  # paramdelta.hub.push: uploads `model` with a model card; the step's output is {commit_url}
    model: str
    repo: str
    private: bool = False
    revision: str | None = None  # branch
    message: str | None = None


CORE_OPS: dict[str, type] = {"apply": ApplyStep, "extract": ExtractStep, "eval": EvalStep, "train": TrainStep,
                             "init": InitStep, "pull": PullStep, "push": PushStep, "toy-world": WorldSpec,
                             "eval-length": EvalLengthStep, "pack-docs": PackDocsStep}
COMMON_KEYS = ("id", "op", "out")
TRANSFORM_KEYS = ("in", "max_shard_size")


@dataclass
class Step:
    id: str
    op: str
    raw: dict[str, Any]  # options as written, `${...}` not yet resolved
    out: str | None


@dataclass
class Recipe:
    name: str
    path: Path
    vars: dict[str, Any]
    steps: list[Step]

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise RecipeError(f"{self.path}: no step {step_id!r}",
                          hint=suggest(step_id, [s.id for s in self.steps]) or "see the recipe's step ids")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Parse and validate a recipe file; `overrides` are `var=value` or `step.key=value`."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with version, vars and steps")
    problems = []
    for key in doc:
        if key not in ("version", "name", "vars", "steps", "description"):
            problems.append(f"unknown top-level key {key!r}" + _dym(key, ("version", "name", "vars", "steps")))
    if doc.get("version") != RECIPE_VERSION:
        problems.append(f"version must be {RECIPE_VERSION} (got {doc.get('version')!r})")
    variables = dict(doc.get("vars") or {})
    raw_steps = doc.get("steps") or []
    if not isinstance(raw_steps, list) or not raw_steps:
        problems.append("steps must be a non-empty list")
        raw_steps = []
    steps: list[Step] = []
    for i, raw in enumerate(raw_steps):
        if not isinstance(raw, dict) or "op" not in raw:
            problems.append(f"step {i + 1}: needs an op")
            continue
        raw = dict(raw)
        step_id = str(raw.pop("id", f"step{i + 1}"))
        op = str(raw.pop("op"))
        out = raw.pop("out", None)
        if any(s.id == step_id for s in steps):
            problems.append(f"step id {step_id!r} is used twice")
        steps.append(Step(step_id, op, raw, None if out is None else str(out)))
    recipe = Recipe(str(doc.get("name") or path.stem), path, variables, steps)
    _apply_overrides(recipe, overrides, problems)
    problems += _validate(recipe)
    if problems:
        raise RecipeError(f"{path}: " + "; ".join(problems), hint="fix the recipe; `pdelta plugins list` shows ops")
    return recipe


def _dym(name: str, choices) -> str:
    s = suggest(name, choices)
    return f" ({s})" if s else ""


def _apply_overrides(recipe: Recipe, overrides: list[str], problems: list[str]) -> None:
    import yaml

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"override {item!r} is not key=value")
            continue
        parsed = yaml.safe_load(value) if value else ""
        if "." in key:
            step_id, _, opt = key.partition(".")
            matches = [s for s in recipe.steps if s.id == step_id]
            if not matches:
                problems.append(f"override {item!r}: no step {step_id!r}" + _dym(step_id, [s.id for s in recipe.steps]))
                continue
            if opt == "out":
                matches[0].out = str(parsed)
            else:
                matches[0].raw[opt] = parsed
        elif key in recipe.vars:
            recipe.vars[key] = parsed
        else:
            problems.append(f"override {item!r}: no var {key!r}" + _dym(key, recipe.vars))


def _validate(recipe: Recipe) -> list[str]:
    """Unknown ops and keys, unresolvable references: all found before anything runs."""
    problems = []
    ops = list(CORE_OPS) + list(available())
    seen: list[str] = []
    for step in recipe.steps:
        where = f"step {step.id!r}"
        for ref in _refs(step.raw) + _refs(step.out):
            if ref not in recipe.vars and ref not in seen:
                later = any(s.id == ref for s in recipe.steps)
                why = "is a later step" if later else "is not a var or earlier step" + _dym(ref, [*recipe.vars, *seen])
                problems.append(f"{where}: ${{{ref}}} {why}")
        seen.append(step.id)
        if step.op not in ops:
            problems.append(f"{where}: unknown op {step.op!r}" + _dym(step.op, ops))
            continue
        known = _keys(step.op)
        for key in step.raw:
            if key not in known:
                problems.append(f"{where}: unknown key {key!r} for op {step.op}" + _dym(key, known))
    return problems


def _keys(op: str) -> list[str]:
    if op in CORE_OPS:
        return list(fields(CORE_OPS[op]))
    return list(TRANSFORM_KEYS) + list(fields(get(op).Options))


def _refs(value: Any) -> list[str]:
    if isinstance(value, str):
        return _REF.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def _resolve(value: Any, names: dict[str, Any]) -> Any:
    if isinstance(value, str):
        whole = _REF.fullmatch(value)
        if whole:
            return names[whole.group(1)]
        return _REF.sub(lambda m: str(names[m.group(1)]), value)
    if isinstance(value, dict):
        return {k: _resolve(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, names) for v in value]
    return value


# -- running -------------------------------------------------------------------------------
@dataclass
class StepResult:
    id: str
    op: str
    status: str  # "ran", "skipped (unchanged)", "planned"
    out: str | None
    detail: dict[str, Any] = field(default_factory=dict)


def run_recipe(recipe: Recipe, *, run_dir: str | Path | None = None, dry_run: bool = False,
               from_step: str | None = None, force: bool = False, progress: bool = True) -> list[StepResult]:
    """Run (or, with dry_run, plan from headers) every step in order; returns what each step did."""
    run_dir = Path(run_dir or Path("runs") / recipe.name)
    names: dict[str, Any] = dict(recipe.vars)
    outputs = {s.id: str(Path(_resolve(s.out, names)) if s.out else run_dir / s.id) for s in recipe.steps}
    started = from_step is None
    if from_step is not None:
        recipe.step(from_step)
    _check_values(recipe, {**names, **outputs})
    produced: set[str] = set()
    results = []
    for step in recipe.steps:
        out = outputs[step.id]
        if step.op in ("eval", "push", "eval-length") and not step.out:
            out = str(run_dir / f"{step.id}.json")
        names[step.id] = out
        started = started or step.id == from_step
        if not started:
            results.append(StepResult(step.id, step.op, "not run (before --from-step)", out))
            continue
        opts = _resolve(step.raw, names)
        if dry_run:
            results.append(StepResult(step.id, step.op, "planned", out, _plan(step.op, opts, produced)))
            produced.add(out)
            continue
        fingerprint = _fingerprint(step.op, opts, run_dir)
        stamp = _stamp_path(step.op, out)
        if not force and stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
            detail = _recheck(step.op, out)
            results.append(StepResult(step.id, step.op, "skipped (unchanged)", out, detail))
            continue
        print(f"[{step.id}] {step.op} -> {out}", file=sys.stderr)
        stamp.unlink(missing_ok=True)  # a failed run must not leave an old stamp vouching for new results
        detail = _execute(step.op, opts, out, progress)
        if step.op == "push":  # push writes the model card into the folder it uploads
            fingerprint = _fingerprint(step.op, opts, run_dir)
        stamp.write_text(json.dumps({"recipe": recipe.name, "source": str(recipe.path), "step": step.id,
                                     "op": step.op, "options": opts, "fingerprint": fingerprint,
                                     "vars": recipe.vars}, indent=2, default=str) + "\n")
        results.append(StepResult(step.id, step.op, "ran", out, detail))
    return results


def _check_values(recipe: Recipe, names: dict[str, Any]) -> None:
    """Build every step's options (values, not just keys) before the first step runs."""
    from .writer import parse_size

    problems = []
    for step in recipe.steps:
        opts = _resolve(step.raw, names)
        try:
            if step.op in CORE_OPS:
                built = make_options(CORE_OPS[step.op], opts, f"step {step.id!r}")
                if step.op == "eval":
                    from .evaluate import parse_requirement

                    for r in built.require:
                        parse_requirement(str(r))
                if step.op == "push":
                    from .hub import check_repo_id

                    check_repo_id(built.repo)
            else:
                rest = {k: v for k, v in opts.items() if k not in TRANSFORM_KEYS}
                make_options(get(step.op).Options, rest, f"step {step.id!r}")
            for key in ("max_shard_size", "max_cache"):
                if opts.get(key) is not None:
                    parse_size(opts[key])
        except PdeltaError as e:
            problems.append(str(e))
    if problems:
        raise RecipeError(f"{recipe.path}: " + "; ".join(problems), hint="fix the recipe or the override")


def _stamp_path(op: str, out: str) -> Path:
    return Path(out + ".recipe.json") if op in ("eval", "push", "eval-length") else Path(out) / STAMP


def _execute(op: str, opts: dict[str, Any], out: str, progress: bool) -> dict[str, Any]:
    if op == "apply":
        from .delta import apply

        s = make_options(ApplyStep, opts, "apply")
        report = apply(out, new_base=s.new_base, post=s.post, base=s.base, alpha=s.alpha,
                       terms=[(t["post"], t["base"], float(t.get("alpha", 1.0))) for t in s.terms],
                       deltas=[(d["delta"], float(d.get("alpha", 1.0))) for d in s.deltas], dtype=s.dtype,
                       max_shard_size=s.max_shard_size, config_from=s.config_from, tokenizer_from=s.tokenizer_from,
                       new_token_policy=s.new_token_policy, allow_nonfinite=s.allow_nonfinite,
                       allow_tie_mismatch=s.allow_tie_mismatch, max_cache=s.max_cache, overwrite=True,
                       progress=progress)
        return {"tensors": report.tensors, "counts": report.counts}
    if op == "extract":
        from .extraction import extract

        s = make_options(ExtractStep, opts, "extract")
        report = extract(out, post=s.post, base=s.base, rank=s.rank, energy=s.energy, dtype=s.dtype,
                         max_shard_size=s.max_shard_size, overwrite=True, progress=progress)
        return {"full": report.full, "lowrank": report.lowrank}
    if op == "eval":
        return _eval(opts, out)
    if op in ("pull", "push"):
        from . import hub

        if op == "pull":
            return {"commit": hub.pull(make_options(PullStep, opts, "pull").ref, out, progress=progress)[1]}
        s = make_options(PushStep, opts, "push")
        url = hub.push(s.model, s.repo, private=s.private, revision=s.revision, message=s.message, progress=progress)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"repo": s.repo, "commit_url": url}) + "\n")
        return {"commit_url": url}
    if op == "train":
        from .train import train

        s = make_options(TrainStep, opts, "train")
        report = train(s.model, s.data, out, **{k: v for k, v in dataclasses.asdict(s).items()
                                                if k not in ("model", "data")}, overwrite=True, progress=progress)
        return {"steps": report.steps, "first_loss": report.first_loss, "final_loss": report.final_loss}
    if op == "init":
        from .train import init_model

        s = make_options(InitStep, opts, "init")
        init_model(s.config, s.tokenizer, out, seed=s.seed, dtype=s.dtype, max_shard_size=s.max_shard_size,
                   overwrite=True)
        return {"seed": s.seed}
    if op in ("eval-length", "pack-docs"):
        from . import lengtheval

        return lengtheval.run_step(op, opts, out, progress)
    if op == "toy-world":
        from .toyworld import write_world

        record = write_world(out, make_options(WorldSpec, opts, "toy-world"), overwrite=True)
        return {"vocab_size": record["vocab_size"], **record["counts"]}
    from .transform import run_transform

    opts = dict(opts)
    src = opts.pop("in", None)
    if src is None:
        raise RecipeError(f"transform step {op!r} needs `in:`")
    shard = opts.pop("max_shard_size", "5GB")
    report = run_transform(op, src, out, opts, max_shard_size=shard, overwrite=True, progress=progress)
    return {"tensors": report.tensors, "notes": report.notes}


def _eval(opts: dict[str, Any], out: str) -> dict[str, Any]:
    from .evaluate import evaluate

    s = make_options(EvalStep, opts, "eval")
    tasks = s.tasks if isinstance(s.tasks, list) else str(s.tasks).split(",")
    report = evaluate([str(m) for m in s.models], [str(t) for t in tasks], limit=s.limit, batch_size=s.batch_size,
                      device=s.device, num_fewshot=s.num_fewshot,
                      include_path=[s.include_path] if s.include_path else [], requires=[str(r) for r in s.require])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(report.table("json") + "\n")
    if report.failed:
        raise RecipeError("eval gate failed: " + "; ".join(report.failed),
                          hint="scores dropped below the recipe's require")
    return {"failed": report.failed}


def _recheck(op: str, out: str) -> dict[str, Any]:
    """A skipped eval step still gates: its stored requirement outcomes must have passed."""
    if op != "eval" or not Path(out).is_file():
        return {}
    stored = json.loads(Path(out).read_text())
    failed = [o["line"] for o in stored.get("requirements", []) if not o.get("passed")]
    if failed:
        raise RecipeError("eval gate failed (unchanged inputs): " + "; ".join(failed))
    return {"failed": []}


def _plan(op: str, opts: dict[str, Any], produced: set[str]) -> dict[str, Any]:
    """What a step would do, from headers only. Inputs an earlier step makes are checked when they
    exist; any other input must open now (a clear error names it otherwise)."""
    from .checkpoint import Checkpoint

    def ready(p: Any) -> bool:
        if str(p) in produced:
            return False
        Checkpoint.open(p)
        return True

    if op == "apply":
        from .plan import Term, make_plan

        s = make_options(ApplyStep, opts, "apply")
        pairs = ([(s.post, s.base, s.alpha)] if s.post else []) + [(t["post"], t["base"], t.get("alpha", 1.0))
                                                                  for t in s.terms]
        paths = [s.new_base] + [p for pair in pairs for p in pair[:2]] + [d["delta"] for d in s.deltas]
        if not all(ready(p) for p in paths):
            return {"check": "inputs produced by earlier steps; checked when they exist"}
        plan = make_plan(Checkpoint.open(s.new_base),
                         [Term(float(a), post=Checkpoint.open(p), base=Checkpoint.open(b)) for p, b, a in pairs]
                         + [Term(float(d.get("alpha", 1.0)), delta=Checkpoint.open(d["delta"])) for d in s.deltas],
                         dtype=s.dtype, tokenizer_from=s.tokenizer_from, new_token_policy=s.new_token_policy,
                         allow_tie_mismatch=s.allow_tie_mismatch)
        return {"tensors": len(plan.jobs), "bytes": sum(j.out.nbytes for j in plan.jobs), **plan.vocab_counts}
    if op == "extract":
        from .extraction import _preflight

        s = make_options(ExtractStep, opts, "extract")
        detail = {"post": s.post, "base": s.base, "mode": "low-rank" if s.rank or s.energy else "full"}
        if ready(s.post) and ready(s.base):
            detail["tensors"] = len(_preflight(Checkpoint.open(s.post), Checkpoint.open(s.base)))
        return detail
    if op == "eval":
        s = make_options(EvalStep, opts, "eval")
        return {"models": s.models, "tasks": s.tasks, "require": s.require}
    if op == "pull":
        from .hub import resolve

        commit, files = resolve(make_options(PullStep, opts, "pull").ref)
        return {"commit": commit, "files": len(files), "bytes": sum(size for size, _ in files.values())}
    if op == "push":
        from .hub import check_repo_id

        s = make_options(PushStep, opts, "push")
        return {"model": s.model, "repo": check_repo_id(s.repo), "revision": s.revision or "main"}
    if op == "train":
        s = make_options(TrainStep, opts, "train")
        return {"model": s.model, "data": s.data, "steps": s.steps, "optimizer": s.optimizer}
    if op == "init":
        s = make_options(InitStep, opts, "init")
        return {"tokenizer": s.tokenizer, "seed": s.seed}
    if op == "toy-world":
        return dataclasses.asdict(make_options(WorldSpec, opts, "toy-world"))
    if op in ("eval-length", "pack-docs"):
        return dataclasses.asdict(make_options(CORE_OPS[op], opts, op))
    transform = get(op)
    opts = dict(opts)
    src = opts.pop("in", None)
    opts.pop("max_shard_size", None)
    options = make_options(transform.Options, opts, op)
    if not ready(src):
        return {"check": "input produced by an earlier step; checked when it exists"}
    plan = transform.check(Checkpoint.open(src), options)
    return {"tensors": len(plan.tensors), "bytes": sum(t.nbytes for t in plan.tensors), "notes": plan.notes}


# -- fingerprints ----------------------------------------------------------------------------
def _fingerprint(op: str, opts: dict[str, Any], run_dir: Path) -> str:
    """sha256 over the op, its resolved options and the content of every local path they name."""
    cache_file = run_dir / ".pdelta-hash-cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    h = hashlib.sha256(json.dumps({"op": op, "options": opts}, sort_keys=True, default=str).encode())
    for value in _strings(opts):
        p = Path(value)
        if p.exists():
            for f in sorted([p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and f.name != STAMP]):
                h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{_file_hash(f, cache)}".encode())
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(cache))
    return h.hexdigest()


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _file_hash(f: Path, cache: dict[str, Any]) -> str:
    """Content sha256 of a file, cached by (path, size, mtime) so unchanged files are read once."""
    st = f.stat()
    key = str(f.resolve())
    hit = cache.get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return hit[2]
    digest = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(16 << 20):
            digest.update(chunk)
    cache[key] = [st.st_size, st.st_mtime_ns, digest.hexdigest()]
    return cache[key][2]


def describe_results(results: list[StepResult]) -> str:
    return "\n".join(f"{r.id:<16} {r.op:<10} {r.status:<28} {r.out or ''}"
                     + (f"  {json.dumps(r.detail, default=str)}" if r.detail else "") for r in results)


__all__ = ["Recipe", "RecipeError", "StepResult", "describe_results", "load_recipe", "run_recipe",
           "dataclasses", "OptionError"]
