"""MONAI's CheckpointSaver with atomic writes (a checkpoint file is either the old one or the new one), its
CheckpointLoader with failures that name the file and say what does not match, and :func:`load_weights`, the one
reader of a network's weights file (the same failures)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import time
import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from agi_monai.data.contrasts import canonical_contrast
from agi_monai.data.errors import DataError, MissingFileError
from agi_monai.data.files import atomic_output, file_sha256, free_space, remove_stale_temporaries, write_json

try:
    import fcntl
except ImportError:  # Windows: no flock, runs are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "AtomicCheckpointSaver",
    "BestModelDigest",
    "FolderHold",
    "ValidationBest",
    "ReportingCheckpointLoader",
    "check_resume_checkpoint",
    "expected_bundle_weights",
    "find_resume_checkpoint",
    "hold_checkpoint_folder",
    "keep_unrecorded_best_model",
    "latest_training_checkpoint",
    "load_weights",
    "record_training_run",
    "release_checkpoint_folder",
    "set_aside_earlier_run",
]

_logger = logging.getLogger(__name__)

#: ``resume_ckpt`` value meaning "the newest training checkpoint in ``ckpt_dir``, if any".
LATEST = "latest"

#: The best generator's file in ``ckpt_dir`` and its TorchScript export.
_MODEL_NAMES = ("model.pt", "model.ts")

#: The training checkpoint's entry recording the run's inputs and target (:func:`training_checkpoint_dict`).
SCENARIO_KEY = "scenario"

#: The training checkpoint's entry recording the best generator's file as the checkpoint was written.
BEST_MODEL_DIGEST_KEY = "best_model_digest"

#: The training checkpoint's entry recording the validation's best key metric and its epoch.
VALIDATION_BEST_KEY = "validation_best"


class _AtomicDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` whose files are written atomically, with MONAI's optional fixed file name.

    Each save is written through :func:`agi_monai.data.atomic_output` (a temporary file beside the final one,
    renamed onto it), not through Ignite's own atomic mode, whose temporaries are ``tempfile``'s random ``tmp*``
    names: a run killed mid-save (``kill -9``, the out-of-memory killer) would leave one in ``models/`` for good,
    where ours is recognised and removed by the next run (:class:`AtomicCheckpointSaver`). (MONAI turns Ignite's
    atomic mode off because its temporary file is created ``0600``; ours has the usual permissions.)

    Ignite's ``Checkpoint`` removes the file a save supersedes (the oldest of ``n_saved``, or the fixed name)
    *before* writing the new one; removals are deferred here until the new file is in place, so a valid
    checkpoint is on disk at every moment.
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=False, require_empty=False)
        self.filename = filename
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename if self.filename is not None else filename
        if idist.get_rank() == self.save_on_rank:  # as DiskSaver checks: other ranks write no temporary to rename
            try:
                with atomic_output(self.dirname / name) as temporary:
                    super().__call__(checkpoint, temporary.name, metadata)
            except (OSError, RuntimeError) as error:  # torch's writer says "unexpected pos ..." for a full disk
                reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
                # the traceback's frames hold torch's writer, whose open (deleted) temporary still takes its space
                traceback.clear_frames(error.__traceback__)
                raise DataError(
                    self.dirname / name, f"could not be written ({reason}; {free_space(self.dirname)})",
                    "a writable folder with room for the checkpoint (the previous one is kept)",
                ) from error
        for old in self._superseded:
            if old != name:  # a fixed name was just replaced in place
                try:
                    super().remove(old)
                except FileNotFoundError:
                    pass
        self._superseded.clear()

    def remove(self, filename: str) -> None:
        self._superseded.append(self.filename if self.filename is not None else filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments, same file names) whose files are written atomically.

    MONAI's saver builds Ignite's ``DiskSaver`` with ``atomic=False``, and Ignite deletes the superseded file
    before writing its successor, so a run killed while saving leaves a truncated ``.pt``, or none at all, for
    the resume to fail on. Here each save goes to a temporary file renamed into place, and the superseded file
    is deleted only after that; the temporary file of a run killed mid-save is removed when the next run builds its
    saver (:func:`agi_monai.data.files.remove_stale_temporaries`). Use it for the best model (``models/model.pt``)
    and the full training checkpoint (:func:`agi_monai.engines.training_checkpoint_dict`).

    Interval checkpoints in ``save_dir`` when the run completes its first iteration (an earlier or interrupted run's
    ``<file_prefix>_checkpoint_epoch=<n>.pt``, unless :func:`set_aside_earlier_run` moved them then) count as saved,
    with the lowest priority: a resumed run's first saves supersede them within ``n_saved``, where Ignite alone would
    keep them for ever.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        # CheckpointSaver keeps up to three ignite Checkpoints (final, key metric, interval), each with its
        # own DiskSaver; replacing the savers keeps all of MONAI's scheduling and naming
        savers = []
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed_name = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, filename=fixed_name)
                savers.append(checkpoint.save_handler)
        if savers and idist.get_rank() == savers[0].save_on_rank:  # the rank that writes (its saver made the folder)
            remove_stale_temporaries(self.save_dir)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self._interval_checkpoint is not None:  # at the first iteration: after an earlier run was set aside
            interval_checkpoint = self._interval_checkpoint
            _on_first_iteration(engine, lambda: _adopt_earlier_files(interval_checkpoint, Path(self.save_dir)))

    @property
    def key_metric_ranking(self) -> Checkpoint | None:
        """The Ignite ``Checkpoint`` that decides whether a validation beats the best so far (``state_dict`` /
        ``load_state_dict``): :func:`agi_monai.engines.training_checkpoint_dict` saves it, so that a resumed run
        replaces ``models/model.pt`` only with a better generator."""
        return self._key_metric_checkpoint


def _require_file(path: Path, expected: str) -> None:
    """Raises :class:`MissingFileError` (or :class:`DataError` for a folder) unless ``path`` is a file."""
    if path.is_dir():
        raise DataError(path, "is a folder, not a file", expected)
    if not path.is_file():
        raise MissingFileError(path, "does not exist", expected)


class ReportingCheckpointLoader(CheckpointLoader):
    """``monai.handlers.CheckpointLoader`` (same arguments) whose failures say which file, what is wrong and what
    was expected: a missing file, one ``torch.load`` cannot read (truncated, not a checkpoint), one that lacks an
    entry of ``load_dict`` (e.g. ``models/model.pt``, the generator alone, given to resume training), or a state
    dict of another network (another class, widths or number of inputs: the differing tensors are named with both
    shapes, as :func:`load_weights` names them). MONAI's loader raises torch's own errors, which name no file, or
    one listing every key of the file.

    A resumed run trains with its own learning rates (``learning_rates``), as with every other setting of its
    config: an optimizer's state dict carries its parameter groups' ``lr``, which MONAI's loader restores, so that
    ``--learning_rate`` was echoed and then ignored on a resume — where it matters most, a resume with a lower one
    after a divergence. A rate that differs from the checkpoint's is logged.

    Args:
        load_path, load_dict, kwargs: as for ``monai.handlers.CheckpointLoader``.
        expected: what the file should be, for the messages; default: a checkpoint of ``load_dict``'s entries
            saved by a run with the same ``network_def``.
        learning_rates: ``{name in load_dict: learning rate}`` set on those optimizers' parameter groups once the
            checkpoint is restored. Leave it out where a scheduler in ``load_dict`` drives the learning rate.
        evaluator: the validation's evaluator, whose best key metric and epoch are restored from the checkpoint's
            :class:`ValidationBest` record (a checkpoint without one leaves them as they are).

    Raises:
        MissingFileError: ``load_path`` does not exist (a ``FileNotFoundError``).
        DataError: it cannot be read or restored into ``load_dict``.
        ValueError: ``learning_rates`` names no optimizer of ``load_dict``, or a rate that is not positive.
    """

    def __init__(
        self,
        load_path: str,
        load_dict: dict,
        expected: str | None = None,
        learning_rates: Mapping[str, float] | None = None,
        evaluator: Engine | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(load_path, load_dict, **kwargs)
        self.evaluator = evaluator
        self.expected = expected or (
            f"a checkpoint of {', '.join(load_dict)} saved by a run with the same network_def and inputs"
        )
        self.learning_rates = dict(learning_rates or {})
        for name, rate in self.learning_rates.items():
            if not isinstance(load_dict.get(name), torch.optim.Optimizer):
                raise ValueError(f"learning_rates[{name!r}]: expected the name of an optimizer in load_dict "
                                 f"({', '.join(load_dict)})")
            if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
                raise ValueError(f"learning_rates[{name!r}] = {rate!r}: expected a positive learning rate")

    def __call__(self, engine: Engine) -> None:
        path = Path(self.load_path)
        _require_file(path, self.expected)
        max_epochs = engine.state.max_epochs
        try:
            super().__call__(engine)
        except Exception as error:
            if max_epochs is not None and engine.state.epoch > max_epochs:  # restored, but past this run's end
                raise _past_last_epoch(path, engine.state.epoch, max_epochs) from error
            raise DataError(path, _checkpoint_problem(path, self.load_dict, error), self.expected) from error
        for name, rate in self.learning_rates.items():
            groups = self.load_dict[name].param_groups
            restored = sorted({group["lr"] for group in groups})
            if restored != [rate]:
                _logger.info("%s: learning rate %g, this run's, instead of the checkpoint's %s", name, rate,
                             " / ".join(f"{value:g}" for value in restored))
            for group in groups:
                group["lr"] = rate
        if self.evaluator is not None:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            record = checkpoint.get(VALIDATION_BEST_KEY) if isinstance(checkpoint, Mapping) else None
            if isinstance(record, Mapping):
                self.evaluator.state.best_metric = float(record["best_metric"])
                self.evaluator.state.best_metric_epoch = int(record["best_metric_epoch"])


def _past_last_epoch(path: Path, epoch: int, max_epochs: int) -> DataError:
    return DataError(path, f"was saved at epoch {epoch}, after this run's last epoch ({max_epochs})",
                     f"--epochs greater than {epoch}, to train on from it")


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


def scenario_record(inputs: Sequence[str], target: str) -> dict[str, Any]:
    """What a training checkpoint records of its run's scenario: the canonical names (``t1ce`` and ``T1Gd`` are one
    contrast), inputs in order (the generator's channels)."""

    def name(contrast: str) -> str:
        try:
            return canonical_contrast(str(contrast))
        except DataError:  # the config's own checks name an unknown contrast
            return str(contrast)

    return {"inputs": [name(c) for c in inputs], "target": name(target)}


class BestModelDigest:
    """Saved in a training checkpoint (``state_dict`` only): the best generator's file name and SHA-256 as the
    checkpoint is written, which comes after that epoch's ``model.pt`` (:func:`keep_unrecorded_best_model` reads it).

    Args:
        best_model_saver: the validation's :class:`AtomicCheckpointSaver` of the best generator.
    """

    def __init__(self, best_model_saver: AtomicCheckpointSaver) -> None:
        ranking = best_model_saver.key_metric_ranking
        if ranking is None:
            raise ValueError("best_model_saver: expected an AtomicCheckpointSaver with save_key_metric=True")
        handler = ranking.save_handler
        self.path = Path(handler.dirname) / handler.filename

    def state_dict(self) -> dict[str, str]:
        return {"file": self.path.name, "sha256": file_sha256(self.path) or ""}  # "" without a model.pt yet


class ValidationBest:
    """Saved in a training checkpoint (``state_dict`` only): the validation's best key metric and its epoch, which
    MONAI's evaluator keeps in its state, outside Ignite's state dict. :class:`ReportingCheckpointLoader` with
    ``evaluator`` restores them: a resumed run's first validation was logged as "Got new best metric" (and "best
    value ... at epoch" at the end) even when worse than the run's best, while ``model.pt`` rightly stayed.

    Args:
        evaluator: the validation's ``monai.engines.SupervisedEvaluator``.
    """

    def __init__(self, evaluator: Engine) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict[str, float | int]:
        state = self.evaluator.state
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch)}


