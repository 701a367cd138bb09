"""Adapters between engine outputs/batches and MONAI handlers (``output_transform``, ``batch_transform``), the
stop of a training run whose weights are no longer finite, and the line a training run ends with, finished or
interrupted."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers import ValidationHandler
from torch import nn

from agi_monai.data import stopping_cleanly_on_sigterm
from agi_monai.data.errors import error_line
from agi_monai.engines import latest_training_checkpoint, release_checkpoint_folder

__all__ = [
    "CosineLearningRate",
    "EvaluatorProgressBar",
    "NonFiniteTrainingError",
    "StopOnNonFiniteTraining",
    "TrainingSummary",
    "log_iterations",
    "loss_terms",
    "rank_handlers",
    "run_training",
]

_logger = logging.getLogger(__name__)


def loss_terms(output: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The scalar ``*_loss`` entries of a trainer's ``state.output`` (a dict, or its decollated list of
    dicts, where each item repeats the batch's losses), for ``StatsHandler``/``TensorBoardStatsHandler``:
    they would otherwise warn about every image tensor in the output."""
    first = output if isinstance(output, Mapping) else output[0]
    return {key: float(value) for key, value in first.items() if key.endswith("_loss")}


def log_iterations(interval: int) -> Callable[[Engine, int], bool]:
    """``StatsHandler(iteration_log=...)``'s event filter: the losses of every ``interval``-th iteration and of each
    epoch's first (where a resumed run shows where it starts). One line per iteration would be 120 000 lines for
    the recipe, written through the progress bar; the losses of every iteration are in TensorBoard.

    Args:
        interval: iterations between two loss lines (``--log_interval``); 1 logs every iteration.
    """
    if interval < 1:
        raise ValueError(f"--log_interval {interval}: expected a positive number of iterations")

    def logged(engine: Engine, iteration: int) -> bool:
        return iteration % interval == 0 or (iteration - 1) % engine.state.epoch_length == 0

    return logged


