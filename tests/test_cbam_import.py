"""Classic CBAM checkpoints: timm's CbamModule and the original layout convert into an equal block."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbam_dsa import CBAMResidualDynamicSA, add_attention, cbam_config, find_blocks
from cbam_dsa.integrations import (
    convert_original_cbam_state_dict,
    convert_timm_cbam_modules,
    from_original_cbam,
    from_timm_cbam,
    original_cbam_prefixes,
)

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from timm.layers.cbam import CbamModule, LightCbamModule  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 1e-5}


# --- A reference that mirrors the original implementation (Woo et al., github.com/Jongchan/attention-module,
# MODELS/cbam.py), with its module names, so its state_dict has the original keys.


class BasicConv(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, padding: int = 0, bn: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None

    def forward(self, x):
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class ChannelGate(nn.Module):
    def __init__(self, gate_channels: int, reduction_ratio: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(
            Flatten(),
            nn.Linear(gate_channels, gate_channels // reduction_ratio),
            nn.ReLU(),
            nn.Linear(gate_channels // reduction_ratio, gate_channels),
        )

    def forward(self, x):
        h, w = x.size(2), x.size(3)
        avg = self.mlp(F.avg_pool2d(x, (h, w), stride=(h, w)))
        mx = self.mlp(F.max_pool2d(x, (h, w), stride=(h, w)))
        return x * torch.sigmoid(avg + mx).unsqueeze(2).unsqueeze(3).expand_as(x)


class ChannelPool(nn.Module):
    def forward(self, x):
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class SpatialGate(nn.Module):
    def __init__(self, kernel_size: int = 7, bn: bool = True):
        super().__init__()
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bn=bn)

    def forward(self, x):
        return x * torch.sigmoid(self.spatial(self.compress(x)))


class OriginalCBAM(nn.Module):
    def __init__(self, gate_channels: int, reduction_ratio: int = 16, no_spatial: bool = False, **spatial):
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate(**spatial)

    def forward(self, x):
        x = self.ChannelGate(x)
        return x if self.no_spatial else self.SpatialGate(x)


# --- helpers


def randomize_norms(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, and non-zero biases everywhere."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 2.5 + 0.2)
                m.weight.copy_(1 + torch.randn(m.num_features, generator=gen) * 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return module


def assert_cbam_configuration(block: CBAMResidualDynamicSA, hidden: int, kernel: int) -> None:
    config = block.get_config()
    assert block.ca.hidden == hidden
    assert config["ca_fusion"] == "sum" and block.ca.fusion_logits is None
    assert config["sa_kernels"] == [kernel] and not config["sa_use_dilated"] and block.sa.router is None
    assert not config["residual"] and block.alpha is None
    assert float(block.ca.effective_temperature()) == 1.0 and float(block.sa.effective_temperature()) == 1.0


# --- cbam_config


def test_cbam_config_builds_cbam():
    block = CBAMResidualDynamicSA(256, **cbam_config())
    assert_cbam_configuration(block, hidden=16, kernel=7)
    # The classic parameter count: MLP with biases, one 7x7 conv with a bias (the folded BatchNorm).
    assert sum(p.numel() for p in block.parameters()) == (256 * 16 + 16) + (16 * 256 + 256) + (2 * 49 + 1)


@pytest.mark.parametrize("bad", [dict(reduction=0), dict(spatial_kernel_size=4), dict(gate="tanh"), dict(act="gelu")])
def test_cbam_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        cbam_config(**bad)


# --- timm's CbamModule


@pytest.mark.parametrize("spatial_size", [(7, 7), (12, 9)])
@pytest.mark.parametrize("mlp_bias", [False, True])
@pytest.mark.parametrize(("channels", "module_kwargs"), [(16, {}), (48, {}), (100, {}), (40, {"rd_channels": 7})])
def test_from_timm_cbam_matches_source(channels, module_kwargs, mlp_bias, spatial_size):
    torch.manual_seed(channels)
    source = randomize_norms(CbamModule(channels, mlp_bias=mlp_bias, **module_kwargs), seed=channels).eval()
    block = from_timm_cbam(source)
    assert not block.training
    assert_cbam_configuration(block, hidden=source.channel.fc1.out_channels, kernel=7)
    x = torch.randn(3, channels, *spatial_size) * 2
    with torch.no_grad():
        torch.testing.assert_close(block(x), source(x), **TOL)


@pytest.mark.parametrize(
    "module_kwargs",
    [
        dict(gate_layer="hard_sigmoid"),
        dict(act_layer=nn.SiLU),
        dict(spatial_kernel_size=3),
        dict(spatial_kernel_size=5, act_layer=nn.SiLU, gate_layer="hard_sigmoid", mlp_bias=True),
    ],
)
def test_from_timm_cbam_maps_activation_gate_and_kernel(module_kwargs):
    torch.manual_seed(1)
    source = randomize_norms(CbamModule(32, **module_kwargs)).eval()
    block = from_timm_cbam(source)
    config = block.get_config()
    hard = module_kwargs.get("gate_layer") == "hard_sigmoid"
    assert config["ca_gate"] == config["sa_gate"] == ("hardsigmoid" if hard else "sigmoid")
    assert config["ca_act"] == ("silu" if module_kwargs.get("act_layer") is nn.SiLU else "relu")
    assert config["sa_kernels"] == [module_kwargs.get("spatial_kernel_size", 7)]
    x = torch.randn(2, 32, 10, 11) * 3
    with torch.no_grad():
        torch.testing.assert_close(block(x), source(x), **TOL)


def test_from_timm_cbam_keeps_training_mode_and_leaves_source_untouched():
    source = randomize_norms(CbamModule(16))
    before = {k: v.clone() for k, v in source.state_dict().items()}
    block = from_timm_cbam(source)
    assert block.training
    for key, value in source.state_dict().items():
        assert torch.equal(value, before[key]), key
    # The block is independent of the source: training it does not change the source.
    block.sa.branches[0].weight.data.add_(1.0)
    assert torch.equal(source.spatial.conv.conv.weight, before["spatial.conv.conv.weight"])


def test_from_timm_cbam_float64():
    source = randomize_norms(CbamModule(32)).double().eval()
    block = from_timm_cbam(source)
    assert block.ca.fc1.weight.dtype == torch.float64
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), source(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    ("module", "error", "match"),
    [
        (nn.Conv2d(2, 1, 3), TypeError, "CbamModule"),
        (LightCbamModule(16), TypeError, "CbamModule"),
        (CbamModule(16, act_layer=nn.LeakyReLU), ValueError, "channel.act"),
    ],
)
def test_from_timm_cbam_rejects_what_it_cannot_convert(module, error, match):
    with pytest.raises(error, match=match):
        from_timm_cbam(module)


def test_from_timm_cbam_rejects_batchnorm_without_running_stats():
    source = CbamModule(16)
    source.spatial.conv.bn.running_mean = None
    source.spatial.conv.bn.running_var = None
    with pytest.raises(ValueError, match="running statistics"):
        from_timm_cbam(source)


def test_convert_timm_cbam_modules_whole_model():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, block_args=dict(attn_layer="cbam"))
    model = randomize_norms(model).eval()
    n_cbam = sum(isinstance(m, CbamModule) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        assert convert_timm_cbam_modules(model) is model
        assert not any(isinstance(m, CbamModule) for m in model.modules())
        assert len(find_blocks(model)) == n_cbam == 8
        torch.testing.assert_close(model(x), expected, **TOL)


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (nn.Sequential(nn.Conv2d(3, 3, 1)), ValueError, "no timm CbamModule"),
        (CbamModule(16), ValueError, "from_timm_cbam"),
        ("resnet18", TypeError, "nn.Module"),
    ],
)
def test_convert_timm_cbam_modules_errors(model, error, match):
    with pytest.raises(error, match=match):
        convert_timm_cbam_modules(model)


# --- the original layout


@pytest.mark.parametrize("spatial_size", [(7, 7), (14, 10)])
@pytest.mark.parametrize(("channels", "reduction"), [(16, 16), (64, 16), (96, 8), (100, 16)])
def test_from_original_cbam_matches_source(channels, reduction, spatial_size):
    torch.manual_seed(channels)
    source = randomize_norms(OriginalCBAM(channels, reduction), seed=channels).eval()
    block = from_original_cbam(source.state_dict())
    assert not block.training
    assert_cbam_configuration(block, hidden=channels // reduction, kernel=7)
    x = torch.randn(3, channels, *spatial_size) * 2
    with torch.no_grad():
        torch.testing.assert_close(block(x), source(x), **TOL)


@pytest.mark.parametrize("spatial", [dict(kernel_size=3), dict(bn=False)])
def test_from_original_cbam_variants(spatial):
    torch.manual_seed(2)
    source = randomize_norms(OriginalCBAM(32, 8, **spatial)).eval()
    block = from_original_cbam(source.state_dict())
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(block(x), source(x), **TOL)


@pytest.mark.parametrize("prefix", ["layer1.0.cbam.", "layer1.0.cbam"])
def test_from_original_cbam_with_prefix(prefix):
    source = randomize_norms(OriginalCBAM(32)).eval()
    holder = nn.Module()
    holder.layer1 = nn.Sequential(nn.Module())
    holder.layer1[0].cbam = source
    holder.layer1[0].conv1 = nn.Conv2d(3, 3, 1)
    state = holder.state_dict()
    assert original_cbam_prefixes(state) == ["layer1.0.cbam."]
    block = from_original_cbam(state, prefix=prefix)
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), source(x), **TOL)


def _original_state(**kwargs):
    return randomize_norms(OriginalCBAM(32, **kwargs)).state_dict()


def _without(key):
    state = _original_state()
    del state[key]
    return state


def _with(key, value):
    state = _original_state()
    state[key] = value
    return state


@pytest.mark.parametrize(
    ("state", "prefix", "error", "match"),
    [
        (_without("ChannelGate.mlp.3.bias"), "", KeyError, r"ChannelGate\.mlp\.3\.bias"),
        (_without("SpatialGate.spatial.bn.running_var"), "", KeyError, "running_var"),
        (_original_state(), "layer1.0.cbam.", KeyError, r"found at prefixes \[''\]"),
        ({"fc.weight": torch.zeros(2, 2)}, "", KeyError, "no original CBAM module"),
        (_with("ChannelGate.mlp.3.weight", torch.zeros(32, 3)), "", ValueError, r"must have shape \(32, 2\)"),
        (_with("ChannelGate.mlp.1.weight", torch.zeros(2, 32, 1, 1)), "", ValueError, "Linear weight"),
        (_with("SpatialGate.spatial.conv.weight", torch.zeros(1, 2, 4, 4)), "", ValueError, "k odd"),
        (_with("SpatialGate.spatial.conv.weight", torch.zeros(1, 3, 7, 7)), "", ValueError, "shape"),
        (_with("SpatialGate.spatial.bn.running_mean", torch.zeros(2)), "", ValueError, "shape"),
        (_with("SpatialGate.spatial.0.weight", torch.zeros(1)), "", ValueError, "layout lacks"),
        (_original_state(no_spatial=True), "", ValueError, "no_spatial"),
        ([("ChannelGate.mlp.1.weight", torch.zeros(2, 32))], "", TypeError, "mapping"),
        (_original_state(), 3, TypeError, "prefix"),
    ],
)
def test_from_original_cbam_rejects_mismatched_state_dicts(state, prefix, error, match):
    with pytest.raises(error, match=match):
        from_original_cbam(state, prefix=prefix)


def _add_reference_cbam(model: nn.Module) -> nn.Module:
    """The original ResNet layout: ``cbam`` on the residual branch after the last norm, before the add."""
    for block in model.modules():
        if isinstance(block, torchvision.models.resnet.BasicBlock):
            block.cbam = OriginalCBAM(block.bn2.num_features)
            block.bn2.register_forward_hook(functools.partial(lambda cbam, mod, args, out: cbam(out), block.cbam))
    return model


def test_convert_original_cbam_state_dict_loads_into_add_attention_model():
    torch.manual_seed(0)
    reference = randomize_norms(_add_reference_cbam(torchvision.models.resnet18(num_classes=10))).eval()
    state = reference.state_dict()
    converted = convert_original_cbam_state_dict(state)
    assert not any(".cbam." in key for key in converted)
    model = add_attention(torchvision.models.resnet18(num_classes=10), **cbam_config()).eval()
    model.load_state_dict(converted)  # strict: the key sets are equal
    assert set(converted) == set(model.state_dict())
    for key, value in state.items():  # everything outside CBAM is carried over as is
        if ".cbam." not in key:
            assert converted[key] is value
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **TOL)


def test_convert_original_cbam_state_dict_errors():
    with pytest.raises(ValueError, match="no original CBAM module"):
        convert_original_cbam_state_dict({"fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="attention_name"):
        convert_original_cbam_state_dict(_original_state(), attention_name="a.b")
