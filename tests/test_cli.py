"""The ``agi-monai`` command line (issue #7), run as a user runs it: ``.venv/bin/agi-monai`` and
``python -m agi_monai`` in subprocesses, on shipped real cases cut to 40 axial slices, with a copy of a bundle
holding a freshly initialised narrow generator (``--network_def#channels=[8,8,8,8]``; 8 is CAGR's group count,
so every width must be a multiple of it) and 64x64 slices, so that each run takes seconds.

Argument errors that are raised before any bundle config is run are checked in-process through ``main()``
(which returns the exit status); everything that runs a MONAI workflow runs in a subprocess, because a
workflow applies the bundle's logging configuration to its process.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.inferers import SliceInferer

from agi_monai.cli import main
from agi_monai.data import parse_filename, synthetic_description, write_dicom_series
from agi_monai.evaluation import evaluate_volume, volume_dataset
from agi_monai.evaluation.tables import CASES_CSV, SUMMARY_JSON, SUMMARY_MD, read_csv
from agi_monai.networks import AGINet
from agi_monai.ops import extension_available
from helpers import DATA, REPO, SUBPROCESS_ENV, load_script

GLI = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"
AURORA = DATA / "brats2023-mets" / "aurora-example"
NATIVE = DATA / "tcga-lgg" / "TCGA-FG-6692-native"
SCRIPT = Path(sys.executable).parent / "agi-monai"
WIDTHS = [8, 8, 8, 8]
FAST = ["--network_def#channels", str(WIDTHS).replace(" ", ""), "--spatial_size", "[64,64]", "--progress", "False"]
SLICES = slice(60, 100)  # 40 axial slices through the tumour


def run_cli(*args: str, module: bool = False, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``agi-monai ARGS`` (the console script) or ``python -m agi_monai ARGS``."""
    command = [sys.executable, "-m", "agi_monai"] if module else [str(SCRIPT)]
    return subprocess.run(
        [*command, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env=env or SUBPROCESS_ENV,
    )


def crop(source: Path, destination: Path) -> Path:
    """The shipped volume cut to :data:`SLICES` (nibabel's slicer keeps the affine right)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.load(source).slicer[:, :, SLICES], destination)
    return destination


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_bundle(folder: Path, name: str, in_channels: int) -> Path:
    """A copy of a repository bundle whose models/model.pt is a freshly initialised narrow generator."""
    root = folder / name
    shutil.copytree(REPO / "bundles" / name, root, ignore=shutil.ignore_patterns("models", "eval"))
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(AGINet(in_channels=in_channels, channels=WIDTHS).state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    """A bundles folder with two scenarios that both read (T1, T2): -> FLAIR (BraTS) and -> PD (IXI)."""
    folder = tmp_path_factory.mktemp("bundles")
    make_bundle(folder, "brats_t1_t2_to_flair", 2)
    make_bundle(folder, "ixi_t1_t2_to_pd", 2)
    return folder


@pytest.fixture(scope="module")
def flair_bundle(bundles) -> Path:
    return bundles / "brats_t1_t2_to_flair"


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Two real cases with T1 and T2: BraTS-GLI (LPS header, prefixed names) and aurora (RAS header, bare names)."""
    folder = tmp_path_factory.mktemp("cases")
    for name in ("t1n", "t2w"):
        crop(GLI / f"BraTS-GLI-00001-000-{name}.nii.gz", folder / GLI.name / f"BraTS-GLI-00001-000-{name}.nii.gz")
    for name in ("t1", "t2"):
        crop(AURORA / f"{name}.nii.gz", folder / AURORA.name / f"{name}.nii.gz")
    return folder


def reference_of(output: Path, cases: Path) -> Path:
    """The input whose grid a (T1, T2) -> FLAIR output is on: the case's T2."""
    case_id = output.name.removesuffix("_FLAIR.nii.gz")
    return next((cases / case_id).glob("*t2*.nii.gz"))


def assert_on_input_grid(output: Path, reference: Path) -> None:
    written, expected = nib.load(output), nib.load(reference)
    assert written.shape == expected.shape
    np.testing.assert_allclose(written.affine, expected.affine, atol=1e-4)
    values = np.asarray(written.dataobj)
    assert values.dtype == np.float32 and values.min() >= 0.0 and values.max() <= 1.0 and values.std() > 0.0


def with_other_weights(bundle: Path, folder: Path, seed: int = 1) -> Path:
    """A copy of ``bundle`` (same name) whose generator is initialised from ``seed``: not the bundles'
    set_determinism(seed=0), so that a run ignoring the checkpoint gives other numbers."""
    copy = folder / bundle.name
    shutil.copytree(bundle, copy)
    torch.manual_seed(seed)
    torch.save(AGINet(in_channels=2, channels=WIDTHS).state_dict(), copy / "models" / "model.pt")
    return copy


def expected_flair(case: Path, bundle: Path, size: int = 64) -> np.ndarray:
    """The (T1, T2) -> FLAIR synthesis of a case whose contrasts share one grid, computed here with nibabel and
    the checkpoint: each contrast / its 99.5th percentile, clipped, in RAS; each whole axial slice, zero-padded
    (centred) to at least size x size and to a multiple of 8, through the generator, clamped to [0, 1], the
    padding cut off again; in RAS, to compare with ``nib.as_closest_canonical`` of the written file."""
    planes = []
    for pattern in ("*t1*.nii.gz", "*t2*.nii.gz"):
        raw = np.asarray(nib.as_closest_canonical(nib.load(next(case.glob(pattern)))).get_fdata(dtype=np.float32))
        planes.append(np.clip(raw / np.percentile(raw, 99.5), 0, 1))
    image = np.stack(planes)
    padded_size = [-(-max(n, size) // 8) * 8 for n in image.shape[1:3]]
    before = [(p - n) // 2 for p, n in zip(padded_size, image.shape[1:3])]
    padded = np.pad(image, [(0, 0), *((b, p - n - b) for b, p, n in zip(before, padded_size, image.shape[1:3])), (0, 0)])
    network = AGINet(in_channels=2, channels=WIDTHS).eval()
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    with torch.no_grad():  # the axial slices as one batch
        synthesized = network(torch.from_numpy(np.ascontiguousarray(padded)).permute(3, 0, 1, 2))
    synthesized = synthesized[:, 0].clamp(0, 1).permute(1, 2, 0).numpy()
    return synthesized[before[0] : before[0] + image.shape[1], before[1] : before[1] + image.shape[2]]


# ------------------------------------------------------------------------------------------------ synthesize


def test_synthesize_folder_writes_each_case_on_its_input_grid(flair_bundle, cases, tmp_path):
    before = digest(cases)
    flair_bundle = with_other_weights(flair_bundle, tmp_path / "bundles")
    result = run_cli("synthesize", cases, "--bundle", flair_bundle, "--output_dir", tmp_path / "out", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in outputs] == ["BraTS-GLI-00001-000_FLAIR.nii.gz", "aurora-example_FLAIR.nii.gz"]
    for output in outputs:
        assert_on_input_grid(output, reference_of(output, cases))
        # voxel for voxel the checkpoint's synthesis (an LPS and a RAS header: compared in RAS)
        written = np.asarray(nib.as_closest_canonical(nib.load(output)).dataobj)
        case = reference_of(output, cases).parent
        np.testing.assert_allclose(written, expected_flair(case, flair_bundle), atol=1e-5)
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"agi-monai synthesize: 2 of 2 cases written \(FLAIR, NIfTI\) to {re.escape(str(tmp_path / 'out'))} "
        r"by brats_t1_t2_to_flair in \d+\.\d s; 0 failed",
        last,
    ), last
    assert digest(cases) == before  # inputs untouched


def test_a_bids_dataset_is_synthesized_into_its_derivatives(flair_bundle, cases, tmp_path, capsys):
    # the session's T1w and T2w are one case (before: acq-/run- entities split them), the output goes where BIDS
    # puts outputs (before: refused as inside the input), and a rerun finds it there and reads no output as an input
    bids = tmp_path / "bids"
    anat = bids / "sub-01" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "two contrasts", "BIDSVersion": "1.9.0"}')
    shutil.copy(cases / GLI.name / "BraTS-GLI-00001-000-t1n.nii.gz", anat / "sub-01_ses-1_acq-mprage_T1w.nii.gz")
    shutil.copy(cases / GLI.name / "BraTS-GLI-00001-000-t2w.nii.gz", anat / "sub-01_ses-1_acq-tse_run-1_T2w.nii.gz")
    output = bids / "derivatives" / "agi-monai"
    args = ["synthesize", str(bids), "--target", "FLAIR", "--output_dir", str(output), "--bundle", str(flair_bundle),
            "--dicom", "--report", str(output / "report.json"), *FAST]
    assert main(args) == 0
    # a BIDS derivative (before: flat sub-01_ses-1_FLAIR.nii.gz and no dataset_description.json): the synthesis in
    # the session's anat/ folder under a BIDS name, its DICOM series beside it (left out by .bidsignore)
    synthesized = output / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-synthetic_FLAIR.nii.gz"
    series = synthesized.with_name("sub-01_ses-1_desc-synthetic_FLAIR_dicom")
    files = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.parent != series)
    assert files == [".bidsignore", "dataset_description.json", "report.json", "sub-01", "sub-01/ses-1",
                     "sub-01/ses-1/anat", str(synthesized.relative_to(output)), str(series.relative_to(output))]
    assert_on_input_grid(synthesized, anat / "sub-01_ses-1_acq-tse_run-1_T2w.nii.gz")
    assert len(list(series.iterdir())) == nib.load(synthesized).shape[2]
    description = json.loads((output / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"] == "1.9.0"
    assert description["GeneratedBy"][0]["Name"] == "agi-monai"
    assert (output / ".bidsignore").read_text() == "*_dicom/\n"
    report = json.loads((output / "report.json").read_text())
    assert report["cases"] == [{"case_id": "sub-01_ses-1", "status": "written", "output": str(synthesized),
                                "dicom": str(series)}]
    assert parse_filename(synthesized.name) == ("sub-01_ses-1", "FLAIR")  # read back: the session's FLAIR
    capsys.readouterr()
    assert main(args) == 0
    assert "0 of 1 cases written (FLAIR, NIfTI + DICOM)" in capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.parametrize("unit", ["micron", "meter"])
def test_an_input_whose_header_is_not_in_mm_gets_an_output_on_its_physical_grid(flair_bundle, cases, tmp_path, unit):
    # before: the output took the input's affine numbers but was marked mm, so ITK tools (which read the input in mm)
    # put it on a grid a thousand times larger (micron) or smaller (metre) than the input's
    folder = tmp_path / "cases" / "u"
    folder.mkdir(parents=True)
    for name in ("t1n", "t2w"):
        image = nib.load(cases / GLI.name / f"BraTS-GLI-00001-000-{name}.nii.gz")
        scale = {"micron": 1000.0, "meter": 0.001}[unit]  # the same 1 mm grid, written in that unit
        zoom = np.diag([scale, scale, scale, 1.0])
        converted = nib.Nifti1Image(np.asarray(image.dataobj), zoom @ image.affine)
        converted.header.set_xyzt_units(unit, "sec")
        nib.save(converted, folder / f"u-{name}.nii.gz")
    assert main(["synthesize", str(tmp_path / "cases"), "--bundle", str(flair_bundle), "--output_dir",
                 str(tmp_path / "out"), *FAST]) == 0
    written = sitk.ReadImage(str(tmp_path / "out" / "u_FLAIR.nii.gz"))
    reference = sitk.ReadImage(str(folder / "u-t2w.nii.gz"))  # SimpleITK converts the header's unit to mm
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), [1.0, 1.0, 1.0], rtol=1e-5)  # the 1 mm grid it was


def test_a_failing_case_is_named_the_others_are_written_and_the_exit_status_is_1(flair_bundle, cases, tmp_path):
    folder = tmp_path / "cases"
    shutil.copytree(cases / GLI.name, folder / GLI.name)
    bad = folder / "BraTS-GLI-99999-000"
    bad.mkdir()
    shutil.copy(cases / GLI.name / "BraTS-GLI-00001-000-t2w.nii.gz", bad / "BraTS-GLI-99999-000-t2w.nii.gz")
    truncated = (cases / GLI.name / "BraTS-GLI-00001-000-t1n.nii.gz").read_bytes()[:5000]
    (bad / "BraTS-GLI-99999-000-t1n.nii.gz").write_bytes(truncated)
    result = run_cli("synthesize", folder, "--bundle", flair_bundle, "--output_dir", tmp_path / "out", *FAST,
                     "--report", tmp_path / "report.json", module=True)
    assert result.returncode == 1, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["BraTS-GLI-00001-000_FLAIR.nii.gz"]  # no partial file
    assert "BraTS-GLI-99999-000: " in result.stdout and "BraTS-GLI-99999-000-t1n.nii.gz" in result.stdout
    assert result.stdout.strip().splitlines()[-1].endswith("; 1 failed: BraTS-GLI-99999-000")
    assert "1 of 2 cases written" in result.stdout
    # and for a pipeline, --report: the same outcome as JSON
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bundle"] == "brats_t1_t2_to_flair" and report["target"] == "FLAIR"
    assert report["counts"] == {"cases": 2, "written": 1, "present": 0, "failed": 1}
    written, failed = report["cases"]
    assert written == {"case_id": "BraTS-GLI-00001-000", "status": "written",
                       "output": str(tmp_path / "out" / "BraTS-GLI-00001-000_FLAIR.nii.gz")}
    assert failed["case_id"] == "BraTS-GLI-99999-000" and failed["status"] == "failed"
    assert "BraTS-GLI-99999-000-t1n.nii.gz: is truncated" in failed["reason"]


def test_existing_output_needs_overwrite(flair_bundle, cases, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    existing = output / "aurora-example_FLAIR.nii.gz"
    # an earlier run's output (only a file marked synthetic counts as one; any other makes the case fail, tested
    # in test_an_output_never_replaces_an_input...), here one that no DICOM series can be made from: 4D
    earlier = nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4))
    earlier.header["descrip"] = synthetic_description("FLAIR", ["T1", "T2"], "brats_t1_t2_to_flair")
    nib.save(earlier, existing)
    an_earlier_result = existing.read_bytes()
    args = ["synthesize", cases / AURORA.name, "--bundle", flair_bundle, "--output_dir", output, *FAST]
    kept = run_cli(*args)
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert re.search(r"0 of 1 cases written \(FLAIR, NIfTI\) .* 1 already present \(skipped; --overwrite replaces "
                     r"them\), 0 failed$", kept.stdout.strip().splitlines()[-1]), kept.stdout[-2000:]
    assert existing.read_bytes() == an_earlier_result and sorted(output.iterdir()) == [existing]
    # a NIfTI without its DICOM series (a --dicom run stopped between the two) gets its series from that NIfTI;
    # none can be made from this one, so the case fails, naming why, and the earlier NIfTI is kept
    unreadable = run_cli(*args, "--dicom")
    assert unreadable.returncode == 1, unreadable.stderr[-3000:]
    assert re.search(r"^  - aurora-example: DICOM output: .*: the image to write has 4 dimensions \(expected a 3D volume\) "
                     r"\(the NIfTI aurora-example_FLAIR.nii.gz of an earlier run is kept\)$", unreadable.stdout,
                     re.MULTILINE), unreadable.stdout[-3000:]
    assert existing.read_bytes() == an_earlier_result and sorted(output.iterdir()) == [existing]
    replaced = run_cli(*args, "--overwrite", "--dicom")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert_on_input_grid(existing, cases / AURORA.name / "t2.nii.gz")
    series = output / "aurora-example_FLAIR_dicom"
    assert sorted(output.iterdir()) == [existing, series]  # no temporary file left
    # NIfTI input (a RAS header): the DICOM series is a new study of a patient marked synthetic, on the same grid
    assert str(pydicom.dcmread(next(series.iterdir())).PatientName) == "SYNTHETIC^aurora-example"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    from_dicom, from_nifti = (sitk.DICOMOrient(i, "LPS") for i in (reader.Execute(), sitk.ReadImage(str(existing))))
    assert from_dicom.GetSize() == from_nifti.GetSize()
    for getter in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(from_dicom, getter)(), getattr(from_nifti, getter)(), atol=1e-4)
    values = sitk.GetArrayFromImage(from_nifti)
    np.testing.assert_allclose(sitk.GetArrayFromImage(from_dicom), values, atol=(values.max() - values.min()) / 65535)
    # a rerun completes a case stopped between its NIfTI and its series, and leaves the NIfTI as it is
    nifti_bytes, series_files = existing.read_bytes(), sorted(p.name for p in series.iterdir())
    shutil.rmtree(series)
    completed = run_cli(*args, "--dicom")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert re.search(r"1 of 1 cases written \(FLAIR, NIfTI \+ DICOM\) .*; 0 failed$", completed.stdout.strip().splitlines()[-1])
    assert existing.read_bytes() == nifti_bytes and sorted(p.name for p in series.iterdir()) == series_files
    # the other half, a series without its NIfTI, is refused: synthesizing the NIfTI again would replace the series
    existing.unlink()
    refused = run_cli(*args, "--dicom")
    assert refused.returncode == 1
    assert (f"  - aurora-example: output already exists: {series} (without its NIfTI {existing.name}; pass "
            "--overwrite to replace it)") in refused.stdout.splitlines(), refused.stdout[-3000:]
    assert sorted(output.iterdir()) == [series]


