"""One place that makes progress bars: on stderr, off when asked (PDELTA_NO_PROGRESS=1, tests)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


def progress_enabled(requested: bool = True) -> bool:
    return requested and os.environ.get("PDELTA_NO_PROGRESS", "") in ("", "0")


@contextmanager
def progress_bar(total: int, desc: str, *, unit: str = "B", enabled: bool = True):
    """A tqdm bar on stderr counting `unit`s (bytes scale to kB/MB/GB); a no-op bar when disabled."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
               file=sys.stderr, disable=not progress_enabled(enabled), dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()
