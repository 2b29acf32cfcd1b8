"""ChannelAttentionFusionT: the contract of issue 2's channel-attention clause."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cbam_dsa import ChannelAttentionFusionT


def manual_channel_logits(ca: ChannelAttentionFusionT, x: torch.Tensor) -> torch.Tensor:
    """z computed from scratch with the module's weights: fused MLP outputs, before the gate."""

    def mlp(v):
        h = F.conv2d(v, ca.fc1.weight, ca.fc1.bias)
        h = torch.relu(h) if ca.act == "relu" else h * torch.sigmoid(h)
        return F.conv2d(h, ca.fc2.weight, ca.fc2.bias)

    a = mlp(x.mean((2, 3), keepdim=True))
    m = mlp(x.amax((2, 3), keepdim=True))
    if ca.fusion == "sum":
        return a + m
    w = torch.softmax(ca.fusion_logits, 0)
    return w[0] * a + w[1] * m


@pytest.mark.parametrize(
    ("channels", "reduction", "min_hidden", "hidden"),
    [(64, 16, 4, 4), (256, 16, 4, 16), (8, 16, 4, 4), (1, 16, 4, 4), (64, 4, 2, 16), (64, 64, 1, 1)],
)
def test_hidden_width(channels, reduction, min_hidden, hidden):
    ca = ChannelAttentionFusionT(channels, reduction=reduction, min_hidden=min_hidden)
    assert ca.hidden == hidden
    assert ca.fc1.weight.shape == (hidden, channels, 1, 1) and ca.fc1.bias.shape == (hidden,)
    assert ca.fc2.weight.shape == (channels, hidden, 1, 1) and ca.fc2.bias.shape == (channels,)


@pytest.mark.parametrize("fusion", ["sum", "softmax"])
@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_map_matches_manual_computation(fusion, gate, act, temperature):
    ca = ChannelAttentionFusionT(32, fusion=fusion, gate=gate, act=act, temperature=temperature)
    if fusion == "softmax":
        with torch.no_grad():
            ca.fusion_logits.copy_(torch.tensor([0.3, -0.4]))
    x = torch.randn(3, 32, 5, 7)
    y, cam = ca(x)
    z = manual_channel_logits(ca, x) / temperature
    expected = torch.sigmoid(z) if gate == "sigmoid" else torch.clamp(z / 6 + 0.5, 0, 1)
    assert cam.shape == (3, 32, 1, 1)
    torch.testing.assert_close(cam, expected)
    torch.testing.assert_close(y, x * cam)


def test_softmax_fusion_starts_at_half_half_and_returns_weights():
    ca = ChannelAttentionFusionT(16, return_fusion_weights=True)
    assert torch.equal(ca.fusion_logits.detach(), torch.zeros(2))
    _y, _cam, w = ca(torch.randn(2, 16, 4, 4))
    assert w.shape == (2,)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5]))


def test_sum_fusion_has_no_logits_and_returns_ones():
    ca = ChannelAttentionFusionT(16, fusion="sum", return_fusion_weights=True)
    assert ca.fusion_logits is None
    assert "fusion_logits" not in ca.state_dict()
    _, _, w = ca(torch.randn(2, 16, 4, 4))
    assert torch.equal(w, torch.ones(2))


def test_returns_two_outputs_by_default():
    out = ChannelAttentionFusionT(8)(torch.randn(1, 8, 3, 3))
    assert isinstance(out, tuple) and len(out) == 2


@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
def test_learnable_temperature_starts_exactly_and_learns(temperature):
    ca = ChannelAttentionFusionT(8, temperature=temperature, learnable_temperature=True)
    assert ca.effective_temperature().item() == torch.tensor(temperature).item()
    names = dict(ca.named_parameters())
    assert "temperature_log_scale" in names and "temperature" in dict(ca.named_buffers())
    ca(torch.randn(2, 8, 4, 4))[1].sum().backward()
    assert ca.temperature_log_scale.grad is not None and ca.temperature_log_scale.grad != 0
    with torch.no_grad():
        ca.temperature_log_scale.fill_(-50.0)  # driven far negative, it stays positive
    assert ca.effective_temperature() > 0


def test_fixed_temperature_is_a_buffer_not_a_parameter():
    ca = ChannelAttentionFusionT(8, temperature=2.0)
    assert "temperature" in dict(ca.named_buffers())
    assert ca.temperature_log_scale is None
    assert all("temperature" not in n for n, _ in ca.named_parameters())
    assert ca.effective_temperature().item() == 2.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_device_and_dtype_reach_every_tensor(dtype):
    ca = ChannelAttentionFusionT(8, learnable_temperature=True, device="cpu", dtype=dtype)
    assert all(t.dtype == dtype for t in ca.state_dict().values())


def test_meta_device_builds_without_memory():
    ca = ChannelAttentionFusionT(1024, device="meta")
    assert all(t.is_meta for t in ca.state_dict().values())
