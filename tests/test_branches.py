"""The PyTorch implementation's spatial branches (ops/branches.py): each of its three ways (the dense matrix of small
maps, plain convolutions, channels_last convolutions) equals the branch convolutions under autograd, outputs and
gradients, non-finite values included."""

import pytest
import torch
import torch.nn.functional as F

from cbam_dsa import functional as FA
from cbam_dsa.ops import branches

KERNELS = {
    "default": [(3, 1), (7, 1), (7, 2)],
    "one": [(5, 1)],
    "wide_dilation": [(1, 1), (3, 3), (5, 2)],
}
# (height, width) on each side of the two thresholds: dense up to 64 pixels, channels_last from 784
SIZES = [(1, 1), (2, 9), (7, 7), (8, 8), (9, 8), (13, 17), (28, 28), (30, 29)]


def _way(height: int, width: int) -> str:
    pixels = height * width
    if pixels <= branches.DENSE_UP_TO:
        return "dense"
    return "channels_last" if pixels >= branches.CHANNELS_LAST_FROM else "plain"


def _case(size, kernels, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 2, *size, dtype=dtype, generator=generator)
    weights = [torch.randn(1, 2, k, k, dtype=dtype, generator=generator) for k, _ in kernels]
    biases = [torch.randn(1, dtype=dtype, generator=generator) for _ in kernels]
    grads = [torch.randn(3, 1, *size, dtype=dtype, generator=generator) for _ in kernels]
    return s, weights, biases, [d for _, d in kernels], grads


def _reference(s, weights, biases, dilations, grads):
    inputs = [t.detach().requires_grad_() for t in (s, *weights, *biases)]
    x, ws, bs = inputs[0], inputs[1 : 1 + len(weights)], inputs[1 + len(weights) :]
    outs = [
        F.conv2d(x, w, b, padding=FA.branch_padding(w.shape[-1], d), dilation=d)
        for w, b, d in zip(ws, bs, dilations, strict=True)
    ]
    found = torch.autograd.grad(outs, inputs, grads)
    return [o.detach() for o in outs], found[0], list(found[1 : 1 + len(weights)]), list(found[1 + len(weights) :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernels", list(KERNELS))
@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}_{_way(*size)}")
def test_each_way_equals_the_convolutions(size, kernels, dtype):
    s, weights, biases, dilations, grads = _case(size, KERNELS[kernels], dtype)
    outs, grad_s, grad_weights, grad_biases = _reference(s, weights, biases, dilations, grads)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(
        branches.branches_forward(s, weights, biases, dilations), torch.cat(outs, 1), **tolerance
    )
    found_s, found_weights, found_biases = branches.branches_backward(s, weights, dilations, torch.cat(grads, 1))
    torch.testing.assert_close(found_s, grad_s, **tolerance)
    for found, expected in zip([*found_weights, *found_biases], [*grad_weights, *grad_biases], strict=True):
        torch.testing.assert_close(found, expected, **tolerance)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["descriptor", "gradient"])
def test_non_finite_values_reach_what_the_convolutions_reach(where, value):
    """A zero of the dense matrix times a non-finite value would be NaN where a convolution never looks: non-finite
    values must take the convolutions, and give NaN and inf exactly where they do."""
    s, weights, biases, dilations, grads = _case((7, 7), KERNELS["default"], torch.float64)
    if where == "descriptor":
        s[1, 0, 0, 0] = value
    else:
        grads[2][0, 0, 6, 6] = value
    outs, grad_s, grad_weights, grad_biases = _reference(s, weights, biases, dilations, grads)
    found = branches.branches_forward(s, weights, biases, dilations)
    torch.testing.assert_close(found, torch.cat(outs, 1), equal_nan=True)
    found_s, found_weights, found_biases = branches.branches_backward(s, weights, dilations, torch.cat(grads, 1))
    torch.testing.assert_close(found_s, grad_s, equal_nan=True)
    for found, expected in zip([*found_weights, *found_biases], [*grad_weights, *grad_biases], strict=True):
        torch.testing.assert_close(found, expected, equal_nan=True)
    assert found_s.isfinite().sum() == grad_s.isfinite().sum() > 0  # the non-finite values stayed local


