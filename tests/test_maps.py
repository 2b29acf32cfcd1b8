"""MapRecorder: every block's maps from a whole model, outputs unchanged, nothing left attached."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbam_dsa import AttentionMaps, CBAMResidualDynamicSA, MapRecorder, add_attention, find_blocks

INPUT = (2, 3, 64, 64)


def block_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Size]:
    """The input shape of every block, observed independently of the recorder."""
    shapes, handles = {}, []
    for name, block in find_blocks(model).items():
        handles.append(block.register_forward_pre_hook(lambda m, args, name=name: shapes.update({name: args[0].shape})))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return shapes


def assert_clean(model: nn.Module, flags: dict[str, bool] | None = None) -> None:
    for name, block in find_blocks(model).items():
        assert not block._forward_hooks, f"{name} still has forward hooks"
        assert block.return_maps is (flags or {}).get(name, False)
        assert block.ca.return_fusion_weights is block.return_maps
        assert block.sa.return_router_weights is block.return_maps


def timm_resnet18() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "resnet18", pretrained=False, num_classes=10, block_args=dict(attn_layer=CBAMResidualDynamicSA)
    )


def torchvision_resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return add_attention(torchvision.models.resnet18(num_classes=10), sa_kernels=(3,), sa_use_dilated=False)


MODELS = {"timm": (timm_resnet18, ".se", 3), "torchvision": (torchvision_resnet18, ".attention", 1)}


@pytest.fixture(scope="module", params=list(MODELS))
def whole_model(request):
    torch.manual_seed(0)
    build, suffix, branches = MODELS[request.param]
    return build().eval(), suffix, branches


def test_recorder_collects_every_block_with_the_right_shapes(whole_model):
    model, suffix, branches = whole_model
    x = torch.randn(*INPUT)
    inputs = block_inputs(model, x)
    assert len(inputs) == 8 and all(name.endswith(suffix) for name in inputs)
    with torch.no_grad(), MapRecorder(model) as recorder:
        model(x)
    assert set(recorder.maps) == set(inputs)
    for name, maps in recorder.maps.items():
        batch, channels, height, width = inputs[name]
        assert isinstance(maps, AttentionMaps)
        shapes = {key: tuple(t.shape) for key, t in maps.as_dict().items()}
        assert shapes == {
            "ca": (batch, channels, 1, 1),
            "sa": (batch, 1, height, width),
            "fusion_w": (2,),
            "router_w": (batch, branches),
        }
        assert maps.ca.min() >= 0 and maps.ca.max() <= 1 and maps.sa.min() >= 0 and maps.sa.max() <= 1
        torch.testing.assert_close(maps.router_w.sum(dim=1), torch.ones(batch))
        torch.testing.assert_close(maps.fusion_w.sum(), torch.tensor(1.0))  # softmax fusion by default
    assert_clean(model)


def test_recorder_leaves_the_output_unchanged(whole_model):
    model, _, _ = whole_model
    x = torch.randn(*INPUT)
    with torch.no_grad():
        before = model(x)
        with MapRecorder(model):
            during = model(x)
        after = model(x)
    assert torch.equal(before, after)
    # recording asks the blocks for their maps: the same operator call, which returns them anyway
    assert torch.equal(during, before)


def test_recorder_cleans_up_when_the_forward_raises(whole_model):
    model, _, _ = whole_model
    with pytest.raises(RuntimeError), MapRecorder(model) as recorder:
        model(torch.randn(1, 5, 64, 64))  # wrong number of input channels
    assert not recorder.recording
    assert_clean(model)


# --- behaviour on small models


def small_model(**block_kwargs) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), CBAMResidualDynamicSA(16, **block_kwargs), nn.Conv2d(16, 4, 1))


def test_block_that_returns_maps_keeps_returning_its_tuple():
    block = CBAMResidualDynamicSA(16, return_maps=True)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), block)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        before = model(x)
        with MapRecorder(model) as recorder:
            during = model(x)
    assert isinstance(during, tuple) and len(during) == 5
    assert all(torch.equal(a, b) for a, b in zip(before, during, strict=True))
    assert torch.equal(recorder.maps["1"].sa, before[2])
    assert_clean(model, flags={"1": True})


def test_recorder_cleans_up_when_a_block_raises():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), CBAMResidualDynamicSA(16), CBAMResidualDynamicSA(8))
    with pytest.raises(ValueError, match="built for 8"), MapRecorder(model) as recorder:
        model(torch.randn(1, 3, 12, 12))
    assert set(recorder.maps) == {"1"}  # the first block ran before the second refused its input
    assert_clean(model)


def test_detach_and_keep_all():
    model = small_model()
    x = torch.randn(2, 3, 12, 12)
    with MapRecorder(model, detach=False, keep_all=True) as recorder:
        model(x)
        model(x[:1])
    maps = recorder.maps["1"]
    assert [m.ca.shape[0] for m in maps] == [2, 1]
    assert maps[0].sa.requires_grad  # still part of the graph: can be used in a loss
    with MapRecorder(model) as recorder:
        model(x)
        model(x[:1])
    assert isinstance(recorder.maps["1"], AttentionMaps) and recorder.maps["1"].ca.shape[0] == 1
    assert not recorder.maps["1"].sa.requires_grad


def test_maps_from_a_recorder_give_gradients():
    model = small_model()
    with MapRecorder(model, detach=False) as recorder:
        model(torch.randn(2, 3, 12, 12))
    recorder.maps["1"].sa.mean().backward()
    assert model[1].sa.branches[0].weight.grad is not None


def test_recorder_nests_and_sees_blocks_added_later():
    model = small_model()
    x = torch.randn(2, 3, 12, 12)
    outer = MapRecorder(model)
    model.append(CBAMResidualDynamicSA(4))  # added after the recorder was made
    with torch.no_grad():
        expected = model(x)
        with outer:
            with MapRecorder(model) as inner:
                torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
            assert set(inner.maps) == {"1", "3"}
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert set(outer.maps) == {"1", "3"}
    assert_clean(model)


def test_user_hooks_see_the_usual_output():
    model = small_model()
    seen = []
    handle = model[1].register_forward_hook(lambda m, args, out: seen.append(type(out)))
    with torch.no_grad(), MapRecorder(model):
        model(torch.randn(1, 3, 12, 12))
    handle.remove()
    assert seen == [torch.Tensor]


def test_recorder_on_a_block_itself_and_on_a_model_without_blocks():
    block = CBAMResidualDynamicSA(8)
    with torch.no_grad(), MapRecorder(block) as recorder:
        out = block(torch.randn(1, 8, 5, 5))
    assert isinstance(out, torch.Tensor) and set(recorder.maps) == {""}
    with MapRecorder(nn.Conv2d(3, 3, 1)) as recorder:
        pass
    assert recorder.maps == {}


def test_recorder_errors():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        MapRecorder("model")
    with pytest.raises(TypeError, match="detach"):
        MapRecorder(small_model(), detach=1)
    with pytest.raises(TypeError, match="keep_all"):
        MapRecorder(small_model(), keep_all="yes")
    model = small_model()
    recorder = MapRecorder(model)
    with recorder, pytest.raises(RuntimeError, match="entered twice"), recorder:
        pass
    assert_clean(model)
