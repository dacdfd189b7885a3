"""`pdelta eval-length`: sliding-window perplexity bookkeeping, the retrieval probe, RoPE scaling, the CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tinymodels import _TEXT, make_checkpoint, train_tiny_tokenizer

from paramdelta.errors import OptionError
from paramdelta.lengtheval import (
    load_scaled,
    parse_lengths,
    parse_spec,
    probe_tokens,
    retrieval_accuracy,
    retrieval_prompts,
    sliding_ppl,
    token_stream,
    windows,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lengtheval")
    tok = train_tiny_tokenizer(root / "tok")
    data = root / "data.txt"
    data.write_text("\n".join(line for line in _TEXT if line) + "\n")
    return SimpleNamespace(root=root, tok=tok, data=data,
                           a=make_checkpoint(root / "a", "llama", seed=0, tokenizer=tok),
                           b=make_checkpoint(root / "b", "llama", seed=1, tokenizer=tok))


@pytest.mark.parametrize(("n", "length", "stride"), [(100, 16, 8), (100, 16, 16), (100, 16, 5), (17, 16, 8),
                                                     (16, 16, 8), (5, 16, 8), (2, 2, 1), (1000, 64, 32)])
def test_windows_score_every_token_once_with_enough_context(n, length, stride):
    scored = []
    for i, (begin, end, first) in enumerate(windows(n, length, stride)):
        assert 0 <= begin < first <= end <= n and end - begin <= length
        scored += range(first, end)
        if i:  # past the first window every scored token sees ≥ length − stride earlier tokens
            assert first - begin >= length - stride
    assert scored == list(range(1, n))  # each predictable position once, in order


def test_windows_reject_a_stride_longer_than_the_window():
    with pytest.raises(OptionError, match="stride"):
        windows(100, 16, 17)


def test_sliding_ppl_equals_full_context_when_the_window_holds_everything(world):
    model, tok, _ = load_scaled(parse_spec(str(world.a)))
    stream = token_stream(world.data, tok)[:90]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([stream])).logits[0, :-1]
    direct = math.exp(F.cross_entropy(logits, torch.tensor(stream[1:])).item())
    for length in (90, 128):
        ppl, count = sliding_ppl(model, stream, length, length // 2)
        assert count == len(stream) - 1
        assert ppl == pytest.approx(direct, rel=1e-5)
    ppl, count = sliding_ppl(model, stream, 16, 8, batch_size=3)  # many windows, batched unevenly
    assert count == len(stream) - 1 and ppl != pytest.approx(direct, rel=1e-5)  # less context, other numbers


class _InductionOracle(torch.nn.Module):
    """Predicts the token that followed the last token's previous occurrence: a perfect retriever."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for r, row in enumerate(input_ids.tolist()):
            j = max(i for i in range(len(row) - 1) if row[i] == row[-1])
            logits[r, -1, row[j + 1]] = 1.0
        return SimpleNamespace(logits=logits)


def test_retrieval_probe_is_deterministic_bounded_and_solved_by_a_perfect_retriever(world):
    model, tok, _ = load_scaled(parse_spec(str(world.a)))
    candidates = probe_tokens(token_stream(world.data, tok), tok)
    assert not set(candidates) & set(tok.all_special_ids)
    runs = [retrieval_accuracy(model, candidates, 32, trials=12, seed=3) for _ in range(2)]
    assert runs[0] == runs[1] and 0.0 <= runs[0] <= 1.0
    oracle = _InductionOracle(len(tok))
    for length in (9, 32, 64):
        assert retrieval_accuracy(oracle, candidates, length, trials=12, seed=0, bos=tok.bos_token_id) == 1.0
        prompts, answers = retrieval_prompts(candidates, length, trials=12, seed=0, bos=tok.bos_token_id)
        assert all(len(p) == length and p[0] == tok.bos_token_id for p in prompts)
        assert all(p[-3::-2].count(p[-1]) == 1 for p in prompts)  # the queried key occurs once among the keys

    class Copier(_InductionOracle):  # a broken retriever answers with the key instead of its value
        def forward(self, input_ids, use_cache=False):
            logits = torch.zeros(*input_ids.shape, self.vocab)
            logits[torch.arange(len(input_ids)), -1, input_ids[:, -1]] = 1.0
            return SimpleNamespace(logits=logits)

    assert retrieval_accuracy(Copier(len(tok)), candidates, 32, trials=12) < 0.5


def test_retrieval_probe_needs_enough_distinct_tokens():
    with pytest.raises(OptionError, match="distinct tokens"):
        retrieval_prompts(list(range(10)), 64, trials=2, seed=0)


def test_pi_and_yarn_change_the_loaded_config_and_the_logits(world):
    ids = torch.tensor([token_stream(world.data, world.tok)[:40]])
    outs = {}
    for text in (str(world.a), f"{world.a}@pi:4", f"{world.a}@yarn:4"):
        model, _, factor = load_scaled(parse_spec(text), train_length=32)
        with torch.inference_mode():
            outs[text.rpartition("@")[2] if "@" in text else "none"] = model(input_ids=ids).logits
        rope = model.config.rope_parameters
        if "@pi" in text:
            assert (rope["rope_type"], rope["factor"], factor) == ("linear", 4.0, 4.0)
        if "@yarn" in text:
            assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 32)
    assert torch.equal(outs["pi:4"][:, 0], outs["none"][:, 0])  # position 0 is not rotated by either
    assert not torch.allclose(outs["pi:4"][:, 1:], outs["none"][:, 1:], atol=1e-4)
    assert not torch.allclose(outs["yarn:4"], outs["none"], atol=1e-4)
    assert not torch.allclose(outs["yarn:4"], outs["pi:4"], atol=1e-4)
    _, _, factor = load_scaled(parse_spec(str(world.a), "pi"), train_length=32, longest=256)
    assert factor == 8.0  # default: the longest length over the training length


