"""scripts/report.py on fixture files written here: summaries compared, per-case tables, a robustness sweep
(markdown + PNG), and a synthesis panel from NIfTI volumes cut from the shipped BraTS case."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch

from agi_monai.data import write_json
from agi_monai.evaluation import brain_mask, protocol_record, slice_protocol, synthesis_panel
from agi_monai.evaluation.tables import CASES_CSV, SUMMARY_JSON, summarize, write_csv

ROOT = Path(__file__).resolve().parent.parent
CASE = ROOT / "tests" / "data" / "brats2023-gli" / "BraTS-GLI-00001-000"


def _script():
    spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REPORT = _script()


def _evaluation(folder: Path, psnr: list[float], ssim: list[float], mae: list[float], **settings) -> Path:
    """An evaluation folder as evaluate.json writes it, from hand-chosen per-case values (protocol slice2d)."""
    rows = [
        {"case_id": f"case{i}", "slice2d_psnr_db": p, "slice2d_ssim_pct": s, "slice2d_mae_x100": m, "slice2d_slices": 80.0}
        for i, (p, s, m) in enumerate(zip(psnr, ssim, mae))
    ]
    write_csv(rows, folder / CASES_CSV)
    write_json(summarize(rows, {"slice2d": protocol_record("slice2d", **settings)}), folder / SUMMARY_JSON)
    return folder


def test_compare_puts_runs_side_by_side(tmp_path):
    agi = _evaluation(tmp_path / "agi" / "eval", [24.0, 26.0], [90.0, 92.0], [2.0, 2.5])
    res = _evaluation(tmp_path / "res" / "eval", [23.0, 23.0, 26.0], [89.0, 89.0, 89.0], [3.0, 3.0, 3.0])
    text = REPORT.compare(f"AGI-Net={agi}", f"ResUNet={res / SUMMARY_JSON}", output=str(tmp_path / "cmp.md"))
    assert (tmp_path / "cmp.md").read_text() == text
    lines = text.splitlines()
    assert lines[0] == "### 2D slice, the paper's (`slice2d`): data range 1, mask: brain mask"
    # mean ± population std (median): 25 ± 1 (25); 24 ± sqrt(2) (23)
    assert "| AGI-Net | 25.00 ± 1.00 (25.00) | 91.00 ± 1.00 (91.00) | 2.25 ± 0.25 (2.25) | 2 |" in lines
    assert "| ResUNet | 24.00 ± 1.41 (23.00) | 89.00 ± 0.00 (89.00) | 3.00 ± 0.00 (3.00) | 3 |" in lines
    assert "slices whose brain mask covers >= 5% of the slice" in text
    # a bare folder is named after itself
    assert "| eval | 25.00 ± 1.00 (25.00) |" in REPORT.compare(str(agi))


def test_compare_refuses_two_runs_of_one_name_in_one_line_and_prints_each_table_once(tmp_path):
    agi = _evaluation(tmp_path / "agi" / "eval", [24.0, 26.0], [90.0, 92.0], [2.0, 2.5])
    res = _evaluation(tmp_path / "res" / "eval", [23.0, 23.0, 26.0], [89.0, 89.0, 89.0], [3.0, 3.0, 3.0])
    script = [sys.executable, str(ROOT / "scripts" / "report.py"), "compare"]
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
        [sys.executable, str(ROOT / "scripts" / "report.py"), "robustness", str(sweep), "--output_dir", str(output),
         "--title", "translation"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
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


def test_panel_from_nifti_volumes(tmp_path, monkeypatch):
    """A 64x64x16 block of the shipped case (FLAIR the target, T1 and T2 the inputs); predictions: the FLAIR
    normalised and shifted by +0.1 (clipped), and scaled by 0.8."""
    affine = nib.load(CASE / "BraTS-GLI-00001-000-t2f.nii.gz").affine
    block = (slice(88, 152), slice(90, 154), slice(70, 86))
    files = {}
    for name, suffix in (("T1", "t1n"), ("T2", "t2w"), ("FLAIR", "t2f")):
        volume = np.asarray(nib.load(CASE / f"BraTS-GLI-00001-000-{suffix}.nii.gz").dataobj, dtype=np.float32)[block]
        files[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), files[name])
    flair = np.asarray(nib.load(files["FLAIR"]).dataobj)
    normalised = np.clip(flair / np.percentile(flair, 99.5), 0, 1)
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
