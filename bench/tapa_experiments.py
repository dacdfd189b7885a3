"""TAPA's two toy experiments (issue 7, DESIGN.md §9): run recipes/tapa-toy.yaml, then print the results
table with each goal checked, from the eval-length JSON the recipe wrote. Numbers are from one run.
Experiment 1 has two arms: training-free (exp1.json) and the paper's protocol, both models given a light
fine-tune at 4L (exp1_long.json).

    OMP_NUM_THREADS=1 python bench/tapa_experiments.py                       # runs/tapa-toy/, ~15 min
    python bench/tapa_experiments.py --run-dir /tmp/t --set pretrain_steps=200 --set ft_steps=10   # quicker
    python bench/tapa_experiments.py --report-only --run-dir runs/tapa-toy                 # table only

Writes RUN_DIR/results.md (the tables, the goals, the command) beside exp1.png, exp1_long.png and exp2.png.
A re-run skips the recipe steps whose inputs and options did not change.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tapa-toy.yaml"
ROPE_FAMILY = ("", "@pi:4", "@yarn:4", "@pi:8", "@yarn:8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/tapa-toy")
    ap.add_argument("--set", action="append", default=[], metavar="VAR=VALUE", help="recipe override, repeatable")
    ap.add_argument("--report-only", action="store_true", help="do not run; read the run folder's results")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)  # shared CPUs: one thread is several times faster than two under contention
    run_dir = Path(args.run_dir)
    seconds = None
    if not args.report_only:
        from paramdelta.recipe import describe_results, load_recipe, run_recipe

        t0 = time.perf_counter()
        results = run_recipe(load_recipe(RECIPE, args.set), run_dir=run_dir, progress=False)
        seconds = time.perf_counter() - t0
        print(describe_results(results), file=sys.stderr)
    text = report(run_dir, args.set, seconds)
    (run_dir / "results.md").write_text(text)
    print(text)


def report(run_dir: Path, overrides: list[str], seconds: float | None) -> str:
    exp1, exp2 = (json.loads((run_dir / f"exp{i}.json").read_text()) for i in (1, 2))
    lines = ["## Experiment 1: from scratch at L = 64", "", table(exp1), ""] + goals_scratch(exp1)
    long = run_dir / "exp1_long.json"
    if long.is_file():
        res = json.loads(long.read_text())
        lines += ["", "## Experiment 1, paper protocol: + a light fine-tune at 4L (5% of pretraining tokens)", "",
                  table(res), ""] + goals_long(res)
    lines += ["", "## Experiment 2: retrofit of the trained RoPE model", "", table(exp2), ""]
    lines += goals_retrofit(exp2)
    cmd = "OMP_NUM_THREADS=1 python bench/tapa_experiments.py " + " ".join(f"--set {o}" for o in overrides)
    lines += ["", f"Command: `{cmd.strip()}` (recipe {RECIPE.name}, seed in its vars)"
              + (f"; {seconds / 60:.1f} min wall." if seconds else ".")]
    return "\n".join(lines) + "\n"


def table(res: dict) -> str:
    lengths = res["lengths"]
    head = "| model | " + " | ".join(f"ppl@{n}" for n in lengths) + " | " + " | ".join(f"kv@{n}" for n in lengths)
    rows = [head + " |", "|" + "---|" * (1 + 2 * len(lengths))]
    for m in res["models"]:
        rows.append(f"| {m['label']} | " + " | ".join(f"{m['ppl'][str(n)]:.2f}" for n in lengths) + " | "
                    + " | ".join(f"{m['retrieval'].get(str(n), float('nan')):.2f}" for n in lengths) + " |")
    return "\n".join(rows)


def _ppl(res: dict) -> dict[str, dict[int, float]]:
    return {m["label"]: {int(n): v for n, v in m["ppl"].items()} for m in res["models"]}


def _check(ok: bool, text: str) -> str:
    return f"- [{'x' if ok else ' '}] {text}"


def goals_scratch(res: dict) -> list[str]:
    p, lengths = _ppl(res), res["lengths"]
    L = lengths[0]
    tapa = p["tapa"]
    rope = [k for k in p if k.startswith("rope")]
    if 4 * L not in tapa:
        return [f"- goals need lengths up to {4 * L}; measured {lengths}"]
    out = [_check(tapa[4 * L] <= 1.1 * tapa[L], f"TAPA ppl@{4 * L} ≤ 1.1 × ppl@{L}: "
                  f"{tapa[4 * L]:.2f} vs {tapa[L]:.2f} (×{tapa[4 * L] / tapa[L]:.3f})")]
    for n in (4 * L, 8 * L):
        if n in tapa:
            best = min(rope, key=lambda k: p[k][n])
            out.append(_check(tapa[n] < p[best][n], f"TAPA ppl@{n} below every RoPE/PI/YaRN: {tapa[n]:.2f} vs "
                              f"best {best} {p[best][n]:.2f}"))
    out.append(_check(tapa[L] <= 1.03 * p["rope"][L], f"TAPA ppl@{L} within 3% of RoPE: {tapa[L]:.2f} vs "
                      f"{p['rope'][L]:.2f} ({100 * (tapa[L] / p['rope'][L] - 1):+.1f}%)"))
    return out


def goals_long(res: dict) -> list[str]:
    """The issue's experiment-1 goals for TAPA + extend, against every RoPE row of the same table (RoPE,
    PI and YaRN with and without the same long fine-tune); lengths are multiples of the pretraining L."""
    p, lengths = _ppl(res), res["lengths"]
    L, ext, ft = lengths[0], "tapa_long", "rope_long"
    if ext not in p or ft not in p or 4 * L not in p[ext]:
        return [f"- goals need rows {ext}, {ft} and lengths up to {4 * L}; have {sorted(p)} at {lengths}"]
    t = p[ext]
    rope = [k for k in p if k.startswith("rope")]
    out = [_check(t[4 * L] <= 1.1 * t[L], f"TAPA + extend ppl@{4 * L} ≤ 1.1 × ppl@{L}: {t[4 * L]:.2f} vs "
                  f"{t[L]:.2f} (×{t[4 * L] / t[L]:.3f}; {4 * L} is its fine-tune length, so no extrapolation)")]
    if 8 * L in t:  # the paper's claim after the extend step: flat past the fine-tune length, where RoPE is not
        out.append(_check(t[8 * L] <= 1.1 * t[4 * L], f"TAPA + extend flat past its fine-tune length, ppl@{8 * L} ≤ "
                          f"1.1 × ppl@{4 * L}: {t[8 * L]:.2f} vs {t[4 * L]:.2f} (×{t[8 * L] / t[4 * L]:.3f}; "
                          f"RoPE + the same fine-tune ×{p[ft][8 * L] / p[ft][4 * L]:.3f})"))
    for n in (n for n in lengths if n >= 4 * L):
        best = min(rope, key=lambda k: p[k][n])
        extra = "" if n <= 8 * L else " (16L, beyond the issue's goals)"
        out.append(_check(t[n] < p[best][n], f"TAPA + extend ppl@{n} below every RoPE/PI/YaRN row{extra}: "
                          f"{t[n]:.2f} vs best {best} {p[best][n]:.2f}"))
    out.append(_check(t[L] <= 1.03 * p[ft][L], f"TAPA + extend ppl@{L} within 3% of RoPE + the same fine-tune: "
                      f"{t[L]:.2f} vs {p[ft][L]:.2f} ({100 * (t[L] / p[ft][L] - 1):+.1f}%)"))
    return out


def goals_retrofit(res: dict) -> list[str]:
    p, lengths = _ppl(res), res["lengths"]
    L = lengths[0]
    ft = p["rope_ft"]
    family = [f"rope_ft{s}" for s in ROPE_FAMILY if f"rope_ft{s}" in p]
    if 4 * L not in ft:
        return [f"- goals need lengths up to {4 * L}; measured {lengths}"]
    out = []
    for name in (k for k in p if k.startswith("retro_")):
        r = p[name]
        best = min(family, key=lambda k: p[k][4 * L])
        out.append(_check(r[L] <= 1.05 * ft[L] and r[4 * L] < p[best][4 * L],
                          f"{name}: ppl@{L} {r[L]:.2f} vs RoPE+ft {ft[L]:.2f} ({100 * (r[L] / ft[L] - 1):+.1f}%, "
                          f"goal ≤ +5%); ppl@{4 * L} {r[4 * L]:.2f} vs best RoPE-family {best} {p[best][4 * L]:.2f}"))
    return out


if __name__ == "__main__":
    main()
