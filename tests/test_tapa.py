"""TAPA plugin: the score against a naive reference, the transformers wiring (mask, cache, model_type),
the RoPE → TAPA conversion and its refusals, and the fine-tune through the CLI and a recipe."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pdelta_tapa
import pytest
import torch
from pdelta_tapa.attention import split_dim, tapa_attention, tapa_scores
from pdelta_tapa.modeling import LlamaTapaConfig, LlamaTapaForCausalLM, tapa_config
from pdelta_tapa.retrofit import convert_tensor, permutation
from pdelta_tapa.transform import TapaOptions
from tinymodels import _TEXT, make_checkpoint, train_tiny_tokenizer

from paramdelta.checkpoint import Checkpoint
from paramdelta.errors import OptionError
from paramdelta.plugins import get
from paramdelta.plugins import load_model as plugin_load_model

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "tapa-retrofit.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("PDELTA_DEBUG", raising=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny RoPE Llama with its tokenizer, and a text file to train on."""
    root = tmp_path_factory.mktemp("tapa")
    tok = train_tiny_tokenizer(root / "tok")
    base = make_checkpoint(root / "base", "llama", tokenizer=tok)
    data = root / "text.txt"
    data.write_text("\n".join(line for line in _TEXT if line) * 2 + "\n")
    return {"root": root, "tok": root / "tok", "base": base, "data": data}


