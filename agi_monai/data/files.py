"""Writing outputs atomically (a temporary file beside the target, renamed onto it when complete), into a folder
checked before any work is done."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from monai.data import NibabelWriter

from agi_monai.data.errors import DataError

__all__ = ["atomic_output", "check_output_folder", "stopping_cleanly_on_sigterm", "write_json", "AtomicNibabelWriter"]


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


def check_output_folder(folder: str | Path, source: str | Path | None = None) -> Path:
    """Creates ``folder`` and writes (and removes) a file in it, so that a batch run fails before its first case, not
    after computing every case (a read-only file system, a file in the path, no permission). Also refuses ``folder``
    when it is the input folder ``source`` or inside it: a later run would read its outputs as inputs.

    Args:
        folder: the output folder (``output_dir``); created with its parents.
        source: the input, when it is a folder (a datalist file's folder is not read as cases, so it is allowed).

    Returns:
        ``folder``, resolved.

    Raises:
        DataError: naming ``folder``, what is wrong (the system's reason) and what was expected.
    """
    folder = Path(folder).resolve()
    if source is not None and Path(source).is_dir():
        source = Path(source).resolve()
        if folder == source or source in folder.parents:
            raise DataError(folder, f"is the input folder or inside it ({source})",
                            "another folder: outputs there would be read as inputs by a later run")
    if folder.exists() and not folder.is_dir():
        raise DataError(folder, "is a file", "a folder for the outputs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-write-check-"):
            pass
    except OSError as error:
        raise DataError(folder, f"cannot be written ({error.strerror or error})",
                        "a folder this user can create and write files in") from error
    return folder


@contextmanager
def stopping_cleanly_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM (what ``timeout``, Slurm, ``docker stop`` and ``kill`` send) raises ``SystemExit``
    with status 143 instead of ending the process at once: the ``finally`` of :func:`atomic_output` then removes its
    temporary file, as it does for Ctrl-C. (Python's default for SIGTERM runs no cleanup, so an interrupted batch
    left ``.tmp-<pid>-<name>`` files.) Outside the main thread, where signal handlers cannot be set, it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        print(f"terminated by signal {signum}: stopping; the outputs written so far are complete", file=sys.stderr,
              flush=True)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's NIfTI writer (for ``SaveImage(d)``, ``writer=AtomicNibabelWriter``) writing atomically, with the
    spatial units in mm (as the inputs'; MONAI leaves them "unknown") and an optional ``description`` in the
    header's ``descrip`` field: what marks a synthesized volume as synthetic wherever the file goes (``fslhd``,
    ``nib-ls``, ITK-SNAP's info show it), as the DICOM series' SeriesDescription and DerivationDescription do.

    Args:
        description: header text, at most 80 characters (NIfTI-1's ``descrip``); "" leaves nibabel's default.
        kwargs: MONAI's ``NibabelWriter`` arguments (``output_dtype``...).
    """

    def __init__(self, description: str = "", **kwargs: Any) -> None:
        if len(description.encode("utf-8")) > 80:
            raise ValueError(f"NIfTI description {description!r}: expected at most 80 bytes (the header's descrip)")
        super().__init__(**kwargs)
        self.description = description

    def create_backend_obj(self, data_array: Any, affine: Any = None, dtype: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        # an instance method where MONAI has a classmethod: the description is this writer's
        image = super().create_backend_obj(data_array, affine=affine, dtype=dtype, **kwargs)
        image.header.set_xyzt_units("mm", "sec")  # MONAI's affines are in mm; nibabel's default says "unknown"
        if self.description:
            image.header["descrip"] = self.description.encode("utf-8")
        return image

    def write(self, filename: str | Path, verbose: bool = False, **obj_kwargs: Any) -> None:
        with atomic_output(filename) as temporary:
            super().write(temporary, verbose=verbose, **obj_kwargs)
