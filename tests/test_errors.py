"""Every bad input to `pdelta apply` ends in one actionable line and leaves nothing at the target.

The contract checked for each case: a non-zero exit code, exactly one line on stderr that starts
with `error:`, names the offending file or tensor and carries a `fix:` hint, no traceback, no
folder at the target and no `.NAME.pdelta-tmp-*` folder beside it.

Most cases run `paramdelta.cli.main.main()` in-process (fast; capfd sees everything written to
fd 1/2). Cases that need a real process (a file-size limit, a patched disk, SIGKILL) run
`python -m paramdelta.cli.main` or a small `python -c` script in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import INDEX_NAME, load_state, make_triple, tiny_config
from transformers import AutoModelForCausalLM

ENV = {**os.environ, "PDELTA_NO_PROGRESS": "1"}
SUBPROCESS_TIMEOUT = 120
LAYER = "model.layers.1.mlp.down_proj.weight"  # an ordinary 2-D tensor, not an embedding
OTHER = "model.layers.0.self_attn.q_proj.weight"


# -- world --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triple_src(tmp_path_factory) -> tuple[Path, Path, Path]:
    """One llama (post, base, new_base) per module; tests get their own copy."""
    return make_triple(tmp_path_factory.mktemp("triple"), "llama")


@pytest.fixture
def triple(triple_src, tmp_path) -> tuple[Path, Path, Path]:
    root = tmp_path / "in"
    copies = []
    for src in triple_src:
        shutil.copytree(src, root / src.name)
        copies.append(root / src.name)
    return tuple(copies)


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "merged"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("PDELTA_NO_PROGRESS", "1")
    monkeypatch.delenv("PDELTA_DEBUG", raising=False)


# -- running the CLI ------------------------------------------------------------------------------


def run_subprocess(argv: list[str], **kwargs) -> tuple[int, str, str]:
    p = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=SUBPROCESS_TIMEOUT, **kwargs)
    return p.returncode, p.stdout, p.stderr


def apply_args(post: Path, base: Path, new_base: Path, out: Path, *extra: str) -> list[str]:
    return ["apply", "--post", str(post), "--base", str(base), "--new-base", str(new_base), "--out", str(out),
            *extra]


def script(body: str) -> str:
    """A `python -c` program: `body` (which patches something), then main() with ARGV from argv[1:]."""
    return textwrap.dedent(body) + textwrap.dedent("""
        import sys
        from paramdelta.cli.main import main
        sys.argv = ["pdelta", *sys.argv[1:]]
        main()
    """)


# -- checks -------------------------------------------------------------------------------------
def temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.pdelta-tmp-*"))


def assert_clean_error(code: int, stderr: str, *names: str | Path, out: Path | None = None,
                       target_may_exist: bool = False) -> str:
    """The one-line error contract; returns the line."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    line = lines[0]
    assert code == 2, f"exit code {code}: {line}"
    assert line.startswith("error: "), line
    assert "fix:" in line, f"no fix hint: {line}"
    for name in names:
        assert str(name) in line, f"{name!r} not named in: {line}"
    if out is not None:
        if not target_may_exist:
            assert not out.exists(), f"{out} exists after a failed run"
        assert not temps(out), f"temp folder left beside {out}: {temps(out)}"
    return line


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_success(code: int, stdout: str, stderr: str, out: Path) -> None:
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert (out / "config.json").is_file()
    assert list(out.glob("*.safetensors"))
    assert not temps(out)


# -- editing checkpoints on disk -----------------------------------------------------------------
def weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX_NAME).read_text())["weight_map"]


def shard_of(folder: Path, name: str) -> Path:
    return folder / weight_map(folder)[name]


def set_weight_map(folder: Path, wm: dict[str, str]) -> None:
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"] = wm
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def edit_tensor(folder: Path, name: str, new: torch.Tensor | None) -> Path:
    """Replace tensor `name` in its shard (None drops it, and its index entry); returns the shard."""
    shard = shard_of(folder, name)
    state = load_file(shard)
    if new is None:
        del state[name]
        set_weight_map(folder, {k: v for k, v in weight_map(folder).items() if k != name})
    else:
        state[name] = new.contiguous()
    save_file(state, shard, metadata={"format": "pt"})
    return shard


