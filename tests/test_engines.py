"""pix2pix training engine on real slices: one iteration's contract (both networks step, the output dict),
a learning signal, resume that reproduces an uninterrupted run, atomic checkpoints, and validation metrics
equal to MONAI's metric functions."""

import gc
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader
from monai.handlers import CheckpointLoader, CheckpointSaver, MeanAbsoluteError, StatsHandler, from_engine
from monai.metrics import MAEMetric, PSNRMetric, SSIMMetric
from monai.networks.nets import PatchDiscriminator
from monai.utils import set_determinism
from torch.utils.data import Subset

from agi_monai.engines import (
    AtomicCheckpointSaver,
    BestModelDigest,
    BCEWithLogitsAdversarialLoss,
    Pix2PixTrainer,
    StructuralSimilarityIndex,
    check_resume_checkpoint,
    clip_prediction,
    hold_checkpoint_folder,
    keep_unrecorded_best_model,
    release_checkpoint_folder,
    set_aside_earlier_run,
    training_checkpoint_dict,
)
from agi_monai.data import DataError
from agi_monai.engines.checkpoint import TRAINING_BEST_KEY
from agi_monai.networks import AGINet
from helpers import DATA, REPO

INPUTS, TARGET = ["T1", "T2"], "FLAIR"
# the (8, 16, 16, 32) AGI-Net and an 8-channel PatchGAN run an iteration on two 64x64 slices in ~0.1 s
SIZE, WIDTHS = (64, 64), (8, 16, 16, 32)
OUTPUT_KEYS = {"image", "target", "pred", "loss", "g_loss", "d_loss", "l1_loss", "adv_loss"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_slices():
    """BraTS-GLI-00001-000 (T1, T2) -> FLAIR, the central 64x64 of each kept axial slice."""
    from agi_monai.data import build_slice_dataset  # imported here: needs SimpleITK (see the fixture)

    dataset = build_slice_dataset(DATA / "brats2023-gli", INPUTS, TARGET, SIZE, progress=False)
    assert len(dataset) > 100 and not dataset.failures
    return dataset


@pytest.fixture(scope="module")
def slices():
    # A GPU machine without SimpleITK (its wheel is too big to carry there) runs the CUDA tests on the same
    # slices, saved as plain tensors by `scripts/gpu_checks.sh prepare`.
    cached = os.environ.get("AGI_MONAI_TEST_SLICES")
    if cached:
        return torch.load(cached, weights_only=True)
    return build_slices()


def make_networks(seed: int = 0, g_lr: float = 1e-4) -> dict:
    set_determinism(seed)
    generator = AGINet(in_channels=len(INPUTS), channels=WIDTHS)
    discriminator = PatchDiscriminator(spatial_dims=2, channels=8, in_channels=len(INPUTS) + 1, num_layers_d=3)
    return {
        "generator": generator,
        "discriminator": discriminator,
        "g_optimizer": torch.optim.Adam(generator.parameters(), lr=g_lr, betas=(0.5, 0.999)),
        "d_optimizer": torch.optim.Adam(discriminator.parameters(), lr=1e-4, betas=(0.5, 0.999)),
    }


def make_trainer(loader, networks: dict, max_epochs: int = 1, **kwargs) -> Pix2PixTrainer:
    return Pix2PixTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=loader, **networks, **kwargs)


def loader_of(dataset, indices, batch_size: int = 2) -> DataLoader:
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False)


def parameters_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def test_three_iterations_step_both_networks_and_report_the_output_dict(slices):
    networks = make_networks()
    before = {name: parameters_of(networks[name]) for name in ("generator", "discriminator")}
    logged = []
    trainer = make_trainer(
        loader_of(slices, range(40, 46)),
        networks,
        train_handlers=[StatsHandler(output_transform=lambda output: output["g_loss"], name="pix2pix_test")],
        key_train_metric={"train_mae": MeanAbsoluteError(output_transform=from_engine(["pred", "target"]))},
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: logged.append(dict(engine.state.output)))
    trainer.run()

    assert trainer.state.iteration == 3 and len(logged) == 3
    for output in logged:
        assert set(output) == OUTPUT_KEYS
        for key in ("g_loss", "d_loss", "l1_loss", "adv_loss"):
            assert isinstance(output[key], float) and math.isfinite(output[key]), key
        assert output["g_loss"] == pytest.approx(output["adv_loss"] + 100.0 * output["l1_loss"], rel=1e-5)
        assert output["image"].shape == (2, 2, *SIZE) and output["target"].shape == (2, 1, *SIZE)
        assert output["pred"].shape == (2, 1, *SIZE) and not output["pred"].requires_grad
    pred, target = from_engine(["pred", "target"])(trainer.state.output)
    assert pred.shape == target.shape
    assert math.isfinite(trainer.state.metrics["train_mae"])
    for name in ("generator", "discriminator"):
        after = parameters_of(networks[name])
        changed = [key for key in after if not torch.equal(after[key], before[name][key])]
        assert len(changed) > len(after) // 2, f"{name}: only {changed} changed"


