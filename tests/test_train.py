"""Training: loss goes down, runs repeat bit for bit, masking, accumulation, bf16, the written checkpoint,
the optimizer registry, `pdelta train` / `pdelta init`, recipe steps and errors raised before training.

Everything runs on 2-layer models (hidden 32) from tests/tinymodels.py with the tiny BPE tokenizer
trained on the spot; each training run is a few dozen steps on a handful of sentences.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from tinymodels import EOS_ID, INDEX_NAME, load_state, make_checkpoint, tiny_config, train_tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from paramdelta import optim
from paramdelta.checkpoint import Checkpoint
from paramdelta.errors import OptionError, PdeltaError
from paramdelta.plugins import PluginError
from paramdelta.provenance import read_provenance
from paramdelta.train import IGNORE, DataError, Example, make_batch, read_records, tokenize, train

SENTENCES = ["the quick brown fox jumps over the lazy dog.", "numbers such as one, two, three and four are easy.",
             "the river runs to the sea.", "a model learns from text.", "how many days are in a week? seven."]
QUICK = dict(lr=1e-2, batch_size=8, seq_len=64, progress=False)  # shared by the small runs


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    tok = train_tiny_tokenizer(root / "tok")
    (root / "text.txt").write_text("\n".join(SENTENCES[i % len(SENTENCES)] for i in range(40)) + "\n")
    pairs = [{"prompt": "what is the weather like today?", "completion": " it is sunny and warm."},
             {"prompt": "how many days are in a week?", "completion": " there are seven days."}] * 8
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return {"root": root, "tok": root / "tok", "text": root / "text.txt", "pairs": root / "pairs.jsonl",
            "llama": make_checkpoint(root / "llama", "llama", tokenizer=tok),
            "gemma": make_checkpoint(root / "gemma", "gemma", tokenizer=tok)}


@pytest.fixture(scope="module")
def trained(world):
    """One 30-step run on the repetitive text, written in several shards; several tests read it."""
    out = world["root"] / "trained"
    report = train(world["llama"], world["text"], out, steps=30, max_shard_size="20KB", **QUICK)
    return out, report




def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_state(a), load_state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- learning -------------------------------------------------------------------------------------------
def test_loss_decreases_on_repetitive_text(trained):
    _, report = trained
    assert len(report.losses) == 30 and report.first_loss == report.losses[0]
    assert report.final_loss < 0.5 * report.first_loss, report.losses
    assert sum(report.losses[-5:]) < sum(report.losses[:5]) / 2
    assert report.tokens > 0 and report.optimizer_state_bytes > 0


def test_same_seed_same_weights_other_seed_differs(world, trained, tmp_path):
    out, report = trained
    again = train(world["llama"], world["text"], tmp_path / "again", steps=30, max_shard_size="20KB", **QUICK)
    assert again.losses == report.losses
    assert same_weights(out, tmp_path / "again")
    other = train(world["llama"], world["text"], tmp_path / "other", steps=30, seed=1, **QUICK)
    assert other.losses != report.losses
    assert not same_weights(out, tmp_path / "other")


def test_grad_accum_matches_a_bigger_batch(world, tmp_path):
    """batch 4 × 2 micro-batches sees the same rows per step as batch 8 and normalises by the same
    target count, so weights agree to float rounding (atol 1e-5 after 6 AdamW steps at lr 1e-2)."""
    kw = dict(steps=6, lr=1e-2, seq_len=64, progress=False)
    big = train(world["llama"], world["text"], tmp_path / "b8", batch_size=8, **kw)
    acc = train(world["llama"], world["text"], tmp_path / "b4x2", batch_size=4, grad_accum=2, **kw)
    assert acc.tokens == big.tokens
    assert acc.losses == pytest.approx(big.losses, rel=1e-5)
    a, b = load_state(tmp_path / "b8"), load_state(tmp_path / "b4x2")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    single = train(world["llama"], world["text"], tmp_path / "b4", batch_size=4, **kw)  # not trivially equal
    assert single.losses != pytest.approx(big.losses, rel=1e-5)


def test_bf16_autocast_learns_and_writes_bf16(world, trained, tmp_path):
    report = train(world["llama"], world["text"], tmp_path / "bf16", steps=30, dtype="bfloat16", **QUICK)
    assert report.final_loss < 0.5 * report.first_loss
    fp32 = trained[1].losses  # same run in fp32: bf16 compute changes the numbers, a little
    assert report.losses[0] != fp32[0] and report.losses[0] == pytest.approx(fp32[0], rel=2e-2)
    assert {t.dtype for t in Checkpoint.open(tmp_path / "bf16").tensors.values()} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16


# -- the written checkpoint ---------------------------------------------------------------------------------
def test_output_loads_in_transformers_with_provenance(world, trained):
    out, report = trained
    assert (out / INDEX_NAME).is_file()  # several shards through the core writer
    model = AutoModelForCausalLM.from_pretrained(out)
    stored = load_state(out)
    for name, t in model.state_dict().items():
        assert torch.equal(t, stored[name]), name
    assert not same_weights(out, world["llama"])
    for name in ("tokenizer.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    prov = read_provenance(Checkpoint.open(out))
    assert prov["kind"] == "train" and prov["seed"] == 0 and prov["steps"] == 30
    assert prov["final_loss"] == report.final_loss
    assert prov["options"]["optimizer"] == "adamw" and prov["options"]["lr"] == QUICK["lr"]
    roles = {i["role"]: i for i in prov["inputs"]}
    assert roles["model"]["ref"] == str(world["llama"])
    assert roles["data"]["sha256"] == hashlib.sha256(world["text"].read_bytes()).hexdigest()
    card = (out / "README.md").read_text()
    assert "base_model_relation: finetune" in card and json.dumps(str(world["llama"])) in card


def test_tied_embeddings_write_no_lm_head(world, tmp_path):
    train(world["gemma"], world["text"], tmp_path / "g", steps=3, **QUICK)
    assert "lm_head.weight" not in load_state(tmp_path / "g")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# -- data -----------------------------------------------------------------------------------------------------
def test_completion_only_masking(world):
    tok = AutoTokenizer.from_pretrained(world["tok"])
    rec = {"prompt": "what is the weather like today?", "completion": " it is sunny."}
    prompt = tok(rec["prompt"])["input_ids"]
    answer = tok(rec["completion"], add_special_tokens=False)["input_ids"] + [EOS_ID]
    (ex,), _ = tokenize([(1, rec)], tok, 64, "auto")
    assert ex.input_ids == prompt + answer
    assert ex.labels == [IGNORE] * len(prompt) + answer
    (ex_all,), _ = tokenize([(1, rec)], tok, 64, "all")
    assert ex_all.labels == ex_all.input_ids
    text, _ = tokenize([(1, {"text": "a model learns."})], tok, 64, "auto")
    assert text[0].labels == text[0].input_ids and text[0].input_ids[-1] == EOS_ID
    ids, labels = make_batch([ex, text[0]], pad_id=3)
    assert ids.shape == labels.shape == (2, len(ex.input_ids))
    assert ids[1, len(text[0].input_ids):].eq(3).all() and labels[1, len(text[0].input_ids):].eq(IGNORE).all()


def test_messages_train_on_assistant_turns_only(world):
    tok = AutoTokenizer.from_pretrained(world["tok"])
    msgs = [{"role": "user", "content": "how many days are in a week?"},
            {"role": "assistant", "content": "seven."}]
    (ex,), _ = tokenize([(1, {"messages": msgs})], tok, 64, "auto")
    trained_ids = [t for t in ex.labels if t != IGNORE]
    assert tok.decode(trained_ids).strip() == "seven.</s>"  # the answer and its eos, nothing of the user turn
    assert ex.labels[: len(ex.labels) - len(trained_ids)] == [IGNORE] * (len(ex.labels) - len(trained_ids))


def test_long_documents_are_cut_into_windows(world):
    tok = AutoTokenizer.from_pretrained(world["tok"])
    examples, notes = tokenize([(1, {"text": " ".join(SENTENCES * 3)})], tok, 16, "auto")
    assert len(examples) > 2 and all(len(e.input_ids) <= 16 for e in examples) and notes
    assert isinstance(examples[0], Example)


# -- optimizer registry -----------------------------------------------------------------------------------------
def test_optimizer_registry(world, monkeypatch):
    assert optim.available()["adamw"] == "paramdelta.optim:adamw"  # read from the installed entry points
    assert optim.get_optimizer("adamw") is optim.adamw
    with pytest.raises(PluginError, match="did you mean 'adamw'"):
        optim.get_optimizer("adamww")
    with pytest.raises(OptionError, match="did you mean 'betas'"):
        optim.check_options("adamw", {"beta": 0.9})
    model = AutoModelForCausalLM.from_pretrained(world["llama"])
    opt = optim.build_optimizer("adamw", model, lr=1e-3, weight_decay=0.1, options={"betas": "0.9,0.95"})
    assert opt.defaults["betas"] == (0.9, 0.95)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "model.layers.0.mlp.down_proj.weight" in names and "lm_head.weight" in names
    assert not any("norm" in n or "embed" in n for n in names)
    eps = [EntryPoint("adamw", "a:b", optim.GROUP), EntryPoint("adamw", "c:d", optim.GROUP)]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: eps)
    optim._entry_points.cache_clear()
    try:
        with pytest.raises(PluginError, match="two plugins claim the optimizer name"):
            optim.available()
    finally:
        monkeypatch.undo()
        optim._entry_points.cache_clear()


# -- CLI and recipes ------------------------------------------------------------------------------------------
def test_cli_train_and_init(world, tmp_path, cli):
    code, out, err = cli("train", "--model", world["llama"], "--data", world["pairs"], "--out", tmp_path / "sft",
                         "--steps", "5", "--batch-size", "4", "--seq-len", "32", "--opt", "betas=0.9,0.95",
                         "--warmup", "2", "--no-progress", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["steps"] == 5 and len(report["losses"]) == 5
    prov = read_provenance(Checkpoint.open(tmp_path / "sft"))
    assert prov["options"]["optimizer_options"] == {"betas": "0.9,0.95"} and prov["options"]["warmup"] == 2
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_type": "llama", **{k: v for k, v in tiny_config("llama").to_dict().items()
                                                          if k in ("hidden_size", "intermediate_size",
                                                                   "num_hidden_layers", "num_attention_heads")}}))
    code, out, err = cli("init", "--config", cfg, "--tokenizer", world["tok"], "--out", tmp_path / "init",
                         "--format", "json")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "init")
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(world["tok"]))
    assert model.config.eos_token_id == EOS_ID


def test_recipe_init_then_train_twice(world, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        version: 1
        name: from-scratch
        vars: {{tok: "{world['tok']}", text: "{world['text']}", pairs: "{world['pairs']}"}}
        steps:
          - id: init
            op: init
            tokenizer: ${{tok}}
            seed: 3
            config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
                      num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}}
          - {{id: base, op: train, model: "${{init}}", data: "${{text}}", steps: 8, lr: 0.01, seq_len: 32,
             save_state_every: 4}}
          - id: post
            op: train
            model: ${{base}}
            data: ${{pairs}}
            steps: 4
            batch_size: 4
            seq_len: 32
            optimizer_options: {{betas: [0.9, 0.95]}}
        """))
    code, out, err = cli("run", recipe, "--run-dir", tmp_path / "runs", "--no-progress", "--format", "json")
    assert code == 0, err
    steps = json.loads(out)["steps"]
    assert [s["status"] for s in steps] == ["ran"] * 3
    assert sorted(p.name for p in (tmp_path / "runs" / "base.state").iterdir()) == ["step-000004", "step-000008"]
    post = tmp_path / "runs" / "post"
    AutoModelForCausalLM.from_pretrained(post)
    prov = read_provenance(Checkpoint.open(post))
    assert prov["inputs"][0]["ref"] == str(tmp_path / "runs" / "base")
    code, out, err = cli("run", recipe, "--run-dir", tmp_path / "runs", "--no-progress", "--format", "json")
    assert [s["status"] for s in json.loads(out)["steps"]] == ["skipped (unchanged)"] * 3, err


