"""`apply` end to end on tiny checkpoints, checked element by element against an independent fp64 sum.

Every expected tensor is recomputed here from the input tensors (tests/tinymodels.py builds them by
seeded perturbation); nothing is copied from an earlier run. How exact each check is:

* alpha 1 or 0.5 (α·x is exact in binary): bit-exact against `(new_base + α(post − base))` done in
  fp64 and rounded once to the output dtype.
* alpha 0.7 / 0.3: at most 1 ulp of the output dtype, on at most 0.1% of the elements. The engine
  computes `acc.add_(d, alpha=α)`, which torch evaluates as a fused multiply-add, while the reference
  rounds α·d first; the two can round a tie to different neighbours (seen on 1 of ~25k elements).
* rows made from a mean (new-token policies zero-delta and mean): bit-exact for fp32 inputs (fp64
  math), at most 1 ulp for bf16 inputs (the engine rounds the means to fp32 before the last step).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
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
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from paramdelta.checkpoint import Checkpoint
from paramdelta.delta import OUT_ELEMENTS, apply
from paramdelta.errors import NonFiniteError, PreflightError

BF16, FP32 = torch.bfloat16, torch.float32
DTYPE_IDS = {BF16: "bf16", FP32: "fp32"}
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
SMALL_SHARDS = "8KB"  # the tiny models are ~25-50 kB, so this gives several output shards
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


# -- independent references ---------------------------------------------------------------------
def reference(new_base: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor, float]],
              dtype: torch.dtype) -> torch.Tensor:
    """acc = new_base; acc += α·(post − base) for each term, all in fp64; rounded once to `dtype`."""
    acc = new_base.double()
    for post, base, alpha in terms:
        acc = acc + alpha * (post.double() - base.double())
    return acc.to(dtype)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between same-dtype float tensors (0 means bit-equal, ±0 aside)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(bits).to(torch.int64)
        magnitude = i & ((1 << (8 * t.element_size() - 1)) - 1)
        return torch.where(i < 0, -magnitude, magnitude)

    return (ordered(a) - ordered(b)).abs()


def is_vocab(name: str) -> bool:
    return name in (EMBED, LM_HEAD)


# -- reading outputs without the library ---------------------------------------------------------
def shard_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files in order (the index's shards, or the single file)."""
    index = folder / INDEX_NAME
    if index.exists():
        return [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"]


def raw_header(file: Path) -> tuple[bytes, dict]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    return raw, json.loads(raw)


def disk_order(folder: Path) -> list[str]:
    """Tensor names as their bytes lie on disk: shard by shard, by data offset."""
    names: list[str] = []
    for f in shard_files(folder):
        header = raw_header(f)[1]
        header.pop("__metadata__", None)
        names += sorted(header, key=lambda k: header[k]["data_offsets"][0])
    return names


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data, indent=2) + "\n")


def copy_inputs(paths, root: Path) -> list[Path]:
    """Private copies of module-scoped inputs, for tests that edit side files."""
    out = []
    for p in paths:
        shutil.copytree(p, root / p.name)
        out.append(root / p.name)
    return out


# -- the tiny world (built once per module) ------------------------------------------------------
@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    """triple(family, dtype) -> (post, base, new_base), built on first use and shared."""
    cache: dict[tuple[str, torch.dtype], tuple[Path, Path, Path]] = {}

    def get(family: str, dtype: torch.dtype = BF16) -> tuple[Path, Path, Path]:
        if (family, dtype) not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{DTYPE_IDS[dtype]}")
            cache[family, dtype] = make_triple(root, family, dtype)
        return cache[family, dtype]

    return get


