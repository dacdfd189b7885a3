"""pdelta_rsparse: R-Sparse (rank-aware activation sparsity, ICLR 2025) as a paramdelta transform.

    pdelta rsparse apply llama/ --out llama-rs --sparsity 0.5
    pdelta rsparse bench

>>> import pdelta_rsparse
>>> model = pdelta_rsparse.load_model("llama-rs")        # doctest: +SKIP

Nothing heavy is imported until used: `load_model` pulls in torch and transformers on its call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["load_model", "set_mode"]


def load_model(path: str | Path, *, mode: str | None = None) -> Any:
    """A transformers model from an R-Sparse checkpoint (see `pdelta_rsparse.modules.load_model`)."""
    from .modules import load_model as _load

    return _load(path, mode=mode)


def set_mode(model: Any, mode: str) -> Any:
    """Switch every R-Sparse layer to "auto" (prefill dense, decode sparse), "sparse" or "dense"."""
    from .modules import set_mode as _set

    return _set(model, mode)
