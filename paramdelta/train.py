"""Train, or keep training, a transformers causal LM on a local text/JSONL file: one readable loop.

>>> report = train("base", "facts.txt", "base-more", steps=200, lr=2e-3, batch_size=128, seq_len=64)  # doctest: +SKIP
>>> report.first_loss > report.final_loss                                                            # doctest: +SKIP
True

Data, tokenised once up front:
  * `.txt`: one document per line. `.jsonl`: one object per line, {"text": ...},
    {"prompt": ..., "completion": ...} (prompt, then completion, concatenated as written), or
    {"messages": [...]} rendered with the tokenizer's chat template.
  * Every example ends with eos. `loss_on="auto"` trains on the completion / the assistant turns
    (their eos included, so the model learns to stop) and on everything for plain text;
    "completion" insists on that masking; "all" trains on every token.
  * One example per row, right-padded to the longest row of its micro-batch (labels -100 on
    padding), never packed: a short instruction pair must end in eos followed by nothing, or the
    model learns to keep writing into the next example; and every fact starts at position 0, as
    it will when asked. Examples longer than `seq_len` are cut into `seq_len` windows.
    Right padding needs no attention mask in a causal model: no real token sees a later pad.
  * Loss is the sum of token losses over a whole optimizer step divided by that step's target
    tokens, so `grad_accum=2, batch_size=4` is the same step as `batch_size=8`.

Precision: weights and optimizer state stay fp32 (the master copy); `dtype="bfloat16"` runs the
forward under CPU/GPU autocast and writes the output in bf16, rounded once. Plain bf16 weights
would lose every update smaller than half a bf16 ulp (~0.4% of the weight) to rounding.

Reproducible: `torch.manual_seed(seed)` and a seeded `torch.Generator` that shuffles examples
epoch by epoch; on CPU the same call gives bit-identical weights. The output is a plain
transformers checkpoint streamed through the core writer, with provenance in every shard.

Many processes: under `torchrun --nproc-per-node G -m paramdelta.cli.main train ...` every process
tokenises the same data and draws the same batch order, then trains a contiguous share of each
micro-batch; FSDP2 shards weights, gradients and optimizer state per decoder layer and sums the
gradients, so a step is the single-process step up to float rounding; rank 0 writes `out`.
Resume: `save_state_every=K` saves model, optimizer, step, RNG and the losses so far as DCP step
folders; the same call plus `resume=` continues the run (bit-identical on CPU in one process), on
any number of processes. The batch order and LR are functions of (seed, data, step), so the step
is their whole state, and the saved options must match the resuming call's.

Speed (Llama hidden 128, 2 layers, 0.6M parameters, batch 128 x 64, 2 cores): ~22k tokens/s fp32,
~32k bf16. On cores shared with another busy process, OMP_NUM_THREADS=1 ran 7x faster than 2
threads (0.4 vs 2.9 s/step): OpenMP threads wait on each other when one of them is descheduled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import NonFiniteError, OptionError
from .traindata import IGNORE, DataError, Example, make_batch, read_records, tokenize  # noqa: F401 - also importable from here

MIN_LR_RATIO = 0.1  # cosine and linear schedules end at this share of the peak learning rate


@dataclass
class TrainReport:
    out: str
    steps: int
    tokens: int  # real (non-pad) tokens fed forward
    seconds: float  # the whole call: checks, tokenising, loading, training, writing
    first_loss: float
    final_loss: float
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    optimizer_state_bytes: int = 0
    examples: int = 0  # rows after tokenising (long documents count once per window)
    train_seconds: float = 0.0  # the loop alone: tokens / train_seconds is the throughput
    notes: list[str] = field(default_factory=list)
    rank: int = 0  # under torchrun, this process's rank: only rank 0 wrote `out`


def train(model: str | Path, data: str | Path, out: str | Path, *, steps: int, lr: float = 1e-3,
          batch_size: int = 8, seq_len: int = 128, grad_accum: int = 1,
          dtype: Literal["float32", "bfloat16"] = "float32", seed: int = 0, optimizer: str = "adamw",
          optimizer_options: dict[str, Any] | None = None, warmup: int = 0, weight_decay: float = 0.0,
          schedule: Literal["cosine", "linear", "constant"] = "cosine", max_grad_norm: float | None = 1.0,
          loss_on: Literal["auto", "all", "completion"] = "auto", log_every: int = 10, progress: bool = True,
          max_shard_size: str | int = "5GB", overwrite: bool = False, device: str = "cpu",
          save_state_every: int | None = None, state_dir: str | Path | None = None,
          resume: str | Path | None = None) -> TrainReport:
    """Train checkpoint folder `model` (tokenizer inside) on `data` for `steps` optimizer steps; write `out`.

    One step is `grad_accum` micro-batches of `batch_size` rows. The LR warms up linearly over
    `warmup` steps, then follows `schedule` down to 10% of `lr`. Gradients are clipped to
    `max_grad_norm` (None: no clipping). `device` may be e.g. "cuda" (bit-exact repeats only on CPU).
    Under torchrun each of WORLD_SIZE processes trains its share of every batch with FSDP2 and rank 0
    writes `out` (see paramdelta.distributed). Every `save_state_every` steps the training state goes
    to `state_dir` (default: OUT.state beside `out`) as step-N folders; `resume` (such a folder, or
    the state dir for its latest step) continues that run exactly: same call, plus `resume`.
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from . import distributed
    from .checkpoint import Checkpoint
    from .optim import check_options, state_bytes
    from .plugins import load_model
    from .progress import progress_bar
    from .provenance import input_record, model_card, shard_metadata
    from .writer import check_target

    # -- 1. every cheap check before anything heavy --------------------------------------------------
    start = time.perf_counter()
    from .hub import local_folder

    model_path, data_path, out = local_folder(model, progress=progress), Path(data), Path(out)
    _check_numbers({"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "grad_accum": grad_accum,
                    "lr": lr, "log_every": log_every, **({"save_state_every": save_state_every}
                                                         if save_state_every is not None else {})},
                   {"warmup": warmup, "weight_decay": weight_decay})
    _check_choice("dtype", dtype, ("float32", "bfloat16"))
    _check_choice("schedule", schedule, ("cosine", "linear", "constant"))
    _check_choice("loss_on", loss_on, ("auto", "all", "completion"))
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the process group opens in step 3
    if batch_size < world:
        raise OptionError(f"--batch-size {batch_size} is smaller than the {world} processes",
                          hint=f"use --batch-size {world} or more: every process needs rows in each micro-batch")
    ckpt = Checkpoint.open(model_path)
    _check_seq_len(ckpt.config, seq_len, model_path)
    options = dict(optimizer_options or {})
    factory = check_options(optimizer, options)
    if callable(check := getattr(factory, "check", None)):  # an optimizer may vet values against the shapes
        check(ckpt.config, {name: t.shape for name, t in ckpt.tensors.items()}, **options)
    records = read_records(data_path)
    data_sha256 = _sha256(data_path)  # before training: what was read, even if the file changes meanwhile
    check_target(out, [model_path], overwrite)
    if out.resolve() in data_path.resolve().parents:
        raise OptionError(f"data file {data_path} is inside the output folder {out}", hint="choose another --out")
    opts = {"lr": lr, "batch_size": batch_size, "seq_len": seq_len, "grad_accum": grad_accum, "dtype": dtype,
            "optimizer": optimizer, "optimizer_options": options, "warmup": warmup, "weight_decay": weight_decay,
            "schedule": schedule, "max_grad_norm": max_grad_norm, "loss_on": loss_on}
    run = json.loads(json.dumps({**opts, "seed": seed, "steps": steps, "data_sha256": data_sha256}, default=str))
    state_dir = Path(state_dir) if state_dir is not None else out.with_name(out.name + ".state")
    if save_state_every is not None and (state_dir.resolve() == out.resolve()
                                         or out.resolve() in state_dir.resolve().parents):
        raise OptionError(f"--state-dir {state_dir} is inside the output folder {out}",
                          hint="leave --state-dir out to keep the state beside the output")
    resumed = distributed.find_state(Path(resume)) if resume is not None else None
    info = distributed.read_info(resumed) if resumed else {"step": 0, "losses": [], "tokens": 0, "seconds": 0.0,
                                                            "run": run}
    if changed := [f"{k} (saved {info['run'].get(k)!r})" for k in run if info["run"].get(k) != run[k]]:
        raise OptionError(f"--resume {resumed}: this run differs from the saved one in {', '.join(changed)}",
                          hint="resume with the same options and data as the run that saved the state")

    # -- 2. tokenise once --------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    examples, notes = tokenize(records, tokenizer, seq_len, loss_on, data_path)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    vocab = ckpt.config.get("vocab_size") or (ckpt.config.get("text_config") or {}).get("vocab_size")
    top = max(max(ex.input_ids) for ex in examples)
    if vocab and top >= vocab:
        raise DataError(f"{data_path}: token id {top} is outside {model_path}'s embedding ({vocab} rows)",
                        hint="the tokenizer does not match the model; resize the embeddings or fix the tokenizer")
    targets = [sum(label != IGNORE for label in ex.labels[1:]) for ex in examples]  # as make_batch shifts them

    # -- 3. processes, model, optimizer, batch order ------------------------------------------------
    d = distributed.setup(device)
    try:
        torch.manual_seed(seed)
        net, _ = load_model(model_path, device=d.device, dtype=torch.float32)
        net.train()
        arch, tied = type(net).__name__, distributed.tied_names(net)  # before sharding renames and splits them
        if d.world > 1:
            distributed.shard(net)
        opt = factory(net, lr=lr, weight_decay=weight_decay, **options)
        in_backward = bool(getattr(opt, "updates_in_backward", False))
        if in_backward and (grad_accum > 1 or d.world > 1):
            raise OptionError(f"optimizer {optimizer!r} updates inside backward, so it cannot accumulate gradients "
                              "or run in several processes", hint="use --grad-accum 1 and one process")
        peak_lrs = [group["lr"] for group in opt.param_groups]  # the schedule scales what the factory set
        if resumed:
            distributed.load_state(resumed, net, opt, d)
        per_step = batch_size * grad_accum
        gen = torch.Generator().manual_seed(seed)  # the order is a function of seed and data alone: resumable
        epochs = math.ceil(steps * per_step / len(examples))
        order = torch.cat([torch.randperm(len(examples), generator=gen) for _ in range(epochs)])
        order = order[: steps * per_step].view(steps, grad_accum, batch_size)
        autocast = torch.autocast(device_type=torch.device(d.device).type, dtype=torch.bfloat16,
                                  enabled=dtype == "bfloat16")

        # -- 4. the loop ---------------------------------------------------------------------------
        losses: list[float] = list(info["losses"])
        tokens, new_tokens = info["tokens"], 0
        t0 = time.perf_counter()
        with progress_bar(steps, "train", unit="step", enabled=progress and d.main) as bar:
            bar.update(info["step"])
            for step in range(info["step"], steps):
                for group, peak in zip(opt.param_groups, peak_lrs):
                    group["lr"] = peak * lr_factor(step, steps, warmup, schedule)
                rows = [[examples[i] for i in idx] for idx in order[step].tolist()]
                new_tokens += sum(len(ex.input_ids) for micro in rows for ex in micro)
                n_targets = sum(targets[i] for i in order[step].flatten().tolist())  # of the global batch
                step_loss = 0.0
                for k, micro in enumerate(rows):
                    input_ids, labels = (t.to(d.device) for t in make_batch(distributed.my_rows(micro, d), pad_id))
                    distributed.sync_grads(net, d, last=k == len(rows) - 1)
                    with autocast:
                        logits = net(input_ids=input_ids, use_cache=False).logits
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                           ignore_index=IGNORE, reduction="sum") / n_targets
                    loss.backward()
                    step_loss += loss.item()
                step_loss = distributed.all_sum(step_loss, d)
                if not math.isfinite(step_loss):
                    raise NonFiniteError(f"loss became {step_loss} at step {step + 1}",
                                         hint="lower --lr, add --warmup, or keep --max-grad-norm")
                if max_grad_norm is not None and not in_backward:
                    distributed.clip_grad_norm(list(net.parameters()), max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(step_loss)
                bar.update(1)
                if (step + 1) % log_every == 0 or step + 1 == steps:
                    bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{new_tokens / (time.perf_counter() - t0):,.0f}",
                                    opt_state=f"{state_bytes(opt) / 2**20:,.1f}MiB")
                if save_state_every and ((step + 1) % save_state_every == 0 or step + 1 == steps):
                    distributed.save_state(state_dir / f"step-{step + 1:06d}", net, opt, {
                        "step": step + 1, "losses": losses, "tokens": tokens + new_tokens,
                        "seconds": info["seconds"] + time.perf_counter() - t0, "run": run}, d)
        train_seconds = info["seconds"] + time.perf_counter() - t0  # of the whole run, resumed or not
        tokens += new_tokens

        # -- 5. rank 0 writes the checkpoint through the core writer ---------------------------------
        state = distributed.full_state(net, d)  # every rank takes part in the gather
        report = TrainReport(str(out), steps, tokens, time.perf_counter() - start, losses[0], losses[-1], losses,
                             state_bytes(opt), len(examples), train_seconds, notes, rank=d.rank)
        if not d.main:
            return report
        data_rec = {"role": "data", "ref": str(data_path), "path": str(data_path.resolve()),
                    "size": data_path.stat().st_size, "sha256": data_sha256, "records": len(records)}
        extra = {"processes": d.world, **({"resumed_at_step": info["step"]} if resumed else {})}
        meta = shard_metadata("train", "train(model, data)", [], [input_record("model", ckpt, str(model)), data_rec],
                              {"options": opts, "seed": seed, "steps": steps, "final_loss": losses[-1], **extra})
        card = model_card(base_models=[str(model)], title=f"{out.name}: {model_path.name} trained on {data_path.name}",
                          relation="finetune", tags=("paramdelta", "train"),
                          summary=[f"Trained for {steps} steps on `{data_path.name}` (sha256 {data_sha256[:12]}…, "
                                   f"{len(examples)} rows), loss {losses[0]:.4f} → {losses[-1]:.4f}."],
                          sections={"Options": [f"- {k}: `{v}`" for k, v in {**opts, "seed": seed}.items()],
                                    "Notes": [f"- {n}" for n in notes] or ["- none"]})
        save_model(net, out, dtype=dtype, metadata=meta, card=card, side_files=model_path, inputs=[model_path],
                   max_shard_size=max_shard_size, overwrite=overwrite, state=state, skip=tied, architecture=arch)
        report.seconds = time.perf_counter() - start
        return report
    finally:
        distributed.teardown(d)


