"""Start from classic CBAM weights: convert them into a CBAMResidualDynamicSA in CBAM configuration.

CBAM (Woo et al., 2018, https://arxiv.org/abs/1807.06521) is our block with one 7x7 spatial branch, no dilated
branch, sum fusion, sigmoid gates, ``T = 1`` and no residual (:func:`cbam_config`). Two layouts are read:

* timm's ``CbamModule`` (``timm/layers/cbam.py``): the channel MLP as 1x1 convs (bias off by default), the
  spatial conv without bias followed by BatchNorm, descriptors stacked as ``[mean_c, max_c]``.
* the original implementation (https://github.com/Jongchan/attention-module, ``MODELS/cbam.py``), read from a
  state_dict: the channel MLP as ``Linear`` layers with bias (``ChannelGate.mlp.1``, ``ChannelGate.mlp.3``), the
  spatial conv without bias followed by BatchNorm (``SpatialGate.spatial.conv``, ``SpatialGate.spatial.bn``),
  descriptors stacked as ``[max_c, mean_c]`` (the branch kernel's two input channels are swapped to match ours).

In eval mode BatchNorm is a fixed affine map, so it folds into the branch conv:
``w' = w * g / sqrt(v + eps)`` and ``b' = (b - m) * g / sqrt(v + eps) + beta``. The converted block equals the
source in eval mode. In training mode the source normalises with batch statistics and the block does not, so
fine-tuning starts from the source's eval-mode function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as FA
from .._checks import check_choice, check_int, check_kernel_size
from ..block import CBAMResidualDynamicSA

__all__ = [
    "cbam_config",
    "convert_original_cbam_state_dict",
    "convert_timm_cbam_modules",
    "from_original_cbam",
    "from_timm_cbam",
    "original_cbam_prefixes",
]

# Keys of one original CBAM module, relative to its prefix.
_MLP1_WEIGHT = "ChannelGate.mlp.1.weight"
_MLP1_BIAS = "ChannelGate.mlp.1.bias"
_MLP2_WEIGHT = "ChannelGate.mlp.3.weight"
_MLP2_BIAS = "ChannelGate.mlp.3.bias"
_CONV_WEIGHT = "SpatialGate.spatial.conv.weight"
_CONV_BIAS = "SpatialGate.spatial.conv.bias"
_BN = "SpatialGate.spatial.bn."
_BN_AFFINE = (_BN + "weight", _BN + "bias")
_BN_STATS = (_BN + "running_mean", _BN + "running_var")
_BN_COUNTER = _BN + "num_batches_tracked"
_ORIGINAL_KEYS = frozenset(
    (_MLP1_WEIGHT, _MLP1_BIAS, _MLP2_WEIGHT, _MLP2_BIAS, _CONV_WEIGHT, _CONV_BIAS, *_BN_AFFINE, *_BN_STATS, _BN_COUNTER)
)


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


def _hidden_width_kwargs(channels: int, hidden: int) -> dict[str, int]:
    """``reduction`` and ``min_hidden`` giving ``max(min_hidden, channels // reduction) == hidden`` exactly."""
    reduction = max(1, channels // hidden)
    if channels // reduction != hidden:
        # channels // (q + 1) < hidden for q = channels // hidden, so min_hidden decides.
        reduction = channels // hidden + 1
    return {"reduction": reduction, "min_hidden": hidden}


def _fold_batchnorm(
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


def _cbam_block(
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
    config.update(_hidden_width_kwargs(channels, hidden), sa_gate=sa_gate)
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


# ---------------------------------------------------------------------------------------------- timm CbamModule


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
        weight, bias = _fold_batchnorm(
            conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps
        )
    elif isinstance(norm, (nn.Identity, nn.Sequential)) and not list(norm.children()):
        weight = conv.weight.detach()
        bias = torch.zeros(1, device=weight.device, dtype=weight.dtype) if conv.bias is None else conv.bias.detach()
    else:
        raise ValueError(f"module.spatial.conv.bn is {norm!r}; only BatchNorm2d (or none) can be folded")

    mlp = (channel.fc1.weight, channel.fc1.bias, channel.fc2.weight, channel.fc2.bias)
    block = _cbam_block(mlp, weight, bias, act, ca_gate, sa_gate)
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


# ---------------------------------------------------------------------------------------------- original layout


def original_cbam_prefixes(state_dict: Mapping[str, Any]) -> list[str]:
    """The prefixes of every original CBAM module in ``state_dict``, e.g. ``["layer1.0.cbam.", ...]``.

    A module is recognised by its ``ChannelGate.mlp.1.weight`` key; the prefix of a lone module is ``""``.
    """
    return [key[: -len(_MLP1_WEIGHT)] for key in state_dict if key.endswith(_MLP1_WEIGHT)]


def _require(state_dict: Mapping[str, Any], prefix: str, key: str) -> Tensor:
    full = prefix + key
    if full not in state_dict:
        found = original_cbam_prefixes(state_dict)
        hint = f"; CBAM modules found at prefixes {found}" if found else "; it holds no original CBAM module"
        raise KeyError(f"state_dict has no key {full!r} (prefix={prefix!r}){hint}")
    value = state_dict[full]
    if not isinstance(value, Tensor):
        raise TypeError(f"state_dict[{full!r}] must be a tensor, but got {type(value).__name__}")
    return value


def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, but got {tuple(tensor.shape)}")


def from_original_cbam(
    state_dict: Mapping[str, Tensor], prefix: str = "", bn_eps: float = 1e-5
) -> CBAMResidualDynamicSA:
    """Convert one CBAM module of the original implementation, given by its state_dict, into a block.

    Reads ``ChannelGate.mlp.{1,3}.{weight,bias}`` (``Linear`` layers), ``SpatialGate.spatial.conv.weight`` and
    ``SpatialGate.spatial.bn.*`` under ``prefix``; folds the BatchNorm into the branch conv and swaps the
    kernel's input channels from the original ``[max_c, mean_c]`` order to ours. The block is in eval mode, on
    the tensors' device and in their dtype.

    Args:
        state_dict (Mapping[str, Tensor]): a module's or a whole model's state_dict with the original key names.
        prefix (str): where the module's keys start, e.g. ``"layer1.0.cbam."`` (a missing trailing dot is
            added); see :func:`original_cbam_prefixes`. Default: ``""``.
        bn_eps (float): the spatial BatchNorm's ``eps`` (the original uses ``1e-5``). Default: ``1e-5``.

    Returns:
        CBAMResidualDynamicSA: the converted block, in eval mode.

    Raises:
        KeyError: a required key is missing (the message lists the prefixes where CBAM modules were found).
        ValueError: a shape does not fit the layout, a key under ``prefix`` the layout does not have, or a
            module built with ``no_spatial=True`` (the block always applies spatial attention).

    Shape:
        The block maps :math:`(B, C, H, W)` to :math:`(B, C, H, W)` with ``C`` the ``Linear`` layers' width.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, but got {type(state_dict).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, but got {prefix!r} ({type(prefix).__name__})")
    if prefix and not prefix.endswith("."):
        prefix += "."
    if not (isinstance(bn_eps, (int, float)) and math.isfinite(bn_eps) and bn_eps >= 0):
        raise ValueError(f"bn_eps must be a finite number >= 0, but got {bn_eps!r}")

    fc1_weight = _require(state_dict, prefix, _MLP1_WEIGHT)
    if fc1_weight.dim() != 2:
        raise ValueError(
            f"{prefix + _MLP1_WEIGHT} must be a Linear weight (hidden, C), but got {tuple(fc1_weight.shape)}"
        )
    hidden, channels = fc1_weight.shape
    fc1_bias = _require(state_dict, prefix, _MLP1_BIAS)
    fc2_weight = _require(state_dict, prefix, _MLP2_WEIGHT)
    fc2_bias = _require(state_dict, prefix, _MLP2_BIAS)
    _check_shape(prefix + _MLP1_BIAS, fc1_bias, (hidden,))
    _check_shape(prefix + _MLP2_WEIGHT, fc2_weight, (channels, hidden))
    _check_shape(prefix + _MLP2_BIAS, fc2_bias, (channels,))
    gates = (prefix + "ChannelGate.", prefix + "SpatialGate.")
    unknown = sorted(k for k in state_dict if k.startswith(gates) and k[len(prefix) :] not in _ORIGINAL_KEYS)
    if unknown:
        raise ValueError(f"state_dict has keys under prefix {prefix!r} that the original CBAM layout lacks: {unknown}")

    if prefix + _CONV_WEIGHT not in state_dict:
        raise ValueError(
            f"state_dict has no {prefix + _CONV_WEIGHT!r}: a CBAM module built with no_spatial=True (channel "
            "attention only) cannot be converted, because the block always applies spatial attention"
        )
    conv_weight = _require(state_dict, prefix, _CONV_WEIGHT)
    kernel = conv_weight.shape[-1] if conv_weight.dim() == 4 else 0
    if conv_weight.dim() != 4 or kernel % 2 == 0:
        raise ValueError(
            f"{prefix + _CONV_WEIGHT} must have shape (1, 2, k, k) with k odd, but got {tuple(conv_weight.shape)}"
        )
    _check_shape(prefix + _CONV_WEIGHT, conv_weight, (1, 2, kernel, kernel))
    conv_bias = state_dict.get(prefix + _CONV_BIAS)
    if conv_bias is not None:
        _check_shape(prefix + _CONV_BIAS, conv_bias, (1,))

    bn_keys = [prefix + k for k in (*_BN_AFFINE, *_BN_STATS)]
    if any(k in state_dict for k in bn_keys):
        running_mean, running_var = (_require(state_dict, prefix, k) for k in _BN_STATS)
        bn_weight, bn_bias = (state_dict.get(prefix + k) for k in _BN_AFFINE)
        if (bn_weight is None) != (bn_bias is None):
            raise KeyError(f"state_dict has only one of {[prefix + k for k in _BN_AFFINE]}")
        for key in bn_keys:
            if key in state_dict:
                _check_shape(key, state_dict[key], (1,))
        weight, bias = _fold_batchnorm(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, bn_eps)
    else:  # built with bn=False
        weight = conv_weight.detach()
        bias = torch.zeros(1, dtype=weight.dtype, device=weight.device) if conv_bias is None else conv_bias.detach()

    weight = weight[:, [1, 0]]  # original descriptors [max_c, mean_c] -> ours [mean_c, max_c]
    block = _cbam_block((fc1_weight, fc1_bias, fc2_weight, fc2_bias), weight, bias, "relu", "sigmoid", "sigmoid")
    return block.eval()


def convert_original_cbam_state_dict(
    state_dict: Mapping[str, Tensor], attention_name: str = "attention", bn_eps: float = 1e-5
) -> dict[str, Tensor]:
    """Rewrite a whole model's original-CBAM checkpoint for a model whose blocks hold our block instead.

    Every CBAM module's keys (found by :func:`original_cbam_prefixes`) are replaced by the state_dict of its
    conversion (:func:`from_original_cbam`), under the same prefix with its last name replaced by
    ``attention_name`` (``layer1.0.cbam.`` becomes ``layer1.0.attention.``); every other key is kept as is.
    The original ResNets (``MODELS/model_resnet.py``) use torchvision's key names and put CBAM where
    :func:`~cbam_dsa.add_attention` puts the block, so::

        model = add_attention(torchvision.models.resnet50(), **cbam_config())
        state = torch.load(path, weights_only=True)["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
        model.load_state_dict(convert_original_cbam_state_dict(state))

    Args:
        state_dict (Mapping[str, Tensor]): the original model's state_dict.
        attention_name (str): the name the block has in the new model. Default: ``"attention"``.
        bn_eps (float): the spatial BatchNorm's ``eps``. Default: ``1e-5``.

    Returns:
        dict[str, Tensor]: the new state_dict.

    Raises:
        ValueError: no CBAM module found, or one cannot be converted (see :func:`from_original_cbam`).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, but got {type(state_dict).__name__}")
    if not (isinstance(attention_name, str) and attention_name.isidentifier()):
        raise ValueError(f"attention_name must be a module name such as 'attention', but got {attention_name!r}")
    prefixes = original_cbam_prefixes(state_dict)
    if not prefixes:
        raise ValueError(f"state_dict holds no original CBAM module (no key ends with {_MLP1_WEIGHT!r})")
    converted: dict[str, Tensor] = {}
    for prefix in prefixes:
        parent = prefix[:-1].rpartition(".")[0]
        new_prefix = f"{parent}.{attention_name}." if parent else f"{attention_name}."
        block = from_original_cbam(state_dict, prefix, bn_eps)
        converted.update({new_prefix + key: value for key, value in block.state_dict().items()})
    kept = {
        key: value
        for key, value in state_dict.items()
        if not any(key.startswith(p) and key[len(p) :] in _ORIGINAL_KEYS for p in prefixes)
    }
    return {**kept, **converted}
