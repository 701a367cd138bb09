"""Tests of the compiled group-wise roll op ``torch.ops.agi_monai.group_roll`` (csrc/) and its
pure-PyTorch reference ``agi_monai.ops.group_roll_reference``.

Three implementations are compared: the compiled kernels (sum over the 2^S corners), the reference
(einsum of per-axis circulant matrices) and ``naive_group_roll`` below, written here from METHOD §2
with ``torch.roll`` blends, so that the reference itself is verified independently.

CPU tests run on CI (2 cores, the whole file in well under 90 s). CUDA tests carry ``@pytest.mark.cuda``
and run only where a GPU and the CUDA kernels are present.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import pytest
import torch

import agi_monai  # noqa: F401  (loads the op library)
from agi_monai import ops
from agi_monai.ops import group_roll, group_roll_reference
from helpers import REPO


requires_extension = pytest.mark.skipif(
    not ops.extension_available(),
    reason=f"the compiled extension agi_monai._C is not available: {ops.extension_error()}",
)
_HAS_CUDA = torch.cuda.is_available() and ops.extension_has_cuda()
_SKIP_CUDA = pytest.mark.skipif(
    not _HAS_CUDA,
    reason="needs a CUDA device and the CUDA kernels of agi_monai._C "
    f"(torch.cuda.is_available()={torch.cuda.is_available()}, extension_has_cuda()={ops.extension_has_cuda()})",
)


def requires_cuda(test):
    """``@pytest.mark.cuda`` plus a skip (with the reason) where no GPU or no CUDA kernels are present."""
    return pytest.mark.cuda(_SKIP_CUDA(test))


def compiled_op(weight, offsets, scales):
    return torch.ops.agi_monai.group_roll(weight, offsets, scales)


IMPLEMENTATIONS = {"compiled": compiled_op, "reference": group_roll_reference}


def impl_params():
    """The two implementations under test; the compiled one is skipped only if the extension is absent."""
    return [
        pytest.param("compiled", marks=requires_extension),
        pytest.param("reference"),
    ]


# --------------------------------------------------------------------------------------------------
# The third implementation: METHOD §2, literally.
# --------------------------------------------------------------------------------------------------


def naive_group_roll(weight: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """out[b, :, group i] = scales[b, i] · Σ_corners (Π_axes (1 − t) or t) · torch.roll(w_i, floor(o) + corner).

    Loops over samples, groups and the 2^S corners; offsets[..., a] rolls kernel axis −1 − a (x, y, z).
    Differentiable w.r.t. all inputs (the fraction t = o − floor(o) keeps the autograd graph; the integer
    shift is a Python int, i.e. the one-sided derivative at integer offsets, as in the other two).
    """
    batch, groups, spatial = offsets.shape
    per_group = weight.shape[1] // groups
    dims = [-1 - a for a in range(spatial)]
    if batch == 0:
        return weight.new_zeros((0, *weight.shape))
    samples = []
    for b in range(batch):
        parts = []
        for i in range(groups):
            w_i = weight[:, i * per_group : (i + 1) * per_group]
            whole = [math.floor(float(offsets[b, i, a].detach())) for a in range(spatial)]
            frac = [offsets[b, i, a] - whole[a] for a in range(spatial)]
            blend = torch.zeros_like(w_i)
            for corner in itertools.product((0, 1), repeat=spatial):
                coefficient = 1.0
                for a in range(spatial):
                    coefficient = coefficient * (frac[a] if corner[a] else 1 - frac[a])
                shifts = [whole[a] + corner[a] for a in range(spatial)]
                blend = blend + coefficient * torch.roll(w_i, shifts=shifts, dims=dims)
            parts.append(scales[b, i] * blend)
        samples.append(torch.cat(parts, dim=1))
    return torch.stack(samples)


def make_offsets(kind: str, batch: int, groups: int, kernel: tuple[int, ...], generator, dtype=torch.float64):
    """(B, n, S) offsets of one kind; kernel is (…, ky, kx) so axis a of the offsets has size kernel[-1 - a]."""
    spatial = len(kernel)
    sizes = torch.tensor([kernel[-1 - a] for a in range(spatial)], dtype=torch.float64)
    shape = (batch, groups, spatial)
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
    if kind == "integer":  # whole shifts, both signs, up to two turns
        out = torch.randint(-14, 15, shape, generator=generator).to(torch.float64)
    elif kind == "fractional":  # in [0, k): the common case
        out = uniform * sizes
    elif kind == "negative":  # in (−2k, 0)
        out = -(uniform * 2 * sizes + 1e-3)
    elif kind == "large":  # ±1e3 with a fraction, far beyond any kernel size
        out = sign * (1000.0 + uniform)
    elif kind == "beyond_k":  # ±(k + 0.3): just past one full turn
        out = sign * (sizes + 0.3)
    elif kind == "mixed":  # a bit of everything in one tensor
        out = torch.where(uniform < 0.25, torch.round(uniform * 40 - 20), sign * (uniform * 3 * sizes))
        out = torch.where(uniform > 0.9, sign * (1000.0 + uniform), out)
    else:
        raise AssertionError(kind)
    return out.to(dtype)


def make_inputs(batch, groups, c_in, c_out, kernel, kind="fractional", seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn((c_out, c_in, *kernel), generator=generator, dtype=torch.float64).to(dtype)
    offsets = make_offsets(kind, batch, groups, kernel, generator, dtype)
    scales = (torch.rand((batch, groups), generator=generator, dtype=torch.float64) * 1.5 + 0.25).to(dtype)
    return weight, offsets, scales


def tight(actual, expected, msg=""):
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"{msg}\n{m}")


# (B, n, C_in, C_out): n ∈ {1, 2, 4, 8, 16} dividing C_in, B ∈ 1…8.
GROUPINGS = [(1, 1, 1, 1), (8, 1, 3, 2), (3, 2, 4, 3), (5, 4, 4, 2), (2, 8, 16, 3), (1, 16, 16, 2), (4, 16, 32, 1), (7, 8, 8, 2)]
KERNELS_2D = [(1, 1), (2, 2), (3, 3), (5, 5), (7, 7), (3, 5), (5, 3), (2, 7), (4, 1), (6, 4)]
KERNELS_3D = [(1, 1, 1), (2, 2, 2), (3, 3, 3), (3, 5, 7), (7, 7, 7), (2, 3, 4), (5, 1, 3)]
OFFSET_KINDS = ["integer", "fractional", "negative", "large", "beyond_k", "mixed"]


def _grouping_id(g):
    return "B{}-n{}-cin{}-cout{}".format(*g)


def _kernel_id(k):
    return "k" + "x".join(map(str, k))


# --------------------------------------------------------------------------------------------------
# Forward numerics: compiled == reference == naive (float64, tight tolerances).
# --------------------------------------------------------------------------------------------------


def _check_three_way(grouping, kernel, kind):
    batch, groups, c_in, c_out = grouping
    seed = zlib.crc32(repr((grouping, kernel, kind)).encode())
    weight, offsets, scales = make_inputs(batch, groups, c_in, c_out, kernel, kind, seed)
    naive = naive_group_roll(weight, offsets, scales)
    reference = group_roll_reference(weight, offsets, scales)
    assert reference.shape == (batch, c_out, c_in, *kernel)
    assert reference.dtype == torch.float64
    tight(reference, naive, "reference != naive torch.roll blend (METHOD §2)")
    if ops.extension_available():
        compiled = compiled_op(weight, offsets, scales)
        assert compiled.shape == reference.shape and compiled.dtype == torch.float64
        tight(compiled, reference, "compiled op != reference")
        tight(compiled, naive, "compiled op != naive torch.roll blend (METHOD §2)")


@pytest.mark.parametrize("kind", OFFSET_KINDS)
@pytest.mark.parametrize("kernel", KERNELS_2D, ids=_kernel_id)
@pytest.mark.parametrize("grouping", GROUPINGS, ids=_grouping_id)
def test_forward_2d_three_way(grouping, kernel, kind):
    _check_three_way(grouping, kernel, kind)


@pytest.mark.parametrize("kind", OFFSET_KINDS)
@pytest.mark.parametrize("kernel", KERNELS_3D, ids=_kernel_id)
@pytest.mark.parametrize("grouping", GROUPINGS, ids=_grouping_id)
def test_forward_3d_three_way(grouping, kernel, kind):
    _check_three_way(grouping, kernel, kind)


def test_naive_matches_spec_by_hand():
    """Pins the direction conventions independently of all three implementations."""
    w = torch.arange(3.0, dtype=torch.float64).reshape(1, 1, 1, 3)  # x axis = [0, 1, 2]
    one = torch.ones(1, 1, dtype=torch.float64)
    # torch.roll by +1 along x: out[j] = w[j - 1] → [2, 0, 1]; 0.25 of the way to +2 → [1, 2, 0].
    expected = 0.75 * torch.tensor([2.0, 0.0, 1.0]) + 0.25 * torch.tensor([1.0, 2.0, 0.0])
    offsets = torch.tensor([[[1.25, 0.0]]], dtype=torch.float64)
    for impl in [naive_group_roll, group_roll_reference] + ([compiled_op] if ops.extension_available() else []):
        tight(impl(w, offsets, one)[0, 0, 0, 0], expected.double(), f"{impl}")
    # offsets[..., 1] rolls y (the axis before x); a kernel of size 1 along x is unaffected by x offsets.
    w_y = torch.arange(3.0, dtype=torch.float64).reshape(1, 1, 3, 1)
    offsets_y = torch.tensor([[[7.5, -1.0]]], dtype=torch.float64)  # y by −1: out[j] = w[j + 1] → [1, 2, 0]
    for impl in [naive_group_roll, group_roll_reference] + ([compiled_op] if ops.extension_available() else []):
        tight(impl(w_y, offsets_y, one)[0, 0, 0, :, 0], torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), f"{impl}")
    # offsets[..., 2] rolls depth.
    w_z = torch.arange(4.0, dtype=torch.float64).reshape(1, 1, 4, 1, 1)
    offsets_z = torch.tensor([[[0.0, 0.0, 2.0]]], dtype=torch.float64)
    for impl in [naive_group_roll, group_roll_reference] + ([compiled_op] if ops.extension_available() else []):
        tight(impl(w_z, offsets_z, one)[0, 0, 0, :, 0, 0], torch.tensor([2.0, 3.0, 0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("impl", impl_params())
def test_identity_and_full_turn(impl):
    """Zero offsets and scale 1 give the weight back; whole turns (±k, ±1000·k) are the identity too."""
    fn = IMPLEMENTATIONS[impl]
    weight, _, _ = make_inputs(3, 2, 4, 3, (3, 5))
    ones = torch.ones(3, 2, dtype=torch.float64)
    zero = torch.zeros(3, 2, 2, dtype=torch.float64)
    tight(fn(weight, zero, ones), weight.expand(3, *weight.shape))
    turns = torch.tensor([[5.0, 3.0], [-5.0, -3.0], [5000.0, -3000.0]], dtype=torch.float64)
    tight(fn(weight, turns[:, None, :].expand(3, 2, 2).contiguous(), ones), weight.expand(3, *weight.shape))


@requires_extension
def test_non_contiguous_inputs():
    weight, offsets, scales = make_inputs(4, 2, 6, 4, (3, 3), "mixed", seed=3)
    weight_nc = weight.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    offsets_nc = offsets.transpose(0, 1).contiguous().transpose(0, 1)
    scales_nc = torch.stack([scales, scales], dim=-1)[..., 0]
    assert not (weight_nc.is_contiguous() or offsets_nc.is_contiguous() or scales_nc.is_contiguous())
    tight(compiled_op(weight_nc, offsets_nc, scales_nc), group_roll_reference(weight, offsets, scales))


@pytest.mark.parametrize("impl", impl_params())
def test_empty_batch(impl):
    weight, offsets, scales = make_inputs(0, 2, 4, 3, (3, 3))
    weight.requires_grad_()
    out = IMPLEMENTATIONS[impl](weight, offsets, scales)
    assert out.shape == (0, 3, 4, 3, 3)
    (grad,) = torch.autograd.grad(out.sum(), weight)
    tight(grad, torch.zeros_like(weight))


# --------------------------------------------------------------------------------------------------
# Gradients.
# --------------------------------------------------------------------------------------------------

# floor() is not differentiable at integer offsets (the blend switches corners there), so gradcheck's
# finite differences must not straddle an integer: gradcheck offsets are integer + [0.2, 0.8].
GRADCHECK_CASES = {
    "2d": dict(batch=2, groups=2, c_in=4, c_out=3, kernel=(3, 2)),
    "2d-k5-n1": dict(batch=1, groups=1, c_in=2, c_out=2, kernel=(5, 4)),
    "2d-large": dict(batch=2, groups=2, c_in=2, c_out=1, kernel=(3, 3), large=True),
    "3d": dict(batch=2, groups=2, c_in=4, c_out=2, kernel=(2, 3, 2)),
    "3d-k3": dict(batch=1, groups=1, c_in=1, c_out=2, kernel=(3, 3, 3)),
}


def gradcheck_inputs(batch, groups, c_in, c_out, kernel, large=False, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn((c_out, c_in, *kernel), generator=generator, dtype=torch.float64)
    whole = torch.randint(-9, 10, (batch, groups, len(kernel)), generator=generator).to(torch.float64)
    if large:
        whole = whole + torch.where(whole < 0, -1000.0, 1000.0)
    offsets = whole + 0.2 + 0.6 * torch.rand(whole.shape, generator=generator, dtype=torch.float64)
    scales = torch.rand((batch, groups), generator=generator, dtype=torch.float64) + 0.5
    return tuple(t.to(device).requires_grad_() for t in (weight, offsets, scales))


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
@pytest.mark.parametrize("impl", impl_params())
def test_gradcheck(impl, case):
    inputs = gradcheck_inputs(**GRADCHECK_CASES[case])
    assert torch.autograd.gradcheck(IMPLEMENTATIONS[impl], inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


GRAD_SHAPES = [
    (1, 1, 1, 1, (1, 1)),
    (3, 2, 4, 3, (3, 3)),
    (8, 4, 8, 2, (2, 5)),
    (2, 16, 16, 2, (7, 7)),
    (4, 8, 8, 3, (6, 4)),
    (2, 2, 4, 2, (3, 3, 3)),
    (5, 4, 4, 1, (2, 5, 3)),
    (1, 16, 16, 2, (7, 7, 7)),
]


@requires_extension
@pytest.mark.parametrize("kind", ["mixed", "integer", "large"])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda s: _grouping_id(s[:4]) + "-" + _kernel_id(s[4]))
def test_compiled_backward_matches_autograd_of_reference_and_naive(shape, kind):
    """Compiled backward == autograd through the reference == autograd through the naive blend.

    At integer offsets all three use the same one-sided (right) derivative: d/do of o − floor(o) is 1.
    """
    batch, groups, c_in, c_out, kernel = shape
    weight, offsets, scales = make_inputs(batch, groups, c_in, c_out, kernel, kind, seed=len(kernel) * 100 + batch)
    grad_out = torch.randn((batch, c_out, c_in, *kernel), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = {}
    for name, fn in [("compiled", compiled_op), ("reference", group_roll_reference), ("naive", naive_group_roll)]:
        inputs = [t.clone().requires_grad_() for t in (weight, offsets, scales)]
        out = fn(*inputs)
        grads[name] = torch.autograd.grad(out, inputs, grad_out)
    for which, label in enumerate(["weight", "offsets", "scales"]):
        torch.testing.assert_close(grads["reference"][which], grads["naive"][which], rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"grad {label}: reference vs naive\n{m}")
        torch.testing.assert_close(grads["compiled"][which], grads["reference"][which], rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"grad {label}: compiled vs reference\n{m}")


@requires_extension
def test_gradient_of_single_input():
    """Only the inputs that require grad get one (the others are not needed by autograd)."""
    weight, offsets, scales = make_inputs(2, 2, 4, 2, (3, 3), "mixed")
    offsets.requires_grad_()
    out = compiled_op(weight, offsets, scales)
    (g_off,) = torch.autograd.grad(out.square().sum(), offsets)
    o2 = offsets.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(group_roll_reference(weight, o2, scales).square().sum(), o2)
    torch.testing.assert_close(g_off, g_ref, rtol=1e-10, atol=1e-10)


@requires_extension
def test_double_backward_is_refused():
    inputs = gradcheck_inputs(**GRADCHECK_CASES["2d"])
    grads = torch.autograd.grad(compiled_op(*inputs).square().sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        grads[1].sum().backward()


# --------------------------------------------------------------------------------------------------
# torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch).
# --------------------------------------------------------------------------------------------------


@requires_extension
@pytest.mark.parametrize(
    "shape,requires_grad",
    [
        ((2, 2, 4, 3, (3, 3)), True),
        ((1, 1, 2, 2, (2, 5)), False),
        ((2, 2, 4, 2, (3, 2, 3)), True),
        ((3, 4, 4, 1, (1, 3, 3)), False),
    ],
    ids=["2d-grad", "2d", "3d-grad", "3d"],
)
def test_opcheck(shape, requires_grad):
    batch, groups, c_in, c_out, kernel = shape
    inputs = [t.requires_grad_(requires_grad) for t in make_inputs(batch, groups, c_in, c_out, kernel, "mixed")]
    torch.library.opcheck(torch.ops.agi_monai.group_roll.default, tuple(inputs))


@requires_extension
@pytest.mark.parametrize("kernel", [(3, 3), (3, 2, 3)], ids=["2d", "3d"])
def test_fake_kernels_give_the_real_kernels_strides(kernel):
    """Inductor checks a real result against the fake kernel's strides: a channels-last weight (a network converted
    with ``.to(memory_format=torch.channels_last)``) made the backward's fake keep its strides, while the kernels
    return contiguous gradients ("expected ... stride 9==1" in a compiled training step; opcheck does not see it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    weight, offsets, scales = make_inputs(2, 2, 4, 3, kernel, "mixed")
    layout = torch.channels_last if len(kernel) == 2 else torch.channels_last_3d
    weight = weight.to(memory_format=layout)
    offsets, scales = offsets.transpose(0, 1).contiguous().transpose(0, 1), scales.t().contiguous().t()  # strided
    grad = torch.ones(2, *weight.shape, dtype=weight.dtype)
    real = torch.ops.agi_monai._group_roll_backward(grad, weight, offsets, scales)
    real_out = torch.ops.agi_monai.group_roll(weight, offsets, scales)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_inputs = [mode.from_tensor(t) for t in (grad, weight, offsets, scales)]
        fake = torch.ops.agi_monai._group_roll_backward(*fake_inputs)
        fake_out = torch.ops.agi_monai.group_roll(*fake_inputs[1:])
    assert [t.stride() for t in fake] == [t.stride() for t in real]
    assert fake_out.stride() == real_out.stride()


# --------------------------------------------------------------------------------------------------
# float16 / bfloat16 on CPU: float accumulation, then one rounding.
# --------------------------------------------------------------------------------------------------


def assert_close_low_precision(actual, expected64, dtype, ulps=2.0, label=""):
    """|actual − expected| ≤ ulps·eps(dtype)·|expected| + a small absolute floor.

    With float accumulation the result is the float64 value rounded once (≤ 0.5 ulp, plus float32 noise);
    accumulating in half/bfloat16 itself would typically be off by several ulps.
    """
    assert actual.dtype == dtype
    eps = torch.finfo(dtype).eps
    floor = 1e-5 * float(expected64.abs().max()) + float(torch.finfo(dtype).tiny)
    torch.testing.assert_close(actual.double(), expected64, rtol=ulps * eps, atol=floor, msg=lambda m: f"{label}\n{m}")


LOW_PRECISION_SHAPES = [(4, 8, 16, 8, (3, 3)), (2, 4, 8, 4, (7, 5)), (2, 2, 4, 4, (3, 3, 3))]


def _check_low_precision(fn, dtype, shape, device="cpu"):
    batch, groups, c_in, c_out, kernel = shape
    weight, offsets, scales = (t.to(dtype) for t in make_inputs(batch, groups, c_in, c_out, kernel, "mixed", seed=5))
    grad_out = torch.randn((batch, c_out, c_in, *kernel), generator=torch.Generator().manual_seed(2)).to(dtype)
    # The float64 truth is computed from exactly the low-precision values.
    ref_inputs = [t.double().requires_grad_() for t in (weight, offsets, scales)]
    expected = group_roll_reference(*ref_inputs)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad_out.double())
    inputs = [t.to(device).requires_grad_() for t in (weight, offsets, scales)]
    out = fn(*inputs)
    assert_close_low_precision(out.cpu(), expected.detach(), dtype, label="forward")
    grads = torch.autograd.grad(out, inputs, grad_out.to(device))
    for got, want, label in zip(grads, expected_grads, ["grad weight", "grad offsets", "grad scales"]):
        # Backward sums many terms: allow a few ulps on top of the final rounding.
        assert_close_low_precision(got.cpu(), want, dtype, ulps=4.0, label=label)