def _mixed_reference(s, weights, biases, dilations, mix, grad):
    """The router's mix ``sum_k mix_k * branch_k(s)`` under autograd: the gradients of s, kernels, biases, mix."""
    inputs = [t.detach().requires_grad_() for t in (s, *weights, *biases, mix)]
    x, ws, bs, r = inputs[0], inputs[1 : 1 + len(weights)], inputs[1 + len(weights) : -1], inputs[-1]
    logit = torch.zeros_like(x[:, :1])
    for k, (w, b, d) in enumerate(zip(ws, bs, dilations, strict=True)):
        logit = logit + r[:, k].view(-1, 1, 1, 1) * F.conv2d(
            x, w, b, padding=FA.branch_padding(w.shape[-1], d), dilation=d
        )
    found = torch.autograd.grad(logit, inputs, grad)
    return found[0], list(found[1 : 1 + len(weights)]), list(found[1 + len(weights) : -1]), found[-1]


@pytest.mark.parametrize("special", [None, "nan_descriptor", "inf_gradient"])
@pytest.mark.parametrize("mix_grad", [False, True])
@pytest.mark.parametrize("size", [(7, 7), (9, 8), (28, 28)], ids=lambda size: f"{size[0]}x{size[1]}_{_way(*size)}")
def test_the_mix_backward_equals_autograd_over_the_mix(size, mix_grad, special):
    """The router mix's backward (the branches' gradients weighted by the mix, and the mix's own gradient from the
    same convolution calls where the values are finite) equals autograd over the mix, on each of the three ways;
    NaN and inf reach exactly what they reach there."""
    s, weights, biases, dilations, _ = _case(size, KERNELS["default"], torch.float64)
    generator = torch.Generator().manual_seed(1)
    mix = torch.softmax(torch.randn(3, 3, dtype=torch.float64, generator=generator), dim=1)
    grad = torch.randn(3, 1, *size, dtype=torch.float64, generator=generator)
    if special == "nan_descriptor":
        s[1, 0, 3, 2] = float("nan")
    elif special == "inf_gradient":
        grad[0, 0, 5, 4] = float("inf")
    expected = _mixed_reference(s, weights, biases, dilations, mix, grad)
    found = branches.mixed_backward(s, weights, biases, dilations, mix, grad, mix_grad)
    pairs = [
        (found[0], expected[0]),
        *zip(found[1], expected[1], strict=True),
        *zip(found[2], expected[2], strict=True),
    ]
    pairs.append((found[3], expected[3]) if mix_grad else (found[3], None))
    for got, want in pairs:
        if want is None:
            assert got is None
            continue
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, equal_nan=True)


def test_the_dense_matrix_places_every_tap_once():
    """Each kernel weight appears in the dense matrix once per output pixel whose window holds its input pixel."""
    kernels = ((3, 1), (5, 2))
    taps = branches._taps(6, 5, kernels)
    assert taps.count == 2 * 9 + 2 * 25
    assert taps.gather.shape == ((2 * 30) * (2 * 30),)
    assert torch.equal(taps.gather[taps.positions], taps.at)
    assert int((taps.gather < taps.count).sum()) == taps.positions.numel()  # the other entries gather the zero
    counts = torch.bincount(taps.at, minlength=taps.count)
    # the centre tap of each branch reaches every output pixel from both channels
    assert counts[4] == counts[9 + 4] == 30
    assert counts[18 + 12] == counts[18 + 25 + 12] == 30
    # a corner tap of the 3x3 kernel reaches the (H - 1) x (W - 1) pixels whose neighbour exists
    assert counts[0] == 5 * 4