def keep_unrecorded_best_model(resume_path: str | Path, ckpt_dir: str | Path) -> Path | None:
    """``train.json``'s step after the resume checks: keeps a copy of a best generator written after the checkpoint
    the run resumes from. Each epoch writes ``model.pt`` (when its validation is the best yet) before its training
    checkpoint; a run stopped between the two (killed, a full disk) left a better ``model.pt`` than the checkpoint's
    ranking knows, and the resumed run replaced it with the first generator beating that ranking, a worse one. The
    copy, ``model_after_<checkpoint name>.pt`` beside it, says which checkpoint it came after (warned about); None
    when ``model.pt`` is the one the checkpoint recorded (:class:`BestModelDigest`), or there is nothing to compare.
    """
    if not resume_path:
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


#: :func:`load_weights`'s default ``expected``: what a bundle's ``inference.json`` loads.
_BUNDLE_WEIGHTS = "the weights this bundle's train.json writes (models/model.pt), of a run with the same network_def"


def load_weights(
    network: torch.nn.Module,
    path: str | Path,
    map_location: str | torch.device | None = None,
    expected: str = _BUNDLE_WEIGHTS,
) -> torch.nn.Module:
    """``network`` with the state dict of ``path`` loaded (``torch.load(weights_only=True)``, strict), e.g.
    ``inference.json``'s ``models/model.pt``. The one place this package reads a network's weights from a file: the
    bundles' configs, :func:`agi_monai.bundle.experiment.load_generator`, the CLI, the Deploy synthesizer and
    :func:`agi_monai.evaluation.downstream.load_synthesizer` all come here.

    Args:
        network: the network to fill (built by the caller, e.g. a bundle config's ``network_def``).
        path: the state dict file.
        map_location: as for ``torch.load``.
        expected: what ``path`` should be, for the messages: which bundle or setting writes compatible weights.

    Raises:
        MissingFileError: ``path`` does not exist (a ``FileNotFoundError`` and a :class:`DataError`).
        DataError: ``path`` is a folder, cannot be read by ``torch.load`` (truncated, not a PyTorch file), holds
            something other than one network's state dict (e.g. a training checkpoint), or the state dict of another
            network (class, widths, number of inputs: missing and unexpected tensors, and those of another shape with
            both shapes, are counted and one of each named). Every message names ``path`` and ends with ``expected``;
            ``network`` is not modified by a file that does not fit it.
    """
    path = Path(path)
    _require_file(path, expected)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises OSError, RuntimeError, UnpicklingError... for a damaged file
        raise DataError(path, _unreadable(error), expected) from error
    problem = _not_a_state_dict(state) or _network_mismatch(state, network)
    if problem:  # found before load_state_dict, which would copy the fitting tensors before raising
        raise DataError(path, problem, expected)
    try:
        network.load_state_dict(state)
    except Exception as error:  # what the checks above cannot see, e.g. a module's own load hook refusing a value
        problem = f"cannot be loaded into {type(network).__name__} ({_first_line(error)})"
        raise DataError(path, problem, expected) from error
    return network


