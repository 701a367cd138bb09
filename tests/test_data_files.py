"""Outputs of batch runs: the output folder is checked before any case; SIGTERM, like Ctrl-C, leaves no temporary
file, and the one ``kill -9`` leaves is removed by the next run; a failed case's reason is the error that says what
happened, on one line."""

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agi_monai.data import DataError, atomic_output, check_output_folder, failure_reason, stopping_cleanly_on_sigterm
from agi_monai.data.files import refuse_output_in_input, remove_stale_temporaries, temporary_path, walk_folders


def test_sigterm_inside_an_atomic_write_removes_the_temporary_file_and_exits_143(tmp_path):
    target = tmp_path / "case_FLAIR.nii.gz"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, stopping_cleanly_on_sigterm():
        with atomic_output(target) as temporary:
            temporary.write_bytes(b"half a volume")
            os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next bytecode
            temporary.write_bytes(b"never reached")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []  # neither the temporary file nor a partial output
    assert signal.getsignal(signal.SIGTERM) is before  # restored after the block


def test_the_temporary_file_of_a_killed_run_is_removed_by_the_next_run(tmp_path, caplog):
    # a real `kill -9` in the middle of an atomic write: nothing can clean up, so the next run's folder check does
    target = tmp_path / "case_FLAIR.nii.gz"
    writer = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom agi_monai.data import atomic_output\n"
         f"with atomic_output({str(target)!r}) as temporary:\n"
         "    temporary.write_bytes(b'half a volume'); print(temporary, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )
    left = Path(writer.stdout.readline().strip())
    writer.kill()
    writer.wait()
    assert left.read_bytes() == b"half a volume"
    assert left.name == f".tmp-{socket.gethostname()}-{writer.pid}-{target.name}"
    with caplog.at_level(logging.WARNING, logger="agi_monai.data.files"):
        check_output_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert f"removed 1 temporary output(s) that a killed earlier run left in {tmp_path}: {left.name}" in caplog.text


