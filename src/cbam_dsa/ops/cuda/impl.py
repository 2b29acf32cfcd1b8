"""The operators' CUDA implementation: the Triton kernels of :mod:`.block`, and for what they do not cover (more than
four branches, kernels over 15 pixels wide: :func:`.block.supports`) the PyTorch implementation of :mod:`..pytorch`.

Registered by :func:`..use_triton` (opt-in until the kernels have passed the correctness check on a real GPU and
measured faster there: ``benchmarks/gpu.sh``); without it, CUDA tensors run the block's reference path.
"""

from __future__ import annotations

from torch import Tensor

from .. import library, pytorch
from . import block

__all__ = ["block_backward", "block_forward", "saved_like"]

_N = len(library.TENSOR_ARGS)


def _triton(args: tuple) -> bool:
    weights = args[_N]
    return block.supports(args[0], *args[1:_N], *weights, kernel_sizes=[int(w.shape[-1]) for w in weights]) is None


def saved_like(*args: object) -> list[Tensor]:
    """Empty tensors shaped as ``block_forward``'s saved list, for the fake kernel."""
    if _triton(args):
        return block.saved_like(*args)
    return pytorch.saved_like(*args)


def block_forward(*args: object) -> list[Tensor]:
    """``cbam_dsa::block_forward`` on CUDA (arguments already checked: :func:`..library.implement`)."""
    if _triton(args):  # the kernels write a contiguous output: laid out as x, as the fake kernel says
        out, *maps, saved = block.block_forward(*args)
        return [library.laid_out_as(out, args[0]), *maps, *saved]  # type: ignore[arg-type]
    return pytorch.block_forward(*args)


def block_backward(*args: object) -> list[Tensor]:
    """``cbam_dsa::block_backward`` on CUDA (arguments already checked: :func:`..library.implement`)."""
    forward_args = library.forward_arguments(args)
    if not _triton(forward_args):
        return pytorch.block_backward(*args)
    rest, needs = args[5:], args[-1]
    return library.gradients_like(block.block_backward(*args), library.gradient_inputs(rest), needs)
