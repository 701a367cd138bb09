"""Segmentation downstream evaluation (issue #6, item 3): BraTS label conventions, Dice policies, the four
conditions on a hand-computed toy case, synthesized files on the shipped TCGA case, the ``brats_segmentation``
bundle's configs and metadata, and (slow) the bundle trained 2 iterations then ``scripts/downstream_dice.py`` and
``inference.json`` end to end on the shipped labelled case.

The only shipped case with all four contrasts and a tumour label is TCGA-FG-6692 (BraTS space) with ``mav``, an
automatic segmentation (BraTS-Toolkit majority vote; labels 0/1/2/4, the BraTS 2017-2022 convention), so the
end-to-end numbers test the wiring, not a segmenter.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from pydoc import locate

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator
from monai.data import Dataset, MetaTensor
from monai.inferers import SimpleInferer, SliceInferer
from monai.utils import optional_import

from agi_monai.data import DataError, LoadVolumed, discover_cases
from agi_monai.evaluation.downstream import (
    CONDITIONS,
    DOWNSTREAM_CSV,
    DOWNSTREAM_JSON,
    DOWNSTREAM_MD,
    DOWNSTREAM_PNG,
    LABEL_CONVENTIONS,
    METRICS,
    AttachSynthesizedd,
    BratsRegionsd,
    DownstreamEvaluator,
    VolumeSynthesizer,
    condition_image,
    downstream_dataset,
    region_dice,
    regions_to_label,
)
from agi_monai.evaluation.tables import read_csv
from helpers import REPO, SUBPROCESS_ENV

BUNDLE = REPO / "bundles" / "brats_segmentation"
CONFIGS = BUNDLE / "configs"
TCGA = REPO / "tests" / "data" / "tcga-lgg" / "TCGA-FG-6692"
MAV = TCGA / "mav.nii.gz"
SCHEMA = REPO / "bundles" / "_template" / "schemas" / "meta_schema_20240725.json"
SCHEMA_SHA256 = "774785636fa303916a6a438655fd47fcbc7c0e16a66200f13278cd55ff91ab17"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "convention, values, tc, wt, et",
    [
        ("brats2023", [0, 1, 2, 3], [1, 3], [1, 2, 3], [3]),
        ("brats2018", [0, 1, 2, 4], [1, 4], [1, 2, 4], [4]),
        ("brats2015", [0, 1, 2, 3, 4], [1, 3, 4], [1, 2, 3, 4], [4]),
    ],
)
def test_label_conventions_make_the_brats_regions(convention, values, tc, wt, et):
    label = torch.tensor(values, dtype=torch.float32).reshape(1, len(values), 1, 1)
    regions = BratsRegionsd("seg", convention)({"seg": label})["label"]
    assert regions.shape == (3, len(values), 1, 1) and regions.dtype == torch.float32
    for channel, members in enumerate((tc, wt, et)):
        assert regions[channel].flatten().tolist() == [float(v in members) for v in values]


def test_shipped_mav_regions_count_its_labels():
    item = LoadVolumed("seg")({"seg": str(MAV)})
    regions = BratsRegionsd("seg", "brats2018")(item)["label"]
    values = np.asarray(nib.load(MAV).dataobj)  # independent read: 1 NCR/NET, 2 oedema, 4 enhancing
    expected = [np.isin(values, [1, 4]).sum(), np.isin(values, [1, 2, 4]).sum(), (values == 4).sum()]
    assert [int(regions[c].sum()) for c in range(3)] == expected == [9317, 30179, 6840]


def test_a_label_outside_the_convention_is_named_with_its_file():
    item = LoadVolumed("seg")({"seg": str(MAV)})
    with pytest.raises(DataError, match=r"mav\.nii\.gz: holds label values \[4\] outside the brats2023 convention") as error:
        BratsRegionsd("seg", "brats2023")(item)
    assert "fit label_convention brats2018 or brats2015" in str(error.value)
    with pytest.raises(ValueError, match="label_convention 'brats2020': expected one of"):
        BratsRegionsd("seg", "brats2020")


def test_a_brats2023_map_read_as_brats2015_is_warned_about(caplog):
    """Its values fit BRATS 2015 (3 = non-enhancing core there): the enhancing tumour would be lost, with a word."""
    caplog.set_level(logging.WARNING, "agi_monai.evaluation.downstream")
    label = MetaTensor(torch.tensor([0.0, 1, 2, 3]).reshape(1, 4, 1, 1), meta={"filename_or_obj": "case-seg.nii.gz"})
    regions = BratsRegionsd("seg", "brats2015")({"seg": label})["label"]
    assert regions[2].sum() == 0  # no ET
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("case-seg.nii.gz: label 3 but no 4 under label_convention brats2015")
    caplog.clear()
    BratsRegionsd("seg", "brats2015")({"seg": label.clone().fill_(4)})  # enhancing present: nothing to say
    BratsRegionsd("seg", "brats2023")({"seg": label})
    assert caplog.records == []


BRATS2015 = REPO.parent / "shared" / "data" / "brats2015-deepmedic" / "brats_2013_pat0004_1" / "OTMultiClass.nii.gz"


@pytest.mark.skipif(not BRATS2015.is_file(), reason="the shared BRATS 2015 cases are not beside this clone (not shipped)")
def test_expert_brats2015_labels_count_the_non_enhancing_core_in_tc():
    item = LoadVolumed("seg")({"seg": str(BRATS2015)})
    regions = BratsRegionsd("seg", "brats2015")(item)["label"]
    values = np.asarray(nib.load(BRATS2015).dataobj)  # expert: 1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing
    expected = [np.isin(values, [1, 3, 4]).sum(), np.isin(values, [1, 2, 3, 4]).sum(), (values == 4).sum()]
    assert [int(regions[c].sum()) for c in range(3)] == expected and expected[0] > (values == 1).sum() + expected[2]
    with pytest.raises(DataError, match=r"holds label values \[3\] outside the brats2018 convention"):
        BratsRegionsd("seg", "brats2018")(item)


@pytest.mark.parametrize("convention", sorted(LABEL_CONVENTIONS))
def test_regions_back_to_a_label_map(convention):
    labels = LABEL_CONVENTIONS[convention].labels
    label = torch.tensor(labels * 3, dtype=torch.float32).reshape(1, -1, 1, 1)
    regions = BratsRegionsd("seg", convention)({"seg": label})["label"]
    restored = regions_to_label(regions, convention)
    expected = label.clone()
    expected[label == 3] = 1 if convention == "brats2015" else 3  # BRATS 2015's non-enhancing core is TC, as 1
    assert restored.dtype == torch.uint8 and torch.equal(restored.float(), expected)


# --------------------------------------------------------------------------------------------------- Dice


def test_region_dice_empty_slice_policy():
    label = torch.zeros(3, 4, 4, 3)
    prediction = torch.zeros(3, 4, 4, 3)
    label[0, :2, :2, 0] = 1  # TC: 4 voxels in slice 0
    prediction[0, :2, :1, 0] = 1  # 2 of them found
    prediction[0, 3, 3, 2] = 1  # and 1 false positive voxel in slice 2, a slice without TC
    prediction[2, 0, 0, 1] = 1  # ET: absent from the label, predicted in slice 1
    row = region_dice(prediction, label)
    assert row["dice3d_TC"] == pytest.approx(2 * 2 / (4 + 3))
    assert row["dice2d_TC"] == pytest.approx((2 * 2 / (4 + 2) + 0.0) / 2) and row["slices2d_TC"] == 2  # slice 1 left out
    assert (row["dice3d_WT"], row["dice2d_WT"], row["slices2d_WT"]) == (1.0, 1.0, 0)  # absent from both: 1
    assert (row["dice3d_ET"], row["dice2d_ET"], row["slices2d_ET"]) == (0.0, 0.0, 1)  # false positive only: 0
    with pytest.raises(ValueError, match=r"expected equal shapes \(3, H, W, D\)"):
        region_dice(prediction[:2], label[:2])


# ------------------------------------------------------------------------------------ toy case, by hand


def _toy_case() -> dict:
    """10x10x4, channels T1Gd, T1, T2, FLAIR; brain = [1:9, 1:9, :] (256 voxels, 64 per slice), 0.5 in every
    channel; ET [2:4, 2:4, 1:3] (8 voxels, T1Gd 1), necrosis [4:6, 2:4, 1:3] (8, T2 1), oedema [2:6, 4:6, 0:3]
    (24); TC = ET + necrosis (16: 8 in slices 1, 2), WT = TC + oedema (40: 8, 16, 16, 0; FLAIR 1)."""
    image, mask = torch.zeros(4, 10, 10, 4), torch.zeros(1, 10, 10, 4)
    mask[0, 1:9, 1:9] = 1
    image[:, 1:9, 1:9] = 0.5
    et, ncr, oedema = torch.zeros(10, 10, 4, dtype=torch.bool), torch.zeros(10, 10, 4, dtype=torch.bool), torch.zeros(
        10, 10, 4, dtype=torch.bool
    )
    et[2:4, 2:4, 1:3], ncr[4:6, 2:4, 1:3], oedema[2:6, 4:6, 0:3] = True, True, True
    tc, wt = et | ncr, et | ncr | oedema
    image[0][et], image[2][ncr], image[3][wt] = 1.0, 1.0, 1.0
    label = torch.stack([tc, wt, et]).float()
    return {"case_id": "toy", "image": image, "label": label, "mask": mask}


class ThresholdSegmenter(torch.nn.Module):
    """ET where T1Gd > 0.51, TC = ET or T2 > 0.75, WT where FLAIR > 0.75: exact on the toy's real contrasts."""

    def forward(self, x):
        et = x[:, 0] > 0.51
        regions = torch.stack([et | (x[:, 2] > 0.75), x[:, 3] > 0.75, et], dim=1)
        return regions.float() * 20 - 10  # logits


