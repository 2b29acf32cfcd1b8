"""The whole block as one Function on the fused kernels (``cbam_dsa._fused``) equals the reference path.

Where the kernels run and the block returns its output only, the fast path is one :class:`FusedBlock` with a
hand-written backward. Every output and gradient must match the reference (``_fast_path = False``), in every
configuration, with ties in both max pools, on maps on both sides of ``KEEP_POOLS_FROM_PIXELS``.
"""

from __future__ import annotations

import unittest.mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from cbam_dsa import CBAMResidualDynamicSA, _fused, _native, bench
from helpers import TOLERANCES, randomize

DTYPES = [torch.float32, torch.float64]
CONFIGS = {
    "default": {},
    "alpha_0.3_learnable": {"alpha_init": 0.3, "learnable_alpha": True},
    "alpha_0_learnable": {"alpha_init": 0.0, "learnable_alpha": True},
    "alpha_0.6_fixed": {"alpha_init": 0.6},
    "no_residual": {"residual": False},
    "hardsigmoid": {"ca_gate": "hardsigmoid", "sa_gate": "hardsigmoid"},
    "fusion_sum": {"ca_fusion": "sum"},
    "silu": {"ca_act": "silu"},
    "learnable_temperature": {"learnable_temperature": True, "ca_temperature": 0.7, "sa_temperature": 1.5},
    "one_branch_no_router": {"sa_kernels": (3,), "sa_use_dilated": False},
    "kernels_1_5_dilated_3": {"sa_kernels": (1, 5), "sa_dilated_d": 3},
}


@pytest.fixture(autouse=True)
def _kernels() -> None:
    if _native.kernels() is None:
        pytest.skip("fused kernels unavailable here (no working C compiler, or CBAM_DSA_NATIVE=0)")


def make_x(shape: tuple[int, ...], kind: str, dtype: torch.dtype) -> Tensor:
    """``normal`` values, or ``relu`` features with all-zero channels and rows (ties in both max pools)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if kind == "relu":
        x = x.relu()
        x[:, ::2] = 0.0
        x[..., ::3, :] = 0.0
    return x.to(dtype)


def run(block: CBAMResidualDynamicSA, x: Tensor, fast: bool, x_requires_grad: bool = True):
    """``(out, grad_x, {name: grad})`` of one forward and backward on the chosen path."""
    block._fast_path = fast
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x_requires_grad)
    out = block(x)
    if fast:
        assert type(out.grad_fn).__name__ == "FusedBlockBackward", "the fused Function must run"
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(out)
    (out * weight).sum().backward()
    return out.detach(), x.grad, {name: p.grad for name, p in block.named_parameters()}


def assert_same(got, expected, tolerance: dict) -> None:
    torch.testing.assert_close(got[0], expected[0], **tolerance, msg=lambda m: f"out: {m}")
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1], **tolerance, msg=lambda m: f"grad x: {m}")
    assert got[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        if grad is None:
            assert got[2][name] is None, name
        else:
            assert got[2][name].dtype == grad.dtype and got[2][name].shape == grad.shape, name
            torch.testing.assert_close(got[2][name], grad, **tolerance, msg=lambda m, n=name: f"grad {n}: {m}")


def assert_paths_agree(block: CBAMResidualDynamicSA, x: Tensor, x_requires_grad: bool = True) -> None:
    tolerance = TOLERANCES[x.dtype]
    assert_same(run(block, x, True, x_requires_grad), run(block, x, False, x_requires_grad), tolerance)


# ----------------------------------------------------------------------------------------------------------
# Equality with the reference.


@pytest.fixture(params=["per_sample", "whole_batch"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the kernels split the work: one sample per thread, or each stage over the whole batch."""
    monkeypatch.setattr(_native, "one_sample_per_thread", lambda *args: request.param == "per_sample")
    return request.param