# -- errors, all before the model is loaded -----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "empty", "optimizer", "seq_len", "jsonl", "unknown_opt", "vocab"])
def test_errors_before_training(world, tmp_path, monkeypatch, case):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr("paramdelta.plugins.load_model", no_loading)
    data, kw, model = world["text"], {}, world["llama"]
    if case == "missing":
        data, want = tmp_path / "nope.txt", r"nope\.txt not found"
    elif case == "empty":
        data, want = tmp_path / "empty.txt", "has no documents"
        data.write_text("\n  \n")
    elif case == "optimizer":
        kw, want = {"optimizer": "adamx"}, "unknown optimizer 'adamx'.*did you mean 'adamw'"
    elif case == "seq_len":
        kw, want = {"seq_len": 4096}, "--seq-len 4096 exceeds .*max_position_embeddings \\(128\\)"
    elif case == "vocab":  # a model whose embedding is smaller than the tokenizer's ids
        model = make_checkpoint(tmp_path / "small", "llama", vocab_size=40, tokenizer=AutoTokenizer.from_pretrained(
            world["tok"]))
        want = "token id .* is outside .*embedding \\(40 rows\\)"
    elif case == "unknown_opt":
        kw, want = {"optimizer_options": {"lr_decay": 1}}, "adamw' has no option 'lr_decay'"
    else:
        data, want = tmp_path / "bad.jsonl", r"bad\.jsonl:2: not valid JSON"
        data.write_text('{"text": "fine"}\n{"text": "broken"\n')
    with pytest.raises(PdeltaError, match=want) as err:
        train(model, data, tmp_path / "out", steps=5, progress=False, **kw)
    assert "\n" not in str(err.value) and err.value.hint
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line(world, tmp_path, cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"question": "no"}\n')
    code, _, err = cli("train", "--model", world["llama"], "--data", bad, "--out", tmp_path / "o", "--no-progress")
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and "bad.jsonl:2" in line and "(fix: " in line


def test_read_records_kinds(tmp_path):
    f = tmp_path / "mix.jsonl"
    f.write_text('{"text": "a"}\n\n{"prompt": "p", "completion": "c"}\n'
                 '{"messages": [{"role": "user", "content": "x"}]}\n')
    assert [n for n, _ in read_records(f)] == [1, 3, 4]
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="neither"):
        read_records(tmp_path / "x.csv")
