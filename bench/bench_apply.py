"""How close `pdelta apply` gets to the disk, measured against the I/O floor in one run.

    python bench/bench_apply.py                                  # 1.5B bf16, 4 shards
    python bench/bench_apply.py --sizes 0.3e9,1.5e9,3e9          # is peak RSS flat as models grow?
    python bench/bench_apply.py --pdelta-cmd "pdelta" --format json

For each size: build a synthetic base/post/new_base triple (bench/make_synthetic.py, reused when
already there), then time
  - the I/O floor: `cat` the three inputs' shards to /dev/null (warm: the second of two passes)
    plus `dd` an output-sized file with conv=fsync; cold: the same after dropping the page cache;
  - `pdelta apply` warm and, when the page cache can be dropped, cold, sampling the process
    tree's RssAnon every 10 ms;
  - mergekit `task_arithmetic` with fp32 math, when mergekit is installed (warm only).
and print seconds, ratios to the floors, peak anonymous RSS, and the speedup over mergekit.
All scratch lives under --work (default bench/_work, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from make_synthetic import ROLES, generate
from safetensors import safe_open

MiB = 1 << 20
TARGETS = {
    "warm_ratio": 1.5,
    "cold_ratio": 2.0,
    "speedup_vs_mergekit": 10.0,
    "peak_rss_anon_mib": 1024,
    "help_s": 1.0,
}  # DESIGN.md §3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- page cache and the I/O floor


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache; False where the container forbids it."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def timed(cmd: list[str] | str, **kw) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, **kw)
    return time.perf_counter() - t0


def cat_seconds(files: list[Path]) -> float:
    return timed(["cat", *map(str, files)], stdout=subprocess.DEVNULL)


def dd_seconds(path: Path, nbytes: int) -> float:
    count = -(-nbytes // (16 * MiB))
    try:
        return timed(
            ["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={count}", "conv=fsync"],
            stderr=subprocess.DEVNULL,
        )
    finally:
        path.unlink(missing_ok=True)


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path, repeats: int, cold: bool) -> dict:
    """Warm floor = best warm `cat` of all inputs + best `dd` of the output size; cold likewise
    after dropping the page cache (None when that is not allowed)."""
    cat_seconds(inputs)  # bring the inputs into the page cache
    cat_warm = min(cat_seconds(inputs) for _ in range(repeats))
    dd = min(dd_seconds(scratch / "floor.bin", out_bytes) for _ in range(repeats))
    floor = {"read_warm_s": cat_warm, "write_s": dd, "warm_s": cat_warm + dd, "cold_s": None}
    if cold and drop_caches():
        read_cold = cat_seconds(inputs)
        write_cold = dd_seconds(scratch / "floor.bin", out_bytes)
        floor.update(read_cold_s=read_cold, write_cold_s=write_cold, cold_s=read_cold + write_cold)
    return floor


# ---------------------------------------------------------------- a measured child process


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc/PID/task/TID/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    found[key] = int(line.split()[1])
    except OSError:
        pass
    return found


class PeakSampler(threading.Thread):
    """Every `period` s: sum RssAnon over the process tree; keep the peak, and the largest VmHWM."""

    def __init__(self, pid: int, period: float = 0.01):
        super().__init__(daemon=True)
        self.pid, self.period, self.stop = pid, period, threading.Event()
        self.peak_anon_kib = self.peak_hwm_kib = self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            anon = 0
            for p in _tree(self.pid):
                s = _status_kib(p, ("RssAnon", "VmHWM"))
                anon += s.get("RssAnon", 0)
                self.peak_hwm_kib = max(self.peak_hwm_kib, s.get("VmHWM", 0))
            self.peak_anon_kib = max(self.peak_anon_kib, anon)
            self.samples += 1
            self.stop.wait(self.period)


def run_measured(cmd: list[str], log_path: Path) -> dict:
    """Run cmd; return seconds until its output is on disk (process wall time + a `sync` after it),
    peak RssAnon summed over the process tree (MiB), VmHWM (MiB), exit code."""
    log(f"  $ {shlex.join(cmd)}")
    with open(log_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        sampler = PeakSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        process_s = time.perf_counter() - t0
        sampler.stop.set()
        # the floor's dd ends with fsync: count the writeback a command left pending (0 if it synced)
        os.sync()
        seconds = time.perf_counter() - t0
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {
        "seconds": seconds,
        "process_s": process_s,
        "sync_after_s": seconds - process_s,
        "rc": proc.returncode,
        "peak_rss_anon_mib": sampler.peak_anon_kib / 1024,
        # ru_maxrss is the peak RSS (anonymous + file-backed, e.g. mmapped shards) in KiB
        "vmhwm_mib": max(sampler.peak_hwm_kib, usage.ru_maxrss) / 1024,
        "samples": sampler.samples,
        "log": str(log_path),
    }
    if proc.returncode:
        tail = log_path.read_text(errors="replace")[-3000:]
        log(f"  command failed with exit code {proc.returncode}; end of {log_path}:\n{tail}")
    return result


# ---------------------------------------------------------------- checking an output


def _open_all(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    found = {}
    for shard in shards(folder):
        with safe_open(shard, "pt") as f:
            found.update(dict.fromkeys(f.keys(), shard))
    return found


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits as integers, so that equality is exact (NaN == NaN, -0 != +0)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def check_output(
    out: Path, post: Path, base: Path, new_base: Path, samples: int = 6, rows_elems: int = 1 << 20
) -> dict:
    """Headers equal to new_base's; on a few tensors, compare the first ~1M elements bit for bit
    with (post - base) + new_base computed in fp32 (fp64 for fp32 inputs), rounded once."""
    where = {
        name: _open_all(folder)
        for name, folder in (("out", out), ("post", post), ("base", base), ("new_base", new_base))
    }
    if set(where["out"]) != set(where["new_base"]):
        missing = set(where["new_base"]) - set(where["out"])
        extra = set(where["out"]) - set(where["new_base"])
        return {"ok": False, "problem": f"tensor names differ: {len(missing)} missing, {len(extra)} extra"}
    names = sorted(where["new_base"])
    picks = [names[round(i * (len(names) - 1) / max(1, samples - 1))] for i in range(samples)]
    checked = mismatched = 0
    for name in names:
        with safe_open(where["out"][name], "pt") as fo, safe_open(where["new_base"][name], "pt") as fn:
            so, sn = fo.get_slice(name), fn.get_slice(name)
            if so.get_shape() != sn.get_shape() or so.get_dtype() != sn.get_dtype():
                return {
                    "ok": False,
                    "problem": f"{name}: out {so.get_dtype()}{so.get_shape()} "
                    f"!= new_base {sn.get_dtype()}{sn.get_shape()}",
                }
            if name not in picks:
                continue
            shape = sn.get_shape()
            rows = shape[0] if len(shape) == 1 else max(1, min(shape[0], rows_elems // math.prod(shape[1:])))
            got = so[:rows]
            ins = []
            for role in ("post", "base", "new_base"):
                with safe_open(where[role][name], "pt") as f:
                    ins.append(f.get_slice(name)[:rows])
        wide = torch.float64 if got.dtype == torch.float32 else torch.float32
        p, b, n = (t.to(wide) for t in ins)
        want = ((p - b) + n).to(got.dtype)
        checked += got.numel()
        mismatched += int((_bits(got) != _bits(want)).sum())
    return {
        "ok": mismatched == 0,
        "checked": checked,
        "mismatched": mismatched,
        "tensors_sampled": len(picks),
    }


# ---------------------------------------------------------------- the runs


def default_pdelta_cmd() -> str:
    """The pdelta script installed beside this Python, else `python -m paramdelta.cli.main`."""
    script = Path(sys.executable).with_name("pdelta")
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m paramdelta.cli.main"


def find_mergekit(cmd: str | None) -> list[str] | None:
    if cmd:
        return shlex.split(cmd)
    beside = Path(sys.executable).with_name("mergekit-yaml")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mergekit-yaml")
    return [found] if found else None


def mergekit_config(path: Path, base: Path, post: Path, new_base: Path, out_dtype: str) -> Path:
    # task_arithmetic: base + 1·(post − base) + 1·(new_base − base) = new_base + (post − base)
    q = json.dumps  # a JSON string is a YAML string, whatever the path holds
    path.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {q(str(base))}\n"
        "models:\n"
        f"  - model: {q(str(post))}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {q(str(new_base))}\n    parameters: {{weight: 1.0}}\n"
        "dtype: float32\n"
        f"out_dtype: {out_dtype}\n"
    )
    return path


def prepare_inputs(work: Path, params: float, args) -> tuple[Path, dict]:
    # no "+" or "@" in the name: mergekit reads "a+b" as model+LoRA
    folder = work / f"synthetic-{params / 1e6:.0f}M-{args.dtype}-{args.shards}shards-seed{args.seed}"
    stamp = folder / "synthetic.json"
    if stamp.exists() and all((folder / r / "model.safetensors.index.json").exists() for r in ROLES):
        log(f"reusing {folder}")
        return folder, json.loads(stamp.read_text())
    log(f"generating {params:.3g} params ({args.dtype}, {args.shards} shards) in {folder}")
    summary = generate(folder, params, args.dtype, args.shards, args.seed, log=log)
    stamp.write_text(json.dumps(summary, indent=2) + "\n")
    return folder, summary


def bench_size(params: float, args) -> dict:
    work: Path = args.work
    folder, summary = prepare_inputs(work, params, args)
    base, post, new_base = (folder / r for r in ROLES)
    inputs = [*shards(base), *shards(post), *shards(new_base)]
    out_bytes = sum(p.stat().st_size for p in shards(new_base))
    in_bytes = sum(p.stat().st_size for p in inputs)
    os.sync()  # no leftover writeback from generation inside the timings

    log("I/O floor")
    floor = io_floor(inputs, out_bytes, work, args.repeats, cold=not args.no_cold)
    log(
        f"  warm {floor['warm_s']:.2f} s, cold "
        + ("unavailable" if floor["cold_s"] is None else f"{floor['cold_s']:.2f} s")
    )

    # references: what the interpreter + torch cost alone, and the CLI's start-up (target < 1 s)
    runs = [
        {
            "run": "import torch",
            "cache": "warm",
            **run_measured([sys.executable, "-c", "import torch, safetensors"], work / "import.log"),
        },
        {
            "run": "pdelta --help",
            "cache": "warm",
            **run_measured([*shlex.split(args.pdelta_cmd), "--help"], work / "help.log"),
        },
    ]
    out = work / "out_pdelta"
    apply = [*shlex.split(args.pdelta_cmd), "apply", "--post", str(post), "--base", str(base),
             "--new-base", str(new_base), "--out", str(out), "--overwrite"]  # fmt: skip
    for cache in ["warm"] * args.repeats + ([] if floor["cold_s"] is None else ["cold"]):
        shutil.rmtree(out, ignore_errors=True)
        if cache == "warm":
            os.sync()
            cat_seconds(inputs)
        else:
            drop_caches()
        log(f"pdelta apply ({cache})")
        r = run_measured(apply, work / f"pdelta-{cache}.log")
        runs.append({"run": "pdelta apply", "cache": cache, **r})
        if r["rc"]:
            break
    if runs and not runs[-1]["rc"] and not args.no_check:
        check = check_output(out, post, base, new_base)
        log(f"  output check: {check}")
        runs[-1]["check"] = check  # the output left by the last run
    shutil.rmtree(out, ignore_errors=True)

    mergekit = None if args.no_mergekit else find_mergekit(args.mergekit_cmd)
    if args.no_mergekit:
        log("mergekit: skipped (--no-mergekit)")
    elif mergekit is None:
        log(
            "mergekit: not installed (no mergekit-yaml beside this Python or on PATH), skipped; "
            "pass --mergekit-cmd PATH/TO/mergekit-yaml to compare"
        )
    else:
        mk_out = work / "out_mergekit"
        shutil.rmtree(mk_out, ignore_errors=True)
        cfg = mergekit_config(work / "mergekit.yml", base, post, new_base, args.dtype)
        os.sync()
        cat_seconds(inputs)
        log("mergekit task_arithmetic, fp32 math (warm)")
        r = run_measured([*mergekit, str(cfg), str(mk_out), *shlex.split(args.mergekit_args)], work / "mergekit.log")
        if not r["rc"] and not args.no_check:
            r["check"] = check_output(mk_out, post, base, new_base)
            log(f"  output check: {r['check']}")
        runs.append({"run": "mergekit fp32", "cache": "warm", **r})
        shutil.rmtree(mk_out, ignore_errors=True)

    return {
        "params": summary["num_params"],
        "dtype": args.dtype,
        "shards": summary["shards"],
        "read_bytes": in_bytes,
        "write_bytes": out_bytes,
        "inputs": str(folder),
        "floor": floor,
        "runs": runs,
        "verdict": verdict(floor, runs),
    }


def best(runs: list[dict], name: str, cache: str) -> dict | None:
    ok = [r for r in runs if r["run"] == name and r["cache"] == cache and not r["rc"]]
    return min(ok, key=lambda r: r["seconds"]) if ok else None


def verdict(floor: dict, runs: list[dict]) -> dict:
    warm, cold, mk = (
        best(runs, "pdelta apply", "warm"),
        best(runs, "pdelta apply", "cold"),
        best(runs, "mergekit fp32", "warm"),
    )
    v: dict = {}
    if warm:
        v["warm_ratio"] = warm["seconds"] / floor["warm_s"]
        v["peak_rss_anon_mib"] = max(r["peak_rss_anon_mib"] for r in runs if r["run"] == "pdelta apply")
    if cold and floor["cold_s"]:
        v["cold_ratio"] = cold["seconds"] / floor["cold_s"]
    helps = [r for r in runs if r["run"] == "pdelta --help" and not r["rc"]]
    if helps:
        v["help_s"] = min(r["seconds"] for r in helps)
    if warm and mk:
        v["speedup_vs_mergekit"] = mk["seconds"] / warm["seconds"]
    checks = [r["check"]["ok"] for r in runs if r["run"] == "pdelta apply" and "check" in r]
    if checks:
        v["correctly_rounded"] = all(checks)
    return v


# ---------------------------------------------------------------- reporting


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(result: dict) -> str:
    floor, gb = result["floor"], 1e9
    lines = [
        f"\n{result['params'] / 1e9:.2f}B params, {result['dtype']}, {result['shards']} shards: "
        f"reads {result['read_bytes'] / gb:.2f} GB, writes {result['write_bytes'] / gb:.2f} GB",
        f"{'run':<16}{'cache':<7}{'seconds':>9}{'×warm floor':>13}{'×cold floor':>13}"
        f"{'RssAnon MiB':>13}{'VmHWM MiB':>11}  check",
    ]
    rows = [
        ("I/O floor", "warm", floor["warm_s"], None, None, ""),
        ("I/O floor", "cold", floor["cold_s"], None, None, "" if floor["cold_s"] else "unavailable"),
    ]
    for r in result["runs"]:
        c = r.get("check")
        note = (
            f"exit {r['rc']}"
            if r["rc"]
            else ("" if c is None else c.get("problem") or f"{c['mismatched']}/{c['checked']} off")
        )
        rows.append((r["run"], r["cache"], r["seconds"], r["peak_rss_anon_mib"], r["vmhwm_mib"], note))
    for run, cache, s, anon, hwm, note in rows:
        if run in ("import torch", "pdelta --help"):  # references, not merges: no ratios
            lines.append(f"{run:<16}{cache:<7}{_f(s):>9}{'':>26}{_f(anon, '{:.0f}'):>13}{_f(hwm, '{:.0f}'):>11}")
            continue
        lines.append(
            f"{run:<16}{cache:<7}{_f(s):>9}"
            f"{_f(s and s / floor['warm_s'], '{:.2f}×'):>13}"
            f"{_f(s and floor['cold_s'] and s / floor['cold_s'], '{:.2f}×'):>13}"
            f"{_f(anon, '{:.0f}'):>13}{_f(hwm, '{:.0f}'):>11}  {note}"
        )
    v = result["verdict"]
    lines.append(f"apply speedup vs mergekit: {_f(v.get('speedup_vs_mergekit'), '{:.1f}×')}")
    checks = [
        ("warm_ratio", "apply / warm floor", "≤", "{:.2f}×"),
        ("cold_ratio", "apply / cold floor", "≤", "{:.2f}×"),
        ("speedup_vs_mergekit", "speedup vs mergekit fp32", "≥", "{:.1f}×"),
        ("peak_rss_anon_mib", "peak RssAnon MiB of apply", "<", "{:.0f}"),
        ("help_s", "pdelta --help seconds", "<", "{:.2f}"),
    ]
    for key, label, op, fmt in checks:
        if key in v:
            ok = v[key] >= TARGETS[key] if op == "≥" else v[key] <= TARGETS[key]
            lines.append(f"  target {label} {op} {TARGETS[key]:g}: {fmt.format(v[key])}  {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines)


def flatness(results: list[dict]) -> dict | None:
    """Peak RssAnon is "flat" when it grows by at most max(64 MiB, 15%) from smallest to largest."""
    peaks = [(r["params"], r["verdict"].get("peak_rss_anon_mib")) for r in results]
    peaks = [p for p in peaks if p[1] is not None]
    if len(peaks) < 2:
        return None
    lo, hi = min(p for _, p in peaks), max(p for _, p in peaks)
    return {"peaks_mib": peaks, "growth_mib": hi - lo, "flat": hi - lo <= max(64, 0.15 * lo)}


def summary_table(results: list[dict], flat: dict | None) -> str:
    lines = [
        "\nacross sizes",
        f"{'params':>8}{'GB/model':>10}{'floor warm s':>14}{'apply warm s':>14}{'×floor':>8}{'RssAnon MiB':>13}",
    ]
    for r in results:
        w = best(r["runs"], "pdelta apply", "warm")
        lines.append(
            f"{r['params'] / 1e9:>7.2f}B{r['write_bytes'] / 1e9:>10.2f}{r['floor']['warm_s']:>14.2f}"
            f"{_f(w and w['seconds']):>14}{_f(r['verdict'].get('warm_ratio'), '{:.2f}×'):>8}"
            f"{_f(r['verdict'].get('peak_rss_anon_mib'), '{:.0f}'):>13}"
        )
    if flat:
        lines.append(
            f"peak RssAnon grows {flat['growth_mib']:.0f} MiB from smallest to largest: "
            f"{'flat (PASS)' if flat['flat'] else 'NOT flat (FAIL)'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--sizes", default="1.5e9", help="comma-separated parameter counts (default 1.5e9)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--work",
        type=Path,
        default=Path(__file__).parent / "_work",
        help="scratch folder for inputs, outputs and logs (default bench/_work)",
    )
    p.add_argument(
        "--pdelta-cmd",
        default=default_pdelta_cmd(),
        help="command prefix; 'apply --post P --base B --new-base N --out O --overwrite' is "
        "appended (default: the pdelta beside this Python, else -m paramdelta.cli.main)",
    )
    p.add_argument("--mergekit-cmd", default=None, help="mergekit-yaml to compare with (default: found)")
    p.add_argument(
        "--mergekit-args",
        default="--no-copy-tokenizer",
        help="extra arguments for mergekit-yaml (default: --no-copy-tokenizer; the inputs have none)",
    )
    p.add_argument("--no-mergekit", action="store_true", help="skip the mergekit comparison")
    p.add_argument("--no-cold", action="store_true", help="skip the runs that drop the page cache")
    p.add_argument("--no-check", action="store_true", help="skip the sampled bitwise output check")
    p.add_argument("--repeats", type=int, default=2, help="warm repetitions; the best is kept (default 2)")
    p.add_argument("--clean", action="store_true", help="delete the generated inputs afterwards")
    p.add_argument(
        "--format",
        choices=["table", "json"],
        default="table",
        help="json: the table goes to stderr and JSON to stdout",
    )
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load_before:.1f} on {os.cpu_count()} CPUs; other work will skew timings")

    results = []
    for params in sizes:
        results.append(bench_size(params, args))
        if args.clean:
            shutil.rmtree(results[-1]["inputs"], ignore_errors=True)
        if len(sizes) > 1:  # each size's table as soon as it is done; the final report repeats them
            log(table(results[-1]))
    flat = flatness(results)

    report = "\n".join(table(r) for r in results) + ("\n" + summary_table(results, flat) if len(results) > 1 else "")
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
        "loadavg_before": round(load_before, 2),
        "loadavg_after": round(os.getloadavg()[0], 2),
    }
    if args.format == "json":
        log(report)
        print(json.dumps({"machine": machine, "targets": TARGETS, "sizes": results, "rss_flat": flat}, indent=2))
    else:
        print(
            f"machine: {machine['cpus']} CPUs, {machine['mem_gib']} GiB, {machine['platform']}; "
            f"load average {machine['loadavg_before']} before, {machine['loadavg_after']} after"
        )
        print(report)


if __name__ == "__main__":
    main()
