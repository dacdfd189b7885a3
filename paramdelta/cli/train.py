"""`pdelta train` and `pdelta init`: train a causal LM on a local file, or start one from a config.

Many processes: `torchrun --nproc-per-node 2 -m paramdelta.cli.main train ...` (FSDP2, rank 0 writes).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from .options import FORMAT, MAX_SHARD_SIZE, NO_PROGRESS, OVERWRITE, PASSTHROUGH, Format, emit


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class LossOn(str, Enum):
    auto = "auto"
    all = "all"
    completion = "completion"


class Schedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


def train_command(
    ctx: typer.Context,
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint folder to train (tokenizer inside)."),
    data: Path = typer.Option(..., "--data", "-d", help='.txt (one document per line) or .jsonl ({"text"}, {"prompt","completion"} or {"messages"} per line).'),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written beside as a temp folder, renamed when complete)."),
    steps: int = typer.Option(100, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per micro-batch."),
    seq_len: int = typer.Option(128, "--seq-len", help="Longest row in tokens; longer documents are cut into windows."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="bfloat16: autocast compute and a bf16 output; weights and optimizer state stay fp32."),
    seed: int = typer.Option(0, "--seed", help="Seed of the batch order and of dropout; same seed, same weights (CPU)."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="A registered optimizer factory (entry points paramdelta.optimizers)."),
    opt: list[str] = typer.Option([], "--opt", help="Optimizer option key=value, repeatable, e.g. --opt betas=0.9,0.95."),
    warmup: int = typer.Option(0, "--warmup", help="Steps of linear LR warmup."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Decoupled weight decay (linear-layer matrices only, for adamw)."),
    schedule: Schedule = typer.Option(Schedule.cosine, "--schedule", help="LR after warmup: cosine or linear down to 10% of --lr, or constant."),
    max_grad_norm: float | None = typer.Option(1.0, "--max-grad-norm", help="Clip the gradient norm to this (0 turns clipping off)."),
    loss_on: LossOn = typer.Option(LossOn.auto, "--loss-on", help="auto: completions/assistant turns for chat data, everything for text; completion; all."),
    log_every: int = typer.Option(10, "--log-every", help="Update loss, tokens/s and optimizer-state memory on the progress bar every N steps."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda; under torchrun each process takes cuda:LOCAL_RANK."),
    save_state_every: int | None = typer.Option(None, "--save-state-every", help="Save the training state (DCP: model, optimizer, step) every K steps and at the end."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Where --save-state-every writes step-N folders (default: OUT.state beside OUT)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue a run from its --state-dir (latest step) or one step-N folder; pass the same options."),
    max_shard_size: str = MAX_SHARD_SIZE,
    overwrite: bool = OVERWRITE,
    no_progress: bool = NO_PROGRESS,
    fmt: Format = FORMAT,
) -> None:
    """Train (or keep training) MODEL on DATA and write a transformers checkpoint to OUT.

    Any other --key value is an option of the optimizer, like --opt key=value: --optimizer galore2 --rank 128.

    Example: pdelta train --model base --data facts.txt --out base-2 --steps 1000 --lr 2e-3 --batch-size 128 --seq-len 64
    """
    from ..optim import parse_options
    from ..train import train

    report = train(model, data, out, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
                   dtype=dtype.value, seed=seed, optimizer=optimizer,
                   optimizer_options=extra_options(ctx, parse_options(opt)), warmup=warmup, weight_decay=weight_decay,
                   schedule=schedule.value, max_grad_norm=max_grad_norm or None, loss_on=loss_on.value,
                   log_every=log_every, progress=not no_progress, max_shard_size=max_shard_size, overwrite=overwrite,
                   device=device, save_state_every=save_state_every, state_dir=state_dir, resume=resume)
    if report.rank != 0:
        return  # under torchrun one answer is enough: rank 0's
    text = (f"wrote {report.out}: {report.steps} steps, {report.tokens:,} tokens in {report.seconds:.1f}s "
            f"({report.tokens / max(report.train_seconds, 1e-9):,.0f} tokens/s in the loop)\n"
            f"loss {report.first_loss:.4f} -> {report.final_loss:.4f}; optimizer state "
            f"{report.optimizer_state_bytes / 1e6:.2f} MB")
    text += "".join(f"\n  note: {n}" for n in report.notes)
    emit(report.__dict__, fmt, text)


def init_command(
    config: Path = typer.Option(..., "--config", "-c", help="A transformers config.json (model_type required; vocab_size defaults to the tokenizer's)."),
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="Folder with the tokenizer to ship with the model."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random initialisation."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Dtype of the written weights."),
    max_shard_size: str = MAX_SHARD_SIZE,
    overwrite: bool = OVERWRITE,
    fmt: Format = FORMAT,
) -> None:
    """Write a randomly initialised model from CONFIG with TOKENIZER: the start of pretraining from scratch."""
    from ..train import init_model

    path = init_model(config, tokenizer, out, seed=seed, dtype=dtype.value, max_shard_size=max_shard_size,
                      overwrite=overwrite)
    emit({"out": str(path), "seed": seed, "dtype": dtype.value}, fmt, f"wrote {path}")


def extra_options(ctx: typer.Context, options: dict) -> dict:
    """Merge the unknown `--key value` / `--key=value` / `--flag` arguments into the `--opt` options (dashes
    become underscores, values are read as YAML scalars); the optimizer's factory then vets the names."""
    import difflib
    import inspect

    import yaml

    from ..errors import OptionError
    from ..optim import check_options, get_optimizer

    args, out = list(ctx.args), dict(options)
    known = [name for p in ctx.command.params for name in p.opts if name.startswith("--")]
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") or arg == "--":
            raise OptionError(f"unexpected argument {arg!r}", hint="optimizer options are written --key value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            value = args.pop(0) if args and not args[0].startswith("--") else "true"
        name = key.replace("-", "_")
        if name in out:
            raise OptionError(f"optimizer option {name!r} is given twice", hint="pass it once, as --opt or --" + key)
        try:
            check_options(ctx.params["optimizer"], {name: value})
        except OptionError:  # if the closest known name is one of our flags, say so; else the optimizer's error
            theirs = inspect.signature(get_optimizer(ctx.params["optimizer"])).parameters
            close = difflib.get_close_matches(f"--{key}", known + [f"--{k.replace('_', '-')}" for k in theirs], 1, 0.5)
            if close and close[0] in known:
                raise OptionError(f"pdelta train has no option --{key}", hint=f"did you mean {close[0]}?") from None
            raise
        out[name] = yaml.safe_load(value) if value.strip() else ""
    return out


def register(app: typer.Typer) -> None:
    app.command("train", context_settings=PASSTHROUGH)(train_command)
    app.command("init")(init_command)
