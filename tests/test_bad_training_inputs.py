"""Bad input to the bundles' training and evaluation (``train.json``, ``evaluate.json``): each gets a message naming
the file (or folder), what is wrong and what was expected; a bad case among good ones is reported and training goes
on; a failed start writes nothing, leaves an existing checkpoint byte-identical (and loadable), and inputs are never
modified. The inference side is ``tests/test_bad_inputs.py``.

The runs are the bundles' own configs at a tiny budget (:func:`agi_monai.bundle.experiment.budget_overrides`:
widths 8-32, 64x64 slices, 2 iterations), in-process through :func:`~agi_monai.bundle.experiment.train_bundle` and
:func:`~agi_monai.bundle.experiment.evaluate_bundle` (MONAI's ``ConfigWorkflow``, what ``python -m monai.bundle run``
runs). MONAI wraps an error raised while building or running a config item in a ``RuntimeError``; the user sees
ours in the traceback's chain, and the tests look it up there. One shared training run (a datalist of a good case
and three bad ones) is both the "bad case among good ones" test and the source of the checkpoints the resume and
evaluation tests get wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from torch.utils.data import DataLoader, DistributedSampler

from agi_monai.bundle.data import check_batches, check_splits, load_split
from agi_monai.bundle.experiment import budget_overrides, evaluate_bundle, train_bundle
from agi_monai.data import DataError, MissingFileError, discover_cases, load_volume, write_json
from agi_monai.engines import find_resume_checkpoint
from agi_monai.networks import AGINet
from helpers import REPO

IXI = REPO / "bundles" / "ixi_t1_t2_to_pd"  # (T1, T2) -> PD
BRATS_3_TO_1 = REPO / "bundles" / "brats_t1_t2_flair_to_t1gd"  # (T1, T2, FLAIR) -> T1Gd: 3 input channels
IXI_SIM = REPO / "tests" / "data" / "ixi-sim"
GLI = REPO / "tests" / "data" / "brats2023-gli"
TCGA = REPO / "tests" / "data" / "tcga-lgg" / "TCGA-FG-6692"  # BraTS space, with a tumour label (mav)
SEGMENTATION = REPO / "bundles" / "brats_segmentation"
SEGMENTATION_CONTRASTS = ["T1Gd", "T1", "T2", "FLAIR", "seg"]
WIDTHS = [8, 16, 16, 32]
CHECKPOINT = "training_checkpoint_epoch=1.pt"
CONTRASTS = ("T1", "T2", "PD")


def overrides(dataset: str | Path, cache: Path, **extra) -> dict:
    """``train.json`` (and ``evaluate.json``) overrides of a 2-iteration CPU run on 64x64 slices; ``cache`` is
    shared by the tests, so that each volume is preprocessed once."""
    settings = {"channels": WIDTHS, "discriminator_channels": 8, "spatial_size": [64, 64], "cache_dir": str(cache)}
    return budget_overrides(dataset, iterations=2, batch_size=2, crop_size=None, device="cpu", **{**settings, **extra})


def cause(error: BaseException, kind: type[BaseException] = DataError) -> BaseException:
    """The first ``kind`` in ``error``'s chain (MONAI re-raises config errors as ``RuntimeError`` from them)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    raise AssertionError(f"no {kind.__name__} behind {type(error).__name__}: {error}")


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_case(folder: Path, case: str, contrasts=CONTRASTS) -> dict[str, str]:
    """The shipped simulated IXI subject's files as case ``case`` of ``folder``; returns contrast -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for contrast in contrasts:
        paths[contrast] = str(folder / f"{case}-{contrast}.nii.gz")
        shutil.copyfile(IXI_SIM / f"IXI901-SIM-0001-{contrast}.nii.gz", paths[contrast])
    return paths


class Records(logging.Handler):
    """What ``agi_monai`` logs during a run (the bundle's logging.conf replaces the root logger's handlers)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def cache(tmp_path_factory, one_torch_thread) -> Path:
    """The preprocessed-volume cache every run of this module shares; while they run, torch uses one thread (the
    shared training run measured 4 s so, 40 s with two threads on the busy 2-core test machine)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, dict[str, str]]:
    """A good case and three bad ones: a truncated T2, a PD with NaN voxels, a datalist entry whose T2 is missing."""
    folder = tmp_path_factory.mktemp("cases")
    good = copy_case(folder, "IXI901-GOOD")
    truncated = copy_case(folder, "IXI902-TRUNCATED")
    whole = Path(truncated["T2"]).read_bytes()
    Path(truncated["T2"]).write_bytes(whole[: len(whole) // 2])
    with_nan = copy_case(folder, "IXI903-NAN")
    pd = nib.load(with_nan["PD"])
    voxels = np.asarray(pd.dataobj, dtype=np.float32)
    voxels[60:62, 60:62, 36] = np.nan
    nib.save(nib.Nifti1Image(voxels, pd.affine), with_nan["PD"])
    missing = dict(good, T2=str(folder / "IXI904-GONE-T2.nii.gz"))
    return {"good": good, "truncated": truncated, "nan": with_nan, "missing": missing}


def write_datalist(path: Path, **splits: list[dict[str, str]]) -> Path:
    path.write_text(json.dumps({split: [{"case_id": f"{split}-{i}", **case} for i, case in enumerate(items)]
                                for split, items in splits.items()}))
    return path


@pytest.fixture(scope="module")
def trained(cases, cache, tmp_path_factory) -> dict:
    """One training run, ``--resume_ckpt latest`` in an empty bundle root, over a datalist whose training split has
    the good case and the three bad ones."""
    inputs = tmp_path_factory.mktemp("inputs")
    datalist = write_datalist(
        inputs / "datalist.json",
        training=[cases["good"], cases["truncated"], cases["nan"], cases["missing"]], validation=[cases["good"]],
    )
    folder = Path(cases["good"]["T1"]).parent
    before = {**tree_digest(folder), "datalist": hashlib.sha256(datalist.read_bytes()).hexdigest()}
    root = tmp_path_factory.mktemp("trained")
    records = Records()
    logging.getLogger("agi_monai").addHandler(records)
    try:
        run = train_bundle(IXI, root, overrides(datalist, cache, resume_ckpt="latest"))
    finally:
        logging.getLogger("agi_monai").removeHandler(records)
    after = {**tree_digest(folder), "datalist": hashlib.sha256(datalist.read_bytes()).hexdigest()}
    return {"root": root, "run": run, "log": "\n".join(records.lines), "before": before, "after": after}


def holds_nothing(folder: Path) -> bool:
    """``folder`` is missing or empty: a run refused after it took its checkpoint folder (hold_checkpoint_folder,
    which creates it to lock it) wrote nothing there."""
    return not folder.exists() or not any(folder.iterdir())


def failed_training(bundle: Path, root: Path, settings: dict) -> BaseException:
    """The error of a training run that must not start; checks it wrote no checkpoint."""
    models = root / "models"
    existing = tree_digest(models) if models.is_dir() else {}
    with pytest.raises(Exception) as raised:
        train_bundle(bundle, root, settings)
    assert (tree_digest(models) if models.is_dir() else {}) == existing  # nothing written, nothing replaced
    return raised.value


# ------------------------------------------------------------------------------------------------ dataset_dir


def test_dataset_dir_that_does_not_exist(cache, tmp_path):
    error = cause(failed_training(IXI, tmp_path, overrides(tmp_path / "no-such-folder", cache)))
    assert str(error) == (
        f"{tmp_path / 'no-such-folder'}: does not exist (expected a folder of NIfTI/DICOM files or a JSON datalist)"
    )


def test_empty_dataset_dir(cache, tmp_path):
    (tmp_path / "empty").mkdir()
    error = cause(failed_training(IXI, tmp_path / "run", overrides(tmp_path / "empty", cache)))
    assert str(error) == (
        f"{tmp_path / 'empty'}: no case of the 'training' split has T1, T2, PD "
        "(expected at least one case with each of T1, T2, PD)"
    )


def test_no_case_has_the_target_contrast(cache, tmp_path):
    copy_case(tmp_path / "cases", "IXI901-SIM-0001", contrasts=("T1", "T2"))
    error = cause(failed_training(IXI, tmp_path / "run", overrides(tmp_path / "cases", cache)))
    assert str(error) == (
        f"{tmp_path / 'cases'}: no case of the 'training' split has T1, T2, PD (expected at least one case with each "
        "of T1, T2, PD); skipped IXI901-SIM-0001: missing PD (found T1, T2)"
    )


# A datalist's problems are reported before any slice is built (train.json's first initialize step reads every
# split): each of these runs has a fresh cache, which must stay empty. Before, the training split's slices were
# built first (minutes at the paper's scale), and only then was the validation split read.


def test_datalist_without_a_validation_split(cases, tmp_path):
    datalist = write_datalist(tmp_path / "datalist.json", training=[cases["good"]])
    error = cause(failed_training(IXI, tmp_path / "run", overrides(datalist, tmp_path / "cache")))
    assert str(error) == f"{datalist}: has no 'validation' list (keys: training) (expected a 'validation' key)"
    assert not (tmp_path / "cache").exists()  # before: the training case's slice file was written first


def test_datalist_with_an_empty_validation_split(cases, tmp_path):
    # before the allow_empty check: training ran, validated nothing, and ended without models/model.pt and without
    # a word; then the error came after the training slices were built
    datalist = write_datalist(tmp_path / "datalist.json", training=[cases["good"]], validation=[])
    error = cause(failed_training(IXI, tmp_path / "run", overrides(datalist, tmp_path / "cache")))
    assert str(error) == (
        f"{datalist}: no case of the 'validation' split has T1, T2, PD (expected at least one case with each of T1, "
        "T2, PD)"
    )
    assert not (tmp_path / "cache").exists()


def test_validation_split_whose_files_are_missing(cases, tmp_path):
    # before: the training slices were built, then the validation case failed in preprocessing ("no usable slice")
    datalist = write_datalist(tmp_path / "datalist.json", training=[cases["good"]], validation=[cases["missing"]])
    error = cause(failed_training(IXI, tmp_path / "run", overrides(datalist, tmp_path / "cache")))
    assert str(error) == (
        f"{datalist}: no case of the 'validation' split has T1, T2, PD (expected at least one case with each of T1, "
        f"T2, PD); skipped validation-0: {cases['missing']['T2']}: file not found (expected an existing NIfTI file)"
    )
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name, expected", [
    ("gone.nii.gz", "an existing NIfTI file"),
    ("gone-series", "an existing NIfTI file or DICOM series folder"),  # a folder, for all the name says
])
def test_a_missing_file_reads_the_same_as_the_datalist_is_read_and_as_its_volume_is_loaded(tmp_path, name, expected):
    # one function (missing_file_error) words both: load_split's check (require_files, before any slice is built)
    # and load_volume's, where a file removed since the datalist was read shows
    missing = tmp_path / name
    case = {"T1": str(IXI_SIM / "IXI901-SIM-0001-T1.nii.gz"), "T2": str(missing), "PD": str(tmp_path / f"pd-{name}")}
    datalist = write_datalist(tmp_path / "datalist.json", training=[case])
    with pytest.raises(DataError) as raised:
        load_split(datalist, "training", CONTRASTS, allow_empty=False, require_files=True)
    assert str(raised.value).endswith(f"; skipped training-0: {missing}: file not found (expected {expected})")
    with pytest.raises(MissingFileError) as raised:  # also a FileNotFoundError
        load_volume(str(missing))
    assert str(raised.value) == f"{missing}: file not found (expected {expected})"


def test_multi_gpu_train_reports_the_datalist_before_building_slices(cases, tmp_path, monkeypatch):
    # multi_gpu_train.json replaces train.json's initialize: the same checks, after the process group is set up
    # (here one gloo process, in this process)
    from monai.bundle import ConfigWorkflow
    from torch import distributed

    datalist = write_datalist(tmp_path / "datalist.json", training=[cases["good"]])
    settings = write_json(overrides(datalist, tmp_path / "cache"), tmp_path / "overrides.json")
    configs = [str(IXI / "configs" / name) for name in ("train.json", "multi_gpu_train.json")] + [str(settings)]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    workflow = ConfigWorkflow(config_file=configs, workflow_type="train", bundle_root=str(tmp_path / "run"))
    try:
        with pytest.raises(Exception) as raised:
            workflow.initialize()
    finally:
        distributed.is_initialized() and distributed.destroy_process_group()
    assert str(cause(raised.value)) == (
        f"{datalist}: has no 'validation' list (keys: training) (expected a 'validation' key)"
    )
    assert not (tmp_path / "cache").exists() and holds_nothing(tmp_path / "run" / "models")


def test_multi_gpu_train_without_torchrun_says_how_to_launch_it(cases, tmp_path, monkeypatch):
    # before: "environment variable RANK expected, but not set" from init_process_group
    from monai.bundle import ConfigWorkflow

    datalist = write_datalist(tmp_path / "datalist.json", training=[cases["good"]], validation=[cases["good"]])
    settings = write_json(overrides(datalist, tmp_path / "cache"), tmp_path / "overrides.json")
    configs = [str(IXI / "configs" / name) for name in ("train.json", "multi_gpu_train.json")] + [str(settings)]
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    workflow = ConfigWorkflow(config_file=configs, workflow_type="train", bundle_root=str(tmp_path / "run"))
    with pytest.raises(Exception) as raised:
        workflow.initialize()
    assert str(raised.value.__cause__).startswith(  # MONAI's "Failed to evaluate ConfigExpression" wraps it
        "multi_gpu_train.json runs one process per GPU, started by torchrun, which sets RANK, LOCAL_RANK, WORLD_SIZE, "
        "MASTER_ADDR, MASTER_PORT (not set here): run `torchrun --standalone --nproc_per_node=<GPUs> -m monai.bundle"
    )
    assert not (tmp_path / "cache").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_segmentation_bundle_reports_a_missing_validation_file_before_training(tmp_path):
    # brats_segmentation/train.json (hand-written, MONAI Datasets read lazily). Before: its splits could be empty,
    # and the missing file was read, and training stopped, at the first validation, after a whole epoch
    (case,) = discover_cases(TCGA, required=SEGMENTATION_CONTRASTS).cases
    missing = dict(case, T2=str(tmp_path / "TCGA-GONE-t2.nii.gz"))
    datalist = write_datalist(tmp_path / "datalist.json", training=[case], validation=[missing])
    settings = {"dataset_dir": str(datalist), "num_workers": 0, "device": "$torch.device('cpu')"}
    error = cause(failed_training(SEGMENTATION, tmp_path / "run", settings))
    assert str(error) == (
        f"{datalist}: no case of the 'validation' split has T1Gd, T1, T2, FLAIR, seg (expected at least one case "
        f"with each of T1Gd, T1, T2, FLAIR, seg); skipped {case['case_id']}: {missing['T2']}: file not found "
        "(expected an existing NIfTI file)"
    )
    empty = write_datalist(tmp_path / "empty.json", training=[case], validation=[])
    error = cause(failed_training(SEGMENTATION, tmp_path / "run", {**settings, "dataset_dir": str(empty)}))
    assert str(error).startswith(f"{empty}: no case of the 'validation' split has T1Gd, T1, T2, FLAIR, seg (expected")


# ------------------------------------------------------------------------------------------------ batches


def test_fewer_usable_slices_than_one_batch(cases, cache, trained, tmp_path):
    # the shared run's training item (same case ID and files), so that its slice file is read, not built again;
    # the shipped subject keeps all 72 of its axial slices at 64x64 (its slice file's record says so too)
    datalist = write_datalist(tmp_path / "datalist.json", training=[cases["good"]], validation=[cases["good"]])
    (record,) = [json.loads(p.read_text()) for p in cache.glob("T1_T2_to_PD_64x64/slices/*.json")
                 if json.loads(p.read_text())["case_id"] == "training-0"]
    assert len(record["slice_indices"]) == 72
    # before: the epoch had no iteration; the untrained generator was validated and saved as models/model.pt, and
    # the run ended "training done: nothing to train, all 1 epochs were done (a larger --epochs trains on)"
    error = cause(failed_training(IXI, tmp_path / "run", {**overrides(datalist, cache), "batch_size": 73}))
    assert str(error) == (
        "the 'training' split: 72 usable slices from 1 volume make no batch of batch_size 73 with drop_last, so an "
        "epoch would have no iteration (expected at least 73 slices: a smaller --batch_size, more training cases, or "
        "a --train#dataset#min_foreground_fraction below 0.05 (the value used), to keep more slices per volume)"
    )
    assert holds_nothing(tmp_path / "run" / "models")


def test_fewer_usable_slices_than_one_batch_names_the_overridden_threshold(cases, cache, tmp_path):
    # before: the message advised a threshold "below the default 0.05" whatever the run had used
    datalist = write_datalist(tmp_path / "datalist.json", training=[cases["good"]], validation=[cases["good"]])
    settings = {**overrides(datalist, cache), "batch_size": 73, "train#dataset#min_foreground_fraction": 0.2}
    error = cause(failed_training(IXI, tmp_path / "run", settings))
    assert str(error).endswith(
        "a --train#dataset#min_foreground_fraction below 0.2 (the value used), to keep more slices per volume)"
    )
    # a dataset that is not a SliceDataset has no threshold to name
    with pytest.raises(DataError, match=r"or a lower --train#dataset#min_foreground_fraction, to keep more slices"):
        check_batches(DataLoader(list(range(72)), batch_size=73, drop_last=True), "training")


def test_check_splits_of_lists_given_directly():
    # MONAI Label overrides train#dataset#data and validate#dataset#data with lists load_split never saw
    check_splits(training=[{"case_id": "a"}], validation=[{"case_id": "b"}])
    with pytest.raises(DataError) as raised:
        check_splits(training=[{"case_id": "a"}], validation=[])
    assert str(raised.value) == "the 'validation' split: holds no case (expected at least one case)"


def test_check_batches_counts_what_each_process_gets():
    slices = list(range(72))
    check_batches(DataLoader(slices, batch_size=72, drop_last=True), "training")  # one batch: enough
    check_batches(DataLoader(slices, batch_size=100), "validation")  # no drop_last: one smaller batch
    with pytest.raises(DataError, match=r"^the 'training' split: 72 usable slices make no batch of batch_size 73 "):
        check_batches(DataLoader(slices, batch_size=73, drop_last=True), "training")
    # DDP: 72 slices over 2 processes are 36 each (torch's DistributedSampler, as the bundle's MONAI one)
    sampler = DistributedSampler(slices, num_replicas=2, rank=1)
    with pytest.raises(DataError) as raised:
        check_batches(DataLoader(slices, batch_size=40, sampler=sampler, drop_last=True), "training")
    assert "72 usable slices, 36 of them for this process of 2 make no batch of batch_size 40 with drop_last" in (
        str(raised.value)
    )
    assert "(expected at least 40 slices per process: " in str(raised.value)
    # a validation process without an item (3 slices, 4 processes, no padding) would leave the others waiting
    sampler = DistributedSampler(list(range(3)), num_replicas=4, rank=3, drop_last=True)
    with pytest.raises(DataError, match=r"3 usable slices, 0 of them for this process of 4 make no batch of "
                                        r"batch_size 16, so .* --validate#dataset#min_foreground_fraction"):
        check_batches(DataLoader(list(range(3)), batch_size=16, sampler=sampler), "validation")


# ------------------------------------------------------------------------------------------------ bad cases


def test_bad_cases_among_good_ones_are_named_and_training_goes_on(trained, cases):
    log = trained["log"]
    assert f"{cases['truncated']['T2']}: is truncated or its compressed data is corrupt" in log
    assert "(expected a complete file)" in log
    assert f"{cases['nan']['PD']}: contains 4 NaN/Inf voxels (expected finite intensities)" in log
    # the case whose T2 is missing is skipped as the datalist is read, before any slice is built
    missing = f"skipped training-3: {cases['missing']['T2']}: file not found (expected an existing NIfTI file)"
    assert log.index(missing) < log.index("slices from 1 volumes, 2 volumes skipped")
    # the good case trained the generator: two iterations, then the best model and the training checkpoint
    assert trained["run"].iterations == 2
    models = trained["root"] / "models"
    assert sorted(p.name for p in models.iterdir()) == ["model.pt", CHECKPOINT, "training_runs.json"]
    AGINet(in_channels=2, channels=WIDTHS).load_state_dict(torch.load(models / "model.pt", weights_only=True))
    # and no input was touched, the bad ones included
    assert trained["after"] == trained["before"]


def test_every_training_case_unreadable(cases, cache, tmp_path):
    datalist = write_datalist(tmp_path / "datalist.json", training=[cases["truncated"], cases["nan"]],
                              validation=[cases["good"]])
    error = str(cause(failed_training(IXI, tmp_path / "run", overrides(datalist, cache))))
    # before: "num_samples should be a positive integer value, but got num_samples=0" from the DataLoader
    assert error.startswith(
        "datalist [training-0, training-1]: no usable slice (expected at least one readable case with slices of at "
        "least 5% foreground); skipped training-0: "
    )
    assert error.endswith(f"; skipped training-1: {cases['nan']['PD']}: contains 4 NaN/Inf voxels (expected finite "
                          "intensities)")


def test_unknown_target_contrast(cases, cache, tmp_path):
    error = cause(failed_training(IXI, tmp_path / "run", overrides(IXI_SIM, cache, target="T3")))
    assert str(error) == (
        "T3: is not a known contrast name (expected one of T1, T2, PD, FLAIR, T1Gd, seg or an alias such as t1ce, "
        "t2f, fla)"
    )


def test_target_that_is_also_an_input(cache, tmp_path):
    # before: every case skipped with an empty reason, then the DataLoader's num_samples=0
    error = cause(failed_training(IXI, tmp_path / "run", overrides(IXI_SIM, cache, target="T1")), ValueError)
    assert "target 'T1' is one of the inputs ['T1', 'T2'] (expected a contrast other than the inputs)" in str(error)


def test_inputs_override_without_the_network_inputs(cache, tmp_path):
    # a 2-input bundle told to read three contrasts; before: torch's "weight of size [8, 2, 3, 3], expected
    # input[2, 3, 64, 64] to have 2 channels", naming no setting
    settings = overrides(GLI, cache, inputs=["T1", "T2", "FLAIR"], target="T1Gd")
    error = cause(failed_training(IXI, tmp_path / "run", settings), ValueError)
    assert str(error) == (
        "AGINet: the batch has 3 input channel(s), one per contrast of 'inputs', but its first convolution takes 2 "
        "(expected network_def#in_channels = the number of inputs, and discriminator_def#in_channels one more)"
    )


# ------------------------------------------------------------------------------------------------ resume


def test_resume_latest_without_a_checkpoint_starts_afresh(trained):
    assert f"resume_ckpt=latest: no training checkpoint in {trained['root'] / 'models'} yet, starting afresh" in (
        trained["log"]
    )


def test_starting_afresh_over_an_earlier_run_keeps_that_run_aside(trained, cases, cache, tmp_path):
    copy_run(trained, tmp_path)
    models = tmp_path / "models"
    (models / "model.ts").write_bytes(b"an export of the earlier model.pt")
    earlier = tree_digest(models)
    assert set(earlier) == {CHECKPOINT, "model.pt", "model.ts", "training_runs.json"}
    # a start that fails (here: no such dataset) moves nothing
    failed_training(IXI, tmp_path, overrides(tmp_path / "no-such-folder", cache))
    # nor does one that fails at its first iteration, after the trainer was built (here: a discriminator that does
    # not take the inputs and the target); before, the earlier run had been moved aside at the trainer's building,
    # so that a --resume_ckpt latest after fixing the setting started afresh
    datalist = write_datalist(tmp_path / "datalist.json", training=[cases["good"]], validation=[cases["good"]])
    failed_training(IXI, tmp_path, overrides(datalist, cache, **{"discriminator_def#in_channels": 5}))
    assert not list(models.glob("earlier_run_*"))
    # a fresh run (no --resume_ckpt: a user who forgot it) trains anew; the earlier run's files are kept, unchanged
    records = Records()
    logging.getLogger("agi_monai").addHandler(records)
    try:
        train_bundle(IXI, tmp_path, overrides(datalist, cache))
    finally:
        logging.getLogger("agi_monai").removeHandler(records)
    (kept,) = models.glob("earlier_run_*")
    # (with the TensorBoard event files the failed starts above left in eval/: written before this run started)
    assert {name: digest for name, digest in tree_digest(kept).items() if not name.startswith("eval/")} == earlier
    moved = f"starting afresh: moved the earlier run's {CHECKPOINT}, model.pt, model.ts, training_runs.json, "
    assert any(line.startswith(moved) for line in records.lines), records.lines
    assert not any("superseded" in line or "resuming" in line for line in records.lines), records.lines
    assert {p.name for p in models.iterdir() if p.is_file()} == {CHECKPOINT, "model.pt", "training_runs.json"}  # its own
    (run,) = json.loads((models / "training_runs.json").read_text())["runs"]  # the earlier run's list went with it
    assert run["settings"]["resume_from"] == "" and run["settings"]["inputs"] == ["T1", "T2"]
    assert find_resume_checkpoint("latest", models) == str(models / CHECKPOINT)  # not the one set aside


def test_resume_with_another_val_interval_is_refused_before_any_slice_is_built(trained, tmp_path):
    # the epoch length is part of the checkpoint's trainer state: before, Ignite kept the saved one, so that the run
    # logged "val_interval: 3" and trained, validated and saved every 2 iterations
    checkpoint = copy_run(trained, tmp_path)
    fresh_cache = tmp_path / "cache"
    error = cause(failed_training(IXI, tmp_path, overrides(IXI_SIM, fresh_cache, resume_ckpt="latest", val_interval=3)))
    assert str(error) == (
        f"{checkpoint}: was saved by a run with epochs of 2 iterations (--val_interval 2), this run's have 3 "
        "(expected --val_interval 2 to resume it: its epochs, checkpoints and validations follow from it)"
    )
    assert not fresh_cache.exists()  # reported before the preprocessing


def test_resume_with_the_inputs_in_another_order_is_refused_before_any_slice_is_built(trained, tmp_path):
    # a (T1, T2) -> PD checkpoint has the shapes of a (T2, T1) -> PD one: before, the run resumed with the channels
    # swapped and kept the checkpoint's best model and score as its own
    checkpoint = copy_run(trained, tmp_path)
    fresh_cache = tmp_path / "cache"
    error = cause(failed_training(IXI, tmp_path, overrides(IXI_SIM, fresh_cache, resume_ckpt="latest",
                                                           inputs=["T2", "T1"])))
    assert str(error).startswith(f"{checkpoint}: was saved by a (T1, T2) -> PD run, this run is (T2, T1) -> PD ")
    assert not fresh_cache.exists()


def test_resume_from_a_checkpoint_of_another_scenario_is_refused_before_any_slice_is_built(trained, tmp_path):
    # (T1, T2) -> PD resumed by the (T1, T2, FLAIR) -> T1Gd bundle: refused by the scenario the checkpoint records,
    # before the preprocessing (its generator's first convolution, of another shape, failed only after it)
    checkpoint = copy_run(trained, tmp_path)
    fresh_cache = tmp_path / "cache"
    error = cause(failed_training(BRATS_3_TO_1, tmp_path, overrides(GLI, fresh_cache, resume_ckpt="latest")))
    assert str(error) == (
        f"{checkpoint}: was saved by a (T1, T2) -> PD run, this run is (T1, T2, FLAIR) -> T1Gd (expected a checkpoint "
        "of this bundle's scenario, inputs in the same order (its generator and best score are that scenario's))"
    )
    assert not fresh_cache.exists()


def test_a_resume_keeps_a_best_model_its_checkpoint_did_not_record(trained, cache, tmp_path):
    # a run stopped between an epoch's model.pt and its checkpoint (killed, a full disk) left a better model.pt than
    # the checkpoint's ranking knew: before, the resumed run replaced it with its first generator beating that ranking
    copy_run(trained, tmp_path)
    model = tmp_path / "models" / "model.pt"
    later = AGINet(in_channels=2, channels=WIDTHS).state_dict()  # as if epoch 2's validation wrote it, then stopped
    torch.save(later, model)
    unrecorded = model.read_bytes()
    train_bundle(IXI, tmp_path, overrides(IXI_SIM, cache, resume_ckpt="latest", epochs=2))
    kept = tmp_path / "models" / f"model_after_{Path(CHECKPOINT).stem}.pt"
    assert kept.read_bytes() == unrecorded
    assert {p.name for p in (tmp_path / "models").iterdir()} == {
        "model.pt", kept.name, "training_checkpoint_epoch=2.pt", "training_runs.json"}


def test_a_resume_restores_the_validations_best_metric(trained, cache, tmp_path):
    # before: MONAI's evaluator started the resumed run at "no best yet", logged its first validation as "Got new best
    # metric" (worse than the run's best or not) and ended with that as the best value and epoch
    checkpoint = copy_run(trained, tmp_path)
    state = torch.load(checkpoint, weights_only=True)
    ((score, _),) = state["best_model_ranking"]["_saved"]
    assert state["validation_best"] == {"best_metric": pytest.approx(score), "best_metric_epoch": 1}
    state["validation_best"] = {"best_metric": 1e9, "best_metric_epoch": 1}  # a best no validation beats
    torch.save(state, checkpoint)
    train_bundle(IXI, tmp_path, overrides(IXI_SIM, cache, resume_ckpt="latest", epochs=2))
    resumed = torch.load(tmp_path / "models" / "training_checkpoint_epoch=2.pt", weights_only=True)
    assert resumed["validation_best"] == {"best_metric": 1e9, "best_metric_epoch": 1}


def test_resume_by_the_name_the_summary_prints(trained, tmp_path, monkeypatch):
    copy_run(trained, tmp_path)
    models = tmp_path / "models"
    monkeypatch.chdir(tmp_path.parent)  # not the models folder: the name is looked up there
    assert find_resume_checkpoint(CHECKPOINT, models) == str(models / CHECKPOINT)
    with pytest.raises(FileNotFoundError) as raised:
        find_resume_checkpoint("training_checkpoint_epoch=7.pt", models)
    assert str(raised.value).startswith(
        f"resume_ckpt: {tmp_path.parent / 'training_checkpoint_epoch=7.pt'} does not exist (nor "
        f"{models / 'training_checkpoint_epoch=7.pt'}); expected a training checkpoint"
    )


@pytest.mark.parametrize("spatial_size", [[100, 100], [64], [64, 64, 64], 64, [64.0, 64], [-64, 64]])
def test_spatial_size_the_network_cannot_take_is_refused_before_any_slice_is_built(tmp_path, spatial_size):
    # before: [100, 100] failed at the first iteration (after the preprocessing), [64] inside a MONAI transform
    # ("Sequence must have length 3, got 2"), 64 with "Value after * must be an iterable, not int"
    fresh_cache = tmp_path / "cache"
    error = cause(failed_training(IXI, tmp_path, overrides(IXI_SIM, fresh_cache, spatial_size=spatial_size)),
                  ValueError)
    assert str(error) == (
        f"--spatial_size {spatial_size!r}: expected two positive in-plane sizes (h, w), multiples of 8: the network "
        "halves them three times (e.g. [240, 240])"
    )
    assert not fresh_cache.exists()


@pytest.mark.parametrize("setting, value", [("val_interval", 0), ("val_interval", -1), ("val_interval", 1.5),
                                            ("epochs", 1.5), ("epochs", 0)])
def test_a_training_length_that_is_not_a_positive_whole_number_is_refused_first(tmp_path, setting, value):
    # before: --val_interval 0 exited 0 having trained nothing, -1 made an epoch one pass over the data, 1.5 trained
    # without end and never checkpointed, and --epochs 1.5 ran two epochs "of 1.5"
    fresh_cache = tmp_path / "cache"
    settings = overrides(IXI_SIM, fresh_cache)
    settings[setting] = value
    error = cause(failed_training(IXI, tmp_path, settings), ValueError)
    assert str(error).startswith(f"--{setting} {value!r}: expected a positive whole number of ")
    assert not fresh_cache.exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize("value", [-1, 0, float("nan")])
def test_a_learning_rate_that_is_not_positive_is_refused_first(tmp_path, value):
    # before: -1 failed in torch's optimizer ("Invalid learning rate: -1", no setting named), 0 trained nothing on a
    # fresh start and was refused on a resume only after the preprocessing
    fresh_cache = tmp_path / "cache"
    settings = {**overrides(IXI_SIM, fresh_cache), "learning_rate": value}  # the config's key, unchecked on its way
    error = cause(failed_training(IXI, tmp_path, settings), ValueError)
    assert str(error) == f"--learning_rate {value!r}: expected a positive number (the paper's is 1e-4)"
    assert not fresh_cache.exists()


def test_network_settings_the_network_refuses_are_reported_before_any_slice_is_built(tmp_path):
    # before: after the whole preprocessing, as CAGR's "groups=8 must be positive and divide in_channels=4"
    fresh_cache = tmp_path / "cache"
    error = cause(failed_training(IXI, tmp_path, overrides(IXI_SIM, fresh_cache, channels=[4, 8, 8, 16])), ValueError)
    assert str(error) == (
        "AGINet: channels=(4, 8, 8, 16) with groups=8: the width of each CAGR stage must be a multiple of groups, not "
        "down1 (4)"
    )
    assert not fresh_cache.exists()


def test_resume_from_a_missing_file(cache, tmp_path):
    missing = tmp_path / "models" / "gone.pt"
    error = cause(failed_training(IXI, tmp_path, overrides(IXI_SIM, cache, resume_ckpt=str(missing))), FileNotFoundError)
    assert str(error) == (
        f"resume_ckpt: {missing} does not exist; expected a training checkpoint "
        "(training_checkpoint_epoch=<n>.pt), 'latest', or '' to start afresh"
    )


def copy_run(trained: dict, root: Path) -> Path:
    """A copy of the shared run's ``models/`` in ``root``: what a user resumes from; returns the checkpoint."""
    shutil.copytree(trained["root"] / "models", root / "models")
    return root / "models" / CHECKPOINT