def test_decollated_output_with_postprocessing(slices):
    # decollate=True gives MONAI's list of per-item dicts, losses replicated, postprocessing applied per item
    trainer = make_trainer(loader_of(slices, [40, 41]), make_networks(), decollate=True, postprocessing=clip_prediction())
    trainer.run()
    output = trainer.state.output
    assert isinstance(output, list) and len(output) == 2 and set(output[0]) == OUTPUT_KEYS
    assert output[0]["pred"].shape == (1, *SIZE) and 0.0 <= output[0]["pred"].min() <= output[0]["pred"].max() <= 1.0
    assert from_engine(["g_loss"], first=True)(output) == output[1]["g_loss"]


def test_l1_decreases_when_overfitting_one_batch(slices):
    # a learning signal on real images: the generator fits two slices' FLAIR from their T1 and T2
    networks = make_networks(g_lr=1e-3)
    l1 = []
    trainer = make_trainer(loader_of(slices, [50, 80]), networks, max_epochs=30)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: l1.append(engine.state.output["l1_loss"]))
    trainer.run()
    assert len(l1) == 30
    assert sum(l1[-5:]) / 5 < 0.5 * l1[0], l1


@pytest.mark.parametrize("saver", ["atomic_with_helper", "monai_with_contract_dict"])
def test_resume_reproduces_an_uninterrupted_run(slices, tmp_path, saver):
    # two batches an epoch and an unshuffled loader: a resume at the epoch boundary sees the same batches
    loader = loader_of(slices, [30, 50, 70, 90])

    uninterrupted = make_networks(seed=0)
    make_trainer(loader, uninterrupted, max_epochs=2).run()

    interrupted = make_networks(seed=0)
    first = make_trainer(loader, interrupted, max_epochs=1)
    if saver == "atomic_with_helper":
        save_dict = training_checkpoint_dict(first)
        saver_class = AtomicCheckpointSaver
    else:
        save_dict = {**interrupted, "trainer": first}  # the five entries the configs name
        saver_class = CheckpointSaver
    saver_class(str(tmp_path), save_dict, save_final=True, final_filename="checkpoint.pt").attach(first)
    first.run()
    assert first.state.iteration == 2

    resumed = make_networks(seed=1)  # different weights, overwritten by the checkpoint
    second = make_trainer(loader, resumed, max_epochs=2)
    load_dict = training_checkpoint_dict(second) if saver == "atomic_with_helper" else {**resumed, "trainer": second}
    CheckpointLoader(str(tmp_path / "checkpoint.pt"), load_dict).attach(second)  # reads with weights_only=True
    iterations = []
    second.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: iterations.append(engine.state.iteration))
    second.run()

    assert iterations == [3, 4] and second.state.iteration == 4 and second.state.epoch == 2
    for name in ("generator", "discriminator"):
        expected, actual = parameters_of(uninterrupted[name]), parameters_of(resumed[name])
        for key in expected:
            assert torch.equal(actual[key], expected[key]), f"{name}.{key}"
    expected_adam = uninterrupted["g_optimizer"].state_dict()["state"]
    actual_adam = resumed["g_optimizer"].state_dict()["state"]
    assert all(torch.equal(actual_adam[i]["exp_avg"], expected_adam[i]["exp_avg"]) for i in expected_adam)


def test_checkpoint_loader_sets_this_runs_learning_rates_and_refuses_bad_ones(tmp_path, caplog):
    from agi_monai.engines import ReportingCheckpointLoader

    saved = make_networks(g_lr=1e-3)
    torch.save({name: saved[name].state_dict() for name in ("generator", "g_optimizer")}, tmp_path / "checkpoint.pt")
    networks = make_networks(g_lr=2e-4)
    load_dict = {name: networks[name] for name in ("generator", "g_optimizer")}
    engine = Engine(lambda engine, batch: None)  # any Ignite engine: the loader restores nothing of it here
    with caplog.at_level("INFO"):
        ReportingCheckpointLoader(str(tmp_path / "checkpoint.pt"), load_dict, learning_rates={"g_optimizer": 2e-4})(engine)
    assert [group["lr"] for group in networks["g_optimizer"].param_groups] == [2e-4]
    assert "g_optimizer: learning rate 0.0002, this run's, instead of the checkpoint's 0.001" in caplog.text
    ReportingCheckpointLoader(str(tmp_path / "checkpoint.pt"), load_dict)(engine)  # MONAI's behaviour: the saved one
    assert [group["lr"] for group in networks["g_optimizer"].param_groups] == [1e-3]
    with pytest.raises(ValueError, match=r"learning_rates\['generator'\]: expected the name of an optimizer"):
        ReportingCheckpointLoader(str(tmp_path / "checkpoint.pt"), load_dict, learning_rates={"generator": 1e-4})
    with pytest.raises(ValueError, match=r"learning_rates\['g_optimizer'\] = 0: expected a positive learning rate"):
        ReportingCheckpointLoader(str(tmp_path / "checkpoint.pt"), load_dict, learning_rates={"g_optimizer": 0})


