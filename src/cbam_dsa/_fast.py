"""The fast path of CBAMResidualDynamicSA: fused kernels or hand-written backward for the full-size passes.

Where the fused C kernels run and only the output is asked for (:func:`block_output`), the block is one autograd
Function with a hand-written backward (:mod:`._fused`). Everywhere else on the fast path (``return_maps=True``,
channels_last, half precision, no C compiler) it runs as the three Functions below, which keep ``out`` a function
of the maps in the autograd graph.

The block's work splits into a few passes over the full ``(B, C, H, W)`` tensor and light work on small tensors.
Each heavy pass is a :class:`torch.autograd.Function` that keeps only the input and small tensors for backward
and recomputes the rest there:

* :class:`ChannelAttention`: pooling over H, W and the channel map ``ca``; its backward recomputes the
  descriptors and the MLP (as activation checkpointing does) and splits the max gradient among ties.
* :class:`SpatialPool`: ``s = [mean_c(x * ca), max_c(x * ca)]``; backward recomputes ``x * ca``.
* :class:`ResidualBlend`: ``out = x * ((1 - alpha) + alpha * ca * sa)``.

Each pass runs in one of two ways, with the same results (tested):

* On the fused C kernels (:mod:`._native`) for contiguous float32/float64 inputs where a C compiler is found:
  one read of ``x`` per pooling, one read and one write for the output, and in backward two reductions over
  ``(grad, x)`` plus one pass that writes the whole gradient of ``x`` (the blend and the spatial pool defer their
  terms to it through the :class:`Scratch`).
* Otherwise in PyTorch operations: ``x * ca`` is formed once and the output written into it; the backward
  passes add their terms into one gradient tensor in place and share one :class:`Scratch` tensor.

The light networks are the math of :mod:`.functional` (activation, fusion weights, gates); the 1x1
convolutions of the channel MLP and of the router run as the matrix products they are. The K spatial branches
run as one convolution (:func:`routed_branch_logit`): over the merged taps of all branches on the C kernels
(:mod:`._tapconv`), else as one matrix product on maps of a few pixels (:class:`._toeplitz.ToeplitzConv`) or one FFT
convolution (:mod:`._fftconv`).

The max gradients follow ``torch.amax``: a gradient is split evenly among tied maxima (inputs after a ReLU have
many ties). Pooling accumulates in at least float32. :func:`fast_path_applies` says where the fast path runs;
everywhere else the block runs its reference path. Everything here is tested equal to the reference, outputs
and gradients (``tests/test_fast.py``, ``tests/test_native.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _fftconv, _fused, _native, _tapconv, _toeplitz
from . import functional as FA

if TYPE_CHECKING:
    from .block import CBAMResidualDynamicSA
    from .spatial import DynamicSpatialAttention

__all__ = [
    "ChannelAttention",
    "ResidualBlend",
    "SpatialPool",
    "block_forward",
    "block_output",
    "channel_map",
    "fast_path_applies",
    "routed_branch_logit",
    "spatial_attention_map",
]


# ----------------------------------------------------------------------------------------------------------
# Weighted sums over C or over H, W without a full-size temporary (one matmul where the layout allows it).


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def sum_over_channels(t: Tensor, weight: Tensor) -> Tensor:
    """``sum_c t[b, c] * weight[b, c]``.

    Shape:
        - t: :math:`(B, C, H, W)`; weight: :math:`(B, C, 1, 1)`
        - Output: :math:`(B, 1, H, W)`
    """
    b, c, h, w = t.shape
    weight = weight.to(t.dtype)
    if t.is_contiguous():
        return torch.bmm(weight.reshape(b, 1, c), t.view(b, c, h * w)).view(b, 1, h, w)
    if _is_channels_last(t):
        flat = t.permute(0, 2, 3, 1).view(b, h * w, c)
        return torch.bmm(flat, weight.reshape(b, c, 1)).view(b, 1, h, w)
    return (t * weight).sum(dim=1, keepdim=True)


def sum_over_space(t: Tensor, maps: Tensor) -> Tensor:
    """``sum_hw t[b, c] * maps[b, j]`` for each map ``j``.

    Shape:
        - t: :math:`(B, C, H, W)`; maps: :math:`(B, J, H, W)`
        - Output: :math:`(B, C, J)`
    """
    b, c, h, w = t.shape
    j = maps.shape[1]
    maps = maps.to(t.dtype).reshape(b, j, h * w)
    if t.is_contiguous():
        return torch.bmm(t.view(b, c, h * w), maps.transpose(1, 2))
    if _is_channels_last(t):
        flat = t.permute(0, 2, 3, 1).view(b, h * w, c)
        return torch.bmm(maps, flat).transpose(1, 2)
    return torch.einsum("bchw,bjhw->bcj", t, maps.view(b, j, h, w))


def _graph_task() -> int | None:
    """The running backward pass's id (``None`` outside one, or on a PyTorch without the query)."""
    query = getattr(torch._C, "_current_graph_task_id", None)
    return None if query is None else int(query())


