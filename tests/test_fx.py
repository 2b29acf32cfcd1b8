"""FX tracing of models that hold the block: the four tracers users meet, and the traced model equals the eager one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbam_dsa import CBAMResidualDynamicSA, add_attention
from cbam_dsa.integrations.timm import attn_layer
from cbam_dsa.ops import library

OPERATOR = library.FORWARD


def _operator_nodes(graph_module: torch.fx.GraphModule) -> int:
    return sum(node.op == "call_function" and node.target is OPERATOR for node in graph_module.graph.nodes)


@pytest.mark.parametrize("return_maps", [False, True])
@pytest.mark.parametrize("config", [{}, {"ca_fusion": "sum", "sa_kernels": (3,), "sa_use_dilated": False}])
def test_symbolic_trace_records_the_operator_and_equals_eager(config, return_maps):
    torch.manual_seed(0)
    block = CBAMResidualDynamicSA(16, return_maps=return_maps, **config)
    traced = torch.fx.symbolic_trace(block)
    assert _operator_nodes(traced) == 1
    x = torch.randn(2, 16, 9, 7)
    expected, got = block(x), traced(x)
    for a, b in zip(got if return_maps else [got], expected if return_maps else [expected], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_symbolic_trace_of_the_reference_path_records_standard_operators():
    block = CBAMResidualDynamicSA(8)
    block.fast_path = False
    traced = torch.fx.symbolic_trace(block)
    assert _operator_nodes(traced) == 0
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(traced(x), block(x))


def test_the_input_check_runs_on_the_shapes_fx_records():
    traced = torch.fx.symbolic_trace(CBAMResidualDynamicSA(8))
    with pytest.raises(ValueError, match="x has 3 channels"):
        traced(torch.randn(1, 3, 5, 5))  # the traced graph's operator refuses a wrong channel count
    graph = torch.fx.symbolic_trace(nn.Identity())
    placeholder = next(iter(graph.graph.nodes))
    placeholder.meta["tensor_meta"] = torch.fx.passes.shape_prop.TensorMetadata(
        torch.Size([1, 3, 5, 5]), torch.float32, False, (75, 25, 5, 1), torch.contiguous_format, False, {}
    )
    from cbam_dsa._checks import check_input

    with pytest.raises(ValueError, match="built for 4"):
        check_input(torch.fx.Proxy(placeholder), 4)


def test_torchvision_feature_extractor_on_a_resnet_with_the_block():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = add_attention(torchvision.models.resnet18(num_classes=10)).eval()
    extractor = create_feature_extractor(model, return_nodes={"layer2": "c3", "layer4": "c5"})
    assert _operator_nodes(extractor) == 8
    x = torch.randn(2, 3, 64, 64)
    features = extractor(x)
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        c3 = model.layer2(model.layer1(h))
        c5 = model.layer4(model.layer3(c3))
    torch.testing.assert_close(features["c3"], c3)
    torch.testing.assert_close(features["c5"], c5)


def test_timm_fx_features_on_a_resnet_with_the_block():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kwargs = {"block_args": {"attn_layer": attn_layer(reduction=8)}, "num_classes": 10}
    traced = timm.create_model("resnet18", features_only=True, feature_cls="fx", out_indices=(2, 4), **kwargs).eval()
    assert _operator_nodes(traced.graph_module) == 8
    eager = timm.create_model("resnet18", num_classes=10, block_args=kwargs["block_args"]).eval()
    state = {key.removeprefix("graph_module."): value for key, value in traced.state_dict().items()}
    eager.load_state_dict(state, strict=False)  # the feature model has no classifier
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = eager.forward_intermediates(x, indices=[2, 4], intermediates_only=True)
        for a, b in zip(traced(x), expected, strict=True):
            torch.testing.assert_close(a, b)


def test_fx_quantization_prepare_and_convert():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), CBAMResidualDynamicSA(16)).eval()
    x = torch.randn(2, 3, 12, 12)
    prepared = prepare_fx(model, get_default_qconfig_mapping(), example_inputs=(x,))
    assert _operator_nodes(prepared) == 1
    torch.testing.assert_close(prepared(x), model(x))  # observers do not change the float model
    converted = convert_fx(prepared)
    assert _operator_nodes(converted) == 1
    out = converted(x)
    assert out.shape == (2, 16, 12, 12) and torch.isfinite(out).all()
