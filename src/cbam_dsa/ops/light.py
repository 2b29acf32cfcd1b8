"""The block's light networks (the channel MLP with its fusion and gate, the router with the branches and the spatial
gate) in PyTorch operations, forward and with a hand-written backward.

They run on the pooled descriptors (``(2B, C)`` rows and ``(B, 2, H, W)`` maps), in
:func:`..functional.accumulation_dtype`, with :mod:`..functional`'s math; the backward follows PyTorch's own
derivative formulas (``threshold_backward`` for the ReLU, ``silu_backward``, ``sigmoid_backward``,
``hardsigmoid_backward``, the softmax's and the division's), so non-finite values spread as through autograd. No
autograd is used: they run inside an operator's kernel, below the autograd keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as FA
from . import branches as branch_ops

__all__ = [
    "ChannelLight",
    "SpatialLight",
    "channel_backward",
    "channel_forward",
    "channel_resume",
    "spatial_backward",
    "spatial_forward",
    "spatial_resume",
]


def _flat(weight: Tensor, dtype: torch.dtype) -> Tensor:
    return weight.flatten(1).to(dtype)


# PyTorch's hardsigmoid_backward multiplies by 1/6 rounded to float32, in every dtype.
_ONE_SIXTH = float(torch.tensor(1.0 / 6.0, dtype=torch.float32))


def _gate(u: Tensor, gate: str) -> Tensor:
    """:func:`..functional.apply_gate` of ``u`` already divided by its temperature."""
    return torch.sigmoid(u) if gate == "sigmoid" else F.hardsigmoid(u)


def _gate_backward(grad: Tensor, u: Tensor, y: Tensor, gate: str) -> Tensor:
    """``d gate(u) / d u * grad`` from ``u`` and ``y = gate(u)``."""
    if gate == "sigmoid":
        return grad * (1 - y) * y
    return torch.where((u > -3) & (u < 3), grad * _ONE_SIXTH, torch.zeros_like(grad))


def _softmax_backward(grad: Tensor, y: Tensor, dim: int) -> Tensor:
    return y * (grad - (grad * y).sum(dim=dim, keepdim=True))


def _gate_input_backward(grad: Tensor, z: Tensor, u: Tensor, y: Tensor, gate: str, temperature: Tensor):
    """The gradients of ``z`` and of the temperature through ``y = gate(u)``, ``u = z / T``."""
    grad_u = _gate_backward(grad, u, y, gate)
    t = temperature.to(z.dtype)
    return grad_u / t, -(grad_u * z).sum() / (t * t)


class ChannelLight(NamedTuple):
    """:func:`channel_forward`'s results."""

    pre: Tensor  # (2B, Rm): the first layer, before the activation
    hidden: Tensor  # (2B, Rm)
    mlp: Tensor | None  # (2B, C): the second layer (None from channel_resume with sum fusion: no gradient needs it)
    fusion_w: Tensor  # (2,)
    z: Tensor  # (B, C): the gate's input
    u: Tensor  # (B, C): z / T
    ca: Tensor  # (B, C)


def channel_forward(
    pools: Tensor,
    mlp: Sequence[Tensor],
    fusion_logits: Tensor | None,
    temperature: Tensor,
    act: str,
    gate: str,
) -> ChannelLight:
    """The channel map from the pooled rows ``[avg; max]``: ``ca = gate((w0 * mlp(avg) + w1 * mlp(max)) / T)``.

    Shape:
        - pools: :math:`(2B, C)`; mlp: ``(fc1 weight, fc1 bias, fc2 weight, fc2 bias)``
        - Output: :class:`ChannelLight`
    """
    dtype, b = pools.dtype, pools.shape[0] // 2
    pre = F.linear(pools, _flat(mlp[0], dtype), mlp[1].to(dtype))
    hidden = FA.activation(pre, act)
    out = F.linear(hidden, _flat(mlp[2], dtype), mlp[3].to(dtype))
    fusion_w = FA.fusion_weights(fusion_logits, out)
    # sum fusion's weights are ones: the products by them are exact, so they are left out
    z = out[:b] + out[b:] if fusion_logits is None else fusion_w[0] * out[:b] + fusion_w[1] * out[b:]
    u = z / temperature
    return ChannelLight(pre, hidden, out, fusion_w, z, u, _gate(u, gate))