def test_an_overwrite_never_leaves_a_nifti_beside_another_runs_series(flair_bundle, cases, tmp_path, monkeypatch,
                                                                       capsys):
    # before: --overwrite --dicom wrote every NIfTI first, then the series; a case whose new series failed lost its
    # new NIfTI and kept the earlier series alone, and a run stopped between the two steps left new NIfTIs beside
    # earlier series, which a rerun counted as complete
    import agi_monai.bundle.inference
    import agi_monai.data.dicom

    output = tmp_path / "out"
    nifti, series = output / "aurora-example_FLAIR.nii.gz", output / "aurora-example_FLAIR_dicom"
    args = ["synthesize", str(cases / AURORA.name), "--bundle", str(flair_bundle), "--output_dir", str(output), *FAST]
    assert main([*args, "--dicom"]) == 0
    earlier = digest(output)
    assert sorted(earlier) == [nifti.name, *(f"{series.name}/{f.name}" for f in sorted(series.iterdir()))]
    write_series = agi_monai.data.dicom.write_derived_series

    def failing(*args, **kwargs):
        raise agi_monai.data.DataError(kwargs.get("case_id", "?"), "cannot be written (No space left on device)")

    # the new series fails: the case keeps its earlier NIfTI and series, byte for byte
    monkeypatch.setattr(agi_monai.data.dicom, "write_derived_series", failing)
    capsys.readouterr()
    assert main([*args, "--dicom", "--overwrite"]) == 1
    assert ("  - aurora-example: DICOM output: aurora-example: cannot be written (No space left on device) (kept: the "
            "earlier run's NIfTI and DICOM series of this case)") in capsys.readouterr().out.splitlines()
    assert digest(output) == earlier  # and no temporary name left
    # the new NIfTI fails: the earlier series is put back beside the earlier NIfTI
    monkeypatch.setattr(agi_monai.bundle.inference.FolderSynthesis, "_synthesize", lambda self, index: 1 / 0)
    assert main([*args, "--dicom", "--overwrite"]) == 1
    assert digest(output) == earlier
    monkeypatch.undo()
    # stopped (Ctrl-C) after the new NIfTI and before its series: the earlier series is not left beside it, and a
    # rerun without --overwrite makes the series of the new NIfTI
    monkeypatch.setattr(agi_monai.data.dicom, "write_derived_series", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    inode = nifti.stat().st_ino
    assert main([*args, "--dicom", "--overwrite"]) == 130
    assert sorted(output.iterdir()) == [nifti] and nifti.stat().st_ino != inode
    monkeypatch.setattr(agi_monai.data.dicom, "write_derived_series", write_series)
    assert main([*args, "--dicom"]) == 0
    assert sorted(output.iterdir()) == [nifti, series] and len(list(series.iterdir())) == len(earlier) - 1
    report = tmp_path / "report.json"
    assert main([*args, "--dicom", "--report", str(report)]) == 0  # with --dicom, each case's series folder too
    assert json.loads(report.read_text())["cases"] == [{"case_id": "aurora-example", "status": "present",
                                                        "output": str(nifti), "dicom": str(series)}]
    # an overwrite without --dicom replaces the NIfTI and removes the series made from the one it replaced
    inode = nifti.stat().st_ino
    assert main([*args, "--overwrite"]) == 0
    assert sorted(output.iterdir()) == [nifti] and nifti.stat().st_ino != inode


def test_files_given_one_by_one_and_the_bundle_chosen_by_target(bundles, cases, tmp_path):
    env = {**SUBPROCESS_ENV, "AGI_MONAI_BUNDLES": str(bundles)}
    t1, t2 = cases / GLI.name / "BraTS-GLI-00001-000-t1n.nii.gz", cases / GLI.name / "BraTS-GLI-00001-000-t2w.nii.gz"
    ambiguous = run_cli("synthesize", "--t1", t1, "--t2", t2, "--output_dir", tmp_path / "out", *FAST, env=env)
    assert ambiguous.returncode == 2 and "Traceback" not in ambiguous.stderr
    assert (
        "agi-monai synthesize: error: the contrasts present (T1, T2) allow several targets: choose one with "
        "--target FLAIR (brats_t1_t2_to_flair); --target PD (ixi_t1_t2_to_pd)"
    ) in ambiguous.stderr
    assert not (tmp_path / "out").exists()
    chosen = run_cli("synthesize", "--t1", t1, "--t2", t2, "--target", "flair", "--output_dir", tmp_path / "out", *FAST,
                     env=env, module=True)
    assert chosen.returncode == 0, chosen.stderr[-3000:]
    assert "using bundle brats_t1_t2_to_flair (T1, T2 -> FLAIR); contrasts every case has: T1, T2" in chosen.stdout
    assert_on_input_grid(tmp_path / "out" / "BraTS-GLI-00001-000_FLAIR.nii.gz", t2)


def test_folder_and_id_arguments_stay_as_typed(flair_bundle, cases, tmp_path):
    # Fire reads every argument as a Python literal: before, the folder 2024_01 was the number 202401 ("does not
    # exist") and --output_dir 1_0 wrote into 10/
    from agi_monai.cli import _strings_as_typed, synthesize

    inputs = tmp_path / "2024_01"
    shutil.copytree(cases / AURORA.name, inputs / AURORA.name)
    result = run_cli("synthesize", inputs, "--bundle", flair_bundle, "--output_dir", tmp_path / "1_0", *FAST)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1_0", "2024_01"]
    assert [p.name for p in (tmp_path / "1_0").iterdir()] == ["aurora-example_FLAIR.nii.gz"]
    # string parameters quoted, by flag (both forms) or position; config overrides, numbers and Fire's own flags not
    assert _strings_as_typed(synthesize, [
        "2024_01", "--case_id=1e3", "--output_dir", "1_0", "--overwrite", "--network_def#channels", "[8,8,8,8]",
        "--batch_size", "4", "--", "--help",
    ]) == [
        "'2024_01'", "--case_id='1e3'", "--output_dir", "'1_0'", "--overwrite", "--network_def#channels", "[8,8,8,8]",
        "--batch_size", "4", "--", "--help",
    ]
    # a positional argument after its parameter was given as a flag fills the next one (Fire's rule)
    assert _strings_as_typed(synthesize, ["--input_dir", "a", "2024_01"]) == ["--input_dir", "'a'", "'2024_01'"]
    # the scripts (run_script): their annotations are strings; "str | Sequence[str]" (a list on the command line) is
    # left to Fire
    compare = load_script("compare.py").main
    assert _strings_as_typed(compare, ["--output_dir", "2024_01", "--iterations", "3", "--scenarios", "a,b"]) == [
        "--output_dir", "'2024_01'", "--iterations", "3", "--scenarios", "a,b",
    ]


def test_yes_no_arguments_are_read_before_fire_sees_them(capsys):
    # Fire keeps "false" and "no" as strings, which count as true: prepare_ixi.py --validate false read every volume
    from agi_monai.cli import UsageError, _strings_as_typed, synthesize

    prepare = load_script("prepare_ixi.py").main  # annotated "bool" (a string)
    for given, read in [("false", "False"), ("No", "False"), ("0", "False"), ("TRUE", "True"), ("yes", "True")]:
        assert _strings_as_typed(prepare, ["--validate", given, "--sizes", "1,0,0"]) == ["--validate", read, "--sizes", "1,0,0"]
        assert _strings_as_typed(synthesize, [f"--dicom={given}", "a"]) == [f"--dicom={read}", "'a'"]
    assert _strings_as_typed(prepare, ["r", "o.json", "1,0,0", "0", "no"]) == ["'r'", "'o.json'", "1,0,0", "0", "False"]
    with pytest.raises(UsageError, match="^--validate: got 'maybe', expected true or false$"):
        _strings_as_typed(prepare, ["--validate", "maybe"])
    # refused before any work, in one line (main: before, this raised out of main with a traceback)
    assert main(["synthesize", "in", "--dicom=nope"]) == 2
    assert capsys.readouterr().err == "agi-monai synthesize: error: --dicom: got 'nope', expected true or false\n"


@pytest.mark.parametrize("bundle, setting", [("brats_t1_t2_flair_to_t1gd_3d", "patches_per_batch"),
                                             ("brats_t1_t2_to_flair", "slices_per_batch")])
def test_batch_size_sets_the_batch_setting_the_bundle_has(cases, tmp_path, monkeypatch, capsys, bundle, setting):
    # before: --batch_size always set slices_per_batch, which the 3D bundle's inference.json does not have: its
    # sliding window kept patches_per_batch (4) and the flag did nothing
    from monai.bundle import ConfigParser

    import agi_monai.cli as cli

    given: dict = {}

    def workflow(chosen, configs, overrides, **settings):  # the settings, without weights or a run
        given.update(settings)
        raise cli.UsageError("stopped before the run")

    monkeypatch.setattr(cli, "_workflow", workflow)
    argv = ["synthesize", str(cases), "--bundle", bundle, "--output_dir", str(tmp_path / "o"), "--batch_size", "2"]
    assert main(argv) == 2 and "stopped before the run" in capsys.readouterr().err
    assert {key: value for key, value in given.items() if key.endswith("_per_batch")} == {setting: 2}
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    parser.update({setting: given[setting], "bundle_root": str(REPO / "bundles" / bundle)})
    assert parser.get_parsed_content("inferer").sw_batch_size == 2


def test_the_bundle_choice_sees_the_discovery_overrides(bundles, tmp_path):
    # a DICOM study whose T2 series has a description no rule knows: --discovery#dicom_mapping names it; before, only
    # a run with --bundle used the mapping, and the bundle choice stopped with "no cases found"
    env = {**SUBPROCESS_ENV, "AGI_MONAI_BUNDLES": str(bundles)}
    study = tmp_path / "study"
    for number, (name, description) in enumerate([("t1n", "AX T1 SE"), ("t2w", "Sequence B")], 1):
        volume = sitk.ReadImage(str(GLI / f"BraTS-GLI-00001-000-{name}.nii.gz"))[:, :, 70:74]
        write_dicom_series(volume, study / f"series{number}", description, "P01", number, study_uid="1.2.3")
    result = run_cli("synthesize", study, "--target", "FLAIR", "--output_dir", tmp_path / "out",
                     "--discovery#dicom_mapping", "{'T2': 'Sequence B'}", *FAST, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "using bundle brats_t1_t2_to_flair (T1, T2 -> FLAIR); contrasts every case has: T1, T2" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["P01_FLAIR.nii.gz"]


def test_an_output_never_replaces_an_input_and_a_case_id_with_a_slash_names_one_file(flair_bundle, cases, tmp_path):
    # files given one by one, the output folder being theirs, which holds the case's real FLAIR under the name the
    # synthesized one would have: that case fails and the acquired scan is kept, with or without --overwrite
    folder = tmp_path / "anat"
    shutil.copytree(cases / GLI.name, folder)
    crop(GLI / "BraTS-GLI-00001-000-t2f.nii.gz", folder / "BraTS-GLI-00001-000_FLAIR.nii.gz")
    t1, t2 = folder / "BraTS-GLI-00001-000-t1n.nii.gz", folder / "BraTS-GLI-00001-000-t2w.nii.gz"
    before = digest(folder)
    for extra in ([], ["--overwrite"]):
        result = run_cli("synthesize", "--t1", t1, "--t2", t2, "--bundle", flair_bundle, "--output_dir", folder,
                         *extra, *FAST)
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
        assert (f"BraTS-GLI-00001-000: {folder / 'BraTS-GLI-00001-000_FLAIR.nii.gz'}: exists and was not written by a "
                "synthesis (its NIfTI header is not marked SYNTHETIC), so it is left as it was (expected another "
                "--output_dir, or that file moved away)") in result.stdout + result.stderr
        assert digest(folder) == before

    # an acquired series in a folder named like the DICOM output (P01_FLAIR_dicom): before, --overwrite set it aside
    # and removed it (with --dicom replaced by the synthetic series; without, "removed, the DICOM series an earlier
    # run made"); now the case fails naming it, with or without an earlier synthesized NIfTI beside it
    acquired = tmp_path / "acquired"
    acquired.mkdir()
    shutil.copy(t1, acquired / "P01_T1.nii.gz")
    shutil.copy(t2, acquired / "P01_T2.nii.gz")
    write_dicom_series(sitk.ReadImage(str(t2)), acquired / "P01_FLAIR_dicom", "AX FLAIR", "P01", 3)
    for earlier_nifti in (False, True):
        if earlier_nifti:
            assert main(["synthesize", "--t1", str(t1), "--t2", str(t2), "--case_id", "P01", "--bundle",
                         str(flair_bundle), "--output_dir", str(tmp_path / "earlier"), *FAST]) == 0
            shutil.copy(tmp_path / "earlier" / "P01_FLAIR.nii.gz", acquired)
        before = digest(acquired)
        for extra in (["--overwrite"], ["--overwrite", "--dicom"], ["--dicom"]):
            result = run_cli("synthesize", "--t1", acquired / "P01_T1.nii.gz", "--t2", acquired / "P01_T2.nii.gz",
                             "--bundle", flair_bundle, "--output_dir", acquired, *extra, *FAST)
            assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
            assert (f"P01: {acquired / 'P01_FLAIR_dicom'}: exists and was not written by a synthesis (its DICOM "
                    "files' Manufacturer is not agi-monai), so it is left as it was (expected another --output_dir, "
                    "or that folder moved away)") in result.stdout, result.stdout[-3000:]
            assert digest(acquired) == before

    # a case ID holding a path separator (a PatientID like MRN/0042) names one file in the output folder, DICOM too;
    # before, it named a file in a subfolder and the DICOM step failed with a KeyError
    output = tmp_path / "out"
    result = run_cli("synthesize", "--t1", t1, "--t2", t2, "--case_id", "site1/P01", "--bundle", flair_bundle,
                     "--output_dir", output, "--dicom", *FAST)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "case ID 'site1/P01' is not a file name; its outputs are named after 'site1_P01'" in result.stdout + result.stderr
    assert sorted(p.name for p in output.iterdir()) == ["site1_P01_FLAIR.nii.gz", "site1_P01_FLAIR_dicom"]
    assert_on_input_grid(output / "site1_P01_FLAIR.nii.gz", t2)


# ----------------------------------------------------------------------------------------- argument errors


def test_missing_weights_name_the_file_and_how_to_train(cases, tmp_path, capsys):
    bundle = REPO / "bundles" / "brats_t1_t2_to_flair"
    if (bundle / "models" / "model.pt").exists():
        pytest.skip("this checkout has trained weights for brats_t1_t2_to_flair")
    status = main(["synthesize", str(cases), "--bundle", "brats_t1_t2_to_flair", "--output_dir", str(tmp_path / "o")])
    error = capsys.readouterr().err
    assert status == 2
    assert f"{bundle / 'models' / 'model.pt'}: no trained weights for bundle brats_t1_t2_to_flair" in error
    assert f"python -m monai.bundle run --config_file {bundle / 'configs' / 'train.json'}" in error
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bundle", "brats_t1_t2_to_nothing"], "bundle 'brats_t1_t2_to_nothing' is neither a bundle folder nor one of: brats_t1_flair_t1gd_to_t2, brats_t1_flair_to_t2, "),
        (["--device", "gpu"], "--device gpu: not a torch device; expected cpu, cuda or cuda:N"),
        (["--batch_size", "0"], "--batch_size: got 0, expected a positive number of slices (3D: patches)"),
        (["--overwrite", "maybe"], "--overwrite: got 'maybe', expected true or false"),
        (["--outptu_dir", "x"], "--outptu_dir: not an option of this command and not a config id of "),
        (["--target", "T2"], "--target T2: bundle brats_t1_t2_to_flair synthesizes FLAIR, not T2"),
        (["--t1", "a.nii.gz"], "give either input_dir ("),
    ],
)
def test_bad_arguments_are_named(flair_bundle, cases, tmp_path, capsys, args, message):
    argv = ["synthesize", str(cases), "--output_dir", str(tmp_path / "o")]
    argv += [] if "--bundle" in args else ["--bundle", str(flair_bundle)]
    status = main(argv + args)
    error = capsys.readouterr().err
    assert status == 2 and message in error and "Traceback" not in error, error
    assert not (tmp_path / "o").exists()


