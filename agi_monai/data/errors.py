"""Errors raised for bad input data, and the record that batch operations keep of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataError", "Failure", "MissingFileError", "failure_reason", "format_failures"]


class DataError(ValueError):
    """Bad input data: says which file (or case), what is wrong and what was expected.

    Args:
        source: the file, folder or case the problem was found in.
        problem: what is wrong, e.g. ``"contains 12 NaN/Inf voxels"``.
        expected: what was expected instead, e.g. ``"finite intensities"``; optional.
        details: what follows the expected clause, e.g. the cases skipped on the way, each with its own error
            (and its own "(expected …)"); optional. After it, so that each clause stays next to its problem.
    """

    def __init__(
        self, source: str | Path, problem: str, expected: str | None = None, details: str | None = None
    ) -> None:
        self.source = str(source)
        self.problem = problem
        self.expected = expected
        self.details = details
        message = f"{self.source}: {problem}"
        if expected:
            message += f" (expected {expected})"
        if details:
            message += f"; {details}"
        super().__init__(message)

    def __reduce__(self):  # keeps the exception picklable across DataLoader workers
        return type(self), (self.source, self.problem, self.expected, self.details)


class MissingFileError(DataError, FileNotFoundError):
    """A file that should be there is not: a :class:`agi_monai.data.DataError` (the file, what is wrong, what was
    expected; the scripts and the CLI report it as one line) that is also a ``FileNotFoundError``, what callers of
    ``torch.load`` and :class:`ReportingCheckpointLoader` catch for a missing file."""


@dataclass(frozen=True)
class Failure:
    """One case that a batch operation (discovery, preparation) skipped, and why."""

    case_id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.case_id}: {self.reason}"


def format_failures(failures: list[Failure], what: str = "cases") -> str:
    """A summary block listing skipped cases, one per line (empty string when there are none)."""
    if not failures:
        return ""
    lines = [f"{len(failures)} {what} skipped:"] + [f"  - {failure}" for failure in failures]
    return "\n".join(lines)


def failure_reason(error: BaseException) -> str:
    """What to report for a failed case: the :class:`DataError` behind ``error`` when there is one (MONAI's
    ``Compose`` wraps it in a ``RuntimeError``), else the type and message of the innermost cause: the
    ``OSError`` naming the file and the system's reason (read-only file system, no space left), not MONAI's
    "applying transform <Compose object at 0x…>"; on one line (SimpleITK's messages span several), as the
    summaries list one case a line."""
    cause: BaseException = error
    while True:
        if isinstance(cause, DataError):
            return str(cause)
        if cause.__cause__ is None:
            return f"{type(cause).__name__}: {' '.join(str(cause).split())}"
        cause = cause.__cause__
