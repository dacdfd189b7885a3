"""R-Sparse plugin: exactness of the kernel and modules, calibration, the checkpoint round trip, eval, errors.

Checkpoints are tiny 2-layer Llama/Qwen2/Mistral models saved in several shards (tests/tinymodels.py);
random weights have flat spectra, so where a test needs a low-rank part it forces one with
`--search none --rho 0.5`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pdelta_rsparse
import pytest
import torch
import torch.nn.functional as F
from pdelta_rsparse import kernel, modules
from pdelta_rsparse.calibration import calibrate, calibration_tokens
from pdelta_rsparse.modules import RSparseLinear, set_mode, sparsify
from pdelta_rsparse.search import KEEP_ALL, KEEP_NONE, LayerSetting, budget
from pdelta_rsparse.transform import RSparseOptions, layer_names
from tinymodels import load_state, make_checkpoint, tiny_config, train_tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config

from paramdelta.checkpoint import Checkpoint
from paramdelta.errors import PdeltaError
from paramdelta.transform import run_transform

TOL = dict(atol=1e-5, rtol=1e-5)


# -- world --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rsparse")
    tok = train_tiny_tokenizer(root / "tokenizer")
    paths = {f: make_checkpoint(root / f, f, tokenizer=tok) for f in ("llama", "qwen2", "mistral")}
    torch.manual_seed(0)  # a wider llama, so kept-channel shares are not dominated by rounding
    wide = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=128, intermediate_size=256))
    wide.save_pretrained(root / "wide", max_shard_size="200KB")
    tok.save_pretrained(root / "wide")
    paths["wide"] = root / "wide"
    return paths


def dense(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def settings_of(out: Path) -> dict[str, LayerSetting]:
    section = json.loads((out / "config.json").read_text())["rsparse"]
    return {name: LayerSetting(**raw) for name, raw in section["layers"].items()}


def random_layer(m=48, n=40, rank=6, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g)
    lin = torch.nn.Linear(n, m, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


# -- exactness ----------------------------------------------------------------------------------------
def test_kernel_matches_masked_reference_on_random_inputs():
    g = torch.Generator().manual_seed(1)
    for m, n, r in [(48, 40, 0), (48, 40, 7), (40, 96, 12), (130, 64, 64)]:
        lin = random_layer(m, n, seed=r)
        parts = modules.factorize(lin.weight, r)
        args = (parts["weight_t"], parts.get("lr_u"), parts.get("lr_v"), parts["col_norm"])
        for shape in [(n,), (1, 1, n), (5, 1, n), (3, n)]:
            x = torch.randn(shape, generator=g)
            tau = float((x.abs() * parts["col_norm"]).median())  # about half the channels kept
            got = kernel.sparse_linear(x, *args, tau, lin.bias)
            want = kernel.masked_reference(x, *args, tau, lin.bias)
            assert got.shape == (*shape[:-1], m)
            torch.testing.assert_close(got, want, **TOL)
            # and the reference is the formula of DESIGN.md §7, written out from W's SVD
            keep = (x.abs() * lin.weight.norm(dim=0)) > tau
            u, s, vh = torch.linalg.svd(lin.weight.detach())
            w_r = (u[:, :r] * s[:r]) @ vh[:r]
            formula = F.linear(x * keep, lin.weight) + F.linear(x * ~keep, w_r) + lin.bias
            torch.testing.assert_close(got, formula.detach(), atol=1e-4, rtol=1e-4)


def test_zero_sparsity_is_dense():
    lin = random_layer()
    setting = LayerSetting(KEEP_ALL, 1.0, 0.0, 0, 40, 0.0)
    rs = RSparseLinear.from_linear(lin, setting, mode="sparse")
    x = torch.randn(3, 1, 40)
    torch.testing.assert_close(rs(x), lin(x).detach(), **TOL)  # the decode kernel
    torch.testing.assert_close(rs(torch.randn(2, 6, 40)).shape, torch.Size([2, 6, 48]))


def test_zero_sparsity_model_gives_dense_logits(world):
    model = dense(world["llama"])
    tok_ids = torch.randint(4, 96, (2, 9))
    want = model(tok_ids).logits
    layers = layer_names(model.config.to_dict(), RSparseOptions().targets)
    tokens, _ = calibration_tokens(_tokenizer(world["llama"]), None, samples=2, seq_len=16)
    found = calibrate(model, tokens, layers, sparsity=0.0)
    assert all(s.tau == KEEP_ALL and s.rank == 0 for s in found.values())
    set_mode(sparsify(model, found), "sparse")
    with torch.no_grad():
        torch.testing.assert_close(model(tok_ids).logits, want.detach(), **TOL)


def test_rho_zero_with_full_rank_is_dense():
    lin = random_layer(m=48, n=40)
    full = LayerSetting(KEEP_NONE, 0.0, 0.5, 40, 0, 0.0)  # keep no channel; rank min(m, n)
    rs = RSparseLinear.from_linear(lin, full, mode="sparse")
    for x in (torch.randn(1, 1, 40), torch.randn(2, 5, 40)):
        torch.testing.assert_close(rs(x), lin(x).detach(), atol=1e-4, rtol=1e-4)


def test_budget_formulas():
    assert budget(4096, 4096, sparsity=0.5, rho=0.5) == (1024, 512)
    assert budget(11008, 4096, sparsity=0.5, rho=1.0) == (2048, 0)
    assert budget(48, 40, sparsity=0.0, rho=1.0) == (40, 0)
    k, r = budget(4096, 11008, sparsity=0.7, rho=0.3)
    assert abs((k * 4096 + r * (4096 + 11008)) / (4096 * 11008) - 0.3) < 1e-3


# -- calibration ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("search", ["layerwise", "none"])
def test_calibration_hits_the_requested_sparsity(world, search):
    """On the calibration tokens, each layer keeps k channels on average (within 1% of n), and the model
    reads 1 − s of the targeted weight bytes (within 0.02; the budget formulas round down)."""
    model = dense(world["wide"])
    layers = layer_names(model.config.to_dict(), RSparseOptions().targets)
    tokens, _ = calibration_tokens(_tokenizer(world["wide"]), None, samples=8, seq_len=64)
    found = calibrate(model, tokens, layers, sparsity=0.5, search=search, rho=0.5)
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]))) for n in layers]
    with torch.no_grad():
        model(input_ids=tokens)
    for h in hooks:
        h.remove()
    read = total = 0
    for name in layers:
        w = model.get_submodule(name).weight.detach()
        m, n = w.shape
        kept = ((seen[name].abs() * w.norm(dim=0)) > found[name].tau).float().sum(1).mean().item()
        assert abs(kept - found[name].keep) <= 0.01 * n, (name, kept, found[name])
        read += kept * m + found[name].rank * (m + n)
        total += m * n
    assert abs(read / total - 0.5) <= 0.02
    if search == "layerwise":
        assert all(s.rel_err <= 1.0 for s in found.values())


def test_layerwise_search_beats_uniform_rho_on_low_rank_weights():
    """A layer whose W is nearly low rank gets ρ < 1 and less error than sparse-only."""
    from pdelta_rsparse.search import search_layer

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 4, generator=g) @ torch.randn(4, 64, generator=g) + 0.01 * torch.randn(64, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    errors: dict[float, float] = {}
    best = search_layer(x, w, w.norm(dim=0), sparsity=0.5, errors=errors)
    assert best.rho < 1.0 and best.rank > 0
    assert best.rel_err == min(errors.values()) < 0.5 * errors[1.0]


def test_calibration_file_and_builtin_note(world, tmp_path):
    tok = _tokenizer(world["llama"])
    f = tmp_path / "cal.jsonl"
    f.write_text('{"text": "the cat sleeps in the sun"}\n\n{"prompt": "how many days? ", "completion": "seven"}\n')
    ids, note = calibration_tokens(tok, f, samples=2, seq_len=8)
    assert ids.shape == (2, 8) and str(f) in note
    _, note = calibration_tokens(tok, None, samples=2, seq_len=8)
    assert "built-in" in note


# -- checkpoint round trip -----------------------------------------------------------------------------
@pytest.mark.parametrize("family,flags", [
    ("llama", ["--sparsity", "0.5"]),
    ("qwen2", ["--sparsity", "0.4", "--search", "none", "--rho", "0.5"]),  # biases and a low-rank part
    ("mistral", ["--sparsity", "0.7", "--targets", "q,v,down", "--samples", "4", "--seq-len", "32"]),
])
def test_apply_roundtrip_logits_equal_in_memory_reference(world, tmp_path, cli, family, flags):
    out = tmp_path / "out"
    code, stdout, err = cli("rsparse", "apply", world[family], "--out", out, *flags)
    assert code == 0, err
    assert "built-in generic text sample" in stdout
    settings = settings_of(out)
    state = load_state(out)
    for name, s in settings.items():
        assert f"{name}.weight" not in state
        m, n = state[f"{name}.weight_t"].shape[1], state[f"{name}.weight_t"].shape[0]
        assert state[f"{name}.col_norm"].shape == (n,)
        assert (f"{name}.lr_u" in state) == (s.rank > 0)
        if s.rank:
            assert state[f"{name}.lr_u"].shape == (m, s.rank) and state[f"{name}.lr_v"].shape == (s.rank, n)
    if family == "qwen2":
        assert any(s.rank > 0 for s in settings.values())
        assert "model.layers.0.self_attn.q_proj.bias" in state
    loaded = pdelta_rsparse.load_model(out, mode="sparse")
    reference = set_mode(sparsify(dense(world[family]), settings), "sparse")
    ids = torch.randint(4, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, atol=1e-6, rtol=1e-6)
        step = loaded(ids[:, :1]).logits  # one token per sequence: the decode kernel
        torch.testing.assert_close(step, reference(ids[:, :1]).logits, atol=1e-6, rtol=1e-6)


def test_transform_command_writes_the_same_checkpoint(world, tmp_path, cli):
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ["--sparsity", "0.5", "--samples", "4", "--seq-len", "32"]
    assert cli("rsparse", "apply", world["llama"], "--out", a, *flags)[0] == 0
    code, _, err = cli("transform", "rsparse", "--in", world["llama"], "--out", b, *flags)
    assert code == 0, err
    sa, sb = load_state(a), load_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((a / "config.json").read_text())["rsparse"] == json.loads((b / "config.json").read_text())[
        "rsparse"]


def test_prefill_stays_dense_and_decode_is_sparse(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_transform("rsparse", world["llama"], out, {"sparsity": 0.7, "samples": 4, "seq_len": 32}, progress=False)
    model = pdelta_rsparse.load_model(out)  # mode "auto"
    calls = []
    real = kernel.sparse_linear
    monkeypatch.setattr(modules, "sparse_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(4, 96, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(world["llama"])(ids).logits, **TOL)
        assert calls == []
        out_ids = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=3)
    assert out_ids.shape == (1, 13)
    assert len(calls) == 2 * 14  # two decode steps after the prefill, 14 sparse linears each


# -- end to end ----------------------------------------------------------------------------------------
def test_transform_then_eval_loads_through_the_plugin(world, tmp_path, cli, monkeypatch):
    out = tmp_path / "out"
    assert cli("rsparse", "apply", world["llama"], "--out", out, "--samples", "2", "--seq-len", "16")[0] == 0
    loads = []
    real = modules.load_model
    monkeypatch.setattr(modules, "load_model", lambda path, **k: loads.append(path) or real(path, **k))
    code, stdout, err = cli("eval", out, "--tasks", "pdelta_mc", "--limit", "4")
    assert code == 0, err
    assert loads == [str(out)]
    assert "pdelta_mc" in stdout and "acc" in stdout


def test_recipe_step_runs_the_transform(world, tmp_path, cli):
    recipe = tmp_path / "rs.yaml"
    recipe.write_text(
        "version: 1\nname: rs\nvars: {model: m}\nsteps:\n"
        "  - {id: sparse, op: rsparse, in: \"${model}\", sparsity: 0.5, samples: 2, seq_len: 16, targets: [q, down]}\n")
    code, _, err = cli("run", recipe, f"model={world['llama']}", "--run-dir", tmp_path / "runs")
    assert code == 0, err
    settings = settings_of(tmp_path / "runs" / "sparse")
    assert sorted({n.rsplit(".", 1)[1] for n in settings}) == ["down_proj", "q_proj"]
    assert isinstance(pdelta_rsparse.load_model(tmp_path / "runs" / "sparse").model.layers[1].mlp.down_proj,
                      RSparseLinear)


# -- errors before any tensor is read ------------------------------------------------------------------
@pytest.fixture
def no_reads(monkeypatch):
    def refuse(self, name, *a, **k):
        raise AssertionError(f"tensor {name} was read")

    monkeypatch.setattr(Checkpoint, "read", refuse)
    monkeypatch.setattr(Checkpoint, "read_into", refuse)


@pytest.mark.parametrize("flags,message", [
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    (["--targets", "q,gat"], "unknown target 'gat' (fix: did you mean 'gate'?"),
    (["--search", "evolution"], "must be one of layerwise, none"),
    (["--rho", "1.5"], "--rho must be in [0, 1]"),
    (["--sparsty", "0.5"], "did you mean '--sparsity'"),
    (["--calibration", "missing.txt"], "calibration file missing.txt does not exist"),
])
def test_bad_options_fail_before_reading(world, tmp_path, cli, no_reads, flags, message):
    code, _, err = cli("rsparse", "apply", world["llama"], "--out", tmp_path / "out", *flags)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_unsupported_architecture_fails_before_reading(tmp_path, cli, no_reads):
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=96))
    gpt2.save_pretrained(tmp_path / "gpt2")
    code, _, err = cli("transform", "rsparse", "--in", tmp_path / "gpt2", "--out", tmp_path / "out")
    assert code == 2 and "'gpt2'" in err and "llama, mistral, qwen2" in err, err


def test_options_validate_in_recipes_and_python():
    with pytest.raises(PdeltaError, match="unknown target"):
        RSparseOptions(targets=("q", "x_proj"))
    assert RSparseOptions(targets=("down_proj", "q")).targets == ("q", "down")


def test_loader_rejects_a_plain_checkpoint(world, tmp_path):
    shutil.copytree(world["llama"], tmp_path / "plain")
    with pytest.raises(PdeltaError, match="no `rsparse.layers` section"):
        pdelta_rsparse.load_model(tmp_path / "plain")


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# -- quality report ------------------------------------------------------------------------------------
def test_documents_are_tokenised_as_training_does(world, tmp_path):
    """Calibration lays documents end to end, each ended by eos (no newline tokens between them);
    held-out windows start at a document's start and are right-padded."""
    from pdelta_rsparse.quality import heldout_windows

    tok = _tokenizer(world["llama"])
    docs = ["the cat sleeps in the sun", "a dog runs to the river and back again and again and again"]
    f = tmp_path / "docs.txt"
    f.write_text("\n".join(docs) + "\n\n")
    stream = [t for d in docs for t in tok(d)["input_ids"] + [tok.eos_token_id]]
    ids, _ = calibration_tokens(tok, f, samples=2, seq_len=len(stream))
    assert ids[0].tolist() == stream == ids[1].tolist()
    windows, mask = heldout_windows(tok, f, seq_len=8, max_tokens=1000)
    first, second = (tok(d)["input_ids"] + [tok.eos_token_id] for d in docs)
    pieces = [first[i:i + 8] for i in range(0, len(first), 8)] + [second[i:i + 8] for i in range(0, len(second), 8)]
    pieces = [p for p in pieces if len(p) > 1]
    assert [row[:int(m.sum())].tolist() for row, m in zip(windows, mask)] == pieces