def poke(folder: Path, name: str, value: float) -> Path:
    t = load_file(shard_of(folder, name))[name].clone()
    t[0, 0] = value
    return edit_tensor(folder, name, t)


# -- 1-3: inputs that do not fit together ---------------------------------------------------------
def test_architecture_mismatch(triple, out, tmp_path, cli):
    post, base, _ = triple
    other = tmp_path / "in" / "wide"
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=48)).to(torch.bfloat16)
    model.save_pretrained(other, max_shard_size="20KB")
    code, _, err = cli(*apply_args(post, base, other, out))
    assert_clean_error(code, err, "hidden_size", other, out=out)


def test_missing_tensor(triple, out, cli):
    post, base, new_base = triple
    edit_tensor(post, LAYER, None)
    code, _, err = cli(*apply_args(post, base, new_base, out))
    assert_clean_error(code, err, LAYER, post, out=out)


def test_shape_mismatch(triple, out, cli):
    post, base, new_base = triple
    edit_tensor(post, LAYER, torch.zeros(32, 48, dtype=torch.bfloat16))  # was [32, 64]
    code, _, err = cli(*apply_args(post, base, new_base, out))
    line = assert_clean_error(code, err, LAYER, post, out=out)
    assert "[32, 48]" in line and "[32, 64]" in line


# -- 4-7: broken files --------------------------------------------------------------------------
def test_truncated_shard(triple, out, cli):
    post, base, new_base = triple
    shard = shard_of(post, LAYER)
    os.truncate(shard, shard.stat().st_size - 100)
    code, _, err = cli(*apply_args(post, base, new_base, out))
    assert_clean_error(code, err, shard, out=out)


def test_corrupt_header_json(triple, out, cli):
    post, base, new_base = triple
    shard = shard_of(base, LAYER)
    with open(shard, "r+b") as f:
        f.seek(8)  # the first bytes of the JSON
        f.write(b"#garbage#")
    code, _, err = cli(*apply_args(post, base, new_base, out))
    assert_clean_error(code, err, shard, out=out)


def test_header_length_beyond_file(triple, out, cli):
    post, base, new_base = triple
    shard = shard_of(new_base, LAYER)
    with open(shard, "r+b") as f:
        f.write(struct.pack("<Q", shard.stat().st_size + 1000))
    code, _, err = cli(*apply_args(post, base, new_base, out))
    assert_clean_error(code, err, shard, out=out)


def test_index_points_outside_folder(triple, out, cli):
    post, base, new_base = triple
    shutil.copy(shard_of(post, LAYER), post.parent / "x.safetensors")  # a real file, just not inside
    set_weight_map(post, {**weight_map(post), LAYER: "../x.safetensors"})
    code, _, err = cli(*apply_args(post, base, new_base, out))
    assert_clean_error(code, err, post / INDEX_NAME, "../x.safetensors", out=out)


def test_index_points_to_missing_shard(triple, out, cli):
    post, base, new_base = triple
    shard = shard_of(post, LAYER)
    shard.unlink()
    code, _, err = cli(*apply_args(post, base, new_base, out))
    assert_clean_error(code, err, shard.name, out=out)


def test_tensor_in_two_shards(triple, out, cli):
    post, base, new_base = triple
    first = shard_of(post, LAYER)
    second = next(post / s for s in sorted(set(weight_map(post).values())) if post / s != first)
    state = load_file(second)
    state[LAYER] = load_file(first)[LAYER]
    save_file(state, second, metadata={"format": "pt"})
    code, _, err = cli(*apply_args(post, base, new_base, out))
    assert_clean_error(code, err, LAYER, first.name, second.name, out=out)


