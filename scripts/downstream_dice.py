"""Segmentation downstream Dice of a synthesis scenario, one command: tumour core / whole tumour / enhancing tumour
Dice (3D and 2D) of a segmentation bundle with all real contrasts, with the scenario's target synthesized, zero-imputed
and mean-imputed, on the labelled cases of a folder or datalist split.

    python scripts/downstream_dice.py --dataset_dir /data/BraTS2023 \
        --synthesis_bundle bundles/brats_t1_t2_flair_to_t1gd --segmentation_bundle bundles/brats_segmentation \
        --output_dir outputs/downstream_t1gd

Both bundles need trained weights (``models/model.pt`` in each, or ``--segmentation_checkpoint`` /
``--synthesis_checkpoint``); none are shipped. ``--synthesized_dir`` reads synthesized files that the synthesis
bundle's ``inference.json`` already wrote (``<case_id>_<target>.nii.gz``) instead of running its generator.
It runs the segmentation bundle's ``train.json`` + ``evaluate.json`` (:class:`agi_monai.evaluation.downstream.
DownstreamEvaluator`) with the overrides below, then writes into ``output_dir``: ``downstream_per_case.csv``,
``downstream_summary.json`` (its ``description`` records the segmenter's checkpoint and network_def (as built:
class, parameters, widths), ``dataset_dir``, split, inputs, label convention, ``spatial_size``, ``sw_roi_size``,
``mean_value``, the synthesis bundle or ``--synthesized_dir``, the generator's checkpoint and ``--synthesis_overrides``
as typed),
``downstream_summary.md`` (printed) and ``downstream_dice.png``. Protocol:
``docs/downstream.md``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import monai.bundle

from agi_monai.bundle.registry import read_bundle
from agi_monai.cli import run_script
from agi_monai.evaluation.downstream import (
    CONDITIONS,
    DOWNSTREAM_JSON,
    DOWNSTREAM_MD,
    DOWNSTREAM_PNG,
    SEGMENTATION_CONTRASTS,
    downstream_bar_chart,
)

ROOT = Path(__file__).resolve().parent.parent


def synthesis_overrides_text(overrides: Mapping[str, Any] | None) -> str:
    """``--synthesis_overrides`` as the segmentation config receives them: JSON text, since MONAI's parser would build
    a nested ``"_target_"`` (a whole ``network_def``) into an object; each ``#`` written as the JSON escape
    ``\\u0023``, since the parser rewrites ``#`` to ``::`` in every string of a config, and the summary recorded
    ``network_def::channels`` for a typed ``network_def#channels``. The text decodes to the overrides as typed
    (:func:`agi_monai.evaluation.downstream.overrides_as_given`)."""
    return json.dumps(dict(overrides or {})).replace("#", "\\u0023")


def main(
    dataset_dir: str,
    synthesis_bundle: str = str(ROOT / "bundles" / "brats_t1_t2_flair_to_t1gd"),
    segmentation_bundle: str = str(ROOT / "bundles" / "brats_segmentation"),
    output_dir: str = str(ROOT / "outputs" / "downstream"),
    split: str = "test",
    conditions: Sequence[str] = CONDITIONS,
    label_convention: str = "brats2023",
    segmentation_checkpoint: str = "",
    synthesis_checkpoint: str = "",
    synthesized_dir: str = "",
    mean_value: float | None = None,
    segmentation_overrides: Mapping[str, Any] | None = None,
    synthesis_overrides: Mapping[str, Any] | None = None,
    plot: bool = True,
) -> None:
    """Run the downstream evaluation and write its table (and bar chart); exits with status 1 when a case failed
    (the failures are listed in the summary).

    Args:
        dataset_dir: labelled cases with T1Gd, T1, T2, FLAIR and a label map: a folder, a folder holding
            ``datalist.json``, or a JSON datalist (``scripts/prepare_brats.py``).
        synthesis_bundle: the scenario; its target is the contrast replaced in every condition but ``real``.
        segmentation_bundle: a bundle with the ``brats_segmentation`` layout (configs train.json, evaluate.json).
        output_dir: where the CSV, JSON, markdown and PNG go.
        split: the datalist split evaluated (a plain folder: all its cases).
        conditions: any of real, synthesized, zero_imputed, mean_imputed.
        label_convention: the label values of the data: brats2023 (ET 3), brats2018 (ET 4), brats2015 (3 non-enhancing).
        segmentation_checkpoint: the segmenter's weights; default ``<segmentation_bundle>/models/model.pt``.
        synthesis_checkpoint: the generator's weights; default ``<synthesis_bundle>/models/model.pt``.
        synthesized_dir: read ``<case_id>_<target>.nii.gz`` from here instead of running the generator.
        mean_value: the mean condition's value; default each case's mean of the real contrast in its brain mask.
        segmentation_overrides: further overrides of the segmentation configs (e.g. ``{"sw_roi_size": [...]}``).
        synthesis_overrides: overrides of the synthesis bundle's inference.json (e.g. its ``network_def``).
        plot: also write the bar chart.
    """
    synthesis = read_bundle(synthesis_bundle)
    segmentation = Path(segmentation_bundle)
    conditions = [str(c) for c in ([conditions] if isinstance(conditions, str) else conditions)]
    if synthesis.target not in SEGMENTATION_CONTRASTS:
        raise SystemExit(
            f"{synthesis.name} synthesizes {synthesis.target}; the segmenter reads {', '.join(SEGMENTATION_CONTRASTS)}"
        )
    checkpoint = Path(segmentation_checkpoint) if segmentation_checkpoint else segmentation / "models" / "model.pt"
    if not checkpoint.is_file():
        raise SystemExit(
            f"{checkpoint}: no segmentation weights (none are shipped). Train {segmentation} on labelled BraTS first "
            "(its docs/README.md), or pass --segmentation_checkpoint"
        )
    uses_generator = "synthesized" in conditions and not synthesized_dir
    overrides: dict[str, Any] = {
        "bundle_root": str(segmentation),
        "dataset_dir": dataset_dir,
        "output_dir": output_dir,
        "split": split,
        "conditions": conditions,
        "missing_contrast": synthesis.target,
        "label_convention": label_convention,
        "ckpt_path": str(checkpoint),
        "synthesis_bundle": str(synthesis.root) if uses_generator else "",
        "synthesis_checkpoint": synthesis_checkpoint,
        "synthesis_overrides": synthesis_overrides_text(synthesis_overrides),
        "synthesized_dir": synthesized_dir,
        "mean_value": mean_value,
        **dict(segmentation_overrides or {}),
    }
    configs = [str(segmentation / "configs" / "train.json"), str(segmentation / "configs" / "evaluate.json")]
    monai.bundle.run(
        run_id="run", init_id="initialize", config_file=configs,
        logging_file=str(segmentation / "configs" / "logging.conf"), **overrides,
    )
    output = Path(output_dir)
    summary = json.loads((output / DOWNSTREAM_JSON).read_text(encoding="utf-8"))
    print((output / DOWNSTREAM_MD).read_text(encoding="utf-8"), flush=True)
    if plot:
        print(f"bar chart: {downstream_bar_chart(summary, output / DOWNSTREAM_PNG)}", flush=True)
    if summary["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    run_script(main, "downstream_dice.py")
