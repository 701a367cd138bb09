"""Folder-to-folder synthesis: every case of a dataset -> slice-wise 2D prediction -> the reference input's
original grid -> ``<case>_<target>.nii.gz``. A bad case is reported and the others go on.

MONAI's ``SupervisedEvaluator`` would stop the whole run at the first exception (Ignite re-raises), so the
loop over cases is written here; each step inside it is MONAI's (the inferer, ``Invertd``, ``SaveImaged``
with :class:`agi_monai.data.AtomicNibabelWriter`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from monai.data import Dataset, MetaTensor
from monai.inferers import Inferer, SliceInferer
from tqdm import tqdm

from agi_monai.data import (
    CONTRASTS,
    LABELS,
    DataError,
    Failure,
    case_id_of_output,
    failure_reason,
    nifti_is_complete,
    refuse_foreign_outputs,
    spacing_mismatch,
    stopping_cleanly_on_sigterm,
    synthesis_output_paths,
    write_json,
)
from agi_monai.engines.inference import infer_case

__all__ = ["FolderSynthesis", "SynthesisSummary"]

_logger = logging.getLogger(__name__)

# What the progress bar and the summary say: (while running, done).
_TASK_WORDS = {"synthesis": ("synthesizing", "synthesized"), "segmentation": ("segmenting", "segmented")}


@dataclass
class SynthesisSummary:
    """What a :class:`FolderSynthesis` run wrote, found already written (kept) and could not do."""

    output_dir: Path
    written: list[Path] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    task: str = "synthesis"
    present: list[Path] = field(default_factory=list)
    target: str = ""

    def case_id_of(self, output: Path) -> str:
        """The case ID of one of its outputs ``<case>_<target>.nii.gz`` (written or present)."""
        return case_id_of_output(output, self.target, self.output_dir)

    def write_report(self, path: str | Path, dicom_series: Callable[[str], Path] | None = None,
                     **description: Any) -> Path:
        """Writes (atomically) the run's outcome as JSON for a pipeline to read, one entry per case: ``{"case_id",
        "status": "written" | "present" | "failed", "output"`` (and ``"dicom"``, the case's series folder, when
        ``dicom_series`` names it) ``| "reason"}``, after ``description`` (e.g. the bundle) and the counts."""
        done = [(path, status) for status, paths in (("written", self.written), ("present", self.present)) for path in paths]
        entries = [{"case_id": self.case_id_of(path), "status": status, "output": str(path),
                    **({"dicom": str(dicom_series(self.case_id_of(path)))} if dicom_series else {})}
                   for path, status in done]
        entries += [{"case_id": failure.case_id, "status": "failed", "reason": failure.reason} for failure in self.failures]
        report = {
            "task": self.task, "target": self.target, "output_dir": str(self.output_dir), **description,
            "finished": datetime.now().astimezone().isoformat(timespec="seconds"),
            "counts": {"cases": self.cases, "written": len(self.written), "present": len(self.present),
                       "failed": len(self.failures)},
            "cases": sorted(entries, key=lambda entry: entry["case_id"]),
        }
        return write_json(report, path)

    @property
    def cases(self) -> int:
        """Every case the run was given: written, already present, failed (or left out before it)."""
        return len(self.written) + len(self.present) + len(self.failures)

    def counts(self) -> str:
        """``"2 already present (skipped), 1 failed"``: the cases not written, for the progress bar."""
        present = f"{len(self.present)} already present (skipped), " if self.present else ""
        return f"{present}{len(self.failures)} failed"

    def __str__(self) -> str:
        done = _TASK_WORDS[self.task][1]
        line = f"{done} {len(self.written)} of {self.cases} cases into {self.output_dir}, {self.counts()}"
        return "\n".join([line, *(f"  - {failure}" for failure in self.failures)])


class FolderSynthesis:
    """Synthesize the target contrast for every case of ``dataset``: the ``evaluator`` of ``inference.json``
    (the id MONAI's bundle properties give the inference engine), called by its ``run``.

    For each case: ``dataset[i]`` (loading, registration, normalization, orientation, pad/crop), ``inferer``
    (e.g. ``SliceInferer(spatial_dim=2)``) on ``"image"`` -> ``"pred"`` (1, H, W, D), then
    ``postprocessing`` (clip, :func:`agi_monai.data.restore_geometry_transforms` writing
    ``<case_id>_<target>.nii.gz`` atomically). A case that fails anywhere is logged with its reason and
    listed in the summary; the rest continue. Nothing is written for a failed case, nor over one of its input files,
    nor (for a synthesis) over a file no synthesis wrote (:func:`agi_monai.data.is_synthetic_nifti`): such a case
    fails. With ``overwrite=False`` a case
    whose output exists is not read: it is counted as already present (a rerun over a folder does the rest only).
    The progress bar counts the cases of ``dataset`` and shows the failed and present ones; the summary, printed at
    the end, every case (``skipped`` ones among the failed).

    Args:
        dataset: volume dataset whose ``data`` items carry ``"case_id"`` (:func:`agi_monai.data.build_volume_dataset`).
        network: the generator (its weights already loaded).
        inferer: MONAI inferer mapping (1, C, H, W, D) to (1, 1, H, W, D).
        postprocessing: applied to the item holding ``"pred"``; it writes the output.
        output_dir: where the outputs go (for the summary and the expected file names).
        target: the synthesized contrast, the file name's suffix.
        device: where the network runs.
        skipped: cases already left out (e.g. by discovery), reported with the rest.
        amp: autocast (CUDA only).
        overwrite: replace an existing output (MONAI's ``SaveImage`` default); False keeps it and skips the case.
        progress: show a progress bar over cases.
        task: "synthesis" or "segmentation" (the segmentation bundle's label maps): the words of the progress
            bar and the summary.
        exit_on_failure: after the summary, exit the process with status 1 when a case failed or there was no case
            (``inference.json`` sets it, so that ``python -m monai.bundle run`` tells a scheduler or a pipeline;
            ``agi-monai synthesize``, which goes on to write DICOM, turns it off and sets its own exit status).
        training_spacing: the spacing (mm) of the bundle's training data: H, W for a 2D bundle (in plane only, it
            works slice by slice), H, W, D for a 3D one (every axis); a case whose reference grid is more than 25 %
            off on a compared axis gets a warning (:func:`agi_monai.data.spacing_mismatch`), and is synthesized.
        report: a JSON file to write the outcome of every case into, for a pipeline
            (:meth:`SynthesisSummary.write_report`; ``inference.json``'s ``report_path``); None: none.
    """

    def __init__(
        self,
        dataset: Dataset,
        network: torch.nn.Module,
        inferer: Inferer,
        postprocessing: Callable[[dict[str, Any]], Any],
        output_dir: str | Path,
        target: str,
        device: str | torch.device = "cpu",
        skipped: Sequence[Failure] = (),
        amp: bool = False,
        progress: bool = True,
        task: str = "synthesis",
        overwrite: bool = True,
        exit_on_failure: bool = False,
        training_spacing: Sequence[float] | None = None,
        report: str | Path | None = None,
    ) -> None:
        if task not in _TASK_WORDS:
            raise ValueError(f"FolderSynthesis: task must be one of {sorted(_TASK_WORDS)}, got {task!r}")
        self.dataset = dataset
        self.network = network
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.output_dir = Path(output_dir)
        self.target = target
        self.device = torch.device(device)
        self.skipped = list(skipped)
        self.amp = amp and self.device.type == "cuda"
        self.progress = progress
        self.task = task
        self.overwrite = overwrite
        self.exit_on_failure = exit_on_failure
        self.training_spacing = training_spacing
        self.report = report

    def output_path(self, case_id: str) -> Path:
        return synthesis_output_paths(case_id, self.target, self.output_dir)[0]

    def __call__(self) -> SynthesisSummary:
        summary = SynthesisSummary(self.output_dir, failures=list(self.skipped), task=self.task, target=self.target)
        cases = self.dataset.data
        label = _TASK_WORDS[self.task][0] + (f" {self.target}" if self.task == "synthesis" else "")
        # no bar over nothing (tqdm shows "0case"): when every case was left out before, the summary says why. The
        # cases left out before count as done, so that the bar's total and its "failed" count the same cases as the
        # summary line
        with stopping_cleanly_on_sigterm(), tqdm(
            total=len(self.skipped) + len(cases), initial=len(self.skipped), desc=label, unit="case",
            disable=not self.progress or not cases,
        ) as bar:
            for index in range(len(cases)):
                self._run_case(index, summary)
                bar.set_postfix_str(summary.counts(), refresh=False)
                bar.update()
        print(summary, flush=True)
        if self.report is not None:
            summary.write_report(self.report)
        if self.exit_on_failure and (summary.failures or not summary.cases):
            # SystemExit passes MONAI's config evaluation (it catches Exception) and ends the run without a traceback
            raise SystemExit(1)
        return summary

    def _run_case(self, index: int, summary: SynthesisSummary) -> None:
        """One case into ``summary``: written, already present, or failed with its reason."""
        case = self.dataset.data[index]
        case_id = str(case.get("case_id", index))
        output = self.output_path(case_id)
        refusal = self._output_refusal(case, output)
        if refusal:
            failure = Failure(case_id, refusal)
            _logger.error("%s", failure)
            summary.failures.append(failure)
            return
        if not self.overwrite and output.exists():
            if nifti_is_complete(output):
                summary.present.append(output)
                return
            # a synthesis of ours (_output_refusal checked its mark) cut short from outside: written again
            _logger.warning("%s: %s is cut short (fewer bytes than its header announces); synthesized again",
                            case_id, output)
        try:
            self._synthesize(index)
        except Exception as error:  # one bad case must not stop the others; the reason is reported
            failure = Failure(case_id, failure_reason(error))
            _logger.error("%s", failure)
            summary.failures.append(failure)
            return
        summary.written.append(output)

    def _output_refusal(self, case: dict[str, Any], output: Path) -> str:
        """Why ``output`` must not be written (nor counted as present), or "": it is one of the case's input files,
        or, for a synthesis, a file there already that no synthesis wrote (an acquired scan named like the output,
        e.g. a real FLAIR beside the T1 and T2 given one by one with ``--output_dir`` their folder)."""
        clash = next((key for key, value in case.items() if key in CONTRASTS + LABELS and isinstance(value, str)
                      and os.path.realpath(value) == os.path.realpath(output)), None)
        if clash is not None:
            return f"its output {output} would be its {clash} input file: expected another --output_dir (it is left as it was)"
        if self.task == "synthesis":
            try:
                refuse_foreign_outputs(output)
            except DataError as error:
                return str(error)
        return ""

    def _synthesize(self, index: int) -> None:
        item = self.dataset[index]
        mismatch = spacing_mismatch(item["image"], self.training_spacing)
        if mismatch:
            _logger.warning("%s: %s", item.get("case_id", index), mismatch)
        # a case takes minutes on a CPU at the paper's widths: a bar over its slices, under the one over cases
        slices = item["image"].shape[-1] if isinstance(self.inferer, SliceInferer) else 0
        with tqdm(total=slices, desc=str(item.get("case_id", index)), unit="slice", leave=False,
                  disable=not (self.progress and slices)) as bar:
            prediction = infer_case(self.network, self.inferer, item["image"], self.device, self.amp, bar.update)
        item["pred"] = MetaTensor(prediction)
        self.postprocessing(item)