def test_only_temporaries_of_this_hosts_ended_processes_are_removed(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()
    dead_file = tmp_path / f".tmp-{host}-{ended.pid}-a_T1.nii.gz"
    dead_folder = tmp_path / f".tmp-{host}-{ended.pid}-a_T1_dicom"  # a DICOM series being written
    kept = [
        temporary_path(tmp_path / "b_T1.nii.gz"),  # this process: still writing
        tmp_path / f".tmp-{host}-{os.getppid()}-c_T1.nii.gz",  # a running process
        tmp_path / f".tmp-another-host-{ended.pid}-d_T1.nii.gz",  # a shared folder: another machine's process
        tmp_path / f".tmp-{host}-{ended.pid}-",  # no output name: not ours
        tmp_path / "e_T1.nii.gz",  # an output
    ]
    dead_file.write_bytes(b"x")
    (dead_folder / "1.dcm").parent.mkdir()
    (dead_folder / "1.dcm").write_bytes(b"x")
    (tmp_path / "outputs").mkdir()
    nested = tmp_path / "outputs" / dead_file.name  # not below the folder itself
    for path in (*kept, nested):
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == sorted([dead_file, dead_folder])
    assert sorted(tmp_path.rglob("*")) == sorted([*kept, tmp_path / "outputs", nested])


def test_failure_reason_is_the_innermost_error_on_one_line(tmp_path):
    # MONAI's Compose wraps a transform's error in "applying transform <Compose object at 0x…>"
    try:
        try:
            (tmp_path / "no-such-folder" / "out.nii.gz").write_bytes(b"")
        except OSError as error:
            raise RuntimeError("applying transform <monai.transforms.compose.Compose object at 0x7f>") from error
    except RuntimeError as wrapped:
        assert failure_reason(wrapped) == (
            f"FileNotFoundError: [Errno 2] No such file or directory: '{tmp_path / 'no-such-folder' / 'out.nii.gz'}'"
        )
    assert failure_reason(RuntimeError("Exception thrown in SimpleITK\nsitk::ERROR: Unable to read")) == (
        "RuntimeError: Exception thrown in SimpleITK sitk::ERROR: Unable to read"
    )
    data_error = DataError("a.nii.gz", "contains 3 NaN/Inf voxels", "finite intensities")
    try:
        raise RuntimeError("applying transform") from data_error
    except RuntimeError as wrapped:
        assert failure_reason(wrapped) == "a.nii.gz: contains 3 NaN/Inf voxels (expected finite intensities)"


def test_output_folder_is_created_and_written_to_before_any_case(tmp_path):
    assert check_output_folder(tmp_path / "a" / "b") == (tmp_path / "a" / "b").resolve()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the write check leaves nothing
    (tmp_path / "cases").mkdir()
    datalist = tmp_path / "cases" / "datalist.json"
    datalist.write_text("[]")
    # beside a datalist is allowed: only the files it lists are read
    assert check_output_folder(tmp_path / "cases" / "out", datalist) == (tmp_path / "cases" / "out").resolve()
    # a BIDS dataset's derivatives/ too (where BIDS puts outputs): the search for cases leaves it out
    bids = tmp_path / "bids"
    (bids / "sub-01").mkdir(parents=True)
    (bids / "dataset_description.json").write_text("{}")
    output = bids / "derivatives" / "agi-monai"
    assert check_output_folder(output, bids) == output.resolve()
    assert [folder for folder, _ in walk_folders(bids)] == [str(bids), str(bids / "sub-01")]
    with pytest.raises(DataError, match="is the input folder or inside it"):  # not without dataset_description.json
        check_output_folder(tmp_path / "cases" / "derivatives" / "agi-monai", tmp_path / "cases")
    # a hidden folder of the input is not searched for cases either, so outputs may go there
    hidden = tmp_path / "cases" / ".synth" / "run1"
    assert check_output_folder(hidden, tmp_path / "cases") == hidden.resolve()
    assert hidden.is_dir() and not any(".synth" in folder for folder, _ in walk_folders(tmp_path / "cases"))


@pytest.mark.parametrize("problem", ["inside the input", "the input itself", "is a file", "parent is a file"])
def test_output_folder_that_cannot_serve_is_named_with_why(tmp_path, problem):
    cases = tmp_path / "cases"
    cases.mkdir()
    (tmp_path / "file").write_text("")
    folder, expected = {
        "inside the input": (cases / "out", f"is the input folder or inside it ({cases}) (expected another folder: "
                                            "outputs there would be read as inputs by a later run)"),
        "the input itself": (cases, f"is the input folder or inside it ({cases}) (expected another folder: outputs "
                                    "there would be read as inputs by a later run)"),
        "is a file": (tmp_path / "file", "is a file (expected a folder for the outputs)"),
        "parent is a file": (tmp_path / "file" / "out", "cannot be written (Not a directory) (expected a folder this "
                                                        "user can create and write files in)"),
    }[problem]
    with pytest.raises(DataError) as raised:
        check_output_folder(folder, cases)
    assert str(raised.value) == f"{folder}: {expected}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases", "file"] and list(cases.iterdir()) == []


def test_output_inside_the_input_is_refused_without_touching_anything(tmp_path):
    # checked before a model loads (the Deploy app), so it must create nothing
    cases = tmp_path / "cases"
    cases.mkdir()
    datalist = tmp_path / "datalist.json"
    datalist.write_text("{}")
    with pytest.raises(DataError, match=r"out: is the input folder or inside it"):
        refuse_output_in_input(cases / "out", cases)
    with pytest.raises(DataError, match=r"datalist.json: is the input file \(expected another folder for the outputs\)"):
        refuse_output_in_input(datalist, datalist)
    refuse_output_in_input(tmp_path / "out", cases)  # beside the input: fine
    refuse_output_in_input(tmp_path / "out", datalist)
    refuse_output_in_input(cases / "out", None)
    assert not (cases / "out").exists() and not (tmp_path / "out").exists()


