"""The fused C kernels (``cbam_dsa._native``) equal plain PyTorch math, and the block gives the same results with
them, without them (``CBAM_DSA_NATIVE=0``) and on the reference path (``_fast_path = False``).

Expected values come from PyTorch itself: reductions and autograd in float64 on the same inputs. Ties in the maxima
are built in (inputs after a ReLU, small integers times a few dyadic channel weights, so that products are exact):
the kernels must split a max gradient evenly among them, as ``torch.amax`` does. The kernel tests skip where the
kernels cannot be built (no working C compiler, or ``CBAM_DSA_NATIVE=0``).
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from torch import Tensor

from cbam_dsa import CBAMResidualDynamicSA, _native
from cbam_dsa.ops.cpu import build
from helpers import TOLERANCES, randomize

DTYPES = [torch.float32, torch.float64]
KINDS = ["normal", "relu", "integers"]
# 1x1 maps, C = 1, B = 1, odd sizes, C not a multiple of 4, C > 32 (blocked channel sums: 32 + 32 + 6 channels,
# then four rows at a time and a remainder), H * W > 256 (several 256-pixel tiles), exactly one full tile.
SHAPES = [(1, 1, 1, 1), (2, 3, 1, 1), (1, 5, 3, 7), (2, 37, 5, 3), (1, 70, 17, 19), (2, 8, 16, 16)]
KERNEL_NAMES = (
    "pool_hw", "pool_c", "blend", "blend_grad", "pool_c_grad", "grad_x",
    "block_forward", "block_backward",
)  # fmt: skip


@pytest.fixture
def native() -> _native.Kernels:
    """The loaded kernels, or a skip where this machine cannot build them."""
    kernels = _native.kernels()
    if kernels is None:
        pytest.skip("fused kernels unavailable here (no working C compiler, or CBAM_DSA_NATIVE=0)")
    return kernels


@pytest.fixture
def kernel_calls(native: _native.Kernels, monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Counts the calls of each kernel wrapper, so a test can tell that the kernels really ran."""
    calls: collections.Counter = collections.Counter()
    for name in KERNEL_NAMES:
        original = getattr(_native.Kernels, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(_native.Kernels, name, spy)
    monkeypatch.setenv("CBAM_DSA_NATIVE", "1")
    return calls


# ----------------------------------------------------------------------------------------------------------
# Inputs and the float64 oracle.


def make_x(shape: tuple[int, ...], kind: str, dtype: torch.dtype, seed: int = 0) -> Tensor:
    """``normal`` values, ``relu`` features with all-zero channels and rows (ties in both maxima), or small
    ``integers`` (ties inside channels, and across channels with equal weights)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "relu":
        x = x.relu()
        x[:, ::2] = 0.0
        x[..., ::3, :] = 0.0
    elif kind == "integers":
        x = torch.randint(-2, 3, shape, generator=generator).to(torch.float64)
    return x.to(dtype)


def make_maps(shape: tuple[int, ...], kind: str, dtype: torch.dtype, seed: int = 1) -> tuple[Tensor, Tensor]:
    """``ca`` :math:`(B, C, 1, 1)` and ``sa`` :math:`(B, 1, H, W)` in (0, 1); for the tie kinds ``ca`` takes a few
    dyadic values, so ``x * ca`` is exact in both dtypes and equal products tie across channels."""
    b, c, h, w = shape
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        ca = 0.05 + 0.9 * torch.rand(b, c, 1, 1, generator=generator, dtype=torch.float64)
    else:
        ca = torch.randint(1, 4, (b, c, 1, 1), generator=generator).to(torch.float64) / 4
    sa = torch.rand(b, 1, h, w, generator=generator, dtype=torch.float64)
    return ca.to(dtype), sa.to(dtype)


def randn_like(t: Tensor, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype)


def float64_grads(loss_fn, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The gradients of ``loss_fn(*tensors)`` by autograd, in float64."""
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    return torch.autograd.grad(loss_fn(*leaves), leaves)


def blend_math(x: Tensor, ca: Tensor, sa: Tensor, alpha: float | None) -> Tensor:
    return x * ca * sa if alpha is None else (x * ca) * (alpha * sa) + (1 - alpha) * x


def assert_matches(got: Tensor, expected: Tensor, name: str = "") -> None:
    """``got`` (in its own dtype) equals the float64 ``expected`` within the tolerance of ``got``'s dtype."""
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        got, expected.to(got.dtype), **TOLERANCES[got.dtype], msg=lambda m: f"{name}: {m}" if name else m
    )


