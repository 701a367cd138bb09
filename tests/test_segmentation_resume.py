"""The segmentation bundle's (``bundles/brats_segmentation``) training resume and size checks, mostly at the level of
its config's objects: the learning-rate schedule a resumed run follows, the validation's and the trainer's best score
and the best-model digest its checkpoints carry (the trainer's also through a tiny run resumed), the message for a file
that is not one of its checkpoints, and the patch sizes SegResNet takes, refused before any work.

The review that found these resumed real runs (``--resume_ckpt latest`` with another ``--learning_rate`` and more
``--epochs``; a synthesis bundle's checkpoint; ``--roi_size [60,60,30]``); here the same objects are built from
``train.json`` on the shipped labelled case and driven directly, which takes seconds.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.networks.nets import SegResNet

from agi_monai.data import DataError
from agi_monai.data.errors import innermost_cause
from agi_monai.engines import ReportingCheckpointLoader, keep_unrecorded_best_model
from agi_monai.engines.checkpoint import BEST_MODEL_DIGEST_KEY, TRAINING_BEST_KEY, VALIDATION_BEST_KEY
from agi_monai.bundle import CosineLearningRate, check_segmentation_sizes
from helpers import REPO

CONFIGS = REPO / "bundles" / "brats_segmentation" / "configs"
TCGA = REPO / "tests" / "data" / "tcga-lgg" / "TCGA-FG-6692"
TINY = {"spatial_size": [128, 128], "roi_size": [64, 64, 32], "sw_roi_size": [128, 128, 160],
        "network_def#init_filters": 8, "num_workers": 0, "label_convention": "brats2018",
        "device": "$torch.device('cpu')"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _link_case(folder: Path) -> Path:
    """``folder`` holding the shipped labelled case (links to its files)."""
    (folder / TCGA.name).mkdir(parents=True)
    for file in TCGA.iterdir():
        (folder / TCGA.name / file.name).symlink_to(file)
    return folder


@pytest.fixture
def cases(tmp_path) -> Path:
    return _link_case(tmp_path / "cases")


def _train_config(bundle_root: Path, cases: Path, *files: str, **settings) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in (files or ("train.json",))])
    parser.update({"bundle_root": str(bundle_root), "dataset_dir": str(cases), **TINY, **settings})
    parser.parse()
    return parser


# ---------------------------------------------------------------------------------------------- schedule


def _rates(schedule: CosineLearningRate, optimizer, max_epochs: int, state: dict | None = None) -> dict[int, float]:
    """The learning rate of each epoch an Ignite engine (two iterations an epoch) runs with ``schedule`` attached."""
    engine = Engine(lambda engine, batch: None)
    schedule.attach(engine)
    rates: dict[int, float] = {}
    engine.add_event_handler(
        Events.ITERATION_STARTED, lambda e: rates.setdefault(e.state.epoch, optimizer.param_groups[0]["lr"])
    )
    if state is not None:
        engine.load_state_dict(state)
    engine.run([0, 1], max_epochs=max_epochs)
    return rates


def test_the_schedule_is_the_zoo_cosine_and_a_resume_follows_its_own_settings():
    """Before: MONAI's CheckpointLoader restored the optimizer's rate and CosineAnnealingLR's T_max, so that a run
    resumed with another --learning_rate trained at the old one, and one resumed with more --epochs after its end
    trained its first epoch at 0 and followed the old cosine round again."""
    network = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    reference = torch.optim.Adam(torch.nn.Linear(2, 1).parameters(), lr=1e-4)
    zoo = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=4)
    expected = {}
    for epoch in range(1, 5):  # the zoo's: CosineAnnealingLR stepped at each epoch's end
        expected[epoch] = reference.param_groups[0]["lr"]
        reference.step()
        zoo.step()
    rates = _rates(CosineLearningRate(optimizer, 1e-4, 4), optimizer, 4)
    assert rates == pytest.approx(expected, rel=1e-9, abs=1e-15) and rates[1] == 1e-4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * (1 + math.cos(math.pi * 3 / 4)) / 2)

    # resumed after its last epoch, at the checkpoint's rate, with --epochs 6 and --learning_rate 5e-4
    state = {"epoch": 4, "epoch_length": 2, "max_epochs": 4}
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    resumed = _rates(CosineLearningRate(optimizer, 5e-4, 6), optimizer, 6, state)
    assert list(resumed) == [5, 6]
    assert resumed[5] == pytest.approx(5e-4 * (1 + math.cos(math.pi * 4 / 6)) / 2)  # the 6-epoch cosine at epoch 5
    assert resumed[6] == pytest.approx(5e-4 * (1 + math.cos(math.pi * 5 / 6)) / 2)
    # the same settings: the uninterrupted run's rates
    state = {"epoch": 2, "epoch_length": 2, "max_epochs": 4}
    assert _rates(CosineLearningRate(optimizer, 1e-4, 4), optimizer, 4, state) == pytest.approx(
        {3: expected[3], 4: expected[4]}, rel=1e-9)
    with pytest.raises(ValueError, match=r"--learning_rate 0: expected a positive number"):
        CosineLearningRate(optimizer, 0, 4)
    with pytest.raises(ValueError, match=r"--epochs 2.5: expected a positive whole number"):
        CosineLearningRate(optimizer, 1e-4, 2.5)


# ------------------------------------------------------------------------------------------- checkpoints


def test_a_resume_restores_the_best_score_and_sets_this_runs_learning_rate(tmp_path, cases):
    """train.json's checkpoint records the validation's best (BestKeyMetric) and the best model's digest
    (BestModelDigest), as the synthesis bundles' do; its loader (ReportingCheckpointLoader) restores the best into the
    validation's evaluator. Before, the first validation of a resumed run logged "Got new best metric" whatever its
    score; and lr_scheduler was restored, so --learning_rate did not count."""
    first = _train_config(tmp_path / "run", cases, epochs=3)
    trainer, evaluator = first.get_parsed_content("train#trainer"), first.get_parsed_content("validate#evaluator")
    saver = first.get_parsed_content("checkpoint_saver")
    save_dict = saver._interval_checkpoint.to_save
    assert set(save_dict) == {"model", "optimizer", "trainer", "best_model_ranking", BEST_MODEL_DIGEST_KEY,
                              VALIDATION_BEST_KEY, TRAINING_BEST_KEY}
    models = tmp_path / "run" / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / "model.pt").write_bytes(b"the best network of epoch 2")
    # a run stopped after epoch 3 of 3, its best validation 0.7 at epoch 2, its optimizer at the cosine's 0
    trainer.state.epoch, trainer.state.iteration, trainer.state.epoch_length = 3, 3, 1
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.7, 2
    for group in first.get_parsed_content("optimizer").param_groups:
        group["lr"] = 0.0
    checkpoint = models / "training_checkpoint_epoch=3.pt"
    torch.save({name: item.state_dict() for name, item in save_dict.items()}, checkpoint)

    resumed = _train_config(tmp_path / "run", cases, epochs=6, learning_rate=5e-4, resume_ckpt="latest")
    assert resumed.get_parsed_content("resume_path") == str(checkpoint)
    loader = resumed.get_parsed_content("checkpoint_loader")
    trainer, evaluator = resumed.get_parsed_content("train#trainer"), resumed.get_parsed_content("validate#evaluator")
    assert isinstance(loader, ReportingCheckpointLoader) and loader.evaluator is evaluator
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (-1, -1)
    loader(trainer)
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.7, 2)
    assert trainer.state.epoch == 3 and trainer.state.max_epochs == 6
    schedule = resumed.get_parsed_content("lr_schedule")
    assert trainer.has_event_handler(schedule, Events.EPOCH_STARTED)
    trainer.state.epoch = 4  # as Ignite sets it before EPOCH_STARTED of the first resumed epoch
    schedule(trainer)
    optimizer = resumed.get_parsed_content("optimizer")
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * (1 + math.cos(math.pi * 3 / 6)) / 2)
    # the digest lets a resume keep a better model.pt written after the checkpoint (the run stopped between the two)
    assert any("keep_unrecorded_best_model(@resume_path, @ckpt_dir)" in step for step in resumed["initialize"])
    (models / "model.pt").write_bytes(b"a better network of epoch 4, whose checkpoint was never written")
    kept = keep_unrecorded_best_model(checkpoint, models)
    assert kept is not None and kept.read_bytes().startswith(b"a better network of epoch 4")


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, one_torch_thread) -> Path:
    """The bundle root of a tiny run of train.json: one epoch of one iteration, no validation (``val_interval`` past
    the last epoch; ~10 s), its checkpoint ``models/training_checkpoint_epoch=1.pt``."""
    folder = tmp_path_factory.mktemp("one_epoch")
    _train(folder / "run", _link_case(folder / "cases"), epochs=1)
    return folder / "run"


def _train(bundle_root: Path, cases: Path, **settings) -> ConfigParser:
    """``bundle_root`` trained by train.json (its initialize and run, in this process) with the tiny settings."""
    parser = _train_config(bundle_root, cases, val_interval=3, **settings)
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("run")
    return parser


def _copy_run(run: Path, bundle_root: Path) -> Path:
    """``run``'s models folder copied to ``bundle_root``; its checkpoint there."""
    shutil.copytree(run / "models", bundle_root / "models")
    return bundle_root / "models" / "training_checkpoint_epoch=1.pt"


