"""Bad input through the ``agi-monai`` CLI and the bundle inference (issue #7 item 5).

One folder holds two good cases and many bad ones (NIfTI and DICOM), made from a shipped BraTS case cut to 64x64x12
voxels; one CLI run (``python -m agi_monai synthesize``) and one bundle run (``python -m monai.bundle run
--config_file <bundle>/configs/inference.json``) go over it. For each bad case the tests check the reason printed
(which file, what is wrong, what was expected), and for the run as a whole that the good cases were written, that
no other file (no partial or temporary output) is in the output folder, and that the inputs are byte-identical.
Argument errors (exit status 2, nothing written) are checked in-process or in small runs of their own.
The bundle is a copy of ``brats_t1_t2_to_flair`` with an untrained narrow generator (``channels=[8,8,8,8]``, 64x64
slices), so that each run takes seconds.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from agi_monai.cli import main
from agi_monai.data import synthetic_description, write_dicom_series
from agi_monai.networks import AGINet
from helpers import DATA, REPO, SUBPROCESS_ENV, load_script

GLI = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"
WIDTHS = "[8,8,8,8]"
FAST = ["--network_def#channels", WIDTHS, "--spatial_size", "[64,64]"]
CROP = (slice(88, 152), slice(88, 152), slice(70, 82))  # 64 x 64 x 12 voxels through the tumour
GOOD = ("good-a", "good-b")


# ------------------------------------------------------------------------------------------------- inputs


def volume(contrast: str) -> nib.Nifti1Image:
    """The shipped case's ``contrast`` (t1n, t2w, t2f, t1c) cut to :data:`CROP` (float32, affine kept)."""
    image = nib.load(GLI / f"BraTS-GLI-00001-000-{contrast}.nii.gz").slicer[CROP]
    return nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine)


def save_case(folder: Path, case: str, images: dict[str, nib.Nifti1Image]) -> None:
    (folder / case).mkdir(parents=True, exist_ok=True)
    for suffix, image in images.items():
        nib.save(image, folder / case / f"{case}-{suffix}.nii.gz")


def dicom_series(folder: Path, image: nib.Nifti1Image, description: str, patient: str, number: int, study: str) -> list[Path]:
    with tempfile.TemporaryDirectory() as scratch:  # through a NIfTI file: SimpleITK's geometry is nibabel's
        nib.save(image, Path(scratch) / "volume.nii.gz")
        return write_dicom_series(sitk.ReadImage(str(Path(scratch) / "volume.nii.gz")), folder, description, patient,
                                  number, study_uid=study)


