"""paramdelta: move post-training onto a new base model with weight arithmetic, at disk speed.

    Θ_out = Θ'_base + Σ_i α_i (Θ_post,i − Θ_base,i)

>>> import paramdelta
>>> paramdelta.apply("merged", post="org/Instruct", base="org/Base", new_base="org/Base-v2")  # doctest: +SKIP

Imports are lazy so `pdelta --help` and `import paramdelta` stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "apply": "paramdelta.delta",
    "ApplyReport": "paramdelta.delta",
    "extract": "paramdelta.extraction",
    "inspect_checkpoint": "paramdelta.inspection",
    "compare": "paramdelta.inspection",
    "verify": "paramdelta.verification",
    "Checkpoint": "paramdelta.checkpoint",
    "CheckpointWriter": "paramdelta.writer",
    "OutTensor": "paramdelta.writer",
    "PdeltaError": "paramdelta.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'paramdelta' has no attribute {name!r}")