def test_a_report_never_replaces_an_input_or_an_output_and_is_checked_before_any_case(flair_bundle, cases, tmp_path,
                                                                                      capsys):
    # before: --report in_t1.nii.gz replaced the input T1 with JSON, --report out/A_FLAIR.nii.gz the output, and a
    # report path under a file failed with a traceback after every case was computed
    t1 = cases / GLI.name / "BraTS-GLI-00001-000-t1n.nii.gz"
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps([{"T1": str(t1), "T2": str(cases / GLI.name / "BraTS-GLI-00001-000-t2w.nii.gz")}]))
    (tmp_path / "file").write_text("")
    output = tmp_path / "o"
    expected = "(expected the name of a new .json file, or of an earlier report, outside the input folder"
    for source, report, problem in [
        (cases, cases / GLI.name / "report.json", f"is inside the input folder {cases}"),
        (cases, tmp_path, "is a folder"),
        (datalist, t1, "does not end in .json"),
        (datalist, output / "BraTS-GLI-00001-000_FLAIR.nii.gz", "does not end in .json"),
        (datalist, datalist, "exists and is not a report of an earlier run (it is left as it was)"),
        (datalist, tmp_path / "file" / "report.json", "cannot be written (Not a directory)"),  # under a file
        (datalist, output / "BraTS-GLI-00001-000_FLAIR_dicom" / "report.json", f"is in a folder below the output folder {output}"),
    ]:
        status = main(["synthesize", str(source), "--bundle", str(flair_bundle), "--output_dir", str(output),
                       "--report", str(report)])
        error = capsys.readouterr().err
        assert status == 2 and f"error: {report}: {problem}" in error and expected in error, error
        assert not output.exists()  # refused before any case
    assert datalist.read_text().startswith("[{") and t1.stat().st_size > 1000
    # a start that fails after the report's check (weights that do not fit) creates no folder for it (before: made)
    report = tmp_path / "reports" / "run1" / "report.json"
    assert main(["synthesize", str(datalist), "--bundle", str(flair_bundle), "--output_dir", str(output),
                 "--report", str(report)]) == 2
    assert "does not fit AGINet" in capsys.readouterr().err and not (tmp_path / "reports").exists()


