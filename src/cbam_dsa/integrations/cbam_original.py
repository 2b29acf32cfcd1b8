"""Convert CBAM modules of the original implementation, read from a state_dict, into blocks in CBAM configuration.

The original implementation (https://github.com/Jongchan/attention-module, ``MODELS/cbam.py``): the channel MLP as
``Linear`` layers with bias (``ChannelGate.mlp.1``, ``ChannelGate.mlp.3``), the spatial conv without bias followed
by BatchNorm (``SpatialGate.spatial.conv``, ``SpatialGate.spatial.bn``), descriptors stacked as ``[max_c, mean_c]``
(the branch kernel's two input channels are swapped to match ours). The BatchNorm is folded into the branch conv,
so the converted block equals the source in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..block import CBAMResidualDynamicSA
from ._cbam import cbam_block, fold_batchnorm

__all__ = ["convert_original_cbam_state_dict", "from_original_cbam", "original_cbam_prefixes"]

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
        weight, bias = fold_batchnorm(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, bn_eps)
    else:  # built with bn=False
        weight = conv_weight.detach()
        bias = torch.zeros(1, dtype=weight.dtype, device=weight.device) if conv_bias is None else conv_bias.detach()

    weight = weight[:, [1, 0]]  # original descriptors [max_c, mean_c] -> ours [mean_c, max_c]
    block = cbam_block((fc1_weight, fc1_bias, fc2_weight, fc2_bias), weight, bias, "relu", "sigmoid", "sigmoid")
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
