"""The operators in PyTorch operations: the CPU implementation where the C library cannot be built.

The forward pass is :mod:`..functional`'s math, with the output written in place of ``x * ca`` (the blend is one
``torch.lerp``) and the light networks run on the pooled descriptors as the matrix products they are (:mod:`.light`;
the spatial branches by :mod:`.branches`, each map size the way it measured fastest). It keeps small tensors only
(the same list as the C kernels, :func:`saved_like`): the descriptors ``s`` and ``[mean_hw(x); max_hw(x)]`` (on
short maps ``max_hw(x)`` only), the gates' inputs and the networks' hidden layers. The backward pass resumes the light
networks from those (no matrix product of the MLP or the router is redone) and differentiates them by hand
(:mod:`.light`, after PyTorch's own formulas), and writes the full-size passes in two buffers: the two reductions
of ``grad * x * ca`` (over C, and over H, W with the pooling's terms), and the gradient of ``x``. The max gradients
follow ``torch.amax``: split evenly among tied maxima, and NaN wherever the maximum is NaN; their masks are written as
numbers by ``torch.eq`` into a floating-point buffer (one pass, where a bool mask and its conversion measured three).
On the CPU the full-size passes take ``x`` contiguous in float32 (or float64), as the C kernels do: other layouts and
half precision are converted for them, and the results back (:func:`_full_size`).

Shape:
    - x: :math:`(B, C, H, W)`; every other tensor as in :func:`..functional.cbam_residual_dynamic_sa`
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import functional as FA
from . import library, light

__all__ = ["KEEP_POOLS_FROM_PIXELS", "block_backward", "block_forward", "channel_max", "saved_like", "saved_shapes"]

# From this many pixels per map on, both pooled descriptors, (2B, C), are kept for backward (2 / pixels of the input,
# at most 3%); below, only the maxima, (B, C), and the means are recomputed there (one reduction over the input). At
# (32, 512, 7, 7) that adds 1 / 49 of the input to the saved tensors (0.029 to 0.049 of it) and takes the slower of
# the two reductions, amax over H, W, out of the backward: the PyTorch implementation's step measured 8% faster.
KEEP_POOLS_FROM_PIXELS = 64


def _saved_shapes(x: Tensor, fc1_weight: Tensor, router_fc1_weight: Tensor | None, branches: int) -> list[tuple]:
    """The shapes of the saved list of the CPU implementations: ``(z, s, logit, router, router hidden, pre, pools)``
    (in :func:`..functional.accumulation_dtype`); ``pools`` holds ``[mean_hw(x); max_hw(x)]``, only ``max_hw(x)``
    below :data:`KEEP_POOLS_FROM_PIXELS` pixels per map.

    Shape:
        - z: :math:`(B, C)`; s: :math:`(B, 2, H, W)`; logit: :math:`(B, 1, H, W)`; router: :math:`(B, K)`;
          router hidden: :math:`(B, R_h)` (``R_h = 1`` without a router); pre: :math:`(2B, R_m)`; pools:
          :math:`(2B, C)` or :math:`(B, C)`
    """
    b, c, h, w = x.shape
    hidden = 1 if router_fc1_weight is None else router_fc1_weight.shape[0]
    pools = (2 * b, c) if h * w >= KEEP_POOLS_FROM_PIXELS else (b, c)
    return [(b, c), (b, 2, h, w), (b, 1, h, w), (b, branches), (b, hidden), (2 * b, fc1_weight.shape[0]), pools]


# The maximum over channels by halving (torch.maximum of the two halves, repeated) for small maps of large tensors,
# where torch.amax over dim 1 measured slow: (32, 512, 7, 7) 185 against 465 us, (32, 512, 4, 4) 110 against 403 us,
# (16, 512, 12, 12) 185 against 247; from 8 x 8 on it was as fast or faster (68 against 200 us at (32, 512, 8, 8)), and
# below 2^18 elements the halving's launches cost more (47 against 26 us at (8, 64, 7, 7)).
HALVING_BELOW_PIXELS = 64
HALVING_FROM_ELEMENTS = 1 << 18


def channel_max(y: Tensor) -> Tensor:
    """``y.amax(dim=1, keepdim=True)``, the same values (NaN included: ``torch.maximum`` propagates it), by
    halving where that measured faster (:data:`HALVING_BELOW_PIXELS`, :data:`HALVING_FROM_ELEMENTS`).

    Shape:
        - y: :math:`(B, C, H, W)`
        - Output: :math:`(B, 1, H, W)`
    """
    if y.shape[2] * y.shape[3] >= HALVING_BELOW_PIXELS or y.numel() < HALVING_FROM_ELEMENTS:
        return y.amax(dim=1, keepdim=True)
    n = y.shape[1]
    while n > 1:  # the halves overlap by one channel where n is odd: harmless for a maximum
        half = (n + 1) // 2
        y = torch.maximum(y.narrow(1, 0, half), y.narrow(1, n - half, half))
        n = half
    return y


# The descriptors ``s`` this implementation's forward returned, by id. Their maxima over C are those its backward would
# recompute (the same ca, from the same z by the same operations, times the same x), so the backward reads them there;
# for any other ``s`` (the C kernels', whose gate may round ca apart by an ulp) it recomputes them.
_OWN_S: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()

# Below this many pixels per map, the sums over H, W of x * d y run as one batched matrix product of rows by columns
# (x.view(BC, 1, HW) @ d y.view(BC, HW, 1)): 150 against 260 us at (32, 512, 7, 7), but 3.7x slower at 28 x 28.
ROW_DOTS_BELOW_PIXELS = 64


def _row_dots(x: Tensor, y: Tensor, acc: torch.dtype) -> bool:
    """Whether the sums over H, W of ``x * y`` run as row-by-column products (on the CPU, in float32 or float64)."""
    return (
        x.device.type == "cpu"
        and x.shape[2] * x.shape[3] < ROW_DOTS_BELOW_PIXELS
        and x.dtype == acc
        and x.is_contiguous()
        and y.is_contiguous()
    )


def _spatial_pool(y: Tensor) -> Tensor:
    """:func:`..functional.spatial_pool` with :func:`channel_max`."""
    acc = FA.accumulation_dtype(y.dtype)
    return torch.cat([y.mean(dim=1, keepdim=True, dtype=acc), channel_max(y).to(acc)], dim=1)


def _pools(x: Tensor) -> Tensor:
    avg, top = FA.channel_pool(x)
    return torch.cat([avg, top]).flatten(1)


def _forward(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    fusion_logits: Tensor | None,
    ca_temperature: Tensor,
    sa_temperature: Tensor,
    alpha: Tensor | None,
    router_params: Sequence[Tensor | None],
    branch_weights: Sequence[Tensor],
    branch_biases: Sequence[Tensor],
    dilations: Sequence[int],
    act: str,
    ca_gate: str,
    sa_gate: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """The block's forward pass: ``(out, ca, sa, fusion_w, router_w, saved)`` (see :func:`_saved_shapes`)."""
    b, c, h, w = x.shape
    pools = _pools(x)
    mlp = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    channel = light.channel_forward(pools, mlp, fusion_logits, ca_temperature, act, ca_gate)
    ca = channel.ca.to(x.dtype).view(b, c, 1, 1)
    out = x * ca
    s = _spatial_pool(out)
    spatial = light.spatial_forward(s, router_params, branch_weights, branch_biases, dilations, sa_temperature, sa_gate)
    sa = spatial.sa.to(x.dtype)
    out.mul_(sa)
    if alpha is not None:
        # x + alpha * (y - x) in one pass. torch.lerp computes that expression below alpha = 0.5 and
        # y - (y - x) * (1 - alpha) from there: a rounding apart, and NaN at the same places (|y| <= |x|, so y - x
        # is NaN exactly where x is not finite, as in the reference).
        torch.lerp(x, out, alpha.to(x.dtype), out=out)
    kept = pools if h * w >= KEEP_POOLS_FROM_PIXELS else pools[b:].clone()  # a copy: not all of pools' storage
    _OWN_S[id(s)] = s
    saved = [channel.z, s, spatial.logit, spatial.router, spatial.hidden, channel.pre, kept]
    maps = (ca, sa, channel.fusion_w.to(x.dtype), spatial.router.to(x.dtype, copy=True))  # no output aliases another
    return out, *maps, saved


