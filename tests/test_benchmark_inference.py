"""scripts/benchmark_inference.py at a tiny size (widths 8, 32x32 slices, 3 slices; the end-to-end command on a real
case cut to 4 slices): its table and JSON carry the fields docs/benchmarks.md reports, and a bad argument is one
line with exit status 2 before anything is timed. The figures themselves are in docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import pytest

from helpers import CPU_SCRIPT_ENV, DATA, REPO, load_script

GLI = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, str]:
    folder = tmp_path_factory.mktemp("benchmark_inference")
    case = folder / GLI.name
    case.mkdir()
    for name in ("t1n", "t1c", "t2w", "t2f"):  # brats_t1_flair_t1gd_to_t2 reads T1, FLAIR, T1Gd (on T2's grid)
        source = GLI / f"{GLI.name}-{name}.nii.gz"
        nib.save(nib.load(source).slicer[:, :, 76:80], case / source.name)
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_inference.py"), "--slices", "3", "--channels", "8,8,8,8",
         "--size", "32", "--batch_sizes", "2,3", "--warmup", "0", "--repeats", "2", "--threads", "1",
         "--end_to_end_case", str(case), "--out", str(folder / "inference.json")],
        capture_output=True, text=True, timeout=300, env=CPU_SCRIPT_ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((folder / "inference.json").read_text()), result.stdout


def test_network_rows_time_each_network_and_batch_size_with_its_memory(tiny_run):
    results, printed = tiny_run
    rows = results["rows"]
    assert [(r["network"], r["slices_per_batch"]) for r in rows] == [
        ("AGI-Net", 2), ("AGI-Net", 3), ("ResUNet", 2), ("ResUNet", 3)]
    for row in rows:
        assert row["precision"] == "float32" and row["slices"] == 3 and not row["volume_measured"]
        assert len(row["all_seconds"]) == 2 and row["seconds"] == min(row["all_seconds"]) > 0
        assert row["ms_per_slice"] == pytest.approx(1e3 * row["seconds"] / 3)
        assert row["seconds_per_volume"] == pytest.approx(row["seconds"] / 3 * 155)  # a BraTS volume's slices
        # measured in a fresh process: the run's own peak over its start, within the process's whole peak
        assert 0 < row["memory_growth_bytes"] < row["peak_rss_bytes"]
    agi, resunet = rows[0]["parameters"], rows[2]["parameters"]
    assert agi > resunet > 0  # CAGR's routing functions and attention add parameters to the same widths
    assert results["machine"]["torch_threads"] == 1 and results["settings"]["channels"] == [8, 8, 8, 8]
    assert "per volume = per slice × 155 (extrapolated)" in printed and "load average" in printed
    assert "| AGI-Net | " in printed and "| per slice (ms) | per 155-slice volume (s) | memory growth (MiB) |" in printed


def test_end_to_end_times_the_command_and_splits_its_time(tiny_run):
    results, printed = tiny_run
    e2e = results["end_to_end"]
    assert e2e["bundle"] == "brats_t1_flair_t1gd_to_t2" and e2e["slices"] == 4
    assert e2e["outputs"] == [f"{GLI.name}_T2.nii.gz"]
    assert e2e["summary_line"].startswith("agi-monai synthesize: 1 of 1 cases written (T2, NIfTI)")
    parts = ("setup_seconds", "read_preprocess_seconds", "registration_seconds", "network_seconds",
             "restore_write_seconds")
    assert all(e2e[part] >= 0 for part in parts) and e2e["network_seconds"] > 0 and e2e["setup_seconds"] > 0
    assert sum(e2e[part] for part in parts) == pytest.approx(e2e["wall_seconds"])
    assert e2e["registration_seconds"] < 0.5  # a BraTS case is co-registered: nothing to register
    assert "<tmp>" in e2e["command"] and "--network_def#channels=[8,8,8,8]" in e2e["command"]
    assert "| whole command (s) |" in printed


@pytest.mark.parametrize("args, message", [
    (["--batch_sizes", "0"], "--batch_sizes 0: expected comma-separated whole numbers >= 1"),
    (["--channels", "8,8,8"], "--channels (8, 8, 8): expected 4 comma-separated widths, multiples of 8"),
    (["--device", "tpu"], "--device tpu: expected cpu or cuda"),
    (["--size", "60"], "--size 60: expected a multiple of 8"),
    (["--slices", "0"], "--slices 0: expected a whole number >= 1"),
    (["--out", "x.txt"], "--out x.txt: expected a file name ending in .json or .md"),
    (["--end_to_end_case", "/no/such/case"], "--end_to_end_case /no/such/case: expected a case folder"),
    (["--end_to_end_case", str(GLI), "--bundle", "no_such_bundle"],
     "--bundle no_such_bundle: bundle 'no_such_bundle' is neither a bundle folder nor one of: brats_"),
])
def test_a_bad_argument_is_one_line_and_exit_status_2_before_anything_is_timed(args, message, monkeypatch, capsys):
    from agi_monai.cli import run_script

    module = load_script("benchmark_inference.py")
    monkeypatch.setattr(module, "network_rows", lambda *a, **k: pytest.fail("timed before refusing the argument"))
    monkeypatch.setattr(sys, "argv", ["benchmark_inference.py", *args])
    with pytest.raises(SystemExit) as exited:
        run_script(module.main, "benchmark_inference.py")
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("benchmark_inference.py: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and not captured.out
