"""`pdelta eval` and paramdelta.evaluate: real lm-eval and HFLM on CPU, tiny models, the shipped local tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tinymodels import make_checkpoint, perturb, train_tiny_tokenizer  # noqa: E402

from paramdelta.errors import OptionError  # noqa: E402
from paramdelta.evaluate import EvalError, evaluate, parse_requirement  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """base (random llama + trained tiny tokenizer), post (a perturbed copy), merged (a real pdelta apply output)."""
    from paramdelta.delta import apply

    root = tmp_path_factory.mktemp("eval")
    tok = train_tiny_tokenizer(root / "tokenizer")
    base = make_checkpoint(root / "base", "llama", tokenizer=tok)
    post = perturb(base, root / "post", seed=1, scale=0.05)
    new_base = perturb(base, root / "new_base", seed=2)
    merged = root / "merged"
    apply(merged, new_base=new_base, post=post, base=base, progress=False)
    return {"base": base, "post": post, "merged": merged}


def pdelta(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PDELTA_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "paramdelta.cli.main", "eval", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("text, task, metric, op, bound", [
    ("pdelta_mc:acc>=0.25", "pdelta_mc", "acc", ">=", 0.25),
    ("pdelta_qa:exact_match,strict-match > 0", "pdelta_qa", "exact_match,strict-match", ">", 0.0),
    ("pdelta_mc:acc_norm,none>=ref-0.02", "pdelta_mc", "acc_norm", ">=", 0.48),
    ("pdelta_ppl:word_perplexity<=ref*1.1", "pdelta_ppl", "word_perplexity", "<=", 0.55),
    ("pdelta_ppl:bits_per_byte<ref", "pdelta_ppl", "bits_per_byte", "<", 0.5),
])
def test_parse_requirement(text, task, metric, op, bound):
    r = parse_requirement(text)
    assert (r.task, r.metric, r.op) == (task, metric, op)
    assert r.bound(0.5) == pytest.approx(bound)


@pytest.mark.parametrize("text", ["pdelta_mc:acc=0.5", "acc>=0.5", "pdelta_mc:acc>=ref/2", "pdelta_mc:acc>=high"])
def test_parse_requirement_rejects(text):
    with pytest.raises(OptionError, match="--require"):
        parse_requirement(text)


def test_local_tasks_report_metrics_in_range(models):
    offline_before = os.environ.get("HF_HUB_OFFLINE")
    report = evaluate([str(models["base"])], ["pdelta_mc", "pdelta_qa", "pdelta_ppl"], limit=4)
    scores = report.models[0].scores
    assert set(scores["pdelta_mc"]) == {"acc", "acc_norm"}
    assert set(scores["pdelta_qa"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert set(scores["pdelta_ppl"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    for task in ("pdelta_mc", "pdelta_qa"):
        for value, stderr in scores[task].values():
            assert 0.0 <= value <= 1.0 and stderr is not None and stderr >= 0.0
    ppl = {m: v for m, (v, _) in scores["pdelta_ppl"].items()}
    assert ppl["word_perplexity"] > 1 and ppl["byte_perplexity"] > 1 and ppl["bits_per_byte"] > 0
    assert report.models[0].lm_eval["n-shot"]["pdelta_mc"] == 0
    assert report.failed == []
    assert os.environ.get("HF_HUB_OFFLINE") == offline_before  # offline mode is undone afterwards


def test_relative_requirement_and_side_by_side_table(models):
    base, post = str(models["base"]), str(models["post"])
    report = evaluate([base, post], ["pdelta_ppl"], limit=3,
                      requires=["pdelta_ppl:bits_per_byte<=ref+0.05", "pdelta_ppl:bits_per_byte<ref-0.05"])
    assert [o["passed"] for o in report.outcomes] == [True, False]  # the copy is close to, not better than, base
    assert len(report.failed) == 1 and "ref-0.05" in report.failed[0] and post in report.failed[0]
    table = report.table("text")
    header, *rows = table.splitlines()
    assert base in header and post in header
    bpb = next(r for r in rows if "bits_per_byte" in r)
    ref, other = (v for v, _ in (report.models[0].scores["pdelta_ppl"]["bits_per_byte"],
                                 report.models[1].scores["pdelta_ppl"]["bits_per_byte"]))
    assert f"{ref:.4f}" in bpb and f"{other:.4f}" in bpb and f"({other - ref:+.4f})" in bpb
    assert "FAIL" in table and "PASS" in table
    assert f"| {base} | {post} |" in report.table("markdown")


def test_cli_require_passes_and_writes_results(models, tmp_path):
    out = tmp_path / "results.json"
    merged = str(models["merged"])
    r = pdelta(merged, "--tasks", "pdelta_mc", "--limit", "3", "--require", "pdelta_mc:acc>=0",
               "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[:3] == ["task", "metric", merged]
    assert "PASS  pdelta_mc:acc>=0" in r.stdout
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["date"]
    assert set(data["library_versions"]) >= {"paramdelta", "torch", "transformers", "lm_eval"}
    (m,) = data["models"]
    assert m["model"] == merged and m["date"] and m["requirements"][0]["passed"] is True
    assert m["library_versions"] == data["library_versions"]
    assert 0 <= m["results"]["pdelta_mc"]["acc,none"] <= 1
    assert m["versions"]["pdelta_mc"] == 1.0 and m["n-shot"]["pdelta_mc"] == 0 and "pdelta_mc" in m["configs"]
    assert m["provenance"]["tool"] == "paramdelta" and m["provenance"]["kind"]  # read from the shard metadata


def test_cli_require_fails_with_exit_code_1(models):
    r = pdelta(str(models["base"]), "--tasks", "pdelta_mc", "--limit", "3", "--require", "pdelta_mc:acc>1")
    assert r.returncode == 1, r.stderr
    assert "FAIL  pdelta_mc:acc>1" in r.stdout
    assert "FAILED: pdelta_mc:acc>1" in r.stderr and "Traceback" not in r.stderr


def test_cli_unknown_metric_suggests_before_loading(models):
    r = pdelta(str(models["base"]), "--tasks", "pdelta_mc", "--require", "pdelta_mc:acc_nrom>=0.3")
    assert r.returncode == 2 and r.stdout == ""
    assert "no metric 'acc_nrom'" in r.stderr and "did you mean 'acc_norm'" in r.stderr
    assert "evaluating" not in r.stderr  # rejected before any model was loaded
    assert len(r.stderr.strip().splitlines()) == 1


def test_unknown_task_and_unreachable_stock_task(models, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(EvalError, match=r"unknown task 'pdelta_mcq'.*did you mean 'pdelta_mc'"):
        evaluate([str(models["base"])], ["pdelta_mcq"])
    # a stock task whose data is not cached: named, and told how to get it, before any model loads
    with pytest.raises(EvalError, match=r"task 'arc_challenge': its dataset cannot be fetched.*--online"):
        evaluate([str(models["base"])], ["arc_challenge"])
