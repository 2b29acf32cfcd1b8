"""The spatial branches as one convolution by taps, on the fused C kernels (:mod:`._native`).

Every branch ``k`` (kernel ``(1, C, size, size)``, dilation ``d``) is a cross-correlation: a sum over its taps
``(c, dy, dx)`` with ``dy, dx`` in ``(-(size // 2) * d, ..., (size // 2) * d)`` step ``d``. The union of all
branches' taps is one list (:func:`tap_layout`; the default 3x3, 7x7 and dilated 7x7 branches share 9 + 9 of their
offsets, so 178 taps in all), and the router-weighted sum of the branches is one convolution over that list with a
weight per sample and tap: ``sum_k r[b, k] * W_k`` scattered onto the list. The C kernel runs it directly, at any map
size, with no padding, no transform and no per-branch pass; its backward pass is two more kernels.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _native

__all__ = ["TapConv", "dense_tap_conv", "tap_branch_logit", "tap_layout"]


@functools.lru_cache(maxsize=64)
def tap_layout(specs: tuple[tuple[int, int], ...], channels: int) -> tuple[Tensor, Tensor]:
    """The merged tap list of the branches ``specs = ((size, dilation), ...)`` and how to fill the mixing matrix.

    Returns:
        ``(taps, gather)``: ``taps`` ``(T, 3)`` int64 rows ``(c, dy, dx)``; ``gather`` ``(K * T,)`` int64: for entry
        ``k * T + t`` of the ``(K, T)`` mixing matrix, the position of its weight in the branches' flattened
        ``(1, channels, size, size)`` kernels concatenated branch after branch, or their total size (a zero
        appended after them) where branch ``k`` has no such tap.
    """
    columns: dict[tuple[int, int, int], int] = {}
    placed = []
    for k, (size, dilation) in enumerate(specs):
        r = size // 2
        for c in range(channels):
            for a in range(size):
                for b in range(size):
                    tap = (c, (a - r) * dilation, (b - r) * dilation)
                    placed.append((k, columns.setdefault(tap, len(columns))))
    count = len(columns)
    gather = [len(placed)] * (len(specs) * count)
    for element, (k, t) in enumerate(placed):
        gather[k * count + t] = element
    with torch.inference_mode(False):  # cached tensors must stay usable by autograd later
        return torch.tensor(list(columns), dtype=torch.int64).reshape(count, 3), torch.tensor(gather)


class TapConv(torch.autograd.Function):
    """``out[b, i, j] = sum_t w[b, t] * s[b, c_t, i + dy_t, j + dx_t]`` (zero padding) by the C kernels, with the
    per-sample tap weights ``w = router @ mixing``.

    Saves ``s``, the router weights and the mixing matrix only (``w`` is recomputed: it is larger than both).

    Shape:
        - s: :math:`(B, C, H, W)`; router: :math:`(B, K)`; mixing: :math:`(K, T)`; taps: :math:`(T, 3)` int64; all
          CPU, one float dtype
        - Output: :math:`(B, 1, H, W)`
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, router: Tensor, mixing: Tensor, taps: Tensor) -> Tensor:
        ctx.save_for_backward(s, router, mixing)
        ctx.taps, ctx.kernels = taps, _native.kernels()
        return ctx.kernels.tap_conv(s, torch.mm(router, mixing), taps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        s, router, mixing = ctx.saved_tensors
        need_s, need_router, need_mixing = ctx.needs_input_grad[:3]
        weight = torch.mm(router, mixing)
        grad_s = grad_weight = None
        if torch.is_grad_enabled():  # create_graph=True: the same adjoints as differentiable tensor operations
            grad_s, grad_weight = _differentiable_backward(
                ctx.taps, grad, s, weight, need_s, need_router or need_mixing
            )
        else:
            if need_s:
                grad_s = ctx.kernels.tap_conv_grad_s(grad, weight, ctx.taps, s.shape[1])
            if need_router or need_mixing:
                grad_weight = ctx.kernels.tap_conv_grad_w(grad, s, ctx.taps)
        grad_router = torch.mm(grad_weight, mixing.t()) if need_router else None
        grad_mixing = torch.mm(router.t(), grad_weight) if need_mixing else None
        return grad_s, grad_router, grad_mixing, None


def dense_tap_conv(s: Tensor, weight: Tensor, taps: Tensor) -> Tensor:
    """:class:`TapConv`'s math in PyTorch operations: the taps scattered into one dense kernel per sample, run as
    one grouped convolution (used to differentiate a backward pass).

    Shape:
        - s: :math:`(B, C, H, W)`; weight: :math:`(B, T)`; taps: :math:`(T, 3)`
        - Output: :math:`(B, 1, H, W)`
    """
    b, c, h, w = s.shape
    reach = int(taps[:, 1:].abs().max())
    size = 2 * reach + 1
    where = taps[:, 0] * size * size + (taps[:, 1] + reach) * size + (taps[:, 2] + reach)
    dense = weight.new_zeros(b, c * size * size).index_add(1, where, weight).view(b, c, size, size)
    return F.conv2d(s.reshape(1, b * c, h, w), dense, padding=reach, groups=b).view(b, 1, h, w)


def _differentiable_backward(
    taps: Tensor, grad: Tensor, s: Tensor, weight: Tensor, need_s: bool, need_weight: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The adjoints of :class:`TapConv` by autograd over :func:`dense_tap_conv`, for a backward pass that is
    differentiated.

    Each gradient is taken with respect to a detached stand-in of its input, so it keeps its dependence on the other
    input and on ``grad`` only: ``s`` and ``weight`` may depend on each other upstream (the router reads ``s``), and
    differentiating through that would count the router's path twice.
    """
    grad_s = grad_w = None
    with torch.enable_grad():
        if need_s:
            stand_in = s.detach().requires_grad_()
            (grad_s,) = torch.autograd.grad(dense_tap_conv(stand_in, weight, taps), stand_in, grad, create_graph=True)
        if need_weight:
            stand_in = weight.detach().requires_grad_()
            (grad_w,) = torch.autograd.grad(dense_tap_conv(s, stand_in, taps), stand_in, grad, create_graph=True)
    return grad_s, grad_w


def tap_branch_logit(
    s: Tensor, branch_weights: list[Tensor], branch_biases: list[Tensor], dilations: list[int], router: Tensor
) -> Tensor:
    """``sum_k r_k * (conv_k(s) + bias_k)`` as one :class:`TapConv`; ``s`` must suit the kernels
    (:func:`._native.supports`).

    Shape:
        - s: :math:`(B, C, H, W)`; branch_weights: ``(1, C, k, k)`` each; router: :math:`(B, K)`
        - Output: :math:`(B, 1, H, W)`
    """
    b, c = s.shape[:2]
    specs = tuple((int(weight.shape[-1]), int(d)) for weight, d in zip(branch_weights, dilations, strict=True))
    taps, gather = tap_layout(specs, c)
    with _no_autocast(s):  # the kernels compute in s.dtype: keep the weights in it too
        flat = torch.cat([*(weight.reshape(-1) for weight in branch_weights), s.new_zeros(1)])
        mixing = _in(flat, s.dtype)[gather].view(len(specs), -1)
        router = _in(router, s.dtype)
        bias = torch.mv(router, _in(torch.cat(branch_biases), s.dtype)).view(b, 1, 1, 1)
        return TapConv.apply(s, router, mixing, taps) + bias


def _in(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _no_autocast(t: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off where it is on (entering a context costs a few microseconds on every call otherwise)."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()