# -- 8: NaN / Inf ---------------------------------------------------------------------------------
@pytest.mark.parametrize("role, value", [("post", math.nan), ("base", math.inf), ("new_base", -math.inf)])
def test_nonfinite_input(triple, out, cli, role, value):
    post, base, new_base = triple
    folder = {"post": post, "base": base, "new_base": new_base}[role]
    shard = poke(folder, LAYER, value)
    code, _, err = cli(*apply_args(post, base, new_base, out))
    line = assert_clean_error(code, err, LAYER, shard, "--allow-nonfinite", out=out)
    assert line.startswith(f"error: {role.replace('_', ' ')} ")

    code, stdout, err = cli(*apply_args(post, base, new_base, out, "--allow-nonfinite"))
    assert_success(code, stdout, err, out)
    got = load_state(out)[LAYER][0, 0].item()
    assert math.isnan(got) if math.isnan(value) else math.isinf(got)


# -- 9-10: where the output goes ------------------------------------------------------------------
@pytest.mark.parametrize("where", ["equal", "inside-input", "input-inside"])
def test_output_overlaps_input(triple, cli, where):
    post, base, new_base = triple
    target = {"equal": post, "inside-input": post / "merged", "input-inside": post.parent}[where]
    before = snapshot(post.parent)
    code, _, err = cli(*apply_args(post, base, new_base, target))
    line = assert_clean_error(code, err, target, out=target, target_may_exist=where != "inside-input")
    assert any(str(p) in line for p in (post, base, new_base)), line
    assert snapshot(post.parent) == before


def test_nonempty_output_needs_overwrite(triple, out, cli):
    post, base, new_base = triple
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli(*apply_args(post, base, new_base, out))
    assert_clean_error(code, err, out, "--overwrite", out=out, target_may_exist=True)
    assert snapshot(out) == {"keep.txt": b"mine"}

    code, stdout, err = cli(*apply_args(post, base, new_base, out, "--overwrite"))
    assert_success(code, stdout, err, out)
    assert not (out / "keep.txt").exists()
    assert not list(out.parent.glob(f".{out.name}.pdelta-old-*"))


def test_failed_overwrite_keeps_old_output(triple, out, cli):
    post, base, new_base = triple
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    poke(post, LAYER, math.nan)
    code, _, err = cli(*apply_args(post, base, new_base, out, "--overwrite"))
    assert_clean_error(code, err, LAYER, out=out, target_may_exist=True)
    assert snapshot(out) == {"keep.txt": b"mine"}


