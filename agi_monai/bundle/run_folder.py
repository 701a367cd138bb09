"""The run folders that ``scripts/demo.py``, ``compare.py`` and ``ablation.py`` train bundles in: a rerun into the
same output folder replaces the script's own earlier run there, and never removes a file the script did not write.

A bundle run that starts afresh moves an earlier run's checkpoints and ``model.pt`` to ``models/earlier_run_<time>/``
(:func:`agi_monai.engines.set_aside_earlier_run`): right in a folder a person trains in by hand, where those files
may be days of work. A script's run folder is different: the script's tables and panel describe its latest run only,
so each rerun would pile up another ``earlier_run_*`` folder (and another pair of TensorBoard logs) that nothing
refers to. Hence each run's files are recorded in ``<run folder>/script_outputs.json`` (path, size, modification
time) and exactly those are removed before the next run of the same script there. A folder without that record
(another script's, one a person points the script at, or a run from before the record existed) loses nothing: the
bundle sets its earlier run aside, as for any bundle folder.

The tables and figures a script writes beside its run folders are named in advance: :func:`remove_earlier_outputs`
removes those of its earlier run by name before any work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from agi_monai.data import DataError, write_json

__all__ = ["RECORD_NAME", "remove_earlier_outputs", "replacing_earlier_run"]

#: the record of the files a script's run wrote in its run folder
RECORD_NAME = "script_outputs.json"
#: what the bundles' train.json reuses from one run to the next (``cache_dir`` = ``eval/cache``): never recorded
BUNDLE_CACHE = ("eval/cache",)


def _files(folder: Path, keep: Sequence[str]) -> dict[str, os.stat_result]:
    """Regular files below ``folder`` (relative POSIX paths), except the record and those under ``keep``."""
    kept = [PurePosixPath(k) for k in keep]
    files = {}
    for path in folder.rglob("*"):
        relative = PurePosixPath(path.relative_to(folder).as_posix())
        if str(relative) == RECORD_NAME or any(relative.is_relative_to(k) for k in kept) or not path.is_file():
            continue
        files[str(relative)] = path.stat()
    return files


def _file_identity(stat: os.stat_result) -> tuple[int, int, int]:
    """A file's (inode, size, mtime): a file the bundle only moved (``os.replace`` into ``earlier_run_*``) keeps all
    three, so it is not counted as written by the run."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _remove_recorded(folder: Path, script: str) -> list[str]:
    """Removes the files ``folder``'s record lists that are still as the script left them (same size and
    modification time; a file changed since stays), then the folders this leaves empty, then the record. Another
    script's record removes nothing. Returns the removed files."""
    record_path = folder / RECORD_NAME
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        entries = [(PurePosixPath(str(e["path"])), e["size"], e["mtime_ns"]) for e in record["files"]]
        recorded_by = record["script"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            record_path, f"cannot be read ({type(error).__name__}: {error})",
            f"the record {script} writes, {{'script': ..., 'files': [{{'path', 'size', 'mtime_ns'}}, ...]}}; delete it "
            "to keep every file there",
        ) from None
    if recorded_by != script:
        return []
    removed = []
    for relative, size, mtime_ns in entries:
        path = folder / relative
        # a record edited by hand reaches nothing outside the folder; links are not what a run writes
        if relative.is_absolute() or ".." in relative.parts or path.is_symlink() or not path.is_file():
            continue
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) == (size, mtime_ns):
            path.unlink()
            removed.append(str(relative))
    for directory in sorted({(folder / r).parent for r in removed}, key=lambda p: len(p.parts), reverse=True):
        while directory != folder and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
            directory = directory.parent
    record_path.unlink()
    return removed


def _names(paths: Collection[str], shown: int = 3) -> str:
    """The first few of ``paths``, those under ``models/`` (weights, checkpoints) first."""
    ordered = sorted(paths, key=lambda p: (not p.startswith("models/"), p))
    return ", ".join(ordered[:shown]) + (f" and {len(ordered) - shown} more" if len(ordered) > shown else "")


@contextmanager
def replacing_earlier_run(
    folder: str | Path, script: str, say: Callable[[str], None] | None = None, keep: Sequence[str] = BUNDLE_CACHE
) -> Iterator[Path]:
    """Around the training (and evaluation) a script runs in ``folder``: first removes the files the same script's
    earlier run there wrote (as recorded in ``folder/script_outputs.json``) and says so in one line; then records
    the files this run writes, also when it fails (a partial run is replaced by the next one too).

    Files under ``keep`` (folders relative to ``folder``; default the bundle's slice cache, which the next run
    reuses) are neither recorded nor removed. A recorded file changed since (other size or modification time) is
    left in place, and so is every file of a folder without the record: the line names them, and a fresh bundle run
    moves an earlier ``model.pt`` and checkpoints to ``models/earlier_run_<time>/`` as usual.

    Args:
        folder: the run folder (the bundle root of :func:`agi_monai.bundle.experiment.train_bundle`); created.
        script: the script's name, e.g. ``"demo.py"``, stored in the record: another script's record counts as none.
        say: where the one line goes; default printed (flushed: it comes before the bundle's log lines).
        keep: relative folders neither recorded nor removed.

    Raises:
        agi_monai.data.DataError: the record exists but cannot be read (it names the file; nothing is removed).
    """
    folder = Path(folder)
    say = say or (lambda line: print(line, flush=True))
    folder.mkdir(parents=True, exist_ok=True)
    removed = _remove_recorded(folder, script) if (folder / RECORD_NAME).is_file() else []
    earlier = _files(folder, keep)
    if removed:
        say(
            f"{script}: replacing its earlier run in {folder}: removed the {len(removed)} file(s) it wrote "
            f"({_names(removed)})" + (f"; kept {len(earlier)} other file(s) ({_names(earlier)})" if earlier else "")
        )
    elif earlier:
        say(
            f"{script}: {folder} holds {len(earlier)} file(s) it did not write ({_names(earlier)}): none removed "
            "(a fresh bundle run moves an earlier model.pt and checkpoints to models/earlier_run_<time>/)"
        )
    before = {_file_identity(stat) for stat in earlier.values()}
    try:
        yield folder
    finally:
        written = {path: stat for path, stat in _files(folder, keep).items() if _file_identity(stat) not in before}
        files = [{"path": path, "size": s.st_size, "mtime_ns": s.st_mtime_ns} for path, s in sorted(written.items())]
        write_json({"script": script, "files": files}, folder / RECORD_NAME)


def remove_earlier_outputs(
    folder: str | Path, names: Iterable[str], script: str, say: Callable[[str], None] | None = None
) -> list[Path]:
    """At the start of a run, before any network is trained or weights replaced: removes the files ``names``
    (relative to ``folder``) that an earlier run wrote and this one writes again at its end (the top-level tables,
    figures, JSON), so that a run that fails part way leaves no earlier table beside replaced weights. Says so in
    one line (``say``, default printed) when it removed any.

    Returns:
        The removed files.
    """
    folder = Path(folder)
    removed = []
    for name in dict.fromkeys(names):
        path = folder / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(path)
    if removed:
        say = say or (lambda line: print(line, flush=True))
        say(
            f"{script}: removed the earlier run's {', '.join(p.name for p in removed)} from {folder} before any "
            "work (this run writes them again when it completes)"
        )
    return removed
