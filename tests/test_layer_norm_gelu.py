"""Tests of the fused op ``torch.ops.agi_monai.layer_norm_gelu`` (csrc/layer_norm_gelu*) against ATen's
``F.gelu(F.layer_norm(...))``, and of its use in AGI-Net's routing function.

CPU tests run on CI; they test the per-element maths the CUDA kernels share (layer_norm_gelu_math.h).
CUDA tests carry ``@pytest.mark.cuda`` and run only where a GPU and the CUDA kernels are present.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agi_monai import ops
from agi_monai.networks import RoutingFunction
from agi_monai.networks.blocks import cagr
from agi_monai.ops import layer_norm_gelu_reference

requires_extension = pytest.mark.skipif(
    not ops.extension_available(), reason=f"the compiled extension is not available: {ops.extension_error()}"
)
_HAS_CUDA = torch.cuda.is_available() and ops.fused_layer_norm_gelu_available(torch.device("cuda"))
CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA device and the CUDA kernels")],
)
DEVICES = ["cpu", CUDA]

pytestmark = requires_extension


def fused(x, weight, bias, eps=1e-6):
    return torch.ops.agi_monai.layer_norm_gelu(x, weight, bias, eps)


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    """Rows with a non-zero mean and a spread of scales, and non-trivial affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    channels = shape[-1]
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * (1 + 3 * torch.rand(shape[:-1] + (1,), generator=generator, dtype=torch.float64)) + 2
    weight = torch.randn(channels, generator=generator, dtype=torch.float64)
    bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    return [t.to(device, dtype).requires_grad_(requires_grad) for t in (x, weight, bias)]


