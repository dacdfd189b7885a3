"""Every known failure of paramdelta, as exceptions the CLI turns into one line and a hint.

Raise these for problems the user can fix (bad input, bad options, an occupied target);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PdeltaError(Exception):
    """A problem the user can fix: `message` says what and where, `hint` says how.

    >>> str(PdeltaError("post: tensor x missing", hint="pass the matching checkpoint"))
    'post: tensor x missing (fix: pass the matching checkpoint)'
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (fix: {self.hint})" if self.hint else self.message


class CheckpointError(PdeltaError):
    """An input checkpoint is unreadable, incomplete or inconsistent."""


class PreflightError(PdeltaError):
    """Problems found from headers before any weight was read; all of them at once."""

    def __init__(self, problems: list[str], hint: str | None = None):
        self.problems = list(problems)
        head = self.problems[0] if len(self.problems) == 1 else (
            f"{len(self.problems)} problems found before reading any weight: " + "; ".join(self.problems)
        )
        super().__init__(head, hint)


class OutputError(PdeltaError):
    """The output target cannot be written safely."""


class OptionError(PdeltaError):
    """An option value is invalid."""


class NonFiniteError(PdeltaError):
    """NaN or Inf met in an input tensor or produced by the arithmetic."""


class VerifyError(PdeltaError):
    """`pdelta verify` found an output that does not match its inputs, or that cannot be checked.

    `report` holds every check's result when the checks ran (None when they could not start).
    """

    def __init__(self, message: str, hint: str | None = None, report: dict | None = None):
        super().__init__(message, hint)
        self.report = report