def test_checkpoints_are_replaced_atomically(slices, tmp_path, monkeypatch):
    networks = make_networks()
    trainer = make_trainer(loader_of(slices, [40, 41]), networks, max_epochs=2)
    saver = AtomicCheckpointSaver(
        str(tmp_path), training_checkpoint_dict(trainer), save_interval=1, n_saved=1, file_prefix="train"
    )
    saver.attach(trainer)
    saved = {}

    def save_then_fail(engine):
        if engine.state.epoch == 1:
            saved.update(torch.load(tmp_path / "train_checkpoint_epoch=1.pt", weights_only=True))
            real_save = torch.save

            def interrupted_save(obj, f, *args, **kwargs):  # a kill mid-write leaves a partial file
                real_save(obj, f, *args, **kwargs)
                if isinstance(f, (str, os.PathLike)):
                    os.truncate(f, 100)
                else:
                    f.truncate(100)
                raise KeyboardInterrupt

            monkeypatch.setattr(torch, "save", interrupted_save)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    # the epoch-2 save failed: epoch 1's checkpoint is whole, with its own permissions, and no temporary file is left
    assert sorted(os.listdir(tmp_path)) == ["train_checkpoint_epoch=1.pt"]
    monkeypatch.undo()
    checkpoint = torch.load(tmp_path / "train_checkpoint_epoch=1.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == saved["trainer"]["iteration"] == 1
    assert set(checkpoint) == {"generator", "discriminator", "g_optimizer", "d_optimizer", "g_scaler", "d_scaler", "trainer"}
    assert os.stat(tmp_path / "train_checkpoint_epoch=1.pt").st_mode & 0o044 == 0o044  # group/other readable


def test_best_model_with_a_fixed_name_is_replaced_in_place(tmp_path, monkeypatch):
    # models/model.pt: the best generator under one name; a failed save keeps the previous best whole
    from ignite.engine import Engine

    model = torch.nn.Linear(2, 1)
    engine = Engine(lambda engine, batch: None)
    engine.state.metrics = {}

    @engine.on(Events.EPOCH_COMPLETED)
    def improve(engine):  # before the saver: each epoch is a new best
        engine.state.metrics["val_psnr"] = float(engine.state.epoch)
        with torch.no_grad():
            model.weight.fill_(engine.state.epoch)

    AtomicCheckpointSaver(
        str(tmp_path), {"model": model}, save_key_metric=True, key_metric_name="val_psnr", key_metric_filename="model.pt"
    ).attach(engine)
    engine.run([0], max_epochs=2)
    assert os.listdir(tmp_path) == ["model.pt"]
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].eq(2).all()

    def failing_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        engine.run([0], max_epochs=3)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.pt"]
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].eq(2).all()


def test_the_temporary_checkpoint_of_a_killed_run_is_removed_by_the_next_run(tmp_path, caplog):
    # a real `kill -9` in the middle of a checkpoint save (the out-of-memory killer, say): the previous checkpoint
    # stays whole, and the next run's saver removes the half-written temporary, which Ignite's random tmp* name
    # would have left in models/ for good
    previous = {"model": {"weight": torch.ones(2)}}
    torch.save(previous, tmp_path / "checkpoint.pt")
    saving = subprocess.Popen(
        [sys.executable, "-c", "import time, torch\nfrom ignite.engine import Engine\n"
         "from agi_monai.engines import AtomicCheckpointSaver\n"
         "def stalled_save(obj, f, *args, **kwargs):\n"
         "    open(f, 'wb').write(b'half a checkpoint'); print(f, flush=True); time.sleep(600)\n"
         "engine = Engine(lambda engine, batch: None)\n"
         f"AtomicCheckpointSaver({str(tmp_path)!r}, {{'model': torch.nn.Linear(2, 1)}}, save_final=True,"
         " final_filename='checkpoint.pt').attach(engine)\n"
         "torch.save = stalled_save\n"
         "engine.run([0], max_epochs=1)"],
        stdout=subprocess.PIPE, text=True,
    )
    left = Path(saving.stdout.readline().strip())
    saving.kill()
    saving.wait()
    assert left.parent == tmp_path and left.name == f".tmp-{socket.gethostname()}-{saving.pid}-checkpoint.pt"
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt", left.name])
    with caplog.at_level(logging.WARNING, logger="agi_monai.data.files"):
        AtomicCheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(2, 1)}, save_final=True,
                              final_filename="checkpoint.pt")
    assert os.listdir(tmp_path) == ["checkpoint.pt"] and left.name in caplog.text
    assert torch.equal(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]["weight"], torch.ones(2))


def test_validation_metrics_match_monai_metric_functions(slices):
    # the evaluator of a bundle's own train.json (validate#evaluator), given this generator and these slices
    from monai.bundle import ConfigParser

    networks = make_networks()
    make_trainer(loader_of(slices, [40, 41]), networks, max_epochs=2).run()
    generator = networks["generator"]
    loader = loader_of(slices, range(20, 110, 10), batch_size=4)  # 9 slices: batches of 4, 4, 1
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "brats_t1_t2_to_flair" / "configs" / "train.json"))
    parser.update({"device": "$torch.device('cpu')", "amp": False, "network": generator,
                   "validate#dataloader": loader, "validate#handlers": []})
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()

    generator.eval()
    with torch.no_grad():
        pred = torch.cat([generator(batch["image"].as_tensor()) for batch in loader]).clamp(0.0, 1.0)
    target = torch.cat([batch["target"].as_tensor() for batch in loader])
    expected = {
        "val_psnr": PSNRMetric(max_val=1.0)(pred, target).mean().item(),
        "val_ssim": SSIMMetric(spatial_dims=2, data_range=1.0)(pred, target).mean().item(),
        "val_mae": MAEMetric()(pred, target).mean().item(),
    }
    assert set(evaluator.state.metrics) == set(expected)
    for name, value in expected.items():
        assert evaluator.state.metrics[name] == pytest.approx(value, rel=1e-5), name
    assert evaluator.state.key_metric_name == "val_psnr"
    assert evaluator.state.best_metric == evaluator.state.metrics["val_psnr"]
    assert evaluator.state.metric_details["val_ssim"].shape == (9, 1)  # per slice, for MetricsSaver