class Scratch:
    """What one backward pass of a block hands from one heavy pass to the next (blend, spatial pool, channel pool).

    * ``tensor``: a full-size scratch tensor. Each PyTorch backward pass needs one full-size temporary: sharing it
      saves two allocations, whose page faults cost more on CPU than the arithmetic. A pass ``take``s the tensor
      (or a fresh one), and ``give``s it back when done.
    * Deferred terms of the input's gradient (fused kernels): the blend and the spatial pool leave their terms of
      the gradient of ``x`` to the channel pool, which writes all of them in one pass (:func:`_native.Kernels.grad_x`).
      ``defer`` records them with the id of the running backward pass and ``claim`` hands them over only within
      that same pass, so a partial backward pass never leaks terms into a later one.
    """

    __slots__ = ("deferred", "tensor")

    def __init__(self) -> None:
        self.tensor: Tensor | None = None
        self.deferred: dict[str, tuple[int | None, Any]] = {}

    def take(self, like: Tensor) -> Tensor:
        """The scratch tensor if it matches ``like`` (shape, dtype, strides, device), else a fresh one."""
        tensor, self.tensor = self.tensor, None
        if tensor is None or tensor.shape != like.shape or tensor.stride() != like.stride():
            return torch.empty_like(like)
        if tensor.dtype != like.dtype or tensor.device != like.device:
            return torch.empty_like(like)
        return tensor

    def give(self, tensor: Tensor | None) -> None:
        """Hand ``tensor`` on to the next pass (``None`` releases it)."""
        self.tensor = tensor

    def defer(self, name: str, terms: Any) -> None:
        """Leave the terms ``name`` of the input's gradient to a later pass of this backward pass."""
        self.deferred[name] = (_graph_task(), terms)

    def claim(self, name: str) -> Any:
        """The terms ``name`` deferred in this backward pass, or ``None``."""
        task, terms = self.deferred.pop(name, (None, None))
        return terms if terms is not None and task == _graph_task() else None


def _fused_backward(x: Tensor) -> bool:
    """Whether a first-order backward pass over ``x`` runs on the fused kernels (deferring terms of its gradient)."""
    return not torch.is_grad_enabled() and _graph_task() is not None and _native.supports(x)


def _amax_gradient(mask: Tensor, dim: int | tuple[int, int], grad_max: Tensor) -> Tensor:
    """``grad_max / count`` with ``count`` the number of tied maxima along ``dim`` (``torch.amax``'s rule).

    ``mask`` holds 1 where the input attains its maximum and 0 elsewhere, in the input's dtype: summing a
    float mask avoids the copy to int64 that summing a bool tensor makes.
    """
    acc = FA.accumulation_dtype(mask.dtype)
    return (grad_max.to(acc) / mask.sum(dim=dim, keepdim=True, dtype=acc)).to(mask.dtype)


