"""The operators' CPU kernels in Python, for where the library's C++ kernels are not (yet) registered: they build
the library on the first call (:mod:`.native`), after which its kernels take their place in the dispatcher and this
first call goes to them too; where it cannot be built (no C compiler, or ``CBAM_DSA_NATIVE=0``), they run the
PyTorch implementation of :mod:`..pytorch`.

The C++ kernels call the PyTorch implementation themselves where the C code does not apply: through the operators
``cbam_dsa::_pytorch_block_forward`` and ``cbam_dsa::_pytorch_block_backward`` registered here, of the same schemas
as the public ones (their arguments checked by the caller).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from .. import library, pytorch
from . import native

__all__ = ["block_backward", "block_forward", "saved_like", "saved_shapes"]

saved_like, saved_shapes = pytorch.saved_like, pytorch.saved_shapes  # the C kernels keep the same list

_private = torch.library.Library("cbam_dsa", "FRAGMENT")
_private.define("_pytorch_block_forward" + library.FORWARD_SCHEMA)
_private.define("_pytorch_block_backward" + library.BACKWARD_SCHEMA)
_private.impl("_pytorch_block_forward", lambda *args: pytorch.block_forward(*args), "CPU")
_private.impl("_pytorch_block_backward", lambda *args: pytorch.block_backward(*args), "CPU")

_inside = threading.local()


def _native(op: torch._ops.OpOverload, args: tuple) -> object:
    """``op(*args)`` by the library's C++ kernel (the dispatcher's CPU kernel once the library is loaded), or
    ``NotImplemented`` where the library is unavailable (or its kernel did not take this one's place)."""
    if getattr(_inside, "active", False) or native.library() is None:
        return NotImplemented
    _inside.active = True
    try:
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    finally:
        _inside.active = False


def block_forward(*args: object) -> list[Tensor]:
    """``cbam_dsa::block_forward`` on the CPU (arguments already checked: :func:`..library.implement`)."""
    found = _native(library.FORWARD, args)
    return pytorch.block_forward(*args) if found is NotImplemented else found  # type: ignore[return-value]


def block_backward(*args: object) -> list[Tensor]:
    """``cbam_dsa::block_backward`` on the CPU (arguments already checked: :func:`..library.implement`)."""
    found = _native(library.BACKWARD, args)
    return pytorch.block_backward(*args) if found is NotImplemented else found  # type: ignore[return-value]