@pytest.mark.parametrize("shape", LOW_PRECISION_SHAPES, ids=lambda s: f"{len(s[4])}d-" + _kernel_id(s[4]))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", impl_params())
def test_low_precision_cpu(impl, dtype, shape):
    _check_low_precision(IMPLEMENTATIONS[impl], dtype, shape)


@pytest.mark.parametrize("impl", impl_params())
def test_float32_cpu(impl):
    weight, offsets, scales = make_inputs(4, 8, 16, 8, (3, 3), "mixed", seed=9)
    out = IMPLEMENTATIONS[impl](weight.float(), offsets.float(), scales.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), group_roll_reference(weight.float().double(), offsets.float().double(),
                                                                  scales.float().double()), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The Python entry point: compiled where available, fallback announced.
# --------------------------------------------------------------------------------------------------


@requires_extension
def test_python_entry_uses_compiled_op_without_warning():
    weight, offsets, scales = make_inputs(2, 2, 4, 2, (3, 3), "mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = ops.group_roll(weight, offsets, scales)
    tight(out, compiled_op(weight, offsets, scales))


def _run_python(code: str, cwd: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("PYTHONWARNINGS", None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


# A meta path finder proxy that makes ``agi_monai._C`` unfindable (find_spec → None), exactly as in an
# install where the extension was never built; in the "broken" mode it instead points the spec at a
# file that is not a shared library, as for an extension built against another torch.
_FALLBACK_SCRIPT = """
import importlib.util, sys, warnings
MODE, DATA, FIRST = sys.argv[1], sys.argv[2], sys.argv[3]

class HideExtension:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name == "agi_monai._C":
            if MODE == "broken":
                return importlib.util.spec_from_file_location(name, DATA + "/_C.so")
            return None
        find = getattr(self.finder, "find_spec", None)
        return None if find is None else find(name, path, target)
    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()
    def find_distributions(self, *args, **kwargs):  # importlib.metadata (package versions) asks the finders too
        find = getattr(self.finder, "find_distributions", None)
        return iter(()) if find is None else find(*args, **kwargs)

sys.meta_path[:] = [HideExtension(f) for f in sys.meta_path]
assert importlib.util.find_spec("agi_monai") is not None

import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")  # so that "exactly one" tests the op's own once-only logic
    import agi_monai
    from agi_monai import ops
    from agi_monai.networks import AGINet
    data = torch.load(DATA + "/io.pt")
    if FIRST == "network":  # a network built without the extension announces the fallback it takes
        AGINet(in_channels=2, channels=[8, 16, 16, 32])(torch.rand(1, 2, 16, 16))
    first = ops.group_roll(*data["inputs"])
    second = ops.group_roll(*data["inputs"])
    AGINet(in_channels=2, channels=[8, 16, 16, 32])(torch.rand(1, 2, 16, 16))
runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(runtime) == 1, [str(w.message) for w in runtime]
message = str(runtime[0].message)
assert "pure-PyTorch" in message, message
assert not ops.extension_available() and not ops.extension_has_cuda()
assert ops.extension_error() is not None and ops.extension_error() in message, (ops.extension_error(), message)
assert not hasattr(torch.ops.agi_monai, "group_roll"), "the op library was loaded anyway"
torch.testing.assert_close(first, data["expected"], rtol=1e-12, atol=1e-12)
torch.testing.assert_close(second, data["expected"], rtol=1e-12, atol=1e-12)
print("FALLBACK-OK", message)
"""


@pytest.mark.parametrize("first", ["op", "network"])
@pytest.mark.parametrize("mode,reason", [("missing", "not built"), ("broken", "failed to load")])
def test_fallback_is_announced_once(tmp_path, mode, reason, first):
    weight, offsets, scales = make_inputs(3, 2, 4, 2, (3, 3), "mixed", seed=11)
    torch.save({"inputs": (weight, offsets, scales), "expected": naive_group_roll(weight, offsets, scales)},
               tmp_path / "io.pt")
    (tmp_path / "_C.so").write_bytes(b"this is not a shared library\n")
    result = _run_python(_FALLBACK_SCRIPT, tmp_path, mode, str(tmp_path), first)
    assert "FALLBACK-OK" in result.stdout
    assert reason in result.stdout, result.stdout


# --------------------------------------------------------------------------------------------------
# TorchScript, torch.compile, torch.export.
# --------------------------------------------------------------------------------------------------


class RollModule(torch.nn.Module):
    """A kernel parameter rolled per sample: the shape of CAGR's use of the op."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return torch.ops.agi_monai.group_roll(self.weight, offsets, scales)


@requires_extension
@pytest.mark.filterwarnings("ignore:.*torch.jit.*is deprecated:FutureWarning")
def test_torchscript_save_load_in_fresh_process(tmp_path):
    cases = {}
    for name, shape in {"2d": (3, 4, 8, 4, (3, 3)), "3d": (2, 2, 4, 2, (3, 2, 3))}.items():
        batch, groups, c_in, c_out, kernel = shape
        weight, offsets, scales = make_inputs(batch, groups, c_in, c_out, kernel, "mixed", seed=21)
        scripted = torch.jit.script(RollModule(weight))
        assert "agi_monai::group_roll" in str(scripted.graph)
        expected = scripted(offsets, scales).detach()
        tight(expected, group_roll_reference(weight, offsets, scales))
        scripted.save(str(tmp_path / f"{name}.pt"))
        cases[name] = {"inputs": (offsets, scales), "expected": expected}
    torch.save(cases, tmp_path / "io.pt")
    code = f"""
        import agi_monai  # registers torch.ops.agi_monai before torch.jit.load
        import torch
        cases = torch.load({str(tmp_path / "io.pt")!r})
        for name, case in cases.items():
            module = torch.jit.load({str(tmp_path)!r} + "/" + name + ".pt")
            out = module(*case["inputs"])
            torch.testing.assert_close(out, case["expected"], rtol=0, atol=0)
            out.sum().backward()
            assert module.weight.grad is not None and module.weight.grad.shape == module.weight.shape
        print("TORCHSCRIPT-OK")
    """
    assert "TORCHSCRIPT-OK" in _run_python(code, cwd=tmp_path).stdout


@requires_extension
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_compile_fullgraph(backend, dynamic):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)

    def fn(weight, offsets, scales):
        return torch.ops.agi_monai.group_roll(weight, offsets * 2.0, scales).sin()

    compiled = torch.compile(fn, fullgraph=True, backend=counter, dynamic=dynamic)
    # Batch sizes distinct from every other size (C_out 3, C_in 4, k 3, n 2, S 2): dynamo's duck sizing
    # would otherwise give equal sizes one symbol and recompile when they part.
    batches = [5, 7] if dynamic else [5]
    for batch in batches:
        inputs = make_inputs(batch, 2, 4, 3, (3, 3), "mixed", seed=batch)
        got_in = [t.clone().requires_grad_() for t in inputs]
        want_in = [t.clone().requires_grad_() for t in inputs]
        got = compiled(*got_in)
        want = fn(*want_in)
        tight(got, want)
        got_grads = torch.autograd.grad(got.sum(), got_in)
        want_grads = torch.autograd.grad(want.sum(), want_in)
        for g, w in zip(got_grads, want_grads):
            tight(g, w)
    # One graph, compiled once (with dynamic=True the second batch size reuses it: the fake impl is symbolic).
    assert counter.frame_count == 1, counter.frame_count
    assert counter.op_count >= 1
    torch._dynamo.reset()


@requires_extension
def test_python_entry_choice_of_kernels_compiles_into_one_graph():
    # group_roll (CAGR's entry) chooses compiled kernels or the reference by device. That choice must be a constant
    # to dynamo: asked of the dispatcher per call (as the CUDA branch did), it broke the graph at every CAGR on CUDA.
    torch._dynamo.reset()

    def fn(weight, offsets, scales):
        rolled = ops.group_roll(weight, offsets, scales)
        return rolled * (2.0 if ops.extension_has_cuda() else 3.0)

    inputs = make_inputs(2, 2, 4, 3, (3, 3), "mixed")
    tight(torch.compile(fn, fullgraph=True, backend="eager")(*inputs), fn(*inputs))
    torch._dynamo.reset()


@requires_extension
@pytest.mark.skipif(
    os.environ.get("AGI_MONAI_TEST_INDUCTOR") != "1",
    reason="inductor's first C++ compile takes ~25 s on a 2-core machine; set AGI_MONAI_TEST_INDUCTOR=1 to run",
)
@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()

    def fn(weight, offsets, scales):
        return torch.ops.agi_monai.group_roll(weight, offsets, scales).mul(2.0)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    inputs = [t.requires_grad_() for t in make_inputs(3, 2, 4, 3, (3, 3), "mixed")]
    out = compiled(*inputs)
    tight(out, fn(*inputs))
    grads = torch.autograd.grad(out.sum(), inputs)
    want = torch.autograd.grad(fn(*inputs).sum(), inputs)
    for g, w in zip(grads, want):
        tight(g, w)
    torch._dynamo.reset()


@requires_extension
@pytest.mark.parametrize("kernel", [(3, 3), (3, 3, 3)], ids=["2d", "3d"])
def test_torch_export_keeps_one_node(kernel):
    weight, offsets, scales = make_inputs(4, 2, 4, 3, kernel, "mixed", seed=31)
    module = RollModule(weight)
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(
        module, (offsets, scales), dynamic_shapes={"offsets": {0: batch}, "scales": {0: batch}}
    )
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.agi_monai.group_roll.default) == 1, targets
    decomposed = exported.run_decompositions()
    assert any(n.target is torch.ops.agi_monai.group_roll.default for n in decomposed.graph.nodes)
    runnable = exported.module()
    for b in (4, 7):
        _, offsets_b, scales_b = make_inputs(b, 2, 4, 3, kernel, "mixed", seed=b)
        tight(runnable(offsets_b, scales_b), module(offsets_b, scales_b).detach())


# --------------------------------------------------------------------------------------------------
# Bad inputs: errors name the argument, the shape it got and the shape it expected.
# --------------------------------------------------------------------------------------------------

W2 = lambda: torch.randn(2, 4, 3, 3)  # noqa: E731
W3 = lambda: torch.randn(2, 4, 3, 3, 3)  # noqa: E731
O2 = lambda: torch.randn(2, 2, 2)  # noqa: E731
S2 = lambda: torch.rand(2, 2)  # noqa: E731


def _with_offset(value):
    offsets = O2()
    offsets[1, 0, 1] = value
    return W2(), offsets, S2()


BAD_INPUTS = {
    # id: (inputs, keywords that the message must contain, exception type of the reference)
    "offsets-rank2": (lambda: (W2(), torch.randn(2, 4), S2()), ["offsets", "(B, n, S)", "got shape [2, 4]"], ValueError),
    "offsets-rank4": (lambda: (W2(), torch.randn(2, 2, 2, 1), S2()), ["offsets", "(B, n, S)", "[2, 2, 2, 1]"], ValueError),
    "offsets-S4": (lambda: (W2(), torch.randn(2, 2, 4), S2()), ["offsets", "S = 2", "got shape [2, 2, 4]"], ValueError),
    "offsets-S1": (lambda: (W2(), torch.randn(2, 2, 1), S2()), ["offsets", "S = 2", "got shape [2, 2, 1]"], ValueError),
    "weight-2d-for-S3": (lambda: (W2(), torch.randn(2, 2, 3), S2()),
                         ["weight", "(C_out, C_in, kz, ky, kx)", "got shape [2, 4, 3, 3]"], ValueError),
    "weight-3d-for-S2": (lambda: (W3(), O2(), S2()), ["weight", "(C_out, C_in, ky, kx)", "got shape [2, 4, 3, 3, 3]"],
                         ValueError),
    "weight-rank3": (lambda: (torch.randn(2, 4, 3), O2(), S2()), ["weight", "(C_out, C_in, ky, kx)", "got shape [2, 4, 3]"],
                     ValueError),
    "scales-wrong-n": (lambda: (W2(), O2(), torch.rand(2, 3)), ["scales", "(B, n) = (2, 2)", "got shape [2, 3]"], ValueError),
    "scales-wrong-B": (lambda: (W2(), O2(), torch.rand(1, 2)), ["scales", "(B, n) = (2, 2)", "got shape [1, 2]"], ValueError),
    "scales-rank1": (lambda: (W2(), O2(), torch.rand(2)), ["scales", "(B, n) = (2, 2)", "got shape [2]"], ValueError),
    "n-not-dividing": (lambda: (torch.randn(2, 6, 3, 3), torch.randn(2, 4, 2), torch.rand(2, 4)),
                       ["n = 4", "must divide C_in = 6", "[2, 6, 3, 3]"], ValueError),
    "no-groups": (lambda: (W2(), torch.randn(2, 0, 2), torch.rand(2, 0)), ["offsets", "n >= 1", "got shape [2, 0, 2]"],
                  ValueError),
    "integer-dtype": (lambda: (W2().long(), O2().long(), S2().long()), ["weight", "float16, bfloat16, float32 or float64"],
                      TypeError),
    "float8-dtype": (lambda: tuple(t.to(torch.float8_e4m3fn) for t in (W2(), O2(), S2())),
                     ["weight", "float16, bfloat16, float32 or float64", "torch.float8_e4m3fn"], TypeError),
    "mixed-dtype-offsets": (lambda: (W2(), O2().double(), S2()), ["weight, offsets and scales", "one dtype", "offsets"],
                            TypeError),
    "mixed-dtype-scales": (lambda: (W2(), O2(), S2().half()), ["weight, offsets and scales", "one dtype", "scales"],
                           TypeError),
    "nan-offset": (lambda: _with_offset(float("nan")), ["offsets", "finite", "NaN or Inf", "[2, 2, 2]"], ValueError),
    "inf-offset": (lambda: _with_offset(float("inf")), ["offsets", "finite", "NaN or Inf", "[2, 2, 2]"], ValueError),
    "neg-inf-offset": (lambda: _with_offset(float("-inf")), ["offsets", "finite", "NaN or Inf", "[2, 2, 2]"], ValueError),
    "empty-kernel-axis": (lambda: (torch.randn(2, 4, 0, 3), O2(), S2()), ["weight", "non-empty kernel axes", "[2, 4, 0, 3]"],
                          ValueError),
}

# Known divergences between the compiled op's and the reference's checks (none at present).
REFERENCE_XFAIL: dict[str, str] = {}
MESSAGE_XFAIL: dict[str, str] = {}


def _bad_params(xfails):
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=xfails[name])) if name in xfails else name
        for name in BAD_INPUTS
    ]


@requires_extension
@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "autograd"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_compiled(case, requires_grad):
    build, keywords, error = BAD_INPUTS[case]
    inputs = build()
    if requires_grad:
        inputs = [t.requires_grad_() if t.is_floating_point() else t for t in inputs]
    with pytest.raises(error) as excinfo:  # the reference's exception type: callers catch one whatever runs
        compiled_op(*inputs)
    message = str(excinfo.value)
    assert message.startswith("group_roll: "), message
    for keyword in keywords:
        assert keyword in message, f"{keyword!r} not in {message!r}"


@pytest.mark.parametrize("case", _bad_params(REFERENCE_XFAIL))
def test_bad_inputs_reference(case):
    build, keywords, error = BAD_INPUTS[case]
    with pytest.raises(error) as excinfo:
        group_roll_reference(*build())
    message = str(excinfo.value)
    for keyword in keywords:
        assert keyword in message, f"{keyword!r} not in {message!r}"


@requires_extension
@pytest.mark.parametrize("case", _bad_params(MESSAGE_XFAIL))
def test_bad_inputs_same_message(case):
    """The reference promises the compiled op's exact message text."""
    build, _, error = BAD_INPUTS[case]
    inputs = build()
    with pytest.raises(error) as compiled_error:
        compiled_op(*inputs)
    with pytest.raises(error) as reference_error:
        group_roll_reference(*inputs)
    assert str(compiled_error.value).splitlines()[0] == str(reference_error.value)


@requires_extension
@pytest.mark.parametrize("case", [name for name in BAD_INPUTS if "inf" not in name and "nan" not in name])
def test_bad_inputs_meta_same_error(case):
    """The fake kernel (meta tensors, FakeTensor under torch.compile/export) checks what the kernels check, values
    apart: an export traced with a wrong shape fails there, not when the program runs."""
    build, _, error = BAD_INPUTS[case]
    inputs = [t.to("meta") for t in build()]
    with pytest.raises(error) as fake_error:
        compiled_op(*inputs)
    with pytest.raises(error) as reference_error:
        group_roll_reference(*build())
    assert str(fake_error.value).splitlines()[0] == str(reference_error.value)


@requires_extension
@pytest.mark.parametrize("meta", ["weight", "offsets", "scales"])
def test_a_meta_argument_beside_cpu_ones_is_refused(meta):
    # the dispatcher sends a mix of CPU and meta tensors to the fake kernel, which returned uninitialised CPU memory
    inputs = dict(zip(("weight", "offsets", "scales"), make_inputs(2, 2, 4, 3, (3, 3))))
    inputs[meta] = inputs[meta].to("meta")
    devices = ", ".join(f"{name} on {tensor.device}" for name, tensor in inputs.items())
    for op in (compiled_op, group_roll):
        with pytest.raises(ValueError, match=re.escape(f"must be on one device, got {devices}")):
            op(*inputs.values())


@requires_extension
def test_python_entry_point_is_scriptable():
    class Roll(torch.nn.Module):
        def forward(self, weight: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
            return group_roll(weight, offsets, scales)

    scripted = torch.jit.script(Roll())
    assert "agi_monai::group_roll" in str(scripted.inlined_graph)
    inputs = make_inputs(3, 2, 4, 3, (3, 3), "mixed", seed=4)
    tight(scripted(*inputs), group_roll_reference(*inputs))


def test_reference_compiles_and_exports_without_a_graph_break():
    # the reference's finiteness check reads values: traced, it is an assertion in the graph, not a graph break
    # (which failed torch.compile(fullgraph=True) and torch.export of extension-free networks)
    weight, offsets, scales = make_inputs(2, 2, 4, 3, (3, 3), "mixed", seed=5)
    compiled = torch.compile(group_roll_reference, fullgraph=True, backend="aot_eager")
    tight(compiled(weight, offsets, scales), group_roll_reference(weight, offsets, scales))
    bad = offsets.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="group_roll: offsets must be finite"):
        compiled(weight, bad, scales)

    class Reference(torch.nn.Module):
        def forward(self, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
            return group_roll_reference(weight, offsets, scales)

    exported = torch.export.export(Reference(), (offsets, scales))
    tight(exported.module()(offsets, scales), group_roll_reference(weight, offsets, scales))


# --------------------------------------------------------------------------------------------------
# CPU code paths (csrc/cpu/group_roll_kernel.cpp): lane permutes (float32, AVX-512, K ≤ 32), tiles of
# output channels (vector extensions: float64, and float32 elsewhere; AVX2's 8×8 register transposes),
# per-tap loops (the first version; float16/bfloat16), and the CUDA backend's column code run on the CPU
# (so that its maths are tested without a GPU). AGI_MONAI_GROUP_ROLL_CPU picks one per call.
# --------------------------------------------------------------------------------------------------

CPU_PATHS = ["avx512", "avx2", "baseline", "taps", "columns"]


def _cpu_path_supported(path: str) -> bool:
    if not ops.extension_available():
        return False
    saved = os.environ.get("AGI_MONAI_GROUP_ROLL_CPU")
    os.environ["AGI_MONAI_GROUP_ROLL_CPU"] = path
    try:
        compiled_op(*make_inputs(1, 1, 1, 1, (3, 3)))
        return True
    except RuntimeError as err:
        assert "is not supported by this CPU" in str(err), err
        return False
    finally:
        if saved is None:
            os.environ.pop("AGI_MONAI_GROUP_ROLL_CPU")
        else:
            os.environ["AGI_MONAI_GROUP_ROLL_CPU"] = saved


def cpu_path_params():
    """Every CPU path; those this CPU lacks (e.g. avx512) are skipped, with the reason."""
    return [
        pytest.param(path, marks=pytest.mark.skipif(not _cpu_path_supported(path), reason=f"{path}: not on this CPU"))
        for path in CPU_PATHS
    ]


# (B, n, C_in, C_out, kernel): every kernel variant and its edges.
CPU_PATH_SHAPES = [
    (3, 2, 4, 3, (3, 3)),  # lanes dense (K ≤ 9); row of 36: a partial last register; windows past both tensor ends;
    # tiles: 3 of 8 lanes used, rows of 36 = 4 register transposes and 4 single entries
    (2, 8, 64, 5, (3, 3)),  # lanes dense; registers straddle groups (8 channels × 9 = 72 entries per group); tiles:
    # 64 input channels = two chunks of 32
    (2, 4, 16, 3, (2, 2)),  # lanes dense, K = 4
    (3, 1, 3, 2, (1, 1)),  # K = 1: all taps read the one entry
    (2, 2, 4, 3, (3, 5)),  # lanes per slice, K = 15 (one register)
    (2, 4, 8, 2, (5, 5)),  # lanes per slice, K = 25 (two registers, the second partial)
    (2, 2, 4, 3, (3, 3, 3)),  # 3D lanes per slice, K = 27
    (1, 2, 2, 2, (2, 4, 4)),  # 3D, K = 32: exactly two registers
    (2, 2, 4, 2, (7, 7)),  # K = 49: tiles on every path but taps and columns
    (2, 2, 2, 2, (3, 3, 4)),  # 3D, K = 36: tiles
    (3, 4, 36, 17, (3, 3)),  # tiles: 17 output channels = two full 8-lane blocks and one of 1; 36 input channels
    # = a chunk of 32 and one of 4
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", CPU_PATH_SHAPES, ids=lambda s: _grouping_id(s[:4]) + "-" + _kernel_id(s[4]))
@pytest.mark.parametrize("path", cpu_path_params())
def test_cpu_paths_match_reference(monkeypatch, path, shape, dtype):
    """Forward and all three gradients of each CPU path equal the float64 reference (float32 to rounding)."""
    monkeypatch.setenv("AGI_MONAI_GROUP_ROLL_CPU", path)
    batch, groups, c_in, c_out, kernel = shape
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    for kind in ["mixed", "integer", "large"]:
        weight, offsets, scales = make_inputs(batch, groups, c_in, c_out, kernel, kind, seed=zlib.crc32(repr(shape).encode()))
        weight, offsets, scales = (t.to(dtype) for t in (weight, offsets, scales))
        grad_out = torch.randn((batch, c_out, c_in, *kernel), generator=torch.Generator().manual_seed(3)).to(dtype)
        ref_inputs = [t.double().requires_grad_() for t in (weight, offsets, scales)]
        expected = group_roll_reference(*ref_inputs)
        expected_grads = torch.autograd.grad(expected, ref_inputs, grad_out.double())
        inputs = [t.clone().requires_grad_() for t in (weight, offsets, scales)]
        out = compiled_op(*inputs)
        grads = torch.autograd.grad(out, inputs, grad_out)
        for label, got, want in zip(["forward", "grad weight", "grad offsets", "grad scales"],
                                    [out, *grads], [expected, *expected_grads]):
            scale = max(1.0, float(want.detach().abs().max()))
            torch.testing.assert_close(got.detach().double(), want.detach(), rtol=tolerance, atol=tolerance * scale,
                                       msg=lambda m: f"{path} {kind} {label}\n{m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", cpu_path_params())
def test_cpu_paths_roll_by_huge_offsets_like_integer_arithmetic(monkeypatch, path, dtype):
    """Offsets far beyond the kernel (float32 integers from 2^24 to 2^31, float64 ones up to 2^62): the roll is
    the offset's value mod k, as Python's integers compute it (a float modulo rounded there before)."""
    monkeypatch.setenv("AGI_MONAI_GROUP_ROLL_CPU", path)
    generator = torch.Generator().manual_seed(5)
    top = 31 if dtype == torch.float32 else 62
    magnitudes = torch.pow(2.0, torch.empty(4, 2, 2, dtype=torch.float64).uniform_(24, top, generator=generator))
    signs = torch.where(torch.rand(4, 2, 2, generator=generator) < 0.5, -1.0, 1.0).double()
    offsets = torch.round(signs * magnitudes).to(dtype)  # integers the dtype holds exactly
    weight = torch.randn(3, 4, 5, 3, generator=generator, dtype=torch.float64).to(dtype)
    scales = torch.ones(4, 2, dtype=dtype)
    out = compiled_op(weight, offsets, scales)
    for b in range(4):
        for i in range(2):
            shifts = [int(offsets[b, i, 0].item()) % 3, int(offsets[b, i, 1].item()) % 5]  # x: size 3, y: size 5
            expected = torch.roll(weight[:, 2 * i : 2 * i + 2], shifts=shifts, dims=[-1, -2])
            torch.testing.assert_close(out[b, :, 2 * i : 2 * i + 2], expected, rtol=0, atol=0,
                                       msg=lambda m: f"{path} offsets {offsets[b, i].tolist()}\n{m}")


@pytest.mark.parametrize("kernel", [(3, 3), (7, 7), (3, 3, 3)], ids=_kernel_id)
@pytest.mark.parametrize("path", cpu_path_params())
def test_cpu_paths_split_across_threads_like_on_one(monkeypatch, path, kernel):
    """Each CPU path with its work split over 4 threads (at::parallel_for) gives what 1 thread gives, to float64
    rounding, and the reference's values: the test command runs every other test on one thread (scripts/test.sh)."""
    monkeypatch.setenv("AGI_MONAI_GROUP_ROLL_CPU", path)
    weight, offsets, scales = make_inputs(6, 4, 16, 24, kernel, "mixed", seed=41)
    grad_out = torch.randn((6, 24, 16, *kernel), dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    ref_inputs = [t.clone().requires_grad_() for t in (weight, offsets, scales)]
    expected = group_roll_reference(*ref_inputs)
    results = {}
    threads = torch.get_num_threads()
    try:
        for count in (1, 4):
            torch.set_num_threads(count)
            assert torch.get_num_threads() == count
            inputs = [t.clone().requires_grad_() for t in (weight, offsets, scales)]
            out = compiled_op(*inputs)
            results[count] = [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]
    finally:
        torch.set_num_threads(threads)
    wanted = [expected.detach(), *torch.autograd.grad(expected, ref_inputs, grad_out)]
    for label, one, several, want in zip(["forward", "grad weight", "grad offsets", "grad scales"], results[1],
                                         results[4], wanted):
        torch.testing.assert_close(several, one, rtol=1e-12, atol=1e-12, msg=lambda m: f"{path} {label}: 4 vs 1\n{m}")
        tight(several, want, f"{path} {label}: 4 threads vs reference")


@pytest.mark.parametrize("shape", LOW_PRECISION_SHAPES, ids=lambda s: f"{len(s[4])}d-" + _kernel_id(s[4]))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@requires_extension
def test_low_precision_cpu_columns(monkeypatch, dtype, shape):
    """The column code in float16/bfloat16 (float accumulation), as the CUDA column kernels run it."""
    monkeypatch.setenv("AGI_MONAI_GROUP_ROLL_CPU", "columns")
    _check_low_precision(compiled_op, dtype, shape)


@pytest.mark.parametrize("where", ["weight", "grad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kernel", [(3, 3), (5, 5), (3, 3, 3), (7, 7)], ids=_kernel_id)
@pytest.mark.parametrize("path", cpu_path_params())
def test_cpu_paths_propagate_non_finite_like_the_definition(monkeypatch, path, kernel, dtype, where):
    """NaN/Inf in the weight or in the incoming gradient reach exactly the entries whose taps read them,
    zero-weight taps included (0 · NaN = NaN), as in the torch.roll blend of METHOD §2: the vector kernels
    must neither mix in the neighbouring slices their windows cover nor drop zero-weight taps."""
    monkeypatch.setenv("AGI_MONAI_GROUP_ROLL_CPU", path)
    weight, offsets, scales = make_inputs(2, 2, 4, 3, kernel, "fractional", seed=17)
    offsets[0, 0] = torch.round(offsets[0, 0])  # integer offsets: zero blend weights
    grad_out = torch.randn((2, 3, 4, *kernel), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    if where == "weight":  # group 0 (input channels 0, 1); group 1 stays finite
        weight[1, 0].view(-1)[2] = float("nan")
        weight[2, 1].view(-1)[0] = float("inf")
    else:  # samples 0 and 1, group 0 (NaN only: sums of Infs of both signs depend on the summation order)
        grad_out[0, 0, 1].view(-1)[1] = float("nan")
        grad_out[1, 2, 0].view(-1)[-1] = float("nan")
    naive_inputs = [t.clone().requires_grad_() for t in (weight, offsets, scales)]
    expected = naive_group_roll(*naive_inputs)
    expected_grads = torch.autograd.grad(expected, naive_inputs, grad_out)
    inputs = [t.to(dtype).requires_grad_() for t in (weight, offsets, scales)]
    out = compiled_op(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    for label, got, want in zip(["forward", "grad weight", "grad offsets", "grad scales"], [out, *grads],
                                [expected, *expected_grads]):
        got, want = got.detach().double(), want.detach()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{label}: NaN entries differ"
        assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{label}: Inf entries differ"
        finite = torch.isfinite(want)
        # The test only means something if the bad value reaches some entries and not others.
        mixed = {"weight": ("forward", "grad offsets", "grad scales"), "grad": ("grad weight", "grad offsets", "grad scales")}
        assert (finite.any() and not finite.all()) == (label in mixed[where]) and finite.any(), label
        tolerance = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(got[finite], want[finite], rtol=tolerance,
                                   atol=tolerance * float(want[finite].abs().max()))


def _vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping holding ``address`` (Linux /proc/self/smaps)."""
    flags, inside = [], False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
    return flags


@requires_extension
def test_large_outputs_match_reference_and_ask_for_huge_pages():
    """A 9.4 MB output and weight gradient (AGI-Net's 512-channel layer): the values equal the reference, and on
    Linux with transparent huge pages available the op advises them (MADV_HUGEPAGE: 4 KiB first-touch faults
    dominated the forward at this size)."""
    weight, offsets, scales = (t.float() for t in make_inputs(1, 8, 512, 512, (3, 3), "mixed", seed=41))
    inputs = [t.clone().requires_grad_() for t in (weight, offsets, scales)]
    out = compiled_op(*inputs)
    ref_inputs = [t.double().requires_grad_() for t in (weight, offsets, scales)]
    expected = group_roll_reference(*ref_inputs)
    torch.testing.assert_close(out.detach().double(), expected.detach(), rtol=2e-6, atol=2e-5)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad_out.double())
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if sys.platform != "linux" or not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages here: the advice is a no-op")
    for tensor in (out, grads[0]):
        aligned = (tensor.data_ptr() + (2 << 20) - 1) // (2 << 20) * (2 << 20)
        assert "hg" in _vm_flags(aligned), f"{tuple(tensor.shape)}: no MADV_HUGEPAGE on its memory"


@requires_extension
def test_cpu_path_variable_is_checked(monkeypatch):
    monkeypatch.setenv("AGI_MONAI_GROUP_ROLL_CPU", "fastest")
    with pytest.raises(RuntimeError, match="AGI_MONAI_GROUP_ROLL_CPU must be one of auto, avx512, avx2, baseline, taps, columns; got 'fastest'"):
        compiled_op(*make_inputs(1, 1, 1, 1, (3, 3)))


# --------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU and the CUDA kernels). Each numerical test runs both CUDA
# implementations (AGI_MONAI_GROUP_ROLL_CUDA: taps, the first version, and columns, the default).
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=["taps", "columns"])
def cuda_path(request, monkeypatch):
    monkeypatch.setenv("AGI_MONAI_GROUP_ROLL_CUDA", request.param)
    return request.param


CUDA_SHAPES = [
    (1, 1, 1, 1, (1, 1)),
    (16, 8, 64, 64, (3, 3)),
    (3, 2, 4, 3, (2, 7)),
    (64, 16, 32, 4, (5, 5)),  # B·n = 1024
    (512, 16, 16, 2, (3, 3)),  # B·n = 8192
    (2, 2, 8, 4, (3, 3, 3)),
    (4, 8, 16, 2, (7, 5, 3)),
    (128, 16, 16, 2, (3, 3, 3)),  # B·n = 2048
    (1, 1, 1, 3001, (1, 1)),  # one column: the columns kernels split the output channels into ~1024 blocks
    (2, 4, 8, 1000, (3, 3)),  # columns: uneven last block of output channels
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["mixed", "large"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: _grouping_id(s[:4]) + "-" + _kernel_id(s[4]))
@requires_cuda
def test_cuda_matches_cpu(cuda_path, shape, kind, dtype):
    batch, groups, c_in, c_out, kernel = shape
    inputs = [t.to(dtype) for t in make_inputs(batch, groups, c_in, c_out, kernel, kind, seed=batch + groups)]
    grad_out = torch.randn((batch, c_out, c_in, *kernel), dtype=dtype, generator=torch.Generator().manual_seed(4))
    results = {}
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_() for t in inputs]
        out = compiled_op(*leaves)
        grads = torch.autograd.grad(out, leaves, grad_out.to(device))
        results[device] = [out.detach().cpu()] + [g.cpu() for g in grads]
    # Forward is the same per-element arithmetic (up to FMA contraction); backward reductions differ in order.
    tolerances = {torch.float64: (1e-12, 1e-12, 1e-10), torch.float32: (1e-5, 1e-5, 1e-4)}[dtype]
    for i, label in enumerate(["forward", "grad weight", "grad offsets", "grad scales"]):
        cpu, cuda = results["cpu"][i], results["cuda"][i]
        rtol = tolerances[0] if i == 0 else tolerances[2]
        atol = tolerances[1] if i == 0 else tolerances[2] * max(1.0, float(cpu.abs().max()))
        torch.testing.assert_close(cuda, cpu, rtol=rtol, atol=atol, msg=lambda m: f"{label}\n{m}")


@requires_cuda
def test_cuda_reference_matches_compiled(cuda_path):
    inputs = [t.cuda() for t in make_inputs(8, 4, 8, 4, (3, 3), "mixed")]
    tight(compiled_op(*inputs).cpu(), group_roll_reference(*inputs).cpu())


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
@requires_cuda
def test_cuda_gradcheck(cuda_path, case):
    inputs = gradcheck_inputs(**GRADCHECK_CASES[case], device="cuda")
    assert torch.autograd.gradcheck(compiled_op, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("shape", LOW_PRECISION_SHAPES, ids=lambda s: f"{len(s[4])}d-" + _kernel_id(s[4]))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@requires_cuda
def test_cuda_low_precision(cuda_path, dtype, shape):
    _check_low_precision(compiled_op, dtype, shape, device="cuda")


@requires_cuda
def test_cuda_opcheck(cuda_path):
    inputs = [t.cuda().requires_grad_() for t in make_inputs(2, 2, 4, 3, (3, 3), "mixed")]
    torch.library.opcheck(torch.ops.agi_monai.group_roll.default, tuple(inputs))


@requires_cuda
def test_cuda_very_many_groups(cuda_path):
    """B·n above 65535 (the CUDA grid's y limit): forward and backward still equal the CPU kernels."""
    batch, groups = 4400, 16  # B·n = 70400
    inputs = make_inputs(batch, groups, groups, 1, (1, 2), "mixed", seed=7)
    results = {}
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_() for t in inputs]
        out = compiled_op(*leaves)
        results[device] = [out.detach().cpu()] + [g.cpu() for g in torch.autograd.grad(out.square().sum(), leaves)]
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(cuda, cpu, rtol=1e-10, atol=1e-10)


@requires_cuda
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cuda_non_finite_offsets_give_nan_not_a_crash(cuda_path, bad):
    """On CUDA the finiteness check is skipped (it would synchronise): the bad group's kernels are NaN."""
    weight, offsets, scales = (t.cuda() for t in make_inputs(2, 2, 4, 3, (3, 3)))
    offsets[1, 0, 0] = bad
    out = compiled_op(weight, offsets, scales).cpu()
    assert torch.isnan(out[1, :, :2]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, :, 2:]).all()


@requires_cuda
def test_cuda_device_mismatch():
    weight, offsets, scales = make_inputs(2, 2, 4, 3, (3, 3))
    with pytest.raises(ValueError, match="must be on one device"):
        compiled_op(weight.cuda(), offsets, scales.cuda())
    with pytest.raises(ValueError, match="must be on one device"):
        group_roll_reference(weight.cuda(), offsets, scales.cuda())


@requires_cuda
def test_cuda_columns_backward_is_deterministic(monkeypatch):
    """The columns backward reduces in a fixed order (no atomics): two calls give the same bits."""
    monkeypatch.setenv("AGI_MONAI_GROUP_ROLL_CUDA", "columns")
    weight, offsets, scales = (t.float().cuda().requires_grad_() for t in make_inputs(16, 8, 64, 64, (3, 3), "mixed"))
    grad_out = torch.randn((16, 64, 64, 3, 3), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    runs = [torch.autograd.grad(compiled_op(weight, offsets, scales), (weight, offsets, scales), grad_out) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@requires_cuda
def test_cuda_path_variable_is_checked(monkeypatch):
    monkeypatch.setenv("AGI_MONAI_GROUP_ROLL_CUDA", "fastest")
    with pytest.raises(RuntimeError, match="AGI_MONAI_GROUP_ROLL_CUDA must be one of auto, taps, columns; got 'fastest'"):
        compiled_op(*(t.cuda() for t in make_inputs(1, 1, 1, 1, (3, 3))))
