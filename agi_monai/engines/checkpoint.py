"""MONAI's CheckpointSaver with atomic writes: a checkpoint file is either the old one or the new one."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver

__all__ = ["AtomicCheckpointSaver", "find_resume_checkpoint"]

_logger = logging.getLogger(__name__)

#: ``resume_ckpt`` value meaning "the newest training checkpoint in ``ckpt_dir``, if any".
LATEST = "latest"


class _AtomicDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` in atomic mode (written to a temporary file in the same folder, then
    ``os.replace``-d onto the name, then made group/other readable) with MONAI's optional fixed file name.
    MONAI turns atomic mode off because the temporary file is created ``0600``; Ignite >= 0.5 restores read
    permission itself.

    Ignite's ``Checkpoint`` removes the file a save supersedes (the oldest of ``n_saved``, or the fixed name)
    *before* writing the new one; removals are deferred here until the new file is in place, so a valid
    checkpoint is on disk at every moment.
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self.filename = filename
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename if self.filename is not None else filename
        super().__call__(checkpoint, name, metadata)
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
    is deleted only after that. Use it for the best model (``models/model.pt``) and the full training checkpoint
    (:func:`agi_monai.engines.training_checkpoint_dict`).

    Interval checkpoints already in ``save_dir`` when the saver is attached (an earlier or interrupted run's
    ``<file_prefix>_checkpoint_epoch=<n>.pt``) count as saved, with the lowest priority: a resumed run's first
    saves supersede them within ``n_saved``, where Ignite alone would keep them for ever.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        # CheckpointSaver keeps up to three ignite Checkpoints (final, key metric, interval), each with its
        # own DiskSaver; replacing the savers keeps all of MONAI's scheduling and naming
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed_name = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, filename=fixed_name)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self._interval_checkpoint is not None:
            _adopt_earlier_files(self._interval_checkpoint, Path(self.save_dir))

    @property
    def key_metric_ranking(self) -> Checkpoint | None:
        """The Ignite ``Checkpoint`` that decides whether a validation beats the best so far (``state_dict`` /
        ``load_state_dict``): :func:`agi_monai.engines.training_checkpoint_dict` saves it, so that a resumed run
        replaces ``models/model.pt`` only with a better generator."""
        return self._key_metric_checkpoint


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


def find_resume_checkpoint(resume_ckpt: str | Path, ckpt_dir: str | Path, file_prefix: str = "training") -> str:
    """The checkpoint a training config resumes from (``""``: none).

    Args:
        resume_ckpt: ``""`` to start afresh; a checkpoint file (an error when it is missing); or ``"latest"``,
            the training checkpoint of ``ckpt_dir`` with the highest epoch (``<file_prefix>_checkpoint_epoch=<n>.pt``,
            :class:`AtomicCheckpointSaver`'s names), or ``""`` with a log line when there is none yet, so that
            ``--resume_ckpt latest`` both starts and continues a run.
        ckpt_dir: the bundle's ``models`` folder.
        file_prefix: the training checkpoints' prefix.
    """
    if not resume_ckpt:
        return ""
    if str(resume_ckpt) != LATEST:
        if not Path(resume_ckpt).is_file():
            raise FileNotFoundError(
                f"resume_ckpt: {resume_ckpt} does not exist; expected a training checkpoint "
                f"({file_prefix}_checkpoint_epoch=<n>.pt), 'latest', or '' to start afresh"
            )
        return str(resume_ckpt)
    found = re.compile(rf"{re.escape(file_prefix)}_checkpoint_epoch=([0-9]+)\.pt")
    candidates = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("*.pt") if (m := found.fullmatch(p.name))]
    if not candidates:
        _logger.info("resume_ckpt=latest: no training checkpoint in %s yet, starting afresh", ckpt_dir)
        return ""
    epoch, path = max(candidates)
    _logger.info("resume_ckpt=latest: resuming from %s (epoch %d)", path, epoch)
    return str(path)
