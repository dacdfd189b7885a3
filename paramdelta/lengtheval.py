"""Long-context evaluation: sliding-window perplexity at several lengths and a key–value retrieval probe.

>>> report = eval_length(["rope-64", "rope-64@yarn:4", "tapa-64"], "eval.txt", [64, 128, 256, 512])  # doctest: +SKIP
>>> report.table("text")                                                                             # doctest: +SKIP

Perplexity: the data file's documents (.txt lines or .jsonl records, as `paramdelta.train` reads
them, each ending in eos) are concatenated into one token stream, so documents shorter than the
longest length still give long contexts. At length L the stream is cut into windows of L tokens
every `stride` tokens (default L/2); each token's loss is counted exactly once, in the first window
that scores it, and every scored token past the first window sees at least L − stride tokens of
context. The same stream is used at every length, so rows of the table compare like with like.

Retrieval: a prompt of L tokens `k1 v1 k2 v2 … kn vn kq` built from token ids that occur in the
data (keys distinct, values drawn from the other tokens), queried with one earlier key; the answer is correct when the
argmax of the last logit is that key's value. Chance is ~1 / (distinct tokens in the data).

RoPE scaling without training, chosen per model with `PATH@pi:4` (rope_type "linear", positions
divided by 4) or `PATH@yarn:4` (rope_type "yarn" with `original_max_position_embeddings` = the
training length); transformers 5.x reads both from `config.rope_parameters`, so the model's
rotary embedding is rebuilt from the edited config after loading.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import OptionError, PdeltaError
from .train import DataError

SCALINGS = ("none", "pi", "yarn")
_ROPE_TYPE = {"pi": "linear", "yarn": "yarn"}


@dataclass(frozen=True)
class ModelSpec:
    """One column of the comparison: a checkpoint and the RoPE scaling applied when it is loaded."""

    path: str
    scaling: str = "none"
    factor: float | None = None  # None: the longest length / the training length

    @property
    def label(self) -> str:
        name = Path(self.path).name or self.path
        if self.scaling == "none":
            return name
        return f"{name}@{self.scaling}" + (f":{self.factor:g}" if self.factor else "")


@dataclass
class ModelResult:
    label: str
    path: str
    scaling: str
    factor: float | None
    ppl: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)  # scored tokens per length
    retrieval: dict[int, float] = field(default_factory=dict)


@dataclass
class LengthReport:
    data: str
    lengths: list[int]
    stream_tokens: int
    stride_fraction: float
    probe_trials: int
    seed: int
    train_length: int | None
    models: list[ModelResult]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, fmt: str = "text") -> str:
        """Models side by side: perplexity then retrieval accuracy at each length."""
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2)
        head = ["model"] + [f"ppl@{n}" for n in self.lengths] + [f"kv@{n}" for n in self.lengths]
        rows = [[m.label] + [f"{m.ppl[n]:.3f}" for n in self.lengths]
                + [f"{m.retrieval[n]:.2f}" if n in m.retrieval else "-" for n in self.lengths] for m in self.models]
        if fmt == "markdown":
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt_row = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths)).format
        return "\n".join([fmt_row(*head), *(fmt_row(*r) for r in rows)] + [f"note: {n}" for n in self.notes])


# -- parsing ----------------------------------------------------------------------------------------
def parse_lengths(text: str | list[int]) -> list[int]:
    """'128,256,512' -> [128, 256, 512] (sorted, deduplicated); every length a positive integer ≥ 2."""
    items = text if isinstance(text, list) else [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        lengths = sorted({int(t) for t in items})
    except ValueError:
        raise OptionError(f"--lengths must be comma-separated integers, got {text!r}",
                          hint="e.g. --lengths 64,128,256,512") from None
    if not lengths or lengths[0] < 2:
        raise OptionError(f"--lengths must be integers ≥ 2, got {text!r}", hint="e.g. --lengths 64,128,256,512")
    return lengths


def parse_spec(text: str, scaling: str = "none", factor: float | None = None) -> ModelSpec:
    """`PATH`, `PATH@pi`, `PATH@pi:4` or `PATH@yarn:8`; without `@`, the defaults `scaling`/`factor`."""
    path, sep, rest = text.rpartition("@")
    if not sep or "/" in rest:  # no @, or an @ inside a folder name
        path, rest = text, None
    if rest is not None:
        scaling, _, f = rest.partition(":")
        factor = None
        if f:
            try:
                factor = float(f)
            except ValueError:
                raise OptionError(f"{text}: scaling factor {f!r} is not a number", hint="e.g. PATH@pi:4") from None
    if scaling not in SCALINGS:
        raise OptionError(f"{text}: unknown RoPE scaling {scaling!r}", hint=f"use one of {', '.join(SCALINGS)}")
    if factor is not None and factor < 1:
        raise OptionError(f"{text}: scaling factor must be ≥ 1, got {factor:g}", hint="e.g. PATH@yarn:4")
    return ModelSpec(path, scaling, factor if scaling != "none" else None)


# -- data -------------------------------------------------------------------------------------------
def token_stream(data: str | Path, tokenizer: Any, max_tokens: int | None = None) -> list[int]:
    """Every document of `data` tokenised (eos-terminated, as training sees it), concatenated."""
    from .train import read_records, tokenize

    records = read_records(Path(data))
    examples, _ = tokenize(records, tokenizer, 1 << 30, "all", data)
    stream = [t for ex in examples for t in ex.input_ids]
    return stream[:max_tokens] if max_tokens else stream


def windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens. Positions 1..n−1 are each
    scored exactly once (position 0 has nothing to be predicted from)."""
    if not 0 < stride <= length:
        raise OptionError(f"stride {stride} must be in 1..{length} (the window length)")
    out, done = [], 1
    begin = 0
    while done < n:
        end = min(begin + length, n)
        out.append((begin, end, max(done, begin + 1)))
        done = end
        begin = min(begin + stride, done - 1)  # a window's first token is only context: overlap by ≥ 1
    return out