def init_model(config: dict[str, Any] | str | Path, tokenizer_dir: str | Path, out: str | Path, *, seed: int = 0,
               dtype: Literal["float32", "bfloat16"] = "float32", max_shard_size: str | int = "5GB",
               overwrite: bool = False) -> Path:
    """A randomly initialised causal LM from a transformers config (a dict or config.json), saved with
    the tokenizer of `tokenizer_dir`: the starting point for pretraining from scratch.

    `vocab_size` and bos/eos/pad ids are taken from the tokenizer when the config leaves them out.

    >>> init_model({"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2,
    ...             "num_attention_heads": 4, "intermediate_size": 512}, "tok", "base-0")  # doctest: +SKIP
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .provenance import model_card, shard_metadata
    from .writer import check_target

    _check_choice("dtype", dtype, ("float32", "bfloat16"))
    cfg = _read_config(config)
    tok_dir, out = Path(tokenizer_dir), Path(out)
    if not tok_dir.is_dir():
        raise OptionError(f"tokenizer folder {tok_dir} not found", hint="pass the folder holding tokenizer.json")
    check_target(out, [tok_dir], overwrite)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    ids = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)  # unequal when the ids have gaps
    cfg.setdefault("vocab_size", ids)
    if cfg["vocab_size"] < ids:
        raise OptionError(f"config vocab_size {cfg['vocab_size']} is too small for the tokenizer's ids (0..{ids - 1})",
                          hint="drop vocab_size from the config to take the tokenizer's")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if cfg.get(key) is None and getattr(tokenizer, key) is not None:
            cfg[key] = getattr(tokenizer, key)
    model_type = cfg.pop("model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise OptionError(f"cannot build a {model_type!r} config: {e}", hint="check model_type and the keys") from None
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(hf_config)
    config_rec = {"role": "config", "ref": "inline" if isinstance(config, dict) else str(config),
                  "sha256": hashlib.sha256(json.dumps({"model_type": model_type, **cfg}, sort_keys=True,
                                                      default=str).encode()).hexdigest()}
    tok_rec = {"role": "tokenizer", "ref": str(tok_dir), "path": str(tok_dir.resolve()),
               "files": {f.name: _sha256(f) for f in sorted(tok_dir.glob("tokenizer*.json"))}}
    meta = shard_metadata("init", "init(config)", [], [config_rec, tok_rec], {"seed": seed, "model_type": model_type})
    params = sum(p.numel() for p in net.parameters())
    card = model_card(base_models=[], relation=None, tags=("paramdelta", "init"),
                      title=f"{out.name}: random {model_type}",
                      summary=[f"A randomly initialised {model_type} model ({params:,} parameters, seed {seed}), "
                               "for pretraining from scratch."], sections={"Config": [f"- {k}: `{v}`"
                                                                                       for k, v in cfg.items()]})
    card = card.replace("base_model:\ntags:", "tags:")  # a model from nothing has no base model
    return save_model(net, out, dtype=dtype, metadata=meta, card=card, side_files=tok_dir, inputs=[tok_dir],
                      max_shard_size=max_shard_size, overwrite=overwrite)


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * shape


# -- saving ----------------------------------------------------------------------------------------
def save_model(net: Any, out: Path, *, dtype: str, metadata: dict[str, str], card: str, side_files: Path,
               inputs: list[Path], max_shard_size: str | int, overwrite: bool, state: dict[str, Any] | None = None,
               skip: set[str] | None = None, architecture: str | None = None) -> Path:
    """Stream `state` (default `net.state_dict()`) through the core writer as a transformers checkpoint in
    `dtype`, with config.json, tokenizer and generation config from `side_files`, and the model card.

    `skip` names tied tensors to leave out (default: those sharing storage with an earlier one, as
    transformers does); `architecture` defaults to the class name (FSDP2 renames a sharded model's class).
    """
    import torch

    from .checkpoint import dtype_tag
    from .distributed import tied_names
    from .provenance import copy_tokenizer, write_config
    from .writer import CheckpointWriter, OutTensor

    out_dtype = getattr(torch, dtype)
    skip = tied_names(net) if skip is None else skip
    tensors = [(name, t.detach(), out_dtype if t.is_floating_point() else t.dtype)
               for name, t in (net.state_dict() if state is None else state).items() if name not in skip]
    plan = [OutTensor(name, dtype_tag(d), tuple(t.shape)) for name, t, d in tensors]
    net.config.dtype = out_dtype
    net.config.architectures = [architecture or type(net).__name__]
    config = {k: v for k, v in net.config.to_dict().items() if k != "_name_or_path"}
    with CheckpointWriter(out, plan, max_shard_size=max_shard_size, metadata=metadata, overwrite=overwrite,
                          inputs=inputs) as writer:
        for _, t, d in tensors:
            writer.write(t.to("cpu", d).contiguous().reshape(-1))
        write_config(config, writer.dir, {})
        copied = copy_tokenizer(side_files, writer.dir)
        if "generation_config.json" not in copied and getattr(net, "generation_config", None) is not None:
            net.generation_config.save_pretrained(writer.dir)
        (writer.dir / "README.md").write_text(card)
        return writer.commit()


# -- checks ----------------------------------------------------------------------------------------
def _check_numbers(positive: dict[str, Any], nonnegative: dict[str, Any]) -> None:
    for name, value in [*positive.items(), *nonnegative.items()]:
        low_ok = value >= 0 if name in nonnegative else value > 0
        if not isinstance(value, int | float) or isinstance(value, bool) or not low_ok:
            what = ">= 0" if name in nonnegative else "positive"
            raise OptionError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")


def _check_seq_len(config: dict[str, Any], seq_len: int, path: Path) -> None:
    limit = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    if limit and seq_len > limit:
        raise OptionError(f"--seq-len {seq_len} exceeds {path}'s max_position_embeddings ({limit})",
                          hint=f"use --seq-len {limit} or less")


def _read_config(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(config, dict):
        cfg = dict(config)
    else:
        p = Path(config)
        p = p / "config.json" if p.is_dir() else p
        try:
            cfg = json.loads(p.read_text())
        except OSError as e:
            raise OptionError(f"cannot read config {p} ({e.strerror})", hint="pass a config.json path") from None
        except ValueError as e:
            raise OptionError(f"config {p} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise OptionError("the config has no model_type", hint='add e.g. "model_type": "llama"')
    for key in ("dtype", "torch_dtype", "architectures", "transformers_version", "_name_or_path"):
        cfg.pop(key, None)  # the output's dtype comes from --dtype; the rest is rewritten on save
    return cfg


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()