class LabelSegmenter(torch.nn.Module):
    """The 'perfect segmenter': returns the label's logits whatever the image (tests the evaluator only)."""

    def __init__(self, label):
        super().__init__()
        self.register_buffer("label", label)

    def forward(self, x):
        return (self.label[None] * 20 - 10).expand(x.shape[0], -1, -1, -1, -1)


class ChannelCopy(torch.nn.Module):
    """A stand-in generator: its third input channel (FLAIR for T1, T2, FLAIR) as the synthesized contrast."""

    def forward(self, x):
        return x[:, 2:3]


#: the 2D bundles' inference.json inferer: whole axial slices, four per forward pass
WHOLE_SLICES = SliceInferer(roi_size=(-1, -1), sw_batch_size=4, spatial_dim=2)


def _evaluate(network, tmp_path, conditions=CONDITIONS, **options):
    case = _toy_case()
    synthesizer = options.pop("synthesizer", None) or VolumeSynthesizer(
        ChannelCopy(), ["T1", "T2", "FLAIR"], "T1Gd", WHOLE_SLICES)
    evaluator = DownstreamEvaluator(
        "cpu", Dataset([case]), network, SimpleInferer(), tmp_path, conditions, "T1Gd", synthesizer=synthesizer,
        description={"case": "toy"}, **options,
    )
    evaluator.run()
    return {row["condition"]: row for row in read_csv(tmp_path / DOWNSTREAM_CSV)}, evaluator


