"""The toy world: a deterministic generator with checked separation of facts A and B, the tiny
recipe end to end, and the shipped demo reproducing its numbers from a clean, offline install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from paramdelta.errors import OptionError
from paramdelta.toyworld import WorldSpec, make_world, write_world
from paramdelta.toyworld.build import check_corpora
from paramdelta.toyworld.tasks import process_qa
from paramdelta.toyworld.tokenizer import EOS, SPECIAL_TOKENS, prompt
from paramdelta.toyworld.world import corpora

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny" / "toy-world.yaml"
DEMO_DATA = ROOT / "paramdelta" / "demo_data"
SMALL = WorldSpec(seed=3, people_a=30, people_b=12, cities=8)
TRAINING = ("pretrain_a.txt", "pretrain_ab.txt", "instruct_a.jsonl")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return Path(tmp_path_factory.mktemp("world") / "w")


@pytest.fixture(scope="module")
def written(world) -> Path:
    write_world(world, SMALL)
    return world


def _files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, with the folder's own path (in the task YAMLs) written as WORLD."""
    return {str(f.relative_to(folder)): f.read_bytes().replace(str(folder.resolve()).encode(), b"WORLD")
            for f in sorted(folder.rglob("*")) if f.is_file()}


# -- generator -----------------------------------------------------------------------------
def test_world_is_deterministic(written, tmp_path):
    again = tmp_path / "again"
    write_world(again, SMALL)
    assert _files(again) == _files(written)  # corpora, tokenizer, tasks, config, world.json: byte for byte
    assert make_world(SMALL).to_dict() != make_world(WorldSpec(seed=4, people_a=30, people_b=12, cities=8)).to_dict()


def test_eval_questions_never_appear_in_training_and_b_stays_out_of_a(written):
    record = json.loads((written / "world.json").read_text())
    b_people = [p for p in record["world"]["people"] if p["split"] == "B"]
    a_corpora = (written / "pretrain_a.txt").read_text() + (written / "instruct_a.jsonl").read_text()
    for p in b_people:  # B's surnames are unique words: neither they nor the full names reach the A corpora
        assert p["name"] not in a_corpora and p["name"].split()[1] not in a_corpora
    training = "\n".join((written / f).read_text() for f in TRAINING)
    questions = [json.loads(line) for line in (written / "tasks" / "eval_b.jsonl").read_text().splitlines()]
    assert len(questions) == 5 * SMALL.people_b
    for q in questions:
        assert q["question"] not in training and q["prompt"] not in training
        assert any(p["name"] in q["question"] for p in b_people)
        assert q["choices"][q["gold"]] == q["answer"] and len(set(q["choices"])) == 4
    assert record["checks"]["eval_questions_checked"] == len(questions)
    assert b_people[0]["name"] in (written / "pretrain_b.txt").read_text()


def test_the_check_catches_a_leak():
    world = make_world(SMALL)
    data = corpora(world)
    data["pretrain_ab"] = data["pretrain_ab"] + [data["eval_b"][0]["question"]]
    with pytest.raises(AssertionError, match="evaluation questions"):
        check_corpora(world, data)
    data = corpora(world)
    data["instruct_a"][0]["question"] += " " + world.split("B")[0].name
    with pytest.raises(AssertionError, match="B entities"):
        check_corpora(world, data)


