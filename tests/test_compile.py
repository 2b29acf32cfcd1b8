"""torch.compile(fullgraph=True) runs the fused operator forward and backward, on the block and inside ResNets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbam_dsa import CBAMResidualDynamicSA, add_attention
from cbam_dsa.integrations.timm import attn_layer
from cbam_dsa.ops import library
from cbam_dsa.ops.cpu import native
from cbam_dsa.ops.pytorch import KEEP_POOLS_FROM_PIXELS

FORWARD = library.FORWARD
BACKWARD = library.BACKWARD


def _capturing_backend() -> tuple[object, dict[str, list[torch.fx.GraphModule]]]:
    """An AOTAutograd backend that runs the graphs as they are and keeps them for inspection."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs: dict[str, list[torch.fx.GraphModule]] = {"forward": [], "backward": []}

    def keep(kind: str):
        def compiler(graph: torch.fx.GraphModule, example_inputs: object) -> object:
            graphs[kind].append(graph)
            return make_boxed_func(graph)  # AOTAutograd calls it with the arguments in one list

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


def _training_step(module: nn.Module, block: CBAMResidualDynamicSA, x: torch.Tensor) -> list[torch.Tensor]:
    """The output and every gradient (input and parameters) of one step of ``module`` (``block`` or a compiled
    ``block``) under a fixed loss."""
    x = x.detach().clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    out = module(x)
    out.float().square().mean().backward()
    return [out.detach(), *_parameters_and_input_grads(block, x)]


@pytest.mark.slow
def test_dynamic_shapes_compile_once_per_side_of_the_short_map_threshold():
    """``dynamic=True``: one graph for batches and maps of other sizes, the operator in it, equal to eager mode. What
    the operator saves for backward differs for maps under ``KEEP_POOLS_FROM_PIXELS`` pixels (the fake kernel says
    so), so maps on the other side of it compile one more graph, and no more after that."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = CBAMResidualDynamicSA(16, learnable_alpha=True, alpha_init=0.6)
    backend, graphs = _capturing_backend()
    compiled = torch.compile(block, backend=backend, fullgraph=True, dynamic=True)
    short = [(2, 16, 9, 7), (3, 16, 5, 11), (4, 16, 2, 3)]
    long = [(2, 16, 12, 12), (3, 16, 10, 13)]
    assert all(h * w < KEEP_POOLS_FROM_PIXELS for *_, h, w in short)
    assert all(h * w >= KEEP_POOLS_FROM_PIXELS for *_, h, w in long)
    for count, shapes in ((1, short), (2, long + short)):
        for shape in shapes:
            x = torch.randn(shape)
            for got, expected in zip(_training_step(compiled, block, x), _training_step(block, block, x), strict=True):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert len(graphs["forward"]) == count and len(graphs["backward"]) == count, "compiled again for a size"
    assert _count(graphs["forward"], FORWARD) == 2 and _count(graphs["backward"], BACKWARD) == 2


@pytest.mark.slow
def test_inductor_compiled_block_under_autocast_equals_eager():
    """Mixed precision (``torch.autocast`` to bfloat16, float32 parameters), as a compiled training loop runs it: the
    inductor-compiled step gives what the eager one gives under the same autocast, the operator running."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)  # under autocast its output, the block's input, is bfloat16
    block = CBAMResidualDynamicSA(16)
    model = nn.Sequential(conv, block)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 8, 10, 9)
    kernels = native.library()

    def calls() -> tuple[int, int]:
        return (kernels.calls("block_forward"), kernels.calls("block_backward")) if kernels else (0, 0)

    before = calls()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _training_step(compiled, block, x)
    ran = tuple(after - start for after, start in zip(calls(), before, strict=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _training_step(model, block, x)
    assert got[0].dtype == torch.bfloat16
    if kernels is not None:  # the C kernels built: one call each way
        assert ran == (1, 1)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)
