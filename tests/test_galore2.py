"""GaLore 2: projection math, AdamW equivalence at full rank, refresh period and side, tensor-only state,
exact resume, per-layer and 8-bit modes, owner-rank SVD over 2 gloo processes, the `galore2` transform
(CLI and recipe), `pdelta train --optimizer galore2` and option errors before training.

Models are the 2-layer Llama of tests/tinymodels.py (hidden 32, MLP 64, 2 KV heads: k/v are 16×32).
"""

from __future__ import annotations

import io
import json
import socket
import textwrap
from pathlib import Path

import pytest
import torch
from pdelta_galore2.optimizer import GaLore2, galore2
from pdelta_galore2.projection import (
    captured_energy,
    choose_side,
    exact_svd,
    project,
    project_back,
    projector,
    randomized_svd,
)
from tinymodels import load_state, make_checkpoint, tiny_config, train_tiny_tokenizer
from transformers import AutoModelForCausalLM

from paramdelta import optim
from paramdelta.checkpoint import Checkpoint
from paramdelta.errors import OptionError
from paramdelta.optim import state_bytes
from paramdelta.provenance import read_provenance

SENTENCES = ["the quick brown fox jumps over the lazy dog.", "a model learns from text.",
             "the river runs to the sea.", "how many days are in a week? seven."]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama"))