def test_perfect_segmenter_scores_one_in_every_condition(tmp_path):
    rows, evaluator = _evaluate(LabelSegmenter(_toy_case()["label"]), tmp_path)
    assert list(rows) == list(CONDITIONS)
    for row in rows.values():
        assert [row[m] for m in METRICS] == [1.0] * 6
        assert (row["slices2d_TC"], row["slices2d_WT"], row["slices2d_ET"]) == (2, 3, 2)
    assert evaluator.state.metrics["zero_imputed_dice3d_ET"] == 1.0


def test_conditions_change_the_dice_of_a_segmenter_that_reads_the_missing_contrast(tmp_path):
    rows, evaluator = _evaluate(ThresholdSegmenter(), tmp_path)
    expected = {  # (3D TC, WT, ET, 2D TC, WT, ET), by hand from the toy's voxel counts (see _toy_case)
        "real": (1, 1, 1, 1, 1, 1),
        # T1Gd := FLAIR: ET predicted = WT (40 voxels; 8, 16, 16 per slice), TC = WT
        "synthesized": (2 * 16 / 56, 1, 2 * 8 / 48, (0 + 2 * 8 / 24 + 2 * 8 / 24) / 3, 1, (0 + 0.4 + 0.4) / 3),
        # T1Gd := 0: ET empty, TC = necrosis only (8 of 16)
        "zero_imputed": (2 * 8 / 24, 1, 0, 2 * 4 / 12, 1, 0),
        # T1Gd := 132 / 256 = 0.515625 > 0.51 in the brain: ET and TC = the whole brain (256; 64 per slice)
        "mean_imputed": (2 * 16 / 272, 1, 2 * 8 / 264, (2 * 8 / 72) * 2 / 4, 1, (2 * 4 / 68) * 2 / 4),
    }
    for condition, values in expected.items():
        assert [rows[condition][m] for m in METRICS] == pytest.approx(values), condition
    assert rows["mean_imputed"]["imputed_value"] == 0.515625
    assert rows["mean_imputed"]["slices2d_ET"] == 4 and rows["zero_imputed"]["slices2d_ET"] == 2
    for condition in ("synthesized", "zero_imputed", "mean_imputed"):
        assert rows[condition]["dice3d_ET"] < rows["real"]["dice3d_ET"]
    summary = json.loads((tmp_path / DOWNSTREAM_JSON).read_text())
    assert summary["cases"] == 1 and summary["failed"] == [] and summary["description"] == {"case": "toy"}
    assert summary["conditions"]["zero_imputed"]["dice3d_TC"]["mean"] == pytest.approx(2 / 3)
    assert summary["difference_to_real"]["zero_imputed"]["dice3d_TC"]["mean"] == pytest.approx(2 / 3 - 1)
    assert evaluator.state.metrics["mean_imputed_dice2d_TC"] == pytest.approx(1 / 9)
    table = (tmp_path / DOWNSTREAM_MD).read_text()
    assert "| zero_imputed | 0.667 ± 0.000 | 1.000 ± 0.000 | 0.000 ± 0.000 | 0.667 ± 0.000 |" in table
    assert "| -0.333 / +0.000 / -1.000 | 1 |" in table and "slices empty in both left out" in table


def test_a_fixed_mean_value_and_the_conditions_checks(tmp_path):
    rows, _ = _evaluate(ThresholdSegmenter(), tmp_path, ["real", "mean_imputed"], mean_value=0.4)
    assert rows["mean_imputed"]["imputed_value"] == 0.4 and rows["mean_imputed"]["dice3d_ET"] == 0.0  # 0.4 < 0.51
    image, value = condition_image(torch.ones(2, 2, 2, 1), "mean_imputed", 1, torch.tensor([[[1.0], [0.0]]] * 2))
    assert value == 1.0 and image[1].flatten().tolist() == [1.0, 0.0, 1.0, 0.0] and image[0].min() == 1
    with pytest.raises(ValueError, match=r"condition 'blank': expected one of \['real', 'synthesized'"):
        condition_image(torch.ones(2, 2, 2, 1), "blank", 0)
    dataset = Dataset([_toy_case()])
    with pytest.raises(ValueError, match="expected distinct names among"):
        DownstreamEvaluator("cpu", dataset, ThresholdSegmenter(), SimpleInferer(), tmp_path, ["real", "zero"], "T1Gd")
    with pytest.raises(ValueError, match="missing_contrast 'PD': conditions"):
        DownstreamEvaluator("cpu", dataset, ThresholdSegmenter(), SimpleInferer(), tmp_path, ["zero_imputed"], "PD")
    wrong = VolumeSynthesizer(ChannelCopy(), ["T1", "T2"], "FLAIR", WHOLE_SLICES)
    with pytest.raises(ValueError, match=r"the synthesizer makes FLAIR from \['T1', 'T2'\]; expected T1Gd"):
        DownstreamEvaluator("cpu", dataset, ThresholdSegmenter(), SimpleInferer(), tmp_path, missing_contrast="T1Gd",
                            synthesizer=wrong)