def test_a_missing_file_of_one_case_is_an_argument_error(flair_bundle, cases, tmp_path, capsys):
    # before: run as a batch of one failed case ("missing T2 (found T1)", exit 1)
    t1 = cases / GLI.name / "BraTS-GLI-00001-000-t1n.nii.gz"
    status = main(["synthesize", "--t1", str(t1), "--bundle", str(flair_bundle), "--output_dir", str(tmp_path / "o")])
    error = capsys.readouterr().err
    assert status == 2 and "Traceback" not in error
    assert error.strip() == "agi-monai synthesize: error: --t2: required, bundle brats_t1_t2_to_flair reads T1, T2"
    assert not (tmp_path / "o").exists()


def test_the_cases_that_narrow_the_bundle_choice_are_named(cases, tmp_path, capsys):
    # the bundle is chosen from the contrasts every case has: one case without its T2 leaves T1 alone
    folder = tmp_path / "cases"
    shutil.copytree(cases / AURORA.name, folder / AURORA.name)
    (folder / "lonely").mkdir()
    shutil.copy(cases / GLI.name / "BraTS-GLI-00001-000-t1n.nii.gz", folder / "lonely" / "lonely-t1n.nii.gz")
    status = main(["synthesize", str(folder), "--output_dir", str(tmp_path / "o")])
    printed = capsys.readouterr()
    assert status == 2 and "the contrasts present (T1)" in printed.err
    assert "agi-monai synthesize: T2 not in every case (lonely lacks T2)" in printed.out


