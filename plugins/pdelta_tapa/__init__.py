"""pdelta_tapa: TAPA (Token-Aware Phase Attention, arXiv 2509.12635) for Llama-family models (DESIGN.md §9).

Importing this package registers the `llama_tapa` model type with transformers' Auto classes and
the "tapa" attention and mask functions, so a TAPA checkpoint loads with
`AutoModelForCausalLM.from_pretrained` too — never as plain Llama, never through remote code.

    pdelta tapa retrofit llama/ --out llama-tapa --train-data text.txt --objective distill
    pdelta tapa extend llama-tapa/ --out llama-tapa-long --train-data long.txt --seq-len 512

>>> import pdelta_tapa
>>> model = pdelta_tapa.load_model("llama-tapa")                     # doctest: +SKIP
>>> pdelta_tapa.init_model({"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
...                         "intermediate_size": 512}, "tok", "tapa-0")  # doctest: +SKIP

Import cost: `pdelta` loads this package's CLI module on every start, so importing the package must
not import torch (`pdelta --help` would take seconds). The registration therefore runs now if
transformers is already imported, and otherwise right after transformers' own import finishes (a
one-shot import hook); `load_model`, the `tapa` transform and `paramdelta.plugins.load_model`
register explicitly as well.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

MODEL_TYPE = "llama_tapa"
_LAZY = ("LlamaTapaConfig", "LlamaTapaForCausalLM", "load_model", "register_model", "tapa_config")

__all__ = ["MODEL_TYPE", "LlamaTapaConfig", "LlamaTapaForCausalLM", "init_model", "load_model", "register_model",
           "tapa_config"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'pdelta_tapa' has no attribute {name!r}")


def init_model(config, tokenizer_dir, out, *, theta: float = 0.5, alpha: float = 0.1, **kwargs):
    """A randomly initialised `llama_tapa` model for pretraining from scratch, through
    `paramdelta.train.init_model` (same provenance and card). `config` is a Llama config dict or
    config.json path (its model_type is replaced by `llama_tapa`); `kwargs` go to init_model
    (seed, dtype, max_shard_size, overwrite). Train it with `paramdelta.train.train` as usual."""
    import json
    from pathlib import Path

    from paramdelta.train import init_model as _init

    from . import modeling  # noqa: F401 - registers llama_tapa on import

    if isinstance(config, dict):
        cfg = dict(config)
    else:
        p = Path(config)
        cfg = json.loads((p / "config.json" if p.is_dir() else p).read_text())
    cfg.update(model_type=MODEL_TYPE, tapa_theta=float(theta), tapa_alpha=float(alpha))
    return _init(cfg, tokenizer_dir, out, **kwargs)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is first imported, wraps its loader so that
    `register_model()` runs once its top-level module has executed, then steps aside."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            from . import modeling  # noqa: F401 - registers llama_tapa on import

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    from . import modeling  # noqa: F401 - registers llama_tapa on import
elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformers())