def channel_pool(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`.functional.channel_pool`, by the fused kernel (one pass) where it runs.

    Shape:
        - x: :math:`(B, C, H, W)`
        - Output: mean and max, :math:`(B, C, 1, 1)` each
    """
    return _native.kernels().pool_hw(x) if _native.supports(x) else FA.channel_pool(x)


# ----------------------------------------------------------------------------------------------------------
# Heavy pass 1: pooling over H, W, and the channel map.
#
# Each heavy Function also returns its input ``x`` (as a view): the gradient of ``x`` then flows through the
# three passes in turn, and each pass adds its share into that one tensor in place, instead of autograd
# allocating three and summing them. Under ``create_graph=True`` (grad mode inside backward) every pass runs
# out of place, so the backward pass can itself be differentiated.


# The max over H, W is kept for backward (recomputing it costs a slow pass); the mean too from this many pixels
# per map on, where it is small next to the input (under 0.4%); below, it is recomputed from the input.
KEEP_MEAN_FROM_PIXELS = 256


class ChannelAttention(torch.autograd.Function):
    """``ca = gate(fuse(mlp(mean_hw(x)), mlp(max_hw(x))) / T)`` and ``x`` itself, keeping no activation of the MLP.

    The forward pass pools ``x`` and runs :func:`channel_map` without recording a graph; it saves ``x``, the
    small inputs and the max (the mean too from :data:`KEEP_MEAN_FROM_PIXELS` pixels on). Backward
    recomputes the mean if needed and the light network (under the forward's autocast state) and differentiates
    that with autograd, as activation checkpointing does, so the gradients follow the very same math; then it
    adds the pooling gradient (the max's split evenly among ties) into the gradient of ``x`` in place.

    Args:
        x (Tensor): the input.
        scratch (Scratch): the block's shared scratch tensor.
        act, gate (str): the MLP's activation and the gate.
        *small (Tensor): ``fc1_weight, fc1_bias, fc2_weight, fc2_bias, fusion_w, temperature``.

    Shape:
        - x: :math:`(B, C, H, W)`
        - Output: ca :math:`(B, C, 1, 1)` in ``x.dtype``; ``x`` itself.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scratch: Scratch, act: str, gate: str, *small: Tensor) -> Any:
        avg, mx = channel_pool(x)
        ca = channel_map(avg, mx, *small[:5], act, gate, small[5]).to(x.dtype)
        keep_avg = x.shape[2] * x.shape[3] >= KEEP_MEAN_FROM_PIXELS
        ctx.save_for_backward(x, *small, mx, *((avg,) if keep_avg else ()))
        ctx.num_small, ctx.act, ctx.gate, ctx.scratch = len(small), act, gate, scratch
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.set_materialize_grads(False)
        return ca, x

    @staticmethod
    def backward(ctx: Any, grad_ca: Tensor | None, grad_x: Tensor | None) -> tuple:
        x, *saved = ctx.saved_tensors
        small, (mx, *kept_avg) = saved[: ctx.num_small], saved[ctx.num_small :]
        need_x, need_small = ctx.needs_input_grad[0], ctx.needs_input_grad[4:]
        wanted = [t for t, need in zip(small, need_small, strict=True) if need]
        device, autocast_on, autocast_dtype = ctx.autocast
        recompute = torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on)
        grads: list[Tensor | None] = [None] * len(wanted)
        grad_avg = grad_max = None
        if grad_ca is not None and torch.is_grad_enabled():
            # create_graph=True: differentiate the plain recomputation, pooling included
            with recompute:
                ca = channel_map(*FA.channel_pool(x), *small[:5], ctx.act, ctx.gate, small[5]).to(x.dtype)
            inputs = ([x] if need_x else []) + wanted
            grads = list(torch.autograd.grad(ca, inputs, grad_ca, allow_unused=True, create_graph=True))
            if need_x:
                grad_x = grads[0] if grad_x is None else grad_x if grads[0] is None else grad_x + grads[0]
                grads = grads[1:]
            return grad_x if need_x else None, None, None, None, *_scatter(grads, need_small)
        if grad_ca is not None:
            avg = kept_avg[0] if kept_avg else x.mean(dim=(2, 3), keepdim=True, dtype=mx.dtype)
            with torch.enable_grad(), recompute:
                avg = avg.detach().requires_grad_(need_x)
                mx = mx.detach().requires_grad_(need_x)
                ca = channel_map(avg, mx, *small[:5], ctx.act, ctx.gate, small[5]).to(x.dtype)
            inputs = ([avg, mx] if need_x else []) + wanted
            grads = list(torch.autograd.grad(ca, inputs, grad_ca, allow_unused=True)) if inputs else []
            if need_x:
                grad_avg, grad_max, grads = grads[0], grads[1], grads[2:]
        if not need_x:
            return None, None, None, None, *_scatter(grads, need_small)
        h, w = x.shape[-2:]
        if _fused_backward(x):
            pool_hw = None
            if grad_avg is not None:
                grad_max = torch.zeros_like(mx) if grad_max is None else grad_max
                pool_hw = ((grad_avg / (h * w)).to(x.dtype), grad_max.to(x.dtype), mx.to(x.dtype))
            blend, pool_c = ctx.scratch.claim("blend"), ctx.scratch.claim("pool_c")
            if blend is None and pool_c is None and pool_hw is None:
                return grad_x, None, None, None, *_scatter(grads, need_small)
            ca = blend[0] if blend is not None else pool_c[0] if pool_c is not None else None
            grad_x = _native.kernels().grad_x(
                x, ca, blend and blend[1:], pool_c and pool_c[1:], pool_hw, grad_x
            )  # fmt: skip
            return grad_x, None, None, None, *_scatter(grads, need_small)
        if grad_x is None:
            grad_x = torch.zeros_like(x)
        if grad_avg is not None:
            grad_x.add_((grad_avg.to(FA.accumulation_dtype(x.dtype)) / (h * w)).to(x.dtype))
        if grad_max is not None:
            mask = torch.eq(x, mx, out=ctx.scratch.take(x))  # the last pass: the scratch is not given back
            grad_x.addcmul_(mask, _amax_gradient(mask, (2, 3), grad_max))
        return grad_x, None, None, None, *_scatter(grads, need_small)


def _scatter(grads: list[Tensor | None], needed: tuple[bool, ...]) -> list[Tensor | None]:
    """Gradients of the needed inputs, back in the places of all the inputs (``None`` elsewhere)."""
    it = iter(grads)
    return [next(it) if need else None for need in needed]


# ----------------------------------------------------------------------------------------------------------
# Heavy pass 2: mean and max over C of y = x * ca.


# Below this many pixels per map, the max over C runs as a halving fold of elementwise maxima: PyTorch's
# ``amax`` over C of an NCHW tensor with such short rows runs at scalar speed (four times slower at 7x7).
FOLD_MAX_BELOW_PIXELS = 128


def channel_max(y: Tensor) -> Tensor:
    """``y.amax(dim=1, keepdim=True)``, exactly (a max has no rounding), fast for small maps too.

    Shape:
        - y: :math:`(B, C, H, W)`
        - Output: :math:`(B, 1, H, W)`
    """
    c = y.shape[1]
    if c < 4 or y.shape[2] * y.shape[3] >= FOLD_MAX_BELOW_PIXELS or not y.is_contiguous():
        return y.amax(dim=1, keepdim=True)
    half = c // 2
    folded = torch.maximum(y[:, :half], y[:, half : 2 * half])
    if c % 2:
        torch.maximum(folded[:, :1], y[:, 2 * half :], out=folded[:, :1])
    c = half
    while c > 1:
        half = c // 2
        torch.maximum(folded[:, :half], folded[:, half : 2 * half], out=folded[:, :half])
        if c % 2:
            torch.maximum(folded[:, :1], folded[:, 2 * half : c], out=folded[:, :1])
        c = half
    return folded[:, :1]


def _spatial_pool(x: Tensor, ca: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(s, y)`` with ``s = [mean_c(y), max_c(y)]`` and ``y = x * ca`` (a fresh tensor the caller may reuse), or
    ``y = None`` where the fused kernel computes ``s`` without forming ``y``."""
    if _native.supports(x):
        return _native.kernels().pool_c(x, ca), None
    y = x * ca
    acc = FA.accumulation_dtype(x.dtype)
    if x.dtype == acc and (x.is_contiguous() or _is_channels_last(x)):
        mean = sum_over_channels(x, ca) / x.shape[1]
    else:
        mean = y.mean(dim=1, keepdim=True, dtype=acc)
    return torch.cat([mean, channel_max(y).to(acc)], dim=1), y


class SpatialPool(torch.autograd.Function):
    """``(s, y, x)`` with ``y = x * ca``, ``s = [mean_c(y), max_c(y)]``; saves ``x``, ``ca``, ``s``.

    ``y`` is a non-differentiable buffer for :class:`ResidualBlend` to write the output into; backward
    recomputes ``x * ca`` in the scratch tensor.

    Shape:
        - x: :math:`(B, C, H, W)`; ca: :math:`(B, C, 1, 1)` in ``x.dtype``
        - Output: s :math:`(B, 2, H, W)` in :func:`~.functional.accumulation_dtype`; y :math:`(B, C, H, W)`;
          ``x`` itself.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, ca: Tensor, scratch: Scratch) -> tuple[Tensor, Tensor, Tensor]:
        s, y = _spatial_pool(x, ca)
        ctx.save_for_backward(x, ca, s)
        ctx.scratch = scratch
        if y is not None:
            ctx.mark_non_differentiable(y)
        ctx.set_materialize_grads(False)
        return s, y, x

    @staticmethod
    def backward(ctx: Any, grad_s: Tensor | None, grad_y: Tensor | None, grad_x: Tensor | None) -> tuple:
        x, ca, s = ctx.saved_tensors
        scratch = ctx.scratch
        need_x, need_ca = ctx.needs_input_grad[:2]
        if grad_s is None or not (need_x or need_ca):
            return grad_x, None, None
        coef_mean = (grad_s[:, 0:1].to(FA.accumulation_dtype(x.dtype)) / x.shape[1]).to(x.dtype)
        grad_ca = None
        if torch.is_grad_enabled():
            mask = torch.eq(x * ca, s[:, 1:2]).to(x.dtype)
            grad_y = coef_mean + mask * _amax_gradient(mask, 1, grad_s[:, 1:2])
            if need_x:
                grad_x = grad_y * ca if grad_x is None else grad_x + grad_y * ca
            if need_ca:
                grad_ca = (grad_y * x).sum(dim=(2, 3), keepdim=True)
            return grad_x, grad_ca, None
        if _fused_backward(x):
            smax = s[:, 1:2].to(x.dtype)
            coef_max, grad_ca = _native.kernels().pool_c_grad(x, ca, smax, coef_mean, grad_s[:, 1:2].to(x.dtype))
            grad_ca = grad_ca if need_ca else None
            if need_x and grad_x is not None:  # a later pass did not defer its term: this one is not deferred either
                grad_x = _native.kernels().grad_x(x, ca, None, (coef_mean, coef_max, smax), None, grad_x)
            elif need_x:
                scratch.defer("pool_c", (ca, coef_mean, coef_max, smax))
            return grad_x, grad_ca, None
        # grad_y = coef_mean + mask * coef_max, built over the recomputed x * ca
        mask = torch.mul(x, ca, out=scratch.take(x))
        torch.eq(mask, s[:, 1:2], out=mask)
        grad_y = torch.addcmul(coef_mean, mask, _amax_gradient(mask, 1, grad_s[:, 1:2]), out=mask)
        if need_x:
            grad_x = grad_y * ca if grad_x is None else grad_x.addcmul_(grad_y, ca)
        if need_ca:
            grad_ca = grad_y.mul_(x).sum(dim=(2, 3), keepdim=True)
        scratch.give(grad_y if need_x else None)
        return grad_x, grad_ca, None


# ----------------------------------------------------------------------------------------------------------
# Heavy pass 3: the blend out = x * ((1 - alpha) + alpha * ca * sa) = y * (alpha * sa) + (1 - alpha) * x.


def _blend_into(y: Tensor | None, x: Tensor, ca: Tensor, sa: Tensor, alpha: Tensor | None) -> Tensor:
    """Write the block's output into ``y`` (which holds ``x * ca``) and return it; ``y = None``: the fused kernel
    writes it into a fresh tensor."""
    if y is None:
        return _native.kernels().blend(x, ca, sa, None if alpha is None else float(alpha))
    if alpha is None:
        return y.mul_(sa)
    y.mul_(alpha * sa)
    return y.addcmul_(x, 1 - alpha)


class ResidualBlend(torch.autograd.Function):
    """``out = x * ((1 - alpha) + alpha * ca * sa)`` (``alpha=None``: ``x * ca * sa``), saving small maps only.

    ``y`` must hold ``x * ca`` (from :class:`SpatialPool`); the output is written into it.

    Shape:
        - x, y: :math:`(B, C, H, W)`; ca: :math:`(B, C, 1, 1)`; sa: :math:`(B, 1, H, W)`; alpha: 0-d or None
        - Output: :math:`(B, C, H, W)`
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, ca: Tensor, sa: Tensor, alpha: Tensor | None, y: Tensor | None, scratch: Scratch
    ) -> Tensor:
        if y is not None:
            ctx.mark_dirty(y)
        ctx.save_for_backward(x, ca, sa, alpha)
        ctx.scratch = scratch
        return _blend_into(y, x, ca, sa, alpha)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        x, ca, sa, alpha = ctx.saved_tensors
        need_x, need_ca, need_sa, need_alpha = ctx.needs_input_grad[:4]
        inplace = not torch.is_grad_enabled()
        grad_x = grad_ca = grad_sa = grad_alpha = None
        if _fused_backward(x):
            return _fused_blend_backward(ctx, grad_out.contiguous(), x, ca, sa, alpha)
        if need_ca or need_sa or need_alpha:
            b, c = x.shape[:2]
            t = torch.mul(grad_out, x, out=ctx.scratch.take(x)) if inplace else grad_out * x
            if need_sa:
                grad_sa = sum_over_channels(t, ca)
                grad_sa = grad_sa if alpha is None else grad_sa * alpha
            if need_ca or need_alpha:
                maps = torch.cat([sa, torch.ones_like(sa)], dim=1) if need_alpha else sa
                sums = sum_over_space(t, maps)  # (B, C, 1 or 2): sum_hw t * sa [, sum_hw t]
                t_sa = sums[:, :, 0].reshape(b, c, 1, 1)
                if need_ca:
                    grad_ca = t_sa if alpha is None else t_sa * alpha
                if need_alpha:
                    grad_alpha = ((ca * t_sa).sum() - sums[:, :, 1].sum()).reshape(alpha.shape)
            if inplace:
                ctx.scratch.give(t)
        if need_x:
            grad_x = grad_out * ca
            if alpha is None:
                grad_x = grad_x.mul_(sa) if inplace else grad_x * sa
            elif inplace:
                grad_x.mul_(alpha * sa).addcmul_(grad_out, 1 - alpha)
            else:
                grad_x = grad_x * (alpha * sa) + grad_out * (1 - alpha)
        return grad_x, grad_ca, grad_sa, grad_alpha, None, None


def _fused_blend_backward(ctx: Any, g: Tensor, x: Tensor, ca: Tensor, sa: Tensor, alpha: Tensor | None) -> tuple:
    """:meth:`ResidualBlend.backward` by the fused kernels: one pass for the reductions; the term of ``x``'s
    gradient is deferred to the channel pool's pass (:class:`Scratch`)."""
    need_x, need_ca, need_sa, need_alpha = ctx.needs_input_grad[:4]
    grad_ca = grad_sa = grad_alpha = None
    if need_ca or need_sa or need_alpha:
        by_ca, by_sa, *plain = _native.kernels().blend_grad(g, x, ca, sa, need_alpha)
        if need_sa:
            grad_sa = by_ca if alpha is None else by_ca * alpha
        if need_ca:
            grad_ca = by_sa if alpha is None else by_sa * alpha
        if need_alpha:
            grad_alpha = ((ca * by_sa).sum() - plain[0].sum()).reshape(alpha.shape)
    if need_x:
        ctx.scratch.defer("blend", (ca, g, sa, None if alpha is None else float(alpha)))
    return None, grad_ca, grad_sa, grad_alpha, None, None


# ----------------------------------------------------------------------------------------------------------
# Merged spatial branches.


def routed_branch_logit(
    s: Tensor,
    branch_weights: list[Tensor],
    branch_biases: list[Tensor],
    dilations: list[int],
    router: Tensor,
) -> Tensor:
    """``sum_k r_k * (conv_k(s) + bias_k)``, every branch in one pass (the fast path runs on the CPU only).

    * Where the fused kernels run (:func:`._native.supports`): one convolution over the merged taps of all
      branches with a weight per sample and tap (:func:`._tapconv.tap_branch_logit`).
    * Else maps of at most :data:`._toeplitz.TOEPLITZ_MAX_PIXELS` pixels: one matrix product with the kernels' Toeplitz
      matrices (:class:`._toeplitz.ToeplitzConv`), mixed by the router.
    * Else one FFT convolution with the per-sample kernel ``sum_k r_k * W_k``, every branch embedded at dilation 1
      (:func:`._fftconv.fft_branch_logit`).

    Args:
        s (Tensor): ``[mean_c, max_c]`` descriptors.
        branch_weights (list[Tensor]): one ``(1, 2, k, k)`` kernel per branch.
        branch_biases (list[Tensor]): one ``(1,)`` bias per branch.
        dilations (list[int]): one dilation per branch.
        router (Tensor): ``(B, K)`` branch weights.

    Returns:
        Tensor: the logit ``(B, 1, H, W)``.

    Shape:
        - s: :math:`(B, 2, H, W)`; router: :math:`(B, K)`
        - Output: :math:`(B, 1, H, W)`
    """
    if _native.supports(s):
        return _tapconv.tap_branch_logit(s, branch_weights, branch_biases, dilations, router)
    h, w = s.shape[-2:]
    if h * w > _toeplitz.TOEPLITZ_MAX_PIXELS:
        return _fftconv.fft_branch_logit(s, branch_weights, branch_biases, dilations, router)
    router = router.to(s.dtype)
    bias = torch.mv(router, torch.cat(branch_biases).to(s.dtype)).view(s.shape[0], 1, 1, 1)
    weights = [weight.to(s.dtype) for weight in branch_weights]
    return _toeplitz.ToeplitzConv.apply(s, router, tuple(int(d) for d in dilations), *weights) + bias


def _flat_linear(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A 1x1 convolution of ``(N, C_in, 1, 1)`` descriptors as the matrix product it is: ``(N, C_in) -> (N, C_out)``."""
    if weight.dtype != z.dtype:
        weight, bias = weight.to(z.dtype), bias.to(z.dtype)
    return F.linear(z, weight.flatten(1), bias)


def _gate(z: Tensor, gate: str, temperature: Tensor | float) -> Tensor:
    """:func:`.functional.apply_gate`, skipping the division by a fixed temperature of one (``z / 1`` is ``z``)."""
    fixed = not isinstance(temperature, Tensor) or (not temperature.requires_grad and temperature.device.type == "cpu")
    if fixed and float(temperature) == 1.0 and gate in _GATES:
        return _GATES[gate](z)
    return FA.apply_gate(z, gate, temperature)


_GATES = {"sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}


def channel_map(
    avg: Tensor,
    mx: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    fusion_w: Tensor,
    act: str,
    gate: str,
    temperature: Tensor | float,
) -> Tensor:
    """:func:`.functional.channel_attention_map` given the fusion weights, both descriptors through the MLP in
    one batch.

    The MLP's 1x1 convolutions on ``(B, C, 1, 1)`` descriptors run as the matrix products they are (a 1x1
    convolution call costs several times more on CPU here); activation and gate are those of
    :mod:`.functional`.

    Shape:
        - avg, mx: :math:`(B, C, 1, 1)`; fusion_w: :math:`(2,)`
        - Output: ``ca`` :math:`(B, C, 1, 1)`
    """
    b, c = avg.shape[:2]
    hidden = FA.activation(_flat_linear(torch.cat([avg, mx]).view(2 * b, c), fc1_weight, fc1_bias), act)
    both = _flat_linear(hidden, fc2_weight, fc2_bias).view(2, b, c, 1, 1)
    fusion_w = fusion_w if fusion_w.dtype == both.dtype else fusion_w.to(both.dtype)
    return _gate((both * fusion_w.view(2, 1, 1, 1, 1)).sum(dim=0), gate, temperature)  # w0 * a + w1 * m


def router_weights(s: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor) -> Tensor:
    """:func:`.functional.router_weights` with its 1x1 convolutions as matrix products.

    Shape:
        - s: :math:`(B, 2, H, W)`
        - Output: :math:`(B, K)`
    """
    hidden = F.relu(_flat_linear(s.mean(dim=(2, 3)), fc1_weight, fc1_bias))
    return torch.softmax(_flat_linear(hidden, fc2_weight, fc2_bias), dim=1)


def spatial_attention_map(sa_module: DynamicSpatialAttention, s: Tensor) -> tuple[Tensor, Tensor]:
    """``sa_module.attention_map(s)``, with merged branches (:func:`routed_branch_logit`).

    Shape:
        - s: :math:`(B, 2, H, W)`
        - Output: sa :math:`(B, 1, H, W)`, router_w :math:`(B, K)`
    """
    weights, biases, dilations = sa_module.branch_params()
    params = sa_module.router_params()
    if params is None:
        router_w = torch.ones(s.shape[0], 1, device=s.device, dtype=s.dtype)
    else:
        router_w = router_weights(s, *params)
    logit = routed_branch_logit(s, weights, biases, dilations, router_w)
    return _gate(logit, sa_module.gate, sa_module.effective_temperature()), router_w


# ----------------------------------------------------------------------------------------------------------
# The block.


def fast_path_applies(block: CBAMResidualDynamicSA, x: Tensor) -> bool:
    """Whether the fast path can run the block on ``x``; otherwise the reference path does.

    The reference runs under TorchScript scripting and tracing, ONNX export, ``torch.export`` and
    ``torch.compile`` (which fuses the plain math itself), under functorch transforms (``vmap``,
    ``torch.func``), for tensor subclasses, for empty inputs, and on every device but the CPU: on an H200 at the
    benchmark's shapes the reference path was faster (1.7-1.8x timm's CBAM against 2.4-2.9x for this path,
    whose many small kernels are launch-bound there; docs/BENCHMARKS.md), so CUDA runs the reference.
    """
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if torch.onnx.is_in_onnx_export():
        return False
    if type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter:
        return False
    if x.device.type != "cpu" or x.numel() == 0:
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(x)


def _alpha_for_blend(block: CBAMResidualDynamicSA) -> Tensor | None:
    """``None`` when the blend is the identity on ``x * ca * sa`` (no residual, or a fixed alpha of 1)."""
    alpha = block.alpha
    if alpha is None:
        return None
    if not alpha.requires_grad and alpha.device.type == "cpu" and float(alpha) == 1.0:
        return None
    return alpha


def block_output(block: CBAMResidualDynamicSA, x: Tensor) -> Tensor:
    """The block's output on ``x`` by the fast path: on the fused kernels as one :class:`._fused.FusedBlock` where they
    run (:func:`._native.supports`), else by :func:`block_forward`.

    Shape:
        - x, output: :math:`(B, C, H, W)`
    """
    if _native.supports(x):
        return _fused.block_forward(block, x, _alpha_for_blend(block))
    return block_forward(block, x)[0]


def block_forward(block: CBAMResidualDynamicSA, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The block on ``x`` by the fast path: ``(out, ca, sa, fusion_w, router_w)``, equal to the reference.

    Shape:
        - x: :math:`(B, C, H, W)`
        - out: :math:`(B, C, H, W)`; ca: :math:`(B, C, 1, 1)`; sa: :math:`(B, 1, H, W)`;
          fusion_w: :math:`(2,)`; router_w: :math:`(B, K)`
    """
    alpha = _alpha_for_blend(block)
    if alpha is not None:
        alpha = alpha.to(x.dtype)
    part = block.ca
    acc = FA.accumulation_dtype(x.dtype)
    fusion_w = FA.fusion_weights(part.fusion_logits, x if x.dtype == acc else x.new_empty((), dtype=acc))
    small = (*part.mlp_params(), fusion_w, part.effective_temperature())
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters()))):
        ca = channel_map(*channel_pool(x), *small[:5], part.act, part.gate, small[5]).to(x.dtype)
        s, y = _spatial_pool(x, ca)
        sa, router_w = spatial_attention_map(block.sa, s)
        sa = sa.to(x.dtype)
        return _blend_into(y, x, ca, sa, alpha), ca, sa, fusion_w.to(x.dtype), router_w.to(x.dtype)
    scratch = Scratch()
    ca, x_pass = ChannelAttention.apply(x, scratch, part.act, part.gate, *small)
    s, y, x_pass = SpatialPool.apply(x_pass, ca, scratch)
    sa, router_w = spatial_attention_map(block.sa, s)
    sa = sa.to(x.dtype)
    out = ResidualBlend.apply(x_pass, ca, sa, alpha, y, scratch)
    return out, ca, sa, fusion_w.to(x.dtype), router_w.to(x.dtype)
