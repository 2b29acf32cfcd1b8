"""The forward operator's autograd kernel: one autograd node where a gradient is wanted, the kernel below autograd
everywhere else. On the CPU, once the library is loaded, a C++ kernel takes the Python one's place; it must make the
same choice, and give the same values and gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch

from cbam_dsa import CBAMResidualDynamicSA, ops
from cbam_dsa.ops import autograd
from cbam_dsa.ops.cpu import native

# name: (grad mode, x requires grad, parameters require grad, whether a node is wanted)
CASES = {
    "everything_requires_grad": (contextlib.nullcontext, True, True, True),
    "only_x": (contextlib.nullcontext, True, False, True),
    "only_parameters": (contextlib.nullcontext, False, True, True),
    "nothing_requires_grad": (contextlib.nullcontext, False, False, False),
    "no_grad": (torch.no_grad, True, True, False),
    "inference_mode": (torch.inference_mode, True, True, False),
}


@pytest.fixture(params=["cpp", "python"])
def kernel(request, monkeypatch):
    """The CPU's autograd kernel: the library's C++ one, or the Python one put back in its place for the test."""
    monkeypatch.setenv("CBAM_DSA_NATIVE", "1")
    if native.library() is None:
        pytest.skip("the C kernels cannot be built here")
    if request.param == "cpp":
        yield request.param
        return
    override = torch.library.Library("cbam_dsa", "IMPL")
    override.impl("block_forward", autograd.autograd_forward, "AutogradCPU")
    try:
        yield request.param
    finally:
        override._destroy()


def test_the_loaded_library_registers_the_cpu_autograd_kernel(monkeypatch):
    """The C++ kernel registered for AutogradCPU, beside the Python one for every other device."""
    monkeypatch.setenv("CBAM_DSA_NATIVE", "1")
    if native.library() is None:
        pytest.skip("the C kernels cannot be built here")
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    name = ops.FORWARD.name()  # cbam_dsa::block_forward.<overload>
    assert has(name, "AutogradCPU") and has(name, "CPU") and has(ops.BACKWARD.name(), "CPU")
    assert has(name, "Autograd")
    assert has("cbam_dsa::_differentiable_block_forward", "CompositeImplicitAutograd")


def _blocks(requires_grad: bool) -> tuple[CBAMResidualDynamicSA, CBAMResidualDynamicSA]:
    """A block with random parameters (every gradient exercised), and a copy on the reference path."""
    torch.manual_seed(0)
    block = CBAMResidualDynamicSA(8, sa_kernels=(3, 5), learnable_temperature=True, learnable_alpha=True).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    reference = CBAMResidualDynamicSA(**block.get_config()).double()
    reference.load_state_dict(block.state_dict())
    reference.fast_path = False
    block.return_maps = reference.return_maps = True
    return block.requires_grad_(requires_grad), reference.requires_grad_(requires_grad)


@pytest.mark.parametrize("case", list(CASES))
def test_the_autograd_kernel_records_a_node_only_where_a_gradient_is_wanted(kernel, case, monkeypatch):
    """The block's outputs (the operator's) carry one ``_Block`` node where a gradient is wanted and none elsewhere
    (and no ``_Block`` is even applied there); the C kernel runs once either way; the values, and where there is a
    node the gradients, equal the reference's."""
    mode, x_grad, params_grad, wanted = CASES[case]
    applied, node = [], autograd._Block

    class Counted:
        @staticmethod
        def apply(*args):
            applied.append(args)
            return node.apply(*args)

    monkeypatch.setattr(autograd, "_Block", Counted)
    block, reference = _blocks(params_grad)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64).relu().requires_grad_(x_grad)
    x_ref = x.detach().clone().requires_grad_(x_grad)
    with mode():
        before = native.library().calls("block_forward")
        outs = block(x)
        calls = native.library().calls("block_forward") - before
        expected = reference(x_ref)
    assert calls == 1
    assert len(applied) == wanted
    if wanted:
        assert type(outs[0].grad_fn).__name__ == "_BlockBackward"
        assert all(t.grad_fn is outs[0].grad_fn for t in outs)
    else:
        assert not any(t.requires_grad or t.grad_fn is not None for t in outs)
    for got, want in zip(outs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    if wanted:
        used = [i for i, t in enumerate(expected) if t.requires_grad]  # (fusion_w depends on the parameters only)
        grads = [torch.randn_like(outs[i]) for i in used]
        inputs = [t for t in (x, *block.parameters()) if t.requires_grad]
        got = torch.autograd.grad([outs[i] for i in used], inputs, grads)
        inputs = [t for t in (x_ref, *reference.parameters()) if t.requires_grad]
        want = torch.autograd.grad([expected[i] for i in used], inputs, grads, allow_unused=True)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, rtol=1e-9, atol=1e-11)
