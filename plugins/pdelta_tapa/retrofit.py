"""RoPE → TAPA: what can be converted, the head-dim permutation, phase damping, and the light fine-tune.

DESIGN.md §9 measured that a direct swap destroys a RoPE model (loss 1.29 → ~3.7 nats/byte). The
knobs here are the ideas it lists:
  * `permutation`: reorder each head's q/k dims so the lowest-frequency RoPE pairs become the
    amplitude part (they barely rotate over the context, so they already act as content-only
    scores). The same permutation on the rows of W_q and W_k leaves q·k unchanged without RoPE.
  * `convert_tensor`: that permutation, plus the phase rows of W_q and W_k scaled by E at the swap
    (so q_P·k_P starts E² smaller and cos(·) ≈ 1: the model starts as content attention).
  * `finetune`: LM loss, or distillation from the original RoPE model (KL(teacher ‖ student) on the
    logits), optionally attention projections only for the first steps.

>>> perm = permutation(8, theta=0.5, mode="low-freq")
>>> perm
[3, 7, 2, 6, 1, 5, 0, 4]
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramdelta.errors import OptionError

ROPE_FAMILIES = ("llama", "mistral")  # Llama-layout blocks: q/k/v/o (one bias flag), gate/up/down, RMSNorm
# RoPE variants whose inverse frequencies fall monotonically with the pair index (so "low-freq" is the
# last pairs); anything else (longrope, mrope, ...) is refused.
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
QK = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qk])_proj\.(weight|bias)$")


def rope_problems(config: dict[str, Any], path: str | Path) -> list[str]:
    """Why a RoPE checkpoint cannot be converted, from config.json alone ([] when it can)."""
    problems = []
    kind = config.get("model_type")
    if kind not in ROPE_FAMILIES:
        problems.append(f"{path} is a {kind or 'model without model_type'!r} checkpoint; TAPA retrofit handles "
                        f"Llama-layout models ({', '.join(ROPE_FAMILIES)})")
        return problems
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        problems.append(f"{path} uses partial rotary embeddings (partial_rotary_factor {partial})")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        problems.append(f"{path} uses rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if config.get("sliding_window") is not None or config.get("use_sliding_window") or any(
            "sliding" in str(t) for t in config.get("layer_types") or []):
        problems.append(f"{path} uses sliding-window attention (sliding_window {config.get('sliding_window')})")
    if "alibi" in str(config.get("position_embedding_type", "")).lower() or config.get("alibi"):
        problems.append(f"{path} uses ALiBi position biases")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim % 2:
        problems.append(f"{path} has an odd head_dim ({head_dim}), which RoPE pairs cannot fill")
    return problems


def head_dim_of(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def permutation(head_dim: int, *, theta: float, mode: str) -> list[int]:
    """New dim i of every head takes old dim perm[i]; the first θ·head_dim new dims are the amplitude part.

    "first-half": identity (the naive swap). "low-freq": RoPE pairs (j, j + D/2) in rising frequency
    order, i.e. j = D/2−1 first, both dims of a pair kept together. HF Llama's rotate_half pairs dim j
    with j + D/2 at inverse frequency base^(−2j/D), which falls with j (also under PI, YaRN, llama3).
    """
    from .attention import split_dim

    split_dim(head_dim, theta)
    if mode == "first-half":
        return list(range(head_dim))
    if mode != "low-freq":
        raise OptionError(f"tapa: --amplitude-dims must be low-freq or first-half, got {mode!r}")
    half = head_dim // 2
    return [d for j in reversed(range(half)) for d in (j, j + half)]


def convert_tensor(name: str, tensor: Any, *, head_dim: int, perm: list[int], amp: int, phase_scale: float,
                   amplitude_scale: float = 1.0) -> Any:
    """One input tensor as it is in the TAPA model: q/k projection rows (and biases) permuted per head,
    phase rows scaled by `phase_scale`, amplitude rows by `amplitude_scale`; everything else unchanged."""
    import torch

    if not QK.match(name):
        return tensor
    rows = tensor.shape[0]
    heads = rows // head_dim
    t = tensor.reshape(heads, head_dim, *tensor.shape[1:])[:, torch.tensor(perm)].clone()
    if phase_scale != 1.0:
        t[:, amp:] *= phase_scale
    if amplitude_scale != 1.0:
        t[:, :amp] *= amplitude_scale
    return t.reshape(tensor.shape)


# -- fine-tune ---------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    steps: int
    tokens: int  # real (non-pad) tokens fed forward
    slots: int  # steps × batch × seq_len: the budget in the units paramdelta.train's options give
    seconds: float
    losses: list[float] = field(default_factory=list)
    perplexity: dict[str, float] = field(default_factory=dict)  # "teacher", "before", "after" on held-out text
    held_out_tokens: int = 0
    mean_window: float = 0.0  # mean training window length: far below seq_len means short documents


def split_records(records: list, holdout: float) -> tuple[list, list]:
    """(train, held out): the last max(1, holdout·n) records are held out; with one record, it is both."""
    if len(records) < 2:
        return records, records
    n = min(len(records) - 1, max(1, round(holdout * len(records))))
    return records[:-n], records[-n:]


def perplexity(model: Any, examples: list, pad_id: int, batch_size: int = 8) -> float:
    """exp(mean next-token loss) over `examples` (paramdelta.traindata.Example), no gradient."""
    import torch
    import torch.nn.functional as F

    from paramdelta.traindata import IGNORE, make_batch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            ids, labels = make_batch(examples[i:i + batch_size], pad_id)
            logits = model(input_ids=ids, use_cache=False).logits
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                     ignore_index=IGNORE, reduction="sum").item()
            count += int((labels[:, 1:] != IGNORE).sum())
    model.train(was_training)
    return math.exp(total / max(count, 1))


def finetune(student: Any, teacher: Any | None, tokenizer: Any, data: Path, *, objective: str, steps: int,
             seq_len: int, batch_size: int, lr: float, warmup: int, weight_decay: float, optimizer: str,
             optimizer_options: dict[str, Any], attention_only_steps: int, holdout: float, seed: int,
             align_steps: int = 0, progress: bool = True, max_eval_windows: int = 64) -> FinetuneResult:
    """Train `student` in place on `data` (minus a held-out slice, scored before and after).

    objective "lm": next-token cross-entropy. "distill": KL(teacher ‖ student) per target token,
    teacher = the original RoPE model. The first `align_steps` steps instead fit each TAPA attention
    to the teacher's attention output on the teacher's own layer inputs (relative squared error,
    layer by layer: a dense, local target; in the README's toy sweep it did not beat plain
    distillation). The first `attention_only_steps` steps update q/k/v/o only.
    """
    import torch
    import torch.nn.functional as F

    from paramdelta.optim import build_optimizer
    from paramdelta.progress import progress_bar
    from paramdelta.train import lr_factor
    from paramdelta.traindata import IGNORE, make_batch, read_records, tokenize

    start = time.perf_counter()
    train_recs, held_recs = split_records(read_records(Path(data)), holdout)
    examples, _ = tokenize(train_recs, tokenizer, seq_len, "all", data)
    held, _ = tokenize(held_recs, tokenizer, seq_len, "all", data)
    held = held[:max_eval_windows]
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    res = FinetuneResult(steps, 0, steps * batch_size * seq_len, 0.0,
                         held_out_tokens=sum(len(e.input_ids) for e in held),
                         mean_window=sum(len(e.input_ids) for e in examples) / len(examples))
    if teacher is not None:
        res.perplexity["teacher"] = perplexity(teacher, held, pad_id)
    res.perplexity["before"] = perplexity(student, held, pad_id)

    torch.manual_seed(seed)
    student.train()
    opt = build_optimizer(optimizer, student, lr=lr, weight_decay=weight_decay, options=optimizer_options)
    in_backward = bool(getattr(opt, "updates_in_backward", False))  # e.g. GaLore's per-layer mode
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup, "cosine"))
    gen = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch_size / len(examples))
    order = torch.cat([torch.randperm(len(examples), generator=gen) for _ in range(epochs)])[: steps * batch_size]
    attention = [p for n, p in student.named_parameters() if ".self_attn." in n]
    frozen = [p for n, p in student.named_parameters() if ".self_attn." not in n and p.requires_grad]
    taps: list = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, kw, out: taps.append((kw["hidden_states"], out[0])),
                                                   with_kwargs=True)
             for layer in teacher.model.layers] if align_steps and teacher is not None else []
    with progress_bar(steps, f"tapa {objective}", unit="step", enabled=progress) as bar:
        for step in range(steps):
            for p in frozen:
                p.requires_grad_(step >= attention_only_steps)
            rows = [examples[i] for i in order[step * batch_size:(step + 1) * batch_size].tolist()]
            ids, labels = make_batch(rows, pad_id)
            res.tokens += sum(len(r.input_ids) for r in rows)
            mask = labels[:, 1:] != IGNORE
            n = int(mask.sum())
            if step < align_steps and hooks:
                taps.clear()
                loss = align_loss(student, teacher, ids, labels != IGNORE, taps)
            elif objective == "distill":
                logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
                with torch.no_grad():
                    target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
                kl = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="none").sum(-1)
                loss = (kl * mask).sum() / n
            else:
                logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
                loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE,
                                       reduction="sum") / n
            loss.backward()
            if not math.isfinite(loss.item()):
                from paramdelta.errors import NonFiniteError

                raise NonFiniteError(f"tapa fine-tune loss became {loss.item()} at step {step + 1}",
                                     hint="lower --lr or add --warmup")
            if not in_backward:
                torch.nn.utils.clip_grad_norm_(attention + frozen, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            res.losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    for p in frozen:
        p.requires_grad_(True)
    for h in hooks:
        h.remove()
    student.eval()
    res.perplexity["after"] = perplexity(student, held, pad_id)
    res.seconds = time.perf_counter() - start
    return res


def align_loss(student: Any, teacher: Any, ids: Any, real: Any, taps: list) -> Any:
    """Mean over layers of ‖TAPA attention(x) − RoPE attention(x)‖² / ‖RoPE attention(x)‖² on real tokens,
    x = the teacher's normalised input to that layer (recorded by `taps` hooks during its forward)."""
    import torch

    with torch.no_grad():
        teacher(input_ids=ids, use_cache=False)
    s = ids.shape[1]
    causal = torch.full((s, s), torch.finfo(torch.float32).min).triu(1)[None, None]
    real = real.float()
    total = 0.0
    for layer, (x, target) in zip(student.model.layers, taps):
        out, _ = layer.self_attn(hidden_states=x, attention_mask=causal)
        err = ((out.float() - target.float()) ** 2).sum(-1)
        total = total + (err * real).sum() / ((target.float() ** 2).sum(-1) * real).sum().clamp_min(1e-12)
    return total / len(taps)


