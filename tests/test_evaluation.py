"""The metric protocols against hand-computed values, the per-case volume evaluator on the shipped BraTS case
(with a bad case beside it), and the figures (layout, atomic writing)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from monai.inferers import SliceInferer
from monai.metrics import SSIMMetric

from agi_monai.bundle import load_split
from agi_monai.evaluation import (
    VolumeEvaluator,
    brain_mask,
    brasyn_protocol,
    evaluate_volume,
    evaluated_slices,
    mask_bounding_box,
    percentile_normalize,
    robustness_plot,
    slice_protocol,
    synthesis_panel,
    volume_dataset,
)
from agi_monai.evaluation.figures import largest_error_box
from agi_monai.evaluation.tables import CASES_CSV, SUMMARY_JSON, SUMMARY_MD, read_csv
from agi_monai.networks import AGINet
from helpers import DATA

CASE = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"
C1, C2 = 0.01**2, 0.03**2  # SSIM's stability constants at data range 1


def _constant_ssim(x: float, y: float) -> float:
    """SSIM of two constant images (no variance: the contrast-structure term is c2 / c2 = 1)."""
    return (2 * x * y + C1) / (x * x + y * y + C1)


def _two_slices(first: float, second: float, size: int = 12) -> torch.Tensor:
    volume = torch.empty(size, size, 2)
    volume[..., 0], volume[..., 1] = first, second
    return volume


# ------------------------------------------------------------------------------------------ protocol A: 2D


def test_slice_protocol_whole_slices_by_hand():
    # slice 0: error 0.1 everywhere -> MSE 0.01, PSNR 20 dB, MAE 10; slice 1: error 0.2 -> 13.9794 dB, MAE 20
    result = slice_protocol(_two_slices(0.6, 0.3), _two_slices(0.5, 0.5), mask=None)
    assert result.psnr_db == pytest.approx((20.0 + 10 * math.log10(1 / 0.04)) / 2, abs=1e-4)
    assert result.mae_x100 == pytest.approx(15.0, abs=1e-4)
    # (0.02 %: MONAI computes the variances as E[x^2] - E[x]^2 in float32, about 1e-7 instead of 0 next to c2 = 9e-4)
    assert result.ssim_pct == pytest.approx(50 * (_constant_ssim(0.6, 0.5) + _constant_ssim(0.3, 0.5)), abs=0.02)
    assert result.evaluated == result.num_slices == 2 and result.per_slice["slice_index"] == [0, 1]
    assert result.per_slice["psnr_db"] == pytest.approx([20.0, 13.9794], abs=1e-4)
    protocol = result.as_dict()["protocol"]
    assert protocol["name"] == "slice2d" and protocol["data_range"] == 1.0 and protocol["mask"].startswith("none")


def _masked_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slice 0: an 8x8 mask (44 % of 12x12) where the prediction is 0.6 against 0.5, 1.0 outside (must not count);
    slice 1: a 2x2 mask (2.8 %, under the 5 % threshold) where the prediction is wrong (must not count)."""
    target = _two_slices(0.5, 0.5)
    prediction = _two_slices(1.0, 0.0)
    mask = torch.zeros_like(target)
    mask[2:10, 2:10, 0] = 1
    mask[5:7, 5:7, 1] = 1
    prediction[2:10, 2:10, 0] = 0.6
    return prediction, target, mask


def test_slice_protocol_brain_mask_by_hand():
    prediction, target, mask = _masked_pair()
    result = slice_protocol(prediction[None], target.numpy(), mask)  # (1, H, W, D), numpy and torch both accepted
    assert result.evaluated == 1 and result.per_slice["slice_index"] == [0]
    assert result.psnr_db == pytest.approx(20.0, abs=1e-4) and result.mae_x100 == pytest.approx(10.0, abs=1e-4)
    # SSIM: the mask's box 2:10 widened to 11 px -> 1:12 on both axes, both images 0 outside the mask
    box = (slice(1, 12), slice(1, 12))
    assert mask_bounding_box(mask[..., 0] > 0, 11) == box
    inside = mask[..., 0]
    expected = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=11)(
        (prediction[..., 0] * inside)[box][None, None], (target[..., 0] * inside)[box][None, None]
    )
    assert result.ssim_pct == pytest.approx(100 * float(expected), abs=1e-4)
    assert "PSNR and MAE over the voxels inside the mask" in result.protocol.mask_policy


