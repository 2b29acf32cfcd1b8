"""The spatial branches on small maps as one matrix product with the kernels' Toeplitz matrices.

On maps of a few pixels a convolution call costs more than its arithmetic: every branch's 'same' convolution is a
``(H * W, C * H * W)`` matrix, the branches' matrices are stacked and applied in one matrix product, and the router
mixes the K results. The fast path uses this where the fused C kernels are unavailable (:mod:`._fast`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

__all__ = ["TOEPLITZ_MAX_PIXELS", "ToeplitzConv"]


# Maps of at most this many pixels convolve as one matrix product with the kernels' Toeplitz matrices: a
# depthwise convolution call costs more than the arithmetic on maps this small.
TOEPLITZ_MAX_PIXELS = 49


@functools.lru_cache(maxsize=32)
def _toeplitz_index(height: int, width: int, size: int, dilation: int, device: torch.device) -> Tensor:
    """Where each kernel tap lands in the convolution's matrix: ``index[p, q]`` is the tap (``c * k * k + a * k +
    b``) that multiplies input ``q = (c, i', j')`` for output pixel ``p = (i, j)``, or ``2 * k * k`` (a zero)."""
    with torch.inference_mode(False):  # a cached tensor must stay usable by autograd later
        return _build_toeplitz_index(height, width, size, dilation).to(device)


def _build_toeplitz_index(height: int, width: int, size: int, dilation: int) -> Tensor:
    r = size // 2
    i = torch.arange(height).view(height, 1, 1, 1)
    j = torch.arange(width).view(1, width, 1, 1)
    a = torch.arange(size).view(1, 1, size, 1)
    b = torch.arange(size).view(1, 1, 1, size)
    ii, jj = i + (a - r) * dilation, j + (b - r) * dilation
    valid = (ii >= 0) & (ii < height) & (jj >= 0) & (jj < width)
    full = (height, width, size, size)
    p = (i * width + j).expand(full)[valid]
    q = (ii * width + jj).expand(full)[valid]
    tap = (a * size + b).expand(full)[valid]
    pixels = height * width
    index = torch.full((pixels, 2, pixels), 2 * size * size, dtype=torch.int32)
    for c in range(2):
        index[p, c, q] = (c * size * size + tap).to(torch.int32)
    return index.view(pixels, 2 * pixels)


def _toeplitz_matrix(weights: tuple[Tensor, ...], dilations: tuple[int, ...], height: int, width: int) -> Tensor:
    """The stacked matrices ``(K * H * W, 2 * H * W)`` of the branches' 'same' convolutions on ``H x W`` maps."""
    matrices = []
    for weight, dilation in zip(weights, dilations, strict=True):
        taps = torch.cat([weight.reshape(-1), weight.new_zeros(1)])
        index = _toeplitz_index(height, width, int(weight.shape[-1]), int(dilation), weight.device)
        matrices.append(taps[index])
    return torch.stack(matrices).view(len(weights) * height * width, 2 * height * width)


class ToeplitzConv(torch.autograd.Function):
    """``sum_k r_k * conv_k(s)`` on small maps (no bias): every branch's 'same' convolution as one matrix
    product with the stacked Toeplitz matrices of the kernels, mixed by the router weights. Saves ``s``, the
    router weights and the kernels; backward rebuilds the matrices and the branch outputs.

    Shape:
        - s: :math:`(B, 2, H, W)`; router: :math:`(B, K)`; weights: ``(1, 2, k, k)`` each; all in one dtype
        - Output: :math:`(B, 1, H, W)`
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, router: Tensor, dilations: tuple[int, ...], *weights: Tensor) -> Tensor:
        b, c, h, w = s.shape
        ctx.dilations = dilations
        ctx.save_for_backward(s, router, *weights)
        branches = torch.mm(s.reshape(b, c * h * w), _toeplitz_matrix(weights, dilations, h, w).t())
        ctx.compute_dtype = branches.dtype  # lower than s.dtype under autocast; backward runs in it too
        mixed = torch.bmm(router.to(branches.dtype).unsqueeze(1), branches.view(b, len(weights), h * w))
        return mixed.view(b, 1, h, w)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        s, router, *weights = (t.to(ctx.compute_dtype) for t in ctx.saved_tensors)
        b, c, h, w = s.shape
        k_count = len(weights)
        flat_s = s.reshape(b, c * h * w)
        grad = grad.to(ctx.compute_dtype).reshape(b, 1, h * w)
        matrix = _toeplitz_matrix(tuple(weights), ctx.dilations, h, w)
        grad_router = None
        if ctx.needs_input_grad[1]:
            branches = torch.mm(flat_s, matrix.t()).view(b, k_count, h * w)
            grad_router = torch.bmm(branches, grad.transpose(1, 2)).view(b, k_count)
        grad_branches = (router.unsqueeze(2) * grad).view(b, k_count * h * w)
        grad_s = torch.mm(grad_branches, matrix).view(b, c, h, w) if ctx.needs_input_grad[0] else None
        grad_weights: list[Tensor | None] = [None] * k_count
        if any(ctx.needs_input_grad[3:]):
            grad_matrix = torch.mm(grad_branches.t(), flat_s).view(k_count, h * w, c * h * w)
            for k, weight in enumerate(weights):
                if ctx.needs_input_grad[3 + k]:
                    size = int(weight.shape[-1])
                    index = _toeplitz_index(h, w, size, int(ctx.dilations[k]), s.device).reshape(-1).long()
                    taps = grad_matrix.new_zeros(c * size * size + 1).index_add(0, index, grad_matrix[k].reshape(-1))
                    grad_weights[k] = taps[:-1].view(weight.shape)
        return grad_s, grad_router, None, *grad_weights
