"""`pdelta inspect` and `pdelta verify` on real tiny models: numbers checked against torch, failures caught.

inspect: the header-only summary matches what load_state sees and never touches a weight byte;
the diagnostics equal a direct fp64 computation. verify: passes on real `apply` outputs (plain,
stored low-rank deltas, mixed terms) and fails on a corrupted output element, a NaN, an input
edited in place after the merge, a resized or missing input, and an output without provenance.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tinymodels import load_state, make_triple, perturb, train_tiny_tokenizer

import paramdelta
from paramdelta import inspection
from paramdelta.checkpoint import Checkpoint
from paramdelta.cli.main import main
from paramdelta.errors import OptionError, VerifyError
from paramdelta.extraction import extract
from paramdelta.inspection import compare, group_of, inspect_checkpoint, plot_comparison
from paramdelta.verification import ulp_distance, verify

os.environ["PDELTA_NO_PROGRESS"] = "1"
Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path, Path]:
    return make_triple(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> tuple[Path, Path, Path]:
    return make_triple(tmp_path_factory.mktemp("gemma"), "gemma")


@pytest.fixture
def inputs(llama, tmp_path) -> tuple[Path, Path, Path]:
    """A private copy of the llama triple, for tests that change an input."""
    return tuple(Path(shutil.copytree(p, tmp_path / "in" / p.name)) for p in llama)


def merged(inputs, out: Path, **kw) -> Path:
    post, base, new_base = inputs
    paramdelta.apply(out, post=post, base=base, new_base=new_base, progress=False, **kw)
    return out


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["pdelta", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def no_weight_reads(monkeypatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("a weight was read")

    for attr in ("read", "read_into", "_map", "_fd"):
        monkeypatch.setattr(Checkpoint, attr, refuse)


# -- inspect: summary ---------------------------------------------------------------------------
@pytest.mark.parametrize("family, tied", [("gemma", True), ("llama", False)])
def test_summary_matches_the_checkpoint_without_reading_weights(request, monkeypatch, family, tied):
    post, base, _ = request.getfixturevalue(family)
    state = load_state(base)
    no_weight_reads(monkeypatch)
    s = inspect_checkpoint(base)
    assert s["parameters"] == sum(t.numel() for t in state.values())
    assert s["bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert s["tensors"] == len(state)
    assert s["dtypes"] == {"BF16": {"tensors": len(state), "parameters": s["parameters"]}}
    assert s["shards"] == len(list(base.glob("*.safetensors"))) > 1
    assert s["tie_word_embeddings"] is tied
    assert s["lm_head_stored"] is (not tied) is ("lm_head.weight" in state)
    assert s["vocab"] == {"config": 96, "embedding_rows": 96, "lm_head_rows": None if tied else 96, "tokenizer": 96}
    assert s["architecture"]["model_type"] == family
    assert s["architecture"]["num_hidden_layers"] == 2 and s["architecture"]["num_key_value_heads"] == 2
    assert s["provenance"] is None


def test_summary_shows_provenance_of_an_apply_output(inputs, tmp_path, monkeypatch, capsys):
    out = merged(inputs, tmp_path / "out", alpha=0.5)
    no_weight_reads(monkeypatch)
    prov = inspect_checkpoint(out)["provenance"]
    assert prov["kind"] == "merge" and prov["alpha"] == [0.5]
    assert [i["role"] for i in prov["inputs"]] == ["new_base", "post[0]", "base[0]"]
    code, stdout, _ = run_cli(["inspect", str(out)], monkeypatch, capsys)
    assert code == 0 and "provenance" in stdout and "post[0]" in stdout and "untied" in stdout


def test_cli_inspect_json(gemma, monkeypatch, capsys):
    _, base, _ = gemma
    code, stdout, _ = run_cli(["inspect", str(base), "--format", "json"], monkeypatch, capsys)
    assert code == 0
    data = json.loads(stdout)
    assert data["tie_word_embeddings"] is True and data["parameters"] == inspect_checkpoint(base)["parameters"]


def test_cli_inspect_rejects_half_a_triple(llama, monkeypatch, capsys):
    post, base, _ = llama
    code, _, err = run_cli(["inspect", "--post", str(post), "--base", str(base)], monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and "--new-base" in err


# -- inspect: diagnostics -----------------------------------------------------------------------
def direct(post: dict, base: dict, new: dict, names: list[str], rows: int | None = None) -> dict[str, float]:
    """The four diagnostics over `names` together, straight from whole fp64 tensors."""
    b = torch.cat([base[n][:rows].double().reshape(-1) for n in names])
    dp = torch.cat([post[n][:rows].double().reshape(-1) for n in names]) - b
    du = torch.cat([new[n][:rows].double().reshape(-1) for n in names]) - b
    both = (dp != 0) & (du != 0)
    return {"post_rel": float(dp.norm() / b.norm()), "update_rel": float(du.norm() / b.norm()),
            "cos": float(dp @ du / (dp.norm() * du.norm())),
            "sign_agreement": float((torch.sign(dp) == torch.sign(du))[both].double().mean())}


def assert_metrics(got: dict, want: dict) -> None:
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=1e-9, abs_tol=1e-12), (k, got[k], v)


def test_compare_matches_torch_per_tensor_group_and_layer(llama, monkeypatch):
    post, base, new_base = llama
    p, b, n = load_state(post), load_state(base), load_state(new_base)
    monkeypatch.setattr(inspection, "CHUNK_ELEMENTS", 300)  # several chunks per tensor: sums must carry over
    r = compare(post, base, new_base, progress=False)
    tensor = next(t for t in r["tensors"] if t["name"] == Q0)
    assert_metrics(tensor, direct(p, b, n, [Q0]))
    group = next(g for g in r["groups"] if g["group"] == "mlp.down_proj.weight")
    assert group["tensors"] == 2
    assert_metrics(group, direct(p, b, n, [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]))
    layer1 = [k for k in b if k.startswith("model.layers.1.")]
    assert_metrics(next(lay for lay in r["layers"] if lay["layer"] == 1), direct(p, b, n, layer1))
    assert_metrics(r["overall"], direct(p, b, n, list(b)))
    assert r["overall"]["numel"] == sum(t.numel() for t in b.values())
    assert not r["flagged"] and not r["skipped"]
    assert {g["group"] for g in r["groups"]} >= {"self_attn.q_proj.weight", "lm_head.weight", "norm.weight",
                                                 "embed_tokens.weight", "input_layernorm.weight"}


def test_group_of_strips_the_layer_index():
    assert group_of(DOWN) == ("mlp.down_proj.weight", 1)
    assert group_of("lm_head.weight") == ("lm_head.weight", None)


def test_compare_flags_vocab_growth_on_common_rows(tmp_path):
    tok = train_tiny_tokenizer(tmp_path / "tok")
    post, base, new_base = make_triple(tmp_path, "llama")
    grown = perturb(base, tmp_path / "post98", seed=3, resize_vocab_to=98, tokenizer=tok)
    r = compare(grown, base, new_base, progress=False)
    flagged = {f["name"]: f["reason"] for f in r["flagged"]}
    assert set(flagged) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert "post 98" in flagged["lm_head.weight"] and "first 96" in flagged["lm_head.weight"]
    p, b, n = load_state(grown), load_state(base), load_state(new_base)
    head = next(t for t in r["tensors"] if t["name"] == "lm_head.weight")
    assert head["numel"] == 96 * 32
    assert_metrics(head, direct(p, b, n, ["lm_head.weight"], rows=96))


def test_plot_is_a_real_png(llama, tmp_path, monkeypatch, capsys):
    from matplotlib.image import imread

    post, base, new_base = llama
    png = plot_comparison(compare(post, base, new_base, progress=False), tmp_path / "d.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(png).shape[0] > 200
    code, stdout, _ = run_cli(["inspect", "--post", str(post), "--base", str(base), "--new-base", str(new_base),
                               "--plot", str(tmp_path / "cli.png"), "--format", "json"], monkeypatch, capsys)
    data = json.loads(stdout)
    assert code == 0 and (tmp_path / "cli.png").read_bytes()[:4] == b"\x89PNG"
    assert data["plot"] == str(tmp_path / "cli.png") and len(data["groups"]) == 12 and len(data["layers"]) == 2


# -- verify -------------------------------------------------------------------------------------
def test_ulp_distance():
    a = torch.tensor([1.0, 1.0, 0.0, -0.0, float("nan"), 2.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0, 1.0078125, -0.0, 0.0, float("nan"), 1.9921875], dtype=torch.bfloat16)
    assert ulp_distance(a, b).tolist() == [0, 1, 0, 0, 0, 1]
    tiny = torch.tensor([1e-45, -1e-45], dtype=torch.float32)  # ± the smallest subnormal
    assert ulp_distance(tiny[:1], tiny[1:]).tolist() == [2]


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_verify_passes_on_a_real_apply_output(request, tmp_path, family):
    out = merged(request.getfixturevalue(family), tmp_path / "out")
    report = verify(out, samples=8, progress=False)
    rc = report["checks"]["recompute"]
    assert report["ok"] and rc["ok"] and rc["mismatched"] == 0
    assert rc["tensors"] == len(load_state(out)) and rc["exact"] + rc["within_1ulp"] == rc["elements"] > 0
    assert rc["rows"] < sum(t.shape[0] for t in load_state(out).values())  # a sample, not everything
    assert report["checks"]["finite"]["ok"] and report["checks"]["load"]["ok"]
    assert report["checks"]["load"]["logits_shape"] == [1, 5, 96]


def test_verify_checks_stored_low_rank_deltas_and_mixed_terms(inputs, tmp_path):
    post, base, new_base = inputs
    delta = tmp_path / "delta"
    extract(delta, post=post, base=base, rank=4, progress=False)
    assert verify(delta, load=False, progress=False)["ok"]  # full tensors recomputed, factors finite-checked
    out = tmp_path / "out"
    paramdelta.apply(out, new_base=new_base, terms=[(post, base, 0.7)], deltas=[(delta, 0.5)], progress=False)
    report = verify(out, samples=32, progress=False)
    assert report["alpha"] == [0.7, 0.5] and report["checks"]["recompute"]["mismatched"] == 0


def corrupt_element(ckpt_dir: Path, name: str, element: int, high_byte: int | None = None,
                    value: bytes | None = None) -> None:
    """Rewrite one bf16 element in place: flip its exponent's low bit, or write `value`."""
    info = Checkpoint.open(ckpt_dir).tensors[name]
    pos = info.start + 2 * element
    with open(info.file, "r+b") as f:
        f.seek(pos)
        old = f.read(2)
        f.seek(pos)
        f.write(value if value is not None else bytes([old[0], old[1] ^ 0x01]))


