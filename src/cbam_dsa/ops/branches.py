"""The spatial branches' convolutions of the PyTorch implementation, forward and backward, each map size its way.

Each branch is a 2-to-1-channel convolution of the descriptors ``s`` (``'same'`` padding, any odd kernel and
dilation). How they run is chosen by measurement (CPU, 2 threads, the default branches 3, 7 and 7 dilated by 2):

* **small maps** (at most :data:`DENSE_UP_TO` pixels, on the CPU, finite values): the K branches are one dense
  ``(2HW, K HW)`` matrix gathered from the kernels, so each pass is one matrix product: forward and backward together
  0.4 ms against 1.5 ms for oneDNN's convolutions at (32, 2, 7, 7). A zero of the matrix times an infinite or NaN
  descriptor would give NaN where the convolution never reads it, so non-finite values take the convolutions.
* **from** :data:`CHANNELS_LAST_FROM` **pixels**: oneDNN's convolutions on the descriptors in channels_last, 1.8x
  (forward, dilated) to 2.9x (backward) faster than in the contiguous layout at (16, 2, 56, 56), and no slower from
  28 x 28 on.
* otherwise the convolutions as they are.

Shape:
    - s: :math:`(B, 2, H, W)`; the branches' outputs and their gradients, stacked: :math:`(B, K, H, W)`
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as FA

__all__ = ["CHANNELS_LAST_FROM", "DENSE_UP_TO", "branches_backward", "branches_forward", "mixed_backward"]

DENSE_UP_TO = 64
"""Maps of at most this many pixels run the branches as one dense matrix (CPU, finite values)."""

CHANNELS_LAST_FROM = 28 * 28
"""Maps of at least this many pixels run the convolutions in channels_last."""


class Taps(NamedTuple):
    """Where the branches' kernel weights go in the dense ``(2HW, K HW)`` matrix: row ``i`` an input pixel (of the 2
    descriptor maps), column ``j`` an output pixel (of the K branches)."""

    gather: Tensor  # (2HW * K HW,): per matrix entry, its weight's position in the kernels flattened one after the
    #                 other, or `count` (a zero appended to them) where no weight links the two pixels
    positions: Tensor  # the entries that hold a weight, in row-major order
    at: Tensor  # each such entry's weight: gather[positions]
    count: int  # the weights of all the kernels


@functools.lru_cache(maxsize=32)
def _taps(height: int, width: int, kernels: tuple[tuple[int, int], ...]) -> Taps:
    """The dense matrix's layout (:class:`Taps`) for ``kernels = ((size, dilation), ...)`` on ``height x width``
    maps."""
    pixels = height * width
    index = torch.full((2 * pixels, len(kernels) * pixels), -1, dtype=torch.long)
    rows, cols = torch.arange(height).view(-1, 1), torch.arange(width).view(1, -1)
    out_pixel = (rows * width + cols).flatten()
    offset = 0
    for k, (size, dilation) in enumerate(kernels):
        pad = FA.branch_padding(size, dilation)
        for channel in range(2):
            for i in range(size):
                for j in range(size):
                    r, c = rows + i * dilation - pad, cols + j * dilation - pad
                    inside = ((r >= 0) & (r < height) & (c >= 0) & (c < width)).flatten()
                    source = (channel * pixels + r * width + c).flatten()[inside]
                    index[source, k * pixels + out_pixel[inside]] = offset + (channel * size + i) * size + j
        offset += 2 * size * size
    with torch.inference_mode(False):  # cached tensors must stay usable outside inference mode
        gather = torch.where(index >= 0, index, offset).flatten()
        positions = (index.flatten() >= 0).nonzero().squeeze(1)
        return Taps(gather, positions, gather[positions], offset)


def _dense(s: Tensor, weights: Sequence[Tensor], dilations: Sequence[int]) -> tuple[Tensor, Taps]:
    """The dense matrix ``(2HW, K HW)`` of the branches (one gather from their kernels), and its layout."""
    height, width = s.shape[2:]
    kernels = tuple((int(weight.shape[-1]), int(d)) for weight, d in zip(weights, dilations, strict=True))
    taps = _taps(height, width, kernels)
    flat = torch.cat([*(weight.reshape(-1).to(s.dtype) for weight in weights), s.new_zeros(1)])
    return flat.index_select(0, taps.gather).view(2 * height * width, -1), taps


def _small(s: Tensor) -> bool:
    return s.device.type == "cpu" and s.shape[2] * s.shape[3] <= DENSE_UP_TO


def _finite(values: Tensor) -> bool:
    """Whether every value is finite, by their sum (one reduction): a NaN or an infinity makes it NaN or infinite.
    Finite values whose sum overflows count as not finite, which only sends them to the convolutions."""
    return math.isfinite(values.sum())


def _use_dense(s: Tensor, values: Tensor) -> bool:
    """Whether the dense matrix runs: small maps on the CPU, and ``values`` (what multiplies the matrix's zeros: ``s``
    forward, the branches' gradients backward) all finite. The kernels need no check: the matrix holds each weight
    only where the convolution uses it, so a non-finite weight meets the same values in both."""
    return _small(s) and _finite(values)


def conv_input(s: Tensor) -> Tensor:
    """The descriptors as the convolutions read them (channels_last from :data:`CHANNELS_LAST_FROM` pixels)."""
    if s.shape[2] * s.shape[3] >= CHANNELS_LAST_FROM:
        return s.contiguous(memory_format=torch.channels_last)
    return s


def _conv_backward(grad: Tensor, source: Tensor, weight: Tensor, dilation: int, mask: list[bool]) -> tuple:
    """``convolution_backward`` of one branch (``'same'`` padding): the gradients of the input, kernel and bias where
    ``mask`` asks for them."""
    pad = FA.branch_padding(weight.shape[-1], dilation)
    return torch.ops.aten.convolution_backward(
        grad, source, weight.to(source.dtype), [1], [1, 1], [pad, pad], [dilation] * 2, False, [0, 0], 1, mask
    )


def branches_forward(
    s: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], dilations: Sequence[int]
) -> Tensor:
    """The K branches' outputs ``conv_k(s) + bias_k`` stacked, :math:`(B, K, H, W)`, in ``s``'s dtype."""
    b, _, h, w = s.shape
    dtype = s.dtype
    if _use_dense(s, s):
        matrix, _ = _dense(s, weights, dilations)
        bias = torch.cat([bias.to(dtype) for bias in biases]).repeat_interleave(h * w)
        return torch.addmm(bias, s.reshape(b, -1), matrix).view(b, len(weights), h, w)
    source = conv_input(s)
    return torch.cat(
        [
            F.conv2d(
                source, weight.to(dtype), bias.to(dtype), padding=FA.branch_padding(weight.shape[-1], d), dilation=d
            )
            for weight, bias, d in zip(weights, biases, dilations, strict=True)
        ],
        dim=1,
    )


def branches_backward(
    s: Tensor, weights: Sequence[Tensor], dilations: Sequence[int], grads: Tensor
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The gradients of ``s``, of the kernels and of the biases from those of the K branches' outputs, stacked as
    :func:`branches_forward` returns them (:math:`(B, K, H, W)`)."""
    b = s.shape[0]
    grad = grads.reshape(b, -1) if _small(s) else None
    if grad is not None and _finite(grad):
        matrix, taps = _dense(s, weights, dilations)
        grad_s = (grad @ matrix.t()).view_as(s)
        by_pair = (s.reshape(b, -1).t() @ grad).flatten().index_select(0, taps.positions)
        flat = by_pair.new_zeros(taps.count).index_add_(0, taps.at, by_pair)
        parts = flat.split([w.numel() for w in weights])
        grad_weights = [part.view_as(w) for part, w in zip(parts, weights, strict=True)]
        return grad_s, grad_weights, list(grads.sum(dim=(0, 2, 3)).split(1))
    source = conv_input(s)
    grad_s = torch.zeros_like(s)
    grad_weights, grad_biases = [], []
    for k, (weight, d) in enumerate(zip(weights, dilations, strict=True)):
        found = _conv_backward(grads[:, k : k + 1], source, weight, d, [True, True, True])
        grad_s = grad_s + found[0]
        grad_weights.append(found[1])
        grad_biases.append(found[2])
    return grad_s, grad_weights, grad_biases


def mixed_backward(
    s: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    dilations: Sequence[int],
    mix: Tensor,
    grad: Tensor,
    mix_grad: bool,
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor | None]:
    """The backward of the router's mix ``logit = sum_k mix[:, k] * branch_k(s)``: the gradients of ``s``, of the
    kernels, of the biases and (with ``mix_grad``) of ``mix``, from ``grad``, the gradient of ``logit``.

    The mix's gradient needs ``<grad, branch_k(s)>`` per sample. On the CPU's convolution maps, where ``s`` and
    ``grad`` are finite, it is taken as ``<conv_k^T(grad), s>`` from the same call that gives the kernels'
    gradients (with ``mix_k * s`` as the input, their gradient is the mix-weighted one), so the branches are not run
    again: that saved their three convolutions at (8, 2, 28, 28) and (16, 2, 56, 56). Elsewhere the branches'
    gradients go to :func:`branches_backward` and the branches are rerun (NaN and inf then spread exactly as through
    the reference).

    Shape:
        - s: :math:`(B, 2, H, W)`; mix: :math:`(B, K)`; grad: :math:`(B, 1, H, W)`
        - Output: ``(grad_s, grad_weights, grad_biases, grad_mix)``, ``grad_mix`` :math:`(B, K)` or ``None``
    """
    b, k, (h, w) = s.shape[0], mix.shape[1], s.shape[2:]
    # (the CPU only: the finiteness checks read a value back, which would stall a GPU's stream)
    if s.device.type != "cpu" or _small(s) or not (_finite(s) and _finite(grad)):
        grad_s, grad_weights, grad_biases = branches_backward(s, weights, dilations, mix.view(b, k, 1, 1) * grad)
        if not mix_grad:
            return grad_s, grad_weights, grad_biases, None
        outputs = branches_forward(s, weights, biases, dilations).reshape(b, k, h * w)
        return grad_s, grad_weights, grad_biases, torch.bmm(outputs, grad.reshape(b, h * w, 1)).view(b, k)
    source = conv_input(s)
    per_sample = grad.sum(dim=(1, 2, 3))
    grad_s = torch.zeros_like(s)
    grad_weights, grad_biases, grad_mix = [], [], []
    for j, (weight, bias, d) in enumerate(zip(weights, biases, dilations, strict=True)):
        share = mix[:, j].view(b, 1, 1, 1)
        found = _conv_backward(grad, share * source, weight, d, [True, True, False])
        grad_s = grad_s.addcmul_(share, found[0])
        grad_weights.append(found[1])
        grad_biases.append((mix[:, j] * per_sample).sum().view(1))
        if mix_grad:
            grad_mix.append((found[0] * s).sum(dim=(1, 2, 3)) + bias.to(s.dtype) * per_sample)
    return grad_s, grad_weights, grad_biases, torch.stack(grad_mix, dim=1) if mix_grad else None
