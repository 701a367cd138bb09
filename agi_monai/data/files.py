"""Writing outputs atomically: a temporary file beside the target, renamed onto it when complete."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from monai.data import NibabelWriter

__all__ = ["atomic_output", "write_json", "AtomicNibabelWriter"]


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    The temporary name ends with the final name, so writers that choose the format from the extension
    (``.nii.gz``, ``.json``) behave the same. A reader never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's NIfTI writer (for ``SaveImage(d)``, ``writer=AtomicNibabelWriter``) writing atomically."""

    def write(self, filename: str | Path, verbose: bool = False, **obj_kwargs: Any) -> None:
        with atomic_output(filename) as temporary:
            super().write(temporary, verbose=verbose, **obj_kwargs)