def test_a_resumed_run_keeps_the_trainers_best_key_metric(one_epoch_run, tmp_path, cases, caplog):
    """train.json's trainer has a key metric of its own (train_mean_dice), whose best MONAI keeps outside Ignite's
    state dict, as the validation's: before, a resumed run started it afresh and logged its first epoch as "Got new
    best metric of train_mean_dice", and its end as that epoch's best, whatever the run's best."""
    checkpoint = _copy_run(one_epoch_run, tmp_path / "run")
    state = torch.load(checkpoint, weights_only=True)
    assert state[TRAINING_BEST_KEY]["best_metric_epoch"] == 1  # the first epoch's is the best so far
    state[TRAINING_BEST_KEY] = {"best_metric": 1.0, "best_metric_epoch": 1}  # a best no epoch beats: a Dice is <= 1
    torch.save(state, checkpoint)
    caplog.set_level(logging.INFO)
    resumed = _train(tmp_path / "run", cases, epochs=2, resume_ckpt="latest")
    trainer = resumed.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and "train_mean_dice" in trainer.state.metrics
    assert (trainer.state.best_metric, trainer.state.best_metric_epoch) == (1.0, 1)
    assert not [line for line in caplog.messages if "Got new best metric of train_mean_dice" in line]
    saved = torch.load(tmp_path / "run" / "models" / "training_checkpoint_epoch=2.pt", weights_only=True)
    assert saved[TRAINING_BEST_KEY] == {"best_metric": 1.0, "best_metric_epoch": 1}


