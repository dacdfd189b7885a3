"""`pdelta rsparse quality --toy-world`: R-Sparse on the toy world's ParamΔ model, in one run.

The toy world (paramdelta/toyworld/README.md) ships four small trained checkpoints; ParamΔ =
post − base + new base answers questions about facts B in the chat format. This report

1. builds that ParamΔ model with `paramdelta.apply` (fp32 output, so dense, calibration and
   every variant share one precision);
2. writes the calibration text from the world's own facts-A corpora, regenerated from the spec
   in demo_data/world.json (`pretrain_a.txt` lines and `instruct_a.jsonl` exchanges in the chat
   format, shuffled together with a fixed seed). Facts B, the eval questions and the held-out
   biographies never appear in it; that the regenerated world is the shipped one is checked on
   its biographies and questions;
3. (b) next-token accuracy and perplexity on the facts-B biographies (tasks/bios_b.jsonl, the
   text of toyworld_ppl) through `quality_report`, every token sparse;
4. writes, per sparsity, three R-Sparse checkpoints with `run_transform("rsparse", ...)`:
   the layerwise search, the best uniform ρ of (3) and sparse only (ρ = 1, |x| score: TEAL);
5. (a) runs the toy world's lm-eval tasks on them through the plugin loader twice: mode "auto"
   (prefill dense, decode sparse: only the generated QA tokens are sparse; MC and perplexity are
   one prefill each, so they equal dense) and mode "sparse" (every token, the paper's protocol).

>>> result = toyworld_report("rsparse-toyworld")                 # doctest: +SKIP
>>> print(result["text"])                                        # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from paramdelta.errors import PdeltaError
from paramdelta.writer import fresh_work_folder

SPARSITIES = (0.4, 0.5, 0.7)
VARIANTS = {  # kind -> (label, transform options besides sparsity/calibration); "uniform" gets its ρ at run time
    "search": ("R-Sparse, search", {"search": "layerwise"}),
    "uniform": ("R-Sparse, uniform ρ", {"search": "none"}),
    "teal": ("sparse only (TEAL)", {"search": "none", "rho": 1.0, "score": "abs"}),
}
METRICS = [  # (task, metric, header, is a rate)
    ("toyworld_qa", "exact_match", "exact", True),
    ("toyworld_qa", "format", "format", True),
    ("toyworld_mc", "acc", "MC acc", True),
    ("toyworld_ppl", "word_perplexity", "word ppl", False),
]


def calibration_file(dst: Path) -> str:
    """Write the facts-A calibration text to `dst`; returns a one-line description of it."""
    from paramdelta.demo import DEMO_DATA
    from paramdelta.toyworld.tokenizer import EOS, prompt
    from paramdelta.toyworld.world import WorldSpec, corpora, make_world

    spec = json.loads((DEMO_DATA / "world.json").read_text())["spec"]
    data = corpora(make_world(WorldSpec(**spec)))
    shipped = {name: [json.loads(line) for line in (DEMO_DATA / "tasks" / name).read_text().splitlines() if line]
               for name in ("bios_b.jsonl", "eval_b.jsonl")}
    if ([r["text"] for r in shipped["bios_b.jsonl"]] != data["bios_b"]
            or [r["question"] for r in shipped["eval_b.jsonl"]] != [q["question"] for q in data["eval_b"]]):
        raise PdeltaError(f"the world regenerated from {DEMO_DATA / 'world.json'} is not the shipped one",
                          hint="the toy world's generator changed; rebuild demo_data with paramdelta.demo.ship")
    lines = data["pretrain_a"] + [f"{prompt(q['question'])} {q['answer']}{EOS}" for q in data["instruct_a"]]
    random.Random(0).shuffle(lines)
    dst.write_text("\n".join(lines) + "\n")
    return (f"{dst.name}: the toy world's pretrain_a.txt ({len(data['pretrain_a'])} lines) and instruct_a.jsonl "
            f"({len(data['instruct_a'])} chat exchanges), facts A only, shuffled (seed 0)")


def toyworld_report(out: str | Path = "rsparse-toyworld", *, sparsities: list[float] = SPARSITIES,
                    limit: int | None = None, batch_size: int = 64, threads: int | None = 1,
                    max_tokens: int = 16384, samples: int = 16, progress: bool = False) -> dict[str, Any]:
    """Build, transform and evaluate (see the module doc); writes `out/results.json` and returns it with `text`."""
    import torch

    from paramdelta.delta import apply
    from paramdelta.demo import DEMO_DATA
    from paramdelta.toyworld.tasks import TASKS, write_tasks
    from paramdelta.transform import run_transform

    from .quality import quality_report

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        out = fresh_work_folder(Path(out), "pdelta rsparse quality --toy-world")
        calib = out / "calibration.txt"
        calib_note = calibration_file(calib)
        dense = out / "paramdelta"
        _log(f"ParamΔ = post − base + new_base → {dense}")
        apply(dense, post=DEMO_DATA / "post", base=DEMO_DATA / "base", new_base=DEMO_DATA / "new_base",
              dtype="float32", overwrite=True, progress=progress)
        _log("next-token quality on tasks/bios_b.jsonl (every token sparse)")
        nexttok = quality_report(dense, DEMO_DATA / "tasks" / "bios_b.jsonl", calibration=calib,
                                 sparsities=list(sparsities), max_tokens=max_tokens, samples=samples)

        ckpts: dict[tuple[float, str], Path] = {}
        for s in sparsities:
            uniform = next(r["rho"] for r in nexttok["rows"] if r["sparsity"] == s and r.get("kind") == "uniform")
            for kind, (_, opts) in VARIANTS.items():
                path = out / f"s{s:g}-{kind}"
                options = {**opts, "sparsity": s, "calibration": calib, "samples": samples}
                if kind == "uniform":
                    options["rho"] = uniform
                run_transform("rsparse", dense, path, options, overwrite=True, progress=progress)
                ckpts[(s, kind)] = path

        tasks_dir = write_tasks(out / "tasks", DEMO_DATA / "tasks")
        rows = []
        for mode in ("auto", "sparse"):
            refs = ([dense] if mode == "auto" else []) + list(ckpts.values())
            _log(f"lm-eval, R-Sparse mode {mode!r}: {len(refs)} models on {', '.join(TASKS)}")
            with _mode(mode):
                report = _evaluate(refs, list(TASKS), limit=limit, batch_size=batch_size, include=tasks_dir)
            keys = ([None] if mode == "auto" else []) + list(ckpts)
            for key, res in zip(keys, report.models):
                scores = {m: res.scores.get(t, {}).get(m, (None, None))[0] for t, m, *_ in METRICS}
                if key is None:
                    rows.append({"variant": "dense", "kind": "dense", "sparsity": 0.0, "mode": "-", "rho": None,
                                 **scores})
                    continue
                layers = json.loads((ckpts[key] / "config.json").read_text())["rsparse"]["layers"].values()
                rows.append({"variant": VARIANTS[key[1]][0], "kind": key[1], "sparsity": key[0], "mode": mode,
                             "rho": sum(x["rho"] for x in layers) / len(layers),
                             "calib_err": sum(x["rel_err"] for x in layers) / len(layers), **scores})
        result = {"calibration": calib_note, "model": str(dense), "lm_eval": rows, "next_token": nexttok["rows"],
                  "limit": limit, "seconds": round(time.perf_counter() - start, 1)}
        result["text"] = "\n\n".join([_lm_eval_table(rows, calib_note, limit), nexttok["text"],
                                      _verdict(rows, nexttok["rows"])])
        (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        for path in ckpts.values():  # reproducible from the inputs in seconds; keep the folder small
            shutil.rmtree(path, ignore_errors=True)
        return result
    finally:
        torch.set_num_threads(old_threads)


def _evaluate(models: list[Path], tasks: list[str], *, limit, batch_size: int, include: Path):
    from paramdelta.evaluate import evaluate

    return evaluate([str(m) for m in models], tasks, limit=limit, batch_size=batch_size, dtype="float32",
                    include_path=[str(include)])


def _lm_eval_table(rows: list[dict[str, Any]], calib_note: str, limit: int | None) -> str:
    dense = rows[0]
    lines = [f"Toy world ParamΔ model (fp32), lm-eval toyworld_qa/mc/ppl on facts B"
             f"{'' if limit is None else f' (limit {limit})'}; calibration: {calib_note}",
             "mode auto: prefill dense, decode sparse (MC and perplexity are one prefill: dense); "
             "mode sparse: every token sparse",
             f"{'variant':<24}{'s':>5}{'mode':>8}{'mean ρ':>8}" + "".join(f"{h:>9}{'Δ':>8}" for _, _, h, _ in METRICS)]
    for r in rows:
        rho = "" if r["rho"] is None else f"{r['rho']:.2f}"
        cells = ""
        for _, m, _, rate in METRICS:
            v, d = r[m], dense[m]
            if v is None or d is None:
                cells += f"{'n/a':>9}{'':>8}"
            elif rate:
                cells += f"{100 * v:>8.1f}%{100 * (v - d):>+8.1f}"
            else:
                cells += f"{v:>9.2f}{100 * (v / d - 1):>+7.1f}%"
        lines.append(f"{r['variant']:<24}{r['sparsity']:>5.2f}{r['mode']:>8}{rho:>8}{cells}")
    return "\n".join(lines)


def _verdict(rows: list[dict[str, Any]], nexttok: list[dict[str, Any]]) -> str:
    """One line per sparsity (every token sparse): R-Sparse vs sparse only, search vs uniform, the 50% goal."""
    dense = rows[0]
    dense_nt = nexttok[0]
    lines = ["Every token sparse; Δ vs dense: lm-eval exact match pts / MC pts / word ppl %; "
             "next-token acc pts / ppl % / KL to dense (goal at 50%: accuracies ≥ −1 pt, perplexities ≤ +5%)"]
    for s in sorted({r["sparsity"] for r in rows if r["sparsity"]}):
        parts = []
        for kind, (label, _) in VARIANTS.items():
            r = next(x for x in rows if x["sparsity"] == s and x["mode"] == "sparse" and x["kind"] == kind)
            nt = next(x for x in nexttok if x["sparsity"] == s and x.get("kind") == kind)
            d_em, d_mc = 100 * (r["exact_match"] - dense["exact_match"]), 100 * (r["acc"] - dense["acc"])
            d_ppl = 100 * (r["word_perplexity"] / dense["word_perplexity"] - 1)
            d_nt, d_ntp = 100 * (nt["acc"] - dense_nt["acc"]), 100 * (nt["ppl"] / dense_nt["ppl"] - 1)
            text = f"{label} {d_em:+.1f}/{d_mc:+.1f}/{d_ppl:+.1f}%; {d_nt:+.2f}/{d_ntp:+.1f}%/{nt['kl']:.4f}"
            if s == 0.5 and kind != "teal":
                met = min(d_em, d_mc, d_nt) >= -1.0 and max(d_ppl, d_ntp) <= 5.0
                text += " (goal: " + ("met" if met else "NOT met") + ")"
            parts.append(text)
        lines.append(f"  s={s:.2f}: " + " | ".join(parts))
    return "\n".join(lines)


@contextmanager
def _mode(mode: str):
    """The plugin loader's default mode comes from $PDELTA_RSPARSE_MODE."""
    from .modules import MODE_ENV

    old = os.environ.get(MODE_ENV)
    os.environ[MODE_ENV] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(MODE_ENV, None)
        else:
            os.environ[MODE_ENV] = old


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)
