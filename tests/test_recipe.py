"""Recipes: parsing and validation, overrides, --dry-run, skip-unchanged, --from-step, stamps, eval gates.

The end-to-end runs use the very files shipped in recipes/tiny/, with the tiny models passed as
`var=value` overrides, so CI proves the recipes users copy. `pdelta run` is called in-process
through `paramdelta.cli.main.main()` with `--format json`, whose stdout lists each step's status.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from tinymodels import INDEX_NAME, load_state, make_triple

from paramdelta.recipe import STAMP, RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
APPLY_CAST_EVAL = RECIPES / "tiny" / "apply-cast-eval.yaml"
DELTA_THEN_TRANSFORM = RECIPES / "tiny" / "delta-then-transform.yaml"
SHIPPED = sorted(RECIPES.rglob("*.yaml"))
WORKFLOW = RECIPES / "github-actions" / "paramdelta-gate.yml"
RAN, SKIPPED, BEFORE = "ran", "skipped (unchanged)", "not run (before --from-step)"
LAYER = "model.layers.1.mlp.down_proj.weight"


# -- world --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triple_src(tmp_path_factory) -> tuple[Path, Path, Path]:
    return make_triple(tmp_path_factory.mktemp("triple"), "llama")


@pytest.fixture
def triple(triple_src, tmp_path) -> tuple[Path, Path, Path]:
    """A private copy of (post, base, new_base): tests change their content."""
    return tuple(Path(shutil.copytree(p, tmp_path / "in" / p.name)) for p in triple_src)


@pytest.fixture
def tiny_vars(triple) -> list[str]:
    post, base, new_base = triple
    return [f"post={post}", f"base={base}", f"new_base={new_base}"]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "runs"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("PDELTA_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("PDELTA_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)  # a default `runs/` would land here, never in the repository




@pytest.fixture
def run(cli, run_dir, tiny_vars):
    """run(recipe, *args) -> {step id: status} from `pdelta run RECIPE <tiny vars> --run-dir DIR --format json ARGS`."""

    def go(recipe: Path, *args: str) -> dict[str, str]:
        code, out, err = cli("run", recipe, *tiny_vars, "--run-dir", run_dir, "--format", "json", *args)
        assert code == 0, err
        return {s["id"]: s["status"] for s in json.loads(out)["steps"]}

    return go


def one_error_line(code: int, err: str) -> str:
    """The CLI's error contract: exit 2, one `error:` line on stderr, no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert code == 2, f"exit code {code}: {err}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    f = tmp_path / name
    f.write_text(textwrap.dedent(text))
    return f


