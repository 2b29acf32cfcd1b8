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

The converters live in :mod:`.cbam_timm` (timm's ``CbamModule``) and :mod:`.cbam_original` (the original layout),
what they share in :mod:`._cbam`; this module gathers their public names.
"""

from __future__ import annotations

from ._cbam import cbam_config
from .cbam_original import convert_original_cbam_state_dict, from_original_cbam, original_cbam_prefixes
from .cbam_timm import convert_timm_cbam_modules, from_timm_cbam

__all__ = [
    "cbam_config",
    "convert_original_cbam_state_dict",
    "convert_timm_cbam_modules",
    "from_original_cbam",
    "from_timm_cbam",
    "original_cbam_prefixes",
]
