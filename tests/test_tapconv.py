"""The spatial branches as one convolution over merged taps (C kernels) against the plain branch convolutions."""

import pytest
import torch
import torch.nn.functional as F

from cbam_dsa import _native, _tapconv

pytestmark = pytest.mark.skipif(_native.kernels() is None, reason="the fused C kernels cannot be built here")

TOLERANCES = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 2e-4, "atol": 2e-5}}
BRANCHES = [((3, 1), (7, 1), (7, 2)), ((5, 1), (3, 3)), ((1, 1),), ((3, 2), (3, 1))]


def plain_routed_branches(s, weights, biases, dilations, router):
    """``sum_k r_k * (conv_k(s) + bias_k)`` with one F.conv2d per branch: the reference math."""
    out = 0
    for k, (weight, dilation) in enumerate(zip(weights, dilations, strict=True)):
        conv = F.conv2d(s, weight, biases[k], padding=(weight.shape[-1] // 2) * dilation, dilation=dilation)
        out = out + router[:, k].view(-1, 1, 1, 1) * conv
    return out


def branch_inputs(specs, batch, size, dtype):
    s = torch.randn(batch, 2, *size, dtype=dtype, requires_grad=True)
    weights = [torch.randn(1, 2, k, k, dtype=dtype, requires_grad=True) for k, _ in specs]
    biases = [torch.randn(1, dtype=dtype, requires_grad=True) for _ in specs]
    router = torch.softmax(torch.randn(batch, len(specs), dtype=dtype), dim=1).requires_grad_()
    return s, weights, biases, [d for _, d in specs], router


def test_tap_layout_merges_shared_offsets():
    taps, gather = _tapconv.tap_layout(((3, 1), (7, 1), (7, 2)), 2)
    # 7x7 covers the 3x3; the dilated 7x7 shares its 3x3 centre grid (offsets -2, 0, 2) with the 7x7
    count = 2 * (49 + 49 - 9)
    assert taps.shape == (count, 3)
    assert len({tuple(t) for t in taps.tolist()}) == count
    elements = 2 * (9 + 49 + 49)
    assert gather.shape == (3 * count,)
    placed = gather[gather < elements]
    assert sorted(placed.tolist()) == list(range(elements))  # every weight lands once, the rest are zeros
    where = {int(e): int(j) for j, e in enumerate(gather.tolist()) if e < elements}
    assert [where[e] // count for e in range(elements)] == [0] * 18 + [1] * 98 + [2] * 98
    assert taps[where[18] % count].tolist() == [0, -3, -3]  # first tap of the 7x7, channel 0
    assert taps[where[18 + 98 + 49] % count].tolist() == [1, -6, -6]  # first tap of the dilated 7x7, channel 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("specs", BRANCHES)
@pytest.mark.parametrize(("batch", "size"), [(3, (9, 7)), (2, (28, 28)), (1, (1, 1)), (2, (3, 5))])
def test_tap_branch_logit_equals_plain_branches(dtype, specs, batch, size):
    s, weights, biases, dilations, router = branch_inputs(specs, batch, size, dtype)
    got = _tapconv.tap_branch_logit(s, weights, biases, dilations, router)
    expected = plain_routed_branches(s, weights, biases, dilations, router)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
    grad = torch.randn_like(expected)
    inputs = [s, router, *weights, *biases]
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad), strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])


@pytest.mark.parametrize("specs", BRANCHES[:2])
def test_tap_conv_gradcheck(specs):
    s, weights, biases, dilations, router = branch_inputs(specs, 2, (4, 5), torch.float64)

    def fn(s, router, *weights):
        return _tapconv.tap_branch_logit(s, list(weights), biases, dilations, router)

    assert torch.autograd.gradcheck(fn, (s, router, *weights))
    if len(weights) == 2:  # second order (the backward under create_graph) on the smaller branch set: it is slow
        assert torch.autograd.gradgradcheck(fn, (s, router, *weights))


def test_dense_tap_conv_equals_the_kernel():
    taps, _ = _tapconv.tap_layout(BRANCHES[0], 2)
    s, router = torch.randn(3, 2, 9, 11, dtype=torch.float64), torch.rand(3, 3, dtype=torch.float64)
    mixing = torch.randn(3, taps.shape[0], dtype=torch.float64)
    expected = _tapconv.dense_tap_conv(s, router @ mixing, taps)
    torch.testing.assert_close(_tapconv.TapConv.apply(s, router, mixing, taps), expected)


@pytest.mark.parametrize("need", ["s", "router", "mixing"])
def test_tap_conv_computes_only_needed_gradients(need):
    taps, _ = _tapconv.tap_layout(((3, 1), (5, 1)), 2)
    inputs = {"s": torch.randn(2, 2, 5, 5), "router": torch.rand(2, 2), "mixing": torch.randn(2, taps.shape[0])}
    inputs[need].requires_grad_()
    out = _tapconv.TapConv.apply(inputs["s"], inputs["router"], inputs["mixing"], taps)
    (grad,) = torch.autograd.grad(out.sum(), inputs[need])
    dense = {name: t.detach().clone().requires_grad_(name == need) for name, t in inputs.items()}
    expected = _tapconv.dense_tap_conv(dense["s"], dense["router"] @ dense["mixing"], taps)
    (expected_grad,) = torch.autograd.grad(expected.sum(), dense[need])
    torch.testing.assert_close(grad, expected_grad)


def test_tap_conv_saves_no_per_sample_weights():
    taps, _ = _tapconv.tap_layout(((3, 1), (7, 1), (7, 2)), 2)
    s = torch.randn(4, 2, 6, 6, requires_grad=True)
    router, mixing = torch.rand(4, 3, requires_grad=True), torch.randn(3, taps.shape[0], requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        _tapconv.TapConv.apply(s, router, mixing, taps)
    assert sorted(saved) == sorted([s.shape, router.shape, mixing.shape])


def test_tap_conv_leaves_inputs_unchanged():
    s, weights, biases, dilations, router = branch_inputs(BRANCHES[0], 2, (6, 6), torch.float32)
    before = [t.detach().clone() for t in (s, router, *weights)]
    _tapconv.tap_branch_logit(s, weights, biases, dilations, router).sum().backward()
    for t, b in zip((s, router, *weights), before, strict=True):
        assert torch.equal(t.detach(), b)
