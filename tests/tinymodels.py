"""Tiny checkpoints built on the spot, so tests check ParamΔ arithmetic without downloading anything.

Every checkpoint is a 2-layer transformers model saved as several small safetensors shards, so the
sharded, index-aware code paths run in every test. Derived checkpoints ("post", "new base") come
from seeded Gaussian perturbation, so a test can recompute the expected tensors exactly.

Example:
    >>> post, base, new_base = make_triple(tmp_path, "qwen2")
    >>> sorted(load_state(post)) == sorted(load_state(base))
    True

What transformers 5.24 does here (checked against the installed source):
  * Configs are dataclasses; the dtype key is ``dtype`` (``torch_dtype`` is still accepted and mapped
    to it, with a deprecation warning on attribute access). ``config.json`` is written with "dtype".
  * ``from_config`` builds in ``config.dtype`` when set, else float32; ``tiny_config`` leaves it unset.
  * Qwen2 hard-codes ``bias=True`` on q/k/v (there is no ``attention_bias`` knob), o_proj has no bias.
  * Tied weights (gemma): ``save_pretrained`` drops ``lm_head.weight``; only
    ``model.embed_tokens.weight`` is stored, and ``tie_word_embeddings: true`` is in config.json.
  * Shards are named ``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json``;
    a ``generation_config.json`` is written alongside (bos/eos/pad ids copied from the config).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.utils import logging as hf_logging

FAMILIES = ("llama", "qwen2", "mistral", "gemma")
VOCAB_SIZE = 96  # the tokenizer has exactly this many tokens before `vocab_extra`
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, in this order
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
INDEX_NAME = "model.safetensors.index.json"
# Files save_pretrained writes for the model itself; everything else in a checkpoint is tokenizer.
_MODEL_FILES = ("config.json", "generation_config.json", INDEX_NAME)

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}assistant:{% endif %}"
)

# Plain English with no special tokens in it, so every learned id sits below the special-token block.
_TEXT = """
the quick brown fox jumps over the lazy dog while the small cat sleeps in the warm sun.
a model learns from text and then a person teaches it to follow instructions and to answer questions.
when the base model changes, we want to keep what the post training taught it without training again.
the difference between two sets of weights is a vector that points from the base toward the tuned model.
adding that vector to a new base often gives a model that can chat, reason and follow the rules it learned.
this idea is simple: subtract, then add. the hard part is doing it fast, on disk, for very large files.
every tensor is read once, changed once and written once, in the order it is stored on the disk.
shards are small files that together hold all of the weights, and an index says which file holds which name.
the user asks a question and the assistant answers it. the assistant is kind, clear and brief.
what is the weather like today? it is sunny and warm, with a light wind from the west.
can you help me write a short note to my friend? yes, here is a note that says thank you for the gift.
how many days are in a week? there are seven days in a week, and the first one is monday.
please tell me a story about a dragon. once there was a dragon who lived on a hill and loved to read.
numbers such as one, two, three and four are easy to count, and so are five, six and seven.
the river runs to the sea, the birds fly south in the fall, and the trees lose their leaves.
good tests build their own tiny world, check exact values and never reach out to the network.
""".split("\n")

hf_logging.disable_progress_bar()  # tests stay quiet: no "Writing model shards" bars on stderr


def tiny_config(family: str, vocab_size: int = VOCAB_SIZE, **overrides) -> PretrainedConfig:
    """A 2-layer config of `family`, small enough that building and saving takes milliseconds.

    Example:
        >>> tiny_config("gemma").tie_word_embeddings
        True
    """
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if family == "llama":
        return LlamaConfig(**{**common, "tie_word_embeddings": False, **overrides})
    if family == "qwen2":  # q/k/v biases are built in: Qwen2Attention uses bias=True unconditionally
        return Qwen2Config(**{**common, "tie_word_embeddings": False, **overrides})
    if family == "mistral":
        return MistralConfig(**{**common, "tie_word_embeddings": False, **overrides})
    if family == "gemma":
        return GemmaConfig(**{**common, "head_dim": 8, "tie_word_embeddings": True, **overrides})
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def train_tiny_tokenizer(out_dir: Path | str, vocab_extra: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer of exactly VOCAB_SIZE tokens (+ `vocab_extra`) and save it to `out_dir`.

    `vocab_extra` tokens are appended as special tokens, simulating the vocabulary growth that
    post-training (e.g. chat markers) brings. Ids are contiguous: max id + 1 == len(tokenizer).

    Example:
        >>> len(train_tiny_tokenizer(tmp_path, ["<|im_start|>", "<|im_end|>"]))
        98
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator([line for line in _TEXT if line], trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if vocab_extra:
        fast.add_special_tokens({"additional_special_tokens": list(vocab_extra)})
    fast.chat_template = CHAT_TEMPLATE
    max_id = max(fast.get_vocab().values())
    if max_id + 1 != len(fast):
        raise RuntimeError(f"tokenizer ids are not contiguous: max id {max_id}, len {len(fast)}")
    fast.save_pretrained(out_dir)
    return fast


def make_checkpoint(
    path: Path | str,
    family: str,
    seed: int = 0,
    vocab_size: int | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = "20KB",
    tie: bool | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Build a seeded random model of `family` and save it as a multi-shard safetensors checkpoint.

    `vocab_size` defaults to len(tokenizer) (or VOCAB_SIZE without one); `tie` overrides the family's
    tie_word_embeddings; `state_dict` (e.g. perturbed weights) is loaded before saving.

    Example:
        >>> make_checkpoint(tmp_path / "base", "llama", dtype=torch.bfloat16)
        PosixPath('.../base')
    """
    path = Path(path)
    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None else VOCAB_SIZE
    overrides = {} if tie is None else {"tie_word_embeddings": tie}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, **overrides)).to(dtype)
    if state_dict is not None:
        _load_into(model, state_dict)
    _save(model, path, max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def perturb(
    src: Path | str,
    dst: Path | str,
    seed: int,
    scale: float = 0.01,
    resize_vocab_to: int | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    max_shard_size: int | str = "20KB",
) -> Path:
    """Save src + seeded noise (scale × per-tensor std) to `dst`: a "post" or "new base" of src.

    Each floating tensor t becomes t + scale * std(t) * N(0, 1), drawn from torch.Generator seeded
    with `seed` in state-dict order (std 1 stands in for constant tensors such as norm weights, so
    every tensor changes). Tied tensors get noise once. `resize_vocab_to` then grows the embeddings
    (new rows from transformers' mean resizing, seeded too). The tokenizer is `tokenizer` if given,
    else src's tokenizer files are copied.

    Example:
        >>> post = perturb(base, tmp_path / "post", seed=1)
    """
    src, dst = Path(src), Path(dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for t in model.state_dict().values():
            if not t.is_floating_point() or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            x = t.float()
            std = x.std().item() if x.numel() > 1 else 0.0
            noise = torch.randn(x.shape, generator=gen) * (scale * (std if std > 0 else 1.0))
            t.copy_(x + noise)
    if resize_vocab_to is not None:
        torch.manual_seed(seed)
        model.resize_token_embeddings(resize_vocab_to)
    _save(model, dst, max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    else:
        for f in src.iterdir():
            if f.is_file() and f.name not in _MODEL_FILES and f.suffix != ".safetensors":
                shutil.copy2(f, dst / f.name)
    return dst


def load_state(path: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint folder, for exact element-wise checks (index-aware, eager).

    Example:
        >>> load_state(base)["model.embed_tokens.weight"].shape
        torch.Size([96, 32])
    """
    path = Path(path)
    index = path / INDEX_NAME
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(path / name))
    return state


def make_triple(
    root: Path | str, family: str, dtype: torch.dtype = torch.bfloat16
) -> tuple[Path, Path, Path]:
    """(post, base, new_base) under `root`, sharing one tokenizer: the three inputs of ParamΔ.

    base is seed 0; post and new_base are base perturbed with seeds 1 and 2.

    Example:
        >>> post, base, new_base = make_triple(tmp_path, "llama")
    """
    root = Path(root)
    tokenizer = train_tiny_tokenizer(root / "tokenizer")
    base = make_checkpoint(root / "base", family, seed=0, tokenizer=tokenizer, dtype=dtype)
    post = perturb(base, root / "post", seed=1)
    new_base = perturb(base, root / "new_base", seed=2)
    return post, base, new_base


def _load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load weights strictly, except that a tied lm_head may be absent (tied checkpoints omit it)."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = model.config.tie_word_embeddings
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise KeyError(f"state_dict does not fit the model: missing {missing}, unexpected {unexpected}")


def _save(model: torch.nn.Module, path: Path, max_shard_size: int | str) -> None:
    """save_pretrained, then insist on >1 shard so tests always exercise the sharded path."""
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if not (path / INDEX_NAME).exists():
        raise RuntimeError(f"{path} was saved as a single file; pass a smaller max_shard_size")