def test_ssim_handler_averages_per_image_ssim():
    set_determinism(0)
    target = torch.rand(3, 1, 32, 32)
    pred = (target + 0.1 * torch.randn_like(target)).clamp(0, 1)
    handler = StructuralSimilarityIndex(spatial_dims=2, data_range=1.0, save_details=False)
    handler.reset()
    handler.update((pred[:2], target[:2]))
    handler.update((pred[2:], target[2:]))
    assert handler.compute() == pytest.approx(SSIMMetric(2, data_range=1.0)(pred, target).mean().item(), rel=1e-6)


def test_amp_is_ignored_on_cpu(slices):
    networks = make_networks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(loader_of(slices, [40, 41]), networks, amp=True)
    assert any("amp=True ignored on cpu" in str(w.message) for w in caught)
    assert not trainer.amp and not trainer.g_scaler.is_enabled() and not trainer.d_scaler.is_enabled()
    trainer.run()
    assert math.isfinite(trainer.state.output["g_loss"])


@pytest.mark.slow
def test_compiled_generator_trains_like_the_eager_one(slices):
    """compile=True runs the generator through torch.compile: from the same start and batches, the losses
    follow the eager run's (to float rounding), and the checkpointed module is the plain generator."""
    runs = {}
    for compiled in (False, True):
        networks = make_networks(seed=5)
        losses = []
        trainer = make_trainer(loader_of(slices, [40, 41, 60, 61]), networks, compile=compiled)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output["l1_loss"]))
        trainer.run()
        runs[compiled] = (losses, parameters_of(networks["generator"]), trainer)
    (eager_losses, eager_weights, _), (losses, weights, trainer) = runs[False], runs[True]
    assert trainer.generator_forward is not trainer.generator and trainer.generator is not None
    assert list(weights) == list(eager_weights)  # no "_orig_mod." prefixes in what is checkpointed
    assert losses == pytest.approx(eager_losses, rel=1e-3), (losses, eager_losses)
    for name, value in weights.items():
        torch.testing.assert_close(value, eager_weights[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_on_cuda(slices):
    device = torch.device("cuda")
    networks = make_networks()
    for name in ("generator", "discriminator"):
        networks[name].to(device)
    networks["g_optimizer"] = torch.optim.Adam(networks["generator"].parameters(), lr=1e-3, betas=(0.5, 0.999))
    networks["d_optimizer"] = torch.optim.Adam(networks["discriminator"].parameters(), lr=1e-4, betas=(0.5, 0.999))
    l1 = []
    trainer = Pix2PixTrainer(device, 30, loader_of(slices, [50, 80]), amp=True, **networks)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: l1.append(engine.state.output["l1_loss"]))
    trainer.run()
    assert trainer.amp and trainer.g_scaler.is_enabled() and trainer.g_scaler.get_scale() > 0
    assert all(math.isfinite(value) for value in l1) and sum(l1[-5:]) / 5 < 0.5 * l1[0], l1
    assert trainer.state.output["pred"].dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_with_logits_adversarial_loss_equals_monai_bce_loss_and_gives_nan_for_nan_logits(reduction):
    from monai.losses import PatchAdversarialLoss

    torch.manual_seed(0)
    ours, monai_bce = BCEWithLogitsAdversarialLoss(reduction), PatchAdversarialLoss(reduction, criterion="bce")
    # one PatchGAN map, and a multi-scale discriminator's list of maps
    # float64: in float32 MONAI's 1 - sigmoid loses digits at logits of ~10, where the logits form does not
    logits_map = torch.randn(2, 1, 6, 6, dtype=torch.float64) * 4
    for logits in (logits_map, [logits_map, torch.randn(2, 1, 3, 3, dtype=torch.float64)]):
        for real, for_discriminator in ((True, True), (False, True), (True, False)):
            leaves = [t.clone().requires_grad_() for t in (logits if isinstance(logits, list) else [logits])]
            inputs = leaves if isinstance(logits, list) else leaves[0]
            got = ours(inputs, target_is_real=real, for_discriminator=for_discriminator)
            want = monai_bce([t.detach().clone() for t in leaves] if isinstance(logits, list) else leaves[0].detach(),
                             target_is_real=real, for_discriminator=for_discriminator)
            got_list, want_list = (got, want) if reduction == "none" else ([got], [want])
            for g, w in zip(got_list, want_list):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
            # and the gradient MONAI's sigmoid + BCELoss gives
            expected = [t.detach().clone().requires_grad_() for t in leaves]
            monai_total = monai_bce(expected if isinstance(logits, list) else expected[0], real, for_discriminator)
            sum(l.sum() for l in (monai_total if reduction == "none" else [monai_total])).backward()
            sum(g.sum() for g in got_list).backward()
            for leaf, reference in zip(leaves, expected):
                torch.testing.assert_close(leaf.grad, reference.grad, rtol=1e-10, atol=1e-12)

    # a diverged discriminator's NaN logits: a NaN loss (which StopOnNonFiniteTraining reports) on every device,
    # where MONAI's BCELoss refuses the NaN probability (on CUDA a device-side assertion that ends the process)
    nan_logits = torch.full((1, 1, 4, 4), float("nan"))
    loss = ours(nan_logits, target_is_real=True, for_discriminator=False)
    assert all(torch.isnan(value).all() for value in (loss if reduction == "none" else [loss]))
    with pytest.raises(RuntimeError, match="all elements of input should be between 0 and 1"):
        monai_bce(nan_logits, target_is_real=True, for_discriminator=False)


def test_trainer_whose_discriminator_diverges_reports_non_finite_losses_instead_of_failing(slices, tmp_path):
    from agi_monai.bundle import NonFiniteTrainingError, StopOnNonFiniteTraining

    networks = make_networks()
    trainer = make_trainer(loader_of(slices, range(40, 46)), networks)
    StopOnNonFiniteTraining(
        {name: networks[name] for name in ("generator", "discriminator")}, tmp_path, patience=1
    ).attach(trainer)
    # the discriminator's weights become NaN after the first step, as a too high learning rate makes them
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(once=1),
        lambda engine: next(networks["discriminator"].parameters()).data.fill_(float("nan")),
    )
    with pytest.raises(NonFiniteTrainingError, match=re.escape(
        "training stopped at iteration 2 of 3 (epoch 1 of 1): the losses are not finite (g_loss nan, d_loss nan"
    )) as stopped:
        trainer.run()
    assert "and the discriminator ('initial_conv" in str(stopped.value)