# ----------------------------------------------------------------------------------------------------------
# Each kernel against the plain math: forward.


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pool_hw_is_mean_and_amax_over_space(native, shape, kind, dtype):
    x = make_x(shape, kind, dtype)
    mean, top = native.pool_hw(x)
    assert mean.dtype == top.dtype == dtype
    assert torch.equal(top, x.amax(dim=(2, 3), keepdim=True))
    assert_matches(mean, x.double().mean(dim=(2, 3), keepdim=True), "mean")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pool_c_is_mean_and_amax_over_channels_of_x_times_ca(native, shape, kind, dtype):
    x = make_x(shape, kind, dtype)
    ca, _ = make_maps(shape, kind, dtype)
    s = native.pool_c(x, ca)
    assert s.shape == (shape[0], 2, *shape[2:]) and s.dtype == dtype
    assert torch.equal(s[:, 1:2], (x * ca).amax(dim=1, keepdim=True))
    assert_matches(s[:, 0:1], (x.double() * ca.double()).mean(dim=1, keepdim=True), "mean")


@pytest.mark.parametrize("alpha", [None, 1.0, 0.3, -0.5])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_blend(native, shape, kind, dtype, alpha):
    x = make_x(shape, kind, dtype)
    ca, sa = make_maps(shape, kind, dtype)
    out = native.blend(x, ca, sa, alpha)
    assert out.dtype == dtype and out.data_ptr() != x.data_ptr()
    assert_matches(out, blend_math(x.double(), ca.double(), sa.double(), alpha))


def test_wrappers_accept_non_contiguous_maps(native):
    x = make_x((2, 6, 5, 4), "normal", torch.float64)
    ca, sa = make_maps((2, 6, 5, 4), "normal", torch.float64)
    ca_strided = ca.view(2, 6).t().contiguous().t().view(2, 6, 1, 1)  # same values, column-major storage
    sa_strided = sa.transpose(2, 3).contiguous().transpose(2, 3)
    assert not ca_strided.is_contiguous() and not sa_strided.is_contiguous()
    torch.testing.assert_close(native.pool_c(x, ca_strided), native.pool_c(x, ca), rtol=0, atol=0)
    torch.testing.assert_close(native.blend(x, ca_strided, sa_strided, 0.4), native.blend(x, ca, sa, 0.4))


# ----------------------------------------------------------------------------------------------------------
# NaN and infinities in the maxima: as torch.amax (a NaN anywhere in a pooled set gives NaN).


def _special_planes(dtype: torch.dtype) -> Tensor:
    """Planes of 300 pixels (two tiles) holding NaN or infinities at the first, a middle and the last pixel."""
    nan, inf = math.nan, math.inf
    x = make_x((1, 10, 15, 20), "normal", torch.float64).view(10, 300)
    x[0, 0] = nan
    x[1, 157] = nan
    x[2, 299] = nan
    x[3, 40] = inf
    x[4] = -inf  # all -inf: the max is -inf, not the lowest finite value
    x[5, 10], x[5, 290] = inf, -inf  # the mean is NaN, the max +inf
    x[6, 299] = -inf
    x[7, :] = nan
    x[8, 100], x[8, 101] = nan, inf
    return x.view(1, 10, 15, 20).to(dtype)  # plane 9 stays finite


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_hw_propagates_nan_and_handles_infinities(native, dtype):
    x = _special_planes(dtype)
    mean, top = native.pool_hw(x)
    torch.testing.assert_close(top, x.amax(dim=(2, 3), keepdim=True), rtol=0, atol=0, equal_nan=True)
    expected_mean = x.double().mean(dim=(2, 3), keepdim=True).to(dtype)
    torch.testing.assert_close(mean, expected_mean, **TOLERANCES[dtype], equal_nan=True)