def test_a_folder_whose_every_case_fails_discovery_is_a_failed_batch_with_or_without_bundle(cases, tmp_path, capsys):
    # before: without --bundle, a usage error (exit 2: "no cases found"); with it, a batch of failed cases (exit 1)
    folder = tmp_path / "cases"
    shutil.copytree(cases / GLI.name, folder / GLI.name)
    shutil.copytree(cases / GLI.name, folder / "copy" / GLI.name)  # the same case ID twice: discovery refuses it
    before = digest(folder)
    status = main(["synthesize", str(folder), "--output_dir", str(tmp_path / "o")])
    printed = capsys.readouterr()
    assert status == 1, printed.err[-3000:]
    assert f"  - {GLI.name}: duplicate case ID, several files for one contrast: T1 in " in printed.out
    assert re.fullmatch(
        rf"agi-monai synthesize: 0 of 1 cases written to {re.escape(str(tmp_path / 'o'))} \(no bundle chosen: no case "
        rf"could be read\) in [0-9.]+ s; 1 failed: {GLI.name}", printed.out.strip().splitlines()[-1]
    ), printed.out[-2000:]
    assert not (tmp_path / "o").exists() and digest(folder) == before


@pytest.mark.parametrize("problem", ["inside the input", "parent is a file", "datalist not JSON", "empty folder"])
def test_bad_input_or_output_folders_are_one_line_before_any_case(flair_bundle, cases, tmp_path, problem):
    # checked by inference.json's initialize (the output folder) and before the run (the input), so that a batch
    # fails at once, not after computing every case (before: a read-only output folder or a file in its path
    # failed each case with "RuntimeError: applying transform <Compose object at 0x…>"), and with the --bundle
    # flag as without it (before: a traceback for a broken datalist, and "0 of 0 cases written" for no case)
    source, output = cases, tmp_path / "out"
    if problem == "inside the input":
        output = cases / "out"
        message = f"{output}: is the input folder or inside it ({cases}) (expected another folder: outputs there "
        message += "would be read as inputs by a later run)"
    elif problem == "parent is a file":
        (tmp_path / "file").write_text("")
        output = tmp_path / "file" / "out"
        message = f"{output}: cannot be written (Not a directory) (expected a folder this user can create and write "
        message += "files in)"
    elif problem == "datalist not JSON":
        source = tmp_path / "datalist.json"
        source.write_text('{"training": ')
        message = f"{source}: cannot be read as JSON (Expecting value: line 1 column 14 (char 13)) (expected a JSON "
        message += "datalist)"
    else:
        source = tmp_path / "empty"
        source.mkdir()
        message = f"input {source}: no cases found (0 cases found, 0 skipped); expected NIfTI files named like "
        message += "<case>-t1.nii.gz or DICOM series"
    before = digest(cases)
    result = run_cli("synthesize", source, "--bundle", flair_bundle, "--output_dir", output, *FAST)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"agi-monai synthesize: error: {message}", result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not output.exists() or list(output.iterdir()) == []  # no case was run
    assert digest(cases) == before


