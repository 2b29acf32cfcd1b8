"""The effective spatial factor and its lift, on hand-made maps, and against the block's own output."""

from __future__ import annotations

import pytest
import torch

from cbam_dsa import CBAMResidualDynamicSA
from cbam_dsa.demo.effective import effective_lift, effective_spatial_factor, effective_stats
from cbam_dsa.demo.localisation import localisation_lift
from cbam_dsa.maps import AttentionMaps, MapRecorder

BOXES = torch.tensor([[0, 0, 4, 4], [2, 2, 8, 6], [1, 0, 7, 3]])
SIZE = (8, 8)


def _maps(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-made spatial maps of three kinds and channel maps of 5 channels, for the three boxes."""
    generator = torch.Generator().manual_seed(1)
    if kind == "random":
        sa = torch.rand(3, 1, 8, 8, generator=generator)
    elif kind == "inside":  # all mass inside each box
        sa = torch.zeros(3, 1, 8, 8)
        for i, (x0, y0, x1, y1) in enumerate(BOXES.tolist()):
            sa[i, 0, y0:y1, x0:x1] = 0.9
    else:  # "outside": all mass outside each box
        sa = torch.ones(3, 1, 8, 8)
        for i, (x0, y0, x1, y1) in enumerate(BOXES.tolist()):
            sa[i, 0, y0:y1, x0:x1] = 0.0
    ca = 0.2 + 0.8 * torch.rand(3, 5, 1, 1, generator=generator)
    return sa, ca


@pytest.mark.parametrize("kind", ["random", "inside", "outside"])
@pytest.mark.parametrize("with_ca", [False, True])
def test_alpha_zero_gives_factor_one_and_lift_one_for_any_map(kind, with_ca):
    sa, ca = _maps(kind)
    ca = ca if with_ca else None
    factor = effective_spatial_factor(sa, ca, alpha=0.0)
    assert torch.equal(factor, torch.ones_like(factor))
    assert effective_lift(sa, BOXES, SIZE, ca, alpha=0.0) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["random", "inside", "outside"])
@pytest.mark.parametrize("alpha", [1.0, None])
def test_alpha_one_or_no_blend_gives_the_lift_of_sa(kind, alpha):
    sa, ca = _maps(kind)
    expected = localisation_lift(sa, BOXES, SIZE)
    assert effective_lift(sa, BOXES, SIZE, ca, alpha=alpha) == pytest.approx(expected, rel=1e-9)
    assert effective_lift(sa, BOXES, SIZE, None, alpha=alpha) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_a_partial_blend_lies_between_chance_and_the_lift_of_sa(alpha):
    sa, ca = _maps("inside")
    full = localisation_lift(sa, BOXES, SIZE)
    lift = effective_lift(sa, BOXES, SIZE, ca, alpha=alpha)
    assert 1.0 < lift < full
    weaker = effective_lift(sa, BOXES, SIZE, ca, alpha=alpha / 2)
    assert 1.0 < weaker < lift


def test_a_negative_alpha_turns_the_lift_below_chance():
    sa, ca = _maps("inside")
    assert effective_lift(sa, BOXES, SIZE, ca, alpha=-0.2) < 1.0


def test_factor_is_the_formula_with_ca_folded_as_its_channel_mean():
    sa, ca = _maps("random")
    factor = effective_spatial_factor(sa, ca, alpha=0.3)
    expected = 0.7 + 0.3 * ca.double().mean(dim=1, keepdim=True) * sa.double()
    torch.testing.assert_close(factor, expected)
    assert factor.dtype == torch.float64 and factor.shape == sa.shape


@pytest.mark.parametrize("alpha_init", [0.0, 0.4, 1.0])
def test_factor_is_the_channel_mean_of_what_the_block_multiplies_the_features_by(alpha_init):
    block = CBAMResidualDynamicSA(8, alpha_init=alpha_init).eval()
    x = torch.rand(2, 8, 6, 6) + 0.5  # positive, so out / x is the factor
    with MapRecorder(block) as recorder, torch.no_grad():
        out = block(x)
    maps = next(iter(recorder.maps.values()))
    factor = effective_spatial_factor(maps.sa, maps.ca, block.alpha)
    torch.testing.assert_close(factor.float(), (out / x).mean(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_stats_per_block():
    sa, ca = _maps("inside")
    maps = {
        "a": AttentionMaps(ca=ca, sa=sa, fusion_w=torch.ones(2), router_w=torch.ones(3, 1)),
        "b": AttentionMaps(ca=ca, sa=sa, fusion_w=torch.ones(2), router_w=torch.ones(3, 1)),
    }
    stats = effective_stats(maps, {"a": 0.0, "b": None}, BOXES, SIZE)
    assert stats["alpha"] == {"a": 0.0, "b": None}
    assert stats["effective_mean"]["a"] == pytest.approx(1.0)
    assert stats["effective_spread"]["a"] == pytest.approx(0.0)
    assert stats["effective_lift"]["a"] == pytest.approx(1.0)
    assert stats["effective_lift"]["b"] == pytest.approx(localisation_lift(sa, BOXES, SIZE))
    assert stats["effective_min"]["b"] == pytest.approx(0.0)
    assert "effective_lift" not in effective_stats(maps, {"a": 0.0})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sa": torch.ones(2, 8, 8)}, ValueError, r"sa must be a tensor of shape \(N, 1, h, w\)"),
        ({"ca": torch.ones(3, 4, 1, 1)}, ValueError, r"ca must be a tensor of shape \(2, C, 1, 1\)"),
        ({"ca": torch.ones(2, 4, 2, 2)}, ValueError, r"ca must be a tensor of shape \(2, C, 1, 1\)"),
        ({"alpha": float("nan")}, ValueError, "alpha must be finite, but got nan"),
        ({"alpha": torch.ones(2)}, ValueError, r"alpha must be one number, but got a tensor of shape \(2,\)"),
        ({"alpha": "0.5"}, TypeError, "alpha must be a float, a one-element tensor or None, but got str"),
        ({"alpha": True}, TypeError, "but got bool"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, error, match):
    arguments = {"sa": torch.ones(2, 1, 8, 8), "ca": None, "alpha": 0.5} | kwargs
    with pytest.raises(error, match=match):
        effective_spatial_factor(**arguments)


def test_stats_need_the_image_size_with_boxes():
    sa, ca = _maps("random")
    maps = {"a": AttentionMaps(ca=ca, sa=sa, fusion_w=torch.ones(2), router_w=torch.ones(3, 1))}
    with pytest.raises(ValueError, match="image_size must be given with boxes"):
        effective_stats(maps, {"a": 0.5}, BOXES)