def bundle_validation() -> dict:
    """A synthesis bundle's own ``validate`` section (train.json) without its data and handlers: the evaluator recipe
    (``SupervisedEvaluator``, SimpleInferer, clipped predictions, PSNR key metric, SSIM and MAE), given a dataloader."""
    train = REPO / "bundles" / "brats_t1_t2_to_flair" / "configs" / "train.json"
    validate = json.loads(train.read_text())["validate"]
    keep = ("inferer", "postprocessing", "key_metric", "additional_metrics", "evaluator")
    return {**{key: validate[key] for key in keep}, "dataloader": None, "handlers": []}


def test_bundle_config_recipe_trains_checkpoints_resumes_and_validates(slices, tmp_path):
    # the wiring train.json uses: trainer by _target_, the full checkpoint saved and loaded with the
    # helper's dict (attached in "initialize", since a train handler cannot name its own trainer)
    from monai.bundle import ConfigParser

    def parsed(max_epochs: int, resume: bool) -> ConfigParser:
        config = {
            "imports": ["$import agi_monai", "$import monai"],
            "device": "$torch.device('cpu')",
            "generator": {"_target_": "agi_monai.networks.AGINet", "in_channels": 2, "channels": list(WIDTHS)},
            "discriminator": {"_target_": "PatchDiscriminator", "spatial_dims": 2, "channels": 8, "in_channels": 3,
                              "num_layers_d": 3},
            "g_optimizer": {"_target_": "torch.optim.Adam", "params": "$@generator.parameters()", "lr": 1e-4,
                            "betas": [0.5, 0.999]},
            "d_optimizer": {"_target_": "torch.optim.Adam", "params": "$@discriminator.parameters()", "lr": 1e-4,
                            "betas": [0.5, 0.999]},
            "train": {
                "dataloader": None,  # set below
                "trainer": {"_target_": "agi_monai.engines.Pix2PixTrainer", "device": "@device",
                            "max_epochs": max_epochs, "train_data_loader": "@train#dataloader",
                            "generator": "@generator", "discriminator": "@discriminator",
                            "g_optimizer": "@g_optimizer", "d_optimizer": "@d_optimizer", "l1_weight": 100.0,
                            "train_handlers": [{"_target_": "ValidationHandler", "validator": "@validate#evaluator",
                                                "interval": 1, "epoch_level": True}]},
                "checkpoint_saver": {"_target_": "agi_monai.engines.AtomicCheckpointSaver",
                                     "save_dir": str(tmp_path), "save_final": True, "final_filename": "training.pt",
                                     "save_dict": "$agi_monai.engines.training_checkpoint_dict(@train#trainer)"},
                "checkpoint_loader": {"_target_": "CheckpointLoader", "load_path": str(tmp_path / "training.pt"),
                                      "load_dict": "$agi_monai.engines.training_checkpoint_dict(@train#trainer)"},
            },
            "network": "@generator", "amp": False,  # the names the bundle's evaluator takes them by
            "validate": bundle_validation(),
            "initialize": ["$@train#checkpoint_saver.attach(@train#trainer)"]
            + (["$@train#checkpoint_loader.attach(@train#trainer)"] if resume else []),
            "run": ["$@train#trainer.run()"],
        }
        parser = ConfigParser(config)
        parser["train#dataloader"] = loader_of(slices, [30, 50, 70, 90])
        parser["validate#dataloader"] = loader_of(slices, [40, 60], batch_size=2)
        return parser

    set_determinism(0)
    first = parsed(max_epochs=1, resume=False)
    first.get_parsed_content("initialize")
    first.get_parsed_content("run")
    assert first.get_parsed_content("train#trainer").state.iteration == 2
    set_determinism(1)
    second = parsed(max_epochs=2, resume=True)
    second.get_parsed_content("initialize")
    second.get_parsed_content("run")
    trainer = second.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 4
    metrics = second.get_parsed_content("validate#evaluator").state.metrics
    assert set(metrics) == {"val_psnr", "val_ssim", "val_mae"} and all(math.isfinite(v) for v in metrics.values())
    assert 0.0 < metrics["val_ssim"] <= 1.0 and 0.0 <= metrics["val_mae"] <= 1.0