def test_verify_fails_on_one_corrupted_output_element(inputs, tmp_path, monkeypatch, capsys):
    out = merged(inputs, tmp_path / "out")
    assert verify(out, load=False, progress=False)["ok"]
    corrupt_element(out, DOWN, element=5 * 64 + 7)  # row 5, column 7 of a 32×64 tensor
    with pytest.raises(VerifyError) as e:
        verify(out, samples=1000, load=False, progress=False)  # every row sampled
    rc = e.value.report["checks"]["recompute"]
    assert rc["mismatched"] == 1 and e.value.report["checks"]["finite"]["ok"]
    assert (rc["examples"][0]["tensor"], rc["examples"][0]["row"], rc["examples"][0]["column"]) == (DOWN, 5, 7)
    assert DOWN in str(e.value) and "recompute" in str(e.value)
    code, stdout, err = run_cli(["verify", str(out), "--samples", "1000", "--no-load"], monkeypatch, capsys)
    assert code == 2 and "FAILED" in stdout and err.startswith("error:") and "fix:" in err


def test_verify_fails_on_nan_in_the_output(inputs, tmp_path):
    out = merged(inputs, tmp_path / "out")
    corrupt_element(out, "model.norm.weight", element=3, value=b"\xc0\x7f")  # bf16 NaN
    with pytest.raises(VerifyError) as e:
        verify(out, load=False, progress=False)
    assert e.value.report["checks"]["finite"]["nonfinite"] == {"model.norm.weight": 1}


