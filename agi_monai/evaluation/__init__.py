"""Evaluation of synthesized contrasts: the two metric protocols (``protocols``), the per-case evaluator of the
bundles' ``evaluate.json`` (``evaluator``), tables and summaries (``tables``), figures (``figures``), the misalignment sweep (``robustness``) and the
ablations as bundle overrides (``ablation``)."""

from agi_monai.evaluation.protocols import (
    METRIC_NAMES,
    PROTOCOL_NAMES,
    Protocol,
    ProtocolResult,
    brain_mask,
    brasyn_protocol,
    evaluate_volume,
    evaluated_slices,
    mask_bounding_box,
    percentile_normalize,
    protocol_record,
    slice_protocol,
)
from agi_monai.evaluation.evaluator import VolumeEvaluator, volume_dataset
from agi_monai.evaluation.figures import ablation_plot, robustness_plot, synthesis_panel
from agi_monai.evaluation.robustness import misalign, perturbation_levels, robustness_sweep, write_sweep
from agi_monai.evaluation.ablation import ABLATIONS, select_ablations