def run_steps(model, opt, start: int, stop: int) -> list[float]:
    """Steps start..stop-1 on seeded random token rows; the loss of each step."""
    losses = []
    for i in range(start, stop):
        ids = torch.randint(4, 96, (4, 16), generator=torch.Generator().manual_seed(100 + i))
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def low_rank_plus_noise(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    return u @ (torch.linspace(10, 5, r)[:, None] * v) + 0.01 * torch.randn(m, n, generator=g)


# -- projection math -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_projection_against_direct_reference(shape):
    m, n = shape
    g = low_rank_plus_noise(m, n, 3)
    side = choose_side(shape)
    assert side == ("left" if m >= n else "right")  # moments along the smaller side
    p = projector(g, 3, side, generator=torch.Generator().manual_seed(0))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    ref = u[:, :3] if side == "left" else vh[:3].T
    assert p.shape == ((m, 3) if side == "left" else (n, 3))
    torch.testing.assert_close(p.T @ p, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(p @ p.T, ref @ ref.T, atol=1e-4, rtol=0)  # the same subspace
    low = project(g, p, side)
    want = torch.tensor([[sum(p[k, a] * g[k, j] for k in range(m)) for j in range(n)] for a in range(3)]) \
        if side == "left" else torch.tensor([[sum(g[i, k] * p[k, a] for k in range(n)) for a in range(3)]
                                             for i in range(m)])
    torch.testing.assert_close(low, want, atol=1e-5, rtol=1e-5)
    back = project_back(low, p, side)
    torch.testing.assert_close(back, (ref @ ref.T @ g) if side == "left" else (g @ ref @ ref.T), atol=1e-3, rtol=0)


def test_randomized_svd_keeps_the_energy_of_exact():
    g = low_rank_plus_noise(64, 96, 12, seed=1)
    u, s = randomized_svd(g, 8, generator=torch.Generator().manual_seed(0))
    ue, se = exact_svd(g, 8)
    torch.testing.assert_close(s, se, rtol=1e-3, atol=0)
    assert captured_energy(g, u, "left") >= 0.999 * captured_energy(g, ue, "left")


# -- the optimizer ---------------------------------------------------------------------------------------
def test_full_rank_scale_one_equals_adamw():
    a, b = tiny_llama(), tiny_llama()
    ref = optim.adamw(a, lr=1e-2, weight_decay=0.1)
    opt = galore2(b, lr=1e-2, weight_decay=0.1, rank=32, scale=1.0, targets="q,o,gate,up,down")
    assert opt.svd_calls == 0
    run_steps(a, ref, 0, 3)
    run_steps(b, opt, 0, 3)
    assert opt.svd_calls == 0 and all(opt.projector_of(p) is None for p in b.parameters())
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_low_rank_step_matches_reference_math(shape):
    """Two steps on one matrix, recomputed by hand from the projector the optimizer chose."""
    m_rows, n_cols = shape
    w = torch.nn.Parameter(torch.randn(shape))
    opt = GaLore2([{"params": [w], "rank": 3}], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, scale=0.5,
                  update_period=10)
    left = opt.side_of(w) == "left"
    assert left == (m_rows > n_cols)
    grads = [low_rank_plus_noise(*shape, 3, seed=s) for s in (1, 2)]
    m = v = torch.zeros((3, n_cols) if left else (m_rows, 3))
    ref = w.detach().clone()
    for t, g in enumerate(grads, 1):
        w.grad = g.clone()
        opt.step()
        p = opt.projector_of(w)
        r = p.T @ g if left else g @ p
        m, v = 0.9 * m + 0.1 * r, 0.99 * v + 0.01 * r * r
        n = (m / (1 - 0.9**t)) / ((v / (1 - 0.99**t)).sqrt() + 1e-8)
        ref = ref * (1 - 0.1 * 0.05) - 0.1 * 0.5 * (p @ n if left else n @ p.T)
        torch.testing.assert_close(w.detach(), ref, atol=1e-5, rtol=1e-5)
    u, _, vh = torch.linalg.svd(grads[0])
    top = u[:, :3] if left else vh[:3].T
    torch.testing.assert_close(p @ p.T, top @ top.T, atol=1e-3, rtol=0)  # refreshed at step 1 only: G1's subspace


def test_refresh_period_and_side():
    model = tiny_llama()
    opt = galore2(model, lr=1e-3, weight_decay=0.0, rank=4, update_period=3)
    q = model.model.layers[0].self_attn.q_proj.weight  # 32×32: left
    gate = model.model.layers[0].mlp.gate_proj.weight  # 64×32: left, moments 4×32
    down = model.model.layers[0].mlp.down_proj.weight  # 32×64: right, moments 32×4
    changed = []
    last = None
    for i in range(8):
        run_steps(model, opt, i, i + 1)
        p = opt.projector_of(q).clone()
        changed.append(last is None or not torch.equal(p, last))
        last = p
    assert changed == [True, False, False, True, False, False, True, False]  # steps 1, 4, 7
    assert opt.svd_calls == 3 * 14  # 7 matrices × 2 layers, three refreshes
    assert opt.side_of(q) == "left" and opt.state[q]["exp_avg"].shape == (4, 32)
    assert opt.side_of(gate) == "left" and opt.state[gate]["exp_avg"].shape == (4, 32)
    assert opt.state[gate]["proj"].shape == (64, 4)
    assert opt.side_of(down) == "right" and opt.state[down]["exp_avg"].shape == (32, 4)
    assert opt.state[down]["proj"].shape == (64, 4)
    embed = model.model.embed_tokens.weight
    assert opt.state[embed]["exp_avg"].shape == embed.shape  # AdamW for embeddings
    assert choose_side((8, 4), sharded=True) == choose_side((4, 8), sharded=True) == "right"


def test_state_is_tensors_only_and_smaller_than_adamw():
    model = tiny_llama()
    opt = galore2(model, lr=1e-3, weight_decay=0.0, rank=4, proj_bits=8)
    run_steps(model, opt, 0, 2)
    sd = opt.state_dict()
    assert all(isinstance(v, torch.Tensor) for s in sd["state"].values() for v in s.values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert loaded["state"].keys() == sd["state"].keys()
    adam = tiny_llama()
    ref = optim.adamw(adam, lr=1e-3, weight_decay=0.0)
    run_steps(adam, ref, 0, 2)
    assert state_bytes(opt) < state_bytes(ref)
    fresh = galore2(tiny_llama(), lr=1e-3, weight_decay=0.0, rank=4, proj_bits=8)
    fresh.load_state_dict(loaded)
    q = fresh.param_groups[0]["params"][0]
    assert fresh.state[q]["proj_q"].dtype == torch.int8


@pytest.mark.parametrize("proj_bits", [32, 8])
def test_resume_gives_the_same_next_step(tmp_path, proj_bits):
    """Stop after 2 steps (update_period 2: step 3 refreshes the subspace), save, load, continue."""
    kw = dict(lr=1e-2, weight_decay=0.1, rank=4, update_period=2, proj_bits=proj_bits)
    a = tiny_llama()
    opt_a = galore2(a, **kw)
    straight = run_steps(a, opt_a, 0, 4)
    b = tiny_llama()
    opt_b = galore2(b, **kw)
    run_steps(b, opt_b, 0, 2)
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    c = tiny_llama(seed=7)  # different init, overwritten by the load
    c.load_state_dict(saved["model"])
    opt_c = galore2(c, **kw)
    opt_c.load_state_dict(saved["opt"])
    resumed = run_steps(c, opt_c, 2, 4)
    assert resumed == straight[2:]
    for x, y in zip(a.parameters(), c.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("per_layer", [False, True])
def test_dcp_round_trip_resumes_exactly(tmp_path, per_layer):
    """torch.distributed.checkpoint (single process): a fresh optimizer's template, load, continue."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    kw = dict(lr=1e-2, weight_decay=0.1, rank=4, update_period=2, proj_bits=8, per_layer=per_layer)
    a = tiny_llama()
    straight = run_steps(a, galore2(a, **kw), 0, 4)
    b = tiny_llama()
    opt_b = galore2(b, **kw)
    run_steps(b, opt_b, 0, 2)
    model_sd, opt_sd = get_state_dict(b, opt_b)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=tmp_path / "dcp")
    c = tiny_llama(seed=7)
    opt_c = galore2(c, **kw)
    model_sd, opt_sd = get_state_dict(c, opt_c)  # torch fills the template with one zero-gradient step
    state = {"model": model_sd, "optim": opt_sd}
    dcp.load(state, checkpoint_id=tmp_path / "dcp")
    set_state_dict(c, opt_c, model_state_dict=state["model"], optim_state_dict=state["optim"])
    q = c.model.layers[0].self_attn.q_proj.weight
    assert opt_c.state[q]["proj_q"].dtype == torch.int8 and int(opt_c.state[q]["step"]) == 2
    assert run_steps(c, opt_c, 2, 4) == straight[2:]
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_per_layer_equals_normal_step():
    a, b = tiny_llama(), tiny_llama()
    opt_a = galore2(a, lr=1e-2, weight_decay=0.1, rank=4, update_period=2)
    opt_b = galore2(b, lr=1e-2, weight_decay=0.1, rank=4, update_period=2, per_layer=True)
    assert opt_b.updates_in_backward and not opt_a.updates_in_backward
    assert run_steps(a, opt_a, 0, 3) == pytest.approx(run_steps(b, opt_b, 0, 3), rel=1e-6)
    assert all(p.grad is None for p in b.parameters())  # freed inside backward
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)


def test_8bit_projector_close_to_fp32():
    a, b = tiny_llama(), tiny_llama()
    opt_a = galore2(a, lr=1e-2, weight_decay=0.0, rank=4)
    opt_b = galore2(b, lr=1e-2, weight_decay=0.0, rank=4, proj_bits=8)
    run_steps(a, opt_a, 0, 3)
    run_steps(b, opt_b, 0, 3)
    q_a, q_b = a.model.layers[1].self_attn.q_proj.weight, b.model.layers[1].self_attn.q_proj.weight
    err = (opt_b.projector_of(q_b) - opt_a.projector_of(q_a)).abs().max()
    assert 0 < err <= opt_a.projector_of(q_a).abs().max() / 127
    assert opt_b.state[q_b]["proj_q"].dtype == torch.int8 and "proj" not in opt_b.state[q_b]
    assert state_bytes(opt_b) < state_bytes(opt_a)
    torch.testing.assert_close(q_b, q_a, atol=1e-3, rtol=0)


@pytest.mark.parametrize("options, want", [
    ({"rank": 0}, r"rank must be an integer ≥ 1, got 0"),
    ({"rank": -3}, r"rank must be an integer ≥ 1"),
    ({"rank": 17}, r"rank 17 is larger than model\.layers\.0\.self_attn\.k_proj\.weight \(16×32\)"),
    ({"targets": "q,upp"}, r"unknown target 'upp'.*did you mean 'up'"),
    ({"targets": ["gtae"]}, r"unknown target 'gtae'.*did you mean 'gate'"),
    ({"proj_bits": 4}, "proj_bits must be 8 or 32"),
    ({"update_period": 0}, "update_period must be an integer"),
])
def test_bad_options_raise_before_any_step(options, want):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(OptionError, match=want):
        galore2(model, lr=1e-3, weight_decay=0.0, **options)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


# -- owner-rank SVD over two gloo processes ----------------------------------------------------------------
def _owner_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = _owner_problem()
        params = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in full["weights"]]
        opt = GaLore2([{"params": params, "rank": 3}], lr=0.1, weight_decay=0.01, update_period=2, seed=5)
        for step_grads in full["grads"]:
            for p, g in zip(params, step_grads):
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            opt.step()
        weights = [p.full_tensor() for p in params]
        local_rows = [opt.state[p]["exp_avg"].to_local().shape[0] for p in params]
        calls = torch.tensor([opt.svd_calls])
        all_calls = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(all_calls, calls)
        if rank == 0:
            torch.save({"weights": weights, "calls": [int(c) for c in all_calls], "rows": local_rows,
                        "sd": opt.state_dict()}, out)
    finally:
        dist.destroy_process_group()


def _owner_problem() -> dict:
    shapes = [(9, 12), (12, 6), (7, 10)]  # uneven dim-0 shards; one m > n
    weights = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    grads = [[low_rank_plus_noise(*s, 3, seed=10 * t + i) for i, s in enumerate(shapes)] for t in range(3)]
    return {"weights": weights, "grads": grads}


def test_owner_rank_svd_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "result.pt"
    mp.spawn(_owner_worker, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    # 3 matrices refreshed at steps 1 and 3: owners 0, 1, 0 -> rank 0 ran 4 SVDs, rank 1 ran 2, never both
    assert got["calls"] == [4, 2]
    assert got["rows"] == [5, 6, 4]  # rank 0's share of the moments' rows: sharded like the parameters
    problem = _owner_problem()
    params = [torch.nn.Parameter(w.clone()) for w in problem["weights"]]
    single = GaLore2([{"params": params, "rank": 3}], lr=0.1, weight_decay=0.01, update_period=2, seed=5,
                     side="right")
    for step_grads in problem["grads"]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        single.step()
    for w, p in zip(got["weights"], params):
        torch.testing.assert_close(w, p.detach(), atol=1e-5, rtol=1e-5)


# -- transform, CLI, recipe, training loop -----------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("galore2")
    tok = train_tiny_tokenizer(root / "tok")
    (root / "text.txt").write_text("\n".join(SENTENCES[i % len(SENTENCES)] for i in range(24)) + "\n")
    return {"root": root, "text": root / "text.txt", "llama": make_checkpoint(root / "llama", "llama", tokenizer=tok),
            "bf16": make_checkpoint(root / "bf16", "llama", tokenizer=tok, dtype=torch.bfloat16)}


def test_apply_cli_end_to_end(world, tmp_path, cli):
    out = tmp_path / "more"
    code, stdout, err = cli("galore2", "apply", world["bf16"], "--out", out, "--data", world["text"], "--steps", "6",
                            "--rank", "4", "--update-period", "3", "--lr", "0.01", "--seq-len", "32",
                            "--format", "json", "--no-progress")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["transform"] == "galore2" and report["options"]["rank"] == 4
    before, after = load_state(world["bf16"]), load_state(out)
    assert before.keys() == after.keys()
    assert all(after[k].dtype == torch.bfloat16 and after[k].shape == before[k].shape for k in before)
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["paramdelta"]["transform"] == "galore2"
    assert model.config.num_hidden_layers == 2


def test_apply_errors_before_training(world, tmp_path, cli, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started before the error was found")

    monkeypatch.setattr("paramdelta.train.train", no_training)
    for args, want in [(["--rank", "40"], "rank 40 is larger than model.layers.0.self_attn.k_proj.weight (16×32)"),
                       (["--rank", "0"], "rank must be an integer"),
                       (["--targets", "q,ffn"], "unknown target 'ffn'"),
                       (["--rnak", "4"], "did you mean '--rank'")]:
        code, _, err = cli("galore2", "apply", world["llama"], "--out", tmp_path / "x", "--data", world["text"], *args)
        assert code == 2 and want in err, err
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun every rank would write OUT: refused
    code, _, err = cli("galore2", "apply", world["llama"], "--out", tmp_path / "x", "--data", world["text"])
    assert code == 2 and "not under torchrun" in err, err
    assert not (tmp_path / "x").exists()


def test_recipe_step_and_pdelta_train(world, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        version: 1
        name: galore2
        steps:
          - {{id: more, op: galore2, in: "{world['llama']}", data: "{world['text']}", steps: 4, rank: 4,
              update_period: 2, seq_len: 32, per_layer: true}}
        """))
    code, out, err = cli("run", recipe, "--run-dir", tmp_path / "runs", "--no-progress", "--format", "json")
    assert code == 0, err
    assert [s["status"] for s in json.loads(out)["steps"]] == ["ran"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "more")
    code, out, err = cli("train", "--model", world["llama"], "--data", world["text"], "--out", tmp_path / "t",
                         "--steps", "4", "--seq-len", "32", "--optimizer", "galore2", "--opt", "rank=4",
                         "--opt", "update_period=2", "--no-progress", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["final_loss"] < report["first_loss"]
    adam = json.loads(cli("train", "--model", world["llama"], "--data", world["text"], "--out", tmp_path / "a",
                          "--steps", "4", "--seq-len", "32", "--no-progress", "--format", "json")[1])
    assert report["optimizer_state_bytes"] < adam["optimizer_state_bytes"]
    code, _, err = cli("train", "--model", world["llama"], "--data", world["text"], "--out", tmp_path / "u",
                       "--steps", "4", "--optimizer", "galore2", "--opt", "rnak=4")
    assert code == 2 and "did you mean 'rank'" in err, err


def test_pdelta_train_flags_and_errors_before_loading(world, tmp_path, cli, monkeypatch):
    """`--rank 4` is forwarded to the factory; a bad rank is caught from the headers, before the model loads."""
    code, out, err = cli("train", "--model", world["llama"], "--data", world["text"], "--out", tmp_path / "t",
                         "--steps", "3", "--seq-len", "32", "--optimizer", "galore2", "--rank", "4",
                         "--update-period", "2", "--no-progress", "--format", "json")
    assert code == 0, err
    options = read_provenance(Checkpoint.open(tmp_path / "t"))["options"]
    assert options["optimizer"] == "galore2" and options["optimizer_options"] == {"rank": 4, "update_period": 2}

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr("paramdelta.plugins.load_model", no_loading)
    for args, want in [(["--rank", "40"], "rank 40 is larger than model.layers.0.self_attn.k_proj.weight (16×32)"),
                       (["--opt", "targets=q,mlp"], "unknown target 'mlp'"), (["--rank", "0"], "rank must be")]:
        code, _, err = cli("train", "--model", world["llama"], "--data", world["text"], "--out", tmp_path / "x",
                           "--optimizer", "galore2", *args)
        assert code == 2 and want in err, err
