"""timm: the block as attn_layer builds, trains and infers; its parameter overhead over CBAM is small."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch import nn

from cbam_dsa import CBAMResidualDynamicSA, find_blocks
from cbam_dsa.integrations.timm import HOST_ARGUMENTS, attn_layer, create_block

timm = pytest.importorskip("timm")
from timm.layers.cbam import CbamModule  # noqa: E402

SMALL_INPUT = (2, 3, 32, 32)  # the blocks still see maps from 8x8 down to 1x1
NUM_CLASSES = 10


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    """One SGD step; every parameter must get a finite gradient and the loss must be finite."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    target = torch.arange(x.shape[0]) % NUM_CLASSES
    loss = nn.functional.cross_entropy(model(x), target)
    optimizer.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    block = next(iter(find_blocks(model).values()))
    before = [p.detach().clone() for p in block.parameters()]
    optimizer.step()
    assert all(not torch.equal(old, new) for old, new in zip(before, block.parameters(), strict=True))


def check_inference(model: nn.Module, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (x.shape[0], NUM_CLASSES)
        assert torch.isfinite(out).all()
        assert torch.equal(out, model(x))  # eval is deterministic


# Residual blocks per model: each holds one attention block.
EXPECTED_BLOCKS = {"resnet18": 8, "resnet50": 16, "skresnet18": 8}


@pytest.fixture(scope="module")
def resnet50():
    """Built with a partial carrying block options (the defaults restated, so the parameter count is the class's)."""
    torch.manual_seed(0)
    layer = functools.partial(CBAMResidualDynamicSA, reduction=16, ca_fusion="softmax", sa_kernels=(3, 7))
    return timm.create_model("resnet50", pretrained=False, block_args=dict(attn_layer=layer))


@pytest.mark.slow
def test_resnet50_with_block_trains_and_infers(resnet50):
    blocks = find_blocks(resnet50)
    assert len(blocks) == EXPECTED_BLOCKS["resnet50"]
    assert all(name.endswith(".se") for name in blocks)  # timm's attention slot: after bn3, before the add
    x = torch.randn(*SMALL_INPUT)
    resnet50.train()
    optimizer = torch.optim.SGD(resnet50.parameters(), lr=0.01)
    loss = resnet50(x).logsumexp(dim=1).mean()
    loss.backward()
    # Every parameter is in the graph (timm zero-initialises the last norms, so the blocks' gradients are zero
    # at init; test_timm_models_build_train_and_infer shows them learning).
    assert all(p.grad is not None for p in resnet50.parameters())
    optimizer.step()
    optimizer.zero_grad()
    resnet50.eval()
    with torch.no_grad():
        out = resnet50(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


LAYERS = {
    "class": CBAMResidualDynamicSA,
    "partial": functools.partial(CBAMResidualDynamicSA, reduction=8, sa_kernels=(5,), learnable_alpha=True),
    "attn_layer": attn_layer(ca_fusion="sum", sa_gate="hardsigmoid", learnable_temperature=True),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_name", "layer_kind"),
    [
        ("resnet18", "class"),
        ("resnet18", "partial"),
        ("resnet18", "attn_layer"),
        ("skresnet18", "class"),
        ("skresnet18", "partial"),
    ],
)
def test_timm_models_build_train_and_infer(model_name, layer_kind):
    torch.manual_seed(0)
    layer = LAYERS[layer_kind]
    model = timm.create_model(model_name, pretrained=False, num_classes=NUM_CLASSES, block_args=dict(attn_layer=layer))
    # timm zero-initialises the last norm of each residual branch, so at init the blocks see zeros and get zero
    # gradients; unit norm weights let the step below show that every block parameter learns.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    blocks = find_blocks(model)
    assert len(blocks) == EXPECTED_BLOCKS[model_name]
    reference = layer(64)  # the options the layer carries reach every block
    for block in blocks.values():
        config = block.get_config()
        assert {k: v for k, v in config.items() if k != "channels"} == {
            k: v for k, v in reference.get_config().items() if k != "channels"
        }
    x = torch.randn(*SMALL_INPUT)
    train_step(model, x)
    check_inference(model, x)


@pytest.mark.parametrize("act_layer", ["silu", "relu"])
def test_cspnet_passes_act_layer_through_attn_layer(act_layer):
    from timm.models.cspnet import CspNet, model_cfgs

    cfg = model_cfgs["cs3darknet_s"]
    stages = dataclasses.replace(cfg.stages, attn_layer=attn_layer(sa_kernels=(3,), sa_use_dilated=False))
    model = CspNet(dataclasses.replace(cfg, stages=stages, act_layer=act_layer), num_classes=NUM_CLASSES)
    blocks = find_blocks(model)
    assert len(blocks) == sum(cfg.stages.depth)
    assert {b.get_config()["ca_act"] for b in blocks.values()} == {act_layer}
    check_inference(model, torch.randn(2, 3, 32, 32))


def test_timm_passes_device_and_dtype():
    model = timm.create_model(
        "resnet18",
        pretrained=False,
        num_classes=NUM_CLASSES,
        block_args=dict(attn_layer=CBAMResidualDynamicSA),
        dtype=torch.float64,
    )
    for block in find_blocks(model).values():
        assert {t.dtype for t in [*block.parameters(), *block.buffers()]} == {torch.float64}
    check_inference(model, torch.randn(*SMALL_INPUT, dtype=torch.float64))
    meta = timm.create_model("resnet18", pretrained=False, block_args=dict(attn_layer=attn_layer()), device="meta")
    for block in find_blocks(meta).values():
        assert {t.device.type for t in [*block.parameters(), *block.buffers()]} == {"meta"}


def _block_overhead_over_cbam(block: CBAMResidualDynamicSA) -> int:
    """Weights the block has beyond timm's CbamModule with MLP biases (the CBAM paper's layout), by construction.

    Both share the channel MLP. CBAM's spatial part is a bias-free 7x7 conv (2 -> 1) and a BatchNorm (2 affine
    weights); ours has a biased conv per branch, a router 2 -> hidden -> K, and two fusion logits.
    """
    config = block.get_config()
    kernels = [*config["sa_kernels"], *([config["sa_dilated_kernel"]] if config["sa_use_dilated"] else [])]
    branches = sum(2 * k * k + 1 for k in kernels)
    k, hidden = len(kernels), config["sa_router_hidden"]
    router = (2 * hidden + hidden) + (hidden * k + k) if k > 1 else 0
    fusion = 2 if config["ca_fusion"] == "softmax" else 0
    temperatures = 2 if config["learnable_temperature"] else 0
    alpha = 1 if config["learnable_alpha"] else 0
    cbam_spatial = 2 * 7 * 7 + 2
    return branches + router + fusion + temperatures + alpha - cbam_spatial


def test_resnet50_parameter_count_and_overhead_over_cbam(resnet50):
    def build(layer):
        return timm.create_model("resnet50", pretrained=False, block_args=dict(attn_layer=layer), device="meta")

    ours = count_parameters(build(CBAMResidualDynamicSA))
    assert ours == count_parameters(resnet50)
    # The CBAM paper's ResNet-50 + CBAM has 28.09 M parameters; with ours it is about 28.1 M.
    assert abs(ours - 28.09e6) < 0.01 * 28.09e6
    assert round(ours / 1e6, 1) == 28.1

    cbam_with_bias = count_parameters(build(functools.partial(CbamModule, mlp_bias=True)))
    timm_cbam = count_parameters(build(CbamModule))  # timm's default: MLP without biases
    blocks = list(find_blocks(resnet50).values())
    per_block = [_block_overhead_over_cbam(b) for b in blocks]
    assert ours - cbam_with_bias == sum(per_block)
    assert max(per_block) < 300  # a few hundred weights per block
    mlp_biases = sum(b.channels + b.ca.hidden for b in blocks)
    assert ours - timm_cbam == sum(per_block) + mlp_biases


@pytest.mark.parametrize("name", HOST_ARGUMENTS)
def test_attn_layer_refuses_host_arguments(name):
    with pytest.raises(TypeError, match=f"{name} is given by the model"):
        attn_layer(**{name: 16})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(reduce=8), TypeError, r"'reduce' is not an option.*reduction"),
        (dict(return_maps=True), ValueError, "MapRecorder"),
        (dict(reduction=0), ValueError, "reduction"),
        (dict(sa_kernels=(4,)), ValueError, "sa_kernels"),
        (dict(ca_gate="relu"), ValueError, "ca_gate"),
        (dict(learnable_alpha="yes"), TypeError, "learnable_alpha"),
    ],
)
def test_attn_layer_checks_options_at_once(kwargs, error, match):
    with pytest.raises(error, match=match):
        attn_layer(**kwargs)


def test_attn_layer_is_a_partial_timm_can_call():
    layer = attn_layer(reduction=4)
    assert isinstance(layer, functools.partial)
    block = layer(32, device="cpu", dtype=torch.float64)
    assert isinstance(block, CBAMResidualDynamicSA)
    assert block.ca.hidden == 8 and block.ca.fc1.weight.dtype == torch.float64


@pytest.mark.parametrize(
    ("act_layer", "expected"),
    [
        (nn.ReLU, "relu"),
        (functools.partial(nn.ReLU, inplace=True), "relu"),
        (nn.SiLU, "silu"),
        ("swish", "silu"),
        ("relu", "relu"),
        (None, "relu"),
    ],
)
def test_create_block_maps_act_layer(act_layer, expected):
    assert create_block(16, act_layer=act_layer).get_config()["ca_act"] == expected


def test_create_block_explicit_ca_act_wins_and_unknown_act_is_refused():
    assert create_block(16, act_layer=nn.LeakyReLU, ca_act="silu").get_config()["ca_act"] == "silu"
    with pytest.raises(ValueError, match="ca_act"):
        create_block(16, act_layer=nn.LeakyReLU)
    with pytest.raises(ValueError, match="ca_act"):
        create_block(16, act_layer="leaky_relu")
