"""The misalignment sweep (agi_monai.evaluation.robustness, scripts/robustness_sweep.py): monotone levels; one input
moved exactly by the stated vector (against an analytic image and an independent bilinear shift of a real slice) or
the stated rotation and translation; the sweep's numbers against an independent computation on real slices; CSV,
markdown and PNGs; the script on tiny checkpoints."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from agi_monai.data.transforms import _rotation_matrix
from agi_monai.evaluation import brain_mask, slice_protocol
from agi_monai.evaluation.robustness import misalign, perturbation_levels, robustness_sweep, write_sweep
from agi_monai.evaluation.tables import read_csv
from agi_monai.networks import AGINet, ResUNet
from helpers import CPU_SCRIPT_ENV, DATA, REPO, load_script

CASE = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"
SLICES = slice(70, 82)  # 12 axial slices through the tumour: enough brain, fast


def _bilinear_shift(plane: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``out[i, j] = plane(i - dx, j - dy)``, bilinear, zero outside: the content moved by (dx, dy) pixels."""
    h, w = plane.shape
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    si, sj = i - dx, j - dy
    i0, j0 = np.floor(si).astype(int), np.floor(sj).astype(int)
    fi, fj = si - i0, sj - j0

    def at(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        inside = (a >= 0) & (a < h) & (b >= 0) & (b < w)
        return np.where(inside, plane[np.clip(a, 0, h - 1), np.clip(b, 0, w - 1)], 0.0)

    return (1 - fi) * (1 - fj) * at(i0, j0) + fi * (1 - fj) * at(i0 + 1, j0) + (1 - fi) * fj * at(i0, j0 + 1) \
        + fi * fj * at(i0 + 1, j0 + 1)


def _gaussian(shape, centre, spacing=(1.0, 1.0, 1.0), sigma_mm: float = 3.0) -> np.ndarray:
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    squared = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing))
    return np.exp(-squared / (2 * sigma_mm**2)).astype(np.float32)


@pytest.fixture(scope="module")
def real_case() -> dict:
    """T1 and T2 of the shipped BraTS case (12 axial slices), normalised as the bundles do; target = T2; the mask
    of the inputs."""
    volumes = []
    for suffix in ("t1n", "t2w"):
        volume = np.asarray(nib.load(CASE / f"BraTS-GLI-00001-000-{suffix}.nii.gz").dataobj, dtype=np.float32)
        volumes.append(np.clip(volume / np.percentile(volume, 99.5), 0.0, 1.0)[..., SLICES])
    image = torch.from_numpy(np.stack(volumes))
    return {"image": image, "target": image[1:2].clone(), "mask": brain_mask(image)[None].float(), "case_id": "gli"}


class _CopyInput(torch.nn.Module):
    """A 'generator' returning one of its inputs: its synthesis is exactly that (moved) input."""

    def __init__(self, channel: int) -> None:
        super().__init__()
        self.channel = channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.channel : self.channel + 1]


