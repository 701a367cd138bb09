"""CAGR, ResUNet and AGI-Net: equivalences, gradients, shapes, parameter counts, TorchScript."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from agi_monai.networks import CAGR, STAGES, AGINet, CrossGroupAttention, ResUNet, RoutingFunction
from agi_monai.networks.blocks import ChannelLayerNorm
from agi_monai.networks.blocks import channel_shuffle
from agi_monai.ops import group_roll_reference

SMALL = (16, 32, 32, 64)  # channel widths that keep CPU tests fast


def conv_nd(spatial_dims: int):
    return F.conv2d if spatial_dims == 2 else F.conv3d


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cagr_is_plain_conv_without_roll_scale_or_attention(spatial_dims):
    torch.manual_seed(0)
    block = CAGR(spatial_dims, 16, 8, kernel_size=3, groups=4, attention=False).double()
    x = torch.randn(3, 16, *([8] * spatial_dims), dtype=torch.float64)
    offsets = torch.zeros(3, 4, spatial_dims, dtype=torch.float64)
    scales = torch.ones(3, 4, dtype=torch.float64)
    expected = conv_nd(spatial_dims)(x, block.conv.weight, padding=1)
    torch.testing.assert_close(block.rolled_conv(x, offsets, scales), expected)
    # At initialisation the routing predicts no roll and λ = sigmoid(1) for every group.
    torch.testing.assert_close(block(x), torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)) * expected)


def test_cagr_convolves_each_sample_with_its_own_rolled_kernel():
    torch.manual_seed(1)
    block = CAGR(2, 8, 6, kernel_size=3, groups=2, stride=2, bias=True).double()
    x = torch.randn(4, 8, 10, 10, dtype=torch.float64)
    offsets = torch.randn(4, 2, 2, dtype=torch.float64) * 3
    scales = torch.rand(4, 2, dtype=torch.float64)
    y = block.rolled_conv(x, offsets, scales)
    for b in range(4):
        kernel = group_roll_reference(block.conv.weight, offsets[b : b + 1], scales[b : b + 1])[0]
        expected = F.conv2d(x[b : b + 1], kernel, block.conv.bias, stride=2, padding=1)
        torch.testing.assert_close(y[b : b + 1], expected)


def test_integer_offsets_roll_the_kernel_like_torch_roll():
    torch.manual_seed(2)
    block = CAGR(2, 4, 4, kernel_size=3, groups=2, attention=False).double()
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    offsets = torch.tensor([[[1.0, 0.0], [-1.0, 2.0]]], dtype=torch.float64)  # (x, y) per group
    w = block.conv.weight
    rolled = torch.cat([torch.roll(w[:, :2], shifts=(0, 1), dims=(2, 3)), torch.roll(w[:, 2:], shifts=(2, -1), dims=(2, 3))], 1)
    torch.testing.assert_close(
        block.rolled_conv(x, offsets, torch.ones(1, 2, dtype=torch.float64)), F.conv2d(x, rolled, padding=1)
    )


def test_cross_group_attention_pairs_each_group_with_the_shuffled_groups():
    torch.manual_seed(3)
    attention = CrossGroupAttention(2, 8, 2).double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    z = x.mean(dim=(2, 3))
    zs = channel_shuffle(z[:, :, None, None], 2)[:, :, 0, 0]
    # Independent evaluation of F: group i reads [z_i, z^s_i] (4 + 4 channels) and writes 4 channels.
    w = attention.fuse.weight[:, :, 0, 0]
    logits = torch.cat([torch.cat([z[:, 4 * i : 4 * i + 4], zs[:, 4 * i : 4 * i + 4]], 1) @ w[4 * i : 4 * i + 4].T for i in range(2)], 1)
    expected = x * torch.sigmoid(logits + attention.fuse.bias)[:, :, None, None]
    torch.testing.assert_close(attention(x), expected)
    assert torch.equal(channel_shuffle(torch.arange(6.0).reshape(1, 6, 1), 2).flatten(), torch.tensor([0.0, 3, 1, 4, 2, 5]))


def test_gradients_reach_routing_and_attention():
    torch.manual_seed(4)
    block = CAGR(2, 16, 16, groups=4)
    x = torch.randn(2, 16, 12, 12)
    block(x).square().mean().backward()
    routing, attention = block.routing, block.attention
    assert isinstance(routing, RoutingFunction) and isinstance(attention, CrossGroupAttention)
    for name, param in [("offset head", routing.offset_head.weight), ("scale head", routing.scale_head.weight),
                        ("attention", attention.fuse.weight), ("kernel", block.conv.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # The heads start at zero, so the routing convolutions see gradient once the heads have moved.
    with torch.no_grad():
        routing.offset_head.weight.normal_(std=0.1)
    block.zero_grad()
    block(x).square().mean().backward()
    for conv in [m for m in routing.features if isinstance(m, torch.nn.Conv2d)]:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_routing_function_pools_features_and_keeps_gradients_channels_last(spatial_dims):
    """Heads read the global average of the features; the gradient entering the features is channels-last
    (the layout of the features themselves: mixed layouts make GELU's and LayerNorm's backward slow on CPU)."""
    torch.manual_seed(7)
    routing = RoutingFunction(spatial_dims, 16, 4).double()
    with torch.no_grad():
        routing.offset_head.weight.normal_(std=0.5)
        routing.scale_head.weight.normal_(std=0.5)
    x = torch.randn(2, 16, *([6] * spatial_dims), dtype=torch.float64, requires_grad=True)
    seen = []

    def keep_gradient(module, args, out):
        out.register_hook(seen.append)  # (a forward hook that returns a value would replace the output)

    handle = routing.features.register_forward_hook(keep_gradient)
    offsets, scales = routing(x)
    handle.remove()
    # Independent evaluation: the adaptive average pool of the features computed in the default layout.
    pool = F.adaptive_avg_pool2d if spatial_dims == 2 else F.adaptive_avg_pool3d
    pooled = pool(routing.features(x.detach()), 1).flatten(1)
    torch.testing.assert_close(offsets, routing.offset_head(pooled).reshape(2, 4, spatial_dims))
    torch.testing.assert_close(scales, torch.sigmoid(routing.scale_head(pooled)))
    (offsets.square().sum() + scales.sum()).backward()
    layout = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    assert len(seen) == 1 and seen[0].is_contiguous(memory_format=layout), seen[0].stride()
    assert x.grad is not None and x.grad.abs().sum() > 0


_CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_channel_layer_norm_keeps_low_precision_under_autocast(dtype, device):
    """Under autocast a bfloat16/float16 input is normalised in its own precision (CUDA autocast alone would run
    layer_norm in float32, CPU autocast keeps the precision); values agree with a float64 LayerNorm over the
    channels to the dtype's rounding, and the float32 parameters get float32 gradients. Without autocast the
    module is plain nn.LayerNorm."""
    torch.manual_seed(3)
    norm = ChannelLayerNorm(16).to(device)
    with torch.no_grad():
        norm.norm.weight.normal_()
        norm.norm.bias.normal_()
    x = torch.randn(2, 16, 5, 7).to(device, dtype)
    expected = F.layer_norm(x.double().movedim(1, -1), (16,), norm.norm.weight.double(), norm.norm.bias.double(),
                            norm.norm.eps).movedim(-1, 1)
    with torch.autocast(device, dtype=dtype):
        y = norm(x)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), expected, rtol=0.02, atol=0.05)
    y.float().square().sum().backward()
    assert norm.norm.weight.grad.dtype == torch.float32 and norm.norm.weight.grad.abs().sum() > 0
    plain = norm(x.float())
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain.double(), expected, rtol=0.02, atol=0.05)


def test_ablation_flags_build_the_ablated_blocks():
    assert not any(isinstance(m, CrossGroupAttention) for m in AGINet(channels=SMALL, attention=False).modules())
    assert not any(isinstance(m, RoutingFunction) for m in AGINet(channels=SMALL, rolling=False).modules())
    plain = sum(p.numel() for p in ResUNet(channels=SMALL).parameters())
    both = sum(p.numel() for p in AGINet(channels=SMALL, attention=False, rolling=False).parameters())
    assert plain == both


@pytest.mark.parametrize("net_cls", [ResUNet, AGINet])
def test_output_shapes_2d_and_3d(net_cls):
    torch.manual_seed(5)
    net2d = net_cls(spatial_dims=2, in_channels=3, out_channels=1, channels=SMALL)
    assert net2d(torch.randn(2, 3, 32, 40)).shape == (2, 1, 32, 40)
    net3d = net_cls(spatial_dims=3, in_channels=2, out_channels=1, channels=(8, 16, 16, 32))
    assert net3d(torch.randn(1, 2, 16, 16, 24)).shape == (1, 1, 16, 16, 24)


# Table 7 of arXiv 2411.14684 (parameters in millions, 2 inputs → 1 output).
@pytest.mark.parametrize("groups,paper", [(None, 17.04), (1, 33.58), (2, 25.31), (4, 21.19), (8, 19.15), (16, 18.18)])
def test_parameter_counts_match_table_7(groups, paper):
    net = ResUNet(in_channels=2, out_channels=1) if groups is None else AGINet(in_channels=2, out_channels=1, groups=groups)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    assert math.isclose(params, paper, rel_tol=0.05), (groups, params, paper)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="groups=3 must be positive and divide in_channels=16"):
        CAGR(2, 16, 16, groups=3)
    with pytest.raises(ValueError, match="groups=0 must be positive"):
        CAGR(2, 16, 16, groups=0)
    with pytest.raises(ValueError, match=r"CAGR: expected input of shape \(B, 8, H, W\), got \[2, 6, 4, 4\]"):
        CAGR(2, 8, 8)(torch.zeros(2, 6, 4, 4))
    with pytest.raises(ValueError, match="kernel_size=0 and stride=1 must be positive"):
        CAGR(2, 8, 8, kernel_size=0)
    with pytest.raises(ValueError, match="unknown cagr_stages"):
        AGINet(cagr_stages=("down1", "middle"))
    with pytest.raises(ValueError, match=r"AGINet: channels=\(4, 8, 8, 16\) with groups=8: the width of each CAGR "
                                         r"stage must be a multiple of groups, not down1 \(4\)$"):
        AGINet(channels=(4, 8, 8, 16))
    AGINet(channels=(4, 8, 8, 16), cagr_stages=("down2", "body"))  # the stages with CAGR decide
    with pytest.raises(ValueError, match=r"unknown cagr_stages \['bodyy', 1\]"):  # not a TypeError from sorting
        AGINet(cagr_stages=("bodyy", 1))
    # read once: an iterator of stages gives those stages (it gave none, a plain ResUNet, silently)
    assert AGINet(channels=(8, 16, 32, 64), groups=4, cagr_stages=iter(["body"])).cagr_stages == ("body",)
    with pytest.raises(ValueError, match=r"cagr_stages='body': expected a sequence of stage names, e.g. \['body'\]"):
        AGINet(cagr_stages="body")
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        ResUNet(spatial_dims=4)
    with pytest.raises(ValueError, match="num_res_blocks=-1 not negative"):
        ResUNet(num_res_blocks=-1)
    with pytest.raises(ValueError, match="in_channels=0 and out_channels=1 must be positive"):
        AGINet(in_channels=0)
    with pytest.raises(ValueError, match=r"4 positive widths, got \(8, 0, 16, 32\)"):
        ResUNet(channels=(8, 0, 16, 32))
    with pytest.raises(ValueError, match="divisible by 8"):
        ResUNet(channels=SMALL)(torch.zeros(1, 2, 30, 32))
    assert STAGES == ("down1", "down2", "down3", "body", "up1", "up2", "up3")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_an_empty_batch_gives_an_empty_output_as_resunet_does(spatial_dims):
    size = [16] * spatial_dims
    empty = torch.zeros(0, 2, *size)
    for net in (AGINet(spatial_dims, in_channels=2, channels=SMALL), ResUNet(spatial_dims, in_channels=2, channels=SMALL)):
        assert net(empty).shape == (0, 1, *size)
    cagr = CAGR(spatial_dims, 8, 4, stride=2)
    assert cagr(torch.zeros(0, 8, *size)).shape == (0, 4, *[8] * spatial_dims)
    assert torch.jit.script(cagr)(torch.zeros(0, 8, *size)).shape == (0, 4, *[8] * spatial_dims)


@pytest.mark.parametrize("cagr_stages", [("down1",), ("down1", "down2", "down3", "body", "up1")])
def test_extension_free_network_compiles_whole_and_exports(cagr_stages):
    # portable=True is what a machine without the extension runs: its roll is the reference, whose finiteness
    # check once broke the graph (torch.compile(fullgraph=True) and torch.export failed)
    torch.manual_seed(3)
    net = AGINet(in_channels=2, channels=SMALL, cagr_stages=cagr_stages, portable=True).eval()
    x = torch.rand(2, 2, 32, 32)
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(torch.compile(net, fullgraph=True, backend="aot_eager")(x), expected)
        torch.testing.assert_close(torch.export.export(net, (x,)).module()(x), expected)


@pytest.mark.parametrize("portable", [False, True])
def test_torchscript_round_trip_in_a_fresh_process(tmp_path, portable):
    torch.manual_seed(6)
    net = AGINet(in_channels=2, out_channels=1, channels=SMALL, portable=portable).eval()
    with torch.no_grad():  # make the routing do something non-trivial
        for m in net.modules():
            if isinstance(m, RoutingFunction):
                m.offset_head.weight.normal_(std=0.5)
    x = torch.rand(2, 2, 32, 32)
    with torch.no_grad():
        expected = net(x)
    scripted = torch.jit.script(net)
    torch.jit.save(scripted, str(tmp_path / "net.ts"))
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    # The compiled roll needs `import agi_monai` to register the op; the portable file needs nothing.
    preamble = "" if portable else "import agi_monai\n"
    code = preamble + (
        "import torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"net = torch.jit.load({str(tmp_path / 'net.ts')!r})\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(net(io['x']), io['expected'], rtol=1e-4, atol=1e-5)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