def _ddp_worker(rank: int, world_size: int, tmp_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/rendezvous", rank=rank, world_size=world_size)
    try:
        shard = torch.load(f"{tmp_dir}/slices.pt", weights_only=True)[rank]  # each rank its own batches
        loader = [{"image": shard["image"][i : i + 2], "target": shard["target"][i : i + 2]} for i in (0, 2)]
        networks = make_networks(seed=0)  # equal initial weights, as DDP requires
        for name in ("generator", "discriminator"):
            networks[name] = DistributedDataParallel(networks[name])
        trainer = make_trainer(loader, networks, max_epochs=1)
        trainer.run()
        torch.save(
            {name: networks[name].module.state_dict() for name in ("generator", "discriminator")},
            f"{tmp_dir}/rank{rank}.pt",
        )
        dist.barrier()  # as multi_gpu_train.json's finalize (see the bundles' docs/README.md)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch and MONAI: ~14 s on 2 cores
def test_ddp_with_gloo_keeps_ranks_in_step(slices, tmp_path):
    # DistributedDataParallel on both networks: two discriminator forwards per step and the generator step's
    # gradients through the discriminator must neither stall the reducer nor let the ranks drift apart
    import torch.multiprocessing as mp

    shards = [
        {key: torch.stack([slices[i][key].as_tensor() for i in indices]) for key in ("image", "target")}
        for indices in ([30, 40, 50, 60], [70, 80, 90, 100])
    ]
    torch.save(shards, tmp_path / "slices.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    initial = make_networks(seed=0)
    for name in ("generator", "discriminator"):
        initial_state = initial[name].state_dict()
        for key, value in rank0[name].items():
            if "running_" not in key and "num_batches_tracked" not in key:  # BatchNorm buffers are per rank
                assert torch.equal(value, rank1[name][key]), f"{name}.{key}"
        assert any(not torch.equal(rank0[name][k], initial_state[k]) for k in initial_state), f"{name} did not train"


def test_a_checkpoint_that_cannot_be_written_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    # a full disk: torch's writer said only "[enforce fail at inline_container.cc:672] . unexpected pos 703488 vs
    # 703376", naming no file
    previous = {"model": {"weight": torch.ones(2)}}
    torch.save(previous, tmp_path / "checkpoint.pt")
    engine = Engine(lambda engine, batch: None)
    AtomicCheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(2, 1)}, save_final=True,
                          final_filename="checkpoint.pt").attach(engine)

    def full_disk(obj, f, *args, **kwargs):
        open(f, "wb").write(b"part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 703488 vs 703376")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DataError) as raised:
        engine.run([0], max_epochs=1)
    assert re.fullmatch(
        re.escape(f"{tmp_path / 'checkpoint.pt'}: could not be written (RuntimeError: [enforce fail at "
                  "inline_container.cc:672] ") + r"\. unexpected pos 703488 vs 703376; [0-9]+ MB free on its file "
        r"system\) \(expected a writable folder with room for the checkpoint \(the previous one is kept\)\)",
        str(raised.value),
    ), str(raised.value)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary left
    assert torch.equal(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]["weight"], torch.ones(2))


def _training_checkpoint(path: Path, scenario: dict | None = None, epoch: int = 2) -> Path:
    """A file with what check_resume_checkpoint reads of a training checkpoint."""
    state = {"trainer": {"epoch_length": 3, "iteration": 3 * epoch, "epoch": epoch}}
    if scenario is not None:
        state["scenario"] = scenario
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_a_checkpoint_of_another_scenario_is_refused(tmp_path, caplog):
    # a (T1, T2) -> FLAIR checkpoint resumed by a (T2, FLAIR) -> T1 run (same shapes), or by one with the inputs in
    # another order, trained on silently and kept the first scenario's best model and score as its own
    saved = {"inputs": ["T1", "T2"], "target": "FLAIR"}
    path = _training_checkpoint(tmp_path / "models" / "training_checkpoint_epoch=2.pt", saved)
    check_resume_checkpoint(path, 3, 3, "a training checkpoint", tmp_path / "models", saved)
    check_resume_checkpoint(path, 3, 3, "a training checkpoint", None, {"inputs": ["t1", "T2w"], "target": "flair"})
    for inputs, target in ((["T2", "FLAIR"], "T1"), (["T2", "T1"], "FLAIR")):
        with pytest.raises(DataError) as raised:
            check_resume_checkpoint(path, 3, 3, "a training checkpoint", None, {"inputs": inputs, "target": target})
        assert str(raised.value).startswith(
            f"{path}: was saved by a (T1, T2) -> FLAIR run, this run is ({', '.join(inputs)}) -> {target} (expected a "
            "checkpoint of this bundle's scenario, inputs in the same order"
        )
    older = _training_checkpoint(tmp_path / "older" / "training_checkpoint_epoch=2.pt")  # saved before the record
    with caplog.at_level(logging.WARNING, logger="agi_monai.engines.training_run"):
        check_resume_checkpoint(older, 3, 3, "a training checkpoint", None, saved)
    assert f"{older} records no scenario (saved by an earlier version)" in caplog.text