def test_a_failing_case_is_listed_and_the_others_are_evaluated(tmp_path):
    broken = {"case_id": "broken", "image": torch.zeros(3, 10, 10, 4), "label": torch.zeros(3, 10, 10, 4)}
    evaluator = DownstreamEvaluator(
        "cpu", Dataset([broken, _toy_case()]), ThresholdSegmenter(), SimpleInferer(), tmp_path, ["real"]
    )
    evaluator.run()
    summary = json.loads((tmp_path / DOWNSTREAM_JSON).read_text())
    assert summary["case_ids"] == ["toy"] and [f["case_id"] for f in summary["failed"]] == ["broken"]
    assert "Failed cases (1):" in (tmp_path / DOWNSTREAM_MD).read_text()


# --------------------------------------------------------------------------------- synthesized files, real


def _synthesized_file(folder: Path, affine_shift: float = 0.0) -> Path:
    """The real T1Gd divided by its 99.5th percentile and clipped: what a perfect synthesis bundle would write."""
    source = nib.load(next(TCGA.glob("*_t1c_bet.nii.gz")))
    values = np.asarray(source.dataobj, dtype=np.float32)
    affine = source.affine.copy()
    affine[0, 3] += affine_shift
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "OtherEXampleFromTCIA_T1Gd.nii.gz"
    nib.save(nib.Nifti1Image(np.clip(values / np.percentile(values, 99.5), 0, 1), affine), path)
    return path


def test_synthesized_files_join_the_case_on_its_grid(tmp_path):
    _synthesized_file(tmp_path / "synth")
    (case,) = discover_cases(TCGA.parent, required=["T1Gd", "T1", "T2", "FLAIR", "seg"]).cases
    dataset = downstream_dataset([case], label_convention="brats2018", synthesized_dir=tmp_path / "synth",
                                 missing_contrast="T1Gd")
    item = dataset[0]
    assert item["image"].shape == (4, 240, 240, 155) and item["label"].shape == (3, 240, 240, 155)
    # the file went through the same orientation and crop as the real T1Gd (channel 0), without renormalisation
    torch.testing.assert_close(item["synthesized"][0].as_tensor(), item["image"][0].as_tensor(), atol=1e-5, rtol=0)
    assert [int(item["label"][c].sum()) for c in range(3)] == [9317, 30179, 6840]


def test_synthesized_file_missing_or_on_another_grid_is_named(tmp_path):
    (case,) = discover_cases(TCGA.parent, required=["T1Gd", "T1", "T2", "FLAIR", "seg"]).cases
    with pytest.raises(DataError, match=r"OtherEXampleFromTCIA_T1Gd\.nii\.gz: not found \(expected the synthesized T1Gd"):
        AttachSynthesizedd(tmp_path, "T1Gd")(case)
    _synthesized_file(tmp_path, affine_shift=2.0)
    with pytest.raises(DataError, match=r"is not on the grid of the case's T2 .*expected the grid of T2"):
        AttachSynthesizedd(tmp_path, "t1ce")(case)


def test_a_synthesized_file_with_a_bids_name_is_found(tmp_path):
    # a synthesis bundle run into a BIDS dataset's derivatives/ names its outputs the BIDS way (before: looked for
    # <case_id>_T1Gd.nii.gz only, and reported the file not found)
    (case,) = discover_cases(TCGA.parent, required=["T1Gd", "T1", "T2", "FLAIR", "seg"]).cases
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "dataset_description.json").write_text("{}")
    derivative = tmp_path / "bids" / "derivatives" / "agi-monai"
    written = _synthesized_file(derivative / "sub-01" / "anat")
    bids_name = written.rename(written.with_name("sub-01_ce-gadolinium_desc-synthetic_T1w.nii.gz"))
    item = AttachSynthesizedd(derivative, "T1Gd")({**case, "case_id": "sub-01"})
    assert item["synthesized"] == str(bids_name)


# ------------------------------------------------------------------------------------------------- bundle


@pytest.mark.parametrize("configs", [["train.json"], ["train.json", "evaluate.json"], ["inference.json"]])
def test_bundle_configs_parse_and_follow_the_zoo_recipe(configs):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in configs])
    parser.parse()
    locator = ComponentLocator()
    for target in set(re.findall(r'"_target_": "([^"]+)"', json.dumps(parser.get()))):
        assert locator.get_component_module_name(target) or locate(target) is not None, f"{target} does not import"
    assert parser["inputs"] == ["T1Gd", "T1", "T2", "FLAIR"] and parser["spatial_size"] == [240, 240]
    assert parser["label_convention"] == "brats2023"
    network = parser["network_def"]
    assert (network["_target_"], network["spatial_dims"], network["init_filters"]) == ("SegResNet", 3, 16)
    assert (network["blocks_down"], network["blocks_up"], network["in_channels"], network["out_channels"]) == (
        [1, 2, 2, 4], [1, 1, 1], 4, 3
    )
    assert parser["sw_roi_size"] == [240, 240, 160]
    if configs[0] == "train.json":
        loss = parser["loss"]
        assert (loss["_target_"], loss["sigmoid"], loss["squared_pred"], loss["to_onehot_y"]) == ("DiceLoss", True, True, False)
        assert parser["roi_size"] == [224, 224, 144] and parser["epochs"] == 300 and parser["learning_rate"] == 1e-4
        assert parser["train#trainer#_target_"] == "SupervisedTrainer"
    if len(configs) == 2:
        assert parser["evaluate#evaluator#_target_"] == "agi_monai.evaluation.downstream.DownstreamEvaluator"
        assert parser["split"] == "test" and parser["conditions"] == ["real"]
    if configs == ["inference.json"]:
        assert parser["target"] == "seg"


