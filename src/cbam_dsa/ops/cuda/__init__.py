"""The fused block on CUDA, in Triton: kernels in :mod:`.kernels`, launchers and the operator's three functions
(``block_forward``, ``saved_like``, ``block_backward``) in :mod:`.block`.

triton is optional: importing this package never imports it; :func:`available` says whether the kernels can run.
"""

from __future__ import annotations

import functools
import os

__all__ = ["available"]


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether triton imports and can launch kernels here: on a CUDA device, or under its interpreter
    (``TRITON_INTERPRET=1``) on the CPU."""
    try:
        import torch
        import triton
        import triton.language  # noqa: F401
    except Exception:  # a broken triton install is as good as none
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return bool(torch.cuda.is_available())
