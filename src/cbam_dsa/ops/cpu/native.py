"""The library's operator kernels: once :func:`library` has built and loaded it (:mod:`.build`), its C++ kernels
(``operators.cpp``) are the operators' CPU kernels in PyTorch's dispatcher, over the C kernels of ``kernels.c``.

They check their arguments, convert what the C code reads to contiguous float32/float64, build the merged
branches' layout (the default 3x3, 7x7 and dilated 7x7 branches share 9 + 9 of their offsets, so 178 taps in all,
and the router-weighted sum of the branches is one convolution over that list with a weight per sample and tap),
allocate the outputs and call the C code, in one C++ call per operator: no Python runs between the dispatcher and
the C code. Where the C code does not apply (``CBAM_DSA_NATIVE=0``, an empty input, a backward given a nonzero
gradient for one of the maps) they call the PyTorch implementation, registered for them as the operators
``cbam_dsa::_pytorch_block_forward`` and ``_pytorch_block_backward`` (:mod:`.impl`).
"""

from __future__ import annotations

import ctypes

from . import build

__all__ = ["ENTRIES", "Library", "library"]

ENTRIES = ("block_forward", "block_backward")


class Library:
    """The loaded library's hooks for tests and benchmarks.

    Args:
        handle (ctypes.CDLL): the library (:func:`.build.library`).
    """

    def __init__(self, handle: ctypes.CDLL) -> None:
        self.handle = handle
        handle.cbam_dsa_calls.restype, handle.cbam_dsa_calls.argtypes = ctypes.c_int64, [ctypes.c_int]
        handle.cbam_dsa_fail_next.argtypes = [ctypes.c_int, ctypes.c_int]

    def calls(self, entry: str) -> int:
        """How many times this process has called the C entry point ``entry`` (``"block_forward"`` or
        ``"block_backward"``)."""
        return self.handle.cbam_dsa_calls(ENTRIES.index(entry))

    def fail_next(self, entry: str, status: int) -> None:
        """Make the next call of ``entry`` report ``status`` (kernels.c's status codes) after it ran: a test hook
        for the path from a failing C kernel to the caller's exception."""
        self.handle.cbam_dsa_fail_next(ENTRIES.index(entry), status)


_state: dict[str, object] = {}


def library() -> Library | None:
    """The loaded library (its kernels registered), building it on first use (:func:`.build.library`); ``None``
    where it cannot be built or is disabled (``CBAM_DSA_NATIVE=0``)."""
    if build.library() is None:
        return None
    handle = build.registered()  # the one whose kernels run (a later-loaded copy's are not registered)
    if _state.get("handle") is not handle:
        _state["handle"], _state["library"] = handle, Library(handle)
    return _state["library"]  # type: ignore[return-value]