@pytest.mark.skipif(not optional_import("jsonschema")[1], reason="jsonschema is not installed (MONAI's verify_metadata needs it)")
def test_bundle_metadata_verifies():
    from monai.bundle import verify_metadata, verify_net_in_out

    verify_metadata(
        meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA), hash_val=SCHEMA_SHA256, hash_type="sha256"
    )
    verify_net_in_out(
        net_id="network_def", meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"),
        device="cpu", n=2, **{"network_def#init_filters": 8},
    )
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert image["channel_def"] == {"0": "T1Gd", "1": "T1", "2": "T2", "3": "FLAIR"} and image["value_range"] == [0, 1]
    assert pred["format"] == "segmentation" and pred["channel_def"] == {"0": "TC", "1": "WT", "2": "ET"}


# ------------------------------------------------------------------------------------------- end to end

TINY = {  # widths and sizes for CPU tests; the tumour (x 136-178, y 124-182 of 240) stays inside the 128 crop
    "spatial_size": [128, 128], "sw_roi_size": [128, 128, 160], "network_def#init_filters": 8, "num_workers": 0,
}


def _run(*args: str, timeout: int = 600) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env=SUBPROCESS_ENV)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output[-6000:]}"
    return output


def test_the_synthesizer_takes_overrides_as_json_text_with_a_whole_network(tmp_path):
    """How downstream_dice.py passes --synthesis_overrides through the segmentation bundle's config: as JSON text,
    so that a whole network_def (a nested "_target_") reaches the synthesis bundle's parser unbuilt (before: the
    segmentation config built it into a Conv2d, which json could not record: "not JSON serializable")."""
    from agi_monai.evaluation.downstream import load_synthesizer

    conv = torch.nn.Conv2d(3, 1, kernel_size=1)
    torch.save(conv.state_dict(), tmp_path / "generator.pt")
    network = {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 1, "kernel_size": 1}
    synthesizer = load_synthesizer(REPO / "bundles" / "brats_t1_t2_flair_to_t1gd", tmp_path / "generator.pt",
                                   json.dumps({"network_def": network, "slices_per_batch": 5}))
    assert isinstance(synthesizer.network, torch.nn.Conv2d)
    torch.testing.assert_close(synthesizer.network.weight, conv.weight)
    # through the 2D bundle's own inference.json inferer: whole axial slices, its slices_per_batch at a time
    assert isinstance(synthesizer.inferer, SliceInferer) and synthesizer.inferer.spatial_dim == 2
    assert synthesizer.inferer.sw_batch_size == 5 and tuple(synthesizer.inferer.roi_size) == (-1, -1)


def _flags(overrides: dict) -> list[str]:
    return [text for key, value in overrides.items() for text in (f"--{key}", json.dumps(value))]


@pytest.mark.slow
def test_train_two_iterations_then_downstream_dice_and_inference(tmp_path):
    from agi_monai.networks import AGINet

    cases = tmp_path / "cases"
    (cases / TCGA.name).mkdir(parents=True)
    for file in TCGA.iterdir():
        (cases / TCGA.name / file.name).symlink_to(file)
    root = tmp_path / "segmentation"
    log = _run(
        "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(root),
        "--dataset_dir", str(cases), "--epochs", "2", "--val_interval", "2", "--roi_size", "[64,64,32]",
        "--label_convention", "brats2018", *_flags(TINY),
    )
    assert "Epoch: 2/2, Iter: 1/1" in log and "val_mean_dice_et" in log
    assert "validation: [1/1]" in log and "training done: iterations 1-2 of 2 (epochs 1-2 of 2)" in log
    assert (root / "models" / "model.pt").is_file() and (root / "models" / "training_checkpoint_epoch=2.pt").is_file()

    torch.manual_seed(0)  # an untrained tiny generator stands in for a trained (T1, T2, FLAIR) -> T1Gd bundle
    torch.save(AGINet(in_channels=3, channels=[8, 16, 16, 32]).state_dict(), tmp_path / "generator.pt")
    output = tmp_path / "downstream"
    log = _run(
        "scripts/downstream_dice.py", "--dataset_dir", str(cases), "--output_dir", str(output),
        "--segmentation_checkpoint", str(root / "models" / "model.pt"), "--synthesis_checkpoint",
        str(tmp_path / "generator.pt"), "--label_convention", "brats2018",
        "--synthesis_overrides", "{'network_def#channels': [8,16,16,32]}", "--segmentation_overrides", str(TINY),
    )
    rows = read_csv(output / DOWNSTREAM_CSV)
    assert [(r["case_id"], r["condition"]) for r in rows] == [("OtherEXampleFromTCIA", c) for c in CONDITIONS]
    for row in rows:
        assert all(0.0 <= row[m] <= 1.0 for m in METRICS)
    assert rows[3]["imputed_value"] > 0 and rows[0]["imputed_value"] == ""
    summary = json.loads((output / DOWNSTREAM_JSON).read_text())
    assert summary["failed"] == [] and summary["description"]["missing_contrast"] == "T1Gd"
    assert "| synthesized |" in log and (output / DOWNSTREAM_MD).is_file()
    assert (output / DOWNSTREAM_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the "real" row against an independent computation: the same weights and preprocessing, numpy Dice
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import SegResNet

    from agi_monai.evaluation.downstream import segmentation_preprocessing

    (case,) = discover_cases(cases, required=["T1Gd", "T1", "T2", "FLAIR", "seg"]).cases
    item = segmentation_preprocessing(spatial_size=(128, 128), label_convention="brats2018")(case)
    network = SegResNet(3, init_filters=8, in_channels=4, out_channels=3, dropout_prob=0.2,
                        blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1]).eval()
    network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    with torch.no_grad():
        logits = SlidingWindowInferer([128, 128, 160], 1, 0.5)(item["image"][None].as_tensor(), network)[0]
    prediction, label = (logits.numpy() > 0), item["label"].numpy() > 0
    for channel, region in enumerate(("TC", "WT", "ET")):
        both = prediction[channel].sum() + label[channel].sum()
        dice = 2 * (prediction[channel] & label[channel]).sum() / both if both else 1.0
        assert rows[0][f"dice3d_{region}"] == pytest.approx(dice, abs=1e-5)

    # inference.json: a BraTS label map per case on the reference T2's grid, in the chosen convention
    log = _run(
        "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(root),
        "--dataset_dir", str(cases), "--output_dir", str(tmp_path / "labels"), "--label_convention", "brats2018",
        *_flags({key: value for key, value in TINY.items() if key != "num_workers"}),  # it reads cases in-process
    )
    assert f"segmented 1 of 1 cases into {tmp_path / 'labels'}, 0 failed" in log
    written = nib.load(tmp_path / "labels" / "OtherEXampleFromTCIA_seg.nii.gz")
    reference = nib.load(next(TCGA.glob("*_t2_bet.nii.gz")))
    assert written.shape == reference.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-4)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2, 4}