def test_read_only_output_folder_is_refused(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root (or on a file system that ignores modes): chmod 555 does not stop writes")
        with pytest.raises(DataError) as raised:
            check_output_folder(folder)
        assert str(raised.value) == (f"{folder}: cannot be written (Permission denied) (expected a folder this user "
                                     "can create and write files in)")
    finally:
        folder.chmod(0o755)


def test_nifti_writer_marks_its_file_with_the_description_and_keeps_geometry(tmp_path):
    import nibabel as nib
    import numpy as np
    import torch
    from monai.data import MetaTensor

    from agi_monai.data import AtomicNibabelWriter, synthetic_description

    affine = np.diag([0.9, 1.1, 3.0, 1.0])
    affine[:3, 3] = (-90.0, 120.0, -60.0)
    image = MetaTensor(torch.rand(1, 6, 5, 4), affine=torch.as_tensor(affine))
    description = synthetic_description("T1Gd", ["T1", "T2", "FLAIR"], "brats_t1_t2_flair_to_t1gd")
    writer = AtomicNibabelWriter(description=description, output_dtype=np.float32)
    writer.set_data_array(image, channel_dim=0)
    writer.set_metadata(image.meta, resample=False)
    writer.write(tmp_path / "case_T1Gd.nii.gz")
    written = nib.load(tmp_path / "case_T1Gd.nii.gz")
    assert written.header["descrip"].item() == b"SYNTHETIC T1Gd from T1,T2,FLAIR by brats_t1_t2_flair_to_t1gd"
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    assert written.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(np.asarray(written.dataobj), image[0].numpy(), atol=1e-7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_T1Gd.nii.gz"]

    # an input's sform/qform codes are kept (here: aligned to another file, no qform), with its affine
    source = nib.Nifti1Image(np.arange(120, dtype=np.float32).reshape(6, 5, 4), affine)
    source.set_sform(affine, code=2)
    source.set_qform(affine, code=0)
    nib.save(source, tmp_path / "aligned.nii.gz")
    from agi_monai.data import load_volume

    loaded = load_volume(tmp_path / "aligned.nii.gz")
    writer.set_data_array(loaded, channel_dim=0)
    writer.set_metadata(loaded.meta, resample=False)
    writer.write(tmp_path / "codes_T1Gd.nii.gz")
    written = nib.load(tmp_path / "codes_T1Gd.nii.gz")
    assert (int(written.header["sform_code"]), int(written.header["qform_code"])) == (2, 0)
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)

    assert len(synthetic_description("T1Gd", ["T1", "T2", "FLAIR"], "x" * 100)) == 80  # cut to the header's field
    with pytest.raises(ValueError, match="expected at most 80 bytes"):
        AtomicNibabelWriter(description="x" * 81)


def write_synthesized_outputs(nifti: Path, series: Path | None = None, seed: int = 0) -> None:
    """A small synthesized NIfTI (marked SYNTHETIC) and, given ``series``, the derived DICOM series made from it: what a
    run leaves (an output of another kind is never set aside: see the test below)."""
    import numpy as np
    import SimpleITK as sitk

    from agi_monai.data import synthetic_description
    from agi_monai.data.dicom import write_derived_series

    import nibabel as nib

    volume = sitk.GetImageFromArray(np.random.default_rng(seed).random((3, 6, 6)).astype(np.float32))
    image = nib.Nifti1Image(sitk.GetArrayFromImage(volume).T, np.eye(4))
    image.header["descrip"] = synthetic_description("FLAIR", ["T1", "T2"], "test")
    nib.save(image, nifti)
    if series is not None:
        write_derived_series(volume, series, series_description="SYNTHETIC FLAIR", derivation_description="test",
                             case_id="c1", overwrite=True)


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_earlier_case_outputs_survive_a_leftover_of_a_killed_process_of_the_same_number(tmp_path):
    # a restarted container gets its host name and process number again: the set-aside names of a run killed there
    # are this process's names (before: OSError "Directory not empty", and a hard link left behind)
    from agi_monai.data.files import EarlierCaseOutputs

    nifti, series = tmp_path / "c1_FLAIR.nii.gz", tmp_path / "c1_FLAIR_dicom"
    write_synthesized_outputs(nifti, series)
    earlier_outputs = contents(tmp_path)
    for leftover in (temporary_path(tmp_path / "earlier-c1_FLAIR_dicom"), temporary_path(tmp_path / "earlier-c1_FLAIR.nii.gz")):
        leftover.mkdir() if leftover.name.endswith("dicom") else leftover.write_bytes(b"killed run")
    (temporary_path(tmp_path / "earlier-c1_FLAIR_dicom") / "IM_0001.dcm").write_bytes(b"killed run")
    earlier = EarlierCaseOutputs(nifti, series)
    with atomic_output(nifti) as temporary:  # as every NIfTI is written: a new file renamed onto the name
        temporary.write_bytes(b"new NIfTI")
    assert earlier.nifti_replaced()
    earlier.restore()
    assert contents(tmp_path) == earlier_outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1_FLAIR.nii.gz", "c1_FLAIR_dicom"]


def test_earlier_case_outputs_of_a_linked_series_folder_leave_nothing_behind(tmp_path):
    from agi_monai.data.files import EarlierCaseOutputs

    store = tmp_path / "store"
    write_synthesized_outputs(tmp_path / "first.nii.gz", store)
    stored = contents(store)
    output = tmp_path / "out"
    output.mkdir()
    nifti, series = output / "c1_FLAIR.nii.gz", output / "c1_FLAIR_dicom"
    series.symlink_to(store, target_is_directory=True)  # e.g. a folder kept on other storage
    earlier = EarlierCaseOutputs(nifti, series)
    with atomic_output(nifti) as temporary:
        temporary.write_bytes(b"new NIfTI")
    earlier.settle()  # a new NIfTI without a new series: the earlier (linked) series goes, the store stays
    assert sorted(p.name for p in output.iterdir()) == ["c1_FLAIR.nii.gz"]  # before: the set-aside link was left
    assert contents(store) == stored


def test_a_report_may_replace_an_earlier_report_only(tmp_path):
    from agi_monai.bundle import SynthesisSummary
    from agi_monai.data import check_report_path

    report = SynthesisSummary(tmp_path / "out", target="FLAIR").write_report(tmp_path / "report.json")
    assert check_report_path(report, output_dir=tmp_path / "out") == report  # a rerun rewrites its report
    (tmp_path / "notes.json").write_text('{"task": "mine"}')
    with pytest.raises(DataError, match="exists and is not a report of an earlier run"):
        check_report_path(tmp_path / "notes.json")


BIDS_NAMES = {  # target -> the output's name for case sub-01_ses-2 in a BIDS derivative
    "T1": "sub-01_ses-2_desc-synthetic_T1w", "T2": "sub-01_ses-2_desc-synthetic_T2w",
    "PD": "sub-01_ses-2_desc-synthetic_PDw", "FLAIR": "sub-01_ses-2_desc-synthetic_FLAIR",
    "T1Gd": "sub-01_ses-2_ce-gadolinium_desc-synthetic_T1w", "seg": "sub-01_ses-2_desc-tumor_dseg",
}


@pytest.mark.parametrize("target", sorted(BIDS_NAMES))
def test_outputs_in_a_bids_derivative_take_bids_names_and_read_back(tmp_path, target):
    from agi_monai.data import case_id_of_output, is_bids_derivative, parse_filename, synthesis_output_paths

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "raw", "BIDSVersion": "1.9.0"}')
    derivative = bids / "derivatives" / "agi-monai"  # need not exist yet: the name is decided before it is made
    assert is_bids_derivative(derivative) and not is_bids_derivative(bids) and not is_bids_derivative(tmp_path)
    nifti, series = synthesis_output_paths("sub-01_ses-2", target, derivative)
    anat = derivative / "sub-01" / "ses-2" / "anat"
    assert (nifti, series) == (anat / f"{BIDS_NAMES[target]}.nii.gz", anat / f"{BIDS_NAMES[target]}_dicom")
    assert case_id_of_output(nifti, target, derivative) == "sub-01_ses-2"
    # discovery reads a synthesized contrast back as the session's contrast (a label map is no contrast)
    assert parse_filename(nifti.name) == (None if target == "seg" else ("sub-01_ses-2", target))
    no_session = synthesis_output_paths("sub-01", target, derivative)[0]
    assert no_session.parent == derivative / "sub-01" / "anat" and case_id_of_output(no_session, target, derivative) == "sub-01"
    # the flat name: a case that is no BIDS subject in a derivative, any case elsewhere
    for case_id, folder in [("BraTS-GLI-00001-000", derivative), ("sub-01_ses-2", tmp_path / "out")]:
        flat = synthesis_output_paths(case_id, target, folder)
        assert flat == (folder / f"{case_id}_{target}.nii.gz", folder / f"{case_id}_{target}_dicom")
        assert case_id_of_output(flat[0], target, folder) == case_id
    # a flat name that ends like a BIDS one (a case ID "sub-01_desc-synthetic"): read by where it lies (review)
    odd_id = "sub-01" + BIDS_NAMES[target][len("sub-01_ses-2"):].rsplit("_", 1)[0]  # e.g. sub-01_desc-synthetic
    odd = synthesis_output_paths(odd_id, target, derivative)[0]
    assert odd.parent == derivative and case_id_of_output(odd, target, derivative) == odd_id
    # a derivative dataset of its own (outside a raw dataset) says so in its dataset_description.json
    standalone = tmp_path / "synthesized"
    standalone.mkdir()
    (standalone / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    assert not is_bids_derivative(standalone)  # a raw dataset (no DatasetType): outputs are not written into one
    (standalone / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}')
    assert synthesis_output_paths("sub-01_ses-2", target, standalone)[0].parent == standalone / "sub-01" / "ses-2" / "anat"


def test_a_bids_derivative_folder_is_described_once_and_derivatives_itself_is_refused(tmp_path, caplog):
    import json

    from agi_monai import __version__

    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "raw", "BIDSVersion": "1.9.0"}')
    with pytest.raises(DataError, match=r"is the derivatives/ folder of a BIDS dataset itself \(expected a pipeline's "
                                        r"folder inside it, e\.g\. .*derivatives/agi-monai\)"):
        check_output_folder(bids / "derivatives", bids)
    assert not (bids / "derivatives").exists()
    output = bids / "derivatives" / "agi-monai"
    check_output_folder(output, bids)
    assert sorted(p.name for p in output.iterdir()) == [".bidsignore", "dataset_description.json"]
    description = json.loads((output / "dataset_description.json").read_text())
    assert description == {
        "Name": "agi-monai synthesized MR contrasts", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "agi-monai", "Version": __version__,
                         "Description": "AGI-Net synthesis of a missing MR contrast (research use only)"}],
    }
    # a user's own description and .bidsignore are left as they are
    (output / "dataset_description.json").write_text('{"Name": "mine", "DatasetType": "derivative"}')
    (output / ".bidsignore").write_text("extra/\n")
    # a killed run's temporary output in a subject's anat/ folder is removed by the next run's check
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    anat = output / "sub-01" / "ses-2" / "anat"
    anat.mkdir(parents=True)
    left = anat / f".tmp-{socket.gethostname()}-{ended.pid}-sub-01_ses-2_desc-synthetic_FLAIR.nii.gz"
    left.write_bytes(b"half a volume")
    with caplog.at_level(logging.WARNING, logger="agi_monai.data.files"):
        check_output_folder(output, bids)
    assert not left.exists() and f"left in {anat}: {left.name}" in caplog.text
    assert (output / "dataset_description.json").read_text() == '{"Name": "mine", "DatasetType": "derivative"}'
    assert (output / ".bidsignore").read_text() == "extra/\n"
    # outside a BIDS dataset nothing is added, nor for outputs that are no synthesis (convert-dicom's NIfTI)
    check_output_folder(tmp_path / "flat")
    assert list((tmp_path / "flat").iterdir()) == []
    check_output_folder(bids / "derivatives" / "nifti", bids, synthesis=False)
    assert list((bids / "derivatives" / "nifti").iterdir()) == []


