"""The operators in PyTorch operations: the CPU implementation where the C library cannot be built.

The forward pass is :mod:`..functional`'s math, with the output written in place of ``x * ca`` and the light
networks run on the pooled descriptors as the matrix products they are. It keeps small tensors only (the same list
as the C kernels, :func:`saved_like`): the descriptors ``s`` and ``[mean_hw(x); max_hw(x)]``, the gates' inputs and
the networks' hidden layers. The backward pass recomputes the light networks from the descriptors and
differentiates them with autograd (as activation checkpointing does, so their gradients follow the very same math),
and writes the full-size passes by hand: the two reductions of ``grad * x * ca`` (over C, and over H, W with the
pooling's terms), and one expression for the gradient of ``x``. The max gradients follow ``torch.amax``: split
evenly among tied maxima, and NaN wherever the maximum is NaN.

Shape:
    - x: :math:`(B, C, H, W)`; every other tensor as in :func:`..functional.cbam_residual_dynamic_sa`
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as FA

__all__ = ["KEEP_POOLS_FROM_PIXELS", "block_backward", "block_forward", "channel_light", "saved_like", "spatial_light"]

# From this many pixels per map on, the pooled (2B, C) descriptors are kept for backward (2 / pixels of the input, at
# most 3%); below, they are recomputed there by one pass over the input.
KEEP_POOLS_FROM_PIXELS = 64


def saved_like(x: Tensor, fc1_weight: Tensor, router_fc1_weight: Tensor | None, branches: int) -> list[Tensor]:
    """Empty tensors shaped as the saved list of the CPU implementations: ``(z, s, logit, router, router hidden,
    pre, pools)`` in :func:`..functional.accumulation_dtype`; ``pools`` has no elements below
    :data:`KEEP_POOLS_FROM_PIXELS` pixels per map.

    Shape:
        - z: :math:`(B, C)`; s: :math:`(B, 2, H, W)`; logit: :math:`(B, 1, H, W)`; router: :math:`(B, K)`;
          router hidden: :math:`(B, R_h)` (``R_h = 1`` without a router); pre: :math:`(2B, R_m)`; pools:
          :math:`(2B, C)` or :math:`(0,)`
    """
    b, c, h, w = x.shape
    acc = FA.accumulation_dtype(x.dtype)
    new = x.new_empty
    hidden = 1 if router_fc1_weight is None else router_fc1_weight.shape[0]
    keep = h * w >= KEEP_POOLS_FROM_PIXELS
    pools = (2 * b, c) if keep else (0,)
    return [
        new(b, c, dtype=acc), new(b, 2, h, w, dtype=acc), new(b, 1, h, w, dtype=acc), new(b, branches, dtype=acc),
        new(b, hidden, dtype=acc), new(2 * b, fc1_weight.shape[0], dtype=acc), new(pools, dtype=acc),
    ]  # fmt: skip


def _linear(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A 1x1 convolution on flat rows ``(N, in)``."""
    return F.linear(z, weight.flatten(1).to(z.dtype), bias.to(z.dtype))


