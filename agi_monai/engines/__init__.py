"""Ignite engines for synthesis bundles: pix2pix training, validation/evaluation metrics, atomic checkpoints.

A bundle's ``train.json`` writes ``"_target_": "agi_monai.engines.Pix2PixTrainer"`` for the trainer,
``agi_monai.engines.synthesis_evaluator`` (or the ``SupervisedEvaluator`` recipe in its docstring) for
validation, and ``agi_monai.engines.AtomicCheckpointSaver`` with ``training_checkpoint_dict(trainer)`` to resume.
"""

from agi_monai.engines.checkpoint import AtomicCheckpointSaver
from agi_monai.engines.evaluation import (
    StructuralSimilarityIndex,
    clip_prediction,
    synthesis_evaluator,
    synthesis_metrics,
)
from agi_monai.engines.pix2pix import Pix2PixKeys, Pix2PixTrainer, training_checkpoint_dict
from agi_monai.engines.utils import SynthesisPrepareBatch

__all__ = [
    "AtomicCheckpointSaver",
    "Pix2PixKeys",
    "Pix2PixTrainer",
    "StructuralSimilarityIndex",
    "SynthesisPrepareBatch",
    "clip_prediction",
    "synthesis_evaluator",
    "synthesis_metrics",
    "training_checkpoint_dict",
]