def test_a_checkpoint_without_the_best_key_metrics_resumes_and_a_damaged_entry_is_named(
        one_epoch_run, tmp_path, cases, caplog):
    """A checkpoint saved before the trainer's best was recorded (or the validation's) still resumes: the best starts
    afresh, as it did, and a line says so (only the log's "new best" depends on it, not which model.pt is kept). An
    entry that is not a best key metric is refused naming the file."""
    checkpoint = _copy_run(one_epoch_run, tmp_path / "run")
    state = torch.load(checkpoint, weights_only=True)
    del state[TRAINING_BEST_KEY], state[VALIDATION_BEST_KEY]
    torch.save(state, checkpoint)
    resumed = _train_config(tmp_path / "run", cases, epochs=2, resume_ckpt=str(checkpoint))
    trainer, evaluator = resumed.get_parsed_content("train#trainer"), resumed.get_parsed_content("validate#evaluator")
    caplog.set_level(logging.INFO)
    resumed.get_parsed_content("checkpoint_loader")(trainer)
    assert trainer.state.epoch == 1
    assert (trainer.state.best_metric_epoch, evaluator.state.best_metric_epoch) == (-1, -1)
    assert f"{checkpoint}: no {TRAINING_BEST_KEY} entry (saved before it was recorded): the best train_mean_dice " \
           "starts afresh, so that its first value is logged as a new best" in caplog.messages
    assert any(f"no {VALIDATION_BEST_KEY} entry" in line and "val_mean_dice" in line for line in caplog.messages)

    state[TRAINING_BEST_KEY] = {"best_metric": "0.5"}
    torch.save(state, checkpoint)
    loader = _train_config(tmp_path / "run", cases, epochs=2, resume_ckpt=str(checkpoint)).get_parsed_content(
        "checkpoint_loader")
    with pytest.raises(DataError) as raised:
        loader(trainer)
    assert str(raised.value) == (
        f"{checkpoint}: its 'training_best' entry is {{'best_metric': '0.5'}}, not {{'best_metric': <number>, "
        "'best_metric_epoch': <whole number>} (expected a training checkpoint of this bundle, "
        "training_checkpoint_epoch=<n>.pt of a run with the same network_def)"
    )