def test_levels_are_the_papers_seven_and_monotone():
    assert perturbation_levels() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert perturbation_levels(1.0, 0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert perturbation_levels(0.0) == [0.0]
    for maximum, step in ((3.0, 0.0), (-1.0, 0.5), (1.0, 0.3)):
        with pytest.raises(ValueError, match="step"):
            perturbation_levels(maximum, step)


def test_translation_moves_one_channel_by_the_stated_vector_analytic():
    centre = (30.3, 25.7, 1.0)
    image = torch.from_numpy(np.stack([_gaussian((64, 56, 3), centre)] * 2))
    before = image.clone()
    moved, record = misalign(image, "translation", 2.5, channel=1, seed=3)
    dx, dy = record.displacement
    assert record.kind == "translation" and record.channel == 1 and record.level == 2.5
    assert math.hypot(dx, dy) == pytest.approx(2.5, abs=1e-9)
    assert record.as_row()["shift_px"] == pytest.approx(2.5, abs=1e-9)
    expected = _gaussian((64, 56, 3), (centre[0] + dx, centre[1] + dy, centre[2]))
    # bilinear interpolation of a sigma-3 Gaussian: error <= h^2/8 max|f''| ~ 0.014
    np.testing.assert_allclose(moved[1].numpy(), expected, atol=0.02)
    wrong_sign = _gaussian((64, 56, 3), (centre[0] - dx, centre[1] - dy, centre[2]))
    assert np.abs(moved[1].numpy() - wrong_sign).max() > 0.3  # the direction matters at this tolerance
    assert torch.equal(moved[0], image[0]) and torch.equal(image, before)  # the other input and the input untouched
    # the same seed: the same direction at every level, the length as stated
    for level in (0.5, 1.0, 3.0):
        _, other = misalign(image, "translation", level, channel=1, seed=3)
        np.testing.assert_allclose(np.asarray(other.displacement) / level, np.asarray(record.displacement) / 2.5, atol=1e-12)
    unmoved, zero = misalign(image, "translation", 0.0, channel=1, seed=3)
    assert torch.allclose(unmoved, image, atol=1e-6) and zero.displacement == (0.0, 0.0)


def test_translation_of_a_real_slice_matches_an_independent_bilinear_shift(real_case):
    image = real_case["image"]
    moved, record = misalign(image, "translation", 1.5, channel=0, seed=11)
    dx, dy = record.displacement
    for k in (0, 6, 11):
        expected = _bilinear_shift(image[0, ..., k].numpy().astype(np.float64), dx, dy)
        np.testing.assert_allclose(moved[0, 4:-4, 4:-4, k].numpy(), expected[4:-4, 4:-4], atol=1e-4)
    assert torch.equal(moved[1], image[1])


def test_rigid_moves_one_channel_by_the_stated_rotation_and_translation():
    # a blob ~20 mm from the centre (a 3 degree rotation moves it ~1 mm), on an anisotropic grid (2 mm slices)
    shape, spacing, point = (64, 56, 32), np.array([1.0, 1.0, 2.0]), np.array([44.0, 18.0, 20.0])
    blob = _gaussian(shape, point, spacing, sigma_mm=5.0)
    image = MetaTensor(torch.from_numpy(np.stack([blob, blob])), affine=torch.from_numpy(np.diag([*spacing, 1.0])))
    moved, record = misalign(image, "rigid", 3.0, channel=1, seed=5)
    assert record.rotation_deg == pytest.approx(3.0, abs=1e-9) and record.channel == 1
    assert np.linalg.norm(record.displacement) == pytest.approx(3.0, abs=1e-9)
    assert np.linalg.norm(record.rotation_axis) == pytest.approx(1.0, abs=1e-9)
    # the blob's centre, in mm about the volume centre ((n - 1) / 2 voxels), goes to R (p - c) + c + t
    rotation = _rotation_matrix(np.asarray(record.rotation_axis), math.radians(record.rotation_deg))
    centre = (np.array(shape) - 1) / 2
    expected_mm = rotation @ ((point - centre) * spacing) + np.asarray(record.displacement)
    expected_voxel = expected_mm / spacing + centre
    weights = moved[1].numpy().astype(np.float64)
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centroid = np.array([(weights * g).sum() for g in grids]) / weights.sum()
    np.testing.assert_allclose(centroid * spacing, expected_voxel * spacing, atol=0.05)  # mm
    # trilinear interpolation of a sigma-5 mm Gaussian on 2 mm slices: error <= h^2/8 max|f''| ~ 0.02
    np.testing.assert_allclose(moved[1].numpy(), _gaussian(shape, expected_voxel, spacing, 5.0), atol=0.03)
    translated_only = point + np.asarray(record.displacement) / spacing
    assert np.linalg.norm((centroid - translated_only) * spacing) > 0.3  # the rotation moves it 6x the tolerance
    assert torch.equal(moved[0].as_tensor(), image[0].as_tensor())


def test_sweep_measures_what_an_independent_shift_gives(real_case, tmp_path):
    torch.manual_seed(0)
    networks = {"copy T2": _CopyInput(1), "ResUNet": ResUNet(2, 2, 1, channels=(8, 16, 32, 64))}
    levels = [0.0, 0.5, 1.0, 2.0]
    rows = robustness_sweep(networks, [real_case], "translation", levels, ("T1", "T2"), "T2", seed=7)
    assert len(rows) == len(networks) * len(levels)
    copy = [row for row in rows if row["network"] == "copy T2"]
    assert [row["perturbation"] for row in copy] == levels
    assert {row["moved_input"] for row in rows} == {"T2"} and {row["protocol"] for row in rows} == {"slice2d"}
    assert copy[0]["psnr_db"] == math.inf and copy[0]["mae_x100"] == 0.0  # unmoved: the copy is the truth
    maes = [row["mae_x100"] for row in copy]
    assert all(a < b for a, b in zip(maes, maes[1:])), maes  # more misalignment, more error
    # each level against the T2 shifted here by the stated vector and measured by the protocol directly
    image, mask = real_case["image"], real_case["mask"]
    for row in copy[1:]:
        dx, dy = row["shift_x_px"], row["shift_y_px"]
        assert math.hypot(dx, dy) == pytest.approx(row["perturbation"], abs=1e-9)
        shifted = np.stack([_bilinear_shift(image[1, ..., k].numpy().astype(np.float64), dx, dy)
                            for k in range(image.shape[-1])], axis=-1)
        expected = slice_protocol(torch.from_numpy(shifted).float(), real_case["target"], mask)
        assert row["mae_x100"] == pytest.approx(expected.mae_x100, abs=1e-3)
        assert row["psnr_db"] == pytest.approx(expected.psnr_db, abs=1e-3)
        assert row["evaluated"] == expected.num_slices
    # moving the other input does not change what a copy of T2 synthesizes
    other = robustness_sweep({"copy T2": networks["copy T2"]}, [real_case], "translation", levels, ("T1", "T2"), "T1")
    assert {row["mae_x100"] for row in other} == {0.0}
    # every second evaluated slice
    # every second evaluated slice (all 12 slices are evaluated); ``shifted`` holds the last level, 2 px
    assert copy[0]["evaluated"] == image.shape[-1]
    half = robustness_sweep({"copy T2": networks["copy T2"]}, [real_case], "translation", [2.0], ("T1", "T2"), "T2",
                            seed=7, slice_step=2)
    assert half[0]["evaluated"] == image.shape[-1] // 2
    every_second = slice_protocol(torch.from_numpy(shifted[..., ::2]).float(), real_case["target"][..., ::2], mask[..., ::2])
    assert half[0]["mae_x100"] == pytest.approx(every_second.mae_x100, abs=1e-3)

    written = write_sweep(rows + other, tmp_path, ("psnr_db", "mae_x100"), title="BraTS (T1, T2) -> T2")
    assert set(written) == {"translation_slice2d", "translation_slice2d_psnr_db", "translation_slice2d_mae_x100",
                            "robustness"}
    back = read_csv(tmp_path / "translation_slice2d.csv")
    assert len(back) == len(rows) + len(other)
    assert [row["mae_x100"] for row in back[: len(rows)]] == pytest.approx([row["mae_x100"] for row in rows])
    for name in ("translation_slice2d_psnr_db.png", "translation_slice2d_mae_x100.png"):
        picture = matplotlib.image.imread(tmp_path / name)
        assert picture.ndim == 3 and picture.shape[0] > 100
    markdown = (tmp_path / "robustness.md").read_text()
    assert "| network | 0 | 0.5 | 1 | 2 |" in markdown and "Moved input: T1, T2" in markdown


def test_rigid_sweep_and_bad_arguments(real_case):
    image = MetaTensor(real_case["image"], affine=torch.eye(4))
    case = {**real_case, "image": image}
    rows = robustness_sweep({"copy T1": _CopyInput(0)}, [{**case, "target": real_case["image"][0:1]}], "rigid",
                            [0.0, 1.0, 3.0], ("T1", "T2"), "T1", seed=2)
    assert [row["rotation_deg"] for row in rows] == pytest.approx([0.0, 1.0, 3.0])
    assert [row["translation_mm"] for row in rows] == pytest.approx([0.0, 1.0, 3.0])
    maes = [row["mae_x100"] for row in rows]
    assert maes[0] == pytest.approx(0.0, abs=1e-4) and maes[0] < maes[1] < maes[2]
    copy = {"copy": _CopyInput(0)}
    with pytest.raises(ValueError, match="strictly increasing"):
        robustness_sweep(copy, [case], "translation", [0.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="perturbation 'shear'"):
        robustness_sweep(copy, [case], "shear")
    with pytest.raises(ValueError, match="'FLAIR' is not one of the inputs"):
        robustness_sweep(copy, [case], "translation", [0.0], ("T1", "T2"), "FLAIR")
    with pytest.raises(ValueError, match="slice_step 2"):
        robustness_sweep(copy, [case], "translation", [0.0], protocols=("brasyn3d",), slice_step=2)
    with pytest.raises(ValueError, match=r"expected a \(C, H, W, D\)"):
        misalign(image[0], "translation", 1.0)


def test_checkpoint_that_does_not_fit_is_named(tmp_path):
    weights = tmp_path / "agi.pt"
    torch.save(AGINet(2, 2, 1, channels=(8, 16, 32, 64)).state_dict(), weights)
    bundle = REPO / "bundles" / "brats_t1_t2_to_flair"
    script = load_script("robustness_sweep.py")
    network = script.checkpoint_generator(bundle, weights, "AGI-Net", "8,16,32,64")
    assert isinstance(network, AGINet) and not network.training
    with pytest.raises(ValueError, match=rf"{weights}: does not fit AGINet"):
        script.checkpoint_generator(bundle, weights, "AGI-Net")  # the bundle's widths: 64 ... 512
    with pytest.raises(ValueError, match="no such checkpoint"):
        script.checkpoint_generator(bundle, tmp_path / "missing.pt", "ResUNet")


@pytest.mark.slow
def test_script_sweeps_two_tiny_checkpoints_on_a_shipped_case(tmp_path):
    run, _, _ = _checkpoints(tmp_path)
    output = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "robustness_sweep.py"), "--bundle", "brats_t1_t2_to_flair",
         "--dataset_dir", str(tmp_path / "datalist.json"), "--agi_net", str(run), "--resunet", str(tmp_path / "resunet.pt"),
         "--channels", "8,16,32,64", "--maximum", "0.5", "--slice_step", "8", "--output_dir", str(output),
         "--progress", "False"],
        capture_output=True, encoding="utf-8", cwd=REPO, timeout=600,
        env=CPU_SCRIPT_ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "robustness sweep: 8 rows" in result.stdout
    for kind, amount in (("translation", "shift_px"), ("rigid", "translation_mm")):
        rows = read_csv(output / f"{kind}_slice2d.csv")
        assert [(r["network"], r["perturbation"]) for r in rows] == [
            ("AGI-Net", 0.0), ("ResUNet", 0.0), ("AGI-Net", 0.5), ("ResUNet", 0.5)]
        assert [r[amount] for r in rows] == pytest.approx([0.0, 0.0, 0.5, 0.5])
        assert len({r["moved_input"] for r in rows}) == 1 and {r["case_id"] for r in rows} == {"gli"}
        assert all(math.isfinite(r["psnr_db"]) for r in rows)
        for metric in ("psnr_db", "ssim_pct"):
            assert matplotlib.image.imread(output / f"{kind}_slice2d_{metric}.png").ndim == 3
    assert "## in-plane translation of one input (pixels), protocol `slice2d`" in (output / "robustness.md").read_text()


