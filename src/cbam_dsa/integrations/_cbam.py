"""What the two CBAM converters share: the CBAM configuration, BatchNorm folding, the block built from weights.

Used by :mod:`.cbam_timm` (timm's ``CbamModule``) and :mod:`.cbam_original` (the original implementation's
state_dict); :mod:`.cbam_import` re-exports :func:`cbam_config`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as FA
from .._checks import check_choice, check_int, check_kernel_size
from ..block import CBAMResidualDynamicSA

__all__ = ["cbam_block", "cbam_config", "fold_batchnorm", "hidden_width_kwargs"]


def cbam_config(
    reduction: int = 16,
    min_hidden: int = 1,
    spatial_kernel_size: int = 7,
    act: str = "relu",
    gate: str = "sigmoid",
) -> dict[str, Any]:
    """The block's keyword arguments that make it CBAM.

    One ``spatial_kernel_size`` branch, no dilated branch, sum fusion, ``T = 1`` for both gates, no residual.
    With the defaults the hidden width is ``channels // 16``, as in the original implementation.

    Args:
        reduction (int): channel MLP reduction ratio. Default: ``16``.
        min_hidden (int): lower bound of the hidden width. Default: ``1``.
        spatial_kernel_size (int): odd kernel size of the spatial conv. Default: ``7``.
        act (str): MLP activation, ``"relu"`` or ``"silu"``. Default: ``"relu"``.
        gate (str): both gates, ``"sigmoid"`` or ``"hardsigmoid"``. Default: ``"sigmoid"``.

    Returns:
        dict: keyword arguments for :class:`~cbam_dsa.CBAMResidualDynamicSA` (all but ``channels``).

    Example:
        >>> block = CBAMResidualDynamicSA(64, **cbam_config())
        >>> block.ca.hidden, [b.kernel_size for b in block.sa.branches], block.alpha
        (4, [(7, 7)], None)
    """
    return {
        "reduction": check_int("reduction", reduction),
        "min_hidden": check_int("min_hidden", min_hidden),
        "ca_fusion": "sum",
        "ca_gate": check_choice("gate", gate, FA.GATES),
        "ca_temperature": 1.0,
        "ca_act": check_choice("act", act, FA.ACTIVATIONS),
        "sa_gate": gate,
        "sa_temperature": 1.0,
        "learnable_temperature": False,
        "sa_kernels": (check_kernel_size("spatial_kernel_size", spatial_kernel_size),),
        "sa_use_dilated": False,
        "residual": False,
    }


def hidden_width_kwargs(channels: int, hidden: int) -> dict[str, int]:
    """``reduction`` and ``min_hidden`` giving ``max(min_hidden, channels // reduction) == hidden`` exactly."""
    reduction = max(1, channels // hidden)
    if channels // reduction != hidden:
        # channels // (q + 1) < hidden for q = channels // hidden, so min_hidden decides.
        reduction = channels // hidden + 1
    return {"reduction": reduction, "min_hidden": hidden}


def fold_batchnorm(
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm after a conv into the conv's weight and bias (computed in float64).

    Shape:
        - weight: :math:`(O, I, k, k)`; bias, bn_weight, bn_bias, running_mean, running_var: :math:`(O,)`
        - Output: :math:`(O, I, k, k)` and :math:`(O,)` in ``weight.dtype``.
    """
    w64 = weight.detach().double()
    b64 = torch.zeros(w64.shape[0], dtype=torch.float64, device=w64.device) if bias is None else bias.detach().double()
    gamma = torch.ones_like(b64) if bn_weight is None else bn_weight.detach().double()
    beta = torch.zeros_like(b64) if bn_bias is None else bn_bias.detach().double()
    scale = gamma / torch.sqrt(running_var.detach().double() + eps)
    folded_weight = w64 * scale.view(-1, 1, 1, 1)
    folded_bias = (b64 - running_mean.detach().double()) * scale + beta
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


def cbam_block(
    mlp: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
    spatial_weight: Tensor,
    spatial_bias: Tensor,
    act: str,
    ca_gate: str,
    sa_gate: str,
) -> CBAMResidualDynamicSA:
    """A block in CBAM configuration holding the given weights (MLP weights as ``(out, in)`` or 1x1 convs)."""
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = mlp
    hidden, channels = fc1_weight.shape[:2]
    config = cbam_config(spatial_kernel_size=spatial_weight.shape[-1], act=act, gate=ca_gate)
    config.update(hidden_width_kwargs(channels, hidden), sa_gate=sa_gate)
    block = CBAMResidualDynamicSA(channels, **config, device=fc1_weight.device, dtype=fc1_weight.dtype)
    with torch.no_grad():
        block.ca.fc1.weight.copy_(fc1_weight.reshape(block.ca.fc1.weight.shape))
        block.ca.fc2.weight.copy_(fc2_weight.reshape(block.ca.fc2.weight.shape))
        for conv, bias in ((block.ca.fc1, fc1_bias), (block.ca.fc2, fc2_bias)):
            if bias is None:
                conv.bias.zero_()
            else:
                conv.bias.copy_(bias)
        block.sa.branches[0].weight.copy_(spatial_weight)
        block.sa.branches[0].bias.copy_(spatial_bias)
    return block
