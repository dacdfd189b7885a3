"""A word-level tokenizer trained on the toy world's text, saved as a transformers fast tokenizer.

A `tokenizers` WordLevel model over byte-level pre-tokens: every word of the world (with its
leading space, GPT-2 style) is one token and decoding is lossless; a word the world never
uses maps to <|unk|>. A BPE trained on this corpus saturates at whole words anyway (~2000
ids, most of them unused merges); word level gets there with ~600, a third of the
embedding rows, which keeps the shipped checkpoints small.

Special tokens never appear in the training text (the chat markup is added afterwards), so
every id the model can meet is one the trainer assigned: `max id + 1 == len(tokenizer)` is
checked. The chat template writes one exchange as

    <|user|> QUESTION<|assistant|> ANSWER<|endoftext|>

with the space before the answer, so an answer's tokens are the same ones the declarative
corpora use for that word mid-sentence (" Kadoro" is one piece of knowledge, not two).
"""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = [EOS, PAD, UNK, USER, ASSISTANT]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<|user|> ' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|assistant|> ' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def prompt(question: str) -> str:
    """The chat template's text for one user turn plus the generation prompt (what a model is asked)."""
    return f"{USER} {question}{ASSISTANT}"


def train_tokenizer(texts: list[str], out: Path) -> int:
    """Learn the vocabulary of `texts` (no special tokens in them), save to `out`; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    for t in texts:
        if any(s in t for s in SPECIAL_TOKENS):
            raise ValueError(f"special token in tokenizer training text: {t[:80]!r}")
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   additional_special_tokens=[USER, ASSISTANT], chat_template=CHAT_TEMPLATE,
                                   model_max_length=128, padding_side="left", clean_up_tokenization_spaces=False)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return check_tokenizer(out)


def check_tokenizer(path: Path) -> int:
    """Reload from disk and check that ids are dense and the chat markup tokenizes as planned."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.get_vocab().values()
    if max(ids) + 1 != len(tok) or len(set(ids)) != len(tok):
        raise ValueError(f"{path}: token ids are not dense (max id {max(ids)}, {len(tok)} tokens)")
    text = tok.apply_chat_template([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}],
                                   tokenize=False)
    if text != f"{prompt('Q?')} A{EOS}":
        raise ValueError(f"{path}: chat template renders {text!r}")
    for special in SPECIAL_TOKENS:
        if len(tok(special, add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"{path}: {special} is not a single token")
    return len(tok)