def recipe_error(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(path, list(overrides))
    return str(err.value)


def change_tensor(ckpt: Path, name: str = LAYER) -> None:
    """Add 1 to one tensor in place: same file size and layout, different content."""
    shard = ckpt / json.loads((ckpt / INDEX_NAME).read_text())["weight_map"][name]
    with safe_open(shard, "pt") as s:
        meta = s.metadata()
        tensors = {k: s.get_tensor(k) for k in s.keys()}
    tensors[name] = tensors[name] + 1
    save_file(tensors, shard, metadata=meta)


def stamp(out: Path) -> dict:
    return json.loads((out / STAMP).read_text())


GOOD = """\
    version: 1
    name: two-steps
    vars: {post: p, base: b, new_base: nb}
    steps:
      - {id: merge, op: apply, post: "${post}", base: "${base}", new_base: "${new_base}"}
      - {id: half, op: cast, in: "${merge}", dtype: float16}
    """


# -- the shipped files ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(RECIPES)) for p in SHIPPED])
def test_every_shipped_recipe_is_valid_and_commented(path):
    recipe = load_recipe(path)
    assert yaml.safe_load(path.read_text())["version"] == 1
    assert recipe.steps and recipe.vars
    comments = [ln for ln in path.read_text().splitlines() if ln.strip().startswith("#")]
    assert len(comments) >= 3, "recipes users copy are commented"
    assert path.name in (RECIPES / "README.md").read_text(), f"recipes/README.md does not mention {path.name}"


def test_shipped_recipes_cover_the_documented_pipelines():
    assert {p.relative_to(RECIPES).as_posix() for p in SHIPPED} >= {
        "llama3-to-3.1.yaml", "delta-then-transform.yaml",
        "tiny/apply-cast-eval.yaml", "tiny/delta-then-transform.yaml"}
    llama = load_recipe(RECIPES / "llama3-to-3.1.yaml")
    assert [s.op for s in llama.steps] == ["apply", "eval"]
    gate = llama.steps[-1].raw
    assert {"ifeval", "gsm8k", "mmlu"} <= set(gate["tasks"]) and gate["limit"]
    assert gate["require"] and all("ref" in r for r in gate["require"])
    assert [s.op for s in load_recipe(RECIPES / "delta-then-transform.yaml").steps] == ["extract", "apply", "cast"]
    assert [s.op for s in load_recipe(DELTA_THEN_TRANSFORM).steps] == ["extract", "apply", "cast"]
    assert [s.op for s in load_recipe(APPLY_CAST_EVAL).steps] == ["apply", "cast", "eval"]


def test_github_actions_example_caches_the_run_folder_and_runs_a_shipped_recipe():
    text = WORKFLOW.read_text()
    doc = yaml.safe_load(text)
    triggers = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers and doc["jobs"]
    steps = [s for job in doc["jobs"].values() for s in job["steps"]]
    commands = "\n".join(s.get("run", "") for s in steps)
    assert "pip install" in commands and "pdelta run" in commands
    caches = [s for s in steps if str(s.get("uses", "")).startswith("actions/cache@")]
    assert caches and any("runs" in str(c["with"]["path"]) for c in caches)
    for ref in {w for w in commands.split() if w.startswith("recipes/") and w.endswith(".yaml")}:
        assert (RECIPES.parent / ref).is_file(), ref


# -- parsing ---------------------------------------------------------------------------------------
BAD = {
    "bad version": ("version: 1\n", "version: 2\n", "version must be 1 (got 2)"),
    "no version": ("version: 1\n", "", "version must be 1 (got None)"),
    "unknown top-level key": ("vars:", "var:", "unknown top-level key 'var' (did you mean 'vars'?)"),
    "unknown op": ("op: cast", "op: cats", "step 'half': unknown op 'cats' (did you mean 'cast'?)"),
    "unknown key of a transform": ("dtype: float16", "dtyp: float16",
                                   "step 'half': unknown key 'dtyp' for op cast (did you mean 'dtype'?)"),
    "unknown key of a core op": ('new_base: "${new_base}"', 'new_bsae: "${new_base}"',
                                 "step 'merge': unknown key 'new_bsae' for op apply (did you mean 'new_base'?)"),
    "reference to a later step": ('post: "${post}"', 'post: "${half}"', "step 'merge': ${half} is a later step"),
    "unknown var": ('in: "${merge}"', 'in: "${new_bas}"',
                    "step 'half': ${new_bas} is not a var or earlier step (did you mean 'new_base'?)"),
    "duplicate ids": ("id: half", "id: merge", "step id 'merge' is used twice"),
    "step without op": ("op: cast, ", "", "step 2: needs an op"),
    "no steps": ("steps:", "steps: []\nx_steps:", "steps must be a non-empty list"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_parse_errors_say_what_and_suggest(case, tmp_path):
    old, new, expected = BAD[case]
    text = textwrap.dedent(GOOD)
    assert old in text
    msg = recipe_error(write(tmp_path, text.replace(old, new, 1)))
    assert expected in msg, msg
    assert str(tmp_path / "recipe.yaml") in msg


@pytest.mark.parametrize(("text", "expected"), [
    ("version: 1\nsteps: [\n", "not valid YAML"),
    ("- just\n- a list\n", "a recipe is a mapping"),
])
def test_unreadable_recipes(text, expected, tmp_path):
    assert expected in recipe_error(write(tmp_path, text))
    assert "cannot read" in recipe_error(tmp_path / "missing.yaml")


def test_every_problem_is_reported_in_one_error(tmp_path, cli, run_dir):
    path = write(tmp_path, """\
        version: 3
        name: many-problems
        vars: {post: p, base: b, new_base: nb}
        stpes: []
        steps:
          - {id: merge, op: apply, post: "${post}", base: "${bse}", new_base: "${new_base}", alpah: 0.5}
          - {id: merge, op: cats, in: "${merge}"}
          - {id: tail, op: cast, in: "${later}", dtype: float16}
          - {id: later, op: cast, in: "${merge}", onyl: mlp}
        """)
    msg = recipe_error(path)
    expected = ["version must be 1 (got 3)", "unknown top-level key 'stpes' (did you mean 'steps'?)",
                "${bse} is not a var or earlier step (did you mean 'base'?)",
                "unknown key 'alpah' for op apply (did you mean 'alpha'?)", "step id 'merge' is used twice",
                "unknown op 'cats' (did you mean 'cast'?)", "step 'tail': ${later} is a later step",
                "unknown key 'onyl' for op cast (did you mean 'only'?)"]
    for text in expected:
        assert text in msg, f"{text!r} missing from: {msg}"
    line = one_error_line(*cli("run", path, "--run-dir", run_dir)[::2])
    assert all(text in line for text in expected) and "(fix: " in line
    assert not run_dir.exists()


# -- overrides -------------------------------------------------------------------------------------
def test_overrides_set_vars_and_step_options(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, ["post=/models/instruct", "half.dtype=bfloat16", "half.only=mlp", "merge.alpha=0.5",
                                "merge.out=elsewhere/merged"])
    assert recipe.vars == {"post": "/models/instruct", "base": "b", "new_base": "nb"}
    assert recipe.step("half").raw == {"in": "${merge}", "dtype": "bfloat16", "only": "mlp"}
    assert recipe.step("merge").raw["alpha"] == 0.5  # YAML-typed, as in the file
    assert recipe.step("merge").out == "elsewhere/merged"
    assert load_recipe(path).vars["post"] == "p"  # the file itself is untouched


@pytest.mark.parametrize(("override", "expected"), [
    ("pots=/x", "override 'pots=/x': no var 'pots' (did you mean 'post'?)"),
    ("hlaf.dtype=float16", "override 'hlaf.dtype=float16': no step 'hlaf' (did you mean 'half'?)"),
    ("half.dtpye=float16", "step 'half': unknown key 'dtpye' for op cast (did you mean 'dtype'?)"),
    ("merge.alhpa=2", "step 'merge': unknown key 'alhpa' for op apply (did you mean 'alpha'?)"),
    ("post", "override 'post' is not key=value"),
])
def test_unknown_overrides_are_errors_with_suggestions(override, expected, tmp_path):
    msg = recipe_error(write(tmp_path, GOOD), [override])
    assert expected in msg, msg


def test_all_override_problems_at_once(tmp_path, cli, run_dir):
    line = one_error_line(*cli("run", write(tmp_path, GOOD), "pots=/x", "hlaf.dtype=float16", "half.dtpye=float16",
                               "--run-dir", run_dir)[::2])
    assert "no var 'pots'" in line and "no step 'hlaf'" in line and "unknown key 'dtpye'" in line
    assert not run_dir.exists()


# -- dry run ---------------------------------------------------------------------------------------
def test_dry_run_prints_the_plan_from_headers_and_writes_nothing(cli, tiny_vars, run_dir, triple):
    post, base, new_base = triple
    code, out, err = cli("run", APPLY_CAST_EVAL, *tiny_vars, "--run-dir", run_dir, "--dry-run", "--format", "json")
    assert code == 0, err
    steps = {s["id"]: s for s in json.loads(out)["steps"]}
    assert [s["status"] for s in steps.values()] == ["planned"] * 3
    assert steps["merge"]["detail"]["tensors"] == 21 and steps["merge"]["detail"]["bytes"] > 0
    assert steps["merge"]["out"] == str(run_dir / "merge")
    assert "checked when it exists" in steps["half"]["detail"]["check"]
    assert steps["gate"]["detail"]["models"] == [str(run_dir / "merge"), str(run_dir / "half")]
    assert steps["gate"]["detail"]["require"] == ["pdelta_mc:acc>=0.0", "pdelta_mc:acc>=ref-0.25"]
    assert not run_dir.exists()

    code, out, err = cli("run", APPLY_CAST_EVAL, *tiny_vars, "--run-dir", run_dir, "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert [ln.split()[:3] for ln in lines] == [["merge", "apply", "planned"], ["half", "cast", "planned"],
                                                ["gate", "eval", "planned"]]
    assert '"tensors": 21' in lines[0]
    assert not run_dir.exists()
    assert sorted(p.name for p in post.parent.iterdir()) == ["base", "new_base", "post"]


def test_dry_run_checks_a_transform_against_existing_headers(cli, tiny_vars, tmp_path, run_dir, triple):
    post = triple[0]
    recipe = write(tmp_path, """\
        version: 1
        vars: {post: p}
        steps:
          - {id: half, op: cast, in: "${post}", dtype: float16, only: mlp}
        """)
    code, out, err = cli("run", recipe, f"post={post}", "--run-dir", run_dir, "--dry-run", "--format", "json")
    assert code == 0, err
    [step] = json.loads(out)["steps"]
    assert step["detail"]["notes"] == ["6 of 21 tensors cast to float16"]
    line = one_error_line(*cli("run", recipe, f"post={post}", "half.only=nothing_matches", "--run-dir", run_dir,
                               "--dry-run")[::2])
    assert "matches no tensor" in line
    line = one_error_line(*cli("run", recipe, f"post={post}", "half.dtype=float8", "--run-dir", run_dir,
                               "--dry-run")[::2])
    assert "dtype must be one of" in line
    assert not run_dir.exists()


@pytest.mark.parametrize("recipe", [APPLY_CAST_EVAL, DELTA_THEN_TRANSFORM], ids=["apply", "extract"])
def test_dry_run_reports_a_missing_input_that_no_step_makes(recipe, cli, tiny_vars, tmp_path, run_dir):
    """Only outputs of earlier steps may be missing at plan time; a mistyped model folder must not pass."""
    missing = tmp_path / "no-such-model"
    code, out, err = cli("run", recipe, *tiny_vars, f"post={missing}", "--run-dir", run_dir, "--dry-run")
    line = one_error_line(code, err)
    assert str(missing) in line
    assert not run_dir.exists()


def test_a_bad_option_value_fails_before_any_step_runs(cli, tiny_vars, run_dir):
    """Values are checked up front like keys: a typo in the last step must not cost the earlier ones."""
    line = one_error_line(*cli("run", DELTA_THEN_TRANSFORM, *tiny_vars, "bf16.dtype=float8", "--run-dir",
                               run_dir)[::2])
    assert "float8" in line
    assert not (run_dir / "delta").exists() and not (run_dir / "merge").exists()


# -- skip unchanged ----------------------------------------------------------------------------------
def test_second_run_skips_every_step_and_mtime_alone_changes_nothing(run, run_dir, triple):
    assert run(DELTA_THEN_TRANSFORM) == {"delta": RAN, "merge": RAN, "bf16": RAN}
    outputs = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.safetensors")}
    assert run(DELTA_THEN_TRANSFORM) == {"delta": SKIPPED, "merge": SKIPPED, "bf16": SKIPPED}
    for f in triple[2].glob("*.safetensors"):  # touch: new mtime, same bytes
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert run(DELTA_THEN_TRANSFORM) == {"delta": SKIPPED, "merge": SKIPPED, "bf16": SKIPPED}
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.safetensors")} == outputs


def test_a_changed_option_reruns_its_step_and_the_steps_after_it(run, run_dir):
    run(DELTA_THEN_TRANSFORM)
    assert run(DELTA_THEN_TRANSFORM, "bf16.dtype=float16") == {"delta": SKIPPED, "merge": SKIPPED, "bf16": RAN}
    assert {t.dtype for t in load_state(run_dir / "bf16").values()} == {torch.float16}
    assert run(DELTA_THEN_TRANSFORM, "bf16.dtype=float16", "merge.deltas=[{delta: '${delta}', alpha: 0.5}]") == {
        "delta": SKIPPED, "merge": RAN, "bf16": RAN}
    assert run(DELTA_THEN_TRANSFORM, "rank=2") == {"delta": RAN, "merge": RAN, "bf16": RAN}


def test_changed_input_content_reruns_the_affected_steps(run, triple):
    post, base, new_base = triple
    run(DELTA_THEN_TRANSFORM)
    change_tensor(new_base)
    assert run(DELTA_THEN_TRANSFORM) == {"delta": SKIPPED, "merge": RAN, "bf16": RAN}
    change_tensor(post)
    assert run(DELTA_THEN_TRANSFORM) == {"delta": RAN, "merge": RAN, "bf16": RAN}
    assert run(DELTA_THEN_TRANSFORM) == {"delta": SKIPPED, "merge": SKIPPED, "bf16": SKIPPED}


def test_force_reruns_every_step(run, run_dir):
    run(DELTA_THEN_TRANSFORM)
    before = (run_dir / "bf16" / INDEX_NAME).stat().st_mtime_ns
    assert run(DELTA_THEN_TRANSFORM, "--force") == {"delta": RAN, "merge": RAN, "bf16": RAN}
    assert (run_dir / "bf16" / INDEX_NAME).stat().st_mtime_ns != before


# -- from-step and stamps ----------------------------------------------------------------------------
def test_from_step_starts_at_that_step(run, cli, tiny_vars, run_dir, tmp_path):
    code, _, err = cli("run", DELTA_THEN_TRANSFORM, *tiny_vars, "--run-dir", run_dir, "--from-step", "bf16")
    assert code == 2 and "Traceback" not in err
    assert str(run_dir / "merge") in err  # the earlier step's output is missing, and named
    assert not (run_dir / "bf16").exists()

    run(DELTA_THEN_TRANSFORM)
    assert run(DELTA_THEN_TRANSFORM, "--from-step", "bf16", "bf16.dtype=float16") == {
        "delta": BEFORE, "merge": BEFORE, "bf16": RAN}
    assert run(DELTA_THEN_TRANSFORM, "--from-step", "merge", "--force") == {"delta": BEFORE, "merge": RAN, "bf16": RAN}
    line = one_error_line(*cli("run", DELTA_THEN_TRANSFORM, *tiny_vars, "--run-dir", run_dir,
                               "--from-step", "bf61")[::2])
    assert "no step 'bf61'" in line and "did you mean 'bf16'?" in line


def test_each_output_holds_its_resolved_options(run, run_dir, triple):
    post, base, new_base = triple
    run(DELTA_THEN_TRANSFORM, "rank=3")
    delta, merge, cast = stamp(run_dir / "delta"), stamp(run_dir / "merge"), stamp(run_dir / "bf16")
    assert delta["options"] == {"post": str(post), "base": str(base), "rank": 3, "max_shard_size": "20KB"}
    assert merge["options"]["deltas"] == [{"delta": str(run_dir / "delta"), "alpha": 1.0}]
    assert merge["options"]["new_base"] == str(new_base)
    assert cast["options"] == {"in": str(run_dir / "merge"), "dtype": "bfloat16", "max_shard_size": "20KB"}
    assert (cast["recipe"], cast["step"], cast["op"]) == ("tiny-delta-then-transform", "bf16", "cast")
    assert cast["source"] == str(DELTA_THEN_TRANSFORM)
    assert cast["vars"] == {"post": str(post), "base": str(base), "new_base": str(new_base), "rank": 3}
    assert len(cast["fingerprint"]) == 64
    assert {t.dtype for t in load_state(run_dir / "bf16").values()} == {torch.bfloat16}
    assert {t.dtype for t in load_state(run_dir / "merge").values()} == {torch.float32}
    assert any(n.endswith("@U") for n in load_state(run_dir / "delta"))


# -- apply -> cast -> eval ----------------------------------------------------------------------------
def test_tiny_apply_cast_eval_gates_on_scores(cli, tiny_vars, run_dir):
    code, out, err = cli("run", APPLY_CAST_EVAL, *tiny_vars, "--run-dir", run_dir, "--format", "json")
    assert code == 0, err
    assert {s["id"]: s["status"] for s in json.loads(out)["steps"]} == {"merge": RAN, "half": RAN, "gate": RAN}
    assert {t.dtype for t in load_state(run_dir / "half").values()} == {torch.float16}
    results = run_dir / "gate.json"
    assert json.loads(results.read_text())["passed"] is True
    gate_stamp = json.loads((run_dir / "gate.json.recipe.json").read_text())
    assert gate_stamp["options"]["require"] == ["pdelta_mc:acc>=0.0", "pdelta_mc:acc>=ref-0.25"]
    assert gate_stamp["options"]["models"] == [str(run_dir / "merge"), str(run_dir / "half")]

    # An impossible floor: the gate fails, the run exits non-zero, the checkpoints are not redone.
    code, out, err = cli("run", APPLY_CAST_EVAL, *tiny_vars, "min_acc=1.01", "--run-dir", run_dir)
    assert code != 0
    assert "eval gate failed" in err and "pdelta_mc:acc>=1.01" in err and "Traceback" not in err
    assert "[merge]" not in err and "[half]" not in err and "[gate]" in err

    # Back to the recipe's own bounds: nothing needs redoing, and the results file agrees with the exit code.
    code, out, err = cli("run", APPLY_CAST_EVAL, *tiny_vars, "--run-dir", run_dir, "--format", "json")
    assert code == 0, err
    assert json.loads(results.read_text())["passed"] is True, "gate.json still holds the failed run's results"