def test_monai_saveimage_with_the_case_layout_writes_where_the_cli_looks(tmp_path):
    # the bundles' writer (MONAI SaveImaged with CaseOutputLayout, after NameAfterCased): the label map of a BIDS
    # case in a derivative, with the prediction's geometry
    import nibabel as nib
    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SaveImaged

    from agi_monai.data import AtomicNibabelWriter, CaseOutputLayout, NameAfterCased, synthesis_output_paths

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text("{}")
    output = bids / "derivatives" / "segmentation"
    affine = np.diag([0.9, 1.1, 3.0, 1.0])
    labels = MetaTensor(torch.randint(0, 4, (1, 6, 5, 4)).float(), affine=torch.as_tensor(affine))
    save = SaveImaged("pred", folder_layout=CaseOutputLayout(output, "seg"), output_dtype=np.uint8, resample=False,
                      print_log=False, writer=AtomicNibabelWriter)
    for case_id in ("sub-07", "case 3"):
        save(NameAfterCased("pred")({"pred": labels.clone(), "case_id": case_id}))
        written = synthesis_output_paths(case_id, "seg", output)[0]
        np.testing.assert_array_equal(np.asarray(nib.load(written).dataobj), labels[0].numpy().astype(np.uint8))
        np.testing.assert_allclose(nib.load(written).affine, affine, atol=1e-6)
    assert sorted(str(p.relative_to(output)) for p in output.rglob("*.nii.gz")) == [
        "case 3_seg.nii.gz", "sub-07/anat/sub-07_desc-tumor_dseg.nii.gz"]


