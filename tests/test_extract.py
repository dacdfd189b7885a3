"""`extract` stores post − base; `apply --delta` puts it back onto any base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tinymodels import load_state, make_triple, perturb, train_tiny_tokenizer

import paramdelta
from paramdelta.checkpoint import Checkpoint
from paramdelta.errors import OptionError, PreflightError


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    return make_triple(tmp_path_factory.mktemp("x"), "llama")


def test_full_delta_round_trip_is_bit_exact(triple, tmp_path):
    post, base, new_base = triple
    paramdelta.extract(tmp_path / "d", post=post, base=base, progress=False)
    paramdelta.apply(tmp_path / "via_delta", new_base=new_base, deltas=[(tmp_path / "d", 1.0)], progress=False)
    paramdelta.apply(tmp_path / "direct", post=post, base=base, new_base=new_base, progress=False)
    a, b = load_state(tmp_path / "via_delta"), load_state(tmp_path / "direct")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    d, p, s = load_state(tmp_path / "d"), load_state(post), load_state(base)
    assert all(d[k].dtype == torch.float32 for k in d)
    assert all(torch.equal(d[k], p[k].float() - s[k].float()) for k in d)


def test_low_rank_delta_meets_its_energy_target_and_is_smaller(triple, tmp_path):
    post, base, _ = triple
    report = paramdelta.extract(tmp_path / "lr", post=post, base=base, energy=0.6, progress=False)
    assert report.lowrank > 0 and report.ratio < 1.0
    assert report.min_energy >= 0.6
    ck = Checkpoint.open(tmp_path / "lr")
    p, s = load_state(post), load_state(base)
    for name in ck.tensors:
        if not name.endswith("@U"):
            continue
        target = name[:-2]
        u, v = ck.read(name).double(), ck.read(target + "@V").double()
        delta = p[target].double() - s[target].double()
        kept = 1 - (delta - u @ v).pow(2).sum() / delta.pow(2).sum()
        # the factors span the top singular directions, so the residual energy is what was dropped
        assert kept >= 0.6 - 1e-6, target
        assert u.shape[1] < min(delta.shape)
    with safe_open(ck.files[0], "pt") as f:
        meta = f.metadata()
    assert meta["pdelta_kind"] == "delta" and json.loads(meta["pdelta_energy"]) == 0.6


def test_full_rank_factors_reproduce_the_delta(triple, tmp_path):
    post, base, new_base = triple
    paramdelta.extract(tmp_path / "r", post=post, base=base, rank=10_000, progress=False)
    ck = Checkpoint.open(tmp_path / "r")
    # at full rank, factors would be larger than the matrix, so every tensor is stored in full
    assert not any(n.endswith("@U") for n in ck.tensors)
    paramdelta.extract(tmp_path / "r8", post=post, base=base, rank=8, progress=False)
    ck8 = Checkpoint.open(tmp_path / "r8")
    us = [n for n in ck8.tensors if n.endswith("@U")]
    assert us and all(ck8.tensors[n].shape[1] == 8 for n in us)
    paramdelta.apply(tmp_path / "m", new_base=new_base, deltas=[(tmp_path / "r8", 1.0)], progress=False)
    out, nb = load_state(tmp_path / "m"), load_state(new_base)
    assert out.keys() == nb.keys()
    assert all(torch.isfinite(v.float()).all() for v in out.values())


def test_bad_extract_options_and_inputs(triple, tmp_path):
    post, base, _ = triple
    with pytest.raises(OptionError, match="exclude"):
        paramdelta.extract(tmp_path / "a", post=post, base=base, rank=4, energy=0.5)
    with pytest.raises(OptionError, match="positive"):
        paramdelta.extract(tmp_path / "b", post=post, base=base, rank=0)
    with pytest.raises(OptionError, match="energy"):
        paramdelta.extract(tmp_path / "c", post=post, base=base, energy=1.5)
    tok = train_tiny_tokenizer(tmp_path / "tok", vocab_extra=["<|im_start|>", "<|im_end|>"])
    grown = perturb(post, tmp_path / "grown", seed=5, resize_vocab_to=len(tok), tokenizer=tok)
    with pytest.raises(PreflightError, match="embed_tokens"):
        paramdelta.extract(tmp_path / "d", post=grown, base=base)
    assert not (tmp_path / "d").exists()


def test_extract_cli(triple, tmp_path, cli):
    post, base, _ = triple
    code, out, err = cli("extract", "--post", post, "--base", base, "--out", tmp_path / "d", "--rank", "4",
                         "--format", "json")
    assert code == 0, err
    assert json.loads(out)["lowrank"] > 0
    code, out, err = cli("extract", "--post", post, "--base", base, "--out", tmp_path / "e", "--rank", "4",
                         "--energy", "0.5")
    assert code == 2 and err.startswith("error:") and "exclude" in err