def test_parsing_specs_and_lengths():
    assert parse_spec("runs/m@yarn:8") == parse_spec("runs/m", "yarn", 8.0)
    assert parse_spec("runs/m@pi").factor is None and parse_spec("x@y/m").path == "x@y/m"
    assert parse_lengths("256, 64,128,64") == [64, 128, 256]
    for bad in ("", "64,abc", "0,64", "1"):
        with pytest.raises(OptionError, match="--lengths"):
            parse_lengths(bad)
    with pytest.raises(OptionError, match="unknown RoPE scaling"):
        parse_spec("m@ntk:2")
    with pytest.raises(OptionError, match="≥ 1"):
        parse_spec("m@pi:0.5")


def test_cli_compares_two_models_and_writes_json_and_png(world, cli, tmp_path):
    out, png = tmp_path / "r" / "res.json", tmp_path / "ppl.png"
    code, stdout, err = cli("eval-length", world.a, world.b, f"{world.a}@yarn:2", "--data", world.data,
                            "--lengths", "32,16,64", "--probe-trials", "4", "--train-length", "32",
                            "--output", out, "--plot", png, "--format", "markdown")
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["lengths"] == [16, 32, 64]
    assert [m["label"] for m in res["models"]] == ["a", "b", "a@yarn:2"]
    for m in res["models"]:
        assert all(1 < m["ppl"][str(n)] < 1e4 and 0 <= m["retrieval"][str(n)] <= 1 for n in (16, 32, 64))
        assert m["tokens"]["16"] == m["tokens"]["64"] == res["stream_tokens"] - 1
    assert res["models"][0]["ppl"] != res["models"][1]["ppl"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stdout.startswith("| model | ppl@16 |") and "| a@yarn:2 |" in stdout


def test_cli_errors_are_one_line_before_loading(world, cli, tmp_path):
    code, _, err = cli("eval-length", world.a, "--data", tmp_path / "nope.txt", "--lengths", "16")
    assert code == 2 and "data file" in err and "not found" in err
    code, _, err = cli("eval-length", world.a, "--data", world.data, "--lengths", "16,x")
    assert code == 2 and "--lengths must be" in err
    code, _, err = cli("eval-length", tmp_path / "missing", "--data", world.data, "--lengths", "16")
    assert code == 2 and "no config.json" in err
    code, _, err = cli("eval-length", world.a, "--data", world.data, "--lengths", "16", "--rope-scaling", "ntk")
    assert code == 2 and "unknown RoPE scaling" in err
    assert all("Traceback" not in e for e in (err,))


def test_recipe_packs_documents_and_runs_eval_length(world, cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""version: 1
name: lengths
steps:
  - {{id: docs, op: pack-docs, data: "{world.data}", tokenizer: "{world.root / 'tok'}", min_tokens: 40, holdout: 0.3}}
  - {{id: lengths, op: eval-length, models: ["{world.a}", "{world.b}@pi:2"], data: "${{docs}}/eval.txt",
     lengths: [16, 32], probe_trials: 2, train_length: 16}}
""")
    code, _, err = cli("run", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, err
    docs = [line for line in (tmp_path / "run" / "docs" / "train.txt").read_text().splitlines() if line]
    held = [line for line in (tmp_path / "run" / "docs" / "eval.txt").read_text().splitlines() if line]
    assert len(held) == round(0.3 * (len(docs) + len(held)))
    assert all(len(world.tok(d, add_special_tokens=False)["input_ids"]) >= 40 for d in docs + held)
    lines = [line for line in _TEXT if line]
    assert " ".join(docs + held) == " ".join(lines[: len(lines) - json.loads(
        (tmp_path / "run" / "docs" / "pack.json").read_text())["dropped_lines"]])  # in order, nothing lost
    res = json.loads((tmp_path / "run" / "lengths.json").read_text())
    assert [m["label"] for m in res["models"]] == ["a", "b@pi:2"] and res["models"][1]["factor"] == 2.0
    assert (tmp_path / "run" / "lengths.png").is_file()
    code, out, err = cli("run", recipe, "--run-dir", tmp_path / "run")
    assert code == 0 and out.count("skipped (unchanged)") == 2, out + err  # a re-run reuses both outputs


def test_a_tapa_checkpoint_routes_to_the_plugin_loader_and_refuses_rope_scaling(world, cli, tmp_path):
    import pdelta_tapa  # the plugin ships in this repo, public API only
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    tapa = pdelta_tapa.init_model(cfg, world.root / "tok", tmp_path / "tapa", seed=0)
    model, _, _ = load_scaled(parse_spec(str(tapa)))
    assert model.config.model_type == "llama_tapa"
    with pytest.raises(OptionError, match="plain-RoPE"):  # the library call checks after loading too
        load_scaled(parse_spec(f"{tapa}@pi:2"))
    code, out, err = cli("eval-length", world.a, tapa, "--data", world.data, "--lengths", "16,64",
                         "--probe-trials", "2", "--format", "json")
    assert code == 0, err
    assert [m["label"] for m in json.loads(out)["models"]] == ["a", "tapa"]
    code, _, err = cli("eval-length", f"{tapa}@yarn:2", "--data", world.data, "--lengths", "16")
    assert code == 2 and "needs a plain-RoPE model" in err
