"""The branches on small maps as one matrix product against the plain branch convolutions."""

import pytest
import torch
import torch.nn.functional as F

from cbam_dsa import _toeplitz

TOLERANCES = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 2e-4, "atol": 2e-5}}


def plain_routed_branches(s, weights, dilations, router):
    """``sum_k r_k * conv_k(s)`` with one F.conv2d per branch: the reference math."""
    out = 0
    for k, (weight, dilation) in enumerate(zip(weights, dilations, strict=True)):
        conv = F.conv2d(s, weight, padding=(weight.shape[-1] // 2) * dilation, dilation=dilation)
        out = out + router[:, k].view(-1, 1, 1, 1) * conv
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("specs", [((3, 1), (7, 1), (7, 2)), ((5, 1),), ((3, 3), (1, 1))])
@pytest.mark.parametrize("size", [(7, 7), (1, 1), (3, 5), (5, 9)])
def test_toeplitz_conv_equals_plain_branches(dtype, specs, size):
    s = torch.randn(3, 2, *size, dtype=dtype, requires_grad=True)
    weights = [torch.randn(1, 2, k, k, dtype=dtype, requires_grad=True) for k, _ in specs]
    dilations = tuple(d for _, d in specs)
    router = torch.softmax(torch.randn(3, len(specs), dtype=dtype), dim=1).requires_grad_()
    got = _toeplitz.ToeplitzConv.apply(s, router, dilations, *weights)
    expected = plain_routed_branches(s, weights, dilations, router)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
    grad = torch.randn_like(expected)
    inputs = [s, router, *weights]
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad), strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])


def test_toeplitz_conv_gradcheck():
    s = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(1, 2, k, k, dtype=torch.float64, requires_grad=True) for k in (3, 5)]
    router = torch.softmax(torch.randn(2, 2, dtype=torch.float64), dim=1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, r, *w: _toeplitz.ToeplitzConv.apply(s, r, (1, 2), *w), (s, router, *weights)
    )