EXPECTED_TRAINING_CHECKPOINT = (
    "(expected a training checkpoint, training_checkpoint_epoch=<n>.pt of a run with the same network_def, "
    "discriminator_def and inputs)"
)


def test_resume_from_a_truncated_checkpoint(trained, cache, tmp_path):
    checkpoint = copy_run(trained, tmp_path)
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[: len(whole) // 2])
    error = cause(failed_training(IXI, tmp_path, overrides(IXI_SIM, cache, resume_ckpt="latest")))
    assert str(error) == (
        f"{checkpoint}: cannot be read by torch.load: truncated, or not a PyTorch file (RuntimeError: "
        f"PytorchStreamReader failed reading zip archive: failed finding central directory) {EXPECTED_TRAINING_CHECKPOINT}"
    )


def test_resume_from_the_generator_weights(trained, cache, tmp_path):
    copy_run(trained, tmp_path)
    weights = tmp_path / "models" / "model.pt"
    error = cause(failed_training(IXI, tmp_path, overrides(IXI_SIM, cache, resume_ckpt=str(weights))))
    assert str(error).startswith(f"{weights}: holds one network's state dict (")
    assert str(error).endswith(
        "not generator, discriminator, g_optimizer, d_optimizer, g_scaler, d_scaler, trainer, best_model_ranking "
        + EXPECTED_TRAINING_CHECKPOINT
    )


def test_resume_from_a_checkpoint_past_the_last_epoch(trained, cache, tmp_path):
    checkpoint = copy_run(trained, tmp_path)
    state = torch.load(checkpoint, weights_only=True)
    state["trainer"]["iteration"] = 3 * state["trainer"]["epoch_length"]  # as if saved at the end of epoch 3
    torch.save(state, checkpoint)
    # this run ends after epoch 1; before: MONAI's "Epoch count (3) in checkpoint is larger than ...", naming no file
    error = cause(failed_training(IXI, tmp_path, overrides(IXI_SIM, cache, resume_ckpt="latest")))
    assert str(error) == (
        f"{checkpoint}: was saved at epoch 3, after this run's last epoch (1) "
        "(expected --epochs greater than 3, to train on from it)"
    )


@pytest.mark.parametrize(
    "bundle, dataset, change, mismatch",
    [
        (IXI, IXI_SIM, {"network": "agi_monai.networks.ResUNet"},
         "its 'generator' does not fit ResUNet of this config: 10 missing (e.g. down1.0.conv1.weight), 130 unexpected "
         "(e.g. down1.0.conv1.attention.fuse.weight)"),
        (IXI, IXI_SIM, {"channels": [8, 16, 16, 16]},
         "its 'generator' does not fit AGINet of this config: 26 tensor(s) of another shape (e.g. down3.2.weight "
         "(32, 16, 2, 2) in the file, (16, 16, 2, 2) here)"),
        (IXI, IXI_SIM, {"discriminator_channels": 4},
         "its 'discriminator' does not fit PatchDiscriminator of this config: "),
    ],
    ids=["resunet", "widths", "discriminator"],
)
def test_resume_from_a_checkpoint_of_another_network(trained, cache, tmp_path, bundle, dataset, change, mismatch):
    checkpoint = copy_run(trained, tmp_path)
    before = tree_digest(tmp_path / "models")
    error = str(cause(failed_training(bundle, tmp_path, overrides(dataset, cache, resume_ckpt="latest", **change))))
    assert error.startswith(f"{checkpoint}: {mismatch}") and error.endswith(EXPECTED_TRAINING_CHECKPOINT)
    # the checkpoint the user pointed at is untouched, and still restores the run it came from
    assert tree_digest(tmp_path / "models") == before
    state = torch.load(checkpoint, weights_only=True)
    AGINet(in_channels=2, channels=WIDTHS).load_state_dict(state["generator"])


# ------------------------------------------------------------------------------------------------ evaluate


EXPECTED_WEIGHTS = "(expected the generator weights that train.json writes, from a run with the same network_def and inputs)"


def test_evaluate_without_weights(cache, tmp_path):
    with pytest.raises(Exception) as raised:
        evaluate_bundle(IXI, tmp_path, overrides(IXI_SIM, cache))
    error = cause(raised.value, FileNotFoundError)
    assert str(error) == f"{tmp_path / 'models' / 'model.pt'}: does not exist {EXPECTED_WEIGHTS}"
    assert not (tmp_path / "eval").exists()  # no partial metrics


def test_evaluate_with_the_weights_of_another_scenario(trained, cache, tmp_path):
    copy_run(trained, tmp_path)
    weights = tmp_path / "models" / "model.pt"
    before = weights.read_bytes()
    with pytest.raises(Exception) as raised:
        evaluate_bundle(BRATS_3_TO_1, tmp_path, overrides(GLI, cache))
    assert str(cause(raised.value)) == (
        f"{weights}: does not fit AGINet of this config: 1 tensor(s) of another shape (e.g. head.weight "
        f"(8, 2, 3, 3) in the file, (8, 3, 3, 3) here) {EXPECTED_WEIGHTS}"
    )
    assert weights.read_bytes() == before and not list((tmp_path / "eval").glob("metrics_*"))


def test_evaluate_with_an_empty_test_split(trained, cases, cache, tmp_path):
    # before: "the dataset holds no case to evaluate (is the split empty?)", naming no file
    copy_run(trained, tmp_path)
    datalist = write_datalist(tmp_path / "datalist.json", training=[cases["good"]], validation=[cases["good"]], test=[])
    with pytest.raises(Exception) as raised:
        evaluate_bundle(IXI, tmp_path, overrides(datalist, cache))
    assert str(cause(raised.value)) == (
        f"{datalist}: no case of the 'test' split has T1, T2, PD (expected at least one case with each of T1, T2, PD)"
    )
    assert not (tmp_path / "eval").exists()