def test_a_trainer_with_a_key_metric_records_its_best_in_the_checkpoint(slices):
    # a Pix2PixTrainer given a key_train_metric: its best (which MONAI keeps outside Ignite's state dict) is saved
    # as training_best, for ReportingCheckpointLoader to restore; without one there is nothing to record
    scenario = {"inputs": INPUTS, "target": TARGET}
    plain = make_trainer(loader_of(slices, [40, 41]), make_networks())
    assert TRAINING_BEST_KEY not in training_checkpoint_dict(plain, scenario=scenario)
    trainer = make_trainer(loader_of(slices, [40, 41]), make_networks(), key_train_metric={
        "train_mae": MeanAbsoluteError(output_transform=from_engine(["pred", "target"]))})
    trainer.run()
    record = training_checkpoint_dict(trainer, scenario=scenario)[TRAINING_BEST_KEY].state_dict()
    assert record == {"best_metric": trainer.state.best_metric, "best_metric_epoch": 1}
    assert math.isfinite(record["best_metric"])


def test_a_resume_that_would_replace_another_runs_files_is_refused(tmp_path):
    # resuming a run set aside (earlier_run_*) into models/ of a newer run deleted that run's checkpoint and replaced
    # its better model.pt; an older checkpoint of models/ would have done the same to its later ones
    models = tmp_path / "models"
    latest = _training_checkpoint(models / "training_checkpoint_epoch=3.pt", epoch=3)
    older = _training_checkpoint(models / "training_checkpoint_epoch=1.pt", epoch=1)
    (models / "model.pt").write_bytes(b"the newer run's best generator")
    earlier = _training_checkpoint(models / "earlier_run_20261125-100000" / "training_checkpoint_epoch=2.pt")
    check_resume_checkpoint(latest, 5, 3, "a training checkpoint", models)  # continuing the run in place
    with pytest.raises(DataError) as raised:
        check_resume_checkpoint(earlier, 5, 3, "a training checkpoint", models)
    assert str(raised.value) == (
        f"{earlier}: is not in {models}, which holds training_checkpoint_epoch=1.pt, training_checkpoint_epoch=3.pt, "
        "model.pt of another run or a later point: resumed, this run's saves would replace them (expected "
        "--resume_ckpt latest (continues training_checkpoint_epoch=3.pt))"
    )
    with pytest.raises(DataError, match="is not the latest training checkpoint of"):
        check_resume_checkpoint(older, 5, 3, "a training checkpoint", models)
    # a checkpoint copied from elsewhere into an empty folder, or beside nothing of another run, resumes
    check_resume_checkpoint(earlier, 5, 3, "a training checkpoint", tmp_path / "fresh")
    only_model = tmp_path / "only_model"
    only_model.mkdir()
    (only_model / "model.pt").write_bytes(b"weights put there by hand")
    with pytest.raises(DataError, match=r"which holds model.pt of another run .* \(expected .* moved away or emptied"):
        check_resume_checkpoint(earlier, 5, 3, "a training checkpoint", only_model)