def _backward(
    grads: Sequence[Tensor | None],
    x: Tensor,
    params: Sequence[Tensor | None],
    branch_weights: Sequence[Tensor],
    branch_biases: Sequence[Tensor],
    saved: Sequence[Tensor],
    dilations: Sequence[int],
    act: str,
    ca_gate: str,
    sa_gate: str,
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """The gradients of ``(x, *params, *branch_weights, *branch_biases)`` (``None`` where not ``needs``) from the
    gradients of ``(out, ca, sa, fusion_w, router_w)`` (each may be ``None``).

    ``params`` is ``(fc1 weight, fc1 bias, fc2 weight, fc2 bias, fusion logits, T_ca, T_sa, alpha, router fc1 weight,
    fc1 bias, fc2 weight, fc2 bias)``; ``saved`` as :func:`_saved_shapes`.
    """
    g_out, g_ca, g_sa, g_fusion, g_router = grads
    b, c, h, w = x.shape
    mlp, fusion_logits, t_ca, t_sa, alpha, router = params[:4], params[4], params[5], params[6], params[7], params[8:]
    z, s, logit, router_w, router_hidden, pre = saved[:6]
    pools = saved[6]
    if h * w < KEEP_POOLS_FROM_PIXELS:  # the maxima only: the means again
        pools = torch.cat([x.mean(dim=(2, 3), dtype=pools.dtype), pools])
    channel = light.channel_resume(mlp, fusion_logits, t_ca, act, ca_gate, z, pre)
    spatial = light.spatial_resume(s, router, t_sa, sa_gate, logit, router_w, router_hidden)
    ca, sa = channel.ca.to(x.dtype).view(b, c, 1, 1), spatial.sa.to(x.dtype)
    blend = None if alpha is None else alpha.to(x.dtype)
    # Two full-size buffers: `work` holds x * ca, then the max over C's mask, then the gradient of y = x * ca, then
    # the max over H, W's mask; `other` holds g * x * ca (then g * x, for alpha's gradient), then x * d y (unless
    # _row_dots), then x's gradient. The masks are written as numbers (torch.eq with a floating-point out: one pass,
    # where a bool mask and its conversion take three).
    work = x * ca
    top = s[:, 1:2].to(x.dtype) if _OWN_S.get(id(s)) is s else channel_max(work)  # max_c(x * ca): see _OWN_S
    # the spatial part: d sa = alpha * sum_c g * y (+ the map's own gradient)
    grad_sa = torch.zeros_like(spatial.sa)
    grad_alpha, other = None, None
    if g_out is not None:
        other = torch.mul(g_out, work)
        per_pixel = other.sum(dim=1, keepdim=True, dtype=s.dtype)
        if alpha is not None and needs[8]:  # sum g * (y * sa - x)
            grad_alpha = (per_pixel * sa).sum() - torch.mul(g_out, x, out=other).sum(dtype=s.dtype)
        grad_sa = per_pixel if blend is None else per_pixel * blend
    if g_sa is not None:
        grad_sa = grad_sa + g_sa.to(grad_sa.dtype)
    grad_s, grad_router, grad_weights, grad_biases, grad_t_sa = light.spatial_backward(
        spatial, s, router, branch_weights, branch_biases, dilations, t_sa, sa_gate, grad_sa, g_router
    )
    # d y = alpha * sa * g + the pooling over C's terms (the max's split evenly among ties, as torch.amax's)
    mask = torch.eq(work, top, out=work)
    split = (grad_s[:, 1:2] / mask.sum(dim=1, keepdim=True, dtype=s.dtype)).to(x.dtype)
    grad_y = torch.addcmul((grad_s[:, :1] / c).to(x.dtype), mask, split, out=mask)
    if g_out is not None:
        grad_y.addcmul_(g_out, sa if blend is None else sa * blend)
    # the channel part: d ca = sum_hw x * d y (+ the map's own gradient)
    if _row_dots(x, grad_y, s.dtype):
        grad_ca = torch.bmm(x.view(b * c, 1, h * w), grad_y.view(b * c, h * w, 1)).view(b, c)
    else:
        other = torch.mul(x, grad_y) if other is None else torch.mul(x, grad_y, out=other)
        grad_ca = other.sum(dim=(2, 3), dtype=s.dtype)
    if g_ca is not None:
        grad_ca = grad_ca + g_ca.reshape(b, c).to(grad_ca.dtype)
    grad_pools, grad_mlp, grad_logits, grad_t_ca = light.channel_backward(
        channel, pools, mlp, fusion_logits, t_ca, act, ca_gate, grad_ca, g_fusion
    )
    out: list[Tensor | None] = [None] * len(needs)
    if needs[0]:  # d x = d y * ca (+ (1 - alpha) g) + the pooling over H, W's terms
        grad_avg, grad_max = grad_pools[:b].view(b, c, 1, 1), grad_pools[b:].view(b, c, 1, 1)
        grad_x = torch.addcmul((grad_avg / (h * w)).to(x.dtype), grad_y, ca, out=other)
        if g_out is not None and blend is not None:  # out = x + alpha * (y * sa - x)
            grad_x.addcmul_(g_out, 1 - blend)
        mask = torch.eq(x, pools[b:].view(b, c, 1, 1).to(x.dtype), out=grad_y)
        split = (grad_max / mask.sum(dim=(2, 3), keepdim=True, dtype=grad_max.dtype)).to(x.dtype)
        out[0] = grad_x.addcmul_(mask, split)
    found = [*grad_mlp, grad_logits, grad_t_ca, grad_t_sa, grad_alpha, *grad_router, *grad_weights, *grad_biases]
    for i, grad in enumerate(found, start=1):
        if needs[i]:
            out[i] = grad
    return out


# ----------------------------------------------------------------------------------------------------------
# As the operators' kernels: their arguments and outputs (ops/library.py), for every device that uses them.

_N = len(library.TENSOR_ARGS)


def saved_shapes(*args: object) -> list[tuple]:
    """The shapes of ``block_forward``'s saved list, from its arguments (:func:`_saved_shapes`)."""
    return _saved_shapes(args[0], args[1], args[9], len(args[_N]))  # type: ignore[arg-type]


def saved_like(*args: object) -> list[Tensor]:
    """Empty tensors shaped as ``block_forward``'s saved list, from its arguments (for the fake kernel)."""
    x: Tensor = args[0]  # type: ignore[assignment]
    acc = FA.accumulation_dtype(x.dtype)
    return [x.new_empty(shape, dtype=acc) for shape in saved_shapes(*args)]


def _full_size(x: Tensor) -> Tensor:
    """``x`` as the full-size passes take it on the CPU: contiguous, in float32 or float64, converted where it is not
    (channels_last, a strided view, float16, bfloat16), as for the C kernels. Against running on it as it is, the
    training step measured 0.71x to 0.98x at the benchmark's shapes, but in channels_last 0.90x to 1.01x (in-process
    A/B). Elsewhere ``x`` itself."""
    if x.device.type != "cpu":
        return x
    return _contiguous(x, FA.accumulation_dtype(x.dtype))


def _contiguous(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` contiguous in ``dtype``, in one pass where both change (``t`` itself where neither does)."""
    if t.dtype == dtype:  # to() would return a permuted t itself
        return t.contiguous()
    return t.to(dtype, memory_format=torch.contiguous_format)


def block_forward(*args: object) -> list[Tensor]:
    """``cbam_dsa::block_forward`` in PyTorch operations (arguments already checked)."""
    x: Tensor = args[0]  # type: ignore[assignment]
    inner = _full_size(x)
    out, *maps, saved = _forward(inner, *args[1:9], args[9:13], *args[13:])  # type: ignore[arg-type]
    if inner is not x:  # back in x's dtype and layout
        out = library.laid_out_as(out, x)
        maps = [t.to(x.dtype) for t in maps]
    return [out, *maps, *saved]  # type: ignore[list-item]


def block_backward(*args: object) -> list[Tensor]:
    """``cbam_dsa::block_backward`` in PyTorch operations (arguments already checked)."""
    rest, needs = args[5:], args[-1]
    flat = library.gradient_inputs(rest)
    branches = len(rest[_N])
    saved, (dilations, act, ca_gate, sa_gate) = rest[_N + 2], rest[_N + 3 : _N + 7]
    x: Tensor = flat[0]  # type: ignore[assignment]
    inner, grads = _full_size(x), list(args[:5])
    if inner is not x and grads[0] is not None:
        grads[0] = _contiguous(grads[0], inner.dtype)
    found = _backward(
        grads, inner, flat[1:_N], flat[_N : _N + branches], flat[_N + branches :], saved, dilations, act, ca_gate,
        sa_gate, needs,
    )  # fmt: skip
    return library.gradients_like(found, flat, needs)  # each in its input's dtype and layout