def test_an_acquired_file_or_series_under_an_outputs_name_is_never_set_aside(tmp_path):
    # before: EarlierCaseOutputs (--overwrite in the CLI and the Deploy app) renamed any folder named like the DICOM
    # output aside and removed it once the new outputs were written, an acquired series included
    import numpy as np
    import SimpleITK as sitk

    from agi_monai.data import DataError, refuse_foreign_outputs, write_dicom_series
    from agi_monai.data.dicom import write_derived_series
    from agi_monai.data.files import EarlierCaseOutputs

    volume = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 8, 8)).astype(np.float32))
    nifti, series = tmp_path / "P01_FLAIR.nii.gz", tmp_path / "P01_FLAIR_dicom"
    write_dicom_series(volume, series, "AX FLAIR", "P01", 3)  # as a scanner's export: not agi-monai's
    acquired = sorted(p.read_bytes() for p in series.iterdir())
    with pytest.raises(DataError, match=r"P01_FLAIR_dicom: exists and was not written by a synthesis \(its DICOM files' "
                                        r"Manufacturer is not agi-monai\), so it is left as it was"):
        EarlierCaseOutputs(nifti, series)
    assert sorted(p.read_bytes() for p in series.iterdir()) == acquired and sorted(tmp_path.iterdir()) == [series]
    import nibabel as nib

    acquired_scan = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    nib.save(acquired_scan, nifti)
    with pytest.raises(DataError, match=r"P01_FLAIR.nii.gz: exists and was not written by a synthesis \(its NIfTI"):
        refuse_foreign_outputs(nifti, tmp_path / "absent_dicom")
    # an output cut short inside its header: not called "not written by a synthesis" (unknown), still left alone
    acquired_scan.header["descrip"] = b"SYNTHETIC FLAIR from T1,T2 by a test"
    nib.save(acquired_scan, nifti)
    nifti.write_bytes(nifti.read_bytes()[:40])
    with pytest.raises(DataError, match=r"P01_FLAIR.nii.gz: exists but its NIfTI header cannot be read \(cut short\?\)"):
        refuse_foreign_outputs(nifti, tmp_path / "absent_dicom")
    # a synthesis's own series (write_derived_series marks every file) and a missing output pass
    nifti.unlink()
    write_derived_series(volume, series, series_description="SYNTHETIC FLAIR", derivation_description="test",
                         case_id="P01", overwrite=True)
    refuse_foreign_outputs(nifti, series)
    EarlierCaseOutputs(nifti, series).restore()
    assert sorted(tmp_path.iterdir()) == [series]


