"""The CPU implementation of the operators: the library's C++ kernels over C kernels, built on first use
(:mod:`.build`, :mod:`.native`), with the PyTorch implementation as the fallback (:mod:`.impl`)."""

from .. import library
from . import impl

library.implement("cpu", impl.block_forward, impl.block_backward, impl.saved_like, impl.saved_shapes, direct=False)
