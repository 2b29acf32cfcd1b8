"""Run with TRITON_INTERPRET=1: the CUDA implementation's glue (ops/cuda/impl.py: the operators' argument order, the
gradients' layout, the fallback for what Triton does not cover) on CPU tensors, against the CPU operators. Prints
one JSON line: the largest difference per case."""

from __future__ import annotations

import json

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from cbam_dsa import CBAMResidualDynamicSA, ops
from cbam_dsa.ops import library
from cbam_dsa.ops.cuda import impl


def arguments(block: CBAMResidualDynamicSA, x: torch.Tensor) -> list:
    part, spatial = block.ca, block.sa
    weights, biases, dilations = spatial.branch_params()
    router = spatial.router_params() or (None, None, None, None)
    args = [x, *part.mlp_params(), part.fusion_logits, part.effective_temperature(), spatial.effective_temperature(),
            block.alpha, *router, weights, biases, list(dilations), part.act, part.gate, spatial.gate]
    return [[t.detach() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
            else a.detach() if isinstance(a, torch.Tensor) else a for a in args]


def largest_difference(config: dict, layout: torch.memory_format = torch.contiguous_format,
                       weights: torch.memory_format = torch.contiguous_format) -> float:
    torch.manual_seed(0)
    block = CBAMResidualDynamicSA(6, learnable_alpha=True, alpha_init=0.4, **config).to(memory_format=weights)
    args = arguments(block, torch.randn(2, 6, 5, 4).contiguous(memory_format=layout))
    worst = 0.0
    ours, theirs = impl.block_forward(*args), ops.FORWARD(*args)
    for a, b in zip(ours[:5], theirs[:5], strict=True):
        assert a.shape == b.shape and a.stride() == b.stride(), (a.shape, a.stride(), b.stride())
        worst = max(worst, float((a - b).abs().max()))
    grads = [torch.randn_like(t) for t in theirs[:5]]
    needs = [t is not None for t in library.gradient_inputs(args)]
    found = impl.block_backward(*grads, *args[:15], ours[5:], *args[15:], needs)
    expected = ops.BACKWARD(*grads, *args[:15], theirs[5:], *args[15:], needs)
    assert len(found) == len(expected)
    buffers = [StorageWeakRef(t.untyped_storage()) for t in found if t.numel()]
    assert len(set(buffers)) == len(buffers), "two gradients share memory (an operator's outputs may not alias)"
    for a, b in zip(found, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
        if a.numel():
            worst = max(worst, float((a - b).abs().max()))
    return worst


print(json.dumps({
    "triton": largest_difference({}),
    "triton_channels_last": largest_difference({}, torch.channels_last),
    "triton_channels_last_weights": largest_difference({}, torch.channels_last, torch.channels_last),
    "fallback_five_branches": largest_difference({"sa_kernels": (1, 3, 5, 7)}),
    "fallback_wide_kernel": largest_difference({"sa_kernels": (17,), "sa_use_dilated": False}),
}))