def test_verify_fails_when_an_input_changed_in_place_after_the_merge(inputs, tmp_path):
    post, base, _ = inputs
    out = merged(inputs, tmp_path / "out")
    headers = [s.header_bytes for s in Checkpoint.open(post).shards]
    perturb(base, post, seed=7)  # same names, shapes and offsets: only the weights differ
    assert [s.header_bytes for s in Checkpoint.open(post).shards] == headers
    with pytest.raises(VerifyError) as e:
        verify(out, load=False, progress=False)
    rc = e.value.report["checks"]["recompute"]
    assert rc["mismatched"] > rc["elements"] // 2 and "--hash-inputs" in str(e.value)


def test_verify_refuses_resized_or_missing_inputs(inputs, tmp_path):
    post, base, _ = inputs
    out = merged(inputs, tmp_path / "out")
    shard = sorted(post.glob("*.safetensors"))[0]
    with open(shard, "ab") as f:
        f.write(b"\0")
    with pytest.raises(VerifyError, match="changed since") as e:
        verify(out, load=False, progress=False)
    assert shard.name in str(e.value) and e.value.report is None
    shutil.rmtree(base)
    shutil.rmtree(post)
    with pytest.raises(VerifyError, match="is missing"):
        verify(out, load=False, progress=False)


def test_verify_needs_provenance(llama, monkeypatch, capsys):
    with pytest.raises(VerifyError, match="no paramdelta provenance"):
        verify(llama[1], progress=False)
    with pytest.raises(OptionError):
        verify(llama[1], samples=0)
    code, _, err = run_cli(["verify", str(llama[1])], monkeypatch, capsys)
    assert code == 2 and "no paramdelta provenance" in err