def test_user_errors_print_no_traceback_from_the_console_script(tmp_path):
    result = run_cli("synthesize", tmp_path / "missing", "--output_dir", tmp_path / "o")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"agi-monai synthesize: error: input_dir {tmp_path / 'missing'}: does not exist "
        "(expected a folder of NIfTI/DICOM cases or a JSON datalist)"
    )


# --------------------------------------------------------------------------------------- bundles, help


def test_bundles_lists_the_ten_scenarios_and_the_3d_one():
    result = run_cli("bundles")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    names = [  # the paper's ten scenarios and its 3D one; other bundles (the downstream segmentation one) are not listed
        "brats_t1_flair_t1gd_to_t2", "brats_t1_flair_to_t2", "brats_t1_t2_flair_to_t1gd",
        "brats_t1_t2_flair_to_t1gd_3d", "brats_t1_t2_t1gd_to_flair",
        "brats_t1_t2_to_flair", "brats_t2_flair_t1gd_to_t1", "brats_t2_flair_to_t1", "ixi_t1_pd_to_t2",
        "ixi_t1_t2_to_pd", "ixi_t2_pd_to_t1",
    ]
    assert [line.split()[0] for line in lines[1:-1]] == names
    assert lines[0].split() == ["bundle", "inputs", "target", "slice", "weights"]
    row = next(line for line in lines if line.startswith("brats_t1_t2_flair_to_t1gd "))
    assert re.match(r"brats_t1_t2_flair_to_t1gd\s+T1, T2, FLAIR\s+T1Gd\s+240x240\s+(yes|no)", row), row
    row = next(line for line in lines if line.startswith("brats_t1_t2_flair_to_t1gd_3d "))
    assert re.match(r"brats_t1_t2_flair_to_t1gd_3d\s+T1, T2, FLAIR\s+T1Gd\s+240x240 \(3D patches\)\s+(yes|no)", row), row
    with_weights = sum((REPO / "bundles" / n / "models" / "model.pt").is_file() for n in names)
    assert lines[-1] == f"11 bundles in {REPO / 'bundles'}, {with_weights} with weights (models/model.pt)"


