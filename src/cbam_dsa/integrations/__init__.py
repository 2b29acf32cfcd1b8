"""Integrations: timm, torchvision, and converters from classic CBAM checkpoints.

timm and torchvision are imported only inside the functions that need them, so importing this package (or
``cbam_dsa``) imports neither.
"""

from .cbam_import import (
    cbam_config,
    convert_original_cbam_state_dict,
    convert_timm_cbam_modules,
    from_original_cbam,
    from_timm_cbam,
    original_cbam_prefixes,
)
from .timm import attn_layer
from .torchvision import add_attention

__all__ = [
    "add_attention",
    "attn_layer",
    "cbam_config",
    "convert_original_cbam_state_dict",
    "convert_timm_cbam_modules",
    "from_original_cbam",
    "from_timm_cbam",
    "original_cbam_prefixes",
]
