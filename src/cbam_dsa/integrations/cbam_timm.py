"""Convert timm's ``CbamModule`` (``timm/layers/cbam.py``) into a block in CBAM configuration.

timm's layout: the channel MLP as 1x1 convs (bias off by default), the spatial conv without bias followed by
BatchNorm, descriptors stacked as ``[mean_c, max_c]`` (the block's order). The BatchNorm is folded into the branch
conv, so the converted block equals the source in eval mode. timm is imported only inside the functions.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as FA
from ..block import CBAMResidualDynamicSA
from ._cbam import cbam_block, fold_batchnorm

__all__ = ["convert_timm_cbam_modules", "from_timm_cbam"]


def _timm_cbam_classes() -> tuple[type, ...]:
    try:
        from timm.layers.cbam import CbamModule as TimmCbam
        from timm.layers.cbam import ChannelAttn, SpatialAttn
    except ImportError as error:  # pragma: no cover - timm is a declared extra
        raise ImportError("converting timm's CbamModule needs timm: pip install 'cbam-dsa[timm]'") from error
    return TimmCbam, ChannelAttn, SpatialAttn


def _timm_function_classes() -> dict[str, tuple[type, ...]]:
    """The module classes timm builds for each function the block can represent."""
    from timm.layers import activations, activations_me

    return {
        "relu": (nn.ReLU,),
        "silu": (nn.SiLU, activations.Swish, activations_me.SwishMe),
        "sigmoid": (nn.Sigmoid, activations.Sigmoid),
        "hardsigmoid": (nn.Hardsigmoid, activations.HardSigmoid, activations_me.HardSigmoidMe),
    }


def _function_name(module: nn.Module, choices: tuple[str, ...], what: str) -> str:
    classes = _timm_function_classes()
    for name in choices:
        if isinstance(module, classes[name]):
            return name
    raise ValueError(f"{what} is {module!r}; the block supports only {', '.join(choices)} here")


def from_timm_cbam(module: nn.Module) -> CBAMResidualDynamicSA:
    """Convert timm's ``CbamModule`` into a block in CBAM configuration with the same eval-mode output.

    The channel MLP's 1x1 convs are copied (a missing bias, timm's default ``mlp_bias=False``, becomes zero), its
    hidden width is kept exactly, and the spatial BatchNorm is folded into the branch conv. The block is on the
    source's device, in its dtype and in its training mode.

    Args:
        module (nn.Module): a ``timm.layers.CbamModule``.

    Returns:
        CBAMResidualDynamicSA: the converted block.

    Raises:
        TypeError: ``module`` is not a ``CbamModule`` (``LightCbamModule`` is a different function and is refused).
        ValueError: an activation, gate or spatial conv the block cannot represent, or a spatial BatchNorm
            without running statistics.

    Shape:
        The block maps :math:`(B, C, H, W)` to :math:`(B, C, H, W)`, like the source.
    """
    timm_cbam, channel_attn, spatial_attn = _timm_cbam_classes()
    if not isinstance(module, timm_cbam):
        raise TypeError(f"module must be timm's CbamModule, but got {type(module).__name__}")
    channel, spatial = module.channel, module.spatial
    if type(channel) is not channel_attn:
        raise TypeError(f"module.channel must be timm's ChannelAttn, but got {type(channel).__name__}")
    if type(spatial) is not spatial_attn:
        raise TypeError(f"module.spatial must be timm's SpatialAttn, but got {type(spatial).__name__}")

    act = _function_name(channel.act, FA.ACTIVATIONS, "module.channel.act")
    ca_gate = _function_name(channel.gate, FA.GATES, "module.channel.gate")
    sa_gate = _function_name(spatial.gate, FA.GATES, "module.spatial.gate")

    conv, norm = spatial.conv.conv, spatial.conv.bn
    kernel = conv.kernel_size[0]
    if (
        type(conv) is not nn.Conv2d
        or conv.kernel_size != (kernel, kernel)
        or kernel % 2 == 0
        or conv.stride != (1, 1)
        or conv.dilation != (1, 1)
        or conv.padding != (kernel // 2, kernel // 2)
        or conv.groups != 1
    ):
        raise ValueError(
            f"module.spatial.conv.conv is {conv!r}; the block needs an odd square kernel with stride 1, "
            "dilation 1 and 'same' padding"
        )
    for name in ("act", "drop"):
        extra = getattr(norm, name, None)
        if extra is not None and not isinstance(extra, nn.Identity):
            raise ValueError(f"module.spatial.conv.bn.{name} is {extra!r}; only an identity can be converted")
    aa = getattr(spatial.conv, "aa", None)
    if aa is not None and not isinstance(aa, nn.Identity):
        raise ValueError(f"module.spatial.conv.aa is {aa!r}; only an identity can be converted")

    if isinstance(norm, nn.BatchNorm2d):
        if norm.running_mean is None or norm.running_var is None:
            raise ValueError(
                "module.spatial.conv.bn has no running statistics (track_running_stats=False): it normalises "
                "with batch statistics even in eval mode, which cannot be folded into a conv"
            )
        weight, bias = fold_batchnorm(
            conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps
        )
    elif isinstance(norm, (nn.Identity, nn.Sequential)) and not list(norm.children()):
        weight = conv.weight.detach()
        bias = torch.zeros(1, device=weight.device, dtype=weight.dtype) if conv.bias is None else conv.bias.detach()
    else:
        raise ValueError(f"module.spatial.conv.bn is {norm!r}; only BatchNorm2d (or none) can be folded")

    mlp = (channel.fc1.weight, channel.fc1.bias, channel.fc2.weight, channel.fc2.bias)
    block = cbam_block(mlp, weight, bias, act, ca_gate, sa_gate)
    return block.train(module.training)


def convert_timm_cbam_modules(model: nn.Module) -> nn.Module:
    """Replace every timm ``CbamModule`` in ``model`` by its conversion (:func:`from_timm_cbam`), in place.

    Typical use: build the timm model with ``attn_layer="cbam"``, load its CBAM checkpoint, convert, then
    fine-tune or swap in the richer configuration.

    Args:
        model (nn.Module): a model containing ``CbamModule`` layers (or a ``CbamModule`` itself is refused:
            call :func:`from_timm_cbam` on it).

    Returns:
        nn.Module: ``model``, with every ``CbamModule`` replaced.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` holds no ``CbamModule``, or one cannot be converted (see :func:`from_timm_cbam`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    timm_cbam = _timm_cbam_classes()[0]
    if isinstance(model, timm_cbam):
        raise ValueError("model is itself a CbamModule: use from_timm_cbam(model), which returns the new block")
    targets = [name for name, m in model.named_modules() if isinstance(m, timm_cbam)]
    if not targets:
        raise ValueError(f"model ({type(model).__name__}) holds no timm CbamModule to convert")
    converted = {name: from_timm_cbam(model.get_submodule(name)) for name in targets}  # all or nothing
    for name, block in converted.items():
        parent_name, _, child_name = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child_name, block)
    return model