@pytest.fixture(scope="module")
def merged(triple, tmp_path_factory):
    """merged(family) -> (out, report): the default bf16 merge with alpha 1, in small shards."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            post, base, new_base = triple(family)
            out = tmp_path_factory.mktemp(f"merged-{family}") / "out"
            cache[family] = out, apply(out, post=post, base=base, new_base=new_base, max_shard_size=SMALL_SHARDS)
        return cache[family]

    return get




# -- 1. the formula, element by element ----------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_matches_fp64_reference(triple, tmp_path, family, dtype, alpha):
    post, base, new_base = triple(family, dtype)
    out = tmp_path / "out"
    report = apply(out, post=post, base=base, new_base=new_base, alpha=alpha, max_shard_size=SMALL_SHARDS)
    P, B, N, R = load_state(post), load_state(base), load_state(new_base), load_state(out)

    assert set(R) == set(N)
    for name, nb in N.items():
        assert R[name].dtype == dtype and R[name].shape == nb.shape, name
        assert torch.equal(R[name], reference(nb, [(P[name], B[name], alpha)], dtype)), name
    assert report.tensors == len(N)
    assert report.counts == {"formula": len(N)}  # nothing deviated from the plain formula

    # really sharded: an index naming >1 shard, every tensor in the shard the index says
    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert set(index["weight_map"]) == set(N)
    for f in files:
        header = raw_header(out / f)[1]
        header.pop("__metadata__", None)
        assert all(index["weight_map"][name] == f for name in header)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in R.values())

    # tying follows the new base; gemma (tied) gets no lm_head
    assert config(out)["tie_word_embeddings"] == config(new_base)["tie_word_embeddings"]
    if family == "gemma":
        assert LM_HEAD not in R and config(out)["tie_word_embeddings"] is True


def test_single_file_when_it_fits(triple, tmp_path):
    post, base, new_base = triple("mistral")
    out = tmp_path / "out"
    apply(out, post=post, base=base, new_base=new_base, max_shard_size="1GB")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / INDEX_NAME).exists()
    P, B, N, R = load_state(post), load_state(base), load_state(new_base), load_state(out)
    assert set(R) == set(N)
    assert all(torch.equal(R[k], reference(N[k], [(P[k], B[k], 1.0)], BF16)) for k in N)


# -- 2. identities, bit-exact --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("family", FAMILIES)
def test_identities_are_bit_exact(triple, tmp_path, family, dtype):
    post, base, new_base = triple(family, dtype)
    base_again = shutil.copytree(base, tmp_path / "base_again")  # same bytes, another folder
    P, N = load_state(post), load_state(new_base)

    cases = {
        "new_base == base => out == post": (dict(post=post, base=base, new_base=base_again), P),
        "post == base => out == new_base": (dict(post=base_again, base=base, new_base=new_base, alpha=0.7), N),
        "alpha == 0 => out == new_base": (dict(post=post, base=base, new_base=new_base, alpha=0.0), N),
    }
    for i, (what, (kwargs, expected)) in enumerate(cases.items()):
        out = tmp_path / f"out{i}"
        apply(out, max_shard_size=SMALL_SHARDS, **kwargs)
        R = load_state(out)
        assert set(R) == set(expected), what
        for name, t in expected.items():
            assert torch.equal(R[name], t), f"{what}: {name}"


# -- 3. several deltas ---------------------------------------------------------------------------
def test_two_terms_via_api_and_cli_match_fp64(triple, tmp_path, cli):
    post1, base, new_base = triple("qwen2")
    post2 = perturb(base, tmp_path / "post2", seed=3)
    api_out, cli_out = tmp_path / "api", tmp_path / "cli"
    report = apply(api_out, new_base=new_base, terms=[(post1, base, 0.7), (post2, base, 0.3)])
    code, stdout, stderr = cli("apply", "--post", post1, "--base", base, "--alpha", "0.7",
                               "--post", post2, "--base", base, "--alpha", "0.3",
                               "--new-base", new_base, "--out", cli_out, "--no-progress")
    assert code == 0, stderr
    assert str(cli_out) in stdout

    P1, P2, B, N = load_state(post1), load_state(post2), load_state(base), load_state(new_base)
    A, C = load_state(api_out), load_state(cli_out)
    assert set(A) == set(C) == set(N)
    off = total = 0
    for name in N:
        assert torch.equal(A[name], C[name]), name  # the CLI is the API
        d = ulps(A[name], reference(N[name], [(P1[name], B[name], 0.7), (P2[name], B[name], 0.3)], BF16))
        assert int(d.max()) <= 1, name
        off += int((d > 0).sum())
        total += d.numel()
    assert off <= total // 1000, f"{off} of {total} elements are 1 ulp off"
    # both terms are recorded as given
    with safe_open(shard_files(api_out)[0], "pt") as f:
        assert json.loads(f.metadata()["pdelta_alpha"]) == [0.7, 0.3]
    assert "0.7" in report.formula and "0.3" in report.formula


# -- 4. output dtype, config, tokenizer ----------------------------------------------------------
@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                         ("float16", torch.float16)])
def test_dtype_flag_sets_output_dtype(triple, tmp_path, cli, name, dtype):
    post, base, new_base = triple("llama")
    out = tmp_path / "out"
    code, _, stderr = cli("apply", "--post", post, "--base", base, "--new-base", new_base, "--out", out,
                          "--dtype", name, "--no-progress")
    assert code == 0, stderr
    P, B, N, R = load_state(post), load_state(base), load_state(new_base), load_state(out)
    assert set(R) == set(N)
    for k in N:
        assert R[k].dtype == dtype, k
        assert torch.equal(R[k], reference(N[k], [(P[k], B[k], 1.0)], dtype)), k
    assert config(out)["dtype"] == name


def with_value(src: Path, dst: Path, name: str, index: int, value: float) -> Path:
    """A copy of checkpoint `src` (one file, same side files) whose tensor `name` holds `value` at flat `index`."""
    state = load_state(src)
    state[name] = state[name].clone()
    state[name].view(-1)[index] = value
    dst.mkdir()
    save_file(state, dst / "model.safetensors")
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != INDEX_NAME:
            shutil.copy2(f, dst / f.name)
    return dst


@pytest.mark.parametrize("where", ["vocab rows", "end of an output buffer"])
def test_float16_overflow_is_refused(grown, tmp_path, where):
    """70000 is fine in bf16 but Inf in fp16: --dtype float16 must fail, not write Inf."""
    if where == "vocab rows":  # the row-aligned path (post has 2 extra tokens)
        post, base, new_base = grown("llama", BF16)
        name, index = EMBED, 5 * 32 + 7
    else:  # a plain tensor larger than one pooled output buffer, overflowing in the buffer's last element
        name, index = "w", OUT_ELEMENTS - 1
        post, base, new_base = (tmp_path / r for r in ("post", "base", "new_base"))
        for folder in (post, base, new_base):
            folder.mkdir()
            save_file({name: torch.zeros(OUT_ELEMENTS // 1024 + 1, 1024, dtype=BF16)}, folder / "model.safetensors")
    loud = with_value(new_base, tmp_path / "loud", name, index, 70000.0)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=name):
        apply(out, post=post, base=base, new_base=loud, dtype="float16")
    assert not out.exists()


@pytest.fixture
def distinct_sides(triple, tmp_path):
    """A llama triple whose new base and post disagree on config, tokenizer config, chat template
    and generation config, so every output side file can be traced to its source."""
    post, base, new_base = copy_inputs(triple("llama"), tmp_path / "in")
    nb_cfg = config(new_base)
    edit_json(new_base / "config.json", max_position_embeddings=256,
              rope_parameters={**nb_cfg["rope_parameters"], "rope_theta": 50000.0})
    (post / "chat_template.jinja").write_text("{{ 'post template: ' }}" + (post / "chat_template.jinja").read_text())
    edit_json(post / "generation_config.json", do_sample=True, temperature=0.25)
    edit_json(new_base / "generation_config.json", max_length=77)
    edit_json(post / "tokenizer_config.json", model_max_length=123)
    edit_json(new_base / "tokenizer_config.json", model_max_length=456)
    for f in ("config.json", *SIDE_FILES[1:]):
        assert (post / f).read_bytes() != (new_base / f).read_bytes(), f
    return post, base, new_base


def _assert_config_from(out: Path, src: Path) -> None:
    """config.json is src's, except the keys apply sets on purpose (dtype, tying, vocab size, token ids)."""
    managed = {"dtype", "tie_word_embeddings", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}
    got, want = config(out), config(src)
    assert {k: v for k, v in got.items() if k not in managed} == {k: v for k, v in want.items() if k not in managed}