def tiny_tapa(seed: int = 0, **kw) -> LlamaTapaForCausalLM:
    cfg = tapa_config({"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}, **kw)
    torch.manual_seed(seed)
    model = LlamaTapaForCausalLM(cfg).eval()
    with torch.no_grad():  # O(1) scores: the 0.02-std init makes cos ≈ 1 and would hide position errors
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(25)
            layer.self_attn.k_proj.weight.mul_(25)
    return model


# -- the score ------------------------------------------------------------------------------------
def naive_attention(q, k, v, theta, alpha):
    """Score by score, straight from the formula; q (h, s, D), k/v (h, s, D); causal."""
    h, s, d = q.shape
    a = round(theta * d)
    out = torch.zeros_like(q, dtype=torch.float64)
    for head in range(h):
        for m in range(s):
            scores = []
            for n in range(m + 1):
                amp = float(q[head, m, :a] @ k[head, n, :a]) / math.sqrt(theta * d)
                ph = float(q[head, m, a:] @ k[head, n, a:]) / math.sqrt((1 - theta) * d)
                scores.append(amp * math.cos(2 * math.pi * abs(m - n) ** alpha * ph))
            w = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
            out[head, m] = w @ v[head, : m + 1].double()
    return out


def naive_model_logits(model: LlamaTapaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The whole llama_tapa forward written out by hand, with naive_attention (batch of one)."""
    cfg = model.config
    x = model.model.embed_tokens(ids[0])
    for layer in model.model.layers:
        att = layer.self_attn
        y = layer.input_layernorm(x)
        d = att.head_dim
        q = att.q_proj(y).view(len(ids[0]), -1, d).transpose(0, 1)
        k = att.k_proj(y).view(len(ids[0]), -1, d).transpose(0, 1)
        v = att.v_proj(y).view(len(ids[0]), -1, d).transpose(0, 1)
        groups = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        o = naive_attention(q, k, v, cfg.tapa_theta, cfg.tapa_alpha).float().transpose(0, 1).reshape(len(ids[0]), -1)
        x = x + att.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x))[None]


def test_attention_function_matches_naive_reference_with_causal_mask():
    from transformers.masking_utils import eager_mask

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    module = tiny_tapa()
    mask = eager_mask(batch_size=1, q_length=7, kv_length=7)
    out, _ = tapa_attention(module.model.layers[0].self_attn, q, k, v, mask)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref = naive_attention(q[0], kk[0], vv[0], 0.5, 0.1)
    torch.testing.assert_close(out[0].transpose(0, 1).double(), ref, rtol=1e-5, atol=1e-5)


def test_model_forward_matches_naive_model_and_needs_the_mask_function(monkeypatch):
    from transformers.masking_utils import AttentionMaskInterface

    model = tiny_tapa(seed=1, alpha=0.3)
    ids = torch.randint(4, 96, (1, 9))
    with torch.no_grad():
        ref = naive_model_logits(model, ids)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
        monkeypatch.setattr("pdelta_tapa.attention.CHUNK_SCORES", 20)  # 2 query rows per chunk at s_k = 9
        torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)).logits, ref, rtol=1e-4, atol=1e-4)
        monkeypatch.undo()
        # Without the registered mask function transformers builds no mask: the model sees the future.
        monkeypatch.delitem(AttentionMaskInterface._global_mapping, "tapa")
        assert not torch.allclose(model(ids).logits, ref, atol=1e-3)


def test_alpha_zero_makes_the_phase_independent_of_distance():
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 8), torch.randn(2, 6, 8)
    at = {off: tapa_scores(q, k, theta=0.5, alpha=0.0, q_offset=off) for off in (0, 5, 50)}
    torch.testing.assert_close(at[0], at[5])
    torch.testing.assert_close(at[0], at[50])
    assert not torch.allclose(tapa_scores(q, k, theta=0.5, alpha=0.1, q_offset=0),
                              tapa_scores(q, k, theta=0.5, alpha=0.1, q_offset=50))


def test_zero_phase_leaves_the_amplitude_dot_product():
    torch.manual_seed(0)
    q, k = torch.randn(3, 8), torch.randn(5, 8)
    q[:, 2:] = 0
    torch.testing.assert_close(tapa_scores(q, k, theta=0.25, alpha=0.1), q[:, :2] @ k[:, :2].T / math.sqrt(2))


@pytest.mark.parametrize("theta,head_dim", [(0.0, 8), (1.0, 8), (0.3, 8), (0.05, 8), (-0.5, 8)])
def test_theta_must_split_the_head_into_whole_dims(theta, head_dim):
    with pytest.raises(ValueError, match="tapa_theta"):
        split_dim(head_dim, theta)


def test_config_and_options_validate_theta_and_alpha():
    assert split_dim(8, 0.25) == 2 and split_dim(64, 0.5) == 32
    with pytest.raises(ValueError, match="tapa_theta"):
        tapa_config({"hidden_size": 32, "num_attention_heads": 4}, theta=0.3)
    with pytest.raises(ValueError, match="tapa_alpha"):
        tapa_config({"hidden_size": 32, "num_attention_heads": 4}, alpha=-1)
    with pytest.raises(OptionError, match="--theta"):
        TapaOptions(theta=1.5)
    with pytest.raises(OptionError, match="--alpha"):
        TapaOptions(alpha=-0.1)


# -- wiring: model_type, save/load, cache -----------------------------------------------------------
def test_save_load_round_trip_keeps_model_type_and_logits(tmp_path, world):
    from transformers import AutoModelForCausalLM

    model = tiny_tapa(seed=2, theta=0.25, alpha=0.2)
    model.save_pretrained(tmp_path / "m")
    shutil.copy(world["tok"] / "tokenizer.json", tmp_path / "m")
    shutil.copy(world["tok"] / "tokenizer_config.json", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "llama_tapa" and cfg["paramdelta"]["transform"] == "tapa"
    assert (cfg["tapa_theta"], cfg["tapa_alpha"]) == (0.25, 0.2)
    ids = torch.randint(4, 96, (2, 11))
    with torch.no_grad():
        want = model(ids).logits
        for loaded in (pdelta_tapa.load_model(tmp_path / "m"),
                       AutoModelForCausalLM.from_pretrained(tmp_path / "m"),
                       plugin_load_model(tmp_path / "m")[0]):
            assert type(loaded) is LlamaTapaForCausalLM and loaded.config.model_type == "llama_tapa"
            assert loaded.config._attn_implementation == "tapa"
            torch.testing.assert_close(loaded.eval()(ids).logits, want, rtol=0, atol=0)


def test_generation_with_cache_equals_generation_without():
    model = tiny_tapa(seed=3)
    ids = torch.randint(4, 96, (1, 5))
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
        slow = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
        assert torch.equal(fast, slow)
        # Step-by-step logits through the cache equal one full forward.
        full = model(fast).logits
        out = model(fast[:, :5], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(5, fast.shape[1]):
            out = model(fast[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-3, atol=1e-3)  # fp32 cos of O(10) arguments


def test_left_padded_batch_scores_like_unpadded_rows():
    model = tiny_tapa(seed=4)
    a, b = torch.randint(4, 96, (1, 8)), torch.randint(4, 96, (1, 5))
    ids = torch.cat([a, torch.cat([torch.full((1, 3), 3), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        both = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(both[0], model(a).logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(both[1, 3:], model(b).logits[0], rtol=1e-4, atol=1e-4)


# -- conversion ---------------------------------------------------------------------------------
def test_permutation_leaves_rope_free_qk_unchanged(world):
    ckpt = Checkpoint.open(world["base"])
    d = 8
    perm = permutation(d, theta=0.5, mode="low-freq")
    assert sorted(perm) == list(range(d)) and perm[:2] == [3, 7]  # the lowest-frequency pair comes first
    assert permutation(d, theta=0.5, mode="first-half") == list(range(d))
    x = torch.randn(5, 32)
    for layer in (0, 1):
        wq, wk = (ckpt.read(f"model.layers.{layer}.self_attn.{p}_proj.weight") for p in "qk")
        pq, pk = (convert_tensor(f"model.layers.{layer}.self_attn.{p}_proj.weight", w, head_dim=d, perm=perm,
                                 amp=4, phase_scale=1.0) for p, w in (("q", wq), ("k", wk)))
        assert not torch.equal(pq, wq)
        # query head h uses kv head h // 2 (GQA): per head, q·k is the same after the permutation.
        for h in range(4):
            before = (x @ wq[h * d:(h + 1) * d].T) @ (x @ wk[h // 2 * d:(h // 2 + 1) * d].T).T
            after = (x @ pq[h * d:(h + 1) * d].T) @ (x @ pk[h // 2 * d:(h // 2 + 1) * d].T).T
            torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    damped = convert_tensor("model.layers.0.self_attn.q_proj.weight", wq, head_dim=d, perm=perm, amp=4,
                            phase_scale=0.3)
    torch.testing.assert_close(damped.view(4, d, 32)[:, 4:], 0.3 * pq.view(4, d, 32)[:, 4:])
    torch.testing.assert_close(damped.view(4, d, 32)[:, :4], pq.view(4, d, 32)[:, :4])
    assert convert_tensor("model.layers.0.mlp.up_proj.weight", wq, head_dim=d, perm=perm, amp=4,
                          phase_scale=0.3) is wq


def refuse(cli, src: Path, tmp_path: Path, monkeypatch, *flags: str) -> str:
    """Run a retrofit that must fail before any weight is read; returns the one error line."""
    monkeypatch.setattr(Checkpoint, "read", lambda *a, **k: pytest.fail("a weight was read"))
    code, _, err = cli("tapa", "retrofit", src, "--out", tmp_path / "out", "--train-data", tmp_path / "t.txt",
                       "--steps", "1", *flags)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (tmp_path / "out").exists()
    return lines[0]


def with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes,words", [
    ({"partial_rotary_factor": 0.5}, "partial rotary"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}}, "rope_type 'longrope'"),
    ({"model_type": "gemma"}, "'gemma'"),
    ({"position_embedding_type": "alibi"}, "ALiBi"),
])
def test_retrofit_refuses_layouts_it_cannot_convert(cli, world, tmp_path, monkeypatch, changes, words):
    (tmp_path / "t.txt").write_text("some text\n")
    src = with_config(world["base"], tmp_path / "src", **changes)
    assert words in refuse(cli, src, tmp_path, monkeypatch)


def test_retrofit_refuses_sliding_window_and_bad_theta(cli, world, tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("some text\n")
    mistral = make_checkpoint(tmp_path / "mistral", "mistral", tokenizer=None)
    cfg = json.loads((mistral / "config.json").read_text())
    cfg["sliding_window"] = 16
    (mistral / "config.json").write_text(json.dumps(cfg))
    assert "sliding-window" in refuse(cli, mistral, tmp_path, monkeypatch)
    assert "whole number" in refuse(cli, world["base"], tmp_path, monkeypatch, "--theta", "0.3")


# -- end to end ---------------------------------------------------------------------------------
def test_retrofit_and_extend_through_the_cli(cli, world, tmp_path):
    from paramdelta.train import train
    from paramdelta.transform import run_transform

    # A base with paramdelta train provenance, then cast: the budget's share is found through the cast.
    trained = train(world["base"], world["data"], tmp_path / "trained", steps=3, batch_size=8, seq_len=32, lr=1e-2,
                    progress=False).out
    base = run_transform("cast", trained, tmp_path / "base", {"dtype": "bfloat16"}, progress=False).out
    code, out, err = cli("tapa", "retrofit", base, "--out", tmp_path / "tapa", "--train-data", world["data"],
                         "--objective", "lm", "--steps", "8", "--seq-len", "32", "--batch-size", "4", "--lr", "1e-2",
                         "--warmup", "0", "--phase-init-scale", "0.5", "--attention-only-steps", "2",
                         "--align-steps", "2", "--format", "json")
    assert code == 0, err
    notes = json.loads(out)["notes"]
    assert any("133.33% of the base's training budget (768 slots in 1 paramdelta train run)" in n for n in notes), notes
    ppl = next(n for n in notes if n.startswith("held-out perplexity"))
    before, after = (float(ppl.split(f"{w} ")[1].split(",")[0]) for w in ("before", "after"))
    assert after < before, ppl
    cfg = json.loads((tmp_path / "tapa" / "config.json").read_text())
    assert cfg["model_type"] == "llama_tapa" and cfg["paramdelta"]["transform"] == "tapa"
    assert cfg["paramdelta"]["tapa"][0]["permutation"] == [3, 7, 2, 6, 1, 5, 0, 4]
    assert "held-out perplexity" in (tmp_path / "tapa" / "README.md").read_text()
    res = get("tapa").last_result
    assert len(res.losses) == 8 and res.losses[0] < 1.5  # the first two are relative attention errors, not nats
    model, _ = plugin_load_model(tmp_path / "tapa")
    assert type(model) is LlamaTapaForCausalLM and model.dtype == torch.bfloat16  # the input's dtype

    code, out, err = cli("tapa", "extend", tmp_path / "tapa", "--out", tmp_path / "long", "--train-data",
                         world["data"], "--seq-len", "256", "--steps", "2", "--batch-size", "2", "--format", "json")
    assert code == 0, err
    assert any("never packed" in n for n in json.loads(out)["notes"])  # one-line documents are short rows
    cfg = json.loads((tmp_path / "long" / "config.json").read_text())
    assert [r["mode"] for r in cfg["paramdelta"]["tapa"]] == ["retrofit", "extend"]
    assert cfg["max_position_embeddings"] == 256
    code, _, err = cli("tapa", "extend", tmp_path / "tapa", "--out", tmp_path / "x", "--train-data", world["data"],
                       "--seq-len", "64", "--objective", "distill")
    assert code == 2 and "no RoPE teacher" in err
    code, _, err = cli("tapa", "extend", tmp_path / "tapa", "--out", tmp_path / "x", "--train-data", world["data"],
                       "--seq-len", "64", "--align-steps", "2")
    assert code == 2 and "RoPE input only" in err


def test_conversion_only_keeps_tensor_names_and_matches_permuted_weights(world, tmp_path):
    from paramdelta.transform import run_transform

    run_transform("tapa", world["base"], tmp_path / "c", {"phase_init_scale": 0.5, "amplitude_init_scale": 0.8},
                  progress=False, max_shard_size="20KB")
    src, out = Checkpoint.open(world["base"]), Checkpoint.open(tmp_path / "c")
    assert list(src.tensors) == list(out.tensors) and len(out.files) > 1
    perm = permutation(8, theta=0.5, mode="low-freq")
    for name in src.tensors:
        want = convert_tensor(name, src.read(name), head_dim=8, perm=perm, amp=4, phase_scale=0.5,
                              amplitude_scale=0.8)
        assert torch.equal(out.read(name), want), name


def test_recipe_retrofits_and_evaluates_through_the_plugin_loader(cli, world, tmp_path, monkeypatch):
    import pdelta_tapa.modeling as modeling

    loaded = []
    real = modeling.load_model
    monkeypatch.setattr(modeling, "load_model", lambda path, **kw: loaded.append(path) or real(path, **kw))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("run", RECIPE, f"base={world['base']}", f"data={world['data']}", "--run-dir",
                         tmp_path / "runs", "--format", "json")
    assert code == 0, err
    assert [s["status"] for s in json.loads(out)["steps"]] == ["ran", "ran"]
    cfg = json.loads((tmp_path / "runs" / "retrofit" / "config.json").read_text())
    assert cfg["model_type"] == "llama_tapa" and cfg["paramdelta"]["tapa"][0]["phase_init_scale"] == 0.3
    results = json.loads((tmp_path / "runs" / "eval.json").read_text())
    acc = results["models"][0]["results"]["pdelta_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert [Path(p).name for p in loaded] == ["retrofit"]  # lm-eval got the model from pdelta_tapa's loader


def test_llama_tapa_config_is_registered_on_import():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama_tapa", hidden_size=32, num_attention_heads=4)
    assert isinstance(cfg, LlamaTapaConfig) and cfg.paramdelta == {"transform": "tapa"}


def test_from_scratch_init_and_core_training_keep_the_tapa_model(world, tmp_path):
    from paramdelta.train import train

    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    init = pdelta_tapa.init_model(cfg, world["tok"], tmp_path / "init", theta=0.25, alpha=0.2, max_shard_size="20KB")
    report = train(init, world["data"], tmp_path / "trained", steps=4, batch_size=4, seq_len=32, lr=1e-2,
                   progress=False)
    assert report.final_loss < report.first_loss
    for folder in (init, tmp_path / "trained"):
        saved = json.loads((Path(folder) / "config.json").read_text())
        assert saved["model_type"] == "llama_tapa" and saved["paramdelta"]["transform"] == "tapa"
        assert (saved["tapa_theta"], saved["tapa_alpha"]) == (0.25, 0.2)
    model, _ = plugin_load_model(tmp_path / "trained")
    assert type(model) is LlamaTapaForCausalLM and model.config.tapa_theta == 0.25


def test_default_phase_damping_spares_a_random_init(world, tmp_path):
    from paramdelta.train import init_model
    from paramdelta.transform import run_transform

    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2}
    init = init_model(cfg, world["tok"], tmp_path / "init")
    perm = permutation(8, theta=0.5, mode="low-freq")
    name = "model.layers.0.self_attn.k_proj.weight"
    for src, scale in ((init, 1.0), (world["base"], 0.1)):  # random weights: nothing to protect
        out = tmp_path / f"tapa-{scale}"
        report = run_transform("tapa", src, out, {}, progress=False)
        assert any(f"phase rows ×{scale}" in n for n in report.notes), report.notes
        want = convert_tensor(name, Checkpoint.open(src).read(name), head_dim=8, perm=perm, amp=4, phase_scale=scale)
        assert torch.equal(Checkpoint.open(out).read(name), want)


def test_import_is_light_and_registers_once_transformers_loads():
    """`pdelta` imports the CLI module on every start: no torch there; the model type still gets
    registered when transformers is imported afterwards (a fresh interpreter, so nothing is preloaded)."""
    import subprocess
    import sys

    code = ("import sys, pdelta_tapa.cli\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "from transformers import AutoModelForCausalLM\n"
            "assert CONFIG_MAPPING['llama_tapa'].__name__ == 'LlamaTapaConfig'\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
