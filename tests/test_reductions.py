"""The PyTorch implementation's maximum over channels by halving equals torch.amax, NaN and infinities included."""

import pytest
import torch

from cbam_dsa.ops import pytorch


@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (1, 1, 2, 2), (3, 8, 7, 7), (2, 33, 4, 5), (4, 512, 4, 4)])
@pytest.mark.parametrize("special", [None, float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_channel_max_by_halving_equals_amax(monkeypatch, shape, special, dtype):
    monkeypatch.setattr(pytorch, "HALVING_FROM_ELEMENTS", 0)  # halve at every size
    generator = torch.Generator().manual_seed(sum(shape))
    y = torch.randn(shape, generator=generator).relu().to(dtype)  # ties at zero
    if special is not None:
        y.view(-1)[:: max(1, y.numel() // 7)] = special
    found = pytorch.channel_max(y)
    expected = y.amax(dim=1, keepdim=True)
    assert found.shape == expected.shape and found.dtype == expected.dtype
    torch.testing.assert_close(found, expected, rtol=0, atol=0, equal_nan=True)


def test_channel_max_keeps_amax_on_large_maps():
    y = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(pytorch.channel_max(y), y.amax(dim=1, keepdim=True), rtol=0, atol=0)
