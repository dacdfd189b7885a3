"""Shared test setup: progress bars stay off in every test, whatever the scope of its fixtures."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import pytest

from paramdelta.cli.main import main


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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while a module trains its tiny models: they gain nothing from a second thread,
    and on cores shared with other work two OpenMP threads waiting on each other made test_train 8x
    slower (43 s against 5.6 s). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def cli(capfd, monkeypatch):
    """Run `pdelta ARGS` through main() in-process; returns (exit code, stdout, stderr).

    An exception escaping main() is printed as Python would print it (exit code 1), so a
    traceback shows up in stderr exactly as a user would see it.
    """

    def run(*args: str | Path) -> tuple[int, str, str]:
        capfd.readouterr()
        monkeypatch.setattr(sys, "argv", ["pdelta", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - reported as the traceback a user would see
            traceback.print_exc()
            code = 1
        got = capfd.readouterr()
        return code, got.out, got.err

    return run