def test_config_from_new_base_tokenizer_from_post_by_default(distinct_sides, tmp_path):
    post, base, new_base = distinct_sides
    out = tmp_path / "out"
    apply(out, post=post, base=base, new_base=new_base)
    cfg = config(out)
    assert cfg["max_position_embeddings"] == 256 and cfg["rope_parameters"]["rope_theta"] == 50000.0
    _assert_config_from(out, new_base)
    for f in SIDE_FILES:
        assert (out / f).read_bytes() == (post / f).read_bytes(), f
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template.startswith("{{ 'post template: ' }}")
    assert tok.model_max_length == 123
    assert GenerationConfig.from_pretrained(out).temperature == 0.25
    assert AutoModelForCausalLM.from_pretrained(out).config.max_position_embeddings == 256


def test_config_from_post_tokenizer_from_new_base(distinct_sides, tmp_path):
    post, base, new_base = distinct_sides
    out = tmp_path / "out"
    apply(out, post=post, base=base, new_base=new_base, config_from="post", tokenizer_from="new-base")
    cfg = config(out)
    assert cfg["max_position_embeddings"] == 128 and cfg["rope_parameters"]["rope_theta"] == 10000.0
    _assert_config_from(out, post)
    for f in SIDE_FILES:
        assert (out / f).read_bytes() == (new_base / f).read_bytes(), f
    tok = AutoTokenizer.from_pretrained(out)
    assert not tok.chat_template.startswith("{{ 'post template: ' }}")
    assert tok.model_max_length == 456
    assert GenerationConfig.from_pretrained(out).max_length == 77