def rank_handlers(handlers: Sequence[Any]) -> list[Any]:
    """``multi_gpu_train.json``'s train handlers of this process: all of them on rank 0 (or without ``torchrun``); on
    the other ranks only those every rank must run alike: the validation (its evaluator is distributed) and the
    non-finite stop (one rank stopping alone would leave the others waiting in their next all-reduce). Logging,
    TensorBoard and checkpoints are rank 0's."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        return list(handlers)
    return [handler for handler in handlers if isinstance(handler, (ValidationHandler, StopOnNonFiniteTraining))]


class CosineLearningRate:
    """The segmentation bundle's learning-rate schedule (``train#handlers``): cosine annealing to 0 over ``epochs``,
    set on every parameter group at the start of each epoch from this run's settings alone. Epoch ``e`` (1-based)
    trains at ``learning_rate * (1 + cos(pi * (e - 1) / epochs)) / 2``: torch's ``CosineAnnealingLR(T_max=epochs,
    eta_min=0)`` stepped each epoch, the zoo's schedule, as a function of the epoch rather than a state.

    On a resume (``--resume_ckpt``), then, the schedule is the one this run's ``--learning_rate`` and ``--epochs``
    define, taken up at the epoch the checkpoint reached: with the settings unchanged, the rates of an
    uninterrupted run; with more ``--epochs``, the cosine stretched over the new total (the rate rises from where
    the old schedule had brought it to the new curve's value at that epoch, then falls to 0 at the new last
    epoch); with another ``--learning_rate``, the cosine scaled to it. Before, MONAI's ``CheckpointLoader``
    restored the optimizer's rate and the scheduler's ``T_max``: ``--learning_rate`` was ignored, the first epoch
    after a finished run trained at 0, and the extra epochs followed the old cosine round again.

    Args:
        optimizer: the segmenter's optimizer.
        learning_rate: the rate of the first epoch (``--learning_rate``).
        epochs: the epochs the cosine spans (``--epochs``).

    Raises:
        ValueError: ``learning_rate`` not a positive number or ``epochs`` not a positive whole number.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, learning_rate: float, epochs: int) -> None:
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not (
            math.isfinite(learning_rate) and learning_rate > 0
        ):
            raise ValueError(f"--learning_rate {learning_rate!r}: expected a positive number (the zoo's is 1e-4)")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"--epochs {epochs!r}: expected a positive whole number of epochs")
        self.optimizer = optimizer
        self.learning_rate = float(learning_rate)
        self.epochs = epochs
        self._started = False

    def rate(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (1-based)."""
        progress = min(max(epoch - 1, 0), self.epochs) / self.epochs
        return self.learning_rate * (1.0 + math.cos(math.pi * progress)) / 2.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch, rate = engine.state.epoch, self.rate(engine.state.epoch)
        held = sorted({group["lr"] for group in self.optimizer.param_groups})
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        if epoch > 1 and not self._started:  # the first epoch of a resumed run
            _logger.info(
                "resumed at epoch %d of %d: learning rate %g (the cosine from --learning_rate %g over --epochs %d; "
                "the checkpoint's optimizer held %s)", epoch, self.epochs, rate, self.learning_rate, self.epochs,
                " / ".join(f"{value:g}" for value in held),
            )
        self._started = True
        _logger.info("Epoch %d: learning rate %g", epoch, rate)


class EvaluatorProgressBar(ProgressBar):
    """Ignite's ``ProgressBar`` for an evaluator, labelled ``desc [done/total]``. MONAI attaches handlers with
    ``attach(engine)`` only, and ignite's bar then closes per epoch and labels itself with the engine's epoch
    count, which for a validator is the trainer's current epoch ("validation [7/7]" at epoch 7 of 100):
    this one closes at the end of the run and carries no epoch.

    Args:
        desc: what the bar counts, e.g. ``"validation"`` (batches) or ``"evaluating"`` (cases).
    """

    def __init__(self, desc: str) -> None:
        super().__init__(desc=desc)

    def attach(self, engine: Engine, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("closing_event_name", Events.COMPLETED)
        super().attach(engine, *args, **kwargs)


#: Attribute of a trainer run by :func:`run_training` holding the :class:`TrainingSummary` lines it prints at the end.
DEFERRED_SUMMARIES = "deferred_training_summaries"


class TrainingSummary:
    """Prints the one line a training run ends with: the iterations and epochs this run trained and its time,
    the best validation score so far and the file holding that generator, and the checkpoint a later run
    resumes from. (Ignite's "Engine run finished. Time taken" says none of it.) Under :func:`run_training` (the
    bundles' ``run``) the line is printed when ``trainer.run()`` has returned, after Ignite's line; otherwise at
    ``COMPLETED``.

    A train handler (``train#handlers``): attached to the trainer, it counts from the first epoch this run
    starts, after a resume has restored the trainer's state.

    Args:
        ckpt_dir: the bundle's checkpoint folder (``training_checkpoint_epoch=<n>.pt``).
        best_model_saver: the validation's :class:`agi_monai.engines.AtomicCheckpointSaver` of the best generator;
            its ranking is part of the training checkpoint, so the best score includes the runs this one resumed.
        metric_name: the validation's key metric, for the line.
    """

    def __init__(
        self, ckpt_dir: str | Path, best_model_saver: Any | None = None, metric_name: str = "val_psnr"
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.best_model_saver = best_model_saver
        self.metric_name = metric_name
        self._first: tuple[int, int, float] | None = None  # iteration, epoch and time when this run began

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.COMPLETED, self)

    def _epoch_started(self, engine: Engine) -> None:
        if self._first is None:  # (Ignite has counted the new epoch already, not yet its first iteration)
            self._first = (engine.state.iteration + 1, engine.state.epoch, time.perf_counter())

    def __call__(self, engine: Engine) -> None:
        state = engine.state
        iteration, epoch, started = self._first or (state.iteration + 1, state.epoch + 1, time.perf_counter())
        self._first = None
        minutes, seconds = divmod(time.perf_counter() - started, 60)
        if state.iteration < iteration:
            done = f"all {state.max_epochs} epochs were done (a larger --epochs trains on)"
            parts = [f"training done: nothing to train, {done}"]
        else:
            parts = [
                f"training done: {_span('iteration', iteration, state.iteration)} of "
                f"{state.max_epochs * state.epoch_length} ({_span('epoch', epoch, state.epoch)} of {state.max_epochs}) "
                f"in {int(minutes) // 60}:{int(minutes) % 60:02d}:{seconds:04.1f}"
            ]
        ranking = getattr(self.best_model_saver, "key_metric_ranking", None)
        saved = ranking.state_dict()["_saved"] if ranking is not None else []
        if saved:
            score, name = max(saved, key=lambda entry: entry[0])
            name = getattr(ranking.save_handler, "filename", None) or name  # MONAI saves the best under a fixed name
            parts.append(f"best {self.metric_name} {score:.4f}: {Path(self.best_model_saver.save_dir) / name}")
        elif self.best_model_saver is not None:
            parts.append("no validation yet, so no best model")
        latest = latest_training_checkpoint(self.ckpt_dir)
        if latest is not None:
            parts.append(f"--resume_ckpt latest continues from {latest}")
        deferred = getattr(engine, DEFERRED_SUMMARIES, None)
        if deferred is not None:  # run_training prints it once the run has returned
            deferred.append("; ".join(parts))
        else:
            print("; ".join(parts), flush=True)


class NonFiniteTrainingError(RuntimeError):
    """Raised by :class:`StopOnNonFiniteTraining`: the run cannot recover; the message says where it stopped and
    what ``--resume_ckpt latest`` continues from."""


#: What the errors of a step fed with NaN say: the rolled kernels' offsets check on CPU (csrc/group_roll.cpp and the
#: reference in agi_monai/ops/reference.py) and torch's binary cross-entropy on probabilities (MONAI's
#: ``PatchAdversarialLoss(criterion="bce")``, when a config names it instead of the default
#: ``BCEWithLogitsAdversarialLoss``, whose NaN logits give a NaN loss), whose input, a sigmoid's output, is out of
#: [0, 1] only when it is NaN.
_NON_FINITE_FAILURES = ("offsets must be finite", "all elements of input should be between 0 and 1")


class StopOnNonFiniteTraining:
    """Stops a training run with :class:`NonFiniteTrainingError` as soon as a network's weights are no longer finite
    (NaN or Inf), or its losses have not been finite for ``patience`` iterations in a row, before any later
    validation or checkpoint: the last training checkpoint, the one ``--resume_ckpt latest`` continues from, is then
    the last one with finite weights, and the run exits with an error instead of training on for hours and saving
    NaN weights over it.

    A single non-finite loss with finite weights is what mixed precision's gradient scaler expects (it skips that
    step and lowers the scale): it is logged and training goes on. The check costs nothing while the losses are
    finite (they are floats already); the weights are scanned when a loss is not finite and once per epoch, just
    before the epoch's validation and checkpoint (a step can make the weights non-finite from a finite loss, when
    its backward overflows).

    Ignite's ``TerminateOnNan`` is not used: it stops at the first non-finite loss, also one the gradient scaler
    recovers from, and ends the run as completed (exit status 0 and a "training done" line).

    A train handler (``train#handlers``), listed first, so that its epoch check runs before the validation and
    before the checkpoint saver (attached after the trainer is built).

    Args:
        networks: the networks whose weights are checked, by name (``{"generator": …, "discriminator": …}``).
        ckpt_dir: the bundle's checkpoint folder, to name the checkpoint a resume continues from.
        patience: consecutive iterations with a non-finite loss and finite weights after which the run stops.
        output_transform: the engine output's losses: a ``{name: value}`` dict (default :func:`loss_terms`), or a
            value or list of values, reported as ``loss`` (``monai.handlers.from_engine(["loss"], first=True)`` for
            MONAI's ``SupervisedTrainer``).
    """

    def __init__(
        self,
        networks: Mapping[str, nn.Module],
        ckpt_dir: str | Path,
        patience: int = 20,
        output_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        if int(patience) < 1:
            raise ValueError(f"patience {patience}: expected a positive number of iterations")
        self.networks = dict(networks)
        self.ckpt_dir = Path(ckpt_dir)
        self.patience = int(patience)
        self.output_transform = output_transform or loss_terms
        self._streak = 0  # consecutive iterations whose losses were not all finite

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._exception_raised)

    def _exception_raised(self, engine: Engine, error: BaseException) -> None:
        """A step that diverged can fail before any loss is seen: weights broken by the step before, or finite ones
        whose activations overflow (a too high learning rate), give NaN offsets, which the rolled kernels refuse on
        CPU, or NaN discriminator probabilities, which MONAI's BCE loss on probabilities refuses. Such a failure is
        reported as the divergence it is, with what to do; any other error is raised as it is. (Ignite hands an
        exception to these handlers instead of raising it; listed first, this one runs first.)"""
        if isinstance(error, NonFiniteTrainingError) or not isinstance(error, Exception):
            raise error
        try:
            broken: str | None = self._non_finite_weights()
        except RuntimeError:  # the weights cannot be read (a CUDA error is sticky): the error as it is, below
            broken = None
        if broken is None:
            raise error
        if broken:
            what = f"{broken}, and then"
        elif any(marker in str(error) for marker in _NON_FINITE_FAILURES):
            what = "a forward pass gave values that are not finite though the weights still are (they overflowed):"
        else:
            raise error
        raise NonFiniteTrainingError(
            f"training stopped at {_position(engine)}: {what} {error_line(error, first_line=True)}. "
            f"{self._after(engine)}"
        ) from None  # its type and first line are in the message; as a cause, the run's last line would name it instead

    def _iteration_completed(self, engine: Engine) -> None:
        losses = self._losses(engine.state.output)
        if all(math.isfinite(value) for value in losses.values()):
            self._streak = 0
            return
        self._streak += 1
        where = f"training stopped at {_position(engine)}"
        values = ", ".join(f"{name} {value:.4g}" for name, value in losses.items())
        broken = self._non_finite_weights()
        if broken:
            raise NonFiniteTrainingError(f"{where}: the losses are not finite ({values}) and {broken}. {self._after(engine)}")
        if self._streak >= self.patience:
            raise NonFiniteTrainingError(
                f"{where}: the losses have not been finite for {self._streak} iterations in a row ({values}), though the "
                f"weights still are. {self._after(engine)}"
            )
        _logger.warning(
            "iteration %d: the losses are not finite (%s) but the weights still are (%d of %d such iterations in a row "
            "before the run stops)",
            engine.state.iteration, values, self._streak, self.patience,
        )

    def _losses(self, output: Any) -> dict[str, float]:
        losses = self.output_transform(output)
        if isinstance(losses, Mapping):
            return {str(name): float(value) for name, value in losses.items()}
        values = list(losses) if isinstance(losses, Sequence) else [losses]
        return {"loss" if len(values) == 1 else f"loss[{index}]": float(v) for index, v in enumerate(values)}

    def _epoch_completed(self, engine: Engine) -> None:
        broken = self._non_finite_weights()
        if broken:
            raise NonFiniteTrainingError(f"training stopped at {_position(engine)}: {broken}. {self._after(engine)}")

    def _non_finite_weights(self) -> str:
        """Which network's weights are not finite, naming the first such tensor; empty when all are finite."""
        problems = []
        for network_name, network in self.networks.items():
            for name, tensor in [*network.named_parameters(), *network.named_buffers()]:
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    problems.append(f"{network_name} ('{name}' first)")
                    break
        return f"the weights of the {' and the '.join(problems)} are no longer finite" if problems else ""

    def _after(self, engine: Engine) -> str:
        latest = latest_training_checkpoint(self.ckpt_dir)
        resume = (
            f"--resume_ckpt latest continues from {latest}" if latest is not None
            else "no training checkpoint was written: a rerun starts afresh"
        )
        remedy = "A lower --learning_rate" + (", or mixed precision off (--amp False)," if getattr(engine, "amp", False) else "")
        return f"Nothing of epoch {engine.state.epoch} was validated or saved; {resume}. {remedy} usually avoids this"


def run_training(trainer: Engine, ckpt_dir: str | Path) -> None:
    """``trainer.run()`` (``train.json``'s ``run``), stopped cleanly by Ctrl-C or SIGTERM (what Slurm, ``timeout`` and
    ``docker stop`` send; :func:`agi_monai.data.stopping_cleanly_on_sigterm`): the checkpoint being written, if any,
    is not left half-written, and the run ends with one line saying where it stood and what ``--resume_ckpt latest``
    continues from (the iterations since that checkpoint are lost), then exits with status 130 (Ctrl-C) or 143
    (SIGTERM). Before, Ctrl-C ended in two tracebacks and no word on what was kept, and SIGTERM in nothing at all.

    Args:
        trainer: the bundle's trainer (``@train#trainer``), its handlers attached.
        ckpt_dir: the bundle's checkpoint folder (``training_checkpoint_epoch=<n>.pt``).
    """
    # A TrainingSummary's line waits for the run to return: Ignite logs "Engine run finished" after the COMPLETED
    # handlers, and the summary is to be the run's last line.
    deferred: list[str] = []
    setattr(trainer, DEFERRED_SUMMARIES, deferred)
    started = time.time()
    try:
        with stopping_cleanly_on_sigterm():
            trainer.run()
        for line in deferred:
            print(line, flush=True)
    except (KeyboardInterrupt, SystemExit) as stop:
        latest = latest_training_checkpoint(ckpt_dir)
        resume = (
            f"--resume_ckpt latest continues from {latest} (the iterations after it are lost)" if latest is not None
            else "no training checkpoint yet: a rerun starts afresh" + _set_aside_since(Path(ckpt_dir), started)
        )
        print(f"training interrupted at {_position(trainer)}; {resume}", flush=True)
        raise SystemExit(130 if isinstance(stop, KeyboardInterrupt) else stop.code) from None
    finally:
        release_checkpoint_folder(ckpt_dir)  # held since the config's initialize (hold_checkpoint_folder)


def _set_aside_since(ckpt_dir: Path, started: float) -> str:
    """What a run stopped before its first checkpoint says of the earlier run it set aside (the one to resume, if
    starting afresh was a mistake)."""
    folders = [p for p in ckpt_dir.glob("earlier_run_*") if p.is_dir() and p.stat().st_mtime >= started - 1]
    checkpoint = latest_training_checkpoint(max(folders, key=lambda p: p.stat().st_mtime)) if folders else None
    if checkpoint is None:
        return ""
    # what this run wrote there (a best model.pt of its first validation) would be replaced: a resume is refused
    written = sorted(p.name for p in ckpt_dir.iterdir() if p.is_file() and p.suffix in (".pt", ".ts", ".json"))
    first = f"move {', '.join(written)} out of {ckpt_dir}, then " if written else ""
    return f" (it set the earlier run aside: {first}--resume_ckpt {checkpoint} continues that one)"


def _position(engine: Engine) -> str:
    """``iteration 5 of 9 (epoch 2 of 3)``: where a run stands."""
    state = engine.state
    total = f" of {state.max_epochs * state.epoch_length}" if state.max_epochs and state.epoch_length else ""
    return f"iteration {state.iteration}{total} (epoch {state.epoch} of {state.max_epochs})"


def _span(unit: str, first: int, last: int) -> str:
    """``iteration 3`` or ``iterations 3-6``."""
    return f"{unit} {first}" if first == last else f"{unit}s {first}-{last}"
