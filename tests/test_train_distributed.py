"""Training in several processes (torchrun + FSDP2 on gloo), DCP resume, optimizer options from the CLI.

Two-process runs are real: `torchrun --standalone --nproc-per-node 2 -m paramdelta.cli.main train ...`
in a subprocess with OMP_NUM_THREADS=1, on the 2-layer models of tests/tinymodels.py for 6 steps.
A split batch sums the same token losses in another order, so losses agree with one process to
float rounding (rel 1e-5) and weights to 1e-4 (AdamW's normalised step magnifies last-bit
differences where the second moment is tiny); a resumed single-process run agrees bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tinymodels import load_state, make_checkpoint, train_tiny_tokenizer
from transformers import AutoModelForCausalLM

from paramdelta import optim
from paramdelta.checkpoint import Checkpoint
from paramdelta.errors import PdeltaError
from paramdelta.provenance import read_provenance
from paramdelta.train import train

SENTENCES = ["the quick brown fox jumps over the lazy dog.", "numbers such as one, two, three and four are easy.",
             "the river runs to the sea.", "a model learns from text.", "how many days are in a week? seven."]
# batch 5 over 2 processes splits 3 + 2 rows; 2 micro-batches per step exercise gradient accumulation
RUN = dict(steps=6, lr=1e-2, batch_size=5, grad_accum=2, seq_len=64, weight_decay=0.1, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    tok = train_tiny_tokenizer(root / "tok")
    (root / "text.txt").write_text("\n".join(SENTENCES[i % len(SENTENCES)] for i in range(40)) + "\n")
    return {"root": root, "text": root / "text.txt", "llama": make_checkpoint(root / "llama", "llama", tokenizer=tok),
            "gemma": make_checkpoint(root / "gemma", "gemma", tokenizer=tok)}


def flags(**kw) -> list[str]:
    """train() keywords as `pdelta train` flags."""
    return [a for k, v in kw.items() if k != "progress" for a in (f"--{k.replace('_', '-')}", str(v))]


def torchrun(*args: str | Path, cwd: Path) -> dict:
    """`pdelta train ARGS` in 2 gloo processes; returns rank 0's JSON report (the only thing on stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PDELTA_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "paramdelta.cli.main", "train", *map(str, args), "--format", "json"]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # a second report (rank 1) would make this invalid JSON


@pytest.fixture(scope="module")
def two(world):
    """One 2-process run of the gemma (tied embeddings) that also saves DCP state at steps 3 and 6."""
    root = world["root"]
    report = torchrun("--model", world["gemma"], "--data", world["text"], "--out", root / "two",
                      "--save-state-every", "3", *flags(**RUN), cwd=root)
    return root / "two", report


def test_two_processes_match_one_and_rank0_writes_once(world, two, tmp_path):
    out, report = two
    one = train(world["gemma"], world["text"], tmp_path / "one", **RUN)
    assert report["rank"] == 0 and report["tokens"] == one.tokens
    assert report["losses"] == pytest.approx(one.losses, rel=1e-5)
    a, b = load_state(tmp_path / "one"), load_state(out)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    model = AutoModelForCausalLM.from_pretrained(out)  # a plain transformers checkpoint, not FSDP's
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GemmaForCausalLM"]
    assert all(torch.equal(t, b[n]) for n, t in model.state_dict().items() if n in b)
    # FSDP2's full state dict gives the tied lm_head its own tensor: it must still be left out
    assert "lm_head.weight" not in b and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prov = read_provenance(Checkpoint.open(out))
    assert prov["processes"] == 2 and prov["steps"] == 6 and prov["final_loss"] == report["final_loss"]
    siblings = sorted(p.name for p in out.parent.iterdir() if p.name.startswith("two"))
    assert siblings == ["two", "two.state"]  # one output, no temp folder left by a second writer
    assert sorted(p.name for p in (out.parent / "two.state").iterdir()) == ["step-000003", "step-000006"]
    shards = sorted(p.name for p in (out.parent / "two.state" / "step-000003").glob("*.distcp"))
    assert len(shards) == 2  # each rank wrote its own shard of model and optimizer


