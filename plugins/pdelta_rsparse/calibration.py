"""Calibration: tokens from a local text file (or a built-in generic sample), and the per-layer search.

The model runs once, dense, over `samples` windows of `seq_len` tokens (one batch). A forward
pre-hook on each targeted linear receives that layer's inputs, runs the layer's search on the
spot (`search.search_layer`) and drops them, so only one layer's inputs are held at a time.

Files: a `.txt` holds one document per line; a `.jsonl` one object per line with a "text" field
(or "prompt" + "completion"). Each document is tokenised as `paramdelta.train` does (the
tokenizer's special tokens, then eos), and the documents laid end to end are cut into windows.

>>> tokens, source = calibration_tokens(tokenizer, None, samples=16, seq_len=128)   # doctest: +SKIP
>>> settings = calibrate(model, tokens, layers, sparsity=0.5)                       # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from .search import LayerSetting, search_layer

# A generic English sample (plain prose on everyday topics, written for this project) used when
# no calibration file is given. It is short: pass --calibration with text like your use for
# thresholds that fit it.
BUILTIN_TEXT = """\
The morning train left the station a few minutes late, and most of the passengers did not mind. Some read the \
news on their phones, some looked out at the fields, and a few slept with their heads against the window. \
A farmer was already at work in the first field, driving a small tractor along the edge of a ditch.
Water boils at one hundred degrees Celsius at sea level, but at the top of a high mountain it boils at a lower \
temperature, because the air pressure is lower. This is why cooking pasta in the mountains takes longer.
To make a simple bread, mix flour, water, salt and a little yeast. Let the dough rest for an hour, fold it a \
few times, and let it rise again before baking it in a hot oven for about forty minutes.
The history of the city goes back more than two thousand years. It began as a small trading post on the river, \
grew into a market town, and became the capital of the region after the old bridge was built.
In mathematics, a prime number is a whole number greater than one that has no divisors other than one and \
itself. The first primes are two, three, five, seven, eleven and thirteen. There are infinitely many of them.
Dear team, thank you for your work on the project this month. The new release is ready, the tests pass, and the \
documentation has been updated. Please send me your notes before Friday so that we can plan the next steps.
The patient was advised to drink more water, to sleep at least seven hours a night and to walk for thirty \
minutes every day. A follow-up appointment was scheduled for the end of the month.
A computer program is a list of instructions. The computer reads each instruction in turn, and it can repeat \
some of them in a loop or choose between them with a condition. Good programs are easy to read and to test.
The forest was quiet after the rain. Drops fell from the leaves, a bird called somewhere high in the trees, \
and the path was soft under our boots. We walked until we reached the lake, where we stopped for lunch.
Question: What is the capital of France? Answer: Paris. Question: How many legs does a spider have? \
Answer: eight. Question: Which planet is closest to the sun? Answer: Mercury.
The company reported higher sales in the third quarter, driven by strong demand for its new products in Europe \
and Asia. Costs also rose, mainly because of higher prices for energy and transport.
When you learn a new language, try to practise a little every day. Read short stories, listen to songs, and \
speak with other learners. Mistakes are normal; they show that you are trying something new.
"""


class CalibrationError(Exception):
    """Raised for unusable calibration text; the transform turns it into an OptionError."""


def read_documents(path: Path | None) -> tuple[list[str], str]:
    """(documents, source) as `paramdelta.train` reads them: one per non-blank .txt line, one per .jsonl
    record ("text", or prompt + completion); the built-in sample's paragraphs when `path` is None."""
    if path is None:
        return [line for line in BUILTIN_TEXT.splitlines() if line.strip()], "built-in generic text sample"
    raw = path.read_text(encoding="utf-8", errors="replace")
    docs = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            docs.append(line)
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise CalibrationError(f"{path}:{i}: not a JSON object") from None
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            docs.append(rec["text"])
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            docs.append(rec["prompt"] + str(rec.get("completion", "")))
        else:
            raise CalibrationError(f'{path}:{i}: expected {{"text": ...}} or {{"prompt": ..., "completion": ...}}')
    if not any(d.strip() for d in docs):
        raise CalibrationError(f"{path}: holds no text")
    return docs, str(path)


def document_ids(tokenizer, doc: str) -> list[int]:
    """One document's ids as training sees them: the tokenizer's own special tokens, then eos.

    Joining documents with newlines instead would feed the model a token it never trained on
    (the toy world's word-level tokenizer maps "\\n" to <|unk|>), which skews both thresholds
    and held-out perplexity.
    """
    ids = tokenizer(doc, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def calibration_tokens(tokenizer, path: Path | None, *, samples: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """`samples` windows of `seq_len` token ids cut from the documents laid end to end, and the source.

    The documents are repeated when they hold fewer than samples × seq_len tokens (the built-in
    sample is ~900 words), so short files still give the requested count; the source line says so.
    """
    docs, source = read_documents(path)
    ids = [t for d in docs for t in document_ids(tokenizer, d)]
    if len(ids) < 2:
        raise CalibrationError(f"{source}: fewer than 2 tokens after tokenising")
    want, unique = samples * seq_len, len(ids)
    repeats = -(-want // unique)
    windows = torch.tensor((ids * repeats)[:want], dtype=torch.long).view(samples, seq_len)
    note = f"{source}: {samples} × {seq_len} = {samples * seq_len} tokens"
    if repeats > 1:
        note += f" (its {unique} tokens repeated to fill them)"
    return windows, note


@torch.no_grad()
def calibrate(model: torch.nn.Module, tokens: torch.Tensor, layers: Iterable[str], *, sparsity: float,
              search: str = "layerwise", rho: float = 1.0, score: str = "weighted",
              errors: dict[str, dict[float, float]] | None = None) -> dict[str, LayerSetting]:
    """Run `model` dense over `tokens` (one batch) and choose τ (and ρ) for each named linear.

    `errors`, when given, receives each layer's relative output error for every ρ tried.

    The search of a layer runs inside its pre-hook, on that layer's inputs (T×n, fp32), which are
    then dropped: peak memory is the model, one forward's activations and one layer's search.
    """
    settings: dict[str, LayerSetting] = {}
    handles = []
    for name in layers:
        def search_here(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            weight = mod.weight.detach().float()
            col_norm = weight.norm(dim=0) if score == "weighted" else torch.ones(weight.shape[1])
            tried = errors.setdefault(name, {}) if errors is not None else None
            settings[name] = search_layer(x, weight, col_norm, sparsity=sparsity, mode=search, rho=rho, errors=tried)

        handles.append(model.get_submodule(name).register_forward_pre_hook(search_here))
    try:
        model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return settings