def test_slice_protocol_brain_slices_whole_slice_by_hand():
    prediction, target, mask = _masked_pair()
    result = slice_protocol(prediction, target, mask, region="slice")
    # slice 0 only; 64 voxels off by 0.1, 80 voxels off by 0.5
    mse, mae = (64 * 0.01 + 80 * 0.25) / 144, (64 * 0.1 + 80 * 0.5) / 144
    assert result.evaluated == 1
    assert result.psnr_db == pytest.approx(10 * math.log10(1 / mse), abs=1e-4)
    assert result.mae_x100 == pytest.approx(100 * mae, abs=1e-4)


def test_slice_protocol_clips_the_prediction_and_selects_slices_by_fraction():
    target = _two_slices(1.0, 0.5)
    result = slice_protocol(_two_slices(1.3, 0.5), target)  # 1.3 is clipped to 1: no error anywhere
    assert result.mae_x100 == 0.0 and result.ssim_pct == pytest.approx(100.0) and math.isinf(result.psnr_db)
    assert slice_protocol(_two_slices(1.3, 0.5), target, clip=False).mae_x100 == pytest.approx(15.0, abs=1e-4)
    _, _, mask = _masked_pair()
    assert evaluated_slices(mask, 0.05).tolist() == [0]
    assert evaluated_slices(mask, 0.02).tolist() == [0, 1]
    assert evaluated_slices(mask, 0.5).tolist() == []
    with pytest.raises(ValueError, match="no axial slice has a mask covering >= 50%"):
        slice_protocol(_two_slices(0.5, 0.5), target, mask, min_foreground_fraction=0.5)


def test_identical_volumes_score_ssim_100_under_both_protocols():
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand(24, 20, 16, generator=generator)
    mask = torch.zeros_like(volume)
    mask[4:20, 3:17, 2:14] = 1
    for result in evaluate_volume(volume, volume.clone(), mask).values():
        assert result.ssim_pct == pytest.approx(100.0, abs=1e-4) and result.mae_x100 == 0.0
        assert math.isinf(result.psnr_db)
    assert slice_protocol(volume, volume, None).ssim_pct == pytest.approx(100.0, abs=1e-4)


def test_bad_inputs_are_named():
    volume = torch.zeros(12, 12, 2)
    with pytest.raises(ValueError, match=r"target has shape \(12, 12, 3\), prediction \(12, 12, 2\)"):
        slice_protocol(volume, torch.zeros(12, 12, 3))
    with pytest.raises(ValueError, match="expected a volume"):
        slice_protocol(torch.zeros(2, 12, 12, 2), torch.zeros(2, 12, 12, 2))
    with pytest.raises(ValueError, match="NaN/Inf"):
        slice_protocol(volume + float("nan"), volume)
    with pytest.raises(ValueError, match="fewer than the SSIM window 11"):
        slice_protocol(torch.zeros(8, 12, 2), torch.zeros(8, 12, 2))
    with pytest.raises(ValueError, match=r"expected a non-empty list of \['slice2d', 'brasyn3d'\]"):
        evaluate_volume(volume, volume, protocols=["psnr"])


# ----------------------------------------------------------------------------------------- protocol B: 3D


def test_percentile_normalize_by_hand():
    reference = torch.arange(101, dtype=torch.float32).reshape(101, 1, 1)  # 0 .. 100
    # numpy's linear percentiles of 0..100: p0.5 = 0.5, p99.5 = 99.5
    normalised = percentile_normalize(torch.tensor([0.0, 50.0, 100.0]).reshape(3, 1, 1), reference)
    assert normalised.flatten().tolist() == pytest.approx([0.0, (50 - 0.5) / 99, 1.0])
    # inside a mask holding 0 .. 50 only: p0.5 = 0.25, p99.5 = 49.75
    mask = reference <= 50
    normalised = percentile_normalize(torch.tensor([25.0, 49.75, 80.0]).reshape(3, 1, 1), reference, mask)
    assert normalised.flatten().tolist() == pytest.approx([(25 - 0.25) / 49.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="expected a non-constant ground truth"):
        percentile_normalize(reference, torch.ones(101, 1, 1))


def test_brasyn_protocol_against_an_independent_computation():
    generator = torch.Generator().manual_seed(1)
    target = 100 + 400 * torch.rand(20, 18, 16, generator=generator)  # raw scanner-like intensities
    prediction = target + 30 * torch.randn(20, 18, 16, generator=generator)
    mask = torch.zeros_like(target, dtype=torch.bool)
    mask[3:17, 4:15, 2:14] = True
    result = brasyn_protocol(prediction, target, mask)

    low, high = np.percentile(target[mask].numpy(), [0.5, 99.5])
    p, t = (np.clip((v.numpy() - low) / (high - low), 0, 1) for v in (prediction, target))
    difference = (p - t)[mask.numpy()]
    assert result.psnr_db == pytest.approx(10 * np.log10(1 / np.mean(difference**2)), abs=1e-3)
    assert result.mae_x100 == pytest.approx(100 * np.mean(np.abs(difference)), abs=1e-3)
    box = mask_bounding_box(mask, 11)  # every side already >= 11 voxels: the mask's own box
    assert box == (slice(3, 17), slice(4, 15), slice(2, 14))
    inside = mask.numpy()
    expected = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=11)(
        torch.from_numpy(p * inside)[box][None, None], torch.from_numpy(t * inside)[box][None, None]
    )
    assert result.ssim_pct == pytest.approx(100 * float(expected), abs=1e-4)
    assert result.evaluated == int(mask.sum())
    # the normalisation makes the protocol blind to an affine intensity change of both volumes
    rescaled = brasyn_protocol(3 * prediction + 7, 3 * target + 7, mask)
    assert rescaled.psnr_db == pytest.approx(result.psnr_db, abs=1e-3)
    assert rescaled.ssim_pct == pytest.approx(result.ssim_pct, abs=1e-3)
    record = result.as_dict()["protocol"]
    assert record["name"] == "brasyn3d" and record["data_range"] == 1.0 and record["mask"] == "brain mask"
    assert record["parameters"]["percentiles"] == [0.5, 99.5]