def channel_light(
    pools: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    fusion_logits: Tensor | None,
    temperature: Tensor,
    act: str,
    gate: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The channel attention's light network from the pooled rows ``[avg; max]``: ``(pre, z, ca, fusion_w)``.

    Shape:
        - pools: :math:`(2B, C)`
        - pre: :math:`(2B, R_m)`; z, ca: :math:`(B, C)`; fusion_w: :math:`(2,)`
    """
    b = pools.shape[0] // 2
    pre = _linear(pools, fc1_weight, fc1_bias)
    mlp = _linear(FA.activation(pre, act), fc2_weight, fc2_bias)
    fusion_w = FA.fusion_weights(fusion_logits, mlp)
    z = fusion_w[0] * mlp[:b] + fusion_w[1] * mlp[b:]
    return pre, z, FA.apply_gate(z, gate, temperature), fusion_w


def spatial_light(
    s: Tensor,
    router_params: Sequence[Tensor | None],
    branch_weights: Sequence[Tensor],
    branch_biases: Sequence[Tensor],
    dilations: Sequence[int],
    temperature: Tensor,
    gate: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The spatial attention's light network from the descriptors: ``(router hidden, router, logit, sa)``.

    Shape:
        - s: :math:`(B, 2, H, W)`
        - router hidden: :math:`(B, R_h)` (ones, ``R_h = 1``, without a router); router: :math:`(B, K)`; logit, sa:
          :math:`(B, 1, H, W)`
    """
    b = s.shape[0]
    if router_params[0] is None:
        hidden, router = s.new_ones(b, 1), s.new_ones(b, len(branch_weights))
    else:
        hidden = F.relu(_linear(s.mean(dim=(2, 3)), router_params[0], router_params[1]))
        router = torch.softmax(_linear(hidden, router_params[2], router_params[3]), dim=1)
    logit = torch.zeros_like(s[:, :1])
    for k, (weight, bias, dilation) in enumerate(zip(branch_weights, branch_biases, dilations, strict=True)):
        padding = FA.branch_padding(weight.shape[-1], dilation)
        branch = F.conv2d(s, weight.to(s.dtype), bias.to(s.dtype), padding=padding, dilation=dilation)
        logit = logit + router[:, k].view(-1, 1, 1, 1) * branch
    return hidden, router, logit, FA.apply_gate(logit, gate, temperature)


def _pools(x: Tensor) -> Tensor:
    avg, top = FA.channel_pool(x)
    return torch.cat([avg, top]).flatten(1)


def block_forward(
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
    """The block's forward pass: ``(out, ca, sa, fusion_w, router_w, saved)`` (see :func:`saved_like`)."""
    b, c, h, w = x.shape
    pools = _pools(x)
    pre, z, ca, fusion_w = channel_light(
        pools, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fusion_logits, ca_temperature, act, ca_gate
    )
    ca = ca.to(x.dtype).view(b, c, 1, 1)
    out = x * ca
    s = FA.spatial_pool(out)
    hidden, router, logit, sa = spatial_light(
        s, router_params, branch_weights, branch_biases, dilations, sa_temperature, sa_gate
    )
    sa = sa.to(x.dtype)
    out.mul_(sa)
    if alpha is not None:  # x + alpha * (y - x), in the reference's order of operations
        out.sub_(x).mul_(alpha.to(x.dtype)).add_(x)
    kept = pools if h * w >= KEEP_POOLS_FROM_PIXELS else pools.new_empty(0)
    saved = [z, s, logit, router, hidden, pre, kept]
    return out, ca, sa, fusion_w.to(x.dtype), router.to(x.dtype, copy=True), saved  # no output aliases another


def _vjp(
    fn: Callable[..., tuple[Tensor, ...]], primals: Sequence[Tensor | None]
) -> tuple[tuple[Tensor, ...], Callable]:
    """``torch.func.vjp`` over the tensors among ``primals`` (``None`` passes through): the outputs, and a function
    from the outputs' gradients (``None``: zero) to one gradient per primal (``None`` for ``None``).

    Autograd is not used: these run inside an operator's kernel, below the autograd keys (under torch.compile too).
    """
    present = [i for i, t in enumerate(primals) if t is not None]

    def call(*tensors: Tensor) -> tuple[Tensor, ...]:
        full = list(primals)
        for i, t in zip(present, tensors, strict=True):
            full[i] = t
        return fn(*full)

    outputs, pull = torch.func.vjp(call, *(primals[i].detach() for i in present))

    def pullback(*grads: Tensor | None) -> list[Tensor | None]:
        cotangents = tuple(
            torch.zeros_like(o) if g is None else g.reshape(o.shape).to(o.dtype)
            for o, g in zip(outputs, grads, strict=True)
        )
        found = pull(cotangents)
        out: list[Tensor | None] = [None] * len(primals)
        for i, grad in zip(present, found, strict=True):
            out[i] = grad
        return out

    return outputs, pullback


def block_backward(
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
    fc1 bias, fc2 weight, fc2 bias)``; ``saved`` as :func:`saved_like`.
    """
    g_out, g_ca, g_sa, g_fusion, g_router = grads
    b, c, h, w = x.shape
    count = len(branch_weights)
    pools = saved[6] if saved[6].numel() else _pools(x)

    def channel(pools: Tensor, *small: Tensor | None) -> tuple[Tensor, Tensor]:
        _, _, ca, fusion_w = channel_light(pools, *small[:5], small[5], act, ca_gate)
        return ca, fusion_w

    def spatial(s: Tensor, *small: Tensor | None) -> tuple[Tensor, Tensor]:
        weights, biases = small[4 : 4 + count], small[4 + count : 4 + 2 * count]
        _, router, _, sa = spatial_light(s, small[:4], weights, biases, dilations, small[-1], sa_gate)
        return sa, router

    (ca_acc, _), channel_pullback = _vjp(channel, [pools, *params[:6]])
    spatial_primals = [saved[1], *params[8:12], *branch_weights, *branch_biases, params[6]]
    (sa_acc, _), spatial_pullback = _vjp(spatial, spatial_primals)
    ca, sa = ca_acc.to(x.dtype).view(b, c, 1, 1), sa_acc.to(x.dtype)
    alpha = params[7]
    blend = None if alpha is None else alpha.detach().to(x.dtype)
    y = x * ca
    # the spatial part: d sa = alpha * sum_c g * y (+ the map's own gradient)
    grad_sa = None
    if g_out is not None:
        grad_sa = (g_out * y).sum(dim=1, keepdim=True)
        if blend is not None:
            grad_sa = grad_sa * blend
    spatial_grads = spatial_pullback(_add(grad_sa, g_sa), g_router)
    grad_s = spatial_grads[0]
    # d y = alpha * sa * g + the pooling over C's terms (the max's split evenly among ties, as torch.amax's)
    grad_y = None if g_out is None else g_out * sa if blend is None else g_out * (sa * blend)
    top = (y == y.amax(dim=1, keepdim=True)).to(x.dtype)  # not s: the C kernels may round x * ca otherwise
    split = (grad_s[:, 1:2] / top.sum(dim=1, keepdim=True, dtype=grad_s.dtype)).to(x.dtype)
    pooled = (grad_s[:, :1] / c).to(x.dtype) + top * split
    grad_y = pooled if grad_y is None else grad_y + pooled
    # the channel part: d ca = sum_hw x * d y (+ the map's own gradient)
    grad_ca = _add((x * grad_y).sum(dim=(2, 3), dtype=ca_acc.dtype), None if g_ca is None else g_ca.reshape(b, c))
    channel_grads = channel_pullback(grad_ca, g_fusion)
    out: list[Tensor | None] = [None] * len(needs)
    if needs[0]:
        grad_x = grad_y * ca
        if g_out is not None and blend is not None:  # out = x + alpha * (y * sa - x)
            grad_x = grad_x + g_out * (1 - blend)
        grad_avg, grad_max = channel_grads[0][:b].view(b, c, 1, 1), channel_grads[0][b:].view(b, c, 1, 1)
        top = (x == pools[b:].view(b, c, 1, 1).to(x.dtype)).to(x.dtype)
        split = (grad_max / top.sum(dim=(2, 3), keepdim=True, dtype=grad_max.dtype)).to(x.dtype)
        out[0] = grad_x + ((grad_avg / (h * w)).to(x.dtype) + top * split)
    if alpha is not None and needs[8] and g_out is not None:
        out[8] = (g_out * (y * sa - x)).sum()
    found = [*channel_grads[1:], spatial_grads[-1], None, *spatial_grads[1:-1]]  # in the order of params, branches
    for i, grad in enumerate(found, start=1):
        if needs[i] and i != 8:
            out[i] = grad
    return out


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b.to(a.dtype)