def test_bundles_table_shows_weights(bundles, capsys, monkeypatch):
    monkeypatch.setenv("AGI_MONAI_BUNDLES", str(bundles))
    assert main(["bundles"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ixi_t1_t2_to_pd\s+T1, T2\s+PD\s+256x256\s+yes$", out, re.M), out
    assert out.strip().endswith("2 bundles in " + str(bundles) + ", 2 with weights (models/model.pt)")


def test_help_from_the_console_script():
    result = run_cli("--help")
    assert result.returncode == 0
    text = result.stdout  # asked-for help goes to stdout
    for command in ("synthesize", "convert-dicom", "evaluate", "export", "bundles"):
        assert re.search(rf"^\s+{command}\n\s+\S", text, re.M), f"{command} missing from:\n{text}"


@pytest.mark.parametrize(
    "command, flags",
    [
        ("synthesize", ["--output_dir", "--bundle", "--target", "--t1", "--t1gd", "--device", "--batch_size", "--overwrite", "--dicom"]),
        ("convert-dicom", ["INPUT_DIR", "OUTPUT_DIR", "--overwrite"]),
        ("evaluate", ["BUNDLE", "DATASET_DIR", "--output_dir", "--device"]),
        ("export", ["BUNDLE", "--filepath", "--portable", "--overwrite"]),
        ("bundles", []),
    ],
)
def test_help_of_each_command(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    text = "".join(capsys.readouterr())
    assert exit_info.value.code == 0
    assert f"agi-monai {command}" in text
    for flag in flags:
        assert flag in text, f"{flag} missing from the help of {command}:\n{text}"
    # the types as written (before: "Optional[Optional]" for every optional flag, Fire naming a type by __qualname__)
    assert "Optional[Optional]" not in text and ("Type: Optional[str]" in text) == (command not in ("bundles", "convert-dicom")), text


# ------------------------------------------------------------------------------------------------- export


def test_portable_export_runs_without_agi_monai(flair_bundle, tmp_path, capsys):
    portable, compiled = tmp_path / "portable.ts", tmp_path / "compiled.ts"
    widths = ["--network_def#channels", str(WIDTHS).replace(" ", "")]
    result = run_cli("export", flair_bundle, "--portable", "--filepath", portable, *widths)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"agi-monai export: brats_t1_t2_to_flair -> {portable} (portable: loads with torch alone)" in result.stdout
    assert run_cli("export", flair_bundle, "--filepath", compiled, *widths, module=True).returncode == 0
    assert main(["export", str(flair_bundle), "--filepath", str(compiled)]) == 2  # checked before any export
    assert f"--filepath {compiled}: already exists (pass --overwrite" in capsys.readouterr().err

    torch.manual_seed(1)
    x = torch.rand(1, 2, 48, 40)
    network = AGINet(in_channels=2, channels=WIDTHS).eval()
    network.load_state_dict(torch.load(flair_bundle / "models" / "model.pt", weights_only=True))
    with torch.no_grad():
        expected = network(x)
    torch.save(x, tmp_path / "x.pt")
    fresh = (  # a new interpreter that never imports agi_monai
        "import sys, torch\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"y = torch.jit.load({str(portable)!r})(x)\n"
        f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
        "assert 'agi_monai' not in sys.modules\n"
        "try:\n"
        f"    torch.jit.load({str(compiled)!r})\n"
        "    print('compiled file loaded')\n"
        "except RuntimeError as error:\n"
        "    print('compiled file failed:', error)\n"
    )
    run = subprocess.run([sys.executable, "-c", fresh], cwd="/", capture_output=True, text=True, timeout=300,
                         env=SUBPROCESS_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-4, atol=1e-5)
    if extension_available():  # the default export calls the compiled op: the negative control
        assert "compiled file failed:" in run.stdout and "agi_monai::group_roll" in run.stdout, run.stdout


# ------------------------------------------------------------------------------------------ convert-dicom


def test_convert_dicom_writes_one_nifti_per_series(tmp_path, capsys):
    study = tmp_path / "dicom" / "TCGA-FG-6692"
    for number, (name, description) in enumerate([("t2", "AX T2 FSE"), ("t1", "AX T1 SE")], 2):
        write_dicom_series(sitk.ReadImage(str(NATIVE / f"{name}.nii.gz")), study, description, "TCGA-FG-6692", number,
                           study_uid="1.2.826.0.1.3680043.8.498.1")
    before = digest(tmp_path / "dicom")
    result = run_cli("convert-dicom", tmp_path / "dicom", tmp_path / "nifti")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "nifti").iterdir()) == ["TCGA-FG-6692-T1.nii.gz", "TCGA-FG-6692-T2.nii.gz"]
    assert re.search(r"convert-dicom: 2 series of 1 of 1 cases written to .* 0 failed$", result.stdout.strip())
    for contrast, name in (("T1", "t1"), ("T2", "t2")):
        converted = sitk.DICOMOrient(sitk.ReadImage(str(tmp_path / "nifti" / f"TCGA-FG-6692-{contrast}.nii.gz")), "LPS")
        original = sitk.DICOMOrient(sitk.ReadImage(str(NATIVE / f"{name}.nii.gz")), "LPS")
        assert converted.GetSize() == original.GetSize()
        np.testing.assert_allclose(converted.GetOrigin(), original.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(converted.GetDirection(), original.GetDirection(), atol=1e-4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(original))
    converted = digest(tmp_path / "nifti")
    assert main(["convert-dicom", str(tmp_path / "dicom"), str(tmp_path / "nifti"), "--progress=False"]) == 1
    assert f"TCGA-FG-6692: output already exists: {tmp_path / 'nifti' / 'TCGA-FG-6692-T2.nii.gz'}" in capsys.readouterr().out
    assert digest(tmp_path / "nifti") == converted
    assert digest(tmp_path / "dicom") == before
    # an output folder inside the input (before: accepted, and a later synthesize over the input found each contrast
    # twice, as DICOM and as NIfTI)
    inside = tmp_path / "dicom" / "nifti"
    assert main(["convert-dicom", str(tmp_path / "dicom"), str(inside), "--progress=False"]) == 2
    assert f"convert-dicom: error: {inside}: is the input folder or inside it" in capsys.readouterr().err
    assert not inside.exists() and digest(tmp_path / "dicom") == before


# ----------------------------------------------------------------------------------------------- evaluate


def test_evaluate_refuses_weights_and_a_dataset_that_cannot_serve_in_one_line(flair_bundle, tmp_path, capsys):
    # before: both came out of the evaluator's run as MONAI's wrapped errors, 60-400 lines with tracebacks
    args = ["evaluate", str(flair_bundle), str(DATA / "brats2023-gli"), "--output_dir", str(tmp_path / "eval"),
            "--num_workers", "0"]
    assert main(args) == 2  # the bundle's weights are narrow: without the --network_def#channels they were made with
    err = capsys.readouterr().err
    assert err.startswith(f"agi-monai evaluate: error: {flair_bundle / 'models' / 'model.pt'}: does not fit AGINet of "
                          "this config") and "(--network_def#... flags: none)" in err and "Traceback" not in err
    assert main([*args[:2], str(DATA / "ixi-sim"), *args[3:], *FAST[:4]]) == 2  # no case has a FLAIR to compare with
    err = capsys.readouterr().err
    assert err.startswith(f"agi-monai evaluate: error: {DATA / 'ixi-sim'}: no case of the 'test' split has T1, T2, "
                          "FLAIR") and "Traceback" not in err


def test_evaluate_runs_the_bundles_evaluation(flair_bundle, tmp_path):
    case = tmp_path / "cases" / GLI.name
    for name in ("t1n", "t2w", "t2f"):
        crop(GLI / f"BraTS-GLI-00001-000-{name}.nii.gz", case / f"BraTS-GLI-00001-000-{name}.nii.gz")
    bundle = with_other_weights(flair_bundle, tmp_path / "bundles")
    result = run_cli(
        "evaluate", bundle, tmp_path / "cases", "--output_dir", tmp_path / "eval", "--num_workers", "0", *FAST[:4]
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    written = sorted(p.name for p in (tmp_path / "eval").rglob("*") if p.is_file())
    assert written == sorted([CASES_CSV, SUMMARY_JSON, SUMMARY_MD])
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"agi-monai evaluate: brats_t1_t2_to_flair on {tmp_path / 'cases'}: wrote ")
    assert all(name in last for name in written)

    # the numbers are those of the bundle's own weights on this case, computed here with the library's protocol
    # functions (tested against hand-computed values in test_evaluation.py): a wrong checkpoint, target or
    # contrast order gives other numbers
    (row,) = read_csv(tmp_path / "eval" / CASES_CSV)
    assert row["case_id"] == GLI.name
    files = {"T1": "t1n", "T2": "t2w", "FLAIR": "t2f"}
    item = volume_dataset(
        [{"case_id": GLI.name, **{c: str(case / f"BraTS-GLI-00001-000-{s}.nii.gz") for c, s in files.items()}}],
        ["T1", "T2"], "FLAIR", (64, 64),  # FAST's --spatial_size
    )[0]
    network = AGINet(in_channels=2, channels=WIDTHS).eval()
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    with torch.no_grad():
        prediction = SliceInferer(roi_size=(64, 64), spatial_dim=2, sw_batch_size=8)(item["image"].as_tensor()[None], network)
    expected = evaluate_volume(prediction[0].clamp(0, 1), item["target"], item["mask"], ["slice2d", "brasyn3d"])
    for protocol, metrics in expected.items():
        for metric, value in metrics.metrics.items():
            assert row[f"{protocol}_{metric}"] == pytest.approx(value, rel=1e-4, abs=1e-4), (protocol, metric)