def _description(tmp_path, **settings):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    parser.update({"bundle_root": str(tmp_path), "network_def#init_filters": 8, **settings})
    parser.parse()
    return parser.get_parsed_content("evaluate#evaluator#description")


def test_the_summary_description_names_both_checkpoints_and_the_synthesis_overrides(tmp_path):
    """downstream_summary.json's description records what was measured: the segmenter's checkpoint, and the
    generator's checkpoint and overrides (as downstream_dice.py passes them: JSON text), not only the bundle. The
    overrides as typed: MONAI's parser rewrites '#' to '::' in every config string, and before the summary read
    network_def::channels for a typed network_def#channels (the script now writes '#' as the JSON escape)."""
    from helpers import load_script

    from agi_monai.evaluation.downstream import overrides_as_given

    synthesis = str(REPO / "bundles" / "brats_t1_t2_flair_to_t1gd")
    typed = {"network_def#channels": [8, 16, 16, 32], "network_def#_target_": "agi_monai.networks.ResUNet"}
    overrides = load_script("downstream_dice.py").synthesis_overrides_text(typed)
    given = _description(tmp_path, synthesis_bundle=synthesis, synthesis_checkpoint=str(tmp_path / "generator.pt"),
                         synthesis_overrides=overrides, ckpt_path=str(tmp_path / "seg.pt"))
    assert given["segmenter_checkpoint"] == str(tmp_path / "seg.pt") and given["synthesis"] == synthesis
    assert given["synthesis_checkpoint"] == str(tmp_path / "generator.pt")
    assert given["synthesis_overrides"] == typed == overrides_as_given(overrides)  # what load_synthesizer applies
    default = _description(tmp_path, synthesis_bundle=synthesis)  # the bundle's own weights
    assert default["synthesis_checkpoint"] == synthesis + "/models/model.pt" and default["synthesis_overrides"] == {}
    files = _description(tmp_path, synthesis_bundle=synthesis, synthesized_dir=str(tmp_path))  # no generator is run
    assert files["synthesis"] == str(tmp_path) and files["synthesis_checkpoint"] == files["synthesis_overrides"] == ""


def test_the_summary_description_records_the_data_sizes_and_the_segmenter(tmp_path):
    """Before: two runs at different sizes (WT 0.657 at 160x160 vs 0.890 at 240x240 in the review) wrote the same
    description; it named neither dataset_dir, spatial_size, sw_roi_size, the segmenter's network_def nor mean_value."""
    first = _description(tmp_path, dataset_dir=str(tmp_path / "a"), spatial_size=[160, 160],
                         sw_roi_size=[160, 160, 160])
    second = _description(tmp_path, dataset_dir=str(tmp_path / "b"), **{"network_def#init_filters": 16},
                          mean_value=0.4)
    assert (first["dataset_dir"], first["spatial_size"], first["sw_roi_size"]) == (
        str(tmp_path / "a"), [160, 160], [160, 160, 160])
    assert (second["dataset_dir"], second["spatial_size"], second["sw_roi_size"]) == (
        str(tmp_path / "b"), [240, 240], [240, 240, 160])
    assert first["inputs"] == ["T1Gd", "T1", "T2", "FLAIR"]
    assert (first["mean_value"], second["mean_value"]) == (None, 0.4)
    network = first["segmenter_network_def"]
    assert network["class"] == "monai.networks.nets.segresnet.SegResNet" and network["parameters"] == 1176843
    assert (network["init_filters"], network["in_channels"], network["blocks_down"], network["blocks_up"]) == (
        8, 4, [1, 2, 2, 4], [1, 1, 1])
    assert second["segmenter_network_def"]["init_filters"] == 16
    json.dumps(first)  # JSON-able as the summary writes it


# ------------------------------------------------------------------------------------------- skipped cases


