"""The MONAI Deploy application (issue #7 item 3), run in-process as Holoscan runs it: a DICOM study made from the
shipped native TCGA scans (three series; T1 and T2 selected by their descriptions) plus a NIfTI case, a copy of
``brats_t1_t2_to_flair`` with an untrained narrow generator exported to TorchScript by ``agi-monai export``.

Checked against an independent path: the bundle's own ``inference.json`` run by ``python -m monai.bundle run``
with the eager ``model.pt`` on the same cases must give the same float32 volumes; the DICOM series must carry the
reference series' patient/study/frame of reference and its geometry.

Skipped, with the reason, where the MONAI Deploy App SDK is not importable (docs/deploy.md says how to install it).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from agi_monai.deploy.sdk import import_deploy_sdk

try:
    import_deploy_sdk()
except ImportError as error:  # the exact reason, e.g. the SDK not installed, or Holoscan failing to load
    pytest.skip(f"MONAI Deploy App SDK not importable: {error}", allow_module_level=True)

from agi_monai.cli import main as cli_main  # noqa: E402
from agi_monai.data import write_dicom_series  # noqa: E402
from agi_monai.deploy.app import main  # noqa: E402
from agi_monai.networks import AGINet  # noqa: E402
from helpers import REPO, SUBPROCESS_ENV  # noqa: E402

NATIVE = REPO / "tests" / "data" / "tcga-lgg" / "TCGA-FG-6692-native"
AURORA = REPO / "tests" / "data" / "brats2023-mets" / "aurora-example"
WIDTHS = [8, 16, 16, 32]
STUDY_UID = "1.2.826.0.1.3680043.8.498.7"


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A bundle copy with a freshly initialised narrow generator, exported to models/model.ts by the CLI."""
    import shutil

    root = tmp_path_factory.mktemp("bundles") / "brats_t1_t2_to_flair"
    shutil.copytree(REPO / "bundles" / root.name, root, ignore=shutil.ignore_patterns("models", "eval"))
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(AGINet(in_channels=2, channels=WIDTHS).state_dict(), root / "models" / "model.pt")
    assert cli_main(["export", str(root), "--network_def#channels", str(WIDTHS).replace(" ", "")]) == 0
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A DICOM study (T2, T1 and a FLAIR series of TCGA-FG-6692, oblique) and a NIfTI case (aurora, 30 slices)."""
    folder = tmp_path_factory.mktemp("inputs")
    study = folder / "study"
    for number, (name, description) in enumerate([("t2", "AX T2 FSE"), ("t1", "AX T1 SE"), ("flair", "AX T2 FLAIR")], 2):
        write_dicom_series(sitk.ReadImage(str(NATIVE / f"{name}.nii.gz")), study, description, "TCGA-FG-6692", number,
                           study_uid=STUDY_UID)
    case = folder / "nifti" / "aurora-example"
    case.mkdir(parents=True)
    for name in ("t1", "t2"):
        nib.save(nib.load(AURORA / f"{name}.nii.gz").slicer[:, :, 65:95], case / f"{name}.nii.gz")
    return folder


@pytest.mark.slow
def test_app_synthesizes_float_nifti_and_a_derived_dicom_series(exported, inputs, tmp_path, capsys):
    before = digest(inputs)
    output = tmp_path / "out"
    status = main(["-i", str(inputs), "-o", str(output), "-m", str(exported / "models" / "model.ts"), "--device", "cpu",
                   "--report", str(tmp_path / "report.json")])
    printed = capsys.readouterr().out
    assert status == 0, printed[-3000:]
    assert sorted(p.name for p in output.iterdir()) == [
        "TCGA-FG-6692_FLAIR.nii.gz", "TCGA-FG-6692_FLAIR_dicom", "aurora-example_FLAIR.nii.gz", "aurora-example_FLAIR_dicom",
    ]
    assert "2 of 2 cases written (FLAIR, NIfTI + DICOM)" in printed and "by brats_t1_t2_to_flair" in printed
    report = json.loads((tmp_path / "report.json").read_text())  # the CLI's --report, from the app
    assert report["bundle"] == "brats_t1_t2_to_flair" and report["counts"]["written"] == 2
    assert report["cases"][0] == {"case_id": "TCGA-FG-6692", "status": "written", "output": str(
        output / "TCGA-FG-6692_FLAIR.nii.gz"), "dicom": str(output / "TCGA-FG-6692_FLAIR_dicom")}
    assert digest(inputs) == before  # inputs untouched

    # the same cases through the bundle's own inference (eager model.pt, MONAI ConfigWorkflow): the same volumes
    reference_run = tmp_path / "bundle_run"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(exported / "configs" / "inference.json"),
        "--bundle_root", str(exported), "--dataset_dir", str(inputs), "--output_dir", str(reference_run),
        "--network_def#channels", str(WIDTHS).replace(" ", ""), "--device", "$torch.device('cpu')",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=SUBPROCESS_ENV)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for case in ("TCGA-FG-6692", "aurora-example"):
        deployed, bundled = nib.load(output / f"{case}_FLAIR.nii.gz"), nib.load(reference_run / f"{case}_FLAIR.nii.gz")
        assert deployed.get_data_dtype() == np.float32  # not the stock operator's uint8
        # marked synthetic in the header, as the bundle's own inference marks it
        marked = b"SYNTHETIC FLAIR from T1,T2 by brats_t1_t2_to_flair"
        assert deployed.header["descrip"].item() == bundled.header["descrip"].item() == marked
        np.testing.assert_allclose(deployed.affine, bundled.affine, atol=1e-5)
        values = np.asarray(deployed.dataobj)
        np.testing.assert_allclose(values, np.asarray(bundled.dataobj), atol=1e-4)  # TorchScript vs eager, ITK threads
        assert 0.0 <= values.min() and values.max() <= 1.0 and len(np.unique(values)) > 256  # a float image, not 8 bits

    # DICOM in -> DICOM out: a new series of the input study, on the T2 series' grid (the reference of (T1, T2))
    series = output / "TCGA-FG-6692_FLAIR_dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    synthetic = reader.Execute()
    t2_files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(inputs / "study"), _series_uid(inputs / "study", "AX T2 FSE"))
    reader.SetFileNames(t2_files)
    t2 = reader.Execute()
    assert synthetic.GetSize() == t2.GetSize()
    for getter in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(synthetic, getter)(), getattr(t2, getter)(), atol=1e-4)
    nifti = sitk.ReadImage(str(output / "TCGA-FG-6692_FLAIR.nii.gz"))
    values = sitk.GetArrayFromImage(nifti)
    np.testing.assert_allclose(sitk.GetArrayFromImage(synthetic), values, atol=(values.max() - values.min()) / 65535)
    header, t2_header = pydicom.dcmread(next(series.iterdir())), pydicom.dcmread(t2_files[0])
    assert list(header.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
    assert header.SeriesDescription == "SYNTHETIC FLAIR brats_t1_t2_to_flair"
    assert header.StudyInstanceUID == STUDY_UID and header.PatientID == "TCGA-FG-6692"
    assert header.FrameOfReferenceUID == t2_header.FrameOfReferenceUID
    assert header.SeriesInstanceUID != t2_header.SeriesInstanceUID and int(header.SeriesNumber) == 1002
    assert "MONAI Deploy app" in header.DerivationDescription

    # again without --overwrite: every case fails naming its file, nothing is replaced
    written = digest(output)
    assert main(["-i", str(inputs), "-o", str(output), "-m", str(exported / "models" / "model.ts"), "--device", "cpu", "--no-dicom"]) == 1
    # (the DICOM folder too, although this run writes none: a new NIfTI must not sit beside the earlier series)
    assert (f"TCGA-FG-6692: {output / 'TCGA-FG-6692_FLAIR.nii.gz'}, {output / 'TCGA-FG-6692_FLAIR_dicom'}: output "
            "already exists") in capsys.readouterr().out
    assert digest(output) == written


def test_model_that_is_not_an_export_is_named(inputs, tmp_path, capsys):
    broken = tmp_path / "model.ts"
    broken.write_bytes(b"not a TorchScript archive")
    assert main(["-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(broken)]) == 2
    error = capsys.readouterr().err
    assert f"{broken}: cannot be loaded as TorchScript" in error and "expected a file written by 'agi-monai export'" in error
    assert not (tmp_path / "out").exists()


def test_where_the_model_is_found_and_what_it_is_called(exported, tmp_path):
    """A MAP's models folder (model.ts, or <name>/model.ts) is found; the bundle's name comes from the export's own
    inference.json, wherever the file lies; a bundle folder's model.ts from another scenario and a TorchScript file
    that is not an export are named with what is wrong."""
    import shutil

    from agi_monai.bundle.registry import BundleError
    from agi_monai.deploy.synthesis import BundleSynthesizer

    for layout in ("model.ts", "flair/model.ts"):  # HOLOSCAN_MODEL_PATH=/opt/holoscan/models holds one of these
        models = tmp_path / layout.replace("/", "_") / "models"
        (models / layout).parent.mkdir(parents=True)
        shutil.copy(exported / "models" / "model.ts", models / layout)
        synthesizer = BundleSynthesizer(models, device="cpu")
        assert synthesizer.model_path == models / layout and synthesizer.name == "brats_t1_t2_to_flair"
        assert (synthesizer.inputs, synthesizer.target) == (["T1", "T2"], "FLAIR")
    shutil.copy(exported / "models" / "model.ts", models / "model.ts")
    with pytest.raises(BundleError, match="holds 2 models .*expected one: give its file"):
        BundleSynthesizer(models, device="cpu")
    with pytest.raises(BundleError, match="no model.ts in it or in a folder in it"):
        BundleSynthesizer(_empty(tmp_path), device="cpu")

    # another scenario's bundle folder holding this export as its models/model.ts
    other = tmp_path / "brats_t2_flair_to_t1"
    shutil.copytree(REPO / "bundles" / other.name, other, ignore=shutil.ignore_patterns("models", "eval"))
    (other / "models").mkdir()
    shutil.copy(exported / "models" / "model.ts", other / "models" / "model.ts")
    with pytest.raises(BundleError, match=r"was exported from a bundle for inputs \['T1', 'T2'\] -> FLAIR "
                                          r"\(brats_t1_t2_to_flair\); expected this bundle's \['T2', 'FLAIR'\] -> T1"):
        BundleSynthesizer(other, device="cpu")

    plain = tmp_path / "plain.ts"  # TorchScript, but not written by agi-monai export
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(2, 1, 3)), str(plain))
    with pytest.raises(BundleError, match=f"{plain}: holds no inference.json; expected a file written by"):
        BundleSynthesizer(plain, device="cpu")


def _empty(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def test_inputs_and_outputs_that_cannot_serve_are_refused_before_any_case(exported, inputs, tmp_path, capsys):
    single = inputs / "nifti" / "aurora-example" / "t1.nii.gz"
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    for arguments, message in [
        (["-i", str(single)], f"{single}: is a single file (expected a DICOM study, a folder of NIfTI cases or a JSON "
                              "datalist (-i): put a case's contrasts in a folder of their own)"),
        (["-i", str(tmp_path / "empty")], f"{tmp_path / 'empty'}: holds no file"),
        (["-i", str(inputs), "-o", str(tmp_path / "a_file")], f"{tmp_path / 'a_file'}"),
        (["-i", str(inputs), "--dicom-mapping", '{"T9": "AX T2 FSE"}'], "T9: is not a known contrast name"),
    ]:
        arguments = [*arguments, "-m", str(exported / "models" / "model.ts")] + ([] if "-o" in arguments else ["-o", str(tmp_path / "out")])
        assert main(arguments) == 2, arguments
        error = capsys.readouterr().err
        assert error.startswith("python -m agi_monai.deploy: error: ") and message in error, error
        assert len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "out").exists() and (tmp_path / "a_file").read_text() == "not a folder"


def test_a_rerun_refuses_existing_outputs_without_synthesizing_again(exported, inputs, tmp_path, capsys, monkeypatch):
    from agi_monai.deploy.synthesis import BundleSynthesizer

    from agi_monai.data import synthetic_description

    output = tmp_path / "out"
    output.mkdir()
    existing = output / "aurora-example_FLAIR.nii.gz"
    earlier = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))  # an earlier run's (a synthesis's mark)
    earlier.header["descrip"] = synthetic_description("FLAIR", ["T1", "T2"], "brats_t1_t2_to_flair")
    nib.save(earlier, existing)
    before = existing.read_bytes()

    def synthesized(self, case):
        raise AssertionError(f"{case['case_id']} was synthesized although its output exists")

    monkeypatch.setattr(BundleSynthesizer, "__call__", synthesized)
    assert main(["-i", str(inputs / "nifti"), "-o", str(output), "-m", str(exported / "models" / "model.ts"), "--no-dicom"]) == 1
    printed = capsys.readouterr().out
    assert f"aurora-example: {existing}: output already exists (expected a new output, or --overwrite" in printed
    assert "was synthesized" not in printed and existing.read_bytes() == before


def test_output_inside_the_input_is_refused(exported, inputs, capsys):
    assert main(["-i", str(inputs), "-o", str(inputs / "out"), "-m", str(exported)]) == 2
    assert "is the input folder or inside it" in capsys.readouterr().err
    assert not (inputs / "out").exists()


def _series_uid(folder: Path, description: str) -> str:
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        first = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)[0]
        if pydicom.dcmread(first, stop_before_pixels=True).SeriesDescription == description:
            return uid
    raise AssertionError(f"no series {description!r} in {folder}")


def test_an_overwrite_keeps_or_replaces_a_cases_outputs_as_a_whole(inputs, tmp_path, monkeypatch):
    # before: a failing new series removed the new NIfTI and left the earlier series alone, and an overwrite
    # without DICOM left the earlier series beside the new NIfTI
    from types import SimpleNamespace

    import agi_monai.deploy.synthesis as synthesis
    from agi_monai.data import DataError, load_volume

    case = {"case_id": "aurora-example", "T1": str(inputs / "nifti" / "aurora-example" / "t1.nii.gz"),
            "T2": str(inputs / "nifti" / "aurora-example" / "t2.nii.gz")}
    synthesizer = SimpleNamespace(target="FLAIR", inputs=["T1", "T2"], name="brats_t1_t2_to_flair", reference="T2")
    image = load_volume(case["T2"])
    prediction = image / image.max()
    output = tmp_path / "out"
    nifti, series = synthesis.write_synthesis_outputs(case, prediction, synthesizer, output)
    earlier = digest(output)

    def failing(*args, **kwargs):
        raise DataError(args[1], "cannot be written (No space left on device)")

    monkeypatch.setattr(synthesis, "write_derived_series", failing)
    with pytest.raises(DataError, match="No space left on device"):
        synthesis.write_synthesis_outputs(case, prediction * 0.5, synthesizer, output, overwrite=True)
    assert digest(output) == earlier  # the earlier NIfTI and series, byte for byte, and no temporary file
    assert synthesis.write_synthesis_outputs(case, prediction * 0.5, synthesizer, output, dicom=False, overwrite=True) == [nifti]
    assert sorted(output.iterdir()) == [nifti] and digest(output)[nifti.name] != earlier[nifti.name]
    # without overwrite, a series alone is an output too: refused, not removed nor joined by a new NIfTI
    monkeypatch.undo()
    synthesis.write_synthesis_outputs(case, prediction, synthesizer, output, overwrite=True)
    nifti.unlink()
    alone = digest(output)
    with pytest.raises(DataError, match=f"{series}: output already exists"):
        synthesis.write_synthesis_outputs(case, prediction, synthesizer, output, dicom=False)
    assert digest(output) == alone


# The app in a subprocess whose writer, 5 slices into the second case's DICOM series, touches a file and waits there
# (at most a minute): the test sends the signal once that file appears, so it always lands mid-write.
_STOPPED_MID_WRITE = """
import signal, sys, time
from pathlib import Path
import agi_monai.data.dicom as dicom
from agi_monai.deploy.app import main