def build_cases(folder: Path) -> None:
    """Two good cases and the bad ones, each named after what is wrong with it (see :data:`EXPECTED`)."""
    t1, t2 = volume("t1n"), volume("t2w")
    for case in GOOD:
        save_case(folder, case, {"t1n": t1, "t2w": t2})
    save_case(folder, "missing-t2", {"t1n": t1})
    shifted = nib.Nifti1Image(np.asarray(t1.dataobj)[:, :, :10], t1.affine @ _translation(300.0))
    save_case(folder, "far-apart", {"t1n": shifted, "t2w": t2})  # another shape, and a header 300 mm away
    with_nan = np.asarray(t1.dataobj).copy()
    with_nan[10:12, 10:12, 3] = np.nan
    save_case(folder, "nan", {"t1n": nib.Nifti1Image(with_nan, t1.affine), "t2w": t2})
    with_inf = np.asarray(t2.dataobj).copy()
    with_inf[5, 5, 5] = np.inf
    save_case(folder, "inf", {"t1n": t1, "t2w": nib.Nifti1Image(with_inf, t2.affine)})
    save_case(folder, "constant", {"t1n": t1, "t2w": nib.Nifti1Image(np.full(t2.shape, 7.0, np.float32), t2.affine)})
    save_case(folder, "flat-2d", {"t1n": nib.Nifti1Image(np.asarray(t1.dataobj)[:, :, 5], t1.affine), "t2w": t2})
    four_d = np.stack([np.asarray(t1.dataobj)] * 3, axis=-1)
    save_case(folder, "four-d", {"t1n": nib.Nifti1Image(four_d, t1.affine), "t2w": t2})
    save_case(folder, "empty-file", {"t2w": t2})
    (folder / "empty-file" / "empty-file-t1n.nii.gz").write_bytes(b"")
    save_case(folder, "truncated", {"t1n": t1, "t2w": t2})
    whole = (folder / "truncated" / "truncated-t1n.nii.gz").read_bytes()
    (folder / "truncated" / "truncated-t1n.nii.gz").write_bytes(whole[: len(whole) // 2])
    save_case(folder, "text-file", {"t2w": t2})
    (folder / "text-file" / "text-file-t1n.nii.gz").write_text("patient notes, not an image\n")
    save_case(folder, "not-gzip", {"t2w": t2})  # a NIfTI named .nii.gz without being compressed
    (folder / "not-gzip" / "not-gzip-t1n.nii.gz").write_bytes(gzip.decompress((folder / GOOD[0] / f"{GOOD[0]}-t1n.nii.gz").read_bytes()))
    save_case(folder, "duplicate", {"t1n": t1, "t2w": t2})
    save_case(folder / "copy", "duplicate", {"t1n": t1})  # the same case ID again, in another folder
    save_case(folder, "negative", {"t1n": t1, "t2w": nib.Nifti1Image(-np.abs(np.asarray(t2.dataobj)) - 1, t2.affine)})

    # DICOM studies (cases named after the PatientID)
    dicom = folder / "dicom"
    unreadable = dicom / "dicom-unreadable"
    dicom_series(unreadable, t2, "AX T2 FSE", "dicom-unreadable", 2, "1.2.826.0.1.3680043.8.498.11")
    files = dicom_series(unreadable, t1, "AX T1 SE", "dicom-unreadable", 3, "1.2.826.0.1.3680043.8.498.11")
    files[4].write_bytes(files[4].read_bytes()[:1500])  # one slice cut inside its pixel data
    two_t2 = dicom / "dicom-two-t2"
    dicom_series(two_t2, t2, "AX T2 FSE", "dicom-two-t2", 2, "1.2.826.0.1.3680043.8.498.12")
    dicom_series(two_t2, t2, "T2 TSE repeat", "dicom-two-t2", 4, "1.2.826.0.1.3680043.8.498.12")
    dicom_series(two_t2, t1, "AX T1 SE", "dicom-two-t2", 3, "1.2.826.0.1.3680043.8.498.12")
    mixed = dicom / "dicom-mixed-subject"  # one T2 series whose slices carry two patients' IDs
    dicom_series(mixed, t1, "AX T1 SE", "dicom-mixed-subject", 3, "1.2.826.0.1.3680043.8.498.13")
    for path in dicom_series(mixed, t2, "AX T2 FSE", "dicom-mixed-subject", 2, "1.2.826.0.1.3680043.8.498.13")[6:]:
        header = pydicom.dcmread(path)
        header.PatientID = "SOMEONE-ELSE"
        header.save_as(path)
    single = dicom / "dicom-one-slice"
    dicom_series(single, t2, "AX T2 FSE", "dicom-one-slice", 2, "1.2.826.0.1.3680043.8.498.14")
    one_slice = nib.Nifti1Image(np.asarray(t1.dataobj)[:, :, 5:6], t1.affine)
    dicom_series(single, one_slice, "AX T1 SE", "dicom-one-slice", 3, "1.2.826.0.1.3680043.8.498.14")


def _translation(mm: float) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = mm
    return shift


#: Each bad case of the batch and the reason the runs must print for it (``{cases}``: the input folder); the CLI
#: prints ``  - <case>: <reason>``, and so does the bundle's FolderSynthesis.
EXPECTED = {
    "missing-t2": "missing T2 (found T1)",
    "far-apart": "{cases}/far-apart/far-apart-t1n.nii.gz: overlaps the reference field of view by only 0% (header geometry) "
                 "(expected contrasts of one subject overlapping by at least 25%)",
    "nan": "{cases}/nan/nan-t1n.nii.gz: contains 4 NaN/Inf voxels (expected finite intensities)",
    "inf": "{cases}/inf/inf-t2w.nii.gz: contains 1 NaN/Inf voxels (expected finite intensities)",
    "constant": "{cases}/constant/constant-t2w.nii.gz: is constant (every voxel is 7) (expected an image with some contrast)",
    "flat-2d": "{cases}/flat-2d/flat-2d-t1n.nii.gz: has 2 dimensions, shape (64, 64) (expected a 3D volume)",
    "four-d": "{cases}/four-d/four-d-t1n.nii.gz: has 4 dimensions, shape (64, 64, 12, 3) (expected a 3D volume)",
    "empty-file": "{cases}/empty-file/empty-file-t1n.nii.gz: is empty (0 bytes) (expected a NIfTI-1/2 image)",
    "truncated": "{cases}/truncated/truncated-t1n.nii.gz: is truncated or its compressed data is corrupt (Compressed file "
                 "ended before the end-of-stream marker was reached) (expected a complete file)",
    "text-file": "{cases}/text-file/text-file-t1n.nii.gz: is not a NIfTI file (File {cases}/text-file/text-file-t1n.nii.gz "
                 "is not a gzip file) (expected a NIfTI-1/2 image)",
    "not-gzip": "{cases}/not-gzip/not-gzip-t1n.nii.gz: is an uncompressed NIfTI file named .nii.gz (expected "
                "gzip-compressed data, or the name .nii)",
    "duplicate": "duplicate case ID, several files for one contrast: T1 in {cases}/copy/duplicate/duplicate-t1n.nii.gz, "
                 "{cases}/duplicate/duplicate-t1n.nii.gz",
    "negative": "{cases}/negative/negative-t2w.nii.gz: has its 99.5th intensity percentile at -175 (expected a positive "
                "upper percentile (an MR magnitude image))",
    # the truncated slice is 003_0005.dcm: GDCM leaves it out of the series; its neighbours and it are named
    "dicom-unreadable": "{cases}/dicom/dicom-unreadable: has a gap of 2 mm between 003_0004.dcm and 003_0006.dcm, two of "
                        "the 11 readable slices of its series 'AX T1 SE', where the others are 1 mm apart (a slice "
                        "between them is missing or could not be read; unread file(s) of this series in its folder: "
                        "003_0005.dcm) (expected a complete series)",
    "dicom-two-t2": "{cases}/dicom/dicom-two-t2: several series match one contrast (T2: 'AX T2 FSE' (series 2, "
                    "{cases}/dicom/dicom-two-t2), 'T2 TSE repeat' (series 4, {cases}/dicom/dicom-two-t2)) (expected an "
                    "explicit mapping)",
    "dicom-mixed-subject": "{cases}/dicom/dicom-mixed-subject: mixes slices of several patients (PatientID SOMEONE-ELSE, "
                           "dicom-mixed-subject) (expected one series of one patient)",
    "dicom-one-slice": "{cases}/dicom/dicom-one-slice/003_0001.dcm: is a single 2D slice, size (64, 64, 1) (expected a 3D "
                       "DICOM series)",
}


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_bundle(folder: Path, name: str, in_channels: int, source: str | None = None) -> Path:
    """A copy of repository bundle ``source`` (default ``name``) with a freshly initialised narrow generator."""
    root = folder / name
    shutil.copytree(REPO / "bundles" / (source or name), root, ignore=shutil.ignore_patterns("models", "eval"))
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(AGINet(in_channels=in_channels, channels=[8, 8, 8, 8]).state_dict(), root / "models" / "model.pt")
    return root


def run(*args: object, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=SUBPROCESS_ENV)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bundles")
    make_bundle(folder, "brats_t1_t2_to_flair", 2)
    make_bundle(folder, "brats_t1_t2_flair_to_t1gd", 3)
    corrupt = make_bundle(folder, "corrupt", 2, "brats_t1_t2_to_flair")
    whole = (corrupt / "models" / "model.pt").read_bytes()
    (corrupt / "models" / "model.pt").write_bytes(whole[: len(whole) // 3])  # an interrupted copy
    other = make_bundle(folder, "other-scenario", 2, "brats_t1_t2_to_flair")
    shutil.copy(folder / "brats_t1_t2_flair_to_t1gd" / "models" / "model.pt", other / "models" / "model.pt")  # 3 inputs
    checkpoint = make_bundle(folder, "checkpoint", 2, "brats_t1_t2_to_flair")  # a training checkpoint put as model.pt
    weights = torch.load(checkpoint / "models" / "model.pt", weights_only=True)
    torch.save({"generator": weights, "trainer": {"epoch": 1}}, checkpoint / "models" / "model.pt")
    return folder


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cases")
    build_cases(folder)
    return folder


#: an earlier run's output (marked synthetic, as every synthesis writes it: a file that is not is never replaced)
EARLIER_RESULT = nib.Nifti1Image(np.arange(8, dtype=np.float32).reshape(2, 2, 2), np.eye(4))
EARLIER_RESULT.header["descrip"] = synthetic_description("FLAIR", ["T1", "T2"], "brats_t1_t2_to_flair")


@pytest.fixture(scope="module")
def cli_run(bundles, cases, tmp_path_factory):
    """``python -m agi_monai synthesize`` over the batch; good-b's output exists already (and must stay)."""
    output = tmp_path_factory.mktemp("cli_out")
    nib.save(EARLIER_RESULT, output / "good-b_FLAIR.nii.gz")
    before = digest(cases)
    result = run("-m", "agi_monai", "synthesize", cases, "--bundle", bundles / "brats_t1_t2_to_flair", "--output_dir",
                 output, *FAST, "--progress", "False")
    return result, output, before, digest(cases)


@pytest.fixture(scope="module")
def bundle_run(bundles, cases, tmp_path_factory):
    """The bundle's own inference (``python -m monai.bundle run``) over the batch."""
    output = tmp_path_factory.mktemp("bundle_out")
    bundle = bundles / "brats_t1_t2_to_flair"
    before = digest(cases)
    result = run("-m", "monai.bundle", "run", "--config_file", bundle / "configs" / "inference.json", "--bundle_root",
                 bundle, "--dataset_dir", cases, "--output_dir", output, *FAST)
    return result, output, before, digest(cases)


# ---------------------------------------------------------------------------------------------- the batch


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_cli_names_each_bad_case(cli_run, cases, case):
    result = cli_run[0]
    assert f"  - {case}: {EXPECTED[case].format(cases=cases)}" in result.stdout.splitlines(), result.stdout[-4000:]


def test_cli_keeps_an_existing_output(cli_run):
    # before: reported as a failed case ("output already exists ... pass --overwrite"), so that a rerun over a
    # folder to finish it failed on every case done by the first run
    result, output = cli_run[:2]
    existing = output / "good-b_FLAIR.nii.gz"
    assert "good-b" not in result.stdout.split("failed: ")[-1]
    assert "1 already present (skipped; --overwrite replaces them)" in result.stdout.strip().splitlines()[-1]
    assert np.asarray(nib.load(existing).dataobj).tolist() == EARLIER_RESULT.get_fdata().tolist()


def test_cli_batch_writes_the_good_case_only_and_leaves_the_inputs(cli_run, cases):
    result, output, before, after = cli_run
    assert result.returncode == 1, result.stderr[-3000:]
    assert sorted(p.name for p in output.iterdir()) == ["good-a_FLAIR.nii.gz", "good-b_FLAIR.nii.gz"]  # nothing partial
    _assert_synthesized(output / "good-a_FLAIR.nii.gz", cases / "good-a" / "good-a-t2w.nii.gz")
    failed = sorted(EXPECTED)
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"agi-monai synthesize: 1 of {len(failed) + 2} cases written (FLAIR, NIfTI) to {output}")
    assert sorted(last.split("failed: ")[1].split(", ")) == failed
    assert after == before  # inputs byte-identical


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bundle_inference_names_each_bad_case(bundle_run, cases, case):
    result = bundle_run[0]
    assert f"  - {case}: {EXPECTED[case].format(cases=cases)}" in result.stdout.splitlines(), result.stdout[-4000:]


def test_bundle_inference_batch_writes_the_good_cases_only_and_leaves_the_inputs(bundle_run, cases):
    result, output, before, after = bundle_run
    # every case is reported and the good ones written; the exit status tells a scheduler that some failed
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    assert "Traceback" not in result.stderr
    assert f"synthesized 2 of {len(EXPECTED) + 2} cases into {output}, {len(EXPECTED)} failed" in result.stdout
    assert sorted(p.name for p in output.iterdir()) == ["good-a_FLAIR.nii.gz", "good-b_FLAIR.nii.gz"]
    for case in GOOD:
        _assert_synthesized(output / f"{case}_FLAIR.nii.gz", cases / case / f"{case}-t2w.nii.gz")
    assert after == before


# ---------------------------------------------------------------------------------- run-level errors


def test_output_folder_equal_to_the_input_folder_is_refused(bundles, cases):
    before = digest(cases)
    result = run("-m", "agi_monai", "synthesize", cases / "good-a", "--bundle", bundles / "brats_t1_t2_to_flair",
                 "--output_dir", cases / "good-a", *FAST, "--progress", "False")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: {cases / 'good-a'}: is the input folder or inside it ({cases / 'good-a'})" in result.stderr
    assert digest(cases) == before


def test_read_only_output_folder(bundles, cases, tmp_path):
    output = tmp_path / "read-only"
    output.mkdir()
    output.chmod(0o555)
    try:
        probe = output / "probe"
        try:
            probe.write_bytes(b"")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("running as root (or on a file system that ignores modes): chmod 555 does not stop writes")
        result = run("-m", "agi_monai", "synthesize", cases / "good-a", "--bundle", bundles / "brats_t1_t2_to_flair",
                     "--output_dir", output, *FAST, "--progress", "False")
        assert result.returncode == 2, result.stderr[-3000:]  # before any case: inference.json's initialize
        assert result.stderr.strip().splitlines()[-1] == (
            f"agi-monai synthesize: error: {output}: cannot be written (Permission denied) (expected a folder this "
            "user can create and write files in)"
        )
        assert list(output.iterdir()) == []
    finally:
        output.chmod(0o755)


def test_bundle_whose_inputs_the_case_lacks(bundles, cases, tmp_path):
    result = run("-m", "agi_monai", "synthesize", cases / "good-a", "--bundle", bundles / "brats_t1_t2_flair_to_t1gd",
                 "--output_dir", tmp_path / "out", *FAST, "--progress", "False")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "  - good-a: missing FLAIR (found T1, T2)" in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"agi-monai synthesize: 0 of 1 cases written \(T1Gd, NIfTI\) to {re.escape(str(tmp_path / 'out'))} "
                        r"by brats_t1_t2_flair_to_t1gd in \d+\.\d s; 1 failed: good-a", last), last
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "bundle, message",
    [
        ("corrupt", "{weights}: cannot be read by torch.load: truncated, or not a PyTorch file (OSError: [Errno 22] "
                    "Invalid argument) (expected the weights bundle corrupt's train.json writes (models/model.pt) in a "
                    "run with the network_def overrides given here (--network_def#... flags: "
                    "network_def#channels=[8, 8, 8, 8]))"),
        ("other-scenario", "{weights}: does not fit AGINet of this config: 1 tensor(s) of another shape (e.g. "
                           "head.weight (8, 3, 3, 3) in the file, (8, 2, 3, 3) here) (expected the weights bundle "
                           "other-scenario's train.json writes (models/model.pt) in a run with the network_def "
                           "overrides given here (--network_def#... flags: network_def#channels=[8, 8, 8, 8]))"),
        ("checkpoint", "{weights}: holds a checkpoint of generator, trainer, not one network's state dict (expected "
                       "the weights bundle checkpoint's train.json writes (models/model.pt) in a run with the "
                       "network_def overrides given here (--network_def#... flags: network_def#channels=[8, 8, 8, 8]))"),
    ],
)
def test_weights_that_do_not_load_are_named(bundles, cases, tmp_path, bundle, message):
    weights = bundles / bundle / "models" / "model.pt"
    before = weights.read_bytes()
    result = run("-m", "agi_monai", "synthesize", cases / "good-a", "--bundle", bundles / bundle, "--output_dir",
                 tmp_path / "out", *FAST, "--progress", "False")
    assert result.returncode == 2, result.stdout[-3000:]
    assert f"agi-monai synthesize: error: {message.format(weights=weights)}" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    assert weights.read_bytes() == before


def test_export_names_weights_that_do_not_fit(bundles, tmp_path, capsys):
    # before: MONAI's ckpt_export raised torch's traceback listing every tensor, exit 1
    weights = bundles / "other-scenario" / "models" / "model.pt"
    status = main(["export", str(bundles / "other-scenario"), "--filepath", str(tmp_path / "x.ts"),
                   "--network_def#channels", WIDTHS])
    error = capsys.readouterr().err
    assert status == 2 and "Traceback" not in error
    assert (f"agi-monai export: error: {weights}: does not fit AGINet of this config: 1 tensor(s) of another shape "
            "(e.g. head.weight (8, 3, 3, 3) in the file, (8, 2, 3, 3) here) (expected the weights bundle "
            "other-scenario's train.json writes (models/model.pt)") in error
    assert list(tmp_path.iterdir()) == []


def test_network_override_the_bundle_cannot_build_is_named(bundles, cases, tmp_path, capsys):
    # before: reported as the weights' fault ("cannot be loaded into bundle ...'s network")
    status = main(["synthesize", str(cases / "good-a"), "--bundle", str(bundles / "brats_t1_t2_to_flair"),
                   "--output_dir", str(tmp_path / "out"), "--network_def#channels", "[8]"])
    error = capsys.readouterr().err
    assert status == 2 and "Traceback" not in error
    assert ("agi-monai synthesize: error: bundle brats_t1_t2_to_flair: its configs cannot be initialised with these "
            "options (ValueError: ResUNet: channels must give 4 positive widths, got (8,))") in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "files, message",
    [
        (["BraTS-X-t1n", "BraTS-X-t2w", "BraTS-X-t2f", "BraTS-X-t1c"],
         "nothing to synthesize: the case has T1, T2, FLAIR, T1Gd; name --bundle or --target"),
        (["IXI001-HH-0001-T1", "IXI001-HH-0001-T2", "IXI001-HH-0001-PD"],
         "nothing to synthesize: the case has T1, T2, PD; name --bundle or --target"),
    ],
)
def test_automatic_bundle_choice_stays_within_the_dataset(files, message, tmp_path, capsys, monkeypatch):
    """A complete BraTS case once got ixi_t1_t2_to_pd (PD being the one contrast it lacks)."""
    monkeypatch.delenv("AGI_MONAI_BUNDLES", raising=False)  # the repository's ten scenarios
    image = volume("t1n")
    for name in files:
        nib.save(image, tmp_path / f"{name}.nii.gz")
    status = main(["synthesize", str(tmp_path), "--output_dir", str(tmp_path.parent / f"{tmp_path.name}-out")])
    error = capsys.readouterr().err
    assert status == 2 and f"agi-monai synthesize: error: {message}" in error, error
    assert not (tmp_path.parent / f"{tmp_path.name}-out").exists()


