"""Shared test setup: progress bars stay off in every test, whatever the scope of its fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _no_progress():
    """PDELTA_NO_PROGRESS=1 for the whole session (module-scoped fixtures that call apply run
    before any function-scoped fixture could set it)."""
    old = os.environ.get("PDELTA_NO_PROGRESS")
    os.environ["PDELTA_NO_PROGRESS"] = "1"
    yield
    if old is None:
        os.environ.pop("PDELTA_NO_PROGRESS", None)
    else:
        os.environ["PDELTA_NO_PROGRESS"] = old