def channel_resume(
    mlp: Sequence[Tensor],
    fusion_logits: Tensor | None,
    temperature: Tensor,
    act: str,
    gate: str,
    z: Tensor,
    pre: Tensor,
) -> ChannelLight:
    """:func:`channel_forward`'s results for :func:`channel_backward` from what the forward kept (the gate's input
    ``z`` and the first layer ``pre``): no matrix product is redone but the second layer's, and that one only for
    learned fusion, whose gradient reads it.

    Shape:
        - z: :math:`(B, C)`; pre: :math:`(2B, R_m)`
        - Output: :class:`ChannelLight`
    """
    hidden = FA.activation(pre, act)
    out = None if fusion_logits is None else F.linear(hidden, _flat(mlp[2], z.dtype), mlp[3].to(z.dtype))
    u = z / temperature
    return ChannelLight(pre, hidden, out, FA.fusion_weights(fusion_logits, z), z, u, _gate(u, gate))


def channel_backward(
    f: ChannelLight,
    pools: Tensor,
    mlp: Sequence[Tensor],
    fusion_logits: Tensor | None,
    temperature: Tensor,
    act: str,
    gate: str,
    grad_ca: Tensor,
    grad_fusion_w: Tensor | None,
) -> tuple[Tensor, list[Tensor], Tensor | None, Tensor]:
    """The gradients of ``pools``, of the MLP's four tensors, of the fusion logits (``None`` for sum fusion) and of
    the temperature, from those of ``ca`` ``(B, C)`` and of the fusion weights (``None``: zero)."""
    b = pools.shape[0] // 2
    grad_z, grad_t = _gate_input_backward(grad_ca, f.z, f.u, f.ca, gate, temperature)
    grad_out = torch.cat([f.fusion_w[0] * grad_z, f.fusion_w[1] * grad_z])
    w1, w2 = _flat(mlp[0], pools.dtype), _flat(mlp[2], pools.dtype)
    grad_hidden = grad_out @ w2
    if act == "relu":  # threshold_backward: no gradient where the output is <= 0 (NaN passes)
        grad_pre = torch.where(f.hidden <= 0, torch.zeros_like(grad_hidden), grad_hidden)
    else:
        sig = torch.sigmoid(f.pre)
        grad_pre = grad_hidden * sig * (1 + f.pre * (1 - sig))
    grads = [grad_pre.t() @ pools, grad_pre.sum(0), grad_out.t() @ f.hidden, grad_out.sum(0)]
    grad_logits = None
    if fusion_logits is not None:
        grad_w = torch.stack([(grad_z * f.mlp[:b]).sum(), (grad_z * f.mlp[b:]).sum()])
        if grad_fusion_w is not None:
            grad_w = grad_w + grad_fusion_w.to(grad_w.dtype)
        grad_logits = _softmax_backward(grad_w, f.fusion_w, 0)
    return grad_pre @ w1, grads, grad_logits, grad_t


class SpatialLight(NamedTuple):
    """:func:`spatial_forward`'s results."""

    pooled: Tensor | None  # (B, 2): the router's input (None from spatial_resume without a router)
    hidden: Tensor  # (B, Rh): the router's hidden layer (ones, Rh = 1, without a router)
    router: Tensor  # (B, K)
    logit: Tensor  # (B, 1, H, W)
    u: Tensor  # logit / T
    sa: Tensor  # (B, 1, H, W)


