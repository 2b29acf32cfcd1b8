"""What the timm and torchvision integrations share: checking the block options a user binds for a host model.

Both integrations build one :class:`~cbam_dsa.CBAMResidualDynamicSA` per residual block, the host model giving
``channels``, ``device`` and ``dtype``; the user's options are checked here once, before the model is touched.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..block import CBAMResidualDynamicSA

__all__ = ["HOST_ARGUMENTS", "check_block_kwargs"]

#: Constructor arguments that the host model gives for each block, never the user.
HOST_ARGUMENTS = ("channels", "device", "dtype")

_BLOCK_PARAMETERS = tuple(inspect.signature(CBAMResidualDynamicSA).parameters)
_OPTIONS = tuple(name for name in _BLOCK_PARAMETERS if name not in HOST_ARGUMENTS)


def check_block_kwargs(block_kwargs: dict[str, Any]) -> None:
    """Refuse host arguments, unknown names, ``return_maps=True`` and bad values, naming what is allowed."""
    for name in block_kwargs:
        if name in HOST_ARGUMENTS:
            raise TypeError(f"{name} is given by the model for each block; leave it out of the block options")
        if name not in _OPTIONS:
            raise TypeError(
                f"{name!r} is not an option of CBAMResidualDynamicSA; the options are {', '.join(_OPTIONS)}"
            )
    if block_kwargs.get("return_maps") is True:
        raise ValueError(
            "return_maps=True makes each block return a tuple, which the model around it cannot use; "
            "record the maps with cbam_dsa.MapRecorder instead"
        )
    # Build one block on the meta device: every value is checked now, and nothing is allocated.
    CBAMResidualDynamicSA(16, **block_kwargs, device="meta")