# -- 5. vocabulary alignment ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """grown(family, dtype) -> (post, base, new_base): post added CHAT_TOKENS (98 rows), the bases keep 96."""
    cache: dict[tuple[str, torch.dtype], tuple[Path, Path, Path]] = {}

    def get(family: str, dtype: torch.dtype):
        if (family, dtype) not in cache:
            root = tmp_path_factory.mktemp(f"grown-{family}-{DTYPE_IDS[dtype]}")
            tok = train_tiny_tokenizer(root / "tok")
            chat_tok = train_tiny_tokenizer(root / "chat_tok", vocab_extra=CHAT_TOKENS)
            base = make_checkpoint(root / "base", family, seed=0, tokenizer=tok, dtype=dtype)
            post = perturb(base, root / "post", seed=1, resize_vocab_to=len(chat_tok), tokenizer=chat_tok)
            new_base = perturb(base, root / "new_base", seed=2)
            cache[family, dtype] = post, base, new_base
        return cache[family, dtype]

    return get


@pytest.mark.parametrize("policy", ["copy-post", "zero-delta", "mean"])
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_new_chat_tokens_follow_policy(grown, tmp_path, family, dtype, policy):
    post, base, new_base = grown(family, dtype)
    alpha, rows = 0.5, VOCAB_SIZE + len(CHAT_TOKENS)
    out = tmp_path / "out"
    report = apply(out, post=post, base=base, new_base=new_base, alpha=alpha, new_token_policy=policy)
    P, B, N, R = load_state(post), load_state(base), load_state(new_base), load_state(out)
    assert P[EMBED].shape[0] == rows and N[EMBED].shape[0] == VOCAB_SIZE  # the world is what we think

    assert set(R) == set(N)
    vocab = sorted(k for k in N if is_vocab(k))
    assert vocab == ([LM_HEAD, EMBED] if family == "llama" else [EMBED])
    for name in N:
        if name not in vocab:
            assert torch.equal(R[name], reference(N[name], [(P[name], B[name], alpha)], dtype)), name
            continue
        o, p, b, n = R[name], P[name], B[name], N[name]
        assert o.shape == (rows, n.shape[1]) and o.dtype == dtype
        # shared rows (same ids here): the formula
        assert torch.equal(o[:VOCAB_SIZE], reference(n, [(p[:VOCAB_SIZE], b, alpha)], dtype)), name
        # rows only post has: the policy
        if policy == "copy-post":
            assert torch.equal(o[VOCAB_SIZE:], p[VOCAB_SIZE:]), name
            continue
        nb_mean = n.double().mean(0)
        if policy == "zero-delta":
            expected = nb_mean.expand(len(CHAT_TOKENS), -1).to(dtype)
        else:
            expected = (nb_mean + alpha * (p[VOCAB_SIZE:].double() - b.double().mean(0))).to(dtype)
        assert int(ulps(o[VOCAB_SIZE:], expected).max()) <= (0 if dtype == FP32 else 1), name

        mine = {k: v for k, v in report.counts.items() if k.startswith(f"{name}: ")}
        assert sum(mine.values()) == rows, mine
        assert [v for k, v in mine.items() if policy in k] == [len(CHAT_TOKENS)], mine
        assert [v for k, v in mine.items() if "formula" in k] == [VOCAB_SIZE], mine

    assert config(out)["vocab_size"] == rows
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == rows and tok.convert_tokens_to_ids(CHAT_TOKENS) == [96, 97]


