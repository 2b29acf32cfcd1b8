"""Numerics of the block: mixed precision, half-precision inputs near the float16 limit, determinism,
memory format, and inputs that are never modified."""

from __future__ import annotations

import copy

import pytest
import torch

from cbam_dsa import CBAMResidualDynamicSA

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CONFIGS = {
    "default": {},
    "hardsigmoid": {"ca_gate": "hardsigmoid", "sa_gate": "hardsigmoid"},
    "no-residual-sum": {"residual": False, "ca_fusion": "sum"},
    "learnable-single-branch": {
        "learnable_alpha": True,
        "alpha_init": 0.5,
        "learnable_temperature": True,
        "sa_kernels": (7,),
        "sa_use_dilated": False,
    },
}
FLOAT16_MAX = 6e4


def _block(device: str, config: str, **extra) -> CBAMResidualDynamicSA:
    torch.manual_seed(0)
    return CBAMResidualDynamicSA(32, **CONFIGS[config], **extra).to(device)


def _soften(block: CBAMResidualDynamicSA) -> CBAMResidualDynamicSA:
    """Scale the first layers down so that inputs near 6e4 give gates away from 0 and 1 (informative maps)."""
    with torch.no_grad():
        block.ca.fc1.weight.mul_(1e-4)
        for branch in block.sa.branches:
            branch.weight.mul_(1e-4)
        if block.sa.router is not None:
            block.sa.router[0].weight.mul_(1e-4)
    return block


def _large_input(device: str, dtype: torch.dtype) -> torch.Tensor:
    """Values in [-6e4, 6e4]: a quarter of the channels at +6e4 and a corner at -6e4, so fp16 sums would overflow."""
    x = (torch.rand(2, 32, 12, 10, generator=torch.Generator().manual_seed(1)) * 2 - 1) * FLOAT16_MAX
    x[:, :8] = FLOAT16_MAX
    x[0, :, :4, :4] = -FLOAT16_MAX
    return x.to(device=device, dtype=dtype)


# Map tolerance per dtype; the output's error is at most about the map error times |x| <= 6e4.
HALF_TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("soft", [False, True], ids=["saturated", "informative"])
def test_half_module_on_values_up_to_float16_limit(device, config, dtype, soft):
    reference = _block(device, config, return_maps=True)
    if soft:
        _soften(reference)
    half = copy.deepcopy(reference).to(dtype)
    x = _large_input(device, dtype)
    with torch.no_grad():
        got = half(x)
        expected = reference(x.float())
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    for name, g, e in zip(("out", "ca", "sa", "fusion_w", "router_w"), got, expected, strict=True):
        assert torch.isfinite(g).all(), name
        tol = HALF_TOLERANCE[dtype]
        atol = tol * FLOAT16_MAX if name == "out" else tol
        torch.testing.assert_close(g.float(), e, rtol=tol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    if soft:  # the comparison is not between saturated gates
        assert float(expected[1].std()) > 0.02 and float(expected[2].std()) > 0.02


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_autocast(device, config):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    block = _block(device, config, return_maps=True)
    x = torch.randn(2, 32, 12, 10, device=device)
    expected = block(x)
    x_auto = x.clone().requires_grad_()
    with torch.autocast(device, dtype=dtype):
        got = block(x_auto)
    for name, g, e in zip(("out", "ca", "sa", "fusion_w", "router_w"), got, expected, strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.float(), e, rtol=2e-2, atol=2e-2, msg=lambda m, name=name: f"{name}: {m}")
    got[0].float().square().mean().backward()
    assert torch.isfinite(x_auto.grad).all()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.fixture
def deterministic(monkeypatch):
    """``torch.use_deterministic_algorithms(True)`` for one test, then the previous setting."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _forward_backward(device: str, config: str) -> tuple[torch.Tensor, ...]:
    block = _block(device, config)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 32, 11, 9, generator=generator).to(device).requires_grad_()
    upstream = torch.randn(3, 32, 11, 9, generator=generator).to(device)
    out = block(x)
    out.backward(upstream)
    return (out.detach(), x.grad, *(p.grad for p in block.parameters()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", ["default", "learnable-single-branch"])
def test_deterministic_algorithms_give_bitwise_equal_runs(deterministic, device, config):
    assert torch.are_deterministic_algorithms_enabled()
    first = _forward_backward(device, config)
    second = _forward_backward(device, config)
    assert len(first) == len(second) > 2
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert a is not None and torch.equal(a, b), f"tensor {i} differs between runs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("return_maps", [False, True])
def test_channels_last_in_gives_channels_last_out(device, config, return_maps):
    block = _block(device, config, return_maps=return_maps)
    x = torch.randn(2, 32, 9, 7, device=device)
    x_last = x.to(memory_format=torch.channels_last)
    assert not x_last.is_contiguous()
    got = block(x_last)
    expected = block(x)
    out = got[0] if return_maps else got
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected[0] if return_maps else expected)


def _inputs(device: str) -> dict[str, torch.Tensor]:
    base = torch.randn(2, 32, 9, 7, device=device)
    return {
        "contiguous": base,
        "channels-last": base.to(memory_format=torch.channels_last),
        "non-contiguous": torch.randn(2, 9, 32, 7, device=device).transpose(1, 2),
        "float16": base.half(),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", ["default", "no-residual-sum"])
@pytest.mark.parametrize("kind", ["contiguous", "channels-last", "non-contiguous", "float16"])
def test_input_is_never_modified(device, config, kind):
    x = _inputs(device)[kind].requires_grad_()
    block = _block(device, config).to(x.dtype)
    before = x.detach().clone()
    version = x._version
    out = block(x)
    out.float().sum().backward()
    assert x.grad is not None
    assert x._version == version, "the input was written in place"
    assert torch.equal(x.detach(), before)
    assert out.data_ptr() != x.data_ptr()
