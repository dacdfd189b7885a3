"""The tiny-model helpers are themselves tested: every other test trusts what they build."""

import json

import pytest
import torch
from tinymodels import (
    FAMILIES,
    INDEX_NAME,
    VOCAB_SIZE,
    load_state,
    make_checkpoint,
    make_triple,
    perturb,
    train_tiny_tokenizer,
)


def shard_files(path):
    return sorted(p.name for p in path.glob("*.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_triple_is_sharded_and_perturbed(tmp_path, family):
    post, base, new_base = make_triple(tmp_path, family)
    for ckpt in (post, base, new_base):
        weight_map = json.loads((ckpt / INDEX_NAME).read_text())["weight_map"]
        assert len(shard_files(ckpt)) > 1
        assert sorted(set(weight_map.values())) == shard_files(ckpt)
        assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"
        assert (ckpt / "tokenizer.json").exists() and (ckpt / "generation_config.json").exists()
    b, p, n = load_state(base), load_state(post), load_state(new_base)
    assert sorted(b) == sorted(p) == sorted(n)
    for name, t in b.items():
        assert t.dtype == torch.bfloat16
        assert p[name].shape == n[name].shape == t.shape
        assert not torch.equal(p[name], t), name
        assert not torch.equal(n[name], t), name
        assert not torch.equal(p[name], n[name]), name


def test_gemma_is_tied_and_saves_no_lm_head(tmp_path):
    ckpt = make_checkpoint(tmp_path / "g", "gemma")
    assert json.loads((ckpt / "config.json").read_text())["tie_word_embeddings"] is True
    state = load_state(ckpt)
    assert "lm_head.weight" not in state
    assert state["model.embed_tokens.weight"].shape == (VOCAB_SIZE, 32)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_untied_families_save_lm_head(tmp_path, family):
    state = load_state(make_checkpoint(tmp_path / family, family))
    assert state["lm_head.weight"].shape == (VOCAB_SIZE, 32)
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])


def test_qwen2_has_qkv_biases_only(tmp_path):
    state = load_state(make_checkpoint(tmp_path / "q", "qwen2"))
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{proj}.bias" in state
    assert "model.layers.0.self_attn.o_proj.bias" not in state
    assert "model.layers.0.self_attn.q_proj.bias" not in load_state(make_checkpoint(tmp_path / "l", "llama"))


def test_perturb_is_seeded_and_scaled(tmp_path):
    base = make_checkpoint(tmp_path / "base", "llama")
    a, b = (
        load_state(perturb(base, tmp_path / "a", seed=7)),
        load_state(perturb(base, tmp_path / "b", seed=7)),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    orig = load_state(base)
    w = "model.layers.0.mlp.up_proj.weight"
    ratio = ((a[w] - orig[w]).std() / orig[w].std()).item()
    assert 0.005 < ratio < 0.02  # noise is scale (0.01) x the tensor's std


def test_state_dict_round_trips_exactly(tmp_path):
    state = load_state(make_checkpoint(tmp_path / "a", "gemma", seed=3, dtype=torch.bfloat16))
    state = {k: v + 1 for k, v in state.items()}
    again = load_state(make_checkpoint(tmp_path / "b", "gemma", dtype=torch.bfloat16, state_dict=state))
    assert sorted(again) == sorted(state)
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_tokenizer_fills_the_vocab_exactly(tmp_path):
    tok = train_tiny_tokenizer(tmp_path / "tok")
    assert len(tok) == VOCAB_SIZE == max(tok.get_vocab().values()) + 1
    assert tok.decode(tok("The quick brown fox")["input_ids"]) == "the quick brown fox"
    assert tok.unk_token_id not in tok("the lazy dog sleeps")["input_ids"]
    ckpt = make_checkpoint(tmp_path / "m", "mistral", tokenizer=tok)
    assert load_state(ckpt)["model.embed_tokens.weight"].shape[0] == len(tok)
    assert json.loads((ckpt / "config.json").read_text())["vocab_size"] == len(tok)


def test_vocab_extra_grows_tokenizer_and_resize_follows(tmp_path):
    extra = ["<|im_start|>", "<|im_end|>"]
    tok = train_tiny_tokenizer(tmp_path / "tok", extra)
    assert len(tok) == VOCAB_SIZE + 2 == max(tok.get_vocab().values()) + 1
    assert tok.convert_tokens_to_ids(extra) == [VOCAB_SIZE, VOCAB_SIZE + 1]
    assert tok("<|im_start|>user")["input_ids"][0] == VOCAB_SIZE
    base = make_checkpoint(tmp_path / "base", "qwen2")
    post = perturb(base, tmp_path / "post", seed=1, resize_vocab_to=len(tok), tokenizer=tok)
    state = load_state(post)
    assert state["model.embed_tokens.weight"].shape == (VOCAB_SIZE + 2, 32)
    assert state["lm_head.weight"].shape == (VOCAB_SIZE + 2, 32)
    assert json.loads((post / "tokenizer_config.json").read_text())  # tokenizer saved beside the weights
    assert len(shard_files(post)) > 1


def test_chat_template_renders(tmp_path):
    tok = train_tiny_tokenizer(tmp_path / "tok")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s>user: hi</s><s>assistant:"