# --------------------------------------------------------------------------------- the volume evaluator


def _cases_with_a_bad_one(root: Path) -> Path:
    """The shipped case, and a copy whose T1 is a truncated gzip (unreadable)."""
    (root / "good").mkdir(parents=True)
    for file in CASE.iterdir():
        (root / "good" / file.name).symlink_to(file)
    (root / "bad").mkdir()
    for file in CASE.glob("*-t2[wf].nii.gz"):
        (root / "bad" / file.name.replace("00001", "99999")).symlink_to(file)
    truncated = gzip.compress((CASE / "BraTS-GLI-00001-000-t1n.nii.gz").read_bytes())[:5000]
    (root / "bad" / "BraTS-GLI-99999-000-t1n.nii.gz").write_bytes(truncated)
    return root


def test_slice_protocol_refuses_a_target_off_the_data_range():
    target = torch.rand(32, 32, 4)
    with pytest.raises(ValueError, match=r"target values span \[\S+, 4000\]; expected \[0, 1\] \(each volume divided by its 99.5th"):
        slice_protocol(target, target * 4000 / target.max())


def test_brasyn3d_measures_the_real_intensities_where_slice2d_measures_the_clipped_ones(tmp_path):
    """volume_dataset keeps the target unclipped: BraSyn's percentiles are the real T1Gd's inside the brain. A
    "synthesis" that is the T1Gd flattened at its whole-volume 99.5th percentile (what a clipped ground truth
    is) is perfect on the paper's [0, 1] slices, and not under BraSyn, which sees the flattened enhancement."""
    inputs, target = ["T1", "T2", "FLAIR"], "T1Gd"
    (case,) = load_split(DATA / "brats2023-gli", "test", [*inputs, target])
    item = volume_dataset([case], inputs, target, (240, 240))[0]
    unclipped = item["target"].as_tensor()
    upper = item["target"].meta["intensity_percentile_value"]
    assert unclipped.max() > 1.5  # the brightest voxels, far above the volume's 99.5th percentile
    flattened = unclipped.clamp(0.0, 1.0)
    results = evaluate_volume(flattened, item["target"], item["mask"], ["slice2d", "brasyn3d"])
    assert math.isinf(results["slice2d"].psnr_db) and results["slice2d"].ssim_pct == pytest.approx(100.0)
    assert results["brasyn3d"].psnr_db < 40.0 and results["brasyn3d"].ssim_pct < 99.9
    # brasyn3d is BraSyn's normalisation of the file's own intensities (here in RAS, as the chain orients it)
    raw = np.asarray(nib.as_closest_canonical(nib.load(next(CASE.glob("*-t1c.nii.gz")))).dataobj, np.float32)
    np.testing.assert_allclose(unclipped[0].numpy() * upper, raw, rtol=1e-5, atol=1e-3)
    direct = brasyn_protocol(flattened * upper, torch.from_numpy(raw), item["mask"])
    assert results["brasyn3d"].metrics == pytest.approx(direct.metrics, rel=1e-4)


