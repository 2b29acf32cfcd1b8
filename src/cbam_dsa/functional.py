"""The math of CBAMResidualDynamicSA as plain functions: the executable specification (reference path).

Every function here is written for clarity, not speed. The modules in ``channel.py``, ``spatial.py`` and
``block.py`` call these functions on their reference path, and every faster path is tested equal to them
(outputs and gradients).

Symbols (see ``README.md``):

* ``x``: input features ``(B, C, H, W)``.
* Channel attention: ``a = mlp(mean_hw(x))``, ``m = mlp(max_hw(x))``, ``z = w0 * a + w1 * m``,
  ``ca = gate(z / T_ca)``.
* Dynamic spatial attention on ``y = x * ca``: ``s = [mean_c(y), max_c(y)]``, ``r = softmax(router(mean_hw(s)))``,
  ``logit = sum_k r_k * conv_k(s)``, ``sa = gate(logit / T_sa)``.
* Residual blend: ``out = x + alpha * (y * sa - x)``.

Precision: pooling accumulates in at least float32 (:func:`accumulation_dtype`), and the light networks
(MLP, router, branch convolutions, gates) run on those float32 descriptors, so float16 inputs with values up to
the float16 limit give finite maps. Only the maps are cast back to the input's dtype; the full-size products stay
in the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "FUSIONS",
    "GATES",
    "accumulation_dtype",
    "activation",
    "apply_gate",
    "branch_padding",
    "cbam_residual_dynamic_sa",
    "channel_attention",
    "channel_attention_map",
    "channel_mlp",
    "channel_pool",
    "dynamic_spatial_attention",
    "fusion_weights",
    "residual_blend",
    "router_weights",
    "spatial_attention_map",
    "spatial_pool",
]

GATES = ("sigmoid", "hardsigmoid")
FUSIONS = ("sum", "softmax")
ACTIVATIONS = ("relu", "silu")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype pooling and the light networks run in: ``dtype`` promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)


def apply_gate(z: Tensor, gate: str, temperature: Tensor | float = 1.0) -> Tensor:
    """Gate ``z / temperature`` into ``[0, 1]``.

    Args:
        z (Tensor): logits of any shape.
        gate (str): ``"sigmoid"`` or ``"hardsigmoid"`` (PyTorch's ``clamp(z / 6 + 1 / 2, 0, 1)``).
        temperature (Tensor or float): divides ``z`` first; ``T < 1`` sharpens, ``T > 1`` softens.

    Returns:
        Tensor: the gate, same shape as ``z``.
    """
    z = z / temperature
    if gate == "sigmoid":
        return torch.sigmoid(z)
    if gate == "hardsigmoid":
        return F.hardsigmoid(z)
    raise ValueError(f"gate must be one of {GATES}, but got {gate!r}")


def activation(z: Tensor, act: str) -> Tensor:
    """The channel MLP's activation: ``"relu"`` or ``"silu"``."""
    if act == "relu":
        return F.relu(z)
    if act == "silu":
        return F.silu(z)
    raise ValueError(f"act must be one of {ACTIVATIONS}, but got {act!r}")


def channel_pool(x: Tensor) -> tuple[Tensor, Tensor]:
    """Average and max over H, W, in :func:`accumulation_dtype` (at least float32).

    Shape:
        - x: :math:`(B, C, H, W)`
        - Output: two tensors :math:`(B, C, 1, 1)`.
    """
    acc = accumulation_dtype(x.dtype)
    avg = x.mean(dim=(2, 3), keepdim=True, dtype=acc)
    mx = x.amax(dim=(2, 3), keepdim=True).to(acc)
    return avg, mx


def spatial_pool(y: Tensor) -> Tensor:
    """Channel-wise mean and max, stacked: ``s = [mean_c(y), max_c(y)]``, in :func:`accumulation_dtype`.

    Shape:
        - y: :math:`(B, C, H, W)`
        - Output: :math:`(B, 2, H, W)`
    """
    acc = accumulation_dtype(y.dtype)
    return torch.cat([y.mean(dim=1, keepdim=True, dtype=acc), y.amax(dim=1, keepdim=True).to(acc)], dim=1)


def channel_mlp(
    z: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor, act: str
) -> Tensor:
    """The shared MLP: 1x1 conv ``C -> hidden`` (bias), ``act``, 1x1 conv ``hidden -> C`` (bias).

    Shape:
        - z: :math:`(N, C, 1, 1)`
        - Output: :math:`(N, C, 1, 1)`
    """
    hidden = activation(F.conv2d(z, fc1_weight.to(z.dtype), fc1_bias.to(z.dtype)), act)
    return F.conv2d(hidden, fc2_weight.to(z.dtype), fc2_bias.to(z.dtype))


def fusion_weights(fusion_logits: Tensor | None, reference: Tensor) -> Tensor:
    """The weights of the avg and max descriptors: ``softmax(logits)``, or ``[1, 1]`` for sum fusion.

    Args:
        fusion_logits (Tensor, optional): the learned logits, shape ``(2,)``; ``None`` means sum fusion.
        reference (Tensor): gives device and dtype for the sum-fusion weights.

    Returns:
        Tensor: shape ``(2,)``.
    """
    if fusion_logits is None:
        return torch.ones(2, device=reference.device, dtype=reference.dtype)
    return torch.softmax(fusion_logits.to(reference.dtype), dim=0)


def channel_attention_map(
    avg: Tensor,
    mx: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    fusion_logits: Tensor | None,
    act: str,
    gate: str,
    temperature: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """The channel map from the pooled descriptors: ``ca = gate((w0 * mlp(avg) + w1 * mlp(max)) / T)``.

    Shape:
        - avg, mx: :math:`(B, C, 1, 1)`
        - Output: ``ca`` :math:`(B, C, 1, 1)` and the fusion weights :math:`(2,)`.
    """
    a = channel_mlp(avg, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act)
    m = channel_mlp(mx, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act)
    weights = fusion_weights(fusion_logits, a)
    z = weights[0] * a + weights[1] * m
    return apply_gate(z, gate, temperature), weights


def channel_attention(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    fusion_logits: Tensor | None = None,
    act: str = "relu",
    gate: str = "sigmoid",
    temperature: Tensor | float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Channel attention with fused avg/max descriptors: ``y = x * ca``.

    Args:
        x (Tensor): input features.
        fc1_weight, fc1_bias (Tensor): first 1x1 conv, ``(hidden, C, 1, 1)`` and ``(hidden,)``.
        fc2_weight, fc2_bias (Tensor): second 1x1 conv, ``(C, hidden, 1, 1)`` and ``(C,)``.
        fusion_logits (Tensor, optional): ``(2,)`` logits for softmax fusion; ``None`` for sum fusion.
        act (str): ``"relu"`` or ``"silu"``. Default: ``"relu"``.
        gate (str): ``"sigmoid"`` or ``"hardsigmoid"``. Default: ``"sigmoid"``.
        temperature (Tensor or float): divides the gate's input. Default: ``1.0``.

    Returns:
        tuple: ``(y, ca, fusion_w)``.

    Shape:
        - x: :math:`(B, C, H, W)`
        - y: :math:`(B, C, H, W)`; ca: :math:`(B, C, 1, 1)`; fusion_w: :math:`(2,)`
    """
    avg, mx = channel_pool(x)
    ca, weights = channel_attention_map(
        avg, mx, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fusion_logits, act, gate, temperature
    )
    ca = ca.to(x.dtype)
    return x * ca, ca, weights.to(x.dtype)


def branch_padding(kernel_size: int, dilation: int) -> int:
    """The 'same' padding of an odd kernel with the given dilation: ``dilation * (kernel_size - 1) // 2``."""
    return dilation * (kernel_size - 1) // 2


def router_weights(s: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor) -> Tensor:
    """Per-sample branch weights: ``softmax_K(fc2(relu(fc1(mean_hw(s)))))``.

    Shape:
        - s: :math:`(B, 2, H, W)`
        - Output: :math:`(B, K)`
    """
    pooled = s.mean(dim=(2, 3), keepdim=True)
    hidden = F.relu(F.conv2d(pooled, fc1_weight.to(s.dtype), fc1_bias.to(s.dtype)))
    logits = F.conv2d(hidden, fc2_weight.to(s.dtype), fc2_bias.to(s.dtype))
    return torch.softmax(logits.flatten(1), dim=1)


def spatial_attention_map(
    s: Tensor,
    branch_weights: list[Tensor],
    branch_biases: list[Tensor],
    dilations: Sequence[int],
    router_params: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    gate: str,
    temperature: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """The spatial map from the descriptors: ``sa = gate(sum_k r_k * conv_k(s) / T)``.

    Args:
        s (Tensor): ``[mean_c, max_c]`` descriptors.
        branch_weights (list[Tensor]): one ``(1, 2, k, k)`` kernel per branch.
        branch_biases (list[Tensor]): one ``(1,)`` bias per branch.
        dilations (Sequence[int]): one dilation per branch.
        router_params (tuple, optional): ``(fc1_weight, fc1_bias, fc2_weight, fc2_bias)`` of the router;
            ``None`` when there is a single branch (its weight is then 1).
        gate (str): ``"sigmoid"`` or ``"hardsigmoid"``.
        temperature (Tensor or float): divides the gate's input.

    Returns:
        tuple: ``(sa, router_w)``.

    Shape:
        - s: :math:`(B, 2, H, W)`
        - Output: sa :math:`(B, 1, H, W)`, router_w :math:`(B, K)`
    """
    if not branch_weights:
        raise ValueError("spatial attention needs at least one branch, but got none")
    if router_params is None:
        router = torch.ones(s.shape[0], len(branch_weights), device=s.device, dtype=s.dtype)
    else:
        router = router_weights(s, *router_params)
    logit = torch.zeros_like(s[:, :1])
    for k, (weight, bias, dilation) in enumerate(zip(branch_weights, branch_biases, dilations, strict=True)):
        padding = branch_padding(weight.shape[-1], dilation)
        branch = F.conv2d(s, weight.to(s.dtype), bias.to(s.dtype), padding=padding, dilation=dilation)
        logit = logit + router[:, k].view(-1, 1, 1, 1) * branch
    return apply_gate(logit, gate, temperature), router


def dynamic_spatial_attention(
    y: Tensor,
    branch_weights: list[Tensor],
    branch_biases: list[Tensor],
    dilations: Sequence[int],
    router_params: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    gate: str = "sigmoid",
    temperature: Tensor | float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dynamic spatial attention: several convolutions of ``[mean_c, max_c]`` mixed per sample by a router.

    Args:
        y (Tensor): input features.
        branch_weights, branch_biases, dilations, router_params, gate, temperature: see
            :func:`spatial_attention_map`.

    Returns:
        tuple: ``(y * sa, sa, router_w)``.

    Shape:
        - y: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`, sa :math:`(B, 1, H, W)`, router_w :math:`(B, K)`
    """
    sa, router = spatial_attention_map(
        spatial_pool(y), branch_weights, branch_biases, dilations, router_params, gate, temperature
    )
    sa = sa.to(y.dtype)
    return y * sa, sa, router.to(y.dtype)


def residual_blend(x: Tensor, y: Tensor, alpha: Tensor | float) -> Tensor:
    """``out = x + alpha * (y - x)``, i.e. ``(1 - alpha) * x + alpha * y``.

    Shape:
        - x, y: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`
    """
    return x + alpha * (y - x)


def cbam_residual_dynamic_sa(
    x: Tensor,
    channel_params: tuple[Tensor, Tensor, Tensor, Tensor],
    fusion_logits: Tensor | None,
    branch_weights: list[Tensor],
    branch_biases: list[Tensor],
    dilations: Sequence[int],
    router_params: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    alpha: Tensor | float | None = 1.0,
    ca_act: str = "relu",
    ca_gate: str = "sigmoid",
    ca_temperature: Tensor | float = 1.0,
    sa_gate: str = "sigmoid",
    sa_temperature: Tensor | float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole block: channel attention, then dynamic spatial attention, then the residual blend.

    Args:
        x (Tensor): input features.
        channel_params (tuple): ``(fc1_weight, fc1_bias, fc2_weight, fc2_bias)`` of the channel MLP.
        fusion_logits (Tensor, optional): ``(2,)`` logits for softmax fusion; ``None`` for sum fusion.
        branch_weights, branch_biases, dilations, router_params: the spatial part
            (see :func:`dynamic_spatial_attention`).
        alpha (Tensor or float, optional): blend weight; ``None`` means no residual (``out = y``).
        ca_act, ca_gate, ca_temperature, sa_gate, sa_temperature: as in the parts.

    Returns:
        tuple: ``(out, ca, sa, fusion_w, router_w)``.

    Shape:
        - x: :math:`(B, C, H, W)`
        - out: :math:`(B, C, H, W)`; ca: :math:`(B, C, 1, 1)`; sa: :math:`(B, 1, H, W)`;
          fusion_w: :math:`(2,)`; router_w: :math:`(B, K)`
    """
    y, ca, fusion_w = channel_attention(x, *channel_params, fusion_logits, ca_act, ca_gate, ca_temperature)
    y, sa, router_w = dynamic_spatial_attention(
        y, branch_weights, branch_biases, dilations, router_params, sa_gate, sa_temperature
    )
    out = y if alpha is None else residual_blend(x, y, alpha)
    return out, ca, sa, fusion_w, router_w
