"""timm integration: the block as the ``attn_layer`` of timm models.

timm builds each residual block's attention as ``attn_layer(channels, device=..., dtype=...)``
(``timm.layers.create_attn``), so the block class itself, or a ``functools.partial`` of it, is a drop-in::

    timm.create_model("resnet50", block_args=dict(attn_layer=CBAMResidualDynamicSA))
    timm.create_model("resnet50", block_args=dict(attn_layer=attn_layer(reduction=8, sa_kernels=(3, 7))))

:func:`attn_layer` binds block options like a partial does, but checks them when it is called rather than deep
inside the model's constructor, and it also accepts the ``act_layer=`` that some families (CSPNet) pass to their
attention layer. timm is not imported here: this module only produces the callable timm calls.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..block import CBAMResidualDynamicSA
from ._common import HOST_ARGUMENTS, check_block_kwargs

__all__ = ["HOST_ARGUMENTS", "attn_layer", "create_block"]


def _activation_name(act_layer: Any) -> str | None:
    """The block's name for a timm ``act_layer`` (string, class or partial), or ``None`` if it has none."""
    if isinstance(act_layer, str):
        return {"relu": "relu", "silu": "silu", "swish": "silu"}.get(act_layer.lower())
    if isinstance(act_layer, functools.partial):
        act_layer = act_layer.func
    if isinstance(act_layer, type) and issubclass(act_layer, nn.Module):
        if issubclass(act_layer, nn.ReLU):
            return "relu"
        if issubclass(act_layer, nn.SiLU) or act_layer.__name__ in ("Swish", "SwishMe"):
            return "silu"
    return None


def create_block(
    channels: int,
    *,
    act_layer: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **block_kwargs: Any,
) -> CBAMResidualDynamicSA:
    """Build the block the way timm calls an attention layer.

    Args:
        channels (int): the host block's output channels.
        act_layer (str, type or partial, optional): the host's activation (CSPNet passes it). It becomes the
            channel MLP's activation (``ca_act``), as in timm's ``CbamModule``, unless ``ca_act`` is given in
            ``block_kwargs``, which then wins. ReLU and SiLU are supported. Default: ``None``.
        device, dtype: factory keywords, passed by timm.
        **block_kwargs: options of :class:`~cbam_dsa.CBAMResidualDynamicSA`.

    Returns:
        CBAMResidualDynamicSA: the block.

    Raises:
        ValueError: ``act_layer`` has no counterpart in the block and ``ca_act`` was not given.

    Shape:
        The block maps :math:`(B, C, H, W)` to :math:`(B, C, H, W)`, ``C = channels``.
    """
    if act_layer is not None and "ca_act" not in block_kwargs:
        act = _activation_name(act_layer)
        if act is None:
            raise ValueError(
                f"act_layer={act_layer!r} from the timm model has no counterpart in the block's channel MLP "
                "(relu, silu); choose one with attn_layer(ca_act='relu') or attn_layer(ca_act='silu')"
            )
        block_kwargs = {**block_kwargs, "ca_act": act}
    return CBAMResidualDynamicSA(channels, **block_kwargs, device=device, dtype=dtype)


def attn_layer(**block_kwargs: Any) -> functools.partial[CBAMResidualDynamicSA]:
    """The block with options bound, checked at once, ready to pass as timm's ``attn_layer``.

    Args:
        **block_kwargs: options of :class:`~cbam_dsa.CBAMResidualDynamicSA` (all but ``channels``, ``device``
            and ``dtype``, which the model gives; ``return_maps=True`` is refused, use
            :class:`~cbam_dsa.MapRecorder`).

    Returns:
        functools.partial: ``create_block`` with the options bound; timm calls it as ``layer(channels, **kw)``.

    Raises:
        TypeError: a host argument or an unknown option.
        ValueError: a value the block refuses, or ``return_maps=True``.

    Example:
        >>> import timm
        >>> model = timm.create_model("resnet18", block_args=dict(attn_layer=attn_layer(reduction=8)))
        >>> model.layer1[0].se.ca.hidden
        8
    """
    check_block_kwargs(block_kwargs)
    return functools.partial(create_block, **block_kwargs)