def test_tokenizer_ids_are_dense_and_the_chat_template_matches_the_tasks(written):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(written / "tokenizer")
    vocab = tok.get_vocab()
    assert max(vocab.values()) + 1 == len(tok) == json.loads((written / "model_config.json").read_text())["vocab_size"]
    assert all(len(tok(s, add_special_tokens=False)["input_ids"]) == 1 for s in SPECIAL_TOKENS)
    q = json.loads((written / "tasks" / "eval_b.jsonl").read_text().splitlines()[0])
    rendered = tok.apply_chat_template([{"role": "user", "content": q["question"]}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == q["prompt"] == prompt(q["question"])
    docs = [line for f in ("pretrain_a.txt", "pretrain_ab.txt", "pretrain_b.txt")
            for line in (written / f).read_text().splitlines()]
    docs += [tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)
             for line in (written / "instruct_a.jsonl").read_text().splitlines()]
    assert not any(tok.unk_token_id in ids for ids in tok(docs)["input_ids"])  # every word is in the vocabulary
    ids = tok(f"{q['prompt']} {q['answer']}{EOS}")["input_ids"]
    assert tok.decode(ids[-2:], skip_special_tokens=True).strip() == q["answer"]


def test_bad_specs_are_option_errors():
    with pytest.raises(OptionError, match="quiz_share"):
        WorldSpec(quiz_share=2.0)
    with pytest.raises(OptionError, match="people"):
        WorldSpec(people_b=1)


@pytest.mark.parametrize("reply, kind, answer, expected", [
    (" Kadoro", "birth_city", "Kadoro", (1, 1, 1)),       # the answer, then the end-of-turn token
    (" Kadoro. Q: When was", "birth_city", "Kadoro", (0, 0, 1)),  # knows it, keeps writing
    (" Velmar", "birth_city", "Kadoro", (0, 1, 0)),       # well-formed, wrong
    ("", "birth_year", "1957", (0, 0, 0)),                # no answer at all
    (" 1957", "birth_year", "1957", (1, 1, 1)),
    (" Ilsa Varn", "mentor", "Ilsa Varn", (1, 1, 1)),
    (" Ilsa", "mentor", "Ilsa Varn", (0, 0, 0)),
    (" baker baker", "occupation", "baker", (0, 0, 1)),
])
def test_qa_metrics(reply, kind, answer, expected):
    from paramdelta.toyworld.world import ANSWER_PATTERNS

    scores = process_qa({"answer": answer, "pattern": ANSWER_PATTERNS[kind]}, [reply])
    assert (scores["exact_match"], scores["format"], scores["prefix_match"]) == expected


# -- the tiny recipe, end to end --------------------------------------------------------------
def test_tiny_recipe_end_to_end(tmp_path, monkeypatch, one_thread):
    from paramdelta.recipe import load_recipe, run_recipe

    monkeypatch.setenv("PDELTA_NO_PROGRESS", "1")
    start = time.perf_counter()
    results = {r.id: r for r in run_recipe(load_recipe(TINY_RECIPE), run_dir=tmp_path / "run", progress=False)}
    seconds = time.perf_counter() - start
    assert all(r.status == "ran" for r in results.values())
    ops = [r.op for r in results.values()]
    assert ops[:2] == ["toy-world", "init"] and ops.count("train") == 4 and ops.count("cast") == 4
    assert results["paramdelta"].op == "apply"
    evals = json.loads(Path(results["eval"].out).read_text())
    assert len(evals["models"]) == 5
    for m in evals["models"]:
        assert {"toyworld_qa", "toyworld_mc", "toyworld_ppl"} <= set(m["results"])
    gate = json.loads(Path(results["gate"].out).read_text())
    assert gate["passed"]
    stamp = json.loads((Path(results["post"].out) / "pdelta-recipe.json").read_text())
    assert stamp["recipe"] == "tiny-toy-world" and stamp["vars"]["seed"] == 0
    assert seconds < 240, f"the tiny toy world took {seconds:.0f}s"


# -- the shipped demo, from a clean install, offline ----------------------------------------
def test_recipe_shipped_with_the_package_is_the_repository_recipe():
    assert (DEMO_DATA / "toy-world.yaml").read_bytes() == (ROOT / "recipes" / "toy-world.yaml").read_bytes()
    source = json.loads((DEMO_DATA / "SOURCE.json").read_text())
    assert source["recipe"] == "toy-world" and "seed" in source["vars"]
    total = sum(f.stat().st_size for f in DEMO_DATA.rglob("*") if f.is_file())
    assert total < 8e6, f"shipped demo data is {total / 1e6:.1f} MB"


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """The package built as a wheel (from a copy of the sources) and unpacked: what `pip install` puts in place."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("paramdelta", "plugins"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True)
    site = tmp / "site"
    with zipfile.ZipFile(next((tmp / "dist").glob("paramdelta-*.whl"))) as whl:
        whl.extractall(site)
    return site


def test_wheel_holds_every_demo_file(wheel_site):
    shipped = {f.relative_to(DEMO_DATA) for f in DEMO_DATA.rglob("*") if f.is_file() and "__pycache__" not in f.parts}
    installed = {f.relative_to(wheel_site / "paramdelta" / "demo_data")
                 for f in (wheel_site / "paramdelta" / "demo_data").rglob("*") if f.is_file()}
    assert shipped == installed


def test_demo_from_a_clean_install_offline_reproduces_the_shipped_numbers(wheel_site, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON"))}
    env.update(PYTHONPATH=str(wheel_site), HF_HOME=str(tmp_path / "hf-home"),  # an empty cache
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")  # no network
    code = ("import sys, paramdelta; print(paramdelta.__file__, file=sys.stderr); "
            "from paramdelta.cli.main import main; sys.argv = ['pdelta'] + sys.argv[1:]; main()")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "demo", "--no-progress", "--format", "json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(wheel_site) in proc.stderr.splitlines()[0]  # the installed copy ran, not the source tree
    result = json.loads(proc.stdout)
    assert result["expected"]["ok"], result["expected"]["outside"]
    out = tmp_path / "pdelta-demo"
    assert json.loads((out / "results.json").read_text())["models"] == result["models"]
    assert (out / "paramdelta-demo.png").stat().st_size > 10_000
    assert [r["alpha"] for r in result["alpha_sweep"]] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    print(f"pdelta demo from the wheel: {seconds:.0f}s")
