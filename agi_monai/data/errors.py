"""Errors raised for bad input data, and the record that batch operations keep of them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DataError", "Failure", "MissingFileError", "cause_chain", "error_line", "failure_reason", "find_data_error",
    "format_failures", "innermost_cause",
]


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


def cause_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, its ``__cause__``, that one's ``__cause__``...: MONAI's ``Compose`` and a config expression re-raise
    an error as a ``RuntimeError`` ``from`` it, so the error that says what is wrong is further down."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:  # ``raise e from e`` makes a loop
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__


def innermost_cause(error: BaseException) -> BaseException:
    """The end of ``error``'s :func:`cause_chain`: the error behind MONAI's wrapping."""
    *_, innermost = cause_chain(error)
    return innermost


def find_data_error(error: BaseException) -> DataError | None:
    """The first :class:`DataError` in ``error``'s :func:`cause_chain` (``error`` itself included); None when there is
    none."""
    return next((cause for cause in cause_chain(error) if isinstance(cause, DataError)), None)


def error_line(error: BaseException, limit: int | None = None, first_line: bool = False) -> str:
    """``<type>: <message>`` of ``error`` on one line: the message's lines joined (SimpleITK's span several), or only
    its first with ``first_line`` (where the others are advice, as torch's), cut at ``limit`` characters when given;
    the type alone when the message is empty."""
    lines = str(error).strip().splitlines()
    text = " ".join(" ".join(lines[:1] if first_line else lines).split())
    if limit is not None and len(text) > limit:
        text = text[:limit] + " ..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def failure_reason(error: BaseException) -> str:
    """What to report for a failed case: the :class:`DataError` behind ``error`` when there is one (MONAI's
    ``Compose`` wraps it in a ``RuntimeError``), else the type and message of the innermost cause: the
    ``OSError`` naming the file and the system's reason (read-only file system, no space left), not MONAI's
    "applying transform <Compose object at 0x…>"; on one line (SimpleITK's messages span several), as the
    summaries list one case a line."""
    data_error = find_data_error(error)
    return str(data_error) if data_error is not None else error_line(innermost_cause(error))