def test_a_checkpoint_of_another_bundle_is_named_with_what_it_holds(tmp_path, cases):
    """Before: a synthesis bundle's training checkpoint given as --resume_ckpt failed with Ignite's "Key 'model' from x
    is not found in y: dict_keys([...])", naming no file."""
    other = tmp_path / "training_checkpoint_epoch=1.pt"
    torch.save({"generator": {"w": torch.zeros(1)}, "discriminator": {"w": torch.zeros(1)},
                "trainer": {"epoch": 1, "iteration": 10, "epoch_length": 10, "max_epochs": 1}}, other)
    resumed = _train_config(tmp_path / "run", cases, epochs=5, resume_ckpt=str(other))
    loader = resumed.get_parsed_content("checkpoint_loader")
    with pytest.raises(DataError) as raised:
        loader(resumed.get_parsed_content("train#trainer"))
    assert str(raised.value) == (
        f"{other}: holds generator, discriminator, trainer, not model, optimizer, best_model_ranking (expected a "
        "training checkpoint of this bundle, training_checkpoint_epoch=<n>.pt of a run with the same network_def)"
    )


# ------------------------------------------------------------------------------------------------- sizes


def test_patch_sizes_segresnet_cannot_take_are_refused():
    network = SegResNet(3, init_filters=8, in_channels=4, out_channels=3, blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1])
    check_segmentation_sizes(network, [224, 224, 144], [240, 240, 160], [240, 240])
    check_segmentation_sizes(network, [224, 224, 144], [128, 128, 160], [128, 128])  # the crop is 128x128
    with pytest.raises(ValueError, match=r"--roi_size \[60, 60, 30\]: expected three patch sides, multiples of 8: "
                                         r"SegResNet halves each side 3 times"):
        check_segmentation_sizes(network, [60, 60, 30], None, [240, 240])
    with pytest.raises(ValueError, match=r"--sw_roi_size \[240, 240, 155\]: expected three patch sides, multiples"):
        check_segmentation_sizes(network, None, [240, 240, 155])
    with pytest.raises(ValueError, match=r"--spatial_size \[100, 100\] with --roi_size \[224, 224, 144\]: the training "
                                         r"crop is \[100, 100\] in-plane"):
        check_segmentation_sizes(network, [224, 224, 144], None, [100, 100])
    with pytest.raises(ValueError, match=r"--roi_size \[64, 64\]: expected 3 positive whole sizes"):
        check_segmentation_sizes(network, [64, 64], None)
    with pytest.raises(ValueError, match=r"--spatial_size 128: expected 2 positive whole sizes"):
        check_segmentation_sizes(network, None, None, 128)
    # the real thing: SegResNet fails on a side that is not a multiple of 8, and takes one that is
    with torch.no_grad():
        assert network(torch.zeros(1, 4, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
        with pytest.raises(RuntimeError, match="must match the size of tensor"):
            network(torch.zeros(1, 4, 16, 16, 12))


@pytest.mark.parametrize(
    "files, setting",
    [(("train.json",), "roi_size"), (("train.json", "evaluate.json"), "sw_roi_size"),
     (("inference.json",), "sw_roi_size")],
)
def test_the_configs_check_sizes_before_any_work(tmp_path, cases, files, setting):
    """Before: --roi_size [60,60,30] failed after 37 s (the preprocessing, then the first iteration) on a tensor size
    mismatch. Each config's initialize refuses it first: no checkpoint folder held, no weights read."""
    settings = {setting: [60, 60, 32]}
    if files == ("inference.json",):
        settings = {"bundle_root": str(tmp_path / "run"), "dataset_dir": str(cases), "sw_roi_size": [60, 60, 32]}
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "inference.json"))
        parser.update(settings)
        parser.parse()
    else:
        parser = _train_config(tmp_path / "run", cases, *files, **settings)
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("initialize")
    error = innermost_cause(raised.value)
    assert isinstance(error, ValueError) and str(error).startswith(f"--{setting} [60, 60, 32]: expected three patch "
                                                                    "sides, multiples of 8")
    assert not (tmp_path / "run").exists()
