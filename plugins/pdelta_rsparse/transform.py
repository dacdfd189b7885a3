"""`rsparse`: turn a Llama/Qwen2/Mistral checkpoint into an R-Sparse checkpoint (DESIGN.md §7).

    pdelta rsparse apply llama/ --out llama-rs --sparsity 0.5 --calibration my.jsonl
    pdelta transform rsparse --in llama/ --out llama-rs --sparsity 0.5      # the same, via the core
    - op: rsparse                                                           # the same, as a recipe step
      in: llama/
      sparsity: 0.5

For each targeted linear `...q_proj.weight` (W, m×n) the output holds, in its place:
`...q_proj.weight_t` (Wᵀ, n×m), `...q_proj.col_norm` (n), and when the rank r > 0 `...q_proj.lr_u`
(U_r, m×r) and `...q_proj.lr_v` (Σ_r V_rᵀ, r×n); biases keep their names. config.json gains an
`rsparse` section with the options and, per layer, τ, ρ, s, rank, keep and the calibration error.
Everything else is copied unchanged. Load the result with `pdelta_rsparse.load_model(path)`.

Where the search runs: the output's shapes depend on each layer's rank, which the search picks,
so `check()` runs calibration and the search (it loads the dense model once, after every
header and option check has passed) and caches the result on this transform object, keyed by
the checkpoint path and the (frozen, hashable) options; `update_config()` and `apply()` reuse
it. `apply()` then reads one weight at a time and recomputes its SVD, keeping only r columns.
So `--dry-run` of a recipe step costs a calibration pass too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from paramdelta.checkpoint import Checkpoint, dtype_tag
from paramdelta.errors import CheckpointError, OptionError
from paramdelta.optionspec import LINEAR_TARGETS, parse_targets
from paramdelta.plugins import TransformPlan
from paramdelta.writer import OutTensor

TARGETS = LINEAR_TARGETS
ATTENTION = {"q", "k", "v", "o"}
SUPPORTED = ("llama", "mistral", "qwen2")  # model_type values whose blocks have exactly these 7 linears
PIECE_ELEMENTS = 1 << 22


@dataclass(frozen=True, kw_only=True)
class RSparseOptions:
    sparsity: float = field(default=0.5, metadata={"help": "Share of each targeted layer's weight bytes NOT read "
                                                           "per decode token, in [0, 1)."})
    calibration: Path | None = field(default=None, metadata={
        "help": "Local .txt (a document per line) or .jsonl ({\"text\": ...}) calibration text; "
                "default: a small built-in generic sample."})
    samples: int = field(default=16, metadata={"help": "Calibration windows."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per calibration window."})
    search: Literal["layerwise", "none"] = field(default="layerwise", metadata={
        "help": "layerwise: per-layer ρ with the least output error on calibration tokens; none: --rho everywhere."})
    rho: float = field(default=0.5, metadata={"help": "Budget share of the sparse part with --search none "
                                                      "(1 = sparse only, TEAL-like; 0 = low-rank only)."})
    targets: tuple[str, ...] = field(default=TARGETS, metadata={"help": "Linears to sparsify: q,k,v,o,gate,up,down."})
    score: Literal["weighted", "abs"] = field(default="weighted", metadata={
        "help": "Channel score: weighted = |x_j|·‖W[:,j]‖ (R-Sparse), abs = |x_j| (TEAL)."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={
        "help": "dtype of the new tensors (fp32 is fastest on CPU)."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise OptionError(f"rsparse: --sparsity must be in [0, 1), got {self.sparsity}",
                              hint="0.5 reads half of each targeted weight per decode token")
        if not 0.0 <= self.rho <= 1.0:
            raise OptionError(f"rsparse: --rho must be in [0, 1], got {self.rho}")
        if self.samples < 1 or self.seq_len < 2:
            raise OptionError(f"rsparse: --samples must be ≥ 1 and --seq-len ≥ 2, got {self.samples}, {self.seq_len}")
        object.__setattr__(self, "targets", parse_targets(self.targets, "rsparse"))
        if self.calibration is not None:
            object.__setattr__(self, "calibration", Path(self.calibration))


@dataclass
class _Result:
    """What check() found, reused by update_config() and apply()."""

    path: str
    layers: dict[str, Any]  # module name -> LayerSetting
    calibration: str
    errors: dict[str, dict[float, float]]


def layer_names(config: dict[str, Any], targets: tuple[str, ...]) -> list[str]:
    """Module names of the targeted linears, block by block (`model.layers.0.self_attn.q_proj`, ...)."""
    blocks = int(config.get("num_hidden_layers", 0))
    return [f"model.layers.{i}.{'self_attn' if t in ATTENTION else 'mlp'}.{t}_proj"
            for i in range(blocks) for t in targets]


class RSparseTransform:
    name = "rsparse"
    Options = RSparseOptions
    needs: frozenset[str] = frozenset({"calibration"})
    summary = ("R-Sparse checkpoint: per-layer rank-aware activation sparsity (ICLR 2025, arXiv 2504.19449) "
               "made by paramdelta's `rsparse` transform; load with `pdelta_rsparse.load_model`.")
    card_relation = "quantized"

    def __init__(self) -> None:
        self._results: dict[tuple[str, RSparseOptions], _Result] = {}
        self._last: dict[RSparseOptions, _Result] = {}

    # -- header-only checks, then calibration ---------------------------------------------------
    def preflight(self, ckpt: Checkpoint, options: RSparseOptions) -> list[str]:
        """Every problem found from config, headers and options, before any tensor is read."""
        cfg = ckpt.config
        kind = cfg.get("model_type")
        if kind not in SUPPORTED:
            raise CheckpointError(f"rsparse: {ckpt.path} is a {kind or 'model without model_type'!r} "
                                  f"({', '.join(cfg.get('architectures') or ['?'])}); R-Sparse here handles "
                                  f"{', '.join(SUPPORTED)} blocks", hint="convert a Llama, Qwen2 or Mistral checkpoint")
        if any(n.endswith(".weight_t") for n in ckpt.tensors):
            raise CheckpointError(f"rsparse: {ckpt.path} is already an R-Sparse checkpoint",
                                  hint="run the transform on the original dense checkpoint")
        layers = layer_names(cfg, options.targets)
        problems = []
        for name in layers:
            info = ckpt.tensors.get(f"{name}.weight")
            if info is None:
                problems.append(f"{name}.weight is missing")
            elif len(info.shape) != 2 or not info.is_float:
                problems.append(f"{name}.weight is {info.dtype} {list(info.shape)}, not a float matrix")
        if not layers or problems:
            raise CheckpointError(f"rsparse: {ckpt.path}: " + ("; ".join(problems[:5]) or "no decoder layers"),
                                  hint="the checkpoint does not have the expected Llama-style linear layers")
        if options.calibration is not None:
            f = options.calibration
            if not f.is_file():
                raise OptionError(f"rsparse: calibration file {f} does not exist", hint="pass a local .txt or .jsonl")
            if f.suffix not in (".txt", ".jsonl"):
                raise OptionError(f"rsparse: calibration file {f} must be .txt or .jsonl")
        if not any((ckpt.path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise CheckpointError(f"rsparse: {ckpt.path} has no tokenizer to cut the calibration text with",
                                  hint="copy the tokenizer files into the checkpoint folder")
        return layers

    def _calibrate(self, ckpt: Checkpoint, options: RSparseOptions, layers: list[str]) -> _Result:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .calibration import CalibrationError, calibrate, calibration_tokens

        tokenizer = AutoTokenizer.from_pretrained(ckpt.path, trust_remote_code=False)
        try:
            tokens, note = calibration_tokens(tokenizer, options.calibration, samples=options.samples,
                                              seq_len=options.seq_len)
        except CalibrationError as e:
            raise OptionError(f"rsparse: {e}", hint="pass a .txt file or .jsonl with a \"text\" field") from None
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype="auto", trust_remote_code=False).eval()
        errors: dict[str, dict[float, float]] = {}
        settings = calibrate(model, tokens, layers, sparsity=options.sparsity, search=options.search,
                             rho=options.rho, score=options.score, errors=errors)
        return _Result(str(ckpt.path), settings, note, errors)

    def result(self, ckpt: Checkpoint, options: RSparseOptions) -> _Result:
        key = (str(Path(ckpt.path).resolve()), options)
        if key not in self._results:
            layers = self.preflight(ckpt, options)
            self._results[key] = self._calibrate(ckpt, options, layers)
        self._last[options] = self._results[key]
        return self._results[key]

    def check(self, ckpt: Checkpoint, options: RSparseOptions) -> TransformPlan:
        res = self.result(ckpt, options)
        tag = dtype_tag(options.dtype)
        plan = []
        for name, info in ckpt.tensors.items():
            layer = name.removesuffix(".weight")
            setting = res.layers.get(layer) if name.endswith(".weight") else None
            if setting is None:
                plan.append(OutTensor(name, info.dtype, info.shape))
                continue
            m, n = info.shape
            plan += [OutTensor(f"{layer}.weight_t", tag, (n, m)), OutTensor(f"{layer}.col_norm", tag, (n,))]
            if setting.rank:
                plan += [OutTensor(f"{layer}.lr_u", tag, (m, setting.rank)),
                         OutTensor(f"{layer}.lr_v", tag, (setting.rank, n))]
        return TransformPlan(plan, self._notes(ckpt, options, res))

    def _notes(self, ckpt: Checkpoint, options: RSparseOptions, res: _Result) -> list[str]:
        s = list(res.layers.values())
        rhos = [x.rho for x in s]
        mean_err = sum(x.rel_err for x in s) / len(s)
        notes = [f"calibration: {res.calibration}" + (" (no --calibration given; pass one with text like yours)"
                                                      if options.calibration is None else ""),
                 f"{len(s)} linears at sparsity {options.sparsity}; search {options.search}: ρ mean "
                 f"{sum(rhos) / len(rhos):.2f} (min {min(rhos):.1f}, max {max(rhos):.1f}), rank total "
                 f"{sum(x.rank for x in s)}; mean relative output error {mean_err:.4g}"]
        if options.search == "layerwise" and options.sparsity > 0:
            per_rho = {r: sum(e[r] for e in res.errors.values()) / len(res.errors) for r in next(iter(
                res.errors.values()))}
            best_rho = min(per_rho, key=per_rho.get)
            better = (1 - mean_err / per_rho[best_rho]) * 100 if per_rho[best_rho] else 0.0
            notes.append(f"that is {better:.0f}% less error than the best uniform split (ρ={best_rho:.1f} everywhere: "
                         f"{per_rho[best_rho]:.4g}); sparse only (ρ=1): {per_rho[1.0]:.4g}")
        return notes

    def update_config(self, config: dict[str, Any], options: RSparseOptions) -> dict[str, Any]:
        res = self._last.get(options)
        if res is None:
            raise RuntimeError("rsparse: update_config() called before check()")
        config["rsparse"] = {
            "version": 1, "paper": "arXiv 2504.19449", "sparsity": options.sparsity, "search": options.search,
            "score": options.score, "dtype": options.dtype, "targets": list(options.targets),
            "calibration": res.calibration,
            "layers": {name: s.to_json() for name, s in res.layers.items()},
        }
        return config

    def apply(self, ckpt: Checkpoint, options: RSparseOptions) -> Iterator[tuple[str, Any]]:
        from paramdelta.checkpoint import torch_dtype

        from .modules import factorize

        res = self.result(ckpt, options)
        dtype = torch_dtype(dtype_tag(options.dtype))
        for name in ckpt.tensors:
            layer = name.removesuffix(".weight")
            setting = res.layers.get(layer) if name.endswith(".weight") else None
            if setting is None:
                flat = ckpt.read(name).reshape(-1)
                for s in range(0, max(flat.numel(), 1), PIECE_ELEMENTS):
                    yield name, flat[s:s + PIECE_ELEMENTS].clone()
                continue
            for suffix, tensor in factorize(ckpt.read(name), setting.rank, score=options.score, dtype=dtype).items():
                yield f"{layer}.{suffix}", tensor

    def load_model(self, path: str | Path) -> Any:
        from .modules import load_model

        return load_model(path)

