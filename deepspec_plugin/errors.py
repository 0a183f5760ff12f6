"""The one exception type for expected failures (bad input, missing files, unreachable servers).

The CLI prints a ``DspecError`` as one line and exits non-zero without a traceback; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class DspecError(Exception):
    """An expected error: what went wrong, and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".") if fix else None
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.problem}. Fix: {self.fix}." if self.fix else f"{self.problem}."