def _cases_with_one_unlabelled(folder: Path) -> Path:
    """The shipped labelled case, and the same four contrasts under another name without a label map."""
    (folder / TCGA.name).mkdir(parents=True)
    (folder / "nolabel").mkdir()
    for file in TCGA.iterdir():
        (folder / TCGA.name / file.name).symlink_to(file)
        if file.name != MAV.name:
            (folder / "nolabel" / file.name.replace("OtherEXampleFromTCIA", "nolabel")).symlink_to(file)
    return folder


def test_a_case_without_a_label_reaches_the_summary_as_failed(tmp_path, capsys):
    """Before: evaluate.json read its cases with load_split, which drops discovery's failures, and the evaluator never
    knew: a case without seg disappeared from the downstream results, reported nowhere but in the log."""
    cases = _cases_with_one_unlabelled(tmp_path / "cases")
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(cases), "network_def#init_filters": 8})
    parser.parse()
    assert [case["case_id"] for case in parser.get_parsed_content("evaluate#datalist")] == ["OtherEXampleFromTCIA"]
    (skipped,) = parser.get_parsed_content("evaluate#evaluator#skipped")
    assert (skipped.case_id, skipped.reason) == ("nolabel", "missing seg (found FLAIR, T1, T1Gd, T2)")

    evaluator = DownstreamEvaluator("cpu", Dataset([_toy_case()]), ThresholdSegmenter(), SimpleInferer(),
                                    tmp_path / "out", ["real"], skipped=[skipped])
    evaluator.run()
    summary = json.loads((tmp_path / "out" / DOWNSTREAM_JSON).read_text())
    assert summary["case_ids"] == ["toy"]
    assert summary["failed"] == [{"case_id": "nolabel", "reason": "missing seg (found FLAIR, T1, T1Gd, T2)"}]
    assert "- nolabel: missing seg (found FLAIR, T1, T1Gd, T2)" in (tmp_path / "out" / DOWNSTREAM_MD).read_text()
    assert "evaluated 1 of 2 cases" in capsys.readouterr().out
    evaluator.run()  # a second run lists it once
    assert len(json.loads((tmp_path / "out" / DOWNSTREAM_JSON).read_text())["failed"]) == 1
    with pytest.raises(ValueError, match=r"no case to evaluate: the 1 cases found were skipped \(nolabel: missing seg"):
        DownstreamEvaluator("cpu", Dataset([]), ThresholdSegmenter(), SimpleInferer(), tmp_path, ["real"],
                            skipped=[skipped])


def test_a_segmenter_checkpoint_that_does_not_fit_is_one_line_and_exit_2(tmp_path):
    """Before: downstream_dice.py --segmentation_checkpoint with a synthesis bundle's model.pt (or a segmenter of other
    widths) ended on MONAI's traceback "Failed to evaluate ConfigExpression", exit 1, the file unnamed. evaluate.json
    now loads the weights in an initialize step (agi_monai.engines.load_weights), before any case is read."""
    from agi_monai.data.errors import innermost_cause
    from agi_monai.networks import AGINet
    from monai.networks.nets import SegResNet

    generator = tmp_path / "generator.pt"
    torch.save(AGINet(in_channels=3, channels=[8, 16, 16, 32]).state_dict(), generator)
    cases = _cases_with_one_unlabelled(tmp_path / "cases")
    result = subprocess.run(
        [sys.executable, "scripts/downstream_dice.py", "--dataset_dir", str(cases), "--output_dir",
         str(tmp_path / "out"), "--segmentation_checkpoint", str(generator), "--conditions", "['real']",
         "--segmentation_overrides", str(TINY)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"downstream_dice.py: error: {generator}: does not fit SegResNet of this config: ")
    assert line.endswith("its init_filters too, which scripts/downstream_dice.py takes in --segmentation_overrides)")

    narrower = tmp_path / "segmenter8.pt"  # init_filters 8, loaded into the config's 16
    torch.save(SegResNet(3, init_filters=8, in_channels=4, out_channels=3, blocks_down=[1, 2, 2, 4],
                         blocks_up=[1, 1, 1]).state_dict(), narrower)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(cases), "ckpt_path": str(narrower)})
    parser.parse()
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("initialize")
    error = innermost_cause(raised.value)
    assert isinstance(error, DataError) and str(error).startswith(
        f"{narrower}: does not fit SegResNet of this config: 82 tensor(s) of another shape (e.g. convInit.conv.weight "
        "(8, 4, 3, 3, 3) in the file, (16, 4, 3, 3, 3) here)"
    )


# ----------------------------------------------------------------------------------- where 'synthesized' comes from


def test_the_synthesized_condition_without_a_synthesizer_or_files_is_refused(tmp_path):
    """Before: conditions with 'synthesized' and neither a synthesis bundle nor synthesized_dir failed every case at
    run time, and the run ended with status 0 and a summary of NaN."""
    from agi_monai.data.errors import innermost_cause

    with pytest.raises(ValueError, match="condition 'synthesized' needs the synthesized contrast: a synthesizer"):
        DownstreamEvaluator("cpu", Dataset([_toy_case()]), ThresholdSegmenter(), SimpleInferer(), tmp_path / "out",
                            ["real", "synthesized"], "T1Gd")
    assert not (tmp_path / "out").exists()
    cases = _cases_with_one_unlabelled(tmp_path / "cases")
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(cases), "network_def#init_filters": 8,
                   "conditions": ["real", "synthesized"]})
    parser.parse()
    with pytest.raises(Exception) as raised:  # evaluate.json, before any case is read
        parser.get_parsed_content("evaluate#evaluator")
    assert "needs the synthesized contrast" in str(innermost_cause(raised.value))
    # accepted with synthesized files (downstream_dataset attaches them), or items that carry the contrast
    (case,) = discover_cases(TCGA.parent, required=["T1Gd", "T1", "T2", "FLAIR", "seg"]).cases
    files = downstream_dataset([case], synthesized_dir=tmp_path / "synth", missing_contrast="T1Gd")
    DownstreamEvaluator("cpu", files, ThresholdSegmenter(), SimpleInferer(), tmp_path, ["synthesized"], "T1Gd")
    carried = Dataset([{**_toy_case(), "synthesized": torch.zeros(1, 10, 10, 4)}])
    DownstreamEvaluator("cpu", carried, ThresholdSegmenter(), SimpleInferer(), tmp_path, ["synthesized"], "T1Gd")


