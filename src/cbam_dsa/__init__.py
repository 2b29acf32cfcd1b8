"""cbam-dsa: CBAM with fused channel attention, dynamic spatial attention and a residual blend."""

from . import functional
from .block import CBAMResidualDynamicSA
from .channel import ChannelAttentionFusionT
from .integrations import add_attention, cbam_config, from_original_cbam, from_timm_cbam
from .maps import AttentionMaps, MapRecorder, find_blocks
from .spatial import DynamicSpatialAttention

__version__ = "0.1.0"

__all__ = [
    "AttentionMaps",
    "CBAMResidualDynamicSA",
    "ChannelAttentionFusionT",
    "DynamicSpatialAttention",
    "MapRecorder",
    "__version__",
    "add_attention",
    "cbam_config",
    "find_blocks",
    "from_original_cbam",
    "from_timm_cbam",
    "functional",
]
