"""Ignite engines for synthesis bundles: pix2pix training, validation/evaluation metrics, atomic checkpoints, and the
inference step every synthesis path shares (:func:`infer_case`; :func:`synthesize_volume`, axial slice by slice).

Training (``train.json``)::

    "train#trainer": {"_target_": "agi_monai.engines.Pix2PixTrainer", "device": "@device",
        "max_epochs": 60, "epoch_length": 2000, "train_data_loader": "@train#dataloader",
        "generator": "@network", "discriminator": "@discriminator",
        "g_optimizer": "@g_optimizer", "d_optimizer": "@d_optimizer", "l1_weight": 100.0, "amp": true,
        "train_handlers": "@train#handlers"}

``engine.state.output`` holds ``image``, ``target``, ``pred`` and the floats ``loss`` (= ``g_loss``), ``g_loss``,
``d_loss``, ``l1_loss``, ``adv_loss``.

Resume: save and load the same dict, :func:`training_checkpoint_dict` (generator, discriminator, both
optimizers, both AMP scalers, the trainer's Ignite state, and the best generator's score). A train handler
cannot name its own trainer, so the saver and loader are attached in ``initialize``; ``bundles/_template/configs/
train.json`` is the recipe (``checkpoint_saver``, ``checkpoint_loader``, ``best_model_saver``,
``resume_path`` = :func:`find_resume_checkpoint` of ``--resume_ckpt`` ``""`` | ``latest`` | a file; a run that starts
afresh first moves an earlier run's files aside, :func:`set_aside_earlier_run`).

(``CheckpointLoader`` reads with ``weights_only=True``; the bundles use :class:`ReportingCheckpointLoader`, which
names the file and what does not match when a checkpoint cannot be restored; a network's weights alone, e.g.
``inference.json``'s ``models/model.pt``, are read by :func:`load_weights`, with the same messages.) Ignite restarts
the data iterator when it resumes inside an epoch, so checkpoints taken at epoch ends (``epoch_level=True``, the
default) resume exactly; with a fixed ``set_determinism`` seed and an unshuffled loader the resumed run equals an
uninterrupted one.
:class:`AtomicCheckpointSaver` (MONAI's saver writes non-atomically) serves both checkpoints.

Validation: MONAI's ``SupervisedEvaluator`` as ``train.json``'s ``validate#evaluator`` builds it (PSNR with
``PeakSignalToNoiseRatio(max_val=1.0)``, the key metric; SSIM with :class:`StructuralSimilarityIndex`; MAE with
``MeanAbsoluteError``; on predictions clipped to [0, 1] by :func:`clip_prediction`, batches prepared by
:class:`SynthesisPrepareBatch`; the evaluator's output keys are ``pred`` and ``label``).
"""

from agi_monai.engines.checkpoint import (
    AtomicCheckpointSaver,
    BestModelDigest,
    ReportingCheckpointLoader,
    BestKeyMetric,
    expected_bundle_weights,
    load_weights,
)
from agi_monai.engines.evaluation import (
    CropToMaskSlabd,
    StructuralSimilarityIndex,
    clip_prediction,
)
from agi_monai.engines.inference import default_slices_per_batch, infer_case, synthesize_volume
from agi_monai.engines.pix2pix import BCEWithLogitsAdversarialLoss, Pix2PixKeys, Pix2PixTrainer, training_checkpoint_dict
from agi_monai.engines.training_run import (
    check_resume_checkpoint,
    find_resume_checkpoint,
    hold_checkpoint_folder,
    keep_unrecorded_best_model,
    latest_training_checkpoint,
    record_training_run,
    release_checkpoint_folder,
    resume_purge_step,
    set_aside_earlier_run,
    start_training_run,
)
from agi_monai.engines.utils import SynthesisPrepareBatch

__all__ = [
    "AtomicCheckpointSaver",
    "BestModelDigest",
    "BestKeyMetric",
    "CropToMaskSlabd",
    "BCEWithLogitsAdversarialLoss",
    "Pix2PixKeys",
    "Pix2PixTrainer",
    "ReportingCheckpointLoader",
    "StructuralSimilarityIndex",
    "SynthesisPrepareBatch",
    "check_resume_checkpoint",
    "clip_prediction",
    "default_slices_per_batch",
    "expected_bundle_weights",
    "find_resume_checkpoint",
    "hold_checkpoint_folder",
    "infer_case",
    "keep_unrecorded_best_model",
    "latest_training_checkpoint",
    "load_weights",
    "record_training_run",
    "release_checkpoint_folder",
    "resume_purge_step",
    "set_aside_earlier_run",
    "start_training_run",
    "synthesize_volume",
    "training_checkpoint_dict",
]
