"""cbam-dsa: CBAM with fused channel attention, dynamic spatial attention and a residual blend."""

from . import functional
from .block import CBAMResidualDynamicSA
from .channel import ChannelAttentionFusionT
from .spatial import DynamicSpatialAttention

__version__ = "0.1.0"

__all__ = [
    "CBAMResidualDynamicSA",
    "ChannelAttentionFusionT",
    "DynamicSpatialAttention",
    "__version__",
    "functional",
]
