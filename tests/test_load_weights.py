"""Reading a network's weights file: :func:`agi_monai.engines.load_weights`, the one implementation, and the callers
that add their own context to its messages (``load_generator``, ``load_synthesizer``, the Deploy synthesizer;
the CLI's are in ``test_bad_inputs.py``). Each bad file is a real ``torch.save`` file in ``tmp_path``; each message
is checked in full (the file, what is wrong, what was expected), and a refused file leaves the network as it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from agi_monai.bundle.experiment import load_generator
from agi_monai.bundle.registry import BundleError
from agi_monai.data import DataError
from agi_monai.deploy.synthesis import BundleSynthesizer
from agi_monai.data import MissingFileError
from agi_monai.engines import ReportingCheckpointLoader, expected_bundle_weights, load_weights
from agi_monai.evaluation.downstream import load_synthesizer
from agi_monai.networks import AGINet
from helpers import REPO

BUNDLE = REPO / "bundles" / "brats_t1_t2_to_flair"
WIDTHS = [8, 8, 8, 8]
EXPECTED = "the weights of the test's generator"


def small_network(in_channels: int = 2, width: int = 4, bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(in_channels * 10 + width)
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, width, 3, bias=bias), torch.nn.Conv2d(width, 1, 1))


def same_state(a: torch.nn.Module, b: dict[str, torch.Tensor]) -> bool:
    state = a.state_dict()
    return state.keys() == b.keys() and all(torch.equal(state[k], b[k]) for k in state)


def test_loads_the_saved_tensors(tmp_path):
    saved = small_network()
    torch.save(saved.state_dict(), tmp_path / "model.pt")
    network = small_network(width=4, in_channels=2)
    torch.nn.init.zeros_(network[0].weight)  # differs from the file before loading
    assert load_weights(network, tmp_path / "model.pt", "cpu", EXPECTED) is network
    assert same_state(network, saved.state_dict())
    x = torch.rand(1, 2, 8, 8)
    assert torch.equal(network(x), saved(x))


def _write(kind: str, path: Path) -> None:
    """A bad weights file of ``kind`` at ``path``."""
    good = small_network().state_dict()
    if kind == "truncated":
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[:200])  # an interrupted copy
    elif kind == "text":
        path.write_text("weights: none yet\n")
    elif kind == "whole network":
        torch.save(small_network(), path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "training checkpoint":
        torch.save({"generator": good, "optimizer": {"state": {}}, "trainer": {"epoch": 2}}, path)
    elif kind == "other inputs":
        torch.save(small_network(in_channels=3).state_dict(), path)
    elif kind == "other widths":
        torch.save(small_network(width=6).state_dict(), path)
    elif kind == "other network":  # no bias in the first layer, and one layer more
        other = small_network(bias=False).state_dict()
        other["2.weight"] = torch.zeros(1, 1, 1, 1)
        torch.save(other, path)


@pytest.mark.parametrize(
    "kind, problem",
    [
        ("missing", "does not exist"),
        ("folder", "is a folder, not a file"),
        ("truncated", "cannot be read by torch.load: truncated, or not a PyTorch file (RuntimeError: "
                      "PytorchStreamReader failed reading zip archive: failed finding central directory)"),
        ("text", "cannot be read by torch.load(weights_only=True): it holds more than tensors, e.g. a whole network "
                 "saved instead of its state_dict() (Unsupported operand 119)"),
        ("whole network", "cannot be read by torch.load(weights_only=True): it holds more than tensors, e.g. a whole "
                          "network saved instead of its state_dict() (Unsupported global: GLOBAL "
                          "torch.nn.modules.container.Sequential was not an allowed global by default)"),
        ("tensor", "holds a Tensor, not a state dict"),
        ("training checkpoint", "holds a checkpoint of generator, optimizer, trainer, not one network's state dict"),
        ("other inputs", "does not fit Sequential of this config: 1 tensor(s) of another shape (e.g. 0.weight "
                         "(4, 3, 3, 3) in the file, (4, 2, 3, 3) here)"),
        ("other widths", "does not fit Sequential of this config: 3 tensor(s) of another shape (e.g. 0.weight "
                         "(6, 2, 3, 3) in the file, (4, 2, 3, 3) here)"),
        ("other network", "does not fit Sequential of this config: 1 missing (e.g. 0.bias), 1 unexpected "
                          "(e.g. 2.weight)"),
    ],
)
def test_a_file_that_does_not_fit_is_named_and_changes_nothing(tmp_path, kind, problem):
    path = tmp_path / "model.pt"
    if kind == "folder":
        path.mkdir()
    else:
        _write(kind, path)
    before = path.read_bytes() if path.is_file() else None
    network = small_network()
    state = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(DataError) as raised:
        load_weights(network, path, "cpu", EXPECTED)
    assert str(raised.value) == f"{path}: {problem} (expected {EXPECTED})"
    assert isinstance(raised.value, FileNotFoundError) == (kind == "missing")  # what callers of torch.load catch
    assert same_state(network, state)  # "other widths": load_state_dict alone would have copied the fitting 1.bias
    assert (path.read_bytes() if path.is_file() else None) == before


def test_training_checkpoint_loader_describes_a_network_file_as_load_weights_does(tmp_path):
    """A training checkpoint's loader (:class:`ReportingCheckpointLoader`) given a network's weights file names it as
    :func:`load_weights` does: the same file gets the same message from both."""
    path = tmp_path / "model.pt"
    _write("other widths", path)
    with pytest.raises(DataError) as by_load_weights:
        load_weights(small_network(), path, expected=EXPECTED)
    engine = Engine(lambda engine, batch: None)
    ReportingCheckpointLoader(str(path), {"model": small_network()}, expected=EXPECTED).attach(engine)
    with pytest.raises(DataError) as by_loader:
        engine.run([0], max_epochs=1)
    assert str(by_loader.value) == str(by_load_weights.value)
    with pytest.raises(MissingFileError, match=rf"{tmp_path / 'none.pt'}: does not exist \(expected {EXPECTED}\)"):
        ReportingCheckpointLoader(str(tmp_path / "none.pt"), {"model": small_network()}, expected=EXPECTED)(engine)


def test_expected_bundle_weights_names_the_network_overrides():
    overrides = {"network_def#channels": [8, 16, 16, 32], "slices_per_batch": 4, "network_def#groups": 4}
    assert expected_bundle_weights("b", "--override", overrides) == (
        "the weights bundle b's train.json writes (models/model.pt) in a run with the network_def overrides given "
        "here (--override: network_def#channels=[8, 16, 16, 32], network_def#groups=4)"
    )
    assert expected_bundle_weights("b", "--override").endswith("(--override: none)")


# ------------------------------------------------------------------------------------------------ callers


@pytest.fixture
def narrow_weights(tmp_path) -> Path:
    """An untrained AGI-Net of brats_t1_t2_to_flair's inputs with widths (8, 8, 8, 8), not the bundle's (64 ... 512)."""
    torch.manual_seed(0)
    torch.save(AGINet(in_channels=2, channels=WIDTHS).state_dict(), tmp_path / "model.pt")
    return tmp_path / "model.pt"


WIDTHS_MISMATCH = (
    "does not fit AGINet of this config: 136 tensor(s) of another shape (e.g. head.weight (8, 2, 3, 3) in the file, "
    "(64, 2, 3, 3) here)"
)


def test_load_synthesizer_names_weights_of_other_widths(narrow_weights, tmp_path):
    # before: torch's RuntimeError listing every size mismatch, without the file
    with pytest.raises(DataError) as raised:
        load_synthesizer(BUNDLE, narrow_weights)
    assert str(raised.value) == (
        f"{narrow_weights}: {WIDTHS_MISMATCH} (expected the weights bundle brats_t1_t2_to_flair's train.json writes "
        "(models/model.pt) in a run with the network_def overrides given here (--synthesis_overrides: none); none are "
        "shipped: train the bundle, or pass --synthesis_checkpoint)"
    )
    missing = tmp_path / "none.pt"
    with pytest.raises(FileNotFoundError, match=rf"{missing}: does not exist \(expected the weights bundle"):
        load_synthesizer(BUNDLE, missing, {"network_def#channels": WIDTHS})
    synthesizer = load_synthesizer(BUNDLE, narrow_weights, {"network_def#channels": WIDTHS})
    assert same_state(synthesizer.network, torch.load(narrow_weights, weights_only=True))


def test_load_generator_names_a_truncated_file(narrow_weights):
    narrow_weights.write_bytes(narrow_weights.read_bytes()[:1000])
    with pytest.raises(DataError) as raised:  # a ValueError, as load_generator documented before
        load_generator(BUNDLE, narrow_weights, {"network_def#channels": WIDTHS})
    assert str(raised.value).startswith(f"{narrow_weights}: cannot be read by torch.load: truncated, or not a PyTorch")
    assert str(raised.value).endswith(
        "(expected the weights bundle brats_t1_t2_to_flair's train.json writes (models/model.pt) in a run with the "
        "network_def overrides given here (overrides: network_def#channels=[8, 8, 8, 8]))"
    )


def test_deploy_synthesizer_names_weights_of_other_widths_and_the_override(narrow_weights, tmp_path):
    # before: "cannot be loaded into bundle ...'s network (RuntimeError: ...)" and no word of --override; untested
    bundle = tmp_path / "brats_t1_t2_to_flair"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    shutil.copy(narrow_weights, bundle / "models" / "model.pt")
    with pytest.raises(BundleError) as raised:
        BundleSynthesizer(bundle, device="cpu", overrides={"network_def#channels": [8, 16, 16, 32]})
    assert str(raised.value) == (
        f"{bundle / 'models' / 'model.pt'}: does not fit AGINet of this config: 106 tensor(s) of another shape (e.g. "
        "down1.2.weight (8, 8, 2, 2) in the file, (16, 8, 2, 2) here) (expected the weights bundle "
        "brats_t1_t2_to_flair's train.json writes (models/model.pt) in a run with the network_def overrides given "
        "here (--override: network_def#channels=[8, 16, 16, 32]))"
    )
    synthesizer = BundleSynthesizer(bundle, device="cpu", overrides={"network_def#channels": WIDTHS})
    assert same_state(synthesizer.network, torch.load(narrow_weights, weights_only=True))
