"""The demo's CNN: variants, where the attention sits, fair initialisation, config round trip, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbam_dsa import CBAMResidualDynamicSA
from cbam_dsa.demo.model import VARIANTS, DemoNet, ResidualStage, attention_kwargs, build_model
from cbam_dsa.maps import find_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [2, 10])
def test_forward_shape(variant, in_channels, num_classes):
    model = DemoNet(variant, num_classes=num_classes, in_channels=in_channels, widths=(8, 16))
    assert model(torch.randn(3, in_channels, 32, 32)).shape == (3, num_classes)


def _without_gradient(model: nn.Module) -> list[str]:
    model(torch.randn(4, 1, 32, 32)).logsumexp(1).sum().backward()
    return [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_gradient(variant):
    model = DemoNet(variant, widths=(8, 16, 16))
    if variant == "dsa-zero-start":  # alpha = 0: the attention's weights get a gradient once alpha has moved
        for block in find_blocks(model).values():
            block.alpha.data.fill_(0.1)
    assert _without_gradient(model) == []


def test_zero_start_gives_a_gradient_to_alpha_only_at_first():
    model = DemoNet("dsa-zero-start", widths=(8, 16, 16))
    missing = _without_gradient(model)
    attention = [name for name, _ in model.named_parameters() if ".attention." in name]
    assert sorted(missing) == sorted(name for name in attention if not name.endswith(".alpha"))


def test_one_block_per_stage_with_maps_at_every_resolution():
    model = DemoNet("dsa", widths=(8, 16, 32))
    blocks = find_blocks(model)
    assert list(blocks) == ["stages.0.attention", "stages.1.attention", "stages.2.attention"]
    assert [b.channels for b in blocks.values()] == [8, 16, 32]
    assert find_blocks(DemoNet("none")) == {}


def test_cbam_variant_is_the_block_in_its_cbam_configuration():
    for block in find_blocks(DemoNet("cbam", widths=(16, 32))).values():
        assert block.ca.fusion == "sum" and block.ca.fusion_logits is None
        assert block.sa.kernels == (7,) and not block.sa.use_dilated and block.sa.router is None
        assert block.ca.gate == block.sa.gate == "sigmoid"
        assert float(block.ca.temperature) == float(block.sa.temperature) == 1.0
        assert block.alpha is None and not block.residual


@pytest.mark.parametrize(
    ("variant", "changed"),
    [
        ("dsa", {}),
        ("dsa-learnable-alpha", {"learnable_alpha": True}),
        ("dsa-zero-start", {"learnable_alpha": True, "alpha_init": 0.0}),
    ],
)
def test_dsa_variants_use_the_block_defaults(variant, changed):
    for block in find_blocks(DemoNet(variant, widths=(16,))).values():
        assert block.get_config() == CBAMResidualDynamicSA(16, **changed).get_config()
        assert isinstance(block.alpha, nn.Parameter) == changed.get("learnable_alpha", False)
        assert float(block.alpha.detach()) == changed.get("alpha_init", 1.0)


def test_zero_start_computes_what_the_plain_network_computes():
    torch.manual_seed(3)
    plain = DemoNet("none", widths=(8, 16)).eval()
    torch.manual_seed(3)
    zero = DemoNet("dsa-zero-start", widths=(8, 16)).eval()
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(zero(x), plain(x))


def test_zero_start_keeps_its_alpha_init_against_overrides():
    overrides = {"alpha_init": 0.5, "learnable_alpha": False, "sa_temperature": 2.0}
    block = next(iter(find_blocks(DemoNet("dsa-zero-start", widths=(8,), attention=overrides)).values()))
    assert float(block.alpha.detach()) == 0.0 and block.learnable_alpha and float(block.sa.temperature) == 2.0


def test_overrides_reach_the_dsa_variants_only():
    overrides = {"alpha_init": 0.5, "sa_temperature": 2.0}
    dsa = next(iter(find_blocks(DemoNet("dsa", widths=(8,), attention=overrides)).values()))
    assert float(dsa.alpha) == 0.5 and float(dsa.sa.temperature) == 2.0
    cbam = next(iter(find_blocks(DemoNet("cbam", widths=(8,), attention=overrides)).values()))
    assert cbam.alpha is None and float(cbam.sa.temperature) == 1.0
    assert attention_kwargs("none", overrides) is None


def test_backbone_starts_from_the_same_weights_in_every_variant():
    states = {}
    for variant in VARIANTS:
        torch.manual_seed(7)
        states[variant] = {k: v for k, v in DemoNet(variant).state_dict().items() if ".attention." not in k}
    reference = states["none"]
    for variant, state in states.items():
        assert state.keys() == reference.keys(), variant
        for key in reference:
            assert torch.equal(state[key], reference[key]), (variant, key)


def test_attention_sits_on_the_residual_branch_before_the_addition():
    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    stage = ResidualStage(4, 8, stride=2, attention=Zero()).eval()
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(stage(x), torch.relu(stage.shortcut(x)))
    identity = ResidualStage(8, 8, stride=1, attention=Zero()).eval()
    torch.testing.assert_close(identity(x.repeat(1, 2, 1, 1)), torch.relu(x.repeat(1, 2, 1, 1)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_round_trip_rebuilds_the_same_function(variant):
    model = DemoNet(variant, num_classes=4, in_channels=3, widths=(8, 16), attention={"alpha_init": 0.75}).eval()
    rebuilt = build_model(model.get_config()).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 24, 24)
    torch.testing.assert_close(rebuilt(x), model(x))
    import json

    assert json.loads(json.dumps(model.get_config())) == model.get_config()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"variant": "se"}, ValueError, "variant must be one of"),
        ({"variant": "dsa", "num_classes": 1}, ValueError, "num_classes"),
        ({"variant": "dsa", "widths": ()}, ValueError, "widths must hold"),
        ({"variant": "dsa", "widths": (8, 0)}, ValueError, r"widths\[1\]"),
        ({"variant": "dsa", "attention": {"alpha_init": float("nan")}}, ValueError, "alpha_init"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        DemoNet(**kwargs)


def test_build_model_refuses_a_non_dict():
    with pytest.raises(TypeError, match="config must be a dict"):
        build_model(["dsa"])
