"""MONAI's CheckpointSaver with atomic writes (a checkpoint file is either the old one or the new one), its
CheckpointLoader with failures that name the file and say what does not match, what a training checkpoint records
besides the networks (scenario, best model's digest, the validation's and the trainer's best key metric), and
:func:`load_weights`, the reader of a network's weights file (the same failures). What a run does around them (its
folder, resume checks, set-aside files, run record) is :mod:`agi_monai.engines.training_run`."""

from __future__ import annotations

import json
import logging
import math
import re
import reprlib
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from agi_monai.data.contrasts import canonical_contrast
from agi_monai.data.errors import DataError, MissingFileError, error_line
from agi_monai.data.files import atomic_output, file_sha256, free_space, remove_stale_temporaries

__all__ = [
    "AtomicCheckpointSaver",
    "BestKeyMetric",
    "BestModelDigest",
    "ReportingCheckpointLoader",
    "expected_bundle_weights",
    "load_weights",
    "scenario_record",
]

_logger = logging.getLogger(__name__)


#: The training checkpoint's entry recording the run's inputs and target (:func:`training_checkpoint_dict`).
SCENARIO_KEY = "scenario"

#: The training checkpoint's entry recording the best generator's file as the checkpoint was written.
BEST_MODEL_DIGEST_KEY = "best_model_digest"

#: The training checkpoint's entry recording the validation's best key metric and its epoch (:class:`BestKeyMetric`).
VALIDATION_BEST_KEY = "validation_best"

#: The training checkpoint's entry recording the trainer's best key metric and its epoch (:class:`BestKeyMetric`),
#: for a trainer with a ``key_train_metric`` (the segmentation bundle's ``train_mean_dice``).
TRAINING_BEST_KEY = "training_best"


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
            ``validation_best`` entry (:class:`BestKeyMetric`). The engine the loader is attached to (the trainer)
            has its own restored from ``training_best``. A checkpoint without the entry (saved before it was
            recorded) still resumes, with a logged line: that engine's best starts afresh, as before, so that its
            first key metric is logged as a new best; only the log says so (``models/model.pt`` is replaced by the
            ranking of ``best_model_ranking``), which is no reason to refuse a run's checkpoints.

    Raises:
        MissingFileError: ``load_path`` does not exist (a ``FileNotFoundError``).
        DataError: it cannot be read or restored into ``load_dict``, or a best key metric entry is not one.
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
        self._restore_best_key_metrics(path, engine)

    def _restore_best_key_metrics(self, path: Path, trainer: Engine) -> None:
        """Restores the trainer's and the evaluator's best key metric from the checkpoint's :class:`BestKeyMetric`
        entries (MONAI keeps them outside Ignite's state dict, which ``super().__call__`` restored)."""
        workflows = [
            (key, workflow) for key, workflow in ((TRAINING_BEST_KEY, trainer), (VALIDATION_BEST_KEY, self.evaluator))
            if workflow is not None and getattr(workflow.state, "key_metric_name", None) is not None
        ]
        if not workflows:  # no best to restore (a trainer without a key metric, no evaluator): no second read
            return
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for key, workflow in workflows:
            record = checkpoint.get(key) if isinstance(checkpoint, Mapping) else None
            if record is None:
                _logger.info("%s: no %s entry (saved before it was recorded): the best %s starts afresh, so that its "
                             "first value is logged as a new best", path, key, workflow.state.key_metric_name)
                continue
            try:
                BestKeyMetric(workflow).load_state_dict(record)
            except ValueError as error:
                raise DataError(path, f"its {key!r} entry {error}", self.expected) from error


def _past_last_epoch(path: Path, epoch: int, max_epochs: int) -> DataError:
    return DataError(path, f"was saved at epoch {epoch}, after this run's last epoch ({max_epochs})",
                     f"--epochs greater than {epoch}, to train on from it")


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


class BestKeyMetric:
    """Saved in a training checkpoint: a MONAI workflow's best key metric and its epoch, which MONAI keeps in the
    engine's state, outside Ignite's state dict: the validation's evaluator's as ``validation_best``, the trainer's
    (with a ``key_train_metric``) as ``training_best``. :class:`ReportingCheckpointLoader` restores both (by
    :meth:`load_state_dict`): a resumed run's first epoch was logged as "Got new best metric" (and "best value ... at
    epoch" at the end) even when worse than the run's best, while ``model.pt`` rightly stayed.

    Args:
        engine: a ``monai.engines.Workflow``: a ``SupervisedEvaluator``, a ``SupervisedTrainer``, ...
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, float | int]:
        state = self.engine.state
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch)}

    def load_state_dict(self, record: Any) -> None:
        """Sets the engine's best from ``record`` (a :meth:`state_dict`).

        Raises:
            ValueError: ``record`` is not a :meth:`state_dict` (says what it holds); the engine is left as it was.
        """
        metric = record.get("best_metric") if isinstance(record, Mapping) else None
        epoch = record.get("best_metric_epoch") if isinstance(record, Mapping) else None
        # a NaN best is a real state (a first epoch's NaN metric becomes the best): only the types are checked
        if not (_is_number(metric) and _is_number(epoch) and float(epoch).is_integer()):
            raise ValueError(f"is {reprlib.repr(record)}, not {{'best_metric': <number>, "
                             "'best_metric_epoch': <whole number>}")
        self.engine.state.best_metric = float(metric)
        self.engine.state.best_metric_epoch = int(epoch)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: :func:`load_weights`'s default ``expected``: what a bundle's ``inference.json`` loads.
_BUNDLE_WEIGHTS = "the weights this bundle's train.json writes (models/model.pt), of a run with the same network_def"


def load_weights(
    network: torch.nn.Module,
    path: str | Path,
    map_location: str | torch.device | None = None,
    expected: str = _BUNDLE_WEIGHTS,
) -> torch.nn.Module:
    """``network`` with the state dict of ``path`` loaded (``torch.load(weights_only=True)``, strict), e.g.
    ``models/model.pt`` of ``inference.json`` and ``evaluate.json`` (an ``initialize`` step: a file that does not fit
    is refused before any case is read). The one place this package reads a network's weights from a file: the
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
    return error_line(error, first_line=True).split(". ")[0]


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