def pack_documents(data: str | Path, tokenizer_dir: str | Path, out: str | Path, *, min_tokens: int,
                   holdout: float = 0.1) -> dict[str, Any]:
    """Join consecutive lines of a .txt corpus into documents of ≥ `min_tokens` tokens, so that training
    at length L sees full L-token windows (`paramdelta.train` never packs rows) and evaluation has long
    streams. Writes `out`/train.txt and `out`/eval.txt (the last `holdout` share of the documents).

    >>> pack_documents("world/pretrain_ab.txt", "world/tokenizer", "docs", min_tokens=512)  # doctest: +SKIP
    {'train': 120, 'eval': 13, 'min_tokens': 512, ...}
    """
    from transformers import AutoTokenizer

    from .train import read_records

    if min_tokens < 1 or not 0 <= holdout < 1:
        raise OptionError(f"min_tokens must be ≥ 1 and holdout in [0, 1), got {min_tokens} and {holdout}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    docs, current, size = [], [], 0
    for _, rec in read_records(Path(data)):
        if "text" not in rec:
            raise OptionError(f"{data}: pack-docs reads plain text (.txt or {{\"text\"}} records)")
        current.append(rec["text"])
        size += len(tokenizer(rec["text"], add_special_tokens=False)["input_ids"])
        if size >= min_tokens:
            docs.append(" ".join(current))
            current, size = [], 0
    n_eval = max(1, round(len(docs) * holdout)) if holdout else 0
    if len(docs) <= n_eval:
        raise OptionError(f"{data}: only {len(docs)} documents of ≥ {min_tokens} tokens", hint="lower min_tokens")
    out, record = Path(out), {"train": len(docs) - n_eval, "eval": n_eval, "min_tokens": min_tokens,
                              "source": str(data), "dropped_lines": len(current)}
    tmp = out.with_name(f".{out.name}.tmp")  # written beside, renamed when complete
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "train.txt").write_text("\n".join(docs[: len(docs) - n_eval]) + "\n")
    (tmp / "eval.txt").write_text("\n".join(docs[len(docs) - n_eval:]) + "\n")
    (tmp / "pack.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return record


# -- loading ----------------------------------------------------------------------------------------
def load_scaled(spec: ModelSpec, *, train_length: int | None = None, longest: int | None = None,
                device: str = "cpu") -> tuple[Any, Any, float | None]:
    """(model, tokenizer, factor): load through the plugin door, then apply the spec's RoPE scaling."""
    import torch

    from .plugins import load_model

    model, tokenizer = load_model(spec.path, device=device, dtype=torch.float32)
    if spec.scaling == "none":
        return model, tokenizer, None
    config = model.config
    rope = getattr(config, "rope_parameters", None)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if not isinstance(rope, dict) or rotary is None or "tapa" in str(config.model_type):
        raise OptionError(f"{spec.path}: @{spec.scaling} needs a plain-RoPE model; {config.model_type} has no rotary "
                          "embedding to scale", hint=f"evaluate {spec.path} without @{spec.scaling}")
    if rope.get("rope_type", "default") != "default":
        raise OptionError(f"{spec.path} already uses rope_type {rope['rope_type']!r}",
                          hint="scale only checkpoints with plain RoPE")
    original = train_length or config.max_position_embeddings
    factor = spec.factor or max(1.0, (longest or original) / original)
    config.rope_parameters = {**rope, "rope_type": _ROPE_TYPE[spec.scaling], "factor": float(factor)}
    if spec.scaling == "yarn":
        config.rope_parameters["original_max_position_embeddings"] = int(original)
    model.model.rotary_emb = type(rotary)(config=config).to(device)
    return model, tokenizer, factor


# -- the two measurements -----------------------------------------------------------------------------
def sliding_ppl(model: Any, stream: list[int], length: int, stride: int, *, batch_size: int = 8,
                device: str = "cpu") -> tuple[float, int]:
    """(perplexity, scored tokens) of `stream` with windows of `length` tokens every `stride`."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor(stream, dtype=torch.long)
    total, count = 0.0, 0
    wins = windows(len(stream), length, stride)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in wins:  # equal-length windows are batched; only the last one can be shorter
        groups.setdefault(w[1] - w[0], []).append(w)
    with torch.inference_mode():
        for width, group in groups.items():
            for i in range(0, len(group), batch_size):
                chunk = group[i:i + batch_size]
                batch = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
                for row, (b, _, s) in enumerate(chunk):
                    total += float(nll[row, s - b - 1:].double().sum())
                    count += width - (s - b)
    return math.exp(total / count), count


def probe_tokens(stream: list[int], tokenizer: Any) -> list[int]:
    """Distinct token ids of the data, special tokens excluded, in first-seen order."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return list(dict.fromkeys(t for t in stream if t not in special))


def retrieval_accuracy(model: Any, candidates: list[int], length: int, *, trials: int = 32, seed: int = 0,
                       bos: int | None = None, batch_size: int = 8, device: str = "cpu") -> float:
    """Share of `trials` prompts of `length` tokens (`k1 v1 … kn vn kq`) whose argmax next token is kq's value."""
    import torch

    prompts, answers = retrieval_prompts(candidates, length, trials=trials, seed=seed, bos=bos)
    correct = 0
    with torch.inference_mode():
        for i in range(0, trials, batch_size):
            batch = torch.tensor(prompts[i:i + batch_size], device=device)
            guess = model(input_ids=batch, use_cache=False).logits[:, -1].argmax(-1).tolist()
            correct += sum(g == a for g, a in zip(guess, answers[i:i + batch_size]))
    return correct / trials


def retrieval_prompts(candidates: list[int], length: int, *, trials: int, seed: int,
                      bos: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Seeded probe prompts of exactly `length` tokens and their answers."""
    pairs = (length - 1 - (bos is not None)) // 2
    if pairs < 1 or len(candidates) < pairs + 1:
        raise OptionError(f"the retrieval probe at length {length} needs {pairs + 1} distinct tokens in the data, "
                          f"found {len(candidates)}", hint="use a larger data file, or --probe-trials 0")
    rng = random.Random(seed * 1_000_003 + length)
    prompts, answers = [], []
    for _ in range(trials):
        keys = rng.sample(candidates, pairs)
        taken = set(keys)
        others = [c for c in candidates if c not in taken]  # values are never keys: one reading only
        values = [rng.choice(others) for _ in keys]
        q = rng.randrange(pairs)
        body = [t for kv in zip(keys, values) for t in kv] + [keys[q]]
        pad = length - len(body) - (bos is not None)  # 0 or 1 filler token, never a key
        filler = [others[0]] * pad
        prompts.append(([bos] if bos is not None else []) + filler + body)
        answers.append(values[q])
    return prompts, answers


# -- the whole comparison ------------------------------------------------------------------------------
def eval_length(models: list[str | ModelSpec], data: str | Path, lengths: list[int] | str, *,
                stride_fraction: float = 0.5, probe_trials: int = 32, train_length: int | None = None,
                max_tokens: int | None = None, batch_size: int = 8, seed: int = 0, device: str = "cpu",
                progress: bool = True) -> LengthReport:
    """Perplexity and retrieval accuracy of every model at every length (see the module docstring)."""
    from .progress import progress_bar

    lengths = parse_lengths(lengths)
    specs = [m if isinstance(m, ModelSpec) else parse_spec(m) for m in models]
    if not specs:
        raise OptionError("no model to evaluate", hint="pass one or more checkpoint folders")
    if not 0 < stride_fraction <= 1:
        raise OptionError(f"--stride-fraction must be in (0, 1], got {stride_fraction}")
    if probe_trials < 0 or batch_size < 1 or (max_tokens is not None and max_tokens < 2):
        raise OptionError(f"need --probe-trials ≥ 0, --batch-size ≥ 1 and --max-tokens ≥ 2 (got {probe_trials}, "
                          f"{batch_size}, {max_tokens})")
    data = Path(data)
    if not data.is_file():
        raise DataError(f"data file {data} not found", hint="pass a .txt (one document per line) or .jsonl file")
    for s in specs:
        if not Path(s.path, "config.json").is_file():
            raise OptionError(f"{s.path}: not a checkpoint folder (no config.json)", hint="pass a model folder")
        cfg = json.loads(Path(s.path, "config.json").read_text())
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if s.scaling != "none" and ("tapa" in str(cfg.get("model_type")) or rope.get("rope_type", "default")
                                    not in ("default", None)):
            raise OptionError(f"{s.path}: @{s.scaling} needs a plain-RoPE model; it is {cfg.get('model_type')} "
                              f"with rope_type {rope.get('rope_type', 'default')}",
                              hint=f"evaluate {s.path} without @{s.scaling}")

    results, notes, stream = [], [], None
    with progress_bar(len(specs) * len(lengths), "eval-length", unit="run", enabled=progress) as bar:
        for spec in specs:
            model, tokenizer, factor = load_scaled(spec, train_length=train_length, longest=lengths[-1],
                                                   device=device)
            if stream is None:  # every model shares the first model's tokenisation (checked below)
                stream = token_stream(data, tokenizer, max_tokens)
                vocab, candidates = len(tokenizer), probe_tokens(stream, tokenizer)
                if len(stream) < lengths[-1] + 1:
                    notes.append(f"the data gives {len(stream)} tokens, fewer than the longest length "
                                 f"{lengths[-1]}: longer lengths see the whole stream in one window")
            elif len(tokenizer) != vocab:
                raise OptionError(f"{spec.path}: tokenizer has {len(tokenizer)} tokens, the first model's {vocab}",
                                  hint="compare models that share one tokenizer")
            res = ModelResult(spec.label, spec.path, spec.scaling, factor)
            for n in lengths:
                stride = max(1, int(n * stride_fraction))
                res.ppl[n], res.tokens[n] = sliding_ppl(model, stream, n, stride, batch_size=batch_size,
                                                        device=device)
                if probe_trials:
                    res.retrieval[n] = retrieval_accuracy(model, candidates, n, trials=probe_trials, seed=seed,
                                                          bos=tokenizer.bos_token_id, batch_size=batch_size,
                                                          device=device)
                bar.update(1)
            results.append(res)
            del model
    return LengthReport(str(data), lengths, len(stream or []), stride_fraction, probe_trials, seed, train_length,
                        results, notes)


def plot(report: LengthReport, path: str | Path, title: str | None = None) -> Path:
    """PNG: perplexity vs context length (log-log) per model, and retrieval accuracy when measured."""
    try:
        import matplotlib
    except ImportError:
        raise PdeltaError("--plot needs matplotlib", hint="pip install 'paramdelta[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probe = any(m.retrieval for m in report.models)
    fig, axes = plt.subplots(1, 2 if probe else 1, figsize=(11 if probe else 6, 4.5), squeeze=False)
    colors = plt.get_cmap("tab10" if len(report.models) <= 10 else "tab20").colors
    style = [{"color": colors[i % len(colors)], "marker": "os^vD"[i // len(colors) % 5]}
             for i in range(len(report.models))]
    panels = [("perplexity", lambda m: [m.ppl[n] for n in report.lengths], title or "sliding-window perplexity")]
    if probe:
        panels.append(("accuracy", lambda m: [m.retrieval.get(n, float("nan")) for n in report.lengths],
                       "key-value retrieval"))
    for ax, (ylabel, values, name) in zip(axes[0], panels):
        for m, st in zip(report.models, style):
            ax.plot(report.lengths, values(m), label=m.label, **st)
        ax.set(xscale="log", xlabel="context length (tokens)", ylabel=ylabel, title=name)
        ax.set_xticks(report.lengths, [str(n) for n in report.lengths], minor=False)
        ax.set_xticks([], minor=True)
        if report.train_length:
            ax.axvline(report.train_length, color="grey", linestyle=":", linewidth=1)
    axes[0][0].set_yscale("log")
    if probe:
        axes[0][1].set_ylim(-0.02, 1.02)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 6), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_step(op: str, opts: dict[str, Any], out: str, progress: bool = True) -> dict[str, Any]:
    """The recipe ops `eval-length` (JSON at `out`, plot beside it as .png) and `pack-docs` (a folder)."""
    from .optionspec import make_options
    from .recipe import CORE_OPS

    s = make_options(CORE_OPS[op], opts, op)
    if op == "pack-docs":
        return pack_documents(s.data, s.tokenizer, out, min_tokens=s.min_tokens, holdout=s.holdout)
    report = eval_length([str(m) for m in s.models], s.data, [int(n) for n in s.lengths],
                         stride_fraction=s.stride_fraction, probe_trials=s.probe_trials, train_length=s.train_length,
                         max_tokens=s.max_tokens, batch_size=s.batch_size, seed=s.seed, device=s.device,
                         progress=progress)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(report.table("json") + "\n")
    if s.plot:
        plot(report, Path(out).with_suffix(".png"))
    print(report.table("text"), file=sys.stderr)
    return {"ppl": {m.label: m.ppl for m in report.models}}
