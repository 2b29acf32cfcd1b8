"""The operators' autograd: ``block_forward`` records one node per block (:class:`_Block`) whose backward calls
``block_backward``. A backward pass that is itself differentiated (``create_graph=True``) differentiates the reference
math of :mod:`..functional` instead, for every device: one mechanism for every order above the first.

The autograd kernel registered here serves every device; once the CPU's C++ kernels are loaded (:mod:`.cpu`), a C++
kernel of the same choice takes its place on the CPU, and reaches :func:`differentiable_forward` through the private
operator ``cbam_dsa::_differentiable_block_forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import functional as FA
from . import library
from .library import BACKWARD, FORWARD, TENSOR_ARGS, gradient_inputs

__all__ = ["autograd_forward", "differentiable_forward", "reference"]

N = len(TENSOR_ARGS)


def _below_autograd(which: int, op: Any, x: Tensor, args: Sequence[Any]) -> Any:
    """``op(*args)`` below the autograd keys. For a device whose Python kernels are ``direct``
    (:func:`.library.implement`), plain tensors and no dispatch mode or functorch transform, the kernel is called
    directly (the backward without re-checking what its forward checked), without a second pass through the
    dispatcher (about 25 µs a call here). Everything else (C++ kernels, torch.compile's fake tensors, opcheck's modes,
    subclasses) goes through it."""
    kernels = library.direct_kernels(x.device.type)
    if (
        kernels is not None
        and type(x) is torch.Tensor
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
    ):
        return kernels[which](*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


class _Block(torch.autograd.Function):
    """One autograd node per block over ``block_forward``; backward calls ``block_backward``."""

    @staticmethod
    def forward(ctx: Any, spec: tuple, branches: int, *tensors: Tensor | None) -> tuple[Tensor, ...]:
        found = _below_autograd(0, FORWARD, tensors[0], (*_unflatten(tensors, branches), *spec))
        saved = found[5:]
        ctx.save_for_backward(*tensors, *saved)
        ctx.spec, ctx.branches, ctx.count = spec, branches, len(tensors)
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)
        return tuple(found)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        everything = ctx.saved_tensors
        tensors, saved = everything[: ctx.count], list(everything[ctx.count :])
        needs = list(ctx.needs_input_grad[2:])
        grads = grads[:5]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference math
            return (None, None, *_differentiable_grads(tensors, ctx.branches, ctx.spec, grads, needs))
        args = (*grads, *_unflatten(tensors, ctx.branches), saved, *ctx.spec, needs)
        found = _below_autograd(1, BACKWARD, tensors[0], args)
        return (None, None, *(grad if need else None for grad, need in zip(found, needs, strict=True)))


def _unflatten(tensors: Sequence[Tensor | None], branches: int) -> tuple:
    return (*tensors[:N], list(tensors[N : N + branches]), list(tensors[N + branches :]))


def reference(tensors: Sequence[Tensor | None], branches: int, spec: Sequence[Any]) -> tuple[Tensor, ...]:
    """The block's ``(out, ca, sa, fusion_w, router_w)`` by :func:`..functional.cbam_residual_dynamic_sa` from the
    operators' flat tensor arguments and spec."""
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fusion_logits, t_ca, t_sa, alpha, *router = tensors[:N]
    weights, biases = tensors[N : N + branches], tensors[N + branches :]
    dilations, act, ca_gate, sa_gate = spec
    return FA.cbam_residual_dynamic_sa(
        x, (fc1_weight, fc1_bias, fc2_weight, fc2_bias), fusion_logits, list(weights), list(biases), list(dilations),
        None if router[0] is None else tuple(router), alpha, act, ca_gate, t_ca, sa_gate, t_sa,
    )  # fmt: skip


def _differentiable_grads(
    tensors: Sequence[Tensor | None], branches: int, spec: tuple, grads: Sequence[Tensor | None], needs: list[bool]
) -> list[Tensor | None]:
    """The gradients by autograd over the reference math, with ``create_graph=True``."""
    wanted = [t for t, need in zip(tensors, needs, strict=True) if need]
    pairs = [(o, g) for o, g in zip(reference(tensors, branches, spec), grads, strict=True) if g is not None]
    pairs = [(o, g) for o, g in pairs if o.requires_grad]
    found = iter([None] * len(wanted))
    if pairs and wanted:
        outputs, grad_outputs = zip(*pairs, strict=True)
        found = iter(torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True, create_graph=True))
    return [next(found) if need else None for need in needs]


def differentiable_forward(*args: Any) -> list[Tensor]:
    """``block_forward`` recorded as one autograd node (:class:`_Block`)."""
    return list(_Block.apply(tuple(args[N + 2 :]), len(args[N]), *gradient_inputs(args)))


def autograd_forward(*args: Any) -> list[Tensor]:
    """``block_forward``'s autograd kernel: one node where a gradient is wanted, else the kernel below autograd
    (as under a compiled graph's forward, which runs with grad off). The CPU's C++ kernels register the same choice
    in C++ once loaded, calling :func:`differentiable_forward` for the first case."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in gradient_inputs(args)):
        return differentiable_forward(*args)
    return _below_autograd(0, FORWARD, args[0], args)


_library = torch.library.Library("cbam_dsa", "FRAGMENT")
_library.impl(FORWARD, autograd_forward, "Autograd")
_library.define("_differentiable_block_forward" + library.FORWARD_SCHEMA)
_library.impl("_differentiable_block_forward", differentiable_forward, "CompositeImplicitAutograd")
