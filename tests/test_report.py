"""scripts/report.py on fixture files written here: summaries compared, per-case tables, a robustness sweep
(markdown + PNG), and a synthesis panel from NIfTI volumes cut from the shipped BraTS case."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch

from agi_monai.data import Failure, write_json
from agi_monai.evaluation import brain_mask, protocol_record, slice_protocol, synthesis_panel
from agi_monai.evaluation.tables import CASES_CSV, SUMMARY_JSON, read_csv, summarize, write_csv
from helpers import DATA, REPO, SUBPROCESS_ENV, load_script

CASE = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"


REPORT = load_script("report.py")


def _evaluation(
    folder: Path, psnr: list[float], ssim: list[float], mae: list[float], description: dict | None = None,
    failures: tuple[Failure, ...] = (), **settings,
) -> Path:
    """An evaluation folder as evaluate.json writes it, from hand-chosen per-case values (protocol slice2d)."""
    rows = [
        {"case_id": f"case{i}", "slice2d_psnr_db": p, "slice2d_ssim_pct": s, "slice2d_mae_x100": m, "slice2d_slices": 80.0}
        for i, (p, s, m) in enumerate(zip(psnr, ssim, mae))
    ]
    write_csv(rows, folder / CASES_CSV)
    protocols = {"slice2d": protocol_record("slice2d", **settings)}
    write_json(summarize(rows, protocols, failures, description), folder / SUMMARY_JSON)
    return folder


def test_compare_puts_runs_side_by_side(tmp_path):
    agi = _evaluation(tmp_path / "agi" / "eval", [24.0, 26.0], [90.0, 92.0], [2.0, 2.5])
    res = _evaluation(tmp_path / "res" / "eval", [23.0, 23.0, 26.0], [89.0, 89.0, 89.0], [3.0, 3.0, 3.0])
    text = REPORT.compare(f"AGI-Net={agi}", f"ResUNet={res / SUMMARY_JSON}", output=str(tmp_path / "cmp.md"))
    assert (tmp_path / "cmp.md").read_text() == text
    lines = text.splitlines()
    # the means are over different cases (case0, case1 vs case0..case2): said above the tables
    assert lines[0] == ("Note: the runs were evaluated on different cases, so their means are not over the same "
                        "cases: AGI-Net: 2 cases, none failed; ResUNet: 3 cases, none failed.")
    assert lines[2] == "### 2D slice, the paper's (`slice2d`): data range 1, mask: brain mask"
    # mean ± population std (median): 25 ± 1 (25); 24 ± sqrt(2) (23)
    assert "| AGI-Net | 25.00 ± 1.00 (25.00) | 91.00 ± 1.00 (91.00) | 2.25 ± 0.25 (2.25) | 2 |" in lines
    assert "| ResUNet | 24.00 ± 1.41 (23.00) | 89.00 ± 0.00 (89.00) | 3.00 ± 0.00 (3.00) | 3 |" in lines
    assert "slices whose brain mask covers >= 5% of the slice" in text
    # a bare folder is named after itself
    assert "| eval | 25.00 ± 1.00 (25.00) |" in REPORT.compare(str(agi))


def test_compare_refuses_two_runs_of_one_name_in_one_line_and_prints_each_table_once(tmp_path):
    agi = _evaluation(tmp_path / "agi" / "eval", [24.0, 26.0], [90.0, 92.0], [2.0, 2.5])
    res = _evaluation(tmp_path / "res" / "eval", [23.0, 23.0, 26.0], [89.0, 89.0, 89.0], [3.0, 3.0, 3.0])
    script = [sys.executable, str(REPO / "scripts" / "report.py"), "compare"]
    for runs in ([str(agi), str(res)], [f"AGI={agi}", f"AGI={res}"]):  # bare paths: both are called "eval"
        result = subprocess.run([*script, *runs], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stdout == "", result.stderr[-2000:]
        assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1:] == [
            f"report.py: error: {res} and {agi} are both named '{runs[0].partition('=')[0] if '=' in runs[0] else 'eval'}'; "
            "expected one name per run: give NAME=PATH"
        ], result.stderr[-2000:]
    result = subprocess.run([*script, f"AGI-Net={agi}", f"ResUNet={res}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.count("| AGI-Net | 25.00") == 1, result.stdout


def test_compare_refuses_runs_under_different_protocol_settings(tmp_path):
    five = _evaluation(tmp_path / "a", [24.0], [90.0], [2.0])
    whole = _evaluation(tmp_path / "b", [30.0], [95.0], [1.0], region="slice")
    with pytest.raises(ValueError, match=r"used different 'slice2d' settings"):
        REPORT.compare(f"a={five}", f"b={whole}")
    with pytest.raises(ValueError, match="not_there.*no such file"):
        REPORT.compare(f"a={tmp_path / 'not_there'}")


def test_compare_refuses_runs_of_different_targets_or_inputs_and_notes_different_cases(tmp_path):
    flair = {"bundle": "brats_t1_t2_to_flair", "inputs": ["T1", "T2"], "target": "FLAIR", "split": "test"}
    t1gd = {"bundle": "brats_t1_t2_flair_to_t1gd", "inputs": ["T1", "T2", "FLAIR"], "target": "T1Gd", "split": "test"}
    a = _evaluation(tmp_path / "a", [24.0, 26.0], [90.0, 92.0], [2.0, 2.5], flair)
    b = _evaluation(tmp_path / "b", [20.0, 22.0], [80.0, 82.0], [3.0, 3.5], t1gd)
    with pytest.raises(ValueError, match=r"^runs 'FLAIR-run' and 'T1Gd-run': synthesize different targets "
                                         r"\(FLAIR-run: FLAIR; T1Gd-run: T1Gd\) \(expected runs of one target"):
        REPORT.compare(f"FLAIR-run={a}", f"T1Gd-run={b}")
    t1gd_from_three = _evaluation(tmp_path / "c", [24.0, 26.0], [90.0, 92.0], [2.0, 2.5], {**flair, "inputs": ["T1"]})
    with pytest.raises(ValueError, match=r"^runs 'a' and 'c': synthesize from different inputs \(a: T1, T2; c: T1\)"):
        REPORT.compare(f"a={a}", f"c={t1gd_from_three}")
    # the same task, channels in another order, on the same cases without failures: no note
    same = _evaluation(tmp_path / "d", [25.0, 25.0], [91.0, 91.0], [2.0, 2.0], {**flair, "inputs": ["T2", "T1"]})
    assert REPORT.compare(f"a={a}", f"d={same}").startswith("### 2D slice")
    # one case fewer and two failed: compared, with each run's evaluated and failed cases above the tables
    failures = (Failure("case1", "file not found"), Failure("case2", "contains NaN"))
    partial = _evaluation(tmp_path / "e", [24.0], [90.0], [2.0], flair, failures)
    text = REPORT.compare(f"a={a}", f"e={partial}")
    assert text.splitlines()[0] == ("Note: the runs were evaluated on different cases, so their means are not over "
                                    "the same cases: a: 2 cases, none failed; e: 1 case, 2 failed (case1, case2).")
    assert "| a | 25.00 ± 1.00 (25.00) |" in text and "| e | 24.00 ± 0.00 (24.00) |" in text


def test_compare_names_a_corrupt_summary_in_one_line(tmp_path):
    for name, content in (("truncated", '{\n  "protocols": {\n    "slice2d": {'), ("empty", '{"protocols": \n\n')):
        (tmp_path / name).mkdir()
        (tmp_path / name / SUMMARY_JSON).write_text(content)
    with pytest.raises(ValueError, match=r"truncated/metrics_summary.json: is not valid JSON: Expecting property name "
                                         r"enclosed in double quotes at line 3 column 17 \(expected the metrics_summary"):
        REPORT.compare(f"a={tmp_path / 'truncated'}")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "report.py"), "compare", f"a={tmp_path / 'empty'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"report.py: error: {tmp_path / 'empty' / SUMMARY_JSON}: is not valid JSON: Expecting value at line 3 "
        "column 1 (expected the metrics_summary.json an evaluation writes)")


def test_case_ids_that_look_like_numbers_stay_as_written(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text("case_id,site,slice2d_psnr_db,slice2d_slices\n00042,7,24.5,80\n1e3,x,inf,81\n42,07,20,79\nnan,8,21,78\n")
    rows = read_csv(path)
    assert [row["case_id"] for row in rows] == ["00042", "1e3", "42", "nan"]
    # a text column (a cell is not a number) is text in every row; metric columns are numbers
    assert [row["site"] for row in rows] == ["7", "x", "07", "8"]
    assert [row["slice2d_psnr_db"] for row in rows] == [24.5, float("inf"), 20.0, 21.0]
    text = REPORT.cases(str(path))
    assert "| 00042 | 7 | 24.50 | 80 |" in text and "| 1e3 | x | inf | 81 |" in text and "| 42 | 07 | 20 | 79 |" in text
    assert [row["site"] for row in read_csv(path, text=["site"])] == ["7", "x", "07", "8"]


def test_cases_table(tmp_path):
    folder = _evaluation(tmp_path / "eval", [24.123, 26.0], [90.0, 92.5], [2.0, 2.5])
    text = REPORT.cases(str(folder))
    assert text.splitlines()[0] == "| case_id | slice2d_psnr_db | slice2d_ssim_pct | slice2d_mae_x100 | slice2d_slices |"
    assert "| case0 | 24.12 | 90 | 2 | 80 |" in text and "| case1 | 26 | 92.50 | 2.50 | 80 |" in text


def _sweep(path: Path) -> Path:
    """Two networks, levels 0 .. 3 px, two cases per level: PSNR = 30 - slope * level +- 0.5."""
    rows = [
        {"network": network, "perturbation": level, "case_id": case, "psnr_db": 30 - slope * level + offset,
         "ssim_pct": 95 - slope * level}
        for network, slope in (("AGI-Net", 1.0), ("ResUNet", 2.0))
        for level in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
        for case, offset in (("a", -0.5), ("b", 0.5))
    ]
    return write_csv(rows, path)


def test_robustness_tables_and_plots_through_the_command_line(tmp_path):
    sweep = _sweep(tmp_path / "sweep.csv")
    output = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "report.py"), "robustness", str(sweep), "--output_dir", str(output),
         "--title", "translation"],
        capture_output=True, text=True, cwd=REPO, timeout=300, env=SUBPROCESS_ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in output.iterdir()) == ["robustness.md", "robustness_psnr_db.png", "robustness_ssim_pct.png"]
    text = (output / "robustness.md").read_text()
    assert "| network | 0 | 0.5 | 1 | 1.5 | 2 | 2.5 | 3 |" in text
    assert "| AGI-Net | 30.00 | 29.50 | 29.00 | 28.50 | 28.00 | 27.50 | 27.00 |" in text
    assert "| ResUNet | 30.00 | 29.00 | 28.00 | 27.00 | 26.00 | 25.00 | 24.00 |" in text
    assert "![psnr_db](robustness_psnr_db.png)" in text
    for metric in ("psnr_db", "ssim_pct"):
        assert matplotlib.image.imread(output / f"robustness_{metric}.png").shape[:2] == (350, 500)


def test_robustness_names_a_missing_column(tmp_path):
    sweep = _sweep(tmp_path / "sweep.csv")
    with pytest.raises(ValueError, match=r"none of the metric columns \['lpips'\]"):
        REPORT.robustness(str(sweep), str(tmp_path), metrics="lpips")
    with pytest.raises(ValueError, match="no column 'model'"):
        REPORT.robustness(str(sweep), str(tmp_path), group="model")


def test_robustness_names_the_file_line_and_column_of_a_bad_cell(tmp_path):
    for name, bad, found in (("letter", "x", "'x'"), ("empty", "", "''")):
        path = tmp_path / f"{name}.csv"
        path.write_text(f"network,perturbation,psnr_db\n1,0,30\n1,1,{bad}\n")
        with pytest.raises(ValueError, match=rf"^{path}: line 3, column 'psnr_db': {found} is not a number \(expected"):
            REPORT.robustness(str(path), str(tmp_path / "out"))
    path = tmp_path / "level.csv"
    path.write_text("network,perturbation,psnr_db\n1,0,30\n1,x,20\n")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "report.py"), "robustness", str(path),
                             "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                            env=SUBPROCESS_ENV)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"report.py: error: {path}: line 3, column 'perturbation': 'x' is not a number (expected a number in every "
        "cell of 'perturbation')")
    # the network column is a name even when it looks like a number
    path.write_text("network,perturbation,psnr_db\n1,0,30\n1,1,20\n")
    assert "| 1 | 30.00 | 20.00 |" in REPORT.robustness(str(path), str(tmp_path / "out"), metrics="psnr_db")


def _block_files(folder: Path) -> tuple[dict[str, Path], np.ndarray]:
    """A 64x64x16 block of the shipped case's T1, T2 and FLAIR as NIfTI files (the case's affine), and the FLAIR
    normalised as the bundles do."""
    affine = nib.load(CASE / "BraTS-GLI-00001-000-t2f.nii.gz").affine
    block = (slice(88, 152), slice(90, 154), slice(70, 86))
    files = {}
    for name, suffix in (("T1", "t1n"), ("T2", "t2w"), ("FLAIR", "t2f")):
        volume = np.asarray(nib.load(CASE / f"BraTS-GLI-00001-000-{suffix}.nii.gz").dataobj, dtype=np.float32)[block]
        files[name] = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), files[name])
    flair = np.asarray(nib.load(files["FLAIR"]).dataobj)
    return files, np.clip(flair / np.percentile(flair, 99.5), 0, 1)


def test_panel_refuses_predictions_off_the_target_grid_or_outside_0_1(tmp_path):
    files, normalised = _block_files(tmp_path)
    affine = nib.load(files["FLAIR"]).affine
    moved = affine.copy()
    moved[:3, 3] += 10.0  # another subject's volume, same size, 10 mm away
    flipped = affine @ np.diag([-1.0, 1.0, 1.0, 1.0])  # another orientation: the same shape in RAS
    for name, grid in (("moved", moved), ("flipped", flipped)):
        nib.save(nib.Nifti1Image(normalised.astype(np.float32), grid), tmp_path / f"{name}.nii.gz")
        with pytest.raises(ValueError, match=rf"{name}.nii.gz: is on another grid: shape \(64, 64, 16\), affine .*"
                                             r"\(expected the target's grid: shape \(64, 64, 16\), affine "):
            REPORT.panel(str(files["FLAIR"]), f"p={tmp_path / name}.nii.gz", str(tmp_path / "panel.png"))
    # the raw T1 (hundreds), on the target's grid, is not a prediction
    with pytest.raises(ValueError, match=r"T1.nii.gz: has intensities in \[\d+, \d+\] \(expected a synthesized volume "
                                         r"in \[0, 1\], as the bundles write it"):
        REPORT.panel(str(files["FLAIR"]), f"raw={files['T1']}", str(tmp_path / "panel.png"))
    assert not (tmp_path / "panel.png").exists()


def test_panel_from_nifti_volumes(tmp_path, monkeypatch):
    """A 64x64x16 block of the shipped case (FLAIR the target, T1 and T2 the inputs); predictions: the FLAIR
    normalised and shifted by +0.1 (clipped), and scaled by 0.8."""
    files, normalised = _block_files(tmp_path)
    affine = nib.load(files["FLAIR"]).affine
    for name, values in (("shifted", np.clip(normalised + 0.1, 0, 1)), ("dark", 0.8 * normalised)):
        nib.save(nib.Nifti1Image(values.astype(np.float32), affine), tmp_path / f"{name}.nii.gz")
    drawn = []

    def recording_panel(**arguments):
        drawn.append(arguments)
        return synthesis_panel(**arguments)

    monkeypatch.setattr(REPORT, "synthesis_panel", recording_panel)
    path = REPORT.panel(
        str(files["FLAIR"]), f"shifted={tmp_path / 'shifted.nii.gz'},dark={tmp_path / 'dark.nii.gz'}",
        str(tmp_path / "panel.png"), inputs=f"T1={files['T1']},T2={files['T2']}", target_name="FLAIR", slice_index=8,
    )
    height, width, _ = matplotlib.image.imread(path).shape
    assert width == (2 + 5) * 200 and 400 <= height <= 460

    # what was drawn, from the files read here with nibabel in RAS (the block's header is LPS): slice 8 of the
    # normalised inputs and target, of the predictions as written; each row's label the whole-volume 2D protocol
    # (hand-checked in test_evaluation.py) with the inputs' brain mask
    def ras(path: Path, normalise: bool) -> np.ndarray:
        volume = np.ascontiguousarray(nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32))
        return np.clip(volume / np.percentile(volume, 99.5), 0, 1) if normalise else volume

    volumes = {name: ras(files[name], True) for name in ("T1", "T2", "FLAIR")}
    predicted = {name: ras(tmp_path / f"{name}.nii.gz", False) for name in ("shifted", "dark")}
    (arguments,) = drawn
    for name in ("T1", "T2"):
        np.testing.assert_allclose(arguments["inputs"][name], volumes[name][..., 8], atol=1e-6)
    np.testing.assert_allclose(arguments["target"], volumes["FLAIR"][..., 8], atol=1e-6)
    mask = brain_mask(torch.from_numpy(np.stack([volumes["T1"], volumes["T2"]])))
    assert list(arguments["predictions"]) == ["shifted", "dark"]
    for name, volume in predicted.items():
        np.testing.assert_allclose(arguments["predictions"][name], volume[..., 8], atol=1e-6)
        expected = slice_protocol(torch.from_numpy(volume), torch.from_numpy(volumes["FLAIR"]), mask).metrics
        assert arguments["metrics"][name] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match=r"expected NAME=PATH"):
        REPORT.panel(str(files["FLAIR"]), str(tmp_path / "dark.nii.gz"), str(tmp_path / "x.png"))