def spatial_forward(
    s: Tensor,
    router: Sequence[Tensor | None],
    branch_weights: Sequence[Tensor],
    branch_biases: Sequence[Tensor],
    dilations: Sequence[int],
    temperature: Tensor,
    gate: str,
) -> SpatialLight:
    """The spatial map from the descriptors: ``sa = gate(sum_k r_k * conv_k(s) / T)``, ``r`` the router's softmax.

    Shape:
        - s: :math:`(B, 2, H, W)`; router: ``(fc1 weight, fc1 bias, fc2 weight, fc2 bias)`` or four ``None``
        - Output: :class:`SpatialLight`
    """
    b, dtype = s.shape[0], s.dtype
    pooled = s.mean(dim=(2, 3))
    if router[0] is None:
        hidden, weights = s.new_ones(b, 1), s.new_ones(b, len(branch_weights))
    else:
        hidden = F.relu(F.linear(pooled, _flat(router[0], dtype), router[1].to(dtype)))
        weights = torch.softmax(F.linear(hidden, _flat(router[2], dtype), router[3].to(dtype)), dim=1)
    branches = branch_ops.branches_forward(s, branch_weights, branch_biases, dilations)
    k, h, w = branches.shape[1:]
    logit = torch.bmm(weights.view(b, 1, k), branches.reshape(b, k, h * w)).view(b, 1, h, w)
    u = logit / temperature
    return SpatialLight(pooled, hidden, weights, logit, u, _gate(u, gate))


def spatial_resume(
    s: Tensor,
    router: Sequence[Tensor | None],
    temperature: Tensor,
    gate: str,
    logit: Tensor,
    weights: Tensor,
    hidden: Tensor,
) -> SpatialLight:
    """:func:`spatial_forward`'s results for :func:`spatial_backward` from what the forward kept (the gate's input
    ``logit``, the router's weights and hidden layer): neither the router nor the branches are rerun (the router's
    gradient gets what it needs of the branches from :func:`.branches.mixed_backward`).

    Shape:
        - s: :math:`(B, 2, H, W)`; logit: :math:`(B, 1, H, W)`; weights: :math:`(B, K)`; hidden: :math:`(B, R_h)`
        - Output: :class:`SpatialLight`
    """
    pooled = None if router[0] is None else s.mean(dim=(2, 3))
    u = logit / temperature
    return SpatialLight(pooled, hidden, weights, logit, u, _gate(u, gate))


def spatial_backward(
    f: SpatialLight,
    s: Tensor,
    router: Sequence[Tensor | None],
    branch_weights: Sequence[Tensor],
    branch_biases: Sequence[Tensor],
    dilations: Sequence[int],
    temperature: Tensor,
    gate: str,
    grad_sa: Tensor,
    grad_router: Tensor | None,
) -> tuple[Tensor, list[Tensor | None], list[Tensor], list[Tensor], Tensor]:
    """The gradients of ``s``, of the router's four tensors (``None`` without a router), of the branch kernels and
    biases, and of the temperature, from those of ``sa`` and of the router weights (``None``: zero)."""
    b, _, h, w = s.shape
    grad_logit, grad_t = _gate_input_backward(grad_sa, f.logit, f.u, f.sa, gate, temperature)
    grad_s, grad_weights, grad_biases, grad_r = branch_ops.mixed_backward(
        s, branch_weights, branch_biases, dilations, f.router, grad_logit, router[0] is not None
    )
    grads_router: list[Tensor | None] = [None, None, None, None]
    if grad_r is not None:
        if grad_router is not None:
            grad_r = grad_r + grad_router.to(grad_r.dtype)
        grad_logits = _softmax_backward(grad_r, f.router, 1)
        grad_hidden = grad_logits @ _flat(router[2], s.dtype)
        grad_pre = torch.where(f.hidden <= 0, torch.zeros_like(grad_hidden), grad_hidden)
        grads_router = [grad_pre.t() @ f.pooled, grad_pre.sum(0), grad_logits.t() @ f.hidden, grad_logits.sum(0)]
        grad_pooled = grad_pre @ _flat(router[0], s.dtype)
        grad_s = grad_s + (grad_pooled / (h * w)).view(b, 2, 1, 1)
    return grad_s, grads_router, grad_weights, grad_biases, grad_t