@pytest.mark.parametrize("kind", ["normal", "relu"])
@pytest.mark.parametrize("size", [(1, 1), (7, 7), (9, 13)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fused_block_equals_reference(config, dtype, size, kind, mode):
    block = randomize(CBAMResidualDynamicSA(37, min_hidden=2, dtype=dtype, **CONFIGS[config]))
    assert_paths_agree(block, make_x((2, 37, *size), kind, dtype))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_every_split_of_the_batch_over_threads_equals_reference(batch, threads, mode):
    block = randomize(CBAMResidualDynamicSA(40, min_hidden=2, learnable_alpha=True, alpha_init=0.4))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_paths_agree(block, make_x((batch, 40, 9, 13), "relu", torch.float32))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("batch", "pixels", "hidden", "threads", "expected"),
    [(8, 1600, 16, 2, True), (8, 25, 128, 2, False), (1, 1600, 16, 2, False), (2, 64, 32, 2, True),
     (2, 63, 32, 2, False), (3, 1600, 16, 4, False)],
)  # fmt: skip
def test_one_sample_per_thread_where_the_batch_fills_the_threads_and_maps_outweigh_the_mlp(
    batch, pixels, hidden, threads, expected
):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _native.one_sample_per_thread(batch, pixels, hidden) is expected
    finally:
        torch.set_num_threads(before)


def test_both_sides_of_the_pools_threshold_are_covered():
    assert 7 * 7 < _fused.KEEP_POOLS_FROM_PIXELS <= 9 * 13


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 9),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    fusion=st.sampled_from(["sum", "softmax"]),
    gates=st.tuples(st.sampled_from(["sigmoid", "hardsigmoid"]), st.sampled_from(["sigmoid", "hardsigmoid"])),
    act=st.sampled_from(["relu", "silu"]),
    temperatures=st.tuples(st.floats(0.3, 3.0), st.floats(0.3, 3.0)),
    learnable_temperature=st.booleans(),
    kernels=st.lists(st.sampled_from([1, 3, 5, 7]), max_size=3),
    dilated=st.tuples(st.booleans(), st.sampled_from([3, 5, 7]), st.integers(1, 3)),
    residual=st.booleans(),
    alpha=st.tuples(st.sampled_from([1.0, 0.0, 0.4, -0.5]), st.booleans()),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["normal", "relu"]),
    per_sample=st.booleans(),
)
def test_property_fused_equals_reference(
    batch, channels, height, width, fusion, gates, act, temperatures, learnable_temperature, kernels, dilated,
    residual, alpha, dtype, kind, per_sample,
):  # fmt: skip
    use_dilated, dilated_kernel, dilated_d = dilated
    if not kernels and not use_dilated:
        use_dilated = True
    block = CBAMResidualDynamicSA(
        channels,
        min_hidden=2,
        ca_fusion=fusion,
        ca_gate=gates[0],
        sa_gate=gates[1],
        ca_act=act,
        ca_temperature=temperatures[0],
        sa_temperature=temperatures[1],
        learnable_temperature=learnable_temperature,
        sa_kernels=tuple(kernels),
        sa_use_dilated=use_dilated,
        sa_dilated_kernel=dilated_kernel,
        sa_dilated_d=dilated_d,
        residual=residual,
        alpha_init=alpha[0] if residual else 1.0,
        learnable_alpha=alpha[1] and residual,
        dtype=dtype,
    )
    with unittest.mock.patch.object(_native, "one_sample_per_thread", lambda *args: per_sample):
        assert_paths_agree(randomize(block, 0.3), make_x((batch, channels, height, width), kind, dtype))


# ----------------------------------------------------------------------------------------------------------
# What needs a gradient, and what does not.


