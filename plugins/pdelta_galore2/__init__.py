"""pdelta_galore2: GaLore 2 (low-rank gradient projection, arXiv 2504.20437) as a paramdelta optimizer and transform.

    pdelta train --model base --data more.txt --out base-2 --optimizer galore2 --opt rank=32
    pdelta galore2 apply base --out base-2 --data more.txt --steps 200 --rank 32
    pdelta galore2 bench

>>> from pdelta_galore2 import galore2
>>> opt = galore2(model, lr=1e-3, weight_decay=0.0, rank=32)      # doctest: +SKIP

Nothing heavy is imported until used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["galore2"]


def galore2(model: Any, **options: Any) -> Any:
    """The GaLore 2 optimizer for `model` (see `pdelta_galore2.optimizer.galore2`)."""
    from .optimizer import galore2 as _factory

    return _factory(model, **options)
