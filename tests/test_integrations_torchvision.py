"""torchvision: add_attention inserts the block where CBAM goes and leaves everything else as it was."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from cbam_dsa import CBAMResidualDynamicSA, add_attention, find_blocks
from cbam_dsa.integrations import torchvision as tv_integration

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, Bottleneck  # noqa: E402

NUM_CLASSES = 10
SMALL_INPUT = (2, 3, 32, 32)  # resnets still reach 1x1 maps in their last stage
# name -> (constructor, number of residual blocks, the norm the attention follows)
MODELS = {
    "resnet18": (torchvision.models.resnet18, 8, "bn2"),
    "resnet50": (torchvision.models.resnet50, 16, "bn3"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def pristine(request):
    """A torchvision model with non-trivial norms, built once per module; tests work on deep copies."""
    torch.manual_seed(0)
    model = MODELS[request.param][0](num_classes=NUM_CLASSES)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return request.param, model


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def test_add_attention_inserts_one_block_per_residual_block(pristine):
    name, source = pristine
    _, n_blocks, norm_name = MODELS[name]
    model = copy.deepcopy(source)
    assert add_attention(model) is model
    blocks = find_blocks(model)
    assert len(blocks) == n_blocks == len(residual_blocks(model))
    for host in residual_blocks(model):
        assert isinstance(host.attention, CBAMResidualDynamicSA)
        assert host.attention.channels == getattr(host, norm_name).num_features
    assert set(blocks) == {
        f"{n}.attention" for n, m in model.named_modules() if isinstance(m, (BasicBlock, Bottleneck))
    }


def test_attention_sits_after_the_last_norm_before_the_add(pristine):
    name, source = pristine
    norm_name = MODELS[name][2]
    model = add_attention(copy.deepcopy(source)).eval()
    seen = {}
    hosts = {"no downsample": model.layer1[1], "downsample": model.layer2[0]}
    for key, host in hosts.items():
        getattr(host, norm_name).register_forward_hook(lambda m, a, out, key=key: seen.update({(key, "norm"): out}))
        host.attention.register_forward_hook(
            lambda m, a, out, key=key: seen.update({(key, "in"): a[0], (key, "out"): out})
        )
        host.register_forward_hook(lambda m, a, out, key=key: seen.update({(key, "x"): a[0], (key, "host"): out}))
    with torch.no_grad():
        model(torch.randn(*SMALL_INPUT))
        for key, host in hosts.items():
            assert seen[(key, "in")] is seen[(key, "norm")]  # the block takes the last norm's output
            identity = seen[(key, "x")] if host.downsample is None else host.downsample(seen[(key, "x")])
            assert torch.equal(seen[(key, "host")], torch.relu(seen[(key, "out")] + identity))


def test_add_attention_keeps_every_weight_and_key(pristine):
    _, source = pristine
    model = add_attention(copy.deepcopy(source))
    before, after = source.state_dict(), model.state_dict()
    added = set(after) - set(before)
    assert set(before) <= set(after)
    assert added and all(".attention." in key for key in added)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    # A torchvision checkpoint loads into the modified model: the block's keys are the only missing ones.
    fresh = add_attention(MODELS[pristine[0]][0](num_classes=NUM_CLASSES))
    result = fresh.load_state_dict(before, strict=False)
    assert set(result.missing_keys) == added and not result.unexpected_keys


@pytest.mark.parametrize("train_mode", [False, True])
def test_alpha_zero_leaves_the_output_exactly_unchanged(pristine, train_mode):
    """``out = x + 0 * (y - x)`` is exactly ``x`` for finite ``y``, so the check is bitwise, not approximate."""
    _, source = pristine
    x = torch.randn(*SMALL_INPUT)
    reference = copy.deepcopy(source).train(train_mode)
    model = add_attention(copy.deepcopy(source).train(train_mode), alpha_init=0.0, learnable_alpha=True)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        if train_mode:  # the BatchNorm running statistics moved identically
            for key, value in reference.state_dict().items():
                assert torch.equal(model.state_dict()[key], value), key


def test_add_attention_output_changes_with_default_alpha(pristine):
    _, source = pristine
    x = torch.randn(*SMALL_INPUT)
    model = add_attention(copy.deepcopy(source)).eval()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, NUM_CLASSES)
        assert not torch.allclose(out, source.eval()(x))


@pytest.mark.slow
def test_add_attention_training_step(pristine):
    _, source = pristine
    model = add_attention(copy.deepcopy(source), learnable_alpha=True).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, target = torch.randn(*SMALL_INPUT), torch.tensor([1, 7])
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    blocks = find_blocks(model)
    alphas = [b.alpha.detach().clone() for b in blocks.values()]
    optimizer.step()
    assert all(not torch.equal(a, b.alpha) for a, b in zip(alphas, blocks.values(), strict=True))


def test_block_options_reach_every_block():
    model = add_attention(
        torchvision.models.resnet18(num_classes=NUM_CLASSES), reduction=4, sa_kernels=(5,), sa_use_dilated=False
    )
    for block in find_blocks(model).values():
        assert block.ca.hidden == block.channels // 4
        assert block.sa.num_branches == 1


def test_add_attention_follows_dtype_and_training_mode():
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES).double().eval()
    add_attention(model)
    for block in find_blocks(model).values():
        assert block.ca.fc1.weight.dtype == torch.float64 and not block.training
    with torch.no_grad():
        assert model(torch.randn(*SMALL_INPUT, dtype=torch.float64)).dtype == torch.float64


# --- surviving copies, state_dict round trips, pickling, tracing and compilation


def tiny_resnet() -> nn.Module:
    """Both block types, with and without a downsample shortcut, at a size that traces and compiles quickly."""
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        BasicBlock(8, 8),
        BasicBlock(8, 16, stride=2, downsample=downsample),
        Bottleneck(16, 4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, NUM_CLASSES),
    )


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return add_attention(tiny_resnet()).eval()


def test_tiny_model_holds_both_block_types(tiny):
    assert [type(m).__name__ for m in tiny[1:4]] == [
        "AttentionBasicBlock",
        "AttentionBasicBlock",
        "AttentionBottleneck",
    ]


def test_deepcopy_pickle_and_state_dict_round_trip(tiny):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = tiny(x)
        for clone in (copy.deepcopy(tiny), pickle.loads(pickle.dumps(tiny))):
            assert [type(m) for m in clone.modules()] == [type(m) for m in tiny.modules()]
            assert torch.equal(clone(x), expected)
        fresh = add_attention(tiny_resnet()).eval()
        fresh.load_state_dict(tiny.state_dict())
        assert torch.equal(fresh(x), expected)


@pytest.mark.slow
def test_trace_and_compile(tiny):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing's deprecation and shape-check warnings
        expected = tiny(x)
        traced = torch.jit.trace(tiny, x, check_trace=False)
        torch.testing.assert_close(traced(x), expected)
        compiled = torch.compile(tiny, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), expected)


def test_lazy_classes_are_module_attributes():
    assert tv_integration.AttentionBasicBlock.__bases__ == (BasicBlock,)
    assert tv_integration.AttentionBottleneck.__bases__ == (Bottleneck,)
    with pytest.raises(AttributeError, match="Nothing"):
        _ = tv_integration.Nothing


# --- errors


class OwnBlock(BasicBlock):
    def forward(self, x):
        return super().forward(x) * 2


def _model_with_own_block():
    model = nn.Sequential(OwnBlock(8, 8))
    return model


@pytest.mark.parametrize(
    ("build", "kwargs", "error", "match"),
    [
        (lambda: "resnet18", {}, TypeError, "torch.nn.Module"),
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3)), {}, ValueError, "no torchvision ResNet BasicBlock"),
        (lambda: add_attention(torchvision.models.resnet18()), {}, ValueError, "already has attention"),
        (_model_with_own_block, {}, ValueError, "own forward"),
        (lambda: torchvision.models.resnet18(), {"channels": 8}, TypeError, "channels is given by the model"),
        (lambda: torchvision.models.resnet18(), {"reductio": 8}, TypeError, "'reductio' is not an option"),
        (lambda: torchvision.models.resnet18(), {"alpha_init": float("nan")}, ValueError, "alpha_init"),
        (lambda: torchvision.models.resnet18(), {"return_maps": True}, ValueError, "MapRecorder"),
    ],
)
def test_add_attention_errors_leave_the_model_unchanged(build, kwargs, error, match):
    model = build()
    types_before = [type(m) for m in model.modules()] if isinstance(model, nn.Module) else None
    with pytest.raises(error, match=match):
        add_attention(model, **kwargs)
    if types_before is not None:
        assert [type(m) for m in model.modules()] == types_before


def test_add_attention_on_a_timm_model_points_to_attn_layer():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="attn_layer"):
        add_attention(model)


@pytest.mark.slow
def test_importing_the_package_imports_neither_timm_nor_torchvision():
    code = "import sys, cbam_dsa, cbam_dsa.integrations; print(sorted({'timm', 'torchvision'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