def test_an_output_reached_through_a_link_in_the_input_is_inside_it(tmp_path):
    # before: only the resolved paths were compared, while the search for cases follows linked folders, so a later run
    # read the synthesized image back as an input contrast
    cases, elsewhere = tmp_path / "cases", tmp_path / "elsewhere"
    (cases / "a").mkdir(parents=True)
    (elsewhere / "out").mkdir(parents=True)
    (cases / "linked").symlink_to(elsewhere)
    for output in (elsewhere / "out", cases / "linked" / "out", elsewhere, elsewhere / "out" / "new"):
        with pytest.raises(DataError, match=f"is inside the input folder {cases}, through its link {cases / 'linked'}"):
            check_output_folder(output, cases)
    assert not (elsewhere / "out" / "new").exists()
    check_output_folder(tmp_path / "other", cases)  # outside the input and its links
    # a link to a BIDS dataset: its derivatives/ is still where outputs go
    (elsewhere / "dataset_description.json").write_text("{}")
    check_output_folder(elsewhere / "derivatives" / "agi-monai", cases)


def test_a_pipeline_folder_linked_to_scratch_storage_is_still_a_bids_derivative(tmp_path):
    # review: is_bids_derivative resolved the links first, so <bids>/derivatives/agi-monai -> /scratch/... lost the
    # BIDS names and its dataset_description.json
    from agi_monai.data import is_bids_derivative, synthesis_output_paths

    bids, scratch = tmp_path / "bids", tmp_path / "scratch" / "agi-monai"
    (bids / "derivatives").mkdir(parents=True)
    scratch.mkdir(parents=True)
    (bids / "dataset_description.json").write_text("{}")
    linked = bids / "derivatives" / "agi-monai"
    linked.symlink_to(scratch, target_is_directory=True)
    assert is_bids_derivative(linked) and not is_bids_derivative(scratch)
    assert check_output_folder(linked, bids) == scratch
    assert (scratch / "dataset_description.json").is_file()  # so the resolved folder says it is one too
    assert is_bids_derivative(scratch)
    for folder in (linked, scratch):
        assert synthesis_output_paths("sub-01", "FLAIR", folder)[0] == folder / "sub-01" / "anat" / "sub-01_desc-synthetic_FLAIR.nii.gz"