def test_score_lm_ignores_padding_and_measures_kl(world, tmp_path):
    from pdelta_rsparse.quality import heldout_windows, score_lm

    tok = _tokenizer(world["llama"])
    f = tmp_path / "held.txt"
    f.write_text("the cat sleeps in the sun\na dog runs to the river and back again and again\nthe end\n")
    model = dense(world["llama"])
    windows, mask = heldout_windows(tok, f, seq_len=16, max_tokens=1000)
    padded = score_lm(model, windows, mask, batch_size=3)
    nll = n = 0.0
    with torch.no_grad():  # one window at a time, no padding at all
        for row, m in zip(windows, mask):
            ids = row[:int(m.sum())][None]
            nll += float(F.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    assert abs(padded["ppl"] - float(torch.tensor(nll / n).exp())) < 1e-3 * padded["ppl"]
    assert score_lm(model, windows, mask, reference=padded["logprobs"], batch_size=3)["kl"] < 1e-9
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    assert score_lm(model, windows, mask, reference=padded["logprobs"], batch_size=3)["kl"] > 1e-4


def test_toy_world_calibration_text_holds_only_facts_a(tmp_path):
    import json as _json

    from pdelta_rsparse.toyworld import calibration_file

    from paramdelta.demo import DEMO_DATA

    note = calibration_file(tmp_path / "cal.txt")
    text = (tmp_path / "cal.txt").read_text()
    assert "pretrain_a.txt" in note and "instruct_a.jsonl" in note
    assert "<|user|>" in text and "<|endoftext|>" in text and len(text.splitlines()) > 5000
    bios = [_json.loads(line)["text"] for line in (DEMO_DATA / "tasks" / "bios_b.jsonl").read_text().splitlines()]
    names = {b.split(" was born")[0] for b in bios}
    assert len(names) == 100 and not [n for n in names if n in text]


def test_toy_world_report_writes_variants_and_sets_the_mode(tmp_path, monkeypatch):
    """The report's glue, with lm-eval replaced: three checkpoints per sparsity (search, the uniform ρ
    the next-token report picked, TEAL), each loaded through the plugin loader in the mode asked for."""
    from types import SimpleNamespace

    from pdelta_rsparse import toyworld

    from paramdelta.plugins import load_model

    seen = []

    def fake_evaluate(models, tasks, **kw):
        results = []
        for ref in models:
            model, _ = load_model(ref)
            modes = {m.mode for m in model.modules() if isinstance(m, RSparseLinear)}
            config = json.loads((Path(ref) / "config.json").read_text()).get("rsparse")
            seen.append((Path(ref).name, modes, config and (config["search"], config["score"],
                                                            {x["rho"] for x in config["layers"].values()})))
            scores: dict[str, dict] = {}
            for task, metric, *_ in toyworld.METRICS:
                scores.setdefault(task, {})[metric] = (0.5, None)
            results.append(SimpleNamespace(scores=scores))
        return SimpleNamespace(models=results)

    monkeypatch.setattr(toyworld, "_evaluate", fake_evaluate)
    result = toyworld.toyworld_report(tmp_path / "out", sparsities=[0.5], max_tokens=200, samples=2)
    uniform = next(r["rho"] for r in result["next_token"] if r.get("kind") == "uniform")
    assert seen[0] == ("paramdelta", set(), None)
    by_mode = {mode: {name: cfg for name, modes, cfg in seen[1:] if modes == {mode}} for mode in ("auto", "sparse")}
    for mode in ("auto", "sparse"):
        assert by_mode[mode]["s0.5-uniform"] == ("none", "weighted", {uniform})
        assert by_mode[mode]["s0.5-teal"] == ("none", "abs", {1.0})
        assert by_mode[mode]["s0.5-search"][:2] == ("layerwise", "weighted")
    assert len(result["lm_eval"]) == 7 and "goal" in result["text"]
    assert (tmp_path / "out" / "results.json").is_file()


def test_quality_command_needs_a_model_or_the_toy_world(cli, tmp_path):
    code, _, err = cli("rsparse", "quality")
    assert code != 0 and "--toy-world" in err
    code, _, err = cli("rsparse", "quality", "--toy-world", tmp_path, "--out", tmp_path / "o")
    assert code != 0 and "drop MODEL" in err
