"""A training run's hold on its checkpoint folder, the checks of the checkpoint it resumes from, the setting aside of
an earlier run's files and the record of each run: what ``train.json``'s ``initialize`` steps do around the
checkpoint saver and loader (:mod:`agi_monai.engines.checkpoint`)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine

from agi_monai.data.errors import DataError
from agi_monai.data.files import atomic_output, file_sha256, write_json
from agi_monai.engines.checkpoint import (
    BEST_MODEL_DIGEST_KEY,
    SCENARIO_KEY,
    AtomicCheckpointSaver,
    ReportingCheckpointLoader,
    _on_first_iteration,
    _past_last_epoch,
    _require_file,
    _unreadable,
    scenario_record,
)

try:
    import fcntl
except ImportError:  # Windows: no flock, runs are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FolderHold",
    "check_resume_checkpoint",
    "find_resume_checkpoint",
    "hold_checkpoint_folder",
    "keep_unrecorded_best_model",
    "latest_training_checkpoint",
    "record_training_run",
    "release_checkpoint_folder",
    "resume_purge_step",
    "set_aside_earlier_run",
    "start_training_run",
]

_logger = logging.getLogger(__name__)


#: ``resume_ckpt`` value meaning "the newest training checkpoint in ``ckpt_dir``, if any".
LATEST = "latest"


#: The best generator's file in ``ckpt_dir`` and its TorchScript export.
_MODEL_NAMES = ("model.pt", "model.ts")


def check_resume_checkpoint(
    resume_path: str | Path,
    epochs: int,
    epoch_length: int | None,
    expected: str,
    ckpt_dir: str | Path | None = None,
    scenario: Mapping[str, Any] | None = None,
) -> None:
    """``train.json``'s first ``initialize`` step: what can be checked of the checkpoint a run resumes from before
    any dataset is built (the trainer, and so the networks to load it into, come after the preprocessing: hours at
    the paper's scale). It must be readable, and this run's ``--val_interval`` (the epoch length) must be the one it
    was saved with: Ignite restores the saved epoch length and would silently keep it, so that the run's epochs,
    checkpoints and validations followed the old value while its log showed the new one. Its epoch must not be past
    this run's last. Its scenario (inputs in order, target: :func:`training_checkpoint_dict` records them) must be
    this run's: a (T1, T2) -> FLAIR generator has the shapes of a (T2, FLAIR) -> T1 one, and resumed it kept its best
    model and score as the new scenario's. And ``ckpt_dir`` must hold nothing of another run, since the resumed run's
    saves replace what is there: a resume of the latest checkpoint of ``ckpt_dir`` is the one allowed in a folder
    holding training files (a checkpoint from elsewhere, e.g. an ``earlier_run_*`` folder, or an older one of
    ``ckpt_dir``, would replace a newer run's best model and checkpoints). Whether its networks fit the config is
    checked when it is loaded (:class:`ReportingCheckpointLoader`, which also names what a file other than a
    training checkpoint holds).

    Args:
        resume_path: the checkpoint (``@resume_path``: :func:`find_resume_checkpoint`'s); ``""`` for none.
        epochs: this run's ``--epochs``.
        epoch_length: this run's iterations per epoch (``--val_interval``); None where the data sets it (an epoch
            is a pass over the data), to leave it unchecked.
        expected: what the file should be, for the messages (the loader's ``expected``).
        ckpt_dir: the run's checkpoint folder (``@ckpt_dir``); None to leave it unchecked.
        scenario: this run's ``{"inputs": [...], "target": ...}``; None to leave it unchecked.

    Raises:
        DataError: naming the file, what does not fit and the setting that would.
    """
    if not resume_path:
        return
    path = Path(resume_path)
    _require_file(path, expected)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DataError(path, _unreadable(error), expected) from error
    state = checkpoint.get("trainer") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not state.get("epoch_length"):
        return  # not a training checkpoint: the loader says what it holds
    if scenario is not None:
        _check_scenario(path, checkpoint.get(SCENARIO_KEY), scenario)
    if ckpt_dir is not None:
        _check_folder_for_resume(path, Path(ckpt_dir))
    saved_length = int(state["epoch_length"])
    if epoch_length is not None and saved_length != epoch_length:
        raise DataError(
            path, f"was saved by a run with epochs of {saved_length} iterations (--val_interval {saved_length}), "
                  f"this run's have {epoch_length}",
            f"--val_interval {saved_length} to resume it: its epochs, checkpoints and validations follow from it",
        )
    epoch = int(state["epoch"]) if "epoch" in state else int(state.get("iteration", 0)) // saved_length
    if epoch > epochs:
        raise _past_last_epoch(path, epoch, epochs)


def keep_unrecorded_best_model(resume_path: str | Path, ckpt_dir: str | Path) -> Path | None:
    """``train.json``'s step after the resume checks: keeps a copy of a best generator written after the checkpoint
    the run resumes from. Each epoch writes ``model.pt`` (when its validation is the best yet) before its training
    checkpoint; a run stopped between the two (killed, a full disk) left a better ``model.pt`` than the checkpoint's
    ranking knows, and the resumed run replaced it with the first generator beating that ranking, a worse one. The
    copy, ``model_after_<checkpoint name>.pt`` beside it, says which checkpoint it came after (warned about); None
    when ``model.pt`` is the one the checkpoint recorded (:class:`BestModelDigest`), or there is nothing to compare.
    """
    if not resume_path or _rank() > 0:  # (rank 0 writes the files under torchrun)
        return None
    checkpoint = torch.load(resume_path, map_location="cpu", weights_only=True, mmap=True)
    record = checkpoint.get(BEST_MODEL_DIGEST_KEY) if isinstance(checkpoint, Mapping) else None
    if not isinstance(record, Mapping) or not record.get("file"):
        return None  # saved before checkpoints recorded it
    model = Path(ckpt_dir) / str(record["file"])
    if not model.is_file() or file_sha256(model) == record.get("sha256"):
        return None
    kept, number = model.with_name(f"{model.stem}_after_{Path(resume_path).stem}{model.suffix}"), 1
    while kept.exists():  # a second stop after the same checkpoint: its copy is another generator
        number += 1
        kept = model.with_name(f"{model.stem}_after_{Path(resume_path).stem}-{number}{model.suffix}")
    with atomic_output(kept) as temporary:
        shutil.copyfile(model, temporary)
    _logger.warning(
        "%s was written after %s, by a validation whose checkpoint was not (the run stopped between the two saves): "
        "kept as %s, since the resumed run replaces %s with its first generator better than the checkpoint's best",
        model, Path(resume_path).name, kept, model.name,
    )
    return kept


def _scenario_text(scenario: Mapping[str, Any]) -> str:
    return f"({', '.join(map(str, scenario.get('inputs', [])))}) -> {scenario.get('target')}"


def _check_scenario(path: Path, saved: Any, scenario: Mapping[str, Any]) -> None:
    if not isinstance(saved, Mapping):  # saved before checkpoints recorded it
        _logger.warning("%s records no scenario (saved by an earlier version): not checked against %s", path,
                        _scenario_text(scenario))
        return
    wanted = scenario_record(scenario["inputs"], scenario["target"])
    found = scenario_record(saved.get("inputs", []), saved.get("target"))
    if found != wanted:
        raise DataError(
            path, f"was saved by a {_scenario_text(found)} run, this run is {_scenario_text(wanted)}",
            "a checkpoint of this bundle's scenario, inputs in the same order (its generator and best score are "
            "that scenario's)",
        )


def _check_folder_for_resume(path: Path, ckpt_dir: Path) -> None:
    """Refuses a resume whose saves would replace another run's files in ``ckpt_dir``."""
    latest = latest_training_checkpoint(ckpt_dir)
    if latest is not None and latest.resolve() == path.resolve():
        return
    others = [p.name for _, p in sorted(_training_checkpoints(ckpt_dir))]
    others += [name for name in _MODEL_NAMES if (ckpt_dir / name).is_file()]
    if not others:
        return  # an empty folder: the resumed run writes there, replacing nothing
    what = "is not the latest training checkpoint of" if latest is not None and path.parent.resolve() == \
        ckpt_dir.resolve() else "is not in"
    raise DataError(
        path, f"{what} {ckpt_dir}, which holds {', '.join(others)} of another run or a later point: resumed, this "
              "run's saves would replace them",
        f"--resume_ckpt latest (continues {latest.name})" if latest is not None else
        f"{ckpt_dir} moved away or emptied first, or another --bundle_root",
    )


def resume_purge_step(resume_path: str | Path) -> int | None:
    """The first iteration a run resuming from ``resume_path`` trains (its checkpoint's iteration + 1), None for a
    run that starts afresh: ``train.json`` gives it to TensorBoard's ``SummaryWriter(purge_step=...)``, which hides
    the events an interrupted run logged after that checkpoint; the resumed run logs those iterations again, and the
    curves zig-zagged over both. (Read memory-mapped: the optimizer states are not loaded.
    :func:`check_resume_checkpoint` has checked the file.)"""
    if not resume_path:
        return None
    checkpoint = torch.load(resume_path, map_location="cpu", weights_only=True, mmap=True)
    state = checkpoint.get("trainer") if isinstance(checkpoint, Mapping) else None
    return int(state["iteration"]) + 1 if isinstance(state, Mapping) and "iteration" in state else None


class FolderHold:
    """A training run's hold on its checkpoint folder (:func:`hold_checkpoint_folder`): an open descriptor of the
    folder with an exclusive ``flock``, closed (the lock released) by :meth:`release`, or when the hold is garbage
    collected: a run started from Python that fails during its config's initialize (a bad setting, a bad dataset)
    drops its workflow, and with it this hold, rather than keeping the folder for the life of a notebook or service.

    Attributes:
        folder: the checkpoint folder.
        started: when the run took it (``time.time()``): files in the run's folders older than this are another run's.
    """

    def __init__(self, folder: Path, descriptor: int | None) -> None:
        self.folder = folder
        self.started = time.time()
        self._release = weakref.finalize(self, os.close, descriptor) if descriptor is not None else None

    def release(self) -> None:
        if self._release is not None:
            self._release()  # closing the only descriptor of the open folder releases its flock


_holds: dict[tuple[int, int], weakref.ref[FolderHold]] = {}  # (device, inode) of a folder -> this process's hold


def _folder_key(folder: Path) -> tuple[int, int]:
    """The folder itself, however it is reached (a symbolic link, a relative path)."""
    status = folder.stat()
    return status.st_dev, status.st_ino


def _current_hold(ckpt_dir: str | Path) -> FolderHold | None:
    try:
        reference = _holds.get(_folder_key(Path(ckpt_dir)))
    except OSError:
        return None
    return reference() if reference is not None else None


def hold_checkpoint_folder(ckpt_dir: str | Path) -> FolderHold | None:
    """``train.json``'s ``ckpt_dir_hold``, resolved by an ``initialize`` step after the checks of its settings, before
    the datasets: makes ``ckpt_dir`` this run's. (A config item, not the step itself: MONAI drops what ``initialize``
    steps return, and the hold lasts as long as the workflow keeps it.)

    It must be a folder this process can write (created if missing): a read-only one was found at the first save,
    after the preprocessing and a whole epoch. And no other training run may hold it: two runs in one folder set
    each other's files aside, superseded each other's checkpoints and both named the same ``model.pt`` as theirs.
    A run holds an exclusive ``flock`` on the folder itself until it ends (:func:`agi_monai.bundle.run_training`
    releases it) or its process does (a killed run's lock goes with it: nothing stale to clear, and no lock file among
    the checkpoints); a run from Python that fails before training releases it when its workflow is garbage
    collected (:class:`FolderHold`). A second run of the same process takes the folder over from an earlier one.
    Under ``torchrun`` rank 0 holds it and the other ranks get None (MONAI resolves a config's references before
    its expressions, so ``"$dist.get_rank() > 0 or @ckpt_dir_hold"`` would still resolve it on every rank). Where
    there are no locks (Windows; network file systems that refuse a folder's ``flock``) the run goes on unlocked,
    with a warning.

    Raises:
        DataError: ``ckpt_dir`` cannot be written, or another process's run holds it.
    """
    if _rank() > 0:
        return None
    folder = Path(os.path.abspath(ckpt_dir))
    expected = "a folder this run can write its checkpoints to"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(folder, f"cannot be created ({error.strerror or error})", expected) from None
    if not os.access(folder, os.W_OK | os.X_OK):  # a read-only file system included (EROFS)
        raise DataError(folder, "cannot be written (no write permission, or a read-only file system)", expected)
    earlier = _current_hold(folder)
    if earlier is not None:  # an earlier run of this process (ended, or failed before training)
        earlier.release()
    descriptor = None
    if fcntl is not None:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise DataError(
                folder, f"is in use by another training run (a process holds its lock: `fuser -v {folder}` names it)",
                "one training run per checkpoint folder: wait for that one to end, or give this one another "
                "--bundle_root (or --ckpt_dir)",
            ) from None
        except OSError as error:
            _logger.warning("%s: cannot be locked (%s): nothing stops a second run from using it", folder, error)
    else:
        _logger.warning("%s: no file locks on this system: nothing stops a second run from using it", folder)
    hold = FolderHold(folder, descriptor)
    _holds[_folder_key(folder)] = weakref.ref(hold)
    return hold


def release_checkpoint_folder(ckpt_dir: str | Path) -> None:
    """Ends :func:`hold_checkpoint_folder`'s hold before the process does (a run in a notebook or a test)."""
    hold = _current_hold(ckpt_dir)
    if hold is not None:
        hold.release()


#: The file in ``ckpt_dir`` listing the runs that trained there (:func:`record_training_run`).
RUNS_FILE = "training_runs.json"


def record_training_run(
    trainer: Engine, ckpt_dir: str | Path, settings: Mapping[str, Any], networks: Mapping[str, torch.nn.Module]
) -> None:
    """``train.json``'s step after :func:`set_aside_earlier_run`: when the run has completed its first iteration (so
    after an earlier run's files, this list among them, were set aside, and only for a run that trains), appends to
    ``ckpt_dir/training_runs.json`` what produced its checkpoints and ``model.pt``: when and where it started, the
    command line (``python -m monai.bundle run ...`` with its overrides: what to give the evaluation, inference and
    export commands of the same network; null for a run started from Python, e.g. by MONAI Label), ``settings``, each
    network's class and parameter count, and the versions of agi_monai, torch and MONAI. A resumed run adds its own
    entry (``resume_from``). (:func:`start_training_run` calls it on rank 0 only.)

    Args:
        trainer: the run's trainer.
        ckpt_dir: the bundle's ``models`` folder.
        settings: JSON-able settings of the run (values that are not are written as text).
        networks: ``{name: network}``, e.g. the generator and the discriminator.
    """
    import monai

    import agi_monai
    from agi_monai.bundle.command_line import bundle_command_line  # (agi_monai.bundle imports this module)

    def record() -> None:
        path = Path(ckpt_dir) / RUNS_FILE
        runs = []
        if path.is_file():
            try:
                runs = list(json.loads(path.read_text(encoding="utf-8")).get("runs", []))
            except (OSError, ValueError, AttributeError) as error:
                _logger.warning("%s: unreadable (%s): replaced by a list starting with this run", path, error)
        runs.append({
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "command": bundle_command_line(),
            "working_folder": os.getcwd(),
            "first_iteration": int(trainer.state.iteration),
            "settings": json.loads(json.dumps(dict(settings), default=str)),
            "networks": {
                name: {"class": f"{type(network).__module__}.{type(network).__qualname__}",
                       "parameters": sum(p.numel() for p in network.parameters())}
                for name, network in networks.items()
            },
            "versions": {"agi_monai": getattr(agi_monai, "__version__", "unknown"), "torch": torch.__version__,
                         "monai": monai.__version__},
        })
        write_json({"runs": runs}, path)

    _on_first_iteration(trainer, record)


def find_resume_checkpoint(resume_ckpt: str | Path, ckpt_dir: str | Path, file_prefix: str = "training") -> str:
    """The checkpoint a training config resumes from (``""``: none).

    Args:
        resume_ckpt: ``""`` to start afresh (:func:`set_aside_earlier_run` keeps an earlier run's files); a
            checkpoint file (an error when it is missing; a relative name not found from the working folder is
            looked up in ``ckpt_dir``); or ``"latest"``,
            the training checkpoint of ``ckpt_dir`` with the highest epoch (``<file_prefix>_checkpoint_epoch=<n>.pt``,
            :class:`AtomicCheckpointSaver`'s names), or ``""`` with a log line when there is none yet, so that
            ``--resume_ckpt latest`` both starts and continues a run.
        ckpt_dir: the bundle's ``models`` folder.
        file_prefix: the training checkpoints' prefix.
    """
    if not resume_ckpt:
        return ""
    if str(resume_ckpt) != LATEST:
        path = Path(resume_ckpt)
        if not path.is_file() and not path.is_absolute() and (Path(ckpt_dir) / path).is_file():
            path = Path(ckpt_dir) / path  # a name from the models folder, as the run's summary line prints it
        if not path.is_file():
            nor = "" if path.is_absolute() else f" (nor {Path(ckpt_dir) / path})"
            raise FileNotFoundError(
                f"resume_ckpt: {path.absolute()} does not exist{nor}; expected a training checkpoint "
                f"({file_prefix}_checkpoint_epoch=<n>.pt), 'latest', or '' to start afresh"
            )
        return str(path)
    path = latest_training_checkpoint(ckpt_dir, file_prefix)
    if path is None:
        _logger.info("resume_ckpt=latest: no training checkpoint in %s yet, starting afresh", ckpt_dir)
        return ""
    _logger.info("resume_ckpt=latest: resuming from %s", path)
    return str(path)


def _training_checkpoints(ckpt_dir: str | Path, file_prefix: str = "training") -> list[tuple[int, Path]]:
    """(epoch, file) of each ``<file_prefix>_checkpoint_epoch=<n>.pt`` in ``ckpt_dir``."""
    found = re.compile(rf"{re.escape(file_prefix)}_checkpoint_epoch=([0-9]+)\.pt")
    return [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("*.pt") if (m := found.fullmatch(p.name))]


def latest_training_checkpoint(ckpt_dir: str | Path, file_prefix: str = "training") -> Path | None:
    """The training checkpoint of ``ckpt_dir`` with the highest epoch (what ``--resume_ckpt latest`` resumes)."""
    candidates = _training_checkpoints(ckpt_dir, file_prefix)
    return max(candidates)[1] if candidates else None


def set_aside_earlier_run(
    ckpt_dir: str | Path,
    trainer: Engine | None = None,
    file_prefix: str = "training",
    model_names: Sequence[str] = _MODEL_NAMES,
    log_dir: str | Path | None = None,
) -> Path | None:
    """Before a run that starts afresh: moves an earlier run's training checkpoints, best generator (or weights
    put there by hand) with the copies :func:`keep_unrecorded_best_model` kept, its TorchScript export and its list of
    runs (:func:`record_training_run`) from ``ckpt_dir`` into ``ckpt_dir/earlier_run_<date>-<time>/`` and
    says so, because the new run's first saves would otherwise replace them (a forgotten ``--resume_ckpt latest``
    after days of training) and leave an export of other weights beside them. Returns that folder, or None when
    there was nothing to keep.

    Args:
        ckpt_dir: the bundle's ``models`` folder.
        trainer: the run's trainer: the files are then moved when it completes its first iteration, the first point
            at which the run is known to train, and before its first save. A run that cannot start (a bad setting
            found at the first iteration, like one found while the datasets are built) leaves ``ckpt_dir`` as it
            was, so that ``--resume_ckpt latest`` still finds the earlier run. Without it, now.
        file_prefix: the training checkpoints' prefix.
        model_names: the best generator's file and its exports.
        log_dir: the TensorBoard folder (``@output_dir``): its event files last written before this run took its
            folder (:class:`FolderHold`; without a hold, before this call) go along, into the set-aside folder's
            ``<log_dir name>/`` (TensorBoard drew the two runs as one curve, scenario and all).
    """
    hold = _current_hold(ckpt_dir)
    started = hold.started if hold is not None else time.time()
    if trainer is not None:
        _on_first_iteration(
            trainer, lambda: _set_aside(Path(ckpt_dir), file_prefix, model_names, log_dir, started)
        )
        return None
    return _set_aside(Path(ckpt_dir), file_prefix, model_names, log_dir, started)


def _set_aside(
    ckpt_dir: Path, file_prefix: str, model_names: Sequence[str], log_dir: str | Path | None, started: float
) -> Path | None:
    earlier = [p for _, p in sorted(_training_checkpoints(ckpt_dir, file_prefix))]
    earlier += [ckpt_dir / name for name in (*model_names, RUNS_FILE) if (ckpt_dir / name).is_file()]
    earlier += sorted(ckpt_dir.glob(f"{Path(model_names[0]).stem}_after_*.pt"))  # keep_unrecorded_best_model's
    events = _earlier_event_files(Path(log_dir), started) if log_dir is not None else []
    if not earlier and not events:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, number = ckpt_dir / f"earlier_run_{stamp}", 1
    while folder.exists():  # two fresh starts within a second
        number += 1
        folder = ckpt_dir / f"earlier_run_{stamp}-{number}"
    folder.mkdir()
    for path in earlier:
        os.replace(path, folder / path.name)  # same file system: a rename, nothing copied
    if events:
        (folder / events[0].parent.name).mkdir()
        for path in events:
            shutil.move(path, folder / path.parent.name / path.name)  # the log folder may be on another file system
    moved = [p.name for p in earlier] + ([f"{len(events)} TensorBoard event file(s)"] if events else [])
    _logger.warning(
        "starting afresh: moved the earlier run's %s to %s (--resume_ckpt latest would have continued it)",
        ", ".join(moved), folder,
    )
    return folder


def _earlier_event_files(log_dir: Path, started: float) -> list[Path]:
    """TensorBoard event files of ``log_dir`` last written before this run ``started`` (it took its checkpoint
    folder before any of its writers, its other processes' included, made their files): an earlier run's, whichever
    process wrote them."""
    return sorted(p for p in log_dir.glob("events.out.tfevents.*") if p.is_file() and p.stat().st_mtime < started)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def start_training_run(
    trainer: Engine,
    ckpt_dir: str | Path,
    resume_path: str | Path,
    checkpoint_loader: ReportingCheckpointLoader | None,
    checkpoint_saver: AtomicCheckpointSaver,
    log_dir: str | Path | None = None,
    settings: Mapping[str, Any] | None = None,
    networks: Mapping[str, torch.nn.Module] | None = None,
) -> None:
    """``train.json``'s last ``initialize`` step, once the datasets are built and checked: a run that resumes attaches
    its ``checkpoint_loader`` (every rank), one that starts afresh sets an earlier run's files aside
    (:func:`set_aside_earlier_run`, into ``log_dir``'s events too); then the run is recorded
    (:func:`record_training_run`, when ``settings`` are given) and its ``checkpoint_saver`` attached. Under
    ``torchrun`` the files are rank 0's: the other ranks only load the checkpoint.

    Args:
        trainer: the run's trainer.
        ckpt_dir: the bundle's ``models`` folder (held: :func:`hold_checkpoint_folder`).
        resume_path: :func:`find_resume_checkpoint`'s checkpoint, ``""`` to start afresh.
        checkpoint_loader: the loader of ``resume_path`` (None where ``resume_path`` is ``""``: the config disables it).
        checkpoint_saver: the training checkpoint's saver.
        log_dir: the TensorBoard folder (``@output_dir``).
        settings: JSON-able settings of the run, for ``training_runs.json``; None records nothing.
        networks: ``{name: network}`` for the record.
    """
    if resume_path:
        if checkpoint_loader is None:
            raise ValueError(f"resume_path {resume_path}: expected a checkpoint_loader to restore it")
        checkpoint_loader.attach(trainer)
    if _rank() > 0:
        return
    if not resume_path:
        set_aside_earlier_run(ckpt_dir, trainer, log_dir=log_dir)
    if settings is not None:
        record_training_run(trainer, ckpt_dir, settings, networks or {})
    checkpoint_saver.attach(trainer)
