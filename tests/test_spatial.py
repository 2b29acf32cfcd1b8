"""DynamicSpatialAttention: the contract of issue 2's spatial-attention clause."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cbam_dsa import DynamicSpatialAttention


@pytest.mark.parametrize(
    ("kernels", "use_dilated", "k"),
    [
        ((3, 7), True, 3),
        ((3, 7), False, 2),
        ((), True, 1),
        ((5,), False, 1),
        ((1, 3, 5, 7), True, 5),
        ((3, 3), False, 2),
    ],
)
def test_number_of_branches_follows_configuration(kernels, use_dilated, k):
    sa = DynamicSpatialAttention(kernels=kernels, use_dilated=use_dilated, return_router_weights=True)
    assert sa.num_branches == len(sa.branches) == k
    _y, sam, r = sa(torch.randn(2, 6, 9, 9))
    assert r.shape == (2, k)
    torch.testing.assert_close(r.sum(1), torch.ones(2))
    assert sam.shape == (2, 1, 9, 9)
    if k > 1:
        assert sa.router[2].out_channels == k
    else:
        assert sa.router is None and torch.equal(r, torch.ones(2, 1))


def test_branch_layout_matches_specification():
    sa = DynamicSpatialAttention(kernels=(3, 7), use_dilated=True, dilated_kernel=5, dilated_d=3, router_hidden=6)
    shapes = [(b.kernel_size, b.dilation, b.padding, b.in_channels, b.out_channels) for b in sa.branches]
    assert shapes == [((3, 3), (1, 1), (1, 1), 2, 1), ((7, 7), (1, 1), (3, 3), 2, 1), ((5, 5), (3, 3), (6, 6), 2, 1)]
    assert all(b.bias is not None for b in sa.branches)
    assert sa.router[0].in_channels == 2 and sa.router[0].out_channels == 6


def test_dilated_branch_really_dilates():
    sa = DynamicSpatialAttention(kernels=(), use_dilated=True, dilated_kernel=3, dilated_d=2)
    branch = sa.branches[0]
    with torch.no_grad():
        branch.weight.fill_(1.0)
        branch.bias.zero_()
    s = torch.zeros(1, 2, 9, 9)
    s[0, 0, 4, 4] = 1.0  # an impulse: the response marks the taps of the kernel
    response = branch(s)[0, 0]
    taps = {(i, j) for i, j in (response != 0).nonzero().tolist()}
    assert taps == {(4 + di, 4 + dj) for di in (-2, 0, 2) for dj in (-2, 0, 2)}


@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_map_matches_manual_computation(gate, temperature):
    sa = DynamicSpatialAttention(gate=gate, temperature=temperature, return_router_weights=True)
    x = torch.randn(3, 10, 11, 9)
    y, sam, r = sa(x)
    s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    hidden = torch.relu(F.conv2d(s.mean((2, 3), keepdim=True), sa.router[0].weight, sa.router[0].bias))
    expected_r = torch.softmax(F.conv2d(hidden, sa.router[2].weight, sa.router[2].bias).flatten(1), 1)
    torch.testing.assert_close(r, expected_r)
    logit = sum(
        expected_r[:, k].view(-1, 1, 1, 1) * F.conv2d(s, b.weight, b.bias, padding=b.padding, dilation=b.dilation)
        for k, b in enumerate(sa.branches)
    )
    z = logit / temperature
    expected = torch.sigmoid(z) if gate == "sigmoid" else torch.clamp(z / 6 + 0.5, 0, 1)
    torch.testing.assert_close(sam, expected)
    torch.testing.assert_close(y, x * sam)


def test_router_weights_differ_per_sample():
    sa = DynamicSpatialAttention(return_router_weights=True)
    x = torch.cat([torch.randn(1, 4, 8, 8), 5 + 3 * torch.randn(1, 4, 8, 8)])
    _, _, r = sa(x)
    assert not torch.allclose(r[0], r[1])


def test_returns_two_outputs_by_default():
    out = DynamicSpatialAttention()(torch.randn(1, 3, 5, 5))
    assert isinstance(out, tuple) and len(out) == 2


def test_learnable_temperature_starts_exactly():
    sa = DynamicSpatialAttention(temperature=0.7, learnable_temperature=True)
    assert sa.effective_temperature().item() == torch.tensor(0.7).item()
    sa(torch.randn(2, 3, 6, 6))[1].sum().backward()
    assert sa.temperature_log_scale.grad is not None