def test_a_3d_synthesis_bundle_synthesizes_through_its_own_inferer(tmp_path):
    """Before: load_synthesizer wrapped every generator in the 2D slice loop, and with the 3D bundle every case failed
    on a channel error. An untrained small 3D AGI-Net on a region of the shipped case, against the same network run
    through MONAI's sliding window with the bundle's settings."""
    from monai.inferers import SlidingWindowInferer

    from agi_monai.evaluation.downstream import load_synthesizer, segmentation_preprocessing
    from agi_monai.networks import AGINet

    torch.manual_seed(0)
    generator = AGINet(spatial_dims=3, in_channels=3, channels=[8, 16, 16, 32]).eval()
    torch.save(generator.state_dict(), tmp_path / "generator3d.pt")
    overrides = {"network_def#channels": [8, 16, 16, 32], "patch_size": [32, 32, 32], "patches_per_batch": 2}
    synthesizer = load_synthesizer(REPO / "bundles" / "brats_t1_t2_flair_to_t1gd_3d", tmp_path / "generator3d.pt",
                                   json.dumps(overrides))
    assert isinstance(synthesizer, VolumeSynthesizer)
    assert (synthesizer.inputs, synthesizer.target) == (("T1", "T2", "FLAIR"), "T1Gd")
    (case,) = discover_cases(TCGA, required=["T1Gd", "T1", "T2", "FLAIR"]).cases
    image = segmentation_preprocessing(label_key=None)(case)["image"].as_tensor()
    region = image[1:, 130:178, 128:176, 60:92]  # T1, T2, FLAIR; 48x48x32 through the tumour
    synthesized = synthesizer(region)
    with torch.no_grad():
        expected = SlidingWindowInferer([32, 32, 32], 2, overlap=0.25, mode="gaussian")(region[None], generator)[0]
    assert synthesized.shape == (1, 48, 48, 32) and 0 <= synthesized.min() and synthesized.max() <= 1
    torch.testing.assert_close(synthesized, expected.clamp(0, 1), atol=1e-5, rtol=1e-5)
    # in the evaluator: the synthesized condition is measured, not failed
    _, evaluator = _evaluate(ThresholdSegmenter(), tmp_path, ["real", "synthesized"], synthesizer=synthesizer)
    assert evaluator.failures == [] and [row["condition"] for row in evaluator.rows] == ["real", "synthesized"]


def test_the_dice_is_of_the_raw_channels_at_or_above_half_not_of_the_written_map(tmp_path):
    """What the summary states (DICE_POLICY, README): sigmoid >= 0.5 (a logit of 0 counts; the text said "> 0.5"),
    on the raw TC, WT, ET channels; inference.json's nested label map, read back, can score differently."""
    from agi_monai.evaluation.downstream import DICE_POLICY

    label = torch.zeros(3, 4, 4, 2)
    label[0, :2, :2], label[1, :3, :3], label[2, :1, :1] = 1, 1, 1  # nested: ET in TC in WT
    logits = label * 20 - 10
    logits[0, 0, 0, 0] = 0.0  # sigmoid exactly 0.5: counted as TC
    logits[2, 3, 3, 0] = 10.0  # ET predicted outside TC and WT
    case = {"case_id": "nested", "image": torch.zeros(4, 4, 4, 2), "label": label, "mask": torch.ones(1, 4, 4, 2)}
    segmenter = LabelSegmenter(logits / 20 + 0.5)  # (the stub returns 20 x - 10: these logits)
    DownstreamEvaluator("cpu", Dataset([case]), segmenter, SimpleInferer(), tmp_path, ["real"]).run()
    (row,) = read_csv(tmp_path / DOWNSTREAM_CSV)
    evaluator_tc = row["dice3d_TC"]
    channels = (torch.sigmoid(logits) >= 0.5).float()
    assert channels[0, 0, 0, 0] == 1
    raw = region_dice(channels, label)
    assert evaluator_tc == pytest.approx(raw["dice3d_TC"]) == 1.0  # ET outside TC does not touch TC's channel
    written = BratsRegionsd("seg", "brats2023")({"seg": regions_to_label(channels).float()})["label"]
    as_map = region_dice(written, label)
    assert as_map["dice3d_TC"] == pytest.approx(2 * 8 / (9 + 8))  # the map's TC took the ET voxel outside it
    assert as_map["dice3d_WT"] == pytest.approx(2 * 18 / (19 + 18)) and raw["dice3d_WT"] == 1.0
    assert as_map["dice3d_ET"] == raw["dice3d_ET"]
    assert DICE_POLICY.startswith("sigmoid >= 0.5 per region channel") and "raw TC, WT, ET channels" in DICE_POLICY