def test_automatic_choice_picks_the_datasets_own_missing_contrast(monkeypatch):
    from agi_monai.bundle.registry import choose_bundle, find_bundle

    monkeypatch.delenv("AGI_MONAI_BUNDLES", raising=False)
    # not ixi_t1_t2_to_pd, nor the 3D bundle of the same scenario (chosen by name only)
    assert find_bundle("brats_t1_t2_flair_to_t1gd_3d").spatial_dims == 3
    assert choose_bundle(["T1", "T2", "FLAIR"]).name == "brats_t1_t2_flair_to_t1gd"
    assert choose_bundle(["T2", "PD"]).name == "ixi_t2_pd_to_t1"
    assert choose_bundle(["T1", "T2", "PD"], target="FLAIR").name == "brats_t1_t2_to_flair"  # a named target is obeyed


def test_an_input_folder_without_cases(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no images here\n")
    status = main(["synthesize", str(tmp_path), "--output_dir", str(tmp_path.parent / f"{tmp_path.name}-out"),
                   "--target", "FLAIR"])
    error = capsys.readouterr().err
    assert status == 2
    assert f"input {tmp_path}: no cases found (0 cases found, 0 skipped); expected NIfTI files named like" in error


def _assert_synthesized(output: Path, reference: Path) -> None:
    written, expected = nib.load(output), nib.load(reference)
    assert written.shape == expected.shape
    np.testing.assert_allclose(written.affine, expected.affine, atol=1e-4)
    values = np.asarray(written.dataobj)
    assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0 and values.std() > 0


# ------------------------------------------------------------------------------------------------- benchmark scripts


@pytest.mark.parametrize("name, args, message", [
    ("benchmark_op.py", ["--shapes", "9"], "--shapes 9: expected comma-separated indices from 0 to 4"),
    ("benchmark_op.py", ["--repeats", "0"], "--repeats 0: expected a whole number >= 1"),
    ("benchmark_op.py", ["--dtype", "int8"], "--dtype int8: expected one of float32, float64, float16, bfloat16"),
    ("benchmark_op.py", ["--device", "tpu"], "--device tpu: expected cpu, cuda or all"),
    ("benchmark_op.py", ["--out", "x.txt"], "--out x.txt: expected a file name ending in .json or .md"),
    ("benchmark_op.py", ["--cpu_paths", "fastest"], "--cpu_paths fastest: unknown fastest; expected some of avx512"),
    ("benchmark_network.py", ["--amp", "bfloat16"], "--amp bfloat16: expected bf16 or fp16"),
    ("benchmark_network.py", ["--size", "60"], "--size 60: expected a multiple of 8"),
    ("benchmark_network.py", ["--batch", "0"], "--batch 0: expected a whole number >= 1"),
])
def test_benchmark_scripts_refuse_a_bad_argument_in_one_line_before_timing_anything(
    name, args, message, monkeypatch, capsys
):
    from agi_monai.cli import run_script

    module = load_script(name)
    monkeypatch.setattr(module, "timed_interleaved" if name == "benchmark_network.py" else "bench_shape",
                        lambda *a, **k: pytest.fail("timed before refusing the argument"))
    monkeypatch.setattr(sys, "argv", [name, *args])
    with pytest.raises(SystemExit) as exited:
        run_script(module.main, name)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"{name}: error: {message}") and captured.err.count("\n") == 1, captured.err
    assert not captured.out


def test_benchmark_scripts_run_at_a_tiny_size(tmp_path):
    # the benchmarks' own figures are in docs/benchmarks.md; this only shows both scripts run end to end
    env = {**SUBPROCESS_ENV, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_op.py"), "--shapes", "3", "--warmup", "0", "--repeats", "1", "--threads", "1",
         "--out", str(tmp_path / "op.json")], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "op.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["CAGR 256→256 3×3, B=1, n=8"] and rows[0]["fwd_compiled_ms"] > 0
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_network.py"), "--batch", "1", "--size", "16", "--warmup", "0",
         "--repeats", "1", "--compare_fold", "False", "--threads", "1", "--amp", "bf16"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AMP bf16" in result.stdout and "AGI-Net / ResUNet train step on cpu:" in result.stdout