def _checkpoints(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two tiny untrained networks as the sweep reads them (an AGI-Net run folder, a ResUNet file) and a datalist of
    the shipped BraTS case: the run folder, the ResUNet checkpoint and the datalist."""
    channels = [8, 16, 32, 64]
    torch.manual_seed(0)
    run = tmp_path / "agi_run"
    (run / "models").mkdir(parents=True)
    (run / "overrides.json").write_text(json.dumps(
        {"network_def#_target_": "agi_monai.networks.AGINet", "network_def#channels": channels}))
    torch.save(AGINet(2, 2, 1, channels=channels).state_dict(), run / "models" / "model.pt")
    torch.save(ResUNet(2, 2, 1, channels=channels).state_dict(), tmp_path / "resunet.pt")
    case = {"case_id": "gli", **{c: str(CASE / f"BraTS-GLI-00001-000-{s}.nii.gz")
                                 for c, s in (("T1", "t1n"), ("T2", "t2w"), ("FLAIR", "t2f"))}}
    (tmp_path / "datalist.json").write_text(json.dumps({"test": [case]}))
    return run, tmp_path / "resunet.pt", tmp_path / "datalist.json"


def test_script_records_what_it_measured_and_a_rerun_leaves_no_earlier_kind(tmp_path, monkeypatch):
    """robustness.json and robustness.md name both checkpoints, the bundle, dataset, split, kinds, levels and the
    command; a rerun with other kinds removes the earlier run's CSVs and plots first (the sweep itself is faked:
    what is tested is what the script writes around it)."""
    script = load_script("robustness_sweep.py")
    run, resunet, datalist = _checkpoints(tmp_path)

    def fake_sweep(networks, items, kind, levels, inputs, moved_input, seed, protocols, *args, **kwargs):
        return [{"network": name, "perturbation": level, "case_id": "gli", "kind": kind, "moved_input": "T2",
                 "protocol": protocol, "psnr_db": 20.0 - level, "ssim_pct": 80.0, "mae_x100": 5.0}
                for protocol in protocols for level in levels for name in networks]

    monkeypatch.setattr(script, "robustness_sweep", fake_sweep)
    output = tmp_path / "sweep"
    common = dict(bundle="brats_t1_t2_to_flair", dataset_dir=str(datalist), agi_net=str(run), resunet=str(resunet),
                  channels="8,16,32,64", maximum=0.5, output_dir=str(output), progress=False)
    script.main(kinds="translation,rigid", **common)
    assert (output / "rigid_slice2d.csv").is_file() and (output / "rigid_slice2d_psnr_db.png").is_file()
    (output / "notes.txt").write_text("not the script's")
    script.main(kinds="translation", **common)
    assert sorted(p.name for p in output.iterdir()) == [
        "notes.txt", "robustness.json", "robustness.md", "translation_slice2d.csv", "translation_slice2d_psnr_db.png",
        "translation_slice2d_ssim_pct.png"]
    settings = json.loads((output / "robustness.json").read_text())
    assert settings["checkpoints"] == {"AGI-Net": str((run / "models" / "model.pt").resolve()),
                                       "ResUNet": str(resunet.resolve())}
    assert settings["bundle"] == str(REPO / "bundles" / "brats_t1_t2_to_flair")
    assert settings["dataset"] == str(datalist.resolve()) and settings["split"] == "test"
    assert settings["kinds"] == ["translation"] and settings["levels"] == [0.0, 0.5] and settings["cases"] == ["gli"]
    assert settings["split_note"] is None and "command" in settings
    markdown = (output / "robustness.md").read_text()
    assert str(run / "models" / "model.pt") in markdown and str(resunet) in markdown and "split `test`" in markdown


def test_script_refuses_a_bad_kind_before_loading_anything(tmp_path):
    with pytest.raises(ValueError, match=r"--kinds translaton: expected some of \['translation', 'rigid'\]"):
        load_script("robustness_sweep.py").main(bundle="brats_t1_t2_to_flair", dataset_dir=str(tmp_path),
                                                agi_net="missing.pt", resunet="missing.pt", kinds="translaton",
                                                output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
