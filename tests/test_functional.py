"""The reference math in cbam_dsa.functional, checked against independent computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cbam_dsa import functional as FA


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_sigmoid_gate_divides_by_temperature(temperature):
    z = torch.linspace(-8, 8, 101, dtype=torch.float64)
    expected = 1.0 / (1.0 + torch.exp(-z / temperature))
    torch.testing.assert_close(FA.apply_gate(z, "sigmoid", temperature), expected)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_hardsigmoid_gate_is_pytorch_clamp_formula(temperature):
    z = torch.linspace(-10, 10, 201, dtype=torch.float64)
    expected = torch.clamp(z / temperature / 6 + 0.5, 0, 1)
    torch.testing.assert_close(FA.apply_gate(z, "hardsigmoid", temperature), expected)
    # saturates exactly: outside +-3T the gate is 0 or 1
    gated = FA.apply_gate(z, "hardsigmoid", temperature)
    assert torch.all(gated[z <= -3 * temperature] == 0) and torch.all(gated[z >= 3 * temperature] == 1)


def test_lower_temperature_sharpens_the_gate():
    z = torch.tensor([-1.0, 1.0])
    sharp = FA.apply_gate(z, "sigmoid", 0.5)
    soft = FA.apply_gate(z, "sigmoid", 2.0)
    assert sharp[1] > soft[1] and sharp[0] < soft[0]


def test_unknown_gate_and_activation_raise():
    with pytest.raises(ValueError, match="gate must be one of"):
        FA.apply_gate(torch.zeros(1), "tanh")
    with pytest.raises(ValueError, match="act must be one of"):
        FA.activation(torch.zeros(1), "gelu")


def test_channel_pool_is_mean_and_max_over_hw():
    x = torch.randn(3, 5, 4, 7)
    avg, mx = FA.channel_pool(x)
    assert avg.shape == mx.shape == (3, 5, 1, 1)
    for b in range(3):
        for c in range(5):
            assert torch.isclose(avg[b, c, 0, 0], x[b, c].mean())
            assert mx[b, c, 0, 0] == x[b, c].max()


def test_spatial_pool_stacks_mean_then_max_over_channels():
    y = torch.randn(2, 6, 3, 4)
    s = FA.spatial_pool(y)
    assert s.shape == (2, 2, 3, 4)
    torch.testing.assert_close(s[:, 0], y.mean(1))
    torch.testing.assert_close(s[:, 1], y.max(1).values)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pooling_accumulates_in_float32_for_half_inputs(dtype):
    x = torch.full((1, 64, 32, 32), 6e4).to(dtype)
    avg, mx = FA.channel_pool(x)
    s = FA.spatial_pool(x)
    assert avg.dtype == mx.dtype == s.dtype == torch.float32
    assert torch.isfinite(avg).all() and torch.isfinite(s).all()
    torch.testing.assert_close(avg, x.float().mean((2, 3), keepdim=True))


def test_pooling_keeps_float64():
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    assert FA.channel_pool(x)[0].dtype == torch.float64
    assert FA.spatial_pool(x).dtype == torch.float64


def test_fusion_weights_softmax_and_sum():
    ref = torch.zeros(1)
    torch.testing.assert_close(FA.fusion_weights(torch.zeros(2), ref), torch.tensor([0.5, 0.5]))
    logits = torch.tensor([1.0, -1.0])
    torch.testing.assert_close(FA.fusion_weights(logits, ref), torch.softmax(logits, 0))
    torch.testing.assert_close(FA.fusion_weights(None, ref), torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize(("kernel", "dilation", "padding"), [(1, 1, 0), (3, 1, 1), (7, 1, 3), (7, 2, 6), (5, 3, 6)])
def test_branch_padding_keeps_size(kernel, dilation, padding):
    assert FA.branch_padding(kernel, dilation) == padding
    s = torch.randn(1, 2, 9, 13)
    out = F.conv2d(s, torch.randn(1, 2, kernel, kernel), padding=padding, dilation=dilation)
    assert out.shape[-2:] == s.shape[-2:]


def test_router_weights_are_a_per_sample_softmax():
    s = torch.randn(4, 2, 6, 6)
    w1, b1, w2, b2 = torch.randn(8, 2, 1, 1), torch.randn(8), torch.randn(3, 8, 1, 1), torch.randn(3)
    r = FA.router_weights(s, w1, b1, w2, b2)
    assert r.shape == (4, 3)
    torch.testing.assert_close(r.sum(1), torch.ones(4))
    pooled = s.mean((2, 3))
    expected = torch.softmax(torch.relu(pooled @ w1.view(8, 2).T + b1) @ w2.view(3, 8).T + b2, dim=1)
    torch.testing.assert_close(r, expected)


def test_spatial_map_is_router_weighted_sum_of_branches():
    s = torch.randn(2, 2, 8, 8)
    weights = [torch.randn(1, 2, 3, 3), torch.randn(1, 2, 7, 7)]
    biases = [torch.randn(1), torch.randn(1)]
    router = (torch.randn(4, 2, 1, 1), torch.randn(4), torch.randn(2, 4, 1, 1), torch.randn(2))
    sa, r = FA.spatial_attention_map(s, weights, biases, [1, 1], router, "sigmoid", 2.0)
    b0 = F.conv2d(s, weights[0], biases[0], padding=1)
    b1 = F.conv2d(s, weights[1], biases[1], padding=3)
    logit = r[:, 0].view(-1, 1, 1, 1) * b0 + r[:, 1].view(-1, 1, 1, 1) * b1
    torch.testing.assert_close(sa, torch.sigmoid(logit / 2.0))


def test_spatial_map_without_branches_raises():
    with pytest.raises(ValueError, match="at least one branch"):
        FA.spatial_attention_map(torch.randn(1, 2, 4, 4), [], [], [], None, "sigmoid", 1.0)


def test_residual_blend_endpoints_and_midpoint():
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(FA.residual_blend(x, y, 0.0), x)
    torch.testing.assert_close(FA.residual_blend(x, y, 1.0), y)
    torch.testing.assert_close(FA.residual_blend(x, y, 0.5), 0.5 * x + 0.5 * y)