def test_the_folder_walk_leaves_out_hidden_files_and_folders_and_says_which(tmp_path):
    # AppleDouble "._<image>" files, .DS_Store, a trash folder and a file server's .snapshot/ were searched as input
    # (a fake case per image, every real case a duplicate); our own temporary outputs are ".tmp-*" as well
    root = tmp_path / ".cache" / "dataset"  # a hidden root (under a hidden folder) is searched all the same
    (root / "P01" / ".snapshot" / "hourly.0").mkdir(parents=True)
    (root / ".Trash-1000" / "files").mkdir(parents=True)
    for name in ("P01-t1.nii.gz", "._P01-t1.nii.gz", ".DS_Store", ".snapshot/hourly.0/P01-t1.nii.gz"):
        (root / "P01" / name).write_bytes(b"")
    (root / ".Trash-1000" / "files" / "P02-t1.nii.gz").write_bytes(b"")
    hidden = []
    walked = list(walk_folders(root, hidden=hidden))
    assert walked == [(str(root), []), (str(root / "P01"), ["P01-t1.nii.gz"])]
    assert hidden == [str(root / ".Trash-1000"), str(root / "P01" / ".DS_Store"), str(root / "P01" / "._P01-t1.nii.gz"),
                      str(root / "P01" / ".snapshot")]
    assert list(walk_folders(root)) == walked  # without a list to fill, the same walk