@pytest.mark.parametrize("tokenizer_from", ["post", "new-base"])
def test_permuted_token_ids_are_aligned_by_string(triple, tmp_path, tokenizer_from):
    """The new base gives the same 96 tokens other ids (and its rows moved with them)."""
    post, base, new_base = triple("llama")
    perm = torch.arange(VOCAB_SIZE)  # token with id i in post/base has id perm[i] in the new base
    perm[4:] = 4 + torch.randperm(VOCAB_SIZE - 4, generator=torch.Generator().manual_seed(0))
    inv = torch.argsort(perm)
    N = load_state(new_base)
    moved = make_checkpoint(tmp_path / "moved", "llama", dtype=BF16,
                            state_dict={k: v[inv] if is_vocab(k) else v for k, v in N.items()})
    for f in SIDE_FILES:
        shutil.copy2(new_base / f, moved / f)
    tj = json.loads((new_base / "tokenizer.json").read_text())
    tj["model"]["vocab"] = {t: int(perm[i]) for t, i in tj["model"]["vocab"].items()}
    (moved / "tokenizer.json").write_text(json.dumps(tj))
    old_ids = Tokenizer.from_file(str(new_base / "tokenizer.json")).get_vocab()
    new_ids = Tokenizer.from_file(str(moved / "tokenizer.json")).get_vocab()
    assert new_ids == {t: int(perm[i]) for t, i in old_ids.items()} and new_ids != old_ids

    out = tmp_path / "out"
    report = apply(out, post=post, base=base, new_base=moved, tokenizer_from=tokenizer_from)
    P, B, M, R = load_state(post), load_state(base), load_state(moved), load_state(out)
    assert set(R) == set(N)
    for name in N:
        expected = reference(N[name], [(P[name], B[name], 1.0)], BF16)  # rows in post's id order
        if is_vocab(name):
            # row by row without alignment would be something else: this test can tell
            assert not torch.equal(reference(M[name], [(P[name], B[name], 1.0)], BF16), expected)
            if tokenizer_from == "new-base":
                expected = expected[inv]  # rows in the new base's id order
            assert report.counts.get(f"{name}: formula") == VOCAB_SIZE, report.counts
        assert torch.equal(R[name], expected), name
    src = post if tokenizer_from == "post" else moved
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


# -- 6. tied embeddings --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tie_world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tie")
    tok = train_tiny_tokenizer(root / "tok")
    w = {}
    for tied in (True, False):
        kind = "tied" if tied else "untied"
        w[f"{kind}_base"] = make_checkpoint(root / f"{kind}_base", "llama", seed=0, tokenizer=tok, dtype=BF16, tie=tied)
        w[f"{kind}_post"] = perturb(w[f"{kind}_base"], root / f"{kind}_post", seed=1)
        w[f"{kind}_new"] = perturb(make_checkpoint(root / f"{kind}_seed5", "llama", seed=5, tokenizer=tok, dtype=BF16,
                                                   tie=tied), root / f"{kind}_new", seed=2)
    return w


def test_untied_new_base_takes_lm_head_delta_from_tied_embedding(tie_world, tmp_path):
    post, base, new_base = tie_world["tied_post"], tie_world["tied_base"], tie_world["untied_new"]
    P, B, N = load_state(post), load_state(base), load_state(new_base)
    assert LM_HEAD not in P and LM_HEAD not in B and LM_HEAD in N
    out = tmp_path / "out"
    apply(out, post=post, base=base, new_base=new_base, alpha=0.5)
    R = load_state(out)
    assert set(R) == set(N)
    assert torch.equal(R[LM_HEAD], reference(N[LM_HEAD], [(P[EMBED], B[EMBED], 0.5)], BF16))
    for name in N.keys() - {LM_HEAD}:
        assert torch.equal(R[name], reference(N[name], [(P[name], B[name], 0.5)], BF16)), name
    assert config(out)["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.lm_head.weight.to(BF16), R[LM_HEAD])


def test_tied_new_base_refuses_untied_post_unless_allowed(tie_world, tmp_path):
    post, base, new_base = tie_world["untied_post"], tie_world["untied_base"], tie_world["tied_new"]
    P, B, N = load_state(post), load_state(base), load_state(new_base)
    assert LM_HEAD in P and LM_HEAD not in N
    out = tmp_path / "out"
    with pytest.raises(PreflightError) as e:
        apply(out, post=post, base=base, new_base=new_base)
    assert "lm_head" in str(e.value) and "allow-tie-mismatch" in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".out.pdelta-tmp-*"))

    report = apply(out, post=post, base=base, new_base=new_base, alpha=0.5, allow_tie_mismatch=True)
    R = load_state(out)
    assert set(R) == set(N)  # no lm_head appears
    for name in N:
        assert torch.equal(R[name], reference(N[name], [(P[name], B[name], 0.5)], BF16)), name
    assert config(out)["tie_word_embeddings"] is True
    assert any("lm_head" in n for n in report.notes), report.notes


