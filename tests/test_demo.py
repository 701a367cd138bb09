"""The README demo (scripts/demo.py) end to end with tiny settings: the bundle brats_t1_t2_flair_to_t1gd trains
an AGI-Net and a ResUNet on the shipped BraTS cases (its own train.json plus a budget override file), both
synthesize T1Gd for the held-out TCGA case on its input's grid, metrics next to the input-as-T1Gd baselines, a PNG
panel; nothing left behind, inputs and the bundle folder untouched."""

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import CPU_SCRIPT_ENV, DATA, REPO

HELD_OUT_T2 = DATA / "tcga-lgg" / "TCGA-FG-6692" / "OtherEXampleFromTCIA_t2_bet.nii.gz"  # the reference grid


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _run_demo(output: Path, *arguments: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--output_dir", str(output), "--progress", "False",
         *arguments],
        capture_output=True, encoding="utf-8", cwd=REPO, timeout=600,
        env={**CPU_SCRIPT_ENV, "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 0, f"demo failed:\n{result.stdout}\n{result.stderr}"
    return result


def _run_files(folder: Path) -> set[str]:
    """A run folder's files (not the slice cache), relative to it."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and "cache" not in p.parts}


def _record(folder: Path) -> tuple[str, set[str]]:
    """The script and the files named by a run folder's ``replacing_earlier_run`` record."""
    from agi_monai.bundle.run_folder import RECORD_NAME

    record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    return record["script"], {f["path"] for f in record["files"]}


def assert_runs_recorded(output: Path, runs: list[str], script: str) -> None:
    """After a run of ``script`` into ``output``: each run folder holds the record of ``script``'s
    ``replacing_earlier_run``, listing every file the run wrote there (``models/model.pt`` among them; not the slice
    cache), which is what a rerun removes (the rule: test_compare.py's
    ``test_a_rerun_removes_exactly_the_files_the_scripts_earlier_run_wrote``; a rerun end to end: the demo's test)."""
    from agi_monai.bundle.run_folder import RECORD_NAME

    for run in runs:
        files, (recorder, recorded) = _run_files(output / run), _record(output / run)
        assert recorder == script and "models/model.pt" in recorded, (recorder, recorded)
        assert files == recorded | {RECORD_NAME}, files ^ (recorded | {RECORD_NAME})


def assert_rerun_replaced_its_runs(
    output: Path, runs: list[str], script: str, rerun: subprocess.CompletedProcess, first: dict[str, set[str]]
) -> None:
    """After a second run of ``script`` into ``output``: each run folder holds its latest run only (the files its
    record lists: no ``models/earlier_run_*``, no second set of TensorBoard logs), each said so in one line, and a
    person's ``notes.txt`` placed in the first run folder and in ``output`` before the rerun is still there.
    ``first``: each run folder's files after the first run (:func:`files_of`)."""
    from agi_monai.bundle.run_folder import RECORD_NAME

    for index, run in enumerate(runs):
        folder = output / run
        files, (_, recorded) = _run_files(folder), _record(folder)
        notes = {"notes.txt"} if index == 0 else set()
        assert files == recorded | notes | {RECORD_NAME}, files ^ (recorded | notes)
        assert "models/model.pt" in recorded and not list(folder.glob("models/earlier_run_*"))
        # the same files as the first run: names differ only in the TensorBoard logs' time stamps and process id
        assert sorted(f.split(".out.tfevents.")[0] for f in files - notes) == sorted(
            f.split(".out.tfevents.")[0] for f in first[run])
        replacing = f"{script}: replacing its earlier run in {folder}:"
        said = [line for line in rerun.stdout.splitlines() if line.startswith(replacing)]
        assert len(said) == 1 and "models/model.pt" in said[0], said
        assert said[0].endswith("; kept 1 other file(s) (notes.txt)") == (index == 0), said
        assert "earlier_run" not in rerun.stdout + rerun.stderr  # the bundle had nothing left to set aside
    for notes_file in (output / "notes.txt", output / runs[0] / "notes.txt"):
        assert notes_file.read_text() == "a person's notes"


def files_of(output: Path, runs: list[str]) -> dict[str, set[str]]:
    """Each run folder's files (not the slice cache), after the first run; and a person's notes beside them."""
    first = {run: _run_files(output / run) for run in runs}
    for notes_file in (output / "notes.txt", output / runs[0] / "notes.txt"):
        notes_file.write_text("a person's notes")
    return first


@pytest.mark.slow
def test_demo_trains_both_networks_with_the_bundle_and_writes_synthesis_metrics_and_panel(tmp_path):
    from matplotlib.image import imread

    from agi_monai.networks import AGINet, ResUNet

    output = tmp_path / "demo"
    bundle = REPO / "bundles" / "brats_t1_t2_flair_to_t1gd"
    inputs_before, bundle_before = _snapshot(DATA), _snapshot(bundle)
    channels = [8, 16, 32, 64]
    tiny = ["--iterations", "3", "--channels", ",".join(map(str, channels)), "--batch_size", "2", "--crop_size", "64"]
    result = _run_demo(output, *tiny)
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"demo: T1Gd for TCGA-FG-6692 -> {output}; AGI-Net "), summary
    assert " | ResUNet " in summary and "3 iterations each on cpu (" in summary

    reference = nib.load(HELD_OUT_T2)
    for folder in ("agi_net", "resunet"):
        synthesized = nib.load(output / f"TCGA-FG-6692_T1Gd_{folder}.nii.gz")
        assert synthesized.shape == reference.shape
        np.testing.assert_allclose(synthesized.affine, reference.affine, atol=1e-4)
        voxels = np.asarray(synthesized.dataobj)
        assert voxels.dtype == np.float32 and np.isfinite(voxels).all() and 0.0 <= voxels.min() <= voxels.max() <= 1.0

    metrics = json.loads((output / "demo_metrics.json").read_text(encoding="utf-8"))
    assert metrics["case_id"] == "TCGA-FG-6692" and metrics["scenario"]["bundle"] == bundle.name
    assert set(metrics["metrics"]) == {"AGI-Net", "ResUNet", "T1 as T1Gd", "T2 as T1Gd", "FLAIR as T1Gd"}
    for name, values in metrics["metrics"].items():
        assert set(values) == {"psnr_db", "ssim_pct", "mae_x100"}, name
        assert all(isinstance(v, float) and math.isfinite(v) for v in values.values()), (name, values)
    assert 0 < metrics["evaluated_slices"] <= reference.shape[2]
    assert "slice2d" in metrics["protocol"]
    for name, (network_class, folder) in {"AGI-Net": (AGINet, "agi_net"), "ResUNet": (ResUNet, "resunet")}.items():
        run = metrics["training"][name]
        assert run["trained_here"] and run["iterations"] == 3 and set(run["last_losses"]) >= {"l1_loss", "d_loss"}
        overrides = json.loads(Path(run["overrides"]).read_text(encoding="utf-8"))
        assert overrides["network_def#_target_"] == f"agi_monai.networks.{network_class.__name__}"
        assert overrides["network_def#channels"] == channels and overrides["val_interval"] == 3
        assert str(bundle / "configs" / "train.json") in run["command"]
        # the bundle's best-generator checkpoint: generator state only, of the right class and widths
        weights = torch.load(output / folder / "models" / "model.pt", weights_only=True)
        network_class(spatial_dims=2, in_channels=3, out_channels=1, channels=channels).load_state_dict(weights)
        assert run["parameters"] == sum(v.numel() for v in weights.values() if v.is_floating_point())

    panel = imread(output / "demo_panel.png")
    assert panel.ndim == 3 and panel.shape[1] > 2 * panel.shape[0]  # two rows of seven panels
    leftovers = [p for p in output.rglob("*") if "tmp" in p.name.lower() or p.suffix == ".part"]
    assert not leftovers, leftovers
    assert _snapshot(DATA) == inputs_before  # the shipped inputs are only read
    assert _snapshot(bundle) == bundle_before  # the run happens in output_dir, not in the bundle

    # a rerun into the same folder replaces the demo's own runs there, says so, and keeps a person's files (the
    # rerun is checked end to end here only: compare.py and ablation.py use the same run-folder record)
    assert_runs_recorded(output, ["agi_net", "resunet"], "demo.py")
    first = files_of(output, ["agi_net", "resunet"])
    rerun = _run_demo(output, *tiny)
    assert_rerun_replaced_its_runs(output, ["agi_net", "resunet"], "demo.py", rerun, first)
    assert rerun.stdout.strip().splitlines()[-1].startswith(f"demo: T1Gd for TCGA-FG-6692 -> {output}; AGI-Net ")
