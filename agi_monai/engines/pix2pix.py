"""pix2pix training (Isola et al., CVPR 2017) of a synthesis generator on Ignite, as AGI-Net is trained
(arXiv 2411.14684 §4: PatchGAN discriminator on [inputs, image], adversarial + λ·L1, λ = 100)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from monai.engines.workflow import Workflow
from monai.losses import PatchAdversarialLoss
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer

from agi_monai.engines.checkpoint import (
    BEST_MODEL_DIGEST_KEY,
    SCENARIO_KEY,
    TRAINING_BEST_KEY,
    VALIDATION_BEST_KEY,
    BestKeyMetric,
    BestModelDigest,
    scenario_record,
)
from agi_monai.engines.utils import SynthesisPrepareBatch

__all__ = ["BCEWithLogitsAdversarialLoss", "Pix2PixKeys", "Pix2PixTrainer", "training_checkpoint_dict"]


class BCEWithLogitsAdversarialLoss(PatchAdversarialLoss):
    """``monai.losses.PatchAdversarialLoss(criterion="bce")`` — pix2pix's vanilla GAN loss, same arguments, targets,
    multi-scale lists and reduction — computed from the logits in one ``BCEWithLogitsLoss`` instead of MONAI's
    sigmoid followed by ``BCELoss``. The loss is the same (except for ``|logit| > 100``, where ``BCELoss`` clips its
    logarithm); why not MONAI's as it is: on CUDA, ``BCELoss`` given a NaN probability fails a device-side assertion,
    which leaves the CUDA context unusable, so a diverging run would end with "device-side assert triggered" instead
    of :class:`agi_monai.bundle.NonFiniteTrainingError` naming the checkpoint to resume from. Here a NaN logit gives
    a NaN loss on every device, which that handler reports. (``BCEWithLogitsLoss`` is also one that autocast
    accepts.)

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``, as ``PatchAdversarialLoss``.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction, criterion="bce")
        self.activation = None  # the sigmoid is inside the loss function
        self.loss_fct = nn.BCEWithLogitsLoss(reduction=reduction)


class Pix2PixKeys:
    """Keys of :class:`Pix2PixTrainer`'s ``engine.state.output`` besides ``image`` and ``pred``."""

    TARGET = "target"
    LOSS = Keys.LOSS  # the generator's objective, as MONAI trainers report their loss
    G_LOSS = "g_loss"
    D_LOSS = "d_loss"
    L1_LOSS = "l1_loss"
    ADV_LOSS = "adv_loss"