@pytest.mark.parametrize("gate_zero", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_c_propagates_nan_and_handles_infinities(native, dtype, gate_zero):
    # 37 channels: a NaN or an infinity in the first channel, in a four-row group, in the remainder of a block.
    nan, inf = math.nan, math.inf
    x = make_x((2, 37, 18, 17), "normal", torch.float64)
    x[0, 0, 0, 0] = nan
    x[0, 17, 5, 5] = nan
    x[0, 36, 17, 16] = nan
    x[0, :, 9, 9] = nan
    x[1, 3, 0, 1] = inf
    x[1, :, 2, 2] = -inf
    x[1, 5, 4, 4], x[1, 33, 4, 4] = inf, -inf
    x[1, 35, 16, 3] = -inf
    x = x.to(dtype)
    ca, _ = make_maps(x.shape, "normal", dtype)
    if gate_zero:  # a hard gate can close a channel: 0 * inf is NaN, and must show in the max
        ca[1, 3] = 0.0
    s = native.pool_c(x, ca)
    y = x * ca
    torch.testing.assert_close(s[:, 1:2], y.amax(dim=1, keepdim=True), rtol=0, atol=0, equal_nan=True)
    expected_mean = (x.double() * ca.double()).mean(dim=1, keepdim=True).to(dtype)
    torch.testing.assert_close(s[:, 0:1], expected_mean, **TOLERANCES[dtype], equal_nan=True)
    assert s[1, 1, 0, 1].isnan() == gate_zero


@pytest.mark.parametrize("term", ["pool_hw", "pool_c"])
def test_max_gradient_of_a_nan_maximum_is_nan_like_amax(native, term):
    x = make_x((1, 4, 3, 3), "normal", torch.float64)
    x[0, 1, 1, 1] = math.nan
    gmax = torch.ones(1, 4, 1, 1, dtype=torch.float64) if term == "pool_hw" else torch.ones(1, 1, 3, 3).double()
    ca = torch.full((1, 4, 1, 1), 0.5, dtype=torch.float64)
    if term == "pool_hw":
        (expected,) = float64_grads(lambda v: (v.amax(dim=(2, 3), keepdim=True) * gmax).sum(), x)
        zero = torch.zeros_like(gmax)
        got = native.grad_x(x, None, None, None, (zero, gmax, x.amax(dim=(2, 3), keepdim=True)), None)
    else:
        (expected,) = float64_grads(lambda v: ((v * ca).amax(dim=1, keepdim=True) * gmax).sum(), x)
        smax = (x * ca).amax(dim=1, keepdim=True)
        zero = torch.zeros_like(smax)
        coef, _ = native.pool_c_grad(x, ca, smax, zero, gmax)
        got = native.grad_x(x, ca, None, (zero, coef, smax), None, None)
    torch.testing.assert_close(got, expected, equal_nan=True)


# ----------------------------------------------------------------------------------------------------------
# Each kernel against the plain math: backward, ties split evenly as torch.amax does.


@pytest.mark.parametrize("plain_sum", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_blend_grad_gives_the_blend_gradients(native, shape, kind, dtype, plain_sum):
    x = make_x(shape, kind, dtype)
    ca, sa = make_maps(shape, kind, dtype)
    g = randn_like(x, seed=5)
    alpha = 0.3
    grad_ca, grad_sa, grad_alpha = float64_grads(
        lambda c, s, a: (blend_math(x.double(), c, s, a) * g.double()).sum(),
        ca,
        sa,
        torch.tensor(alpha, dtype=torch.float64),
    )
    results = native.blend_grad(g, x, ca, sa, plain_sum)
    assert len(results) == (3 if plain_sum else 2)
    by_ca, by_sa = results[:2]
    assert_matches(by_ca * alpha, grad_sa, "sum_c g * x * ca")
    assert_matches(by_sa * alpha, grad_ca, "sum_hw g * x * sa")
    if plain_sum:
        assert_matches(results[2], (g.double() * x.double()).sum(dim=(2, 3), keepdim=True), "sum_hw g * x")
        assert_matches((ca * by_sa).sum() - results[2].sum(), grad_alpha, "grad alpha")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pool_c_grad_and_its_term_of_grad_x(native, shape, kind, dtype):
    b, c, h, w = shape
    x = make_x(shape, kind, dtype)
    ca, _ = make_maps(shape, kind, dtype)
    gmean, gmax = (
        randn_like(torch.empty(b, 1, h, w, dtype=dtype), 6),
        randn_like(torch.empty(b, 1, h, w, dtype=dtype), 7),
    )

    def loss(v, cv):
        y = v * cv
        return (y.mean(dim=1, keepdim=True) * gmean.double()).sum() + (
            y.amax(dim=1, keepdim=True) * gmax.double()
        ).sum()

    expected_x, expected_ca = float64_grads(loss, x, ca)
    y = x * ca
    smax = y.amax(dim=1, keepdim=True)
    cmean = gmean / c
    coef, grad_ca = native.pool_c_grad(x, ca, smax, cmean, gmax)
    ties = (y == smax).sum(dim=1, keepdim=True).to(dtype)
    assert_matches(coef, gmax.double() / ties.double(), "coef")
    assert_matches(grad_ca, expected_ca, "grad ca")
    assert_matches(native.grad_x(x, ca, None, (cmean, coef, smax), None, None), expected_x, "grad x")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_x_pool_hw_term(native, shape, kind, dtype):
    b, c, h, w = shape
    x = make_x(shape, kind, dtype)
    if kind != "normal":
        assert (x == x.amax(dim=(2, 3), keepdim=True)).sum() > b * c or h * w == 1  # ties present
    hmean, hmax = (
        randn_like(torch.empty(b, c, 1, 1, dtype=dtype), 8),
        randn_like(torch.empty(b, c, 1, 1, dtype=dtype), 9),
    )
    (expected,) = float64_grads(
        lambda v: (
            (v.mean(dim=(2, 3), keepdim=True) * hmean.double()).sum()
            + (v.amax(dim=(2, 3), keepdim=True) * hmax.double()).sum()
        ),
        x,
    )
    at = x.amax(dim=(2, 3), keepdim=True)
    got = native.grad_x(x, None, None, None, (hmean / (h * w), hmax, at), None)
    assert_matches(got, expected)


@pytest.mark.parametrize("alpha", [None, 0.3])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_x_blend_term(native, shape, kind, dtype, alpha):
    x = make_x(shape, kind, dtype)
    ca, sa = make_maps(shape, kind, dtype)
    g = randn_like(x, seed=5)
    (expected,) = float64_grads(lambda v: (blend_math(v, ca.double(), sa.double(), alpha) * g.double()).sum(), x)
    assert_matches(native.grad_x(x, ca, (g, sa, alpha), None, None, None), expected)


TERMS = ("blend", "pool_c", "pool_hw", "base")
TERM_SETS = [subset for n in range(1, 5) for subset in itertools.combinations(TERMS, n)]


@pytest.mark.parametrize("alpha", [None, 0.6])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("terms", TERM_SETS, ids="+".join)
@pytest.mark.parametrize(("shape", "kind"), [((2, 37, 5, 3), "integers"), ((1, 34, 17, 19), "relu")])
def test_grad_x_sums_any_set_of_terms(native, shape, kind, terms, dtype, alpha):
    b, c, h, w = shape
    x = make_x(shape, kind, dtype)
    ca, sa = make_maps(shape, kind, dtype)
    g, base = randn_like(x, 5), randn_like(x, 10)
    pixels, planes = torch.empty(b, 1, h, w, dtype=dtype), torch.empty(b, c, 1, 1, dtype=dtype)
    gmean, gmax, hmean, hmax = (
        randn_like(pixels, 6),
        randn_like(pixels, 7),
        randn_like(planes, 8),
        randn_like(planes, 9),
    )

    def loss(v):
        total = (v * base.double()).sum() if "base" in terms else v.sum() * 0
        if "blend" in terms:
            total = total + (blend_math(v, ca.double(), sa.double(), alpha) * g.double()).sum()
        if "pool_c" in terms:
            y = v * ca.double()
            total = total + (y.mean(dim=1, keepdim=True) * gmean.double()).sum()
            total = total + (y.amax(dim=1, keepdim=True) * gmax.double()).sum()
        if "pool_hw" in terms:
            total = total + (v.mean(dim=(2, 3), keepdim=True) * hmean.double()).sum()
            total = total + (v.amax(dim=(2, 3), keepdim=True) * hmax.double()).sum()
        return total

    (expected,) = float64_grads(loss, x)
    pool_c = None
    if "pool_c" in terms:
        smax = (x * ca).amax(dim=1, keepdim=True)
        coef, _ = native.pool_c_grad(x, ca, smax, gmean / c, gmax)
        pool_c = (gmean / c, coef, smax)
    got = native.grad_x(
        x,
        ca if {"blend", "pool_c"} & set(terms) else None,
        (g, sa, alpha) if "blend" in terms else None,
        pool_c,
        (hmean / (h * w), hmax, x.amax(dim=(2, 3), keepdim=True)) if "pool_hw" in terms else None,
        base if "base" in terms else None,
    )
    assert got.data_ptr() != base.data_ptr()
    assert_matches(got, expected)


# ----------------------------------------------------------------------------------------------------------
# The whole block: kernels on, kernels off, and the reference path agree.


CONFIGS = {
    "default": {},
    "alpha_0.3_learnable": {"alpha_init": 0.3, "learnable_alpha": True},
    "alpha_0.6_fixed": {"alpha_init": 0.6},
    "no_residual": {"residual": False},
    "hardsigmoid": {"ca_gate": "hardsigmoid", "sa_gate": "hardsigmoid"},
    "fusion_sum": {"ca_fusion": "sum"},
    "learnable_temperature": {"learnable_temperature": True, "ca_temperature": 0.7, "sa_temperature": 1.5},
    "kernels_3_no_dilated": {"sa_kernels": (3,), "sa_use_dilated": False},
    "kernels_5_dilated_3": {"sa_kernels": (5,), "sa_dilated_d": 3},
}


def make_block(config: str, channels: int, dtype: torch.dtype) -> CBAMResidualDynamicSA:
    block = CBAMResidualDynamicSA(channels, min_hidden=2, return_maps=True, dtype=dtype, **CONFIGS[config])
    return randomize(block)


def run_block(block: CBAMResidualDynamicSA, x: Tensor, x_requires_grad: bool = True):
    """``(outputs, grad_x, {name: grad})`` of one forward and backward; every output carries a random weight."""
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x_requires_grad)
    outputs = block(x)
    generator = torch.Generator().manual_seed(2)
    loss = sum(
        (out * torch.randn(out.shape, generator=generator).to(out)).sum() for out in outputs if out.requires_grad
    )
    loss.backward()
    return [out.detach() for out in outputs], x.grad, {name: p.grad for name, p in block.named_parameters()}


def assert_runs_agree(got, expected, dtype: torch.dtype, label: str) -> None:
    tolerance = TOLERANCES[dtype]
    for name, a, b in zip(("out", "ca", "sa", "fusion_w", "router_w"), got[0], expected[0], strict=True):
        torch.testing.assert_close(a, b, **tolerance, msg=lambda m, n=name: f"{label}, {n}: {m}")
    if expected[1] is None:
        assert got[1] is None, label
    else:
        torch.testing.assert_close(got[1], expected[1], **tolerance, msg=lambda m: f"{label}, grad x: {m}")
    assert got[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        if grad is None:
            assert got[2][name] is None, f"{label}, {name}"
        else:
            torch.testing.assert_close(got[2][name], grad, **tolerance, msg=lambda m, n=name: f"{label}, {n}: {m}")


def three_paths(block, x, monkeypatch, kernel_calls, x_requires_grad=True):
    """The block run with the kernels, with ``CBAM_DSA_NATIVE=0``, and on the reference path."""
    monkeypatch.setenv("CBAM_DSA_NATIVE", "1")
    block._fast_path = True
    native_run = run_block(block, x, x_requires_grad)
    used = sum(kernel_calls.values())
    assert kernel_calls["pool_hw"] and kernel_calls["pool_c"] and kernel_calls["blend"], dict(kernel_calls)
    assert kernel_calls["blend_grad"] and kernel_calls["pool_c_grad"], dict(kernel_calls)
    assert bool(kernel_calls["grad_x"]) == x_requires_grad, dict(kernel_calls)
    monkeypatch.setenv("CBAM_DSA_NATIVE", "0")
    torch_run = run_block(block, x, x_requires_grad)
    assert sum(kernel_calls.values()) == used, "CBAM_DSA_NATIVE=0 must turn the kernels off"
    monkeypatch.setenv("CBAM_DSA_NATIVE", "1")
    block._fast_path = False
    reference_run = run_block(block, x, x_requires_grad)
    block._fast_path = True
    return native_run, torch_run, reference_run


@pytest.mark.parametrize("kind", ["normal", "relu"])
@pytest.mark.parametrize("size", [(7, 7), (28, 28), (9, 13)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_block_with_and_without_kernels_equals_reference(config, dtype, size, kind, monkeypatch, kernel_calls):
    block = make_block(config, 37, dtype)
    x = make_x((2, 37, *size), kind, dtype)
    native_run, torch_run, reference_run = three_paths(block, x, monkeypatch, kernel_calls)
    assert_runs_agree(native_run, reference_run, dtype, "kernels vs reference")
    assert_runs_agree(torch_run, reference_run, dtype, "CBAM_DSA_NATIVE=0 vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ["default", "alpha_0.3_learnable", "no_residual", "learnable_temperature"])
def test_frozen_input_trains_the_parameters_alike(config, dtype, monkeypatch, kernel_calls):
    block = make_block(config, 37, dtype)
    x = make_x((2, 37, 9, 13), "relu", dtype)
    native_run, torch_run, reference_run = three_paths(block, x, monkeypatch, kernel_calls, x_requires_grad=False)
    assert native_run[1] is None
    assert_runs_agree(native_run, reference_run, dtype, "kernels vs reference")
    assert_runs_agree(torch_run, reference_run, dtype, "CBAM_DSA_NATIVE=0 vs reference")


# ----------------------------------------------------------------------------------------------------------
# Deferred terms of x's gradient stay within their own backward pass.


def _weighted(t: Tensor, seed: int) -> Tensor:
    return (t * randn_like(t, seed)).sum()


FIRST_PASSES = {
    "out_to_branch_weight": lambda block, outs: [block.sa.branches[0].weight],
    "out_to_router": lambda block, outs: [block.sa.router[0].weight],
    "out_to_sa": lambda block, outs: [outs[2]],
    "out_to_ca": lambda block, outs: [outs[1]],
}
SECOND_PASSES = {"ca": 1, "sa": 2, "out": 0}


@pytest.mark.parametrize("second", list(SECOND_PASSES))
@pytest.mark.parametrize("first", list(FIRST_PASSES))
def test_partial_backward_does_not_leak_into_the_next(first, second, kernel_calls):
    block = make_block("alpha_0.3_learnable", 12, torch.float64)
    x0 = make_x((2, 12, 9, 13), "relu", torch.float64)
    results = {}
    for fast in (True, False):
        block._fast_path = fast
        x = x0.clone().requires_grad_()
        outs = block(x)
        torch.autograd.grad(_weighted(outs[0], 3), FIRST_PASSES[first](block, outs), retain_graph=True)
        before = kernel_calls["grad_x"]
        (results[fast],) = torch.autograd.grad(_weighted(outs[SECOND_PASSES[second]], 4), x)
        if fast:
            assert kernel_calls["grad_x"] > before, "the second pass must run on the kernels"
    torch.testing.assert_close(results[True], results[False], **TOLERANCES[torch.float64])


def test_backward_twice_with_retain_graph_gives_the_same_gradients(kernel_calls):
    block = make_block("alpha_0.3_learnable", 37, torch.float32)
    x0 = make_x((2, 37, 9, 13), "relu", torch.float32)
    params = list(block.parameters())
    results = {}
    for fast in (True, False):
        block._fast_path = fast
        x = x0.clone().requires_grad_()
        loss = sum(_weighted(out, 3 + i) for i, out in enumerate(block(x)))
        first = torch.autograd.grad(loss, [x, *params], retain_graph=True)
        second = torch.autograd.grad(loss, [x, *params])
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)
        results[fast] = first
    assert kernel_calls["grad_x"] == 2
    for got, expected in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("kind", ["normal", "relu"])
@pytest.mark.parametrize("config", ["default", "alpha_0.3_learnable", "no_residual"])
def test_double_backward_matches_the_reference(config, kind, kernel_calls):
    block = make_block(config, 12, torch.float64)
    x0 = make_x((2, 12, 9, 13), kind, torch.float64)
    params = list(block.parameters())
    results = {}
    for fast in (True, False):
        block._fast_path = fast
        x = x0.clone().requires_grad_()
        outs = block(x)
        (grad_x,) = torch.autograd.grad(_weighted(outs[0], 3), x, create_graph=True)
        results[fast] = torch.autograd.grad(_weighted(grad_x, 4), [x, *params], allow_unused=True)
    assert kernel_calls["pool_hw"] == 1  # the fast forward ran on the kernels
    for got, expected in zip(results[True], results[False], strict=True):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_matches_the_reference(use_reentrant, kernel_calls):
    block = make_block("alpha_0.3_learnable", 12, torch.float64)
    block.return_maps = False
    x0 = make_x((2, 12, 9, 13), "relu", torch.float64)
    results = {}
    for fast in (True, False):
        block._fast_path = fast
        block.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=use_reentrant) if fast else block(x)
        _weighted(out, 3).backward()  # reentrant checkpointing supports backward() only, not autograd.grad
        results[fast] = [x.grad, *(p.grad for p in block.parameters())]
    assert kernel_calls["block_backward"] == 1
    for got, expected in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.float64])


# ----------------------------------------------------------------------------------------------------------
# Determinism and safety.


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_mode_gives_bitwise_equal_runs(dtype, kernel_calls, deterministic):
    block = make_block("alpha_0.3_learnable", 37, dtype)
    x = make_x((2, 37, 28, 28), "relu", dtype)
    first = run_block(block, x)
    second = run_block(block, x)
    assert kernel_calls["grad_x"] == 2
    for a, b in zip(first[0], second[0], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first[1], second[1])
    for name, grad in first[2].items():
        assert torch.equal(grad, second[2][name]), name


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("config", ["default", "alpha_0.3_learnable", "alpha_0.6_fixed", "no_residual"])
def test_the_callers_tensors_are_never_modified(config, requires_grad, kernel_calls):
    block = make_block(config, 37, torch.float32)
    block.return_maps = False
    x = make_x((2, 37, 9, 13), "relu", torch.float32).requires_grad_(requires_grad)
    x_before, x_version = x.detach().clone(), x._version
    out = block(x)
    assert out.data_ptr() != x.data_ptr()
    grad_out = randn_like(out, 3)
    g_before, g_version = grad_out.clone(), grad_out._version
    out.backward(grad_out)
    assert kernel_calls["block_forward"] == 1 and kernel_calls["block_backward"] == 1  # the fused block
    assert torch.equal(x.detach(), x_before) and x._version == x_version
    assert torch.equal(grad_out, g_before) and grad_out._version == g_version
    if requires_grad:
        assert x.grad.data_ptr() not in (x.data_ptr(), grad_out.data_ptr())


# ----------------------------------------------------------------------------------------------------------
# Loading: the switch, failing compilers, the cache.


def test_the_switch_is_read_at_each_call(native, monkeypatch):
    x = torch.randn(1, 2, 3, 3)
    monkeypatch.setenv("CBAM_DSA_NATIVE", "0")
    assert _native.kernels() is None and not _native.supports(x)
    monkeypatch.setenv("CBAM_DSA_NATIVE", "1")
    assert _native.kernels() is native and _native.supports(x)
    assert not _native.supports(x.half()) and not _native.supports(x.transpose(2, 3))


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """A state with nothing loaded and an empty cache folder; the real state comes back after the test."""
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setenv("CBAM_DSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CBAM_DSA_NATIVE", "1")
    return tmp_path / "cache"


def _script(path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


BROKEN_COMPILERS = {
    "exits_1": lambda tmp: _script(tmp / "cc-exit", "exit 1\n"),
    "false": lambda tmp: "false",
    "writes_nothing": lambda tmp: "true",
    "writes_junk": lambda tmp: _script(
        tmp / "cc-junk", 'while [ $# -gt 0 ]; do [ "$1" = -o ] && echo junk > "$2"; shift; done\nexit 0\n'
    ),
    "missing": lambda tmp: str(tmp / "no-such-compiler"),
}


@pytest.mark.parametrize("compiler", list(BROKEN_COMPILERS))
def test_a_broken_compiler_falls_back_to_pytorch(compiler, fresh_load, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", BROKEN_COMPILERS[compiler](tmp_path))
    assert _native.kernels() is None
    assert _native.kernels() is None  # the failure is remembered, not retried
    x = make_x((2, 6, 5, 7), "relu", torch.float64)
    assert not _native.supports(x)
    block = make_block("alpha_0.3_learnable", 6, torch.float64)
    fast = run_block(block, x)
    block._fast_path = False
    assert_runs_agree(fast, run_block(block, x), torch.float64, f"CC={compiler} vs reference")


@pytest.mark.slow
def test_a_second_load_reuses_the_cached_library(native, fresh_load, monkeypatch):
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    first = _native.kernels()
    assert first is not None
    libraries = sorted(fresh_load.glob("kernels-*.so"))
    assert len(libraries) == 1
    commands = []
    real_run = subprocess.run

    def no_compiling(command, *args, **kwargs):
        commands.append(list(command))
        if "--version" not in command:
            raise subprocess.CalledProcessError(1, command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(build.subprocess, "run", no_compiling)
    monkeypatch.setattr(build, "_state", {})
    second = _native.kernels()
    assert second is not None and second is not first
    assert all("--version" in command for command in commands), commands
    assert sorted(fresh_load.glob("kernels-*.so")) == libraries
    x = make_x((2, 5, 4, 3), "normal", torch.float32)
    for got, expected in zip(second.pool_hw(x), native.pool_hw(x), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.slow
def test_a_damaged_cached_library_is_built_again(native, fresh_load):
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    assert _native.kernels() is not None
    (library,) = fresh_load.glob("kernels-*.so")
    library.unlink()  # a new file: the library this process loaded must stay intact
    library.write_bytes(b"not a shared library")
    # a fresh process (this one would reuse its loaded copy by name)
    code = "from cbam_dsa import _native; import sys; sys.exit(0 if _native.kernels() is not None else 1)"
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy(), timeout=300)
    assert library.read_bytes()[:4] == b"\x7fELF"