# -- 7. the output is a model: loads, generates, says where it came from -----------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_output_loads_and_generates(merged, family):
    out, _ = merged(family)
    R = load_state(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    for name, t in R.items():  # every weight loaded as written, none re-initialised
        assert torch.equal(state[name].to(t.dtype), t), name
    if family == "gemma":
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the quick brown fox", return_tensors="pt")
    with torch.no_grad():
        got = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert got.shape == (1, ids["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_card_and_shard_provenance(triple, merged, family):
    post, base, new_base = triple(family)
    out, report = merged(family)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model_relation"] == "merge"
    assert {str(new_base), str(post)} <= set(front["base_model"])

    files = shard_files(out)
    assert len(files) > 1
    metas = []
    for f in files:
        with safe_open(f, "pt") as s:
            metas.append(s.metadata())
    assert all(m == metas[0] for m in metas)  # every shard carries the full record
    meta = metas[0]
    assert meta["pdelta_formula"] == report.formula
    assert json.loads(meta["pdelta_alpha"]) == [1.0]
    records = {Path(r["path"]): r for r in json.loads(meta["pdelta_inputs"])}
    for folder in (post, base, new_base):
        rec = records[folder.resolve()]
        assert set(rec["files"]) == {f.name for f in folder.glob("*.safetensors")}
        for name, entry in rec["files"].items():
            assert entry["header_sha256"] == hashlib.sha256(raw_header(folder / name)[0]).hexdigest(), name


# -- 8. storage order ----------------------------------------------------------------------------
def write_shuffled(src: Path, dst: Path, seed: int, shards: int = 3) -> list[str]:
    """Copy checkpoint `src` to `dst` with its tensors laid out on disk in a seeded random order, in
    `shards` files (save_pretrained always writes name order). Returns the new on-disk order."""
    state = load_state(src)
    names = list(state)
    order = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))]
    dst.mkdir()
    weight_map = {}
    per = -(-len(order) // shards)
    for s in range(shards):
        part, file = order[s * per:(s + 1) * per], f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, blobs, offset = {}, [], 0
        for name in part:
            t = state[name].contiguous()
            blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            header[name] = {"dtype": {BF16: "BF16", FP32: "F32"}[t.dtype], "shape": list(t.shape),
                            "data_offsets": [offset, offset + len(blob)]}
            blobs.append(blob)
            offset += len(blob)
            weight_map[name] = file
        raw = json.dumps(dict(sorted(header.items()))).encode()  # keys by name, bytes shuffled
        raw += b" " * (-len(raw) % 8)
        (dst / file).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != INDEX_NAME:
            shutil.copy2(f, dst / f.name)
    return order


@pytest.mark.parametrize("family", FAMILIES)
def test_output_follows_new_base_disk_order(triple, tmp_path, family):
    post, base, new_base = triple(family)
    shuffled = tmp_path / "shuffled"  # the same new base, its tensors stored in another order
    order = write_shuffled(new_base, shuffled, seed=sum(map(ord, family)))
    N = load_state(new_base)
    assert load_state(shuffled).keys() == N.keys()
    assert all(torch.equal(t, N[k]) for k, t in load_state(shuffled).items())
    assert disk_order(shuffled) == order == list(Checkpoint.open(shuffled).tensors)
    assert order != disk_order(post) and order != sorted(order)

    out = tmp_path / "out"
    apply(out, post=post, base=base, new_base=shuffled, max_shard_size=SMALL_SHARDS)
    assert len(shard_files(out)) > 1
    assert disk_order(out) == order
    P, B, R = load_state(post), load_state(base), load_state(out)
    assert all(torch.equal(R[k], reference(N[k], [(P[k], B[k], 1.0)], BF16)) for k in N)