def base_budget(ckpt: Any, max_hops: int = 8) -> dict[str, Any] | None:
    """The training budget behind `ckpt`, from paramdelta's shard provenance: the sum over every
    `paramdelta train` run in its chain (following each output's input folder back through casts and
    other transforms while those folders still exist) of steps × batch_size × grad_accum × seq_len
    token slots (an upper bound on real tokens: short rows are padded). None when no run is known."""
    from paramdelta.checkpoint import Checkpoint
    from paramdelta.provenance import read_provenance

    slots, runs, current = 0, 0, ckpt
    for _ in range(max_hops):
        prov = read_provenance(current)
        opts = prov.get("options")
        if prov.get("kind") == "train" and isinstance(opts, dict):
            try:
                slots += int(prov["steps"]) * int(opts["batch_size"]) * int(opts.get("grad_accum", 1)) * int(
                    opts["seq_len"])
                runs += 1
            except (KeyError, TypeError, ValueError):
                break
        parent = next((r.get("path") for r in prov.get("inputs") or []
                       if isinstance(r, dict) and r.get("role") in ("model", "input")), None)
        if not parent or not Path(parent).is_dir():
            break
        try:
            current = Checkpoint.open(parent)
        except Exception:  # noqa: BLE001 - a moved or partial ancestor just ends the chain
            break
    return {"slots": slots, "runs": runs} if runs else None
