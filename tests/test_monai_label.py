"""MONAI Label (issue #7 item 4): the bundles' ``inference.json`` holds ``pre_transforms`` / ``post_transforms``, the ids
MONAI Label's ``BundleInferTask`` (the ``monaibundle`` sample app's inference task) reads in preference to
``preprocessing`` / ``postprocessing``, for its one-file input: the input contrasts stacked as a 4D NIfTI (last axis
= channels in the scenario's order) on one grid.

1. Always: that chain, the bundle's ``inferer`` and network on a stacked file give the same volume as the bundle's
   own per-contrast path (``preprocessing`` + ``FolderSynthesis``'s postprocessing) on the same real case (BraTS: the
   contrasts share a grid, so no registration is involved).
2. Where MONAI Label is installed: the side environment ``.venv/label`` that ``scripts/setup_env.sh`` builds (so in
   CI; docs/deploy.md), or the Python of ``$AGI_MONAI_LABEL_PYTHON``: ``BundleInferTask`` itself on a copy of the
   bundle writes that same float32 volume.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from agi_monai.networks import AGINet
from helpers import REPO, SUBPROCESS_ENV

GLI = REPO / "tests" / "data" / "brats2023-gli" / "BraTS-GLI-00001-000"
# the side environment of scripts/setup_env.sh beside this environment (.venv/label), counted as there only once its
# marker is: an install that failed or was cut off leaves a Python without MONAI Label, and setup_env.sh has warned
LABEL_ENV = Path(sys.prefix) / "label"
if os.environ.get("AGI_MONAI_LABEL_PYTHON"):
    LABEL_PYTHON = Path(os.environ["AGI_MONAI_LABEL_PYTHON"])
    LABEL_SKIP_REASON = None if LABEL_PYTHON.is_file() else f"no {LABEL_PYTHON} ($AGI_MONAI_LABEL_PYTHON)"
else:
    LABEL_PYTHON = LABEL_ENV / "bin" / "python"
    LABEL_SKIP_REASON = None if (LABEL_ENV / ".agi_monai_installed").is_file() else (
        f"MONAI Label's side environment {LABEL_ENV} is not installed: `bash scripts/setup_env.sh` builds it "
        "(AGI_MONAI_LABEL=1, the default; a failed install printed a WARNING there), or set $AGI_MONAI_LABEL_PYTHON"
    )
WIDTHS = [8, 8, 8, 8]
SLICES = slice(60, 84)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A copy of brats_t1_t2_to_flair with an untrained narrow generator; its inference.json is given the narrow
    widths and 64x64 slices (MONAI Label instantiates ``network_def`` as the file says: no overrides)."""
    root = tmp_path_factory.mktemp("bundles") / "brats_t1_t2_to_flair"
    shutil.copytree(REPO / "bundles" / root.name, root, ignore=shutil.ignore_patterns("models", "eval"))
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["network_def"]["channels"] = WIDTHS
    config["spatial_size"] = [64, 64]
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(AGINet(in_channels=2, channels=WIDTHS).state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """BraTS-GLI's T1 and T2 (24 slices) as separate files and stacked into one 4D file (channels T1, T2)."""
    folder = tmp_path_factory.mktemp("case")
    t1, t2 = (nib.load(GLI / f"BraTS-GLI-00001-000-{n}.nii.gz").slicer[:, :, SLICES] for n in ("t1n", "t2w"))
    nib.save(t1, folder / "case-t1.nii.gz")
    nib.save(t2, folder / "case-t2.nii.gz")
    stacked = np.stack([np.asarray(t1.dataobj), np.asarray(t2.dataobj)], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(stacked, t1.affine), folder / "stacked.nii.gz")
    return {"T1": folder / "case-t1.nii.gz", "T2": folder / "case-t2.nii.gz", "stacked": folder / "stacked.nii.gz"}


def bundle_path_prediction(bundle: Path, case: dict[str, Path]) -> np.ndarray:
    """The bundle's own per-contrast inference of the case (what agi-monai synthesize writes), in memory."""
    parser = _parser(bundle)
    preprocessing = parser.get_parsed_content("preprocessing")
    item = preprocessing({"case_id": "case", "T1": str(case["T1"]), "T2": str(case["T2"])})
    item["pred"] = _predict(parser, item["image"])
    from agi_monai.data import restore_geometry_transforms
    from agi_monai.engines import clip_prediction

    return np.asarray(restore_geometry_transforms(preprocessing, "pred")(clip_prediction("pred")(item))["pred"])[0]


def test_stacked_input_chain_equals_the_per_contrast_path(bundle, case):
    parser = _parser(bundle)
    item = parser.get_parsed_content("pre_transforms")({"image": str(case["stacked"])})
    # pad only: the 240x240 slices stay whole although the bundle's spatial_size is 64x64
    assert item["image"].shape == (2, 240, 240, SLICES.stop - SLICES.start)
    item["pred"] = _predict(parser, item["image"])
    restored = np.asarray(parser.get_parsed_content("post_transforms")(item)["pred"])[0]
    expected = bundle_path_prediction(bundle, case)
    assert restored.shape == expected.shape == nib.load(case["T1"]).shape
    np.testing.assert_allclose(restored, expected, atol=1e-6)
    assert restored.std() > 0 and 0.0 <= restored.min() and restored.max() <= 1.0


def test_stacked_input_of_another_layout_is_named_with_the_layout_expected(bundle, case, tmp_path):
    from agi_monai.data import failure_reason

    pre_transforms = _parser(bundle).get_parsed_content("pre_transforms")
    t1 = nib.load(case["T1"])
    three = np.stack([np.asarray(t1.dataobj)] * 3, axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(three, t1.affine), tmp_path / "three.nii.gz")
    for file, shape in [(case["T1"], f"{t1.shape}"), (tmp_path / "three.nii.gz", f"{three.shape}")]:
        with pytest.raises(Exception) as raised:
            pre_transforms({"image": str(file)})
        assert failure_reason(raised.value) == (
            f"{file}: has shape {shape} (expected a 4D image (X, Y, Z, 2): the contrasts T1, T2 of one "
            "case on one grid, stacked along the last axis in this order)"
        )


@pytest.mark.skipif(LABEL_SKIP_REASON is not None, reason=str(LABEL_SKIP_REASON))
def test_monai_label_bundle_infer_task_writes_the_same_float_volume(bundle, case, tmp_path):
    script = (
        "import json, sys\n"
        "import numpy\n"
        "from monailabel.tasks.infer.bundle import BundleInferTask\n"
        f"task = BundleInferTask({str(bundle)!r}, {{}})\n"
        "assert task.is_valid()\n"
        f"path, result = task({{'image': {str(case['stacked'])!r}, 'device': 'cpu'}})\n"
        "print('RESULT', json.dumps({'path': path, 'labels': task.labels, 'numpy': numpy.__version__}))\n"
    )
    run = subprocess.run([str(LABEL_PYTHON), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=SUBPROCESS_ENV)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    result = json.loads(run.stdout.split("RESULT ", 1)[1].splitlines()[0])
    # MONAI Label's requirements pin numpy < 2: torch and the project's packages ran with numpy 1 there
    assert result["numpy"].split(".")[0] == "1", result["numpy"]
    written = nib.load(result["path"])
    assert written.get_data_dtype() == np.float32  # MONAI Label keeps the float image (its viewers show a label map)
    np.testing.assert_allclose(written.affine, nib.load(case["stacked"]).affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(written.dataobj), bundle_path_prediction(bundle, case), atol=1e-5)
    assert result["labels"] == {"flair": 0}  # from metadata.json's output channel_def: the one "label" is the target
    Path(result["path"]).unlink()


def _parser(bundle: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    return parser


def _predict(parser: ConfigParser, image: torch.Tensor) -> MetaTensor:
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(Path(parser["bundle_root"]) / "models" / "model.pt", weights_only=True))
    with torch.inference_mode():
        prediction = parser.get_parsed_content("inferer")(torch.as_tensor(image)[None], network.eval())
    return MetaTensor(prediction[0])
