"""The README demo (scripts/demo.py) end to end with tiny settings: training on the shipped BraTS cases,
synthesis of the held-out TCGA case on its input's grid, metrics next to the baselines, nothing left behind."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
HELD_OUT_T2 = DATA / "tcga-lgg" / "TCGA-FG-6692" / "OtherEXampleFromTCIA_t2_bet.nii.gz"  # the reference grid


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.slow
def test_demo_writes_synthesis_on_the_input_grid_and_finite_metrics(tmp_path):
    output = tmp_path / "demo"
    inputs_before = _snapshot(DATA)
    tiny = ["--iterations", "3", "--channels", "8,16,32,64", "--batch_size", "2", "--crop_size", "64"]
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--output_dir", str(output), "--progress", "False", *tiny],
        capture_output=True, encoding="utf-8", cwd=REPO, timeout=300,
        # one thread: the tiny network's many small operations run 2x slower on 2 threads when the cores are shared
        env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
             "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 0, f"demo failed:\n{result.stdout}\n{result.stderr}"
    written = output / "TCGA-FG-6692_FLAIR_synthesized.nii.gz"
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"demo: FLAIR for TCGA-FG-6692 written to {written}; PSNR ")
    assert "baseline T1-as-FLAIR" in summary or "baseline T2-as-FLAIR" in summary
    assert "trained 3 iterations in " in summary and " s on cpu (" in summary

    synthesized, reference = nib.load(written), nib.load(HELD_OUT_T2)
    assert synthesized.shape == reference.shape
    np.testing.assert_allclose(synthesized.affine, reference.affine, atol=1e-4)
    voxels = np.asarray(synthesized.dataobj)
    assert voxels.dtype == np.float32 and np.isfinite(voxels).all() and 0.0 <= voxels.min() and voxels.max() <= 1.0

    metrics = json.loads((output / "demo_metrics.json").read_text(encoding="utf-8"))
    assert metrics["case_id"] == "TCGA-FG-6692" and metrics["output"] == str(written)
    assert set(metrics["metrics"]) == {"synthesized", "untrained_network", "T1_as_FLAIR", "T2_as_FLAIR"}
    for name, values in metrics["metrics"].items():
        assert set(values) == {"psnr_db", "ssim_pct", "mae_x100"}, name
        assert all(isinstance(v, float) and math.isfinite(v) for v in values.values()), (name, values)
    assert 0 < metrics["evaluated_slices"] <= reference.shape[2]
    assert metrics["training"]["iterations"] == 3 and metrics["training"]["cases"] == [
        "BraTS-GLI-00001-000", "aurora-example"
    ]
    assert math.isfinite(metrics["training"]["final_l1"])

    leftovers = [p for p in output.rglob("*") if "tmp" in p.name.lower() or p.suffix == ".part"]
    assert not leftovers, leftovers
    assert _snapshot(DATA) == inputs_before  # the shipped inputs are only read
