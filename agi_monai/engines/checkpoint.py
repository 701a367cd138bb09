"""MONAI's CheckpointSaver with atomic writes: a checkpoint file is either the old one or the new one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

__all__ = ["AtomicCheckpointSaver"]


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
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        # CheckpointSaver keeps up to three ignite Checkpoints (final, key metric, interval), each with its
        # own DiskSaver; replacing the savers keeps all of MONAI's scheduling and naming
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed_name = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, filename=fixed_name)
