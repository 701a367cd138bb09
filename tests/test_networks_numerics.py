"""ResUNet against an independent functional forward, ResBlock's residual, CAGR's padding for even kernels.

The functional forward below is written from DPIR's description of UNetRes (Zhang et al., TPAMI 2021): head conv,
three down stages of [ResBlocks, 2×2 stride-2 conv], body ResBlocks, three up stages of [2×2 transposed conv,
ResBlocks] each fed the previous output plus the skip at its resolution, tail conv on the last output plus the head's
features; every convolution bias-free, each ResBlock z + conv(relu(conv(z))). It reads the module's weights by name
only, so a dropped residual or skip in the module makes the two disagree.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agi_monai.networks import CAGR, ResUNet
from agi_monai.networks.blocks import ResBlock
from helpers import DATA

GLI = DATA / "brats2023-gli" / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-"
CHANNELS = (8, 16, 32, 64)
NUM_RES_BLOCKS = 2


def _brats_slice(contrasts=("t1n", "t2w"), z: int = 77, crop: slice = slice(40, 200)) -> torch.Tensor:
    """(1, len(contrasts), 160, 160) float64: axial slice ``z`` of the real BraTS case, each contrast scaled to [0, 1]
    (160 is divisible by 8; the crop keeps the brain)."""
    planes = []
    for contrast in contrasts:
        plane = np.asarray(nib.load(f"{GLI}{contrast}.nii.gz").dataobj[crop, crop, z], dtype=np.float64)
        planes.append(plane / plane.max())
    return torch.from_numpy(np.stack(planes))[None]


def _res_block(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    h = F.conv2d(x, w[f"{prefix}.conv1.weight"], padding=1)
    return x + F.conv2d(F.relu(h), w[f"{prefix}.conv2.weight"], padding=1)


def _unetres_forward(x: torch.Tensor, w: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """DPIR's UNetRes forward (2D), from its description, with the weights ``w`` by state_dict name."""
    x1 = F.conv2d(x, w["head.weight"], padding=1)
    features = [x1]
    h = x1
    for stage in ("down1", "down2", "down3"):
        for i in range(n):
            h = _res_block(h, w, f"{stage}.{i}")
        h = F.conv2d(h, w[f"{stage}.{n}.weight"], stride=2)  # the downsampling conv follows the n ResBlocks
        features.append(h)
    x1, x2, x3, x4 = features
    y = x4
    for i in range(n):
        y = _res_block(y, w, f"body.{i}")
    for stage, skip in (("up1", x4), ("up2", x3), ("up3", x2)):
        y = F.conv_transpose2d(y + skip, w[f"{stage}.0.weight"], stride=2)  # the upsampling conv comes first
        for i in range(n):
            y = _res_block(y, w, f"{stage}.{i + 1}")
    return F.conv2d(y + x1, w["tail.weight"], padding=1)


def test_resunet_matches_an_independent_unetres_forward_on_a_brats_slice():
    torch.manual_seed(0)
    network = ResUNet(2, in_channels=2, out_channels=1, channels=CHANNELS, num_res_blocks=NUM_RES_BLOCKS)
    network = network.double().eval()
    weights = {name: value.detach() for name, value in network.state_dict().items()}
    # Every weight is read by the functional forward: none of the module's parameters is left out of it.
    expected_names = {"head.weight", "tail.weight"}
    for stage in ("down1", "down2", "down3"):
        expected_names |= {f"{stage}.{i}.conv{j}.weight" for i in range(NUM_RES_BLOCKS) for j in (1, 2)}
        expected_names.add(f"{stage}.{NUM_RES_BLOCKS}.weight")
    expected_names |= {f"body.{i}.conv{j}.weight" for i in range(NUM_RES_BLOCKS) for j in (1, 2)}
    for stage in ("up1", "up2", "up3"):
        expected_names.add(f"{stage}.0.weight")
        expected_names |= {f"{stage}.{i + 1}.conv{j}.weight" for i in range(NUM_RES_BLOCKS) for j in (1, 2)}
    assert set(weights) == expected_names

    x = _brats_slice()
    with torch.no_grad():
        y = network(x)
    expected = _unetres_forward(x, weights, NUM_RES_BLOCKS)
    assert y.shape == (1, 1, 160, 160)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    assert expected.abs().max() > 1e-3  # a real output, not a vanishing one that any forward would match


def test_resblock_with_a_zero_second_conv_is_the_identity():
    torch.manual_seed(1)
    block = ResBlock(2, 2).double()
    with torch.no_grad():
        block.conv2.weight.zero_()
    x = _brats_slice()
    assert torch.equal(block(x), x)
    # ... and with its weights as initialised it is x plus the branch, not the branch alone.
    block = ResBlock(2, 2).double()
    with torch.no_grad():
        branch = F.conv2d(F.relu(F.conv2d(x, block.conv1.weight, padding=1)), block.conv2.weight, padding=1)
        torch.testing.assert_close(block(x), x + branch)


@pytest.mark.parametrize("kernel_size", [2, 4])
def test_cagr_with_an_even_kernel_pads_k_over_2_like_the_conv_it_replaces(kernel_size):
    # CAGR's documented contract: it replaces Conv(padding=kernel_size // 2): for an even k the output is one larger
    # per axis than the input.
    torch.manual_seed(2)
    block = CAGR(2, 8, 6, kernel_size=kernel_size, attention=False).double()
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    offsets = torch.zeros(2, 8, 2, dtype=torch.float64)
    scales = torch.ones(2, 8, dtype=torch.float64)
    expected = F.conv2d(x, block.conv.weight, padding=kernel_size // 2)
    y = block.rolled_conv(x, offsets, scales)
    assert y.shape == expected.shape == (2, 6, 13, 13)
    torch.testing.assert_close(y, expected)
    # The whole block at initialisation (no roll, λ = sigmoid(1)) and the ablation without rolling agree.
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)) * expected)
    plain = CAGR(2, 8, 6, kernel_size=kernel_size, attention=False, rolling=False).double()
    with torch.no_grad():
        assert plain(x).shape == (2, 6, 13, 13)