class Pix2PixTrainer(Trainer):
    """Conditional GAN training of an image-to-image generator (pix2pix), one Ignite iteration per batch.

    Each iteration, on a batch ``(image, target)`` (stacked input contrasts, contrast to synthesize):

    1. ``fake = generator(image)``;
    2. discriminator step: ``d_loss = ½·[adv(D([image, target]), real) + adv(D([image, fake.detach()]), fake)]``;
    3. generator step: ``g_loss = adv(D([image, fake]), real) + l1_weight · L1(fake, target)``, through the
       discriminator just updated.

    The discriminator sees the inputs concatenated with the real or synthesized contrast along channels, so a
    ``monai.networks.nets.PatchDiscriminator`` takes ``in_channels = C_inputs + 1``. It may return a tensor of
    logits or, as ``PatchDiscriminator`` does, a list of features whose last element is the logits.

    Why not MONAI's ``AdversarialTrainer``: its discriminator judges an image alone, and the images it takes as real
    are the generator's inputs (an autoencoder's GAN), where pix2pix's discriminator is conditional, judging
    ``[image, target]`` against ``[image, fake]``; it steps the generator before the discriminator, where pix2pix
    steps the discriminator first and the generator through it; and it computes the losses under autocast.

    ``engine.state.output`` is a dict: ``image``, ``target``, ``pred`` (the generator output, detached, float32)
    and the float losses ``g_loss``, ``d_loss``, ``l1_loss``, ``adv_loss`` and ``loss`` (= ``g_loss``), so
    ``StatsHandler(output_transform=lambda o: o["g_loss"])`` and ``from_engine(["pred", "target"])`` work.

    Mixed precision (``amp=True``) runs the networks under ``torch.autocast`` with one ``GradScaler`` per network,
    on CUDA only; on other devices the flag is ignored with a warning. The losses are computed in float32
    (whatever ``adversarial_loss`` is given: MONAI's own BCE one is a sigmoid + ``BCELoss``, which autocast refuses).

    To resume, checkpoint :func:`training_checkpoint_dict` with ``CheckpointSaver`` and restore it with
    ``CheckpointLoader``; the Ignite state (iteration, epoch) is part of it.

    Args:
        device: where the batches are moved; the networks must already be there.
        max_epochs: epochs to run (an epoch is ``epoch_length`` iterations).
        train_data_loader: yields dict batches with ``image_key`` (B, C, H, W) and ``target_key`` (B, 1, H, W).
        generator: maps (B, C, H, W) to (B, 1, H, W), e.g. :class:`agi_monai.networks.AGINet`.
        discriminator: takes (B, C + 1, H, W), e.g. ``PatchDiscriminator(spatial_dims=2, in_channels=C + 1, ...)``.
        g_optimizer: optimizer of the generator's parameters (the paper: Adam, lr 1e-4, betas (0.5, 0.999)).
        d_optimizer: optimizer of the discriminator's parameters.
        epoch_length: iterations per epoch, default ``len(train_data_loader)``.
        l1_weight: λ of the L1 term (pix2pix and the paper: 100).
        adversarial_loss: ``loss(logits, target_is_real, for_discriminator)``; default
            :class:`BCEWithLogitsAdversarialLoss`, pix2pix's vanilla GAN loss (``monai.losses.PatchAdversarialLoss
            (criterion="bce")`` computed from the logits).
        image_key: batch key of the stacked inputs.
        target_key: batch key of the contrast to synthesize.
        amp: mixed precision on CUDA.
        train_handlers: Ignite handlers to attach (``StatsHandler``, ``ValidationHandler``, ``CheckpointSaver``...).
        key_train_metric: a metric computed on the training outputs, the key one for ``best_metric``.
        additional_metrics: more metrics on the training outputs.
        metric_cmp_fn: ``(current, best) -> bool``, whether ``current`` is better.
        postprocessing: transforms applied to the iteration output (after decollation when ``decollate``).
        non_blocking: asynchronous host-to-device copies.
        decollate: decollate batch and output into lists of items after each iteration (off by default so
            the output stays one dict with scalar losses).
        optim_set_to_none: ``zero_grad(set_to_none=...)`` of both optimizers.
        prepare_batch: ``(batch, device, non_blocking, **kwargs) -> (image, target)``; default
            :class:`agi_monai.engines.SynthesisPrepareBatch` with ``image_key`` and ``target_key``.
        iteration_update: replaces :meth:`_iteration` (Ignite's process function).
        event_names: further events to register.
        event_to_attr: maps events to state attributes (see ``monai.engines.Workflow``).
        to_kwargs: further arguments of ``Tensor.to`` for the batch (e.g. ``memory_format``).
        amp_kwargs: arguments of ``torch.autocast`` (e.g. ``dtype=torch.bfloat16``, which needs no gradient scaling).
        compile: run the generator's forward through ``torch.compile`` (as MONAI's ``SupervisedTrainer`` offers);
            ``generator`` itself stays the module that is checkpointed. The first iterations pay the compilation.
        compile_kwargs: arguments of ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        generator: nn.Module,
        discriminator: nn.Module,
        g_optimizer: Optimizer,
        d_optimizer: Optimizer,
        epoch_length: int | None = None,
        l1_weight: float = 100.0,
        adversarial_loss: Callable | None = None,
        image_key: str = "image",
        target_key: str = "target",
        amp: bool = False,
        train_handlers: Sequence | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        postprocessing: Callable | None = None,
        non_blocking: bool = False,
        decollate: bool = False,
        optim_set_to_none: bool = True,
        prepare_batch: Callable | None = None,
        iteration_update: Callable | None = None,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        compile: bool = False,
        compile_kwargs: dict | None = None,
    ) -> None:
        device = torch.device(device)
        amp_on_device = amp and device.type == "cuda"
        if amp and not amp_on_device:
            warnings.warn(
                f"Pix2PixTrainer: amp=True ignored on {device.type}; mixed precision is used on CUDA only", stacklevel=2
            )
        # train_handlers are attached at the end of this __init__, not by Workflow's, so that a handler's
        # attach() can already read the networks, optimizers and scalers
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=SynthesisPrepareBatch(image_key, target_key) if prepare_batch is None else prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=None,
            amp=amp_on_device,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.generator = generator
        # what the iteration calls; the same parameters (torch.compile wraps the module, it does not copy it)
        self.generator_forward: Callable = torch.compile(generator, **(compile_kwargs or {})) if compile else generator
        self.discriminator = discriminator
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.l1_weight = float(l1_weight)
        self.adversarial_loss = BCEWithLogitsAdversarialLoss() if adversarial_loss is None else adversarial_loss
        self.optim_set_to_none = optim_set_to_none
        # one scaler per network: the two losses have unrelated magnitudes, and an overflow in one backward
        # must not skip the other network's step; bfloat16 has float32's range and needs no scaling
        scaling = amp_on_device and self.amp_kwargs.get("dtype", torch.float16) == torch.float16
        self.g_scaler = torch.amp.GradScaler(device.type, enabled=scaling)
        self.d_scaler = torch.amp.GradScaler(device.type, enabled=scaling)
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    def run(self) -> None:  # type: ignore[override]
        """Runs (or resumes) training up to ``max_epochs``."""
        # Trainer.run would add a shared GradScaler through the deprecated torch.cuda.amp API; this
        # trainer keeps one per network (g_scaler, d_scaler), made in __init__ so checkpoints can hold them
        Workflow.run(self)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.state.device.type, enabled=self.amp, **self.amp_kwargs)

    def _adversarial(self, logits: Any, target_is_real: bool, for_discriminator: bool) -> torch.Tensor:
        # PatchDiscriminator returns its intermediate features; the logits are the last of them
        if isinstance(logits, (list, tuple)):
            logits = logits[-1]
        return self.adversarial_loss(logits.float(), target_is_real=target_is_real, for_discriminator=for_discriminator)

    def _iteration(self, engine: Pix2PixTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One discriminator step then one generator step on ``batchdata``; returns the output dict."""
        if batchdata is None:
            raise ValueError("Pix2PixTrainer: must provide batch data for the current iteration")
        image, target = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        generator, discriminator = engine.generator, engine.discriminator
        generator.train()
        discriminator.train()

        with engine._autocast():
            try:
                fake = engine.generator_forward(image)
            except RuntimeError as error:
                _raise_if_channels_differ(generator, image, error)
                raise
        engine.state.output = {Keys.IMAGE: image, Pix2PixKeys.TARGET: target, Keys.PRED: fake.detach().float()}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        # discriminator step on the real and the (detached) synthesized pair; two forwards as in pix2pix,
        # so batch-normalization statistics are those of real-only and fake-only batches
        engine.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            real_logits = discriminator(torch.cat([image, target], dim=1))
            fake_logits = discriminator(torch.cat([image, fake.detach()], dim=1))
        d_loss = 0.5 * (
            engine._adversarial(real_logits, target_is_real=True, for_discriminator=True)
            + engine._adversarial(fake_logits, target_is_real=False, for_discriminator=True)
        )
        engine.d_scaler.scale(d_loss).backward()
        engine.d_scaler.step(engine.d_optimizer)
        engine.d_scaler.update()

        # generator step through the updated discriminator. The discriminator keeps requires_grad: the
        # gradients this puts on its parameters are cleared by the next discriminator step, and switching
        # requires_grad off would stall DistributedDataParallel's gradient reducer.
        engine.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            fake_logits = discriminator(torch.cat([image, fake], dim=1))
        adv_loss = engine._adversarial(fake_logits, target_is_real=True, for_discriminator=False)
        l1_loss = F.l1_loss(fake.float(), target.float())
        g_loss = adv_loss + engine.l1_weight * l1_loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.g_scaler.scale(g_loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.g_scaler.step(engine.g_optimizer)
        engine.g_scaler.update()

        # one host synchronization for the four reported losses
        g_value, d_value, l1_value, adv_value = torch.stack([g_loss, d_loss, l1_loss, adv_loss]).detach().tolist()
        engine.state.output.update(
            {
                Pix2PixKeys.LOSS: g_value,
                Pix2PixKeys.G_LOSS: g_value,
                Pix2PixKeys.D_LOSS: d_value,
                Pix2PixKeys.L1_LOSS: l1_value,
                Pix2PixKeys.ADV_LOSS: adv_value,
            }
        )
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output  # type: ignore[no-any-return]


def _raise_if_channels_differ(network: nn.Module, image: torch.Tensor, error: RuntimeError) -> None:
    """A ``ValueError`` saying what to override when ``network`` failed because the batch has another number of
    channels than its first convolution takes (``--inputs`` overridden without ``network_def#in_channels``); torch's
    own message names only tensor shapes."""
    first = next((m for m in network.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is not None and image.shape[1] != first.in_channels:
        raise ValueError(
            f"{type(network).__name__}: the batch has {image.shape[1]} input channel(s), one per contrast of 'inputs', "
            f"but its first convolution takes {first.in_channels} (expected network_def#in_channels = the number of "
            "inputs, and discriminator_def#in_channels one more)"
        ) from error


class _Record:
    """A fixed mapping saved in a checkpoint (Ignite saves objects with a ``state_dict``)."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)


def training_checkpoint_dict(
    trainer: Pix2PixTrainer,
    best_model_saver: Any | None = None,
    scenario: Mapping[str, Any] | None = None,
    validator: Any | None = None,
) -> dict[str, Any]:
    """Everything a :class:`Pix2PixTrainer` run needs to resume, for ``CheckpointSaver(save_dict=...)`` and
    ``CheckpointLoader(load_dict=...)``: ``generator``, ``discriminator``, ``g_optimizer``, ``d_optimizer``,
    ``g_scaler``, ``d_scaler`` (empty state when AMP is off) and ``trainer`` (Ignite's iteration, epoch,
    epoch length, max epochs). All are state dicts of tensors and numbers, so ``CheckpointLoader`` reads
    them with ``torch.load(weights_only=True)``.

    With ``best_model_saver`` (the validation's :class:`agi_monai.engines.AtomicCheckpointSaver` of the best
    generator), also ``best_model_ranking``, the scores of the generators saved so far: a resumed run then
    replaces ``models/model.pt`` only with a better one, not with whatever its first validation gives.

    With ``scenario`` (``{"inputs": [...], "target": ...}``: the saver's dict), also records that are saved only (the
    loader's dict leaves them out, so that checkpoints saved without them still load): ``scenario``, which a resume
    checks before any work (:func:`agi_monai.engines.check_resume_checkpoint`), and, with ``best_model_saver``,
    ``best_model_digest`` (:class:`agi_monai.engines.BestModelDigest`, read by
    :func:`agi_monai.engines.keep_unrecorded_best_model`), and, with ``validator`` (the validation's evaluator),
    ``validation_best`` (:class:`agi_monai.engines.BestKeyMetric`, restored by the loader's ``evaluator``), and, when
    the trainer has a ``key_train_metric``, ``training_best`` (restored into the trainer).

    In a bundle config the saver and loader cannot be train handlers (they would reference the trainer inside
    its own arguments); attach them once the trainer exists, e.g.
    ``"$@train#checkpoint_saver.attach(@train#trainer)"`` with
    ``"save_dict": "$agi_monai.engines.training_checkpoint_dict(@train#trainer, @best_model_saver)"``.
    """
    objects = {
        "generator": trainer.generator,
        "discriminator": trainer.discriminator,
        "g_optimizer": trainer.g_optimizer,
        "d_optimizer": trainer.d_optimizer,
        "g_scaler": trainer.g_scaler,
        "d_scaler": trainer.d_scaler,
        "trainer": trainer,
    }
    ranking = getattr(best_model_saver, "key_metric_ranking", None)
    if best_model_saver is not None and ranking is None:
        raise ValueError(
            "best_model_saver: expected an agi_monai.engines.AtomicCheckpointSaver with save_key_metric=True, "
            f"got {type(best_model_saver).__name__} without a key-metric checkpoint"
        )
    if ranking is not None:
        objects["best_model_ranking"] = ranking
    if scenario is not None:
        objects[SCENARIO_KEY] = _Record(scenario_record(scenario["inputs"], scenario["target"]))
        if best_model_saver is not None:
            objects[BEST_MODEL_DIGEST_KEY] = BestModelDigest(best_model_saver)
        if validator is not None:
            objects[VALIDATION_BEST_KEY] = BestKeyMetric(validator)
        if trainer.state.key_metric_name is not None:  # a key_train_metric given: its best is restored too
            objects[TRAINING_BEST_KEY] = BestKeyMetric(trainer)
    return objects