def test_volume_evaluator_on_the_shipped_case_reports_the_bad_one(tmp_path):
    inputs, target, size = ["T1", "T2"], "FLAIR", (64, 64)  # the brain's centre: fast
    cases = load_split(_cases_with_a_bad_one(tmp_path / "cases"), "test", [*inputs, target])
    assert sorted(c["case_id"] for c in cases) == ["BraTS-GLI-00001-000", "BraTS-GLI-99999-000"]
    dataset = volume_dataset(cases, inputs, target, size)
    torch.manual_seed(0)
    network = AGINet(in_channels=2, channels=[8, 16, 16, 32])
    inferer = SliceInferer(roi_size=size, spatial_dim=2, sw_batch_size=32, overlap=0.0)
    output = tmp_path / "eval"
    evaluator = VolumeEvaluator("cpu", dataset, network, inferer, output, protocols=["slice2d", "brasyn3d"],
                                description={"target": target})
    evaluator.run()

    assert sorted(p.name for p in output.iterdir()) == sorted([CASES_CSV, SUMMARY_JSON, SUMMARY_MD])  # no temp files
    rows = read_csv(output / CASES_CSV)
    assert [row["case_id"] for row in rows] == ["BraTS-GLI-00001-000"]
    summary = json.loads((output / SUMMARY_JSON).read_text())
    (failure,) = summary["failed"]
    assert failure["case_id"] == "BraTS-GLI-99999-000" and "t1n.nii.gz" in failure["reason"]
    assert summary["cases"] == 1 and summary["description"] == {"target": target}

    # the numbers are the protocol functions' on the same synthesis
    good = next(i for i, c in enumerate(cases) if c["case_id"] == "BraTS-GLI-00001-000")
    item = dataset[good]
    network.eval()
    with torch.no_grad():
        prediction = inferer(item["image"].as_tensor()[None], network)[0].clamp(0, 1)
    direct = evaluate_volume(prediction, item["target"], item["mask"], ["slice2d", "brasyn3d"])
    for protocol, result in direct.items():
        entry = summary["protocols"][protocol]
        assert entry["protocol"] == result.protocol.as_dict()
        for metric, value in result.metrics.items():
            assert rows[0][f"{protocol}_{metric}"] == pytest.approx(value, rel=1e-6)
            assert entry["metrics"][metric]["mean"] == pytest.approx(value, rel=1e-6)
            assert entry["metrics"][metric]["n"] == 1 and entry["metrics"][metric]["std"] == 0.0
            assert evaluator.state.metrics[f"{protocol}_{metric}"] == pytest.approx(value, rel=1e-6)
    assert rows[0]["slice2d_slices"] == direct["slice2d"].evaluated
    assert rows[0]["brasyn3d_voxels"] == int(item["mask"].sum())
    markdown = (output / SUMMARY_MD).read_text()
    assert "| 2D slice, the paper's (`slice2d`) |" in markdown and "BraTS-GLI-99999-000: " in markdown


# -------------------------------------------------------------------------------------------------- figures


@pytest.fixture(scope="module")
def real_slices() -> dict[str, np.ndarray]:
    """Axial slice 80 of the shipped case, each contrast / its 99.5th percentile, clipped."""
    planes = {}
    for name, suffix in (("T1", "t1n"), ("T2", "t2w"), ("FLAIR", "t2f")):
        volume = np.asarray(nib.load(CASE / f"BraTS-GLI-00001-000-{suffix}.nii.gz").dataobj, dtype=np.float32)
        planes[name] = np.clip(volume[..., 80] / np.percentile(volume, 99.5), 0, 1)
    return planes


def _recording_figures(monkeypatch) -> list[Figure]:
    """The figures saved from now on, kept so that a test can read what was drawn in each panel."""
    saved, original = [], Figure.savefig

    def recording_savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    return saved