# Ctrl-C's default: a background job of a non-interactive shell (scripts/test.sh's half, so CI) starts with SIGINT
# ignored, which the app then rightly ignores too
signal.signal(signal.SIGINT, signal.default_int_handler)


reached, write_slice, series = Path(sys.argv[1]), dicom._slice_dataset, []
def waiting(header, image, index, pixels):
    series.append(index) if index == 0 else None
    if len(series) == 2 and index == 5:
        reached.touch()
        # a C call holding the GIL (as SimpleITK's do), then one releasing it for seconds (a forward pass): the main
        # thread, waiting for the GIL, is not in sigtimedwait, so the kernel hands the signal to another thread
        # (torch's OpenMP pool); Holoscan's handler there, if still installed, forced exit 1 after 3 s, mid-write
        sum(range(60_000_000))
        time.sleep(6)
        for _ in range(1200):
            time.sleep(0.05)
    return write_slice(header, image, index, pixels)
dicom._slice_dataset = waiting
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def earlier_outputs(exported, inputs, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("earlier") / "out"
    assert main(["-i", str(inputs), "-o", str(output), "-m", str(exported / "models" / "model.ts"), "--device", "cpu"]) == 0
    return output


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_write_stops_at_once_leaving_complete_outputs_and_the_case_as_it_was(
    exported, inputs, earlier_outputs, tmp_path, stop
):
    # before: Holoscan's own handler took both signals and stopped the scheduler only between computes (one compute
    # writes every case), then ended the process with status 1 three seconds later, mid-write: a half-written
    # .tmp-<host>-<pid>- series and the overwritten case's earlier outputs left under temporary names
    import shutil

    output = tmp_path / "out"
    shutil.copytree(earlier_outputs, output)
    earlier = digest(output)
    reached = tmp_path / "reached"
    command = [sys.executable, "-c", _STOPPED_MID_WRITE, str(reached), "-i", str(inputs), "-o", str(output), "-m",
               str(exported / "models" / "model.ts"), "--device", "cpu", "--overwrite"]
    threads = {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}  # threads the kernel may hand the signal to
    process = subprocess.Popen(command, cwd=REPO, env={**SUBPROCESS_ENV, **threads}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        while not reached.exists():
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        being_written = sorted(p.name for p in output.iterdir() if p.name.startswith(".tmp-"))
        assert len(being_written) == 3, being_written  # the new series, the earlier NIfTI and series set aside
        time.sleep(0.5)  # the writer is in its C call: the main thread waits for the GIL, out of sigtimedwait
        process.send_signal(getattr(signal, stop))
        stdout, stderr = process.communicate(timeout=60)  # the waiting writer ends at the signal, not in a minute
    finally:
        process.kill()
    assert process.returncode == (143 if stop == "SIGTERM" else 130), stderr[-3000:]
    said = ("terminated by signal 15: stopping; the outputs written so far are complete" if stop == "SIGTERM" else
            "python -m agi_monai.deploy: interrupted; the outputs written so far are complete")
    assert stderr.count(said) == 1 and "Traceback" not in stderr + stdout, stderr[-3000:]
    assert "cases written" not in stdout  # no summary of a run that did not end
    now = digest(output)
    assert not [name for name in now if name.startswith(".tmp-")]
    # the second case is its earlier self, byte for byte; the first one holds its new, complete NIfTI and series
    second = {name for name in earlier if name.startswith("aurora-example_")}
    assert {name: now[name] for name in second} == {name: earlier[name] for name in second} and set(now) == set(earlier)
    first = output / "TCGA-FG-6692_FLAIR_dicom"
    old_uid = pydicom.dcmread(next((earlier_outputs / first.name).iterdir())).SeriesInstanceUID
    assert {pydicom.dcmread(p).SeriesInstanceUID for p in first.iterdir()} - {old_uid}  # a new series
    assert len({pydicom.dcmread(p).SeriesInstanceUID for p in first.iterdir()}) == 1
    nib.load(output / "TCGA-FG-6692_FLAIR.nii.gz").get_fdata()  # complete


def test_the_writer_gives_a_bids_case_bids_names_in_a_derivative(inputs, tmp_path):
    # the app's writer names outputs through synthesis_output_paths, as the CLI does: in a BIDS dataset's
    # derivatives/<pipeline>, a BIDS case's NIfTI and series go to its subject's anat/ folder
    from types import SimpleNamespace

    import agi_monai.deploy.synthesis as synthesis
    from agi_monai.data import DataError, load_volume

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "raw", "BIDSVersion": "1.9.0"}')
    output = bids / "derivatives" / "agi-monai"
    case = {"case_id": "sub-01", "T1": str(inputs / "nifti" / "aurora-example" / "t1.nii.gz"),
            "T2": str(inputs / "nifti" / "aurora-example" / "t2.nii.gz")}
    synthesizer = SimpleNamespace(target="FLAIR", inputs=["T1", "T2"], name="brats_t1_t2_to_flair", reference="T2")
    image = load_volume(case["T2"])
    nifti, series = synthesis.write_synthesis_outputs(case, image / image.max(), synthesizer, output)
    anat = output / "sub-01" / "anat"
    assert (nifti, series) == (anat / "sub-01_desc-synthetic_FLAIR.nii.gz", anat / "sub-01_desc-synthetic_FLAIR_dicom")
    assert nib.load(nifti).shape == image.shape[1:] and len(list(series.iterdir())) == image.shape[3]
    with pytest.raises(DataError, match="output already exists"):  # a rerun finds them where they are
        synthesis.refuse_existing_outputs("sub-01", "FLAIR", output)


def test_an_acquired_series_named_like_the_output_is_never_replaced(inputs, tmp_path):
    # before: with --overwrite the writer set an acquired <case>_<target>_dicom folder aside and removed it
    from types import SimpleNamespace

    import agi_monai.deploy.synthesis as synthesis
    from agi_monai.data import DataError, load_volume

    case = {"case_id": "P01", "T1": str(inputs / "nifti" / "aurora-example" / "t1.nii.gz"),
            "T2": str(inputs / "nifti" / "aurora-example" / "t2.nii.gz")}
    synthesizer = SimpleNamespace(target="FLAIR", inputs=["T1", "T2"], name="brats_t1_t2_to_flair", reference="T2")
    image = load_volume(case["T2"])
    output = tmp_path / "out"
    write_dicom_series(sitk.ReadImage(case["T2"]), output / "P01_FLAIR_dicom", "AX FLAIR", "P01", 3)
    before = digest(output)
    for overwrite in (False, True):  # refused before synthesis (the operator) and at writing
        with pytest.raises(DataError, match="P01_FLAIR_dicom: exists and was not written by a synthesis"):
            synthesis.refuse_existing_outputs("P01", "FLAIR", output, overwrite)
        with pytest.raises(DataError, match="P01_FLAIR_dicom: exists and was not written by a synthesis"):
            synthesis.write_synthesis_outputs(case, image / image.max(), synthesizer, output, overwrite=overwrite)
        assert digest(output) == before
