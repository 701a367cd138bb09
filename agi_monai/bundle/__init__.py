"""What the bundle configs (``bundles/*/configs/*.json``) call beyond MONAI: reading a dataset folder or
datalist split, folder-to-folder synthesis, and small adapters
between the pix2pix engine's outputs and MONAI's handlers. Logic lives here, tested
(``tests/test_bundles.py``); the configs only wire it.
"""

from agi_monai.bundle.command_line import check_command_line, check_distributed_launch, report_failures
from agi_monai.bundle.data import (
    check_batches,
    check_networks,
    check_segmentation_sizes,
    check_spatial_size,
    check_splits,
    check_training_length,
    discover_split,
    load_split,
)
from agi_monai.bundle.handlers import (
    CosineLearningRate,
    EvaluatorProgressBar,
    NonFiniteTrainingError,
    StopOnNonFiniteTraining,
    TrainingSummary,
    log_iterations,
    loss_terms,
    rank_handlers,
    run_training,
)
from agi_monai.bundle.inference import FolderSynthesis, SynthesisSummary

__all__ = [
    "CosineLearningRate",
    "EvaluatorProgressBar",
    "FolderSynthesis",
    "NonFiniteTrainingError",
    "StopOnNonFiniteTraining",
    "SynthesisSummary",
    "TrainingSummary",
    "check_batches",
    "check_command_line",
    "check_distributed_launch",
    "check_networks",
    "check_segmentation_sizes",
    "check_spatial_size",
    "check_splits",
    "check_training_length",
    "discover_split",
    "load_split",
    "log_iterations",
    "loss_terms",
    "report_failures",
    "rank_handlers",
    "run_training",
]