def _hold_in_another_process(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom agi_monai.engines import hold_checkpoint_folder\n"
         f"hold = hold_checkpoint_folder({str(folder)!r}); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def _refused(folder: Path) -> bool:
    try:
        hold_checkpoint_folder(folder).release()
        return False
    except DataError as error:
        assert "is in use by another training run" in str(error)
        return True


def test_one_training_run_per_checkpoint_folder(tmp_path):
    # two runs in one bundle_root set each other's files aside and mixed their checkpoints; the second is now refused
    models = tmp_path / "models"
    holder = _hold_in_another_process(models)
    try:
        with pytest.raises(DataError) as raised:
            hold_checkpoint_folder(models)
        assert str(raised.value).startswith(f"{models}: is in use by another training run (a process holds its lock")
        assert str(raised.value).endswith("(expected one training run per checkpoint folder: wait for that one to "
                                          "end, or give this one another --bundle_root (or --ckpt_dir))")
        (tmp_path / "link").symlink_to(models)  # the same folder by another path
        with pytest.raises(DataError, match="is in use by another training run"):
            hold_checkpoint_folder(tmp_path / "link")
    finally:
        holder.kill()
        holder.wait()
    hold = hold_checkpoint_folder(models)  # a killed run's hold goes with it
    assert hold.folder == models and os.listdir(models) == []  # no lock file among the checkpoints
    # a second run of this process takes the folder over, by any path, and a release frees it for other processes
    again = hold_checkpoint_folder(tmp_path / "link")
    assert _hold_in_another_process_expecting_refusal(models)
    release_checkpoint_folder(models)
    assert not _hold_in_another_process_expecting_refusal(models)
    assert hold is not None and again is not None  # (released explicitly, not by being collected)


def _hold_in_another_process_expecting_refusal(folder: Path) -> bool:
    result = subprocess.run(
        [sys.executable, "-c", "from agi_monai.engines import hold_checkpoint_folder\n"
         f"hold_checkpoint_folder({str(folder)!r})"], capture_output=True, text=True,
    )
    return result.returncode != 0 and "is in use by another training run" in result.stderr


def test_a_hold_of_a_run_that_failed_before_training_goes_with_its_workflow(tmp_path):
    # a run started from Python (a notebook, MONAI Label) that failed during initialize kept the folder locked for
    # the life of the process; its hold is now released when the failed workflow, holding it, is collected
    models = tmp_path / "models"
    workflow_state = {"hold": hold_checkpoint_folder(models)}
    assert _hold_in_another_process_expecting_refusal(models)
    workflow_state.clear()
    gc.collect()
    assert not _hold_in_another_process_expecting_refusal(models)


def test_starting_afresh_sets_the_earlier_runs_tensorboard_events_aside_too(tmp_path):
    # before: the fresh run's validation curve went on the earlier run's in eval/ (steps 1, 2, 1, 2), another
    # scenario's included; then (a first fix telling runs apart by process) a multi-GPU run set its rank 1's files
    # aside as "the earlier run's", and of two runs in one process neither's were
    from torch.utils.tensorboard import SummaryWriter

    models, log_dir = tmp_path / "models", tmp_path / "eval"
    _training_checkpoint(models / "training_checkpoint_epoch=2.pt")
    earlier_writer = SummaryWriter(log_dir=str(log_dir))  # an earlier run of this very process
    earlier_writer.add_scalar("val_psnr", 6.0, 1)
    earlier_writer.close()
    (earlier,) = log_dir.iterdir()
    os.utime(earlier, (time.time() - 5, time.time() - 5))  # last written before this run started
    hold = hold_checkpoint_folder(models)  # this run starts
    writers = [SummaryWriter(log_dir=str(log_dir), filename_suffix=f".rank{rank}") for rank in (0, 1)]
    for writer in writers:  # this run's writers, its other processes' included
        writer.add_scalar("val_psnr", 7.0, 1)
        writer.flush()
    folder = set_aside_earlier_run(models, log_dir=log_dir)
    for writer in writers:
        writer.close()
    hold.release()
    assert sorted(p.name for p in folder.iterdir()) == ["eval", "training_checkpoint_epoch=2.pt"]
    assert [p.name for p in (folder / "eval").iterdir()] == [earlier.name]
    assert sorted(p.name.rsplit(".", 1)[1] for p in log_dir.iterdir()) == ["rank0", "rank1"]


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    if os.geteuid() == 0:  # root writes to a folder without write permission: a read-only file system, as access sees it
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == models else real_access(path, mode))
    else:
        models.chmod(0o500)
    try:
        with pytest.raises(DataError, match=r"models: cannot be written \(no write permission, or a read-only file "):
            hold_checkpoint_folder(models)
    finally:
        models.chmod(0o700)



def test_a_best_model_written_after_the_resumed_checkpoint_is_kept(tmp_path, caplog):
    # each epoch writes model.pt, then its checkpoint; a run stopped between the two left a better model.pt than the
    # checkpoint's ranking knew, which the resumed run then replaced with a worse one
    best_model_saver = AtomicCheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(2, 1)}, save_key_metric=True,
                                             key_metric_filename="model.pt")
    model = tmp_path / "model.pt"
    model.write_bytes(b"epoch 1's generator")
    state = {"trainer": {"epoch_length": 3, "iteration": 3, "epoch": 1},
             "best_model_digest": BestModelDigest(best_model_saver).state_dict()}
    checkpoint = tmp_path / "training_checkpoint_epoch=1.pt"
    torch.save(state, checkpoint)
    assert keep_unrecorded_best_model(checkpoint, tmp_path) is None  # model.pt is the one the checkpoint recorded
    model.write_bytes(b"epoch 2's better generator")  # then epoch 2's checkpoint failed (a full disk)
    with caplog.at_level(logging.WARNING, logger="agi_monai.engines.training_run"):
        kept = keep_unrecorded_best_model(checkpoint, tmp_path)
    assert kept == tmp_path / "model_after_training_checkpoint_epoch=1.pt"
    assert kept.read_bytes() == b"epoch 2's better generator" and model.read_bytes() == kept.read_bytes()
    assert f"{model} was written after training_checkpoint_epoch=1.pt, by a validation whose checkpoint was not" in (
        caplog.text)
    model.write_bytes(b"another later generator")  # a second stop after the same checkpoint: a copy of its own
    second = keep_unrecorded_best_model(checkpoint, tmp_path)
    assert second.name == "model_after_training_checkpoint_epoch=1-2.pt"
    assert kept.read_bytes() == b"epoch 2's better generator"
    # a fresh start sets the copies aside with the run they belong to
    folder = set_aside_earlier_run(tmp_path)
    assert {kept.name, second.name, "model.pt", checkpoint.name} <= {p.name for p in folder.iterdir()}
    checkpoint = folder / checkpoint.name
    older = tmp_path / "older.pt"  # a checkpoint saved before the digest was recorded: nothing to compare
    torch.save({"trainer": state["trainer"]}, older)
    assert keep_unrecorded_best_model(older, tmp_path) is None and keep_unrecorded_best_model("", tmp_path) is None