def tolerances(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-4, atol=1e-5),
        torch.bfloat16: dict(rtol=0.02, atol=0.02),
        torch.float16: dict(rtol=5e-3, atol=5e-3),
    }[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape", [(1, 1), (5, 2), (3, 7, 31), (4, 32), (2, 3, 33), (2, 5, 6, 64), (17, 100), (300, 128), (3, 512), (5, 513), (2, 1100)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_and_backward_match_aten(shape, dtype, device):
    """Output and the gradients of input, weight and bias equal ATen's LayerNorm then GELU (the exact form)."""
    inputs = make_inputs(shape, dtype, device, requires_grad=True)
    expected_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fused(*inputs)
    expected = layer_norm_gelu_reference(*expected_inputs, 1e-6)
    torch.testing.assert_close(y, expected, **tolerances(dtype))
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    for got, want in zip(inputs, expected_inputs):
        # the weight/bias gradients sum over all rows: scale the tolerance with the row count
        torch.testing.assert_close(got.grad, want.grad, rtol=tolerances(dtype)["rtol"] * 10, atol=tolerances(dtype)["atol"] * 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_is_computed_in_float(dtype, device):
    """bfloat16/float16 inputs give the float64 result rounded once (float accumulation), not a low-precision sum."""
    inputs = make_inputs((6, 9, 64), dtype, device, requires_grad=True)
    exact = layer_norm_gelu_reference(*[t.detach().double() for t in inputs], 1e-6)
    y = fused(*inputs)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), exact, **tolerances(dtype))
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype for t in inputs)
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    layer_norm_gelu_reference(*exact_inputs, 1e-6).sum().backward()
    torch.testing.assert_close(inputs[0].grad.double(), exact_inputs[0].grad, **tolerances(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    inputs = make_inputs((3, 4, 10), torch.float64, device, seed=1, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: fused(*a, 1e-5), inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, weight, bias = make_inputs((2, 3, 16), torch.float32, device, requires_grad=True)
    torch.library.opcheck(torch.ops.agi_monai.layer_norm_gelu.default, (x, weight, bias, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_empty_inputs(device):
    """A channels-first tensor moved to channels-last order (not contiguous) is read correctly; zero rows give an
    empty output and zero weight/bias gradients."""
    x, weight, bias = make_inputs((2, 5, 6, 8), torch.float32, device)
    moved = x.movedim(-1, 1).contiguous().movedim(1, -1)  # (2, 5, 6, 8), strided as channels-first
    assert not moved.is_contiguous()
    torch.testing.assert_close(fused(moved, weight, bias), layer_norm_gelu_reference(moved, weight, bias, 1e-6))
    empty = torch.zeros(0, 8, device=device, requires_grad=True)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    y = fused(empty, w, b)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_parameter_gradients_do_not_depend_on_the_thread_count():
    """The weight/bias gradients are summed per fixed block of rows, so one and two threads agree bitwise."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            inputs = make_inputs((1500, 64), torch.float32, requires_grad=True)
            fused(*inputs).square().sum().backward()
            results.append([t.grad for t in inputs])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_bad_inputs_are_named():
    x, weight, bias = make_inputs((4, 8))
    cases = [
        ((x, weight[:7], bias), r"weight must have shape \(C,\) = \(8,\) to match input \[4, 8\], got shape \[7\]"),
        ((x, weight, bias[None]), r"bias must have shape \(C,\) = \(8,\) to match input \[4, 8\], got shape \[1, 8\]"),
        ((x.double(), weight, bias), r"input, weight and bias must share one dtype, got input torch.float64, weight torch.float32"),
        ((x.long(), weight.long(), bias.long()), r"input must be float16, bfloat16, float32 or float64, got torch.int64"),
        ((torch.tensor(1.0), weight, bias), r"input must have shape \(\.\.\., C\) with C >= 1"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            fused(*args)
    with pytest.raises(RuntimeError, match="eps must be finite and >= 0, got -1"):
        fused(x, weight, bias, -1.0)
    with pytest.raises(RuntimeError, match=r"grad must have the input's shape \[4, 8\], got shape \[4, 7\]"):
        torch.ops.agi_monai._layer_norm_gelu_backward(x[:, :7], x, weight, bias, 1e-6)


def test_float8_is_refused_by_name():
    x, weight, bias = (t.to(torch.float8_e4m3fn) for t in make_inputs((2, 4)))
    with pytest.raises(RuntimeError, match="input must be float16, bfloat16, float32 or float64, got torch.float8_e4m3fn"):
        fused(x, weight, bias)


def test_double_backward_is_refused():
    inputs = make_inputs((3, 5), torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(fused(*inputs).sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        grad_x.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_routing_function_with_the_fused_op_matches_aten(spatial_dims, device, monkeypatch):
    """The routing function gives the same offsets, scales and gradients whether its LayerNorm+GELU pairs run as
    the fused op (forced on CPU here, the default on CUDA) or as ATen's two ops; hooks on the features still fire."""
    torch.manual_seed(5)
    routing = RoutingFunction(spatial_dims, 16, 4).to(device, torch.float64)
    with torch.no_grad():
        routing.offset_head.weight.normal_(std=0.5)
        routing.scale_head.weight.normal_(std=0.5)
        for norm in (routing.features[1], routing.features[4]):
            norm.norm.weight.normal_()
            norm.norm.bias.normal_()
    x = torch.randn(2, 16, *([5] * spatial_dims), dtype=torch.float64, device=device)
    called = []
    monkeypatch.setattr(torch.ops.agi_monai, "layer_norm_gelu", _counting(torch.ops.agi_monai.layer_norm_gelu, called), raising=False)
    results = {}
    for name, device_types in (("fused", ("cpu", "cuda")), ("aten", ())):
        monkeypatch.setattr(cagr, "FUSED_NORM_DEVICE_TYPES", device_types)
        routing.zero_grad()
        seen = []
        handle = routing.features.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        inputs = x.clone().requires_grad_()
        offsets, scales = routing(inputs)
        handle.remove()
        (offsets.square().sum() + scales.sum()).backward()
        assert seen == [x.shape]
        results[name] = [offsets, scales, inputs.grad] + [p.grad.clone() for p in routing.parameters()]
        if name == "fused":
            assert len(called) == 2  # both LayerNorm+GELU pairs
    for got, want in zip(results["fused"], results["aten"]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def _counting(op, calls):
    def counted(*args):
        calls.append(args[0].shape)
        return op(*args)

    return counted


@pytest.mark.cuda
@pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA device and the CUDA kernels")
def test_cuda_equals_cpu_on_a_routing_sized_map():
    """A full-resolution channels-last map as AGI-Net's first stage has (64 channels): CUDA and CPU kernels agree,
    forward and all three gradients, and the CUDA routing under autocast keeps bfloat16."""
    x, weight, bias = make_inputs((2, 64, 64, 64), torch.float32, seed=3)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    outputs = {}
    for device in ("cpu", "cuda"):
        inputs = [t.detach().to(device).requires_grad_() for t in (x, weight, bias)]
        y = fused(*inputs)
        y.backward(grad.to(device))
        outputs[device] = [y.cpu()] + [t.grad.cpu() for t in inputs]
    for got, want in zip(outputs["cuda"], outputs["cpu"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    routing = RoutingFunction(2, 64, 8).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        features = routing.features(torch.rand(2, 64, 32, 32, device="cuda"))
    assert features.dtype == torch.bfloat16
    with torch.no_grad():
        reference = F.gelu(routing.features[1](routing.features[0](torch.rand(1, 64, 8, 8, device="cuda"))))
    assert torch.isfinite(reference).all()


def test_routing_features_keep_hooks_swaps_and_slices(monkeypatch):
    """With the fused op in use (forced on CPU here), a hook on a LayerNorm or GELU still sees its module's own output
    (that pair then runs unfused, with the same result), a module replaced by another is run (eager agrees with
    TorchScript), and slices are RoutingFeatures that run."""
    monkeypatch.setattr(cagr, "FUSED_NORM_DEVICE_TYPES", ("cpu", "cuda"))
    torch.manual_seed(2)
    routing = RoutingFunction(2, 16, 4).double()
    features = routing.features
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    expected = features[5](features[4](features[3](features[2](features[1](features[0](x))))))
    torch.testing.assert_close(features(x), expected)
    seen = []
    handle = features[1].register_forward_hook(lambda module, args, out: seen.append(out))
    torch.testing.assert_close(features(x), expected)
    handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], features[1](features[0](x)))  # the LayerNorm's output, before GELU
    features[2] = torch.nn.Identity()  # an ablation: no GELU after the first LayerNorm
    scripted = torch.jit.script(features)
    torch.testing.assert_close(features(x), scripted(x))
    torch.testing.assert_close(features(x), features[5](features[4](features[3](features[1](features[0](x))))))
    head = features[:2]
    assert isinstance(head, cagr.RoutingFeatures) and len(head) == 2
    torch.testing.assert_close(head(x), features[1](features[0](x)))