def expected_bundle_weights(bundle: str, setting: str, overrides: Mapping[str, Any] | None = None) -> str:
    """:func:`load_weights`' ``expected`` for a bundle's network: the weights its ``train.json`` writes, from a run
    with the ``network*`` overrides of ``overrides``, which the caller takes by ``setting`` (e.g. ``"--override"``),
    so that the message says what to change when weights of other widths are refused."""
    given = [f"{key}={json.dumps(value)}" for key, value in (overrides or {}).items() if key.startswith("network")]
    return (
        f"the weights bundle {bundle}'s train.json writes (models/model.pt) in a run with the network_def overrides "
        f"given here ({setting}: {', '.join(given) or 'none'})"
    )


def _not_a_state_dict(state: Any) -> str:
    """Why ``state`` (a file's content) is not one network's state dict; "" when it is."""
    if not isinstance(state, Mapping):
        return f"holds a {type(state).__name__}, not a state dict"
    if any(isinstance(value, Mapping) for value in state.values()):  # e.g. a training checkpoint (networks, optimizers)
        return f"holds a checkpoint of {', '.join(map(str, state))}, not one network's state dict"
    return ""


def _network_mismatch(saved: Mapping[str, Any], network: torch.nn.Module) -> str:
    """How the state dict ``saved`` does not fit ``network``: the tensors of other shapes and those only one of them
    has; "" when it fits."""
    wanted = network.state_dict()
    shapes = [
        f"{key} {tuple(saved[key].shape)} in the file, {tuple(tensor.shape)} here"
        for key, tensor in wanted.items()
        if key in saved and isinstance(saved[key], torch.Tensor) and saved[key].shape != tensor.shape
    ]
    missing = [key for key in wanted if key not in saved]
    unexpected = [key for key in saved if key not in wanted]
    parts = [
        f"{len(found)} {what} (e.g. {found[0]})"
        for found, what in ((shapes, "tensor(s) of another shape"), (missing, "missing"), (unexpected, "unexpected"))
        if found
    ]
    return f"does not fit {type(network).__name__} of this config: {', '.join(parts)}" if parts else ""


