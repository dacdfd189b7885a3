"""`tapa`: a RoPE Llama checkpoint → a `llama_tapa` checkpoint, optionally fine-tuned; or a TAPA
checkpoint fine-tuned further (longer context). DESIGN.md §9.

    pdelta tapa retrofit llama/ --out llama-tapa --train-data text.txt --objective distill --steps 200
    pdelta transform tapa --in llama/ --out llama-tapa                    # conversion only, no training
    - op: tapa                                                             # the same, as a recipe step
      in: llama/
      train_data: text.txt

Tensor names and shapes do not change: W_q/W_k rows (and biases) are permuted per head so the chosen
RoPE pairs become the amplitude part, the phase rows are scaled by `phase_init_scale`; config.json
gets model_type `llama_tapa`, `tapa_theta`, `tapa_alpha` and the `paramdelta` section records θ, α,
the permutation and the fine-tune budget (also as a share of the base's own training budget when
its provenance says). Every refusal (partial rotary, sliding window, ALiBi, other RoPE types or
layouts, bad θ) happens from config.json and headers, before any weight is read.

Without `train_data` (or with `steps: 0`) tensors are streamed one by one. With it, `apply()` builds
the model in memory, fine-tunes it, then yields its weights; the held-out perplexities (teacher,
before, after) are appended to the plan's notes, which the runner writes into the model card.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from paramdelta.checkpoint import Checkpoint
from paramdelta.errors import CheckpointError, OptionError, PreflightError
from paramdelta.plugins import TransformPlan
from paramdelta.writer import OutTensor

from . import MODEL_TYPE
from .retrofit import QK, base_budget, convert_tensor, head_dim_of, permutation, rope_problems

DEFAULT_PHASE_SCALE = 0.1  # the best of the README's toy sweep; a random init keeps 1 (nothing to protect)


@dataclass(frozen=True, kw_only=True)
class TapaOptions:
    theta: float | None = field(default=None, metadata={
        "help": "Share θ of each head's dims that form the amplitude part (default 0.5, or the input TAPA model's)."})
    alpha: float | None = field(default=None, metadata={
        "help": "Distance exponent α in cos(2π|m−n|^α·…) (default 0.1, or the input TAPA model's)."})
    amplitude_dims: Literal["low-freq", "first-half"] = field(default="low-freq", metadata={
        "help": "Which RoPE dims become amplitude: low-freq = the lowest-frequency pairs; first-half = as stored."})
    phase_init_scale: float | None = field(default=None, metadata={
        "help": "Scale E on the phase rows of W_q and W_k at the swap (q_P·k_P starts E² smaller); 1 = direct swap. "
                "Default 0.1, or 1 for a randomly initialised input (`paramdelta init` provenance)."})
    amplitude_init_scale: float = field(default=1.0, metadata={
        "help": "Scale on the amplitude rows of W_q and W_k at the swap; θ^¼ (0.84 at θ=0.5) makes q_A·k_A/√(θD) "
                "equal RoPE's q_A·k_A/√D."})
    train_data: Path | None = field(default=None, metadata={
        "help": "Local .txt/.jsonl text to fine-tune on (a held-out slice scores before/after); none = convert only."})
    objective: Literal["lm", "distill"] = field(default="distill", metadata={
        "help": "lm = next-token loss; distill = KL to the original RoPE model's logits (retrofit only)."})
    steps: int = field(default=100, metadata={"help": "Fine-tune optimizer steps (0 = convert only)."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per training window."})
    batch_size: int = field(default=8, metadata={"help": "Windows per step."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (linear warmup, cosine to 10%)."})
    warmup: int = field(default=10, metadata={"help": "Warmup steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay."})
    optimizer: str = field(default="adamw", metadata={"help": "Optimizer from the paramdelta.optimizers registry."})
    optimizer_options: str = field(default="", metadata={
        "help": "Its options as space-separated key=value, e.g. \"rank=8 update_period=50\"."})
    align_steps: int = field(default=0, metadata={
        "help": "The first N of --steps fit each TAPA attention to the RoPE attention's output, layer by layer "
                "(retrofit only; needs the teacher, so any objective)."})
    attention_only_steps: int = field(default=0, metadata={
        "help": "The first N steps update the attention projections only."})
    holdout: float = field(default=0.05, metadata={"help": "Share of train_data records held out for perplexity."})
    seed: int = field(default=0, metadata={"help": "Seed for the data order."})

    def __post_init__(self) -> None:
        if self.theta is not None and not 0.0 < self.theta < 1.0:
            raise OptionError(f"tapa: --theta must be in (0, 1), got {self.theta}", hint="the paper uses 0.5")
        if self.alpha is not None and self.alpha < 0:
            raise OptionError(f"tapa: --alpha must be >= 0, got {self.alpha}", hint="the paper uses 0.1")
        if (self.phase_init_scale is not None and self.phase_init_scale < 0) or self.amplitude_init_scale <= 0:
            raise OptionError(f"tapa: need --phase-init-scale >= 0 and --amplitude-init-scale > 0, got "
                              f"{self.phase_init_scale}, {self.amplitude_init_scale}")
        for name in ("steps", "attention_only_steps", "align_steps", "warmup"):
            if getattr(self, name) < 0:
                raise OptionError(f"tapa: --{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.seq_len < 2 or self.batch_size < 1 or self.lr <= 0:
            raise OptionError(f"tapa: need --seq-len >= 2, --batch-size >= 1, --lr > 0 (got {self.seq_len}, "
                              f"{self.batch_size}, {self.lr})")
        if not 0.0 <= self.holdout < 1.0:
            raise OptionError(f"tapa: --holdout must be in [0, 1), got {self.holdout}")
        if self.train_data is not None:
            object.__setattr__(self, "train_data", Path(self.train_data))

    @property
    def trains(self) -> bool:
        return self.train_data is not None and self.steps > 0


def optimizer_options(options: TapaOptions) -> dict[str, Any]:
    from paramdelta.optim import parse_options

    return parse_options(options.optimizer_options.split())


@dataclass
class _Setup:
    mode: str  # "retrofit" (RoPE input) or "extend" (TAPA input)
    theta: float
    alpha: float
    head_dim: int
    perm: list[int]
    amp: int
    phase_scale: float
    notes: list[str]
    base_slots: int | None = None


class TapaTransform:
    name = "tapa"
    Options = TapaOptions
    needs: frozenset[str] = frozenset({"training"})
    summary = ("TAPA checkpoint (Token-Aware Phase Attention, arXiv 2509.12635) made by paramdelta's `tapa` "
               "transform; load with `pdelta_tapa.load_model` or AutoModelForCausalLM after `import pdelta_tapa`.")
    card_relation = "finetune"

    def __init__(self) -> None:
        self._setups: dict[tuple[str, TapaOptions], _Setup] = {}
        self._last: dict[TapaOptions, _Setup] = {}

    def setup(self, ckpt: Checkpoint, options: TapaOptions) -> _Setup:
        """Every check from config.json, headers and options (no weight read). Cheap, so check() redoes it
        each run; apply() and update_config() reuse the last one (its notes gain the fine-tune results)."""
        from .attention import split_dim

        cfg = ckpt.config
        extend = cfg.get("model_type") == MODEL_TYPE
        if extend:
            theta, alpha = cfg.get("tapa_theta", 0.5), cfg.get("tapa_alpha", 0.1)
            for name, given, have in (("theta", options.theta, theta), ("alpha", options.alpha, alpha)):
                if given is not None and given != have:
                    raise OptionError(f"tapa: {ckpt.path} is already TAPA with {name} {have}; --{name} {given} "
                                      "would change what its weights mean", hint=f"drop --{name}")
            if options.objective == "distill" and options.trains:
                raise OptionError(f"tapa: {ckpt.path} is already TAPA, so there is no RoPE teacher to distil from",
                                  hint="use --objective lm (pdelta tapa extend does)")
            retrofit_only = (options.phase_init_scale, options.amplitude_init_scale, options.amplitude_dims,
                             options.align_steps)
            if retrofit_only != (None, 1.0, "low-freq", 0):
                raise OptionError("tapa: --phase-init-scale, --amplitude-init-scale, --amplitude-dims and "
                                  "--align-steps apply to a RoPE input only", hint="drop them for a TAPA input")
        else:
            problems = rope_problems(cfg, ckpt.path)
            if problems:
                raise PreflightError(problems, hint="TAPA retrofit converts full-RoPE Llama-layout checkpoints only")
            theta = 0.5 if options.theta is None else options.theta
            alpha = 0.1 if options.alpha is None else options.alpha
        head_dim = head_dim_of(cfg)
        try:
            amp = split_dim(head_dim, theta)
        except ValueError as e:
            raise OptionError(f"tapa: {e}", hint=f"choose --theta so θ·{head_dim} is a whole number") from None
        perm = list(range(head_dim)) if extend else permutation(head_dim, theta=theta, mode=options.amplitude_dims)
        qk = [n for n in ckpt.tensors if QK.match(n)]
        bad = [n for n in qk if ckpt.tensors[n].shape[0] % head_dim]
        if not qk or bad:
            raise CheckpointError(f"tapa: {ckpt.path}: " + (f"{bad[0]} rows are not a multiple of head_dim {head_dim}"
                                                            if bad else "no model.layers.N.self_attn.q_proj/k_proj"),
                                  hint="the checkpoint does not have the expected Llama attention layout")
        if options.trains:
            f = options.train_data
            if not f.is_file() or f.suffix not in (".txt", ".jsonl"):
                raise OptionError(f"tapa: --train-data {f} is not an existing .txt or .jsonl file")
            if not any((ckpt.path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
                raise CheckpointError(f"tapa: {ckpt.path} has no tokenizer to cut the training text with",
                                      hint="copy the tokenizer files into the checkpoint folder")
            from paramdelta.optim import check_options

            check_options(options.optimizer, optimizer_options(options))
        mode = "extend" if extend else "retrofit"
        notes = [f"{mode}: θ {theta} ({amp} of {head_dim} dims amplitude), α {alpha}"]
        phase = 1.0 if extend else options.phase_init_scale
        if phase is None:
            from paramdelta.provenance import read_provenance

            random_init = read_provenance(ckpt).get("kind") == "init"
            phase = 1.0 if random_init else DEFAULT_PHASE_SCALE
        if not extend:
            why = " (default for a randomly initialised input)" if options.phase_init_scale is None and phase == 1.0 \
                else ""
            notes.append(f"amplitude dims {options.amplitude_dims}: permutation {perm}; phase rows ×{phase}{why}, "
                         f"amplitude rows ×{options.amplitude_init_scale}")
        base = base_budget(ckpt) if options.trains else None
        notes.append(self._budget_note(options, base))
        return _Setup(mode, theta, alpha, head_dim, perm, amp, phase, notes, base["slots"] if base else None)

    def _budget_note(self, options: TapaOptions, base: dict[str, Any] | None) -> str:
        if not options.trains:
            return "no fine-tune (convert only)"
        slots = options.steps * options.batch_size * options.seq_len
        note = (f"fine-tune budget: {options.steps} steps × {options.batch_size} × {options.seq_len} = {slots:,} "
                f"token slots, objective {options.objective}")
        if base:
            note += (f"; {100 * slots / base['slots']:.2f}% of the base's training budget ({base['slots']:,} slots "
                     f"in {base['runs']} paramdelta train run{'s' * (base['runs'] > 1)})")
        else:
            note += "; the base's training budget is unknown (no paramdelta train provenance)"
        return note

    def check(self, ckpt: Checkpoint, options: TapaOptions) -> TransformPlan:
        s = self._setups[(str(Path(ckpt.path).resolve()), options)] = self._last[options] = self.setup(ckpt, options)
        plan = [OutTensor(n, info.dtype, info.shape) for n, info in ckpt.tensors.items()]
        return TransformPlan(plan, s.notes)

    def update_config(self, config: dict[str, Any], options: TapaOptions) -> dict[str, Any]:
        s = self._last.get(options)
        if s is None:
            raise RuntimeError("tapa: update_config() called before check()")
        config.update(model_type=MODEL_TYPE, architectures=["LlamaTapaForCausalLM"], tapa_theta=s.theta,
                      tapa_alpha=s.alpha)
        for key in ("sliding_window", "use_sliding_window"):
            config.pop(key, None)
        section = dict(config.get("paramdelta") or {})
        record = {"mode": s.mode, "theta": s.theta, "alpha": s.alpha, "permutation": s.perm,
                  "amplitude_dims": options.amplitude_dims, "phase_init_scale": s.phase_scale,
                  "amplitude_init_scale": options.amplitude_init_scale}
        if options.trains:
            record["budget_token_slots"] = options.steps * options.batch_size * options.seq_len
            record["base_token_slots"] = s.base_slots
            config["max_position_embeddings"] = max(config.get("max_position_embeddings") or 0, options.seq_len)
        section["tapa"] = [*section.get("tapa", []), record] if isinstance(section.get("tapa"), list) else [record]
        config["paramdelta"] = section
        return config

    def apply(self, ckpt: Checkpoint, options: TapaOptions) -> Iterator[tuple[str, Any]]:
        s = self._setups.get((str(Path(ckpt.path).resolve()), options)) or self.setup(ckpt, options)
        retro = s.mode == "retrofit"

        def converted(name: str):
            return convert_tensor(name, ckpt.read(name), head_dim=s.head_dim, perm=s.perm, amp=s.amp,
                                  phase_scale=s.phase_scale,
                                  amplitude_scale=options.amplitude_init_scale if retro else 1.0)

        if not options.trains:
            for name in ckpt.tensors:
                yield name, converted(name)
            return
        state = self._finetuned(ckpt, options, s, {n: converted(n) for n in ckpt.tensors})
        for name, info in ckpt.tensors.items():
            from paramdelta.checkpoint import torch_dtype

            yield name, state[name].to(torch_dtype(info.dtype))

    def _finetuned(self, ckpt: Checkpoint, options: TapaOptions, s: _Setup, tensors: dict[str, Any]) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from paramdelta.progress import progress_enabled

        from .modeling import LlamaTapaForCausalLM, tapa_config
        from .retrofit import finetune

        if not progress_enabled():
            hf_logging.disable_progress_bar()
        cfg = {k: v for k, v in ckpt.config.items() if k not in ("sliding_window", "use_sliding_window")}
        student = LlamaTapaForCausalLM(tapa_config(cfg, theta=s.theta, alpha=s.alpha)).float()
        missing, unexpected = student.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and student.config.tie_word_embeddings)]
        if missing or unexpected:
            raise CheckpointError(f"tapa: {ckpt.path} does not fit a Llama layout: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
        teacher = None
        if s.mode == "retrofit" and (options.objective == "distill" or options.align_steps):
            teacher = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32,
                                                           trust_remote_code=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(ckpt.path, trust_remote_code=False)
        res = finetune(student, teacher, tokenizer, options.train_data, objective=options.objective,
                       steps=options.steps, seq_len=options.seq_len, batch_size=options.batch_size, lr=options.lr,
                       warmup=options.warmup, weight_decay=options.weight_decay, optimizer=options.optimizer,
                       optimizer_options=optimizer_options(options), attention_only_steps=options.attention_only_steps,
                       align_steps=options.align_steps,
                       holdout=options.holdout, seed=options.seed)
        ppl = res.perplexity
        s.notes.append(f"fine-tune: {res.steps} steps, {res.tokens:,} real tokens, loss {res.losses[0]:.4g} → "
                       f"{res.losses[-1]:.4g}, {res.seconds:.1f}s")
        s.notes.append("held-out perplexity (" + f"{res.held_out_tokens:,} tokens): "
                       + ", ".join(f"{k} {v:.4f}" for k, v in ppl.items()))
        if res.mean_window < options.seq_len / 2:
            s.notes.append(f"training windows average {res.mean_window:.0f} tokens, under half of --seq-len "
                           f"{options.seq_len}: rows are documents (one per line), never packed; join lines into "
                           "longer documents to train at that length")
        self.last_result = res
        return student.state_dict()

    def load_model(self, path: str | Path) -> Any:
        from .modeling import load_model

        return load_model(path)