def test_distributed_state_resumes_in_one_process(world, two, tmp_path):
    """DCP reshards: the 2-process state at step 3 continues in one process to (nearly) the same end."""
    out, report = two
    resumed = train(world["gemma"], world["text"], tmp_path / "r", resume=out.parent / "two.state" / "step-000003",
                    **RUN)
    assert resumed.losses[:3] == report["losses"][:3]  # carried over from the saved state
    assert resumed.losses[3:] == pytest.approx(report["losses"][3:], rel=1e-5)
    a, b = load_state(out), load_state(tmp_path / "r")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


# -- resume, one process: bit for bit ------------------------------------------------------------------
def test_resume_gives_the_same_run_bit_for_bit(world, tmp_path):
    full = train(world["llama"], world["text"], tmp_path / "full", save_state_every=3, **RUN)
    state = tmp_path / "full.state"
    info = json.loads((state / "step-000003" / "train_state.json").read_text())
    assert info["step"] == 3 and info["losses"] == full.losses[:3]
    resumed = train(world["llama"], world["text"], tmp_path / "resumed", resume=state / "step-000003", **RUN)
    assert resumed.losses == full.losses and resumed.tokens == full.tokens
    a, b = load_state(tmp_path / "full"), load_state(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the state dir alone resumes its latest complete step (6 of 6: nothing left but writing), not a
    # half-renamed temp folder from a crash
    (state / "step-000009.tmp").mkdir()
    (state / "step-000009.tmp" / "train_state.json").write_text(json.dumps({**info, "step": 9}))
    last = train(world["llama"], world["text"], tmp_path / "last", resume=state, **RUN)
    assert last.losses == full.losses and all(torch.equal(a[k], v) for k, v in load_state(tmp_path / "last").items())
    assert read_provenance(Checkpoint.open(tmp_path / "last"))["resumed_at_step"] == 6


def test_resume_state_holds_tensors_only(world, tmp_path):
    """The DCP step folder loads back into a fresh model and optimizer, and its optimizer state is tensors."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from paramdelta import distributed

    train(world["llama"], world["text"], tmp_path / "o", save_state_every=6, **RUN)
    net = AutoModelForCausalLM.from_pretrained(world["llama"])
    opt = optim.build_optimizer("adamw", net, lr=1e-2, weight_decay=0.1)
    distributed.load_state(tmp_path / "o.state" / "step-000006", net, opt, distributed.Dist(0, 1, "cpu"))
    written = load_state(tmp_path / "o")
    assert all(torch.equal(t, written[n]) for n, t in net.state_dict().items())
    values = [v for s in get_optimizer_state_dict(net, opt)["state"].values() for v in s.values()]
    assert values and all(isinstance(v, torch.Tensor) for v in values)
    assert {float(v) for s in opt.state.values() for k, v in s.items() if k == "step"} == {6.0}


@pytest.mark.parametrize("case", ["changed", "nothing", "inside_out", "small_batch"])
def test_resume_and_state_errors_before_loading(world, tmp_path, monkeypatch, case):
    train(world["llama"], world["text"], tmp_path / "a", save_state_every=2, **{**RUN, "steps": 2})

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr("paramdelta.plugins.load_model", no_loading)
    kw = dict(RUN)
    if case == "changed":
        kw.update(steps=2, lr=2e-2, resume=tmp_path / "a.state")
        want = r"differs from the saved one in lr \(saved 0.01\)"
    elif case == "nothing":
        kw.update(resume=tmp_path / "a")  # an output folder, not a state folder
        want = "no training state in"
    elif case == "inside_out":
        kw.update(save_state_every=1, state_dir=tmp_path / "b" / "state")
        want = "is inside the output folder"
    else:
        monkeypatch.setenv("WORLD_SIZE", "8")
        want = "--batch-size 5 is smaller than the 8 processes"
    with pytest.raises(PdeltaError, match=want) as err:
        train(world["llama"], world["text"], tmp_path / "b", **kw)
    assert "\n" not in str(err.value) and err.value.hint


# -- optimizer options from the command line, progress ---------------------------------------------------
@pytest.fixture
def spy(monkeypatch):
    """A registered-looking optimizer `spy` that records its options and builds adamw."""
    seen: dict = {}

    def factory(model, *, lr, weight_decay, rank=1, update_period=10, scale=1.0, targets="all"):
        seen.update(rank=rank, update_period=update_period, scale=scale, targets=targets)
        return optim.adamw(model, lr=lr, weight_decay=weight_decay)

    real = optim.get_optimizer
    monkeypatch.setattr(optim, "get_optimizer", lambda name: factory if name == "spy" else real(name))
    return seen


def test_unknown_flags_reach_the_optimizer_factory(world, tmp_path, cli, spy):
    code, out, err = cli("train", "--model", world["llama"], "--data", world["text"], "--out", tmp_path / "o",
                         "--steps", "2", "--optimizer", "spy", "--rank", "128", "--update-period=200",
                         "--opt", "scale=0.5", "--targets", "q,k", "--no-progress", "--format", "json")
    assert code == 0, err
    assert spy == {"rank": 128, "update_period": 200, "scale": 0.5, "targets": "q,k"}
    prov = read_provenance(Checkpoint.open(tmp_path / "o"))
    assert prov["options"]["optimizer_options"] == {"scale": 0.5, "rank": 128, "update_period": 200, "targets": "q,k"}


@pytest.mark.parametrize(("args", "want"), [
    (["--update-perod", "3"], "optimizer 'spy' has no option 'update_perod' (fix: did you mean 'update_period'?)"),
    (["--stesp", "3"], "pdelta train has no option --stesp (fix: did you mean --steps?)"),
    (["--rank", "2", "--opt", "rank=3"], "optimizer option 'rank' is given twice"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_passthrough_flags_are_one_line(world, tmp_path, cli, spy, args, want):
    code, _, err = cli("train", "--model", world["llama"], "--data", world["text"], "--out", tmp_path / "o",
                       "--optimizer", "spy", *args, "--no-progress")
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert want in line and not spy


def test_progress_shows_loss_speed_and_optimizer_memory(world, tmp_path, monkeypatch):
    from contextlib import contextmanager

    posted: list[dict] = []

    class Bar:
        def update(self, n):
            pass

        def set_postfix(self, **kw):
            posted.append(kw)

    @contextmanager
    def fake_bar(*a, **k):
        yield Bar()

    monkeypatch.setattr("paramdelta.progress.progress_bar", fake_bar)
    report = train(world["llama"], world["text"], tmp_path / "o", **{**RUN, "steps": 2, "log_every": 1})
    assert [p["loss"] for p in posted] == [f"{x:.4f}" for x in report.losses]
    assert all(p["tok_s"] and p["opt_state"] == f"{report.optimizer_state_bytes / 2**20:,.1f}MiB" for p in posted)


# -- GaLore 2 under FSDP2 ------------------------------------------------------------------------------------------
def test_galore2_in_two_processes(world, tmp_path):
    """The GaLore 2 plugin's optimizer on sharded parameters: the same run as in one process, to tolerance."""
    kw = {**RUN, "steps": 4}
    opts = {"rank": 4, "update_period": 2, "side": "right"}  # the side FSDP2 forces (moments stay sharded)
    report = torchrun("--model", world["llama"], "--data", world["text"], "--out", tmp_path / "g2",
                      "--optimizer", "galore2", *flags(**opts), *flags(**kw), cwd=tmp_path)
    one = train(world["llama"], world["text"], tmp_path / "g1", optimizer="galore2", optimizer_options=opts, **kw)
    assert report["losses"] == pytest.approx(one.losses, rel=1e-4)
    assert report["final_loss"] < report["first_loss"]
    a, b = load_state(tmp_path / "g1"), load_state(tmp_path / "g2")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    assert read_provenance(Checkpoint.open(tmp_path / "g2"))["options"]["optimizer"] == "galore2"
    AutoModelForCausalLM.from_pretrained(tmp_path / "g2")