def _checkpoint_problem(path: Path, load_dict: Mapping[str, Any], error: Exception) -> str:
    """What is wrong with ``path`` for ``load_dict``, found by reading it again (only after a failed load)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as read_error:
        return _unreadable(read_error)
    if not isinstance(checkpoint, Mapping):
        return f"holds a {type(checkpoint).__name__}, not a dict of state dicts"
    names = list(load_dict)
    one_object = len(names) == 1 and names[0] not in checkpoint
    if one_object:  # MONAI reads such a file as that one object's state
        checkpoint = {names[0]: checkpoint}
    absent = [name for name in names if name not in checkpoint]
    if absent:
        held = list(checkpoint)
        if all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            found = f"one network's state dict ({len(held)} tensors, e.g. {held[0] if held else 'none'})"
        else:
            found = ", ".join(map(str, held)) or "nothing"
        return f"holds {found}, not {', '.join(absent)}"
    for name, target in load_dict.items():
        if isinstance(target, torch.nn.Module) and isinstance(checkpoint[name], Mapping):
            mismatch = _network_mismatch(checkpoint[name], target)
            if mismatch:
                return mismatch if one_object else f"its {name!r} {mismatch}"
    return f"cannot be restored ({_first_line(error)})"


def _unreadable(error: BaseException) -> str:
    """The problem of a file ``torch.load(weights_only=True)`` failed on with ``error``."""
    # torch's weights-only refusal is a paragraph of advice with the reason after this marker
    reason = str(error).partition("WeightsUnpickler error:")[2].strip()
    if reason:
        return (
            "cannot be read by torch.load(weights_only=True): it holds more than tensors, e.g. a whole network saved "
            f"instead of its state_dict() ({reason.splitlines()[0].split('. ')[0]})"
        )
    return f"cannot be read by torch.load: truncated, or not a PyTorch file ({_first_line(error)})"


def _first_line(error: BaseException) -> str:
    """``<type>: <first sentence>`` of ``error`` (torch's read errors go on with advice for a paragraph)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0].split('. ')[0] if lines else ''}"


def _on_first_iteration(engine: Engine, action: Callable[[], Any]) -> None:
    """Runs ``action`` when ``engine`` completes its first iteration of this run (a resumed run starts at the saved
    one, so a fixed ``Events.ITERATION_COMPLETED(once=1)`` would not do); handlers of one event run in the order they
    were added."""
    done = False

    def first(_: Engine) -> None:
        nonlocal done
        if not done:
            done = True
            action()

    engine.add_event_handler(Events.ITERATION_COMPLETED, first)


def _adopt_earlier_files(checkpoint: Checkpoint, folder: Path) -> None:
    """Registers the files of ``checkpoint``'s name pattern already in ``folder`` as saved with priority -inf."""
    pattern = _interval_file_pattern(checkpoint)
    saved = {filename for _, filename in checkpoint.state_dict()["_saved"]}
    earlier = sorted(p.name for p in folder.glob("*.pt") if pattern.fullmatch(p.name) and p.name not in saved)
    if earlier:
        _logger.info("%s: earlier checkpoints %s will be superseded by this run's", folder, earlier)
        state = checkpoint.state_dict()
        state["_saved"] = [(-math.inf, name) for name in earlier] + list(state["_saved"])
        checkpoint.load_state_dict(state)


def _interval_file_pattern(checkpoint: Checkpoint) -> re.Pattern[str]:
    """``<prefix>_<name>_<score_name>=<number>.pt``, Ignite's file name for a scored checkpoint."""
    prefix = f"{re.escape(checkpoint.filename_prefix)}_" if checkpoint.filename_prefix else ""
    name = next(iter(checkpoint.to_save)) if len(checkpoint.to_save) == 1 else "checkpoint"
    return re.compile(rf"{prefix}{re.escape(name)}_{re.escape(checkpoint.score_name)}=-?[0-9.]+{re.escape(checkpoint.ext)}")


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
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
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
    export commands of the same network; null for a run started from Python, e.g. by MONAI Label), ``settings``, each network's class and parameter count, and the versions of
    agi_monai, torch and MONAI. A resumed run adds its own entry (``resume_from``). Under ``torchrun`` only rank 0.

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