def test_synthesis_panel_layout_and_atomic_write(real_slices, tmp_path, monkeypatch):
    target = real_slices["FLAIR"]
    predictions = {"AGI-Net": np.clip(target + 0.05, 0, 1), "ResUNet": np.clip(0.8 * target, 0, 1)}
    saved = _recording_figures(monkeypatch)
    path = synthesis_panel(
        {"T1": real_slices["T1"], "T2": real_slices["T2"]}, predictions, target, tmp_path / "panel.png", "FLAIR",
        metrics={"AGI-Net": {"psnr_db": 25.0, "ssim_pct": 90.0, "mae_x100": 2.0}}, title="BraTS-GLI-00001-000, slice 80",
    )
    monkeypatch.undo()
    assert path == tmp_path / "panel.png" and [p.name for p in tmp_path.iterdir()] == ["panel.png"]
    height, width, _ = matplotlib.image.imread(path).shape
    # 2 inputs + synthesized, real, error, 2 ROI columns = 7 panels of 2 in at 100 dpi; 2 rows + title
    assert width == 7 * 200 and 2 * 200 <= height <= 2 * 200 + 60

    # what each panel shows (RAS slices are drawn transposed, anterior up): row = network, columns T1 | T2 |
    # synthesized | real | |synthesized - real| | the ROI of each; one grey scale 0 .. the real slice's 99.5th
    # percentile, the error maps 0 .. the 99.5th percentile of both rows' errors
    (figure,) = saved
    panels = np.array(figure.axes[:14], dtype=object).reshape(2, 7)
    errors = {name: np.abs(plane - target) for name, plane in predictions.items()}
    roi = largest_error_box(list(errors.values()), 240 // 4)  # the automatic ROI: a quarter of the side
    grey, error_top = np.percentile(target, 99.5), np.percentile(np.stack(list(errors.values())), 99.5)
    for row, (name, plane) in enumerate(predictions.items()):
        expected = [
            (plane, grey), (target, grey), (errors[name], error_top), (plane[roi], grey), (target[roi], grey)
        ]
        if row == 0:
            expected = [(real_slices[c], np.percentile(real_slices[c], 99.5)) for c in ("T1", "T2")] + expected
        else:
            assert not panels[row, 0].images and not panels[row, 1].axison  # the inputs are shown once
        for ax, (values, top) in zip(panels[row, 7 - len(expected):], expected):
            (image,) = ax.images
            np.testing.assert_allclose(np.asarray(image.get_array()), values.T, atol=1e-6)
            assert image.get_clim() == pytest.approx((0.0, top), rel=1e-5)
        assert panels[row, 2].get_ylabel().splitlines()[0] == name
    assert panels[0, 2].get_ylabel().splitlines()[1:] == ["PSNR 25.00 dB", "SSIM 90.00 %", "MAE 2.00"]

    def failing_savefig(self, file, **kwargs):  # a crash half-way through writing
        Path(file).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    original = Figure.savefig
    Figure.savefig = failing_savefig
    try:
        with pytest.raises(OSError, match="disk full"):
            synthesis_panel({}, predictions, target, tmp_path / "second.png", "FLAIR")
    finally:
        Figure.savefig = original
    assert [p.name for p in tmp_path.iterdir()] == ["panel.png"]  # neither a partial nor a temporary file
    with pytest.raises(ValueError, match=r"AGI-Net' has shape \(10, 10\), the target \(240, 240\)"):
        synthesis_panel({}, {"AGI-Net": np.zeros((10, 10))}, target, tmp_path / "bad.png", "FLAIR")


def test_largest_error_box_finds_the_error():
    error = np.zeros((64, 48))
    error[30:46, 5:21] = 1.0  # a 16x16 block of error
    error[0, 0] = 3.0
    assert largest_error_box([error, error], 16) == (slice(30, 46), slice(5, 21))


def test_robustness_plot_from_rows(tmp_path, monkeypatch):
    rows = [
        {"network": network, "perturbation": level, "psnr_db": 30 - slope * level + 0.1 * case}
        for network, slope in (("AGI-Net", 0.5), ("ResUNet", 1.0)) for level in (0, 0.5, 1, 1.5, 2, 2.5, 3)
        for case in range(2)
    ]
    saved = _recording_figures(monkeypatch)
    path = robustness_plot(rows, tmp_path / "robustness.png", "psnr_db", title="translation")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["robustness.png"]
    assert matplotlib.image.imread(path).shape[:2] == (350, 500)
    # one line per network through the mean over the two cases at each level: 30 - slope * level + 0.05
    ((ax,),) = [figure.axes for figure in saved]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["AGI-Net", "ResUNet"]
    levels = [0, 0.5, 1, 1.5, 2, 2.5, 3]
    for network, slope in (("AGI-Net", 0.5), ("ResUNet", 1.0)):
        np.testing.assert_allclose(lines[network].get_xdata(), levels)
        np.testing.assert_allclose(lines[network].get_ydata(), [30 - slope * level + 0.05 for level in levels])
    with pytest.raises(ValueError, match="no column 'ssim_pct'"):
        robustness_plot(rows, tmp_path / "other.png", "ssim_pct")


def test_brain_mask_is_the_preprocessing_mask():
    volume = torch.zeros(2, 30, 30, 12)
    volume[:, 5:25, 8:22, 2:10] = 1.0
    volume[:, 12:15, 12:15, 5] = 0.0  # a hole, filled slice by slice
    mask = brain_mask(volume)
    expected = torch.zeros(30, 30, 12, dtype=torch.bool)
    expected[5:25, 8:22, 2:10] = True
    assert torch.equal(mask, expected)