def test_cli_verify_json(inputs, tmp_path, monkeypatch, capsys):
    out = merged(inputs, tmp_path / "out")
    code, stdout, _ = run_cli(["verify", str(out), "--format", "json", "--seed", "3", "--samples", "4"],
                              monkeypatch, capsys)
    data = json.loads(stdout)
    assert code == 0 and data["ok"] and data["checks"]["load"]["class"] == "LlamaForCausalLM"
    assert data["checks"]["recompute"]["rows"] <= 4 * data["checks"]["recompute"]["tensors"]
    code, stdout, _ = run_cli(["verify", str(out), "--no-load"], monkeypatch, capsys)
    assert code == 0 and "load       skip" in stdout and stdout.rstrip().endswith("OK")


def test_verify_with_full_input_hashes_catches_an_in_place_edit_up_front(inputs, tmp_path):
    post, base, _ = inputs
    out = merged(inputs, tmp_path / "out", hash_inputs=True)
    assert verify(out, load=False, progress=False)["checks"]["inputs"]["inputs"][1]["full_hash"]
    corrupt_element(post, Q0, element=0)  # a row the default sample may well miss
    with pytest.raises(VerifyError, match="sha256") as e:
        verify(out, load=False, progress=False)
    assert e.value.report is None and "post[0]" in str(e.value)


def test_verify_checks_vocab_aligned_tensors_for_finiteness_only(tmp_path):
    post, base, new_base = make_triple(tmp_path, "llama")
    tok = train_tiny_tokenizer(tmp_path / "chat_tok", ["<|im_start|>", "<|im_end|>"])
    chat = perturb(base, tmp_path / "chat", seed=3, resize_vocab_to=98, tokenizer=tok)
    out = tmp_path / "out"
    paramdelta.apply(out, post=chat, base=base, new_base=new_base, progress=False)
    report = verify(out, progress=False)
    rc = report["checks"]["recompute"]
    assert {f["name"] for f in rc["finite_only"]} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert rc["tensors"] == len(load_state(out)) - 2 and rc["mismatched"] == 0
    assert report["checks"]["load"]["logits_shape"] == [1, 5, 98]
