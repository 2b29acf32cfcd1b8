"""torch.compile(fullgraph=True) runs the fused operator forward and backward, on the block and inside ResNets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbam_dsa import CBAMResidualDynamicSA, add_attention
from cbam_dsa.integrations.timm import attn_layer
from cbam_dsa.ops import library

FORWARD = library.FORWARD
BACKWARD = library.BACKWARD


def _capturing_backend() -> tuple[object, dict[str, list[torch.fx.GraphModule]]]:
    """An AOTAutograd backend that runs the graphs as they are and keeps them for inspection."""
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, list[torch.fx.GraphModule]] = {"forward": [], "backward": []}

    def keep(kind: str):
        def compiler(graph: torch.fx.GraphModule, example_inputs: object) -> torch.fx.GraphModule:
            graphs[kind].append(graph)
            return graph

        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")), graphs


def _count(graphs: list[torch.fx.GraphModule], target: object) -> int:
    return sum(node.target is target for graph in graphs for node in graph.graph.nodes)


def _parameters_and_input_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("return_maps", [False, True])
def test_the_compiled_block_calls_the_operator_both_ways(return_maps):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = CBAMResidualDynamicSA(16, learnable_alpha=True, alpha_init=0.7, learnable_temperature=True)
    block.return_maps = return_maps
    backend, graphs = _capturing_backend()
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    x = torch.randn(2, 16, 9, 9, requires_grad=True)
    outs = compiled(x)
    out = outs[0] if return_maps else outs
    out.backward(torch.ones_like(out))
    assert _count(graphs["forward"], FORWARD) == 1 and _count(graphs["backward"], BACKWARD) == 1
    got = _parameters_and_input_grads(block, x)
    x.grad = None
    block.zero_grad(set_to_none=True)
    eager = block(x)
    (eager[0] if return_maps else eager).backward(torch.ones_like(out))
    for a, b in zip(got, _parameters_and_input_grads(block, x), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("training", [False, True])
def test_inductor_compiled_block_equals_eager(training):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = CBAMResidualDynamicSA(32)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(4, 32, 14, 14, requires_grad=training)
    if not training:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), block(x))
        return
    compiled(x).square().sum().backward()
    got = _parameters_and_input_grads(block, x)
    x.grad = None
    block.zero_grad(set_to_none=True)
    block(x).square().sum().backward()
    for a, b in zip(got, _parameters_and_input_grads(block, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _timm_resnet() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet18", num_classes=10, block_args={"attn_layer": attn_layer(reduction=8)})


def _torchvision_resnet() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return add_attention(torchvision.models.resnet18(num_classes=10))


@pytest.mark.parametrize("build", [_timm_resnet, _torchvision_resnet], ids=["timm", "torchvision"])
def test_a_compiled_resnet_runs_the_operator_in_every_block(build):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build()
    backend, graphs = _capturing_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    compiled(x).sum().backward()
    assert _count(graphs["forward"], FORWARD) == 8 and _count(graphs["backward"], BACKWARD) == 8
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    for a, b in zip(got, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inductor_hands_the_operator_channels_last_tensors_as_they_are():
    """The operators take any layout (``flexible_layout``): where inductor lays a convolution's output out
    channels_last (its layout optimization, though eager mode's is contiguous), the compiled graph passes that output
    to the operator itself, not a contiguous copy of it."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), CBAMResidualDynamicSA(16)).eval()
    x = torch.randn(2, 3, 12, 12)
    # compiled afresh: the on-disk caches key a graph on the operators' names, not on their tags
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        out, codes = run_and_get_code(torch.compile(model, fullgraph=True), x)
        torch.testing.assert_close(out, model(x))
    code = "\n".join(codes)
    convolutions = re.findall(r"(\w+) = extern_kernels\.convolution\(", code)
    operator = re.findall(r"torch\.ops\.cbam_dsa\.block_forward\.\w+\((\w+),", code)
    assert len(convolutions) == 1 and operator == convolutions, code


@pytest.mark.slow
@pytest.mark.parametrize("training", [False, True])
def test_inductors_cpp_wrapper_runs_the_operator(training):
    """With inductor's C++ wrapper (``cpp_wrapper``), the compiled code calls both operators and equals eager mode:
    it takes operators that return plain tensors or one flat list of them, which ``block_forward`` does."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = CBAMResidualDynamicSA(16, learnable_alpha=True, alpha_init=0.6)
    compiled = torch.compile(block, fullgraph=True, options={"cpp_wrapper": True})
    x = torch.randn(2, 16, 9, 9, requires_grad=training)

    def step(module: nn.Module) -> torch.Tensor:
        with torch.set_grad_enabled(training):
            out = module(x)
            if training:
                out.square().sum().backward()
            return out

    with torch._inductor.config.patch(force_disable_caches=True):
        out, codes = run_and_get_code(step, compiled)
    code = "\n".join(codes)
    assert "CppWrapperCodeCache" in code and "inductor_entry_impl" in code  # the wrapper is C++
    assert "cbam_dsa.block_forward" in code and ("cbam_dsa.block_backward" in code) == training
    got = _parameters_and_input_grads(block, x) if training else []
    x.grad = None
    block.zero_grad(set_to_none=True)
    torch.testing.assert_close(out, step(block))
    for a, b in zip(got, _parameters_and_input_grads(block, x) if training else [], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
