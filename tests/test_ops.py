"""The fused operators (``torch.ops.cbam_dsa``) against the reference path: outputs, maps and every gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from cbam_dsa import CBAMResidualDynamicSA
from cbam_dsa.ops.cpu import native

BACKENDS = ("native", "pytorch")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each CPU implementation in turn: the C kernels, and the PyTorch one (as without a C compiler)."""
    if request.param == "native":
        if native.library() is None:
            pytest.skip("the C kernels cannot be built here")
        monkeypatch.setenv("CBAM_DSA_NATIVE", "1")
    else:
        monkeypatch.setenv("CBAM_DSA_NATIVE", "0")
        assert native.library() is None
    return request.param


def make_block(channels: int, dtype: torch.dtype = torch.float64, seed: int = 0, **config) -> CBAMResidualDynamicSA:
    """A block with random (non-default) parameters, so every gradient is exercised."""
    torch.manual_seed(seed)
    block = CBAMResidualDynamicSA(channels, **config).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return block


def run(block: CBAMResidualDynamicSA, x: Tensor, seed: int, maps: bool) -> list:
    """The block's outputs and the gradients of ``x`` and every parameter under a random loss (on the output, and
    with ``maps`` on the four maps too)."""
    x = x.detach().clone().requires_grad_(True)
    block.return_maps = True
    outs = block(x)
    generator = torch.Generator().manual_seed(seed)
    used = outs if maps else outs[:1]
    loss = sum((o * torch.randn(o.shape, generator=generator, dtype=o.dtype)).sum() for o in used)
    params = [p for p in block.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return [o.detach() for o in outs] + [None if g is None else g.detach() for g in grads]


def reference(block: CBAMResidualDynamicSA, x: Tensor, seed: int, maps: bool) -> list:
    block.fast_path = False
    try:
        return run(block, x, seed, maps)
    finally:
        block.fast_path = True


def assert_same(got: list, expected: list, rtol: float, atol: float) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if b is None or a is None:
            assert a is None or not a.any(), f"entry {i}: {a} where the reference has no gradient"
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, f"entry {i}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        assert torch.equal(a.isnan(), b.isnan()), f"entry {i}: NaN at other positions"
        assert torch.equal(a.isposinf(), b.isposinf()) and torch.equal(a.isneginf(), b.isneginf()), f"entry {i}: inf"
        finite = b.isfinite()
        torch.testing.assert_close(a[finite], b[finite], rtol=rtol, atol=atol, msg=lambda m, i=i: f"entry {i}: {m}")


CONFIG = st.fixed_dictionaries(
    {
        "ca_fusion": st.sampled_from(["sum", "softmax"]),
        "ca_gate": st.sampled_from(["sigmoid", "hardsigmoid"]),
        "sa_gate": st.sampled_from(["sigmoid", "hardsigmoid"]),
        "ca_act": st.sampled_from(["relu", "silu"]),
        "ca_temperature": st.sampled_from([1.0, 0.5, 2.0]),
        "sa_temperature": st.sampled_from([1.0, 0.7]),
        "learnable_temperature": st.booleans(),
        "sa_kernels": st.sampled_from([(3, 7), (3,), (), (1, 5)]),
        "sa_use_dilated": st.booleans(),
        "blend": st.sampled_from(["default", "fixed_0.4", "learnable_0.3", "none"]),
        "reduction": st.sampled_from([1, 4, 16]),
    }
)


def block_config(drawn: dict) -> dict:
    config = dict(drawn)
    blend = config.pop("blend")
    if not config["sa_kernels"]:
        config["sa_use_dilated"] = True
    if blend == "none":
        config["residual"] = False
    elif blend != "default":
        kind, value = blend.split("_")
        config["alpha_init"] = float(value)
        config["learnable_alpha"] = kind == "learnable"
    return config


SHAPE = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=CONFIG, shape=SHAPE, maps=st.booleans(), seed=st.integers(0, 2**16))
def test_operator_equals_the_reference(backend, drawn, shape, maps, seed):
    b, c, h, w = shape
    block = make_block(c, seed=seed, **block_config(drawn))
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert_same(run(block, x, seed, maps), reference(block, x, seed, maps), rtol=1e-9, atol=1e-11)


SPECIAL = st.sampled_from([float("nan"), float("inf"), float("-inf")])
WHERE = st.sampled_from(["pixel", "channel", "sample", "pixel_all_channels"])


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=CONFIG, shape=SHAPE, value=SPECIAL, where=WHERE, maps=st.booleans(), seed=st.integers(0, 2**16))
def test_non_finite_values_spread_as_in_the_reference(backend, drawn, shape, value, where, maps, seed):
    b, c, h, w = shape
    block = make_block(c, seed=seed, **block_config(drawn))
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    index = {
        "pixel": (0, c - 1, h // 2, w - 1),
        "channel": (b - 1, 0),
        "sample": (0,),
        "pixel_all_channels": (0, slice(None), 0, 0),
    }[where]
    x[index] = value
    assert_same(run(block, x, seed, maps), reference(block, x, seed, maps), rtol=1e-9, atol=1e-11)