# -- 11: pickled checkpoints ----------------------------------------------------------------------
def test_pickle_refused_unless_allowed(triple, out, tmp_path, cli):
    post, base, new_base = triple
    pickled = tmp_path / "in" / "post_bin"
    pickled.mkdir()
    for f in post.iterdir():
        if f.suffix != ".safetensors" and f.name != INDEX_NAME:
            shutil.copy(f, pickled / f.name)
    torch.save(load_state(post), pickled / "pytorch_model.bin")

    code, _, err = cli(*apply_args(pickled, base, new_base, out))
    assert_clean_error(code, err, pickled, "--allow-pickle", out=out)

    code, stdout, err = cli(*apply_args(pickled, base, new_base, out, "--allow-pickle"))
    assert_success(code, stdout, err, out)
    reference = tmp_path / "reference"
    assert_success(*cli(*apply_args(post, base, new_base, reference)), reference)
    got, want = load_state(out), load_state(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


# -- 12-13: failures while writing --------------------------------------------------------------
def test_file_size_limit_mid_write(triple, out):
    post, base, new_base = triple
    limit = 8 * 1024  # below the output's single shard, above every header

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code, _, err = run_subprocess([sys.executable, "-m", "paramdelta.cli.main", *apply_args(post, base, new_base, out)],
                                  preexec_fn=small_files)
    assert_clean_error(code, err, out, out=out)


def test_disk_full_mid_write(triple, out):
    post, base, new_base = triple
    patch = """
        import builtins, errno, os
        budget = [4096]
        real_open = builtins.open

        class FillingDisk:
            def __init__(self, f):
                self._f = f
            def write(self, data):
                n = memoryview(data).nbytes
                if n > budget[0]:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                budget[0] -= n
                return self._f.write(data)
            def __getattr__(self, name):
                return getattr(self._f, name)

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return FillingDisk(f) if ".pdelta-tmp-" in str(file) and "w" in mode else f

        builtins.open = open_
    """
    code, _, err = run_subprocess([sys.executable, "-c", script(patch), *apply_args(post, base, new_base, out)])
    line = assert_clean_error(code, err, out, out=out)
    assert os.strerror(28) in line  # ENOSPC


def test_killed_mid_write_then_stale_temp_cleaned(triple, out, cli):
    post, base, new_base = triple
    patch = """
        import os, signal
        from paramdelta.writer import CheckpointWriter
        real_write, calls = CheckpointWriter.write, [0]

        def write(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] > 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(self, *args, **kwargs)

        CheckpointWriter.write = write
    """
    code, _, _ = run_subprocess([sys.executable, "-c", script(patch), *apply_args(post, base, new_base, out)])
    assert code == -signal.SIGKILL
    assert not out.exists()
    stale = temps(out)
    assert stale, "a killed run leaves its temp folder (nothing could clean it)"
    alive = out.parent / f".{out.name}.pdelta-tmp-{os.getpid()}-abcdef"  # a run still in progress
    alive.mkdir()

    code, stdout, err = cli(*apply_args(post, base, new_base, out))
    assert code == 0, err
    assert (out / "config.json").is_file()
    assert temps(out) == [alive], "stale temps of dead pids are removed; a live pid's temp is kept"


# -- 14-15: pre-flight ----------------------------------------------------------------------------
def test_all_preflight_problems_at_once(triple, out, cli):
    post, base, new_base = triple
    edit_tensor(post, LAYER, None)
    edit_tensor(base, OTHER, torch.zeros(16, 32, dtype=torch.bfloat16))
    code, _, err = cli(*apply_args(post, base, new_base, out))
    line = assert_clean_error(code, err, LAYER, post, OTHER, base, out=out)
    assert "2 problems" in line


def test_preflight_reads_no_weight(triple, out, monkeypatch):
    import paramdelta
    from paramdelta.checkpoint import Checkpoint
    from paramdelta.errors import PreflightError

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read before pre-flight finished")

    for method in ("read", "read_into", "_map"):
        if hasattr(Checkpoint, method):
            monkeypatch.setattr(Checkpoint, method, no_reads)
    post, base, new_base = triple
    edit_tensor(post, LAYER, None)
    with pytest.raises(PreflightError, match=LAYER):
        paramdelta.apply(out, post=post, base=base, new_base=new_base, progress=False)
    assert not out.exists() and not temps(out)


# -- 16: options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, named", [
    (["--dtype", "float8"], "--dtype"),
    (["--new-token-policy", "guess"], "--new-token-policy"),
    (["--post", "{post}"], "--post"),  # two --post, one --base
    (["--alpha", "0.5", "--alpha", "0.5"], "--alpha"),  # two alphas for one term
])
def test_option_errors(triple, out, cli, extra, named):
    post, base, new_base = triple
    extra = [a.format(post=post) for a in extra]
    code, _, err = cli(*apply_args(post, base, new_base, out, *extra))
    assert_clean_error(code, err, named, out=out)


def test_real_process_exit_code(triple, out):
    """The installed entry point behaves like main(): exit 2, one `error:` line, no traceback."""
    post, base, new_base = triple
    edit_tensor(post, LAYER, None)
    code, stdout, err = run_subprocess([sys.executable, "-m", "paramdelta.cli.main",
                                        *apply_args(post, base, new_base, out)])
    assert_clean_error(code, err, LAYER, out=out)
    assert stdout == ""


def test_work_folder_replaces_only_its_own_commands_output(tmp_path):
    from paramdelta.errors import OptionError
    from paramdelta.writer import fresh_work_folder

    out = fresh_work_folder(tmp_path / "report", "pdelta demo")
    (out / "results.json").write_text("{}")
    assert list(fresh_work_folder(out, "pdelta demo").iterdir()) == [out / ".pdelta-work"]  # replaced, emptied
    (out / "results.json").write_text("{}")
    with pytest.raises(OptionError, match="was not written by `pdelta rsparse quality --toy-world`"):
        fresh_work_folder(out, "pdelta rsparse quality --toy-world")  # another command's folder
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OptionError, match="was not written by"):
        fresh_work_folder(mine, "pdelta demo")
    assert (mine / "notes.txt").read_text() == "keep me" and (out / "results.json").exists()