@pytest.mark.parametrize("size", [(7, 7), (9, 13)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_input_without_grad_still_trains_the_parameters(dtype, size, mode):
    block = randomize(CBAMResidualDynamicSA(37, min_hidden=2, learnable_alpha=True, alpha_init=0.5, dtype=dtype))
    assert_paths_agree(block, make_x((2, 37, *size), "relu", dtype), x_requires_grad=False)


@pytest.mark.parametrize("frozen", ["ca", "sa", "alpha_and_router"])
def test_frozen_parts_get_no_gradient_and_the_rest_matches(frozen):
    block = randomize(CBAMResidualDynamicSA(12, min_hidden=2, learnable_alpha=True, learnable_temperature=True))
    block = block.double()
    parts = {"ca": [block.ca], "sa": [block.sa], "alpha_and_router": [block.sa.router]}[frozen]
    for part in parts:
        part.requires_grad_(False)
    if frozen == "alpha_and_router":
        block.alpha.requires_grad_(False)
    got = run(block, make_x((2, 12, 9, 13), "relu", torch.float64), True)
    for name, parameter in block.named_parameters():
        assert (got[2][name] is None) == (not parameter.requires_grad), name
    assert_same(got, run(block, make_x((2, 12, 9, 13), "relu", torch.float64), False), TOLERANCES[torch.float64])


def test_float64_input_with_float32_parameters_gives_float32_gradients():
    block = randomize(CBAMResidualDynamicSA(12, min_hidden=2, learnable_alpha=True, alpha_init=0.5))
    assert_same(
        run(block, make_x((2, 12, 9, 13), "normal", torch.float64), True),
        run(block, make_x((2, 12, 9, 13), "normal", torch.float64), False),
        TOLERANCES[torch.float32],
    )


class _Scale(torch.nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        return 1.5 * weight


@pytest.mark.parametrize("where", ["fc1", "branch_kernel", "router"])
def test_parametrized_weights_are_read_through_the_parametrization(where):
    """The fused path reads parameters from the modules' dicts, and parametrized ones through their property."""
    block = randomize(CBAMResidualDynamicSA(12, min_hidden=2)).double()
    module = {"fc1": block.ca.fc1, "branch_kernel": block.sa.branches[1], "router": block.sa.router[0]}[where]
    torch.nn.utils.parametrize.register_parametrization(module, "weight", _Scale())
    x = make_x((2, 12, 9, 13), "relu", torch.float64)
    got, expected = run(block, x, True), run(block, x, False)
    assert_same(got, expected, TOLERANCES[torch.float64])
    assert any(name.endswith("parametrizations.weight.original") for name in got[2])
    with torch.nn.utils.parametrize.cached(), torch.no_grad():
        plain = module.weight
    torch.nn.utils.parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    with torch.no_grad():
        unscaled = block(x)  # the parametrization did change the output: this is not the same block
    assert not torch.allclose(unscaled, got[0]) and torch.equal(plain, 1.5 * module.weight)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_inference_equals_reference(mode):
    block = randomize(CBAMResidualDynamicSA(37, min_hidden=2))
    x = make_x((2, 37, 9, 13), "relu", torch.float32)
    expected = block._reference_forward(x).detach()
    if mode == "frozen":
        block.requires_grad_(False)
        got = block(x)
        assert got.grad_fn is None
    else:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            got = block(x)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


# ----------------------------------------------------------------------------------------------------------
# Autograd features.


@pytest.mark.parametrize("config", ["default", "alpha_0.3_learnable", "learnable_temperature", "one_branch_no_router"])
def test_double_backward_matches_the_reference(config):
    block = randomize(CBAMResidualDynamicSA(12, min_hidden=2, dtype=torch.float64, **CONFIGS[config]))
    x0 = make_x((2, 12, 9, 13), "normal", torch.float64)
    params = list(block.parameters())
    results = {}
    for fast in (True, False):
        block._fast_path = fast
        x = x0.clone().requires_grad_()
        out = block(x)
        (grad_x,) = torch.autograd.grad((out * torch.cos(out)).sum(), x, create_graph=True)
        results[fast] = torch.autograd.grad(grad_x.square().sum(), [x, *params], allow_unused=True)
    for got, expected in zip(results[True], results[False], strict=True):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, **TOLERANCES[torch.float64])


def test_gradcheck_and_gradgradcheck():
    block = randomize(CBAMResidualDynamicSA(5, min_hidden=2, learnable_alpha=True, alpha_init=0.4, dtype=torch.float64))
    x = make_x((2, 5, 4, 6), "normal", torch.float64).requires_grad_()
    assert type(block(x).grad_fn).__name__ == "FusedBlockBackward"
    assert torch.autograd.gradcheck(block, (x,))
    assert torch.autograd.gradgradcheck(block, (x,))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_matches_plain_backward(use_reentrant):
    block = randomize(CBAMResidualDynamicSA(12, min_hidden=2, learnable_alpha=True, alpha_init=0.3)).double()
    x0 = make_x((2, 12, 9, 13), "relu", torch.float64)
    results = []
    for checkpointed in (False, True):
        block.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=use_reentrant) if checkpointed else block(x)
        out.square().sum().backward()
        results.append([x.grad, *(p.grad for p in block.parameters())])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_deterministic_runs_are_bitwise_equal(deterministic):
    block = randomize(CBAMResidualDynamicSA(37, min_hidden=2, learnable_alpha=True, alpha_init=0.5))
    x = make_x((2, 37, 9, 13), "relu", torch.float32)
    first, second = run(block, x, True), run(block, x, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name, grad in first[2].items():
        assert torch.equal(grad, second[2][name]), name


def test_the_callers_tensors_are_never_modified():
    block = randomize(CBAMResidualDynamicSA(12, min_hidden=2, learnable_alpha=True, alpha_init=0.5))
    x = make_x((2, 12, 9, 13), "relu", torch.float32).requires_grad_()
    grad = torch.randn(2, 12, 9, 13)
    x_before, grad_before = x.detach().clone(), grad.clone()
    block(x).backward(grad)
    assert torch.equal(x.detach(), x_before) and torch.equal(grad, grad_before)


@pytest.mark.parametrize("shape", [(2, 64, 56, 56), (2, 256, 28, 28), (4, 512, 7, 7)])
def test_saved_tensors_stay_under_5_percent_of_the_input_at_resnet_stage_shapes(shape):
    block = CBAMResidualDynamicSA(shape[1])
    x = torch.randn(shape).requires_grad_()
    saved = bench.saved_tensor_bytes(block, x)
    assert 0 < saved <= 0.05 * x.numel() * x.element_size()
