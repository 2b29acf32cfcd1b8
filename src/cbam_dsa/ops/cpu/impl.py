"""The operators' CPU implementation: the C kernels (:mod:`.native`), else the PyTorch operations of :mod:`..pytorch`.

The C kernels take contiguous float32/float64 tensors. Other inputs (channels_last or other strides, float16 and
bfloat16) are converted to a contiguous tensor in float32 for them and the results converted back: measured faster
than the PyTorch implementation at every benchmark shape (docs/BENCHMARKS.md). The PyTorch implementation runs where
the library cannot be built (no C compiler, or ``CBAM_DSA_NATIVE=0``), and for a backward pass that is given a
gradient for one of the maps (the C backward takes the output's gradient only).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import library, pytorch
from . import native

__all__ = ["block_backward", "block_forward", "compute_dtype", "saved_like", "saved_shapes"]

# The positions among the operators' flat tensor arguments (library.gradient_inputs) of the C kernels' inputs, in the
# order they take them (the temperatures go to them as numbers); the branch kernels and biases follow.
_KERNEL_ARGS = (0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12)
_N = len(library.TENSOR_ARGS)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the C kernels run in for inputs of ``dtype``."""
    return dtype if dtype in native.DTYPES else torch.float32


saved_like, saved_shapes = pytorch.saved_like, pytorch.saved_shapes  # the C kernels keep the same list


def _ready(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or (t.dtype == dtype and t.is_contiguous()) else t.to(dtype).contiguous()


class _Plan(NamedTuple):
    """What the C kernels take besides the tensors, for one input shape and block configuration."""

    packed: Tensor  # the merged branches' layout (native.layout)
    sizes: ctypes.Array  # native.dims


@functools.lru_cache(maxsize=256)
def _plan(key: tuple) -> _Plan:
    shape, hidden, router_hidden, specs, act, gates, fusion, alpha, threads = key
    taps, packed = native.layout(specs)
    sizes = native.dims(shape, hidden, router_hidden, len(specs), taps, gates, act, fusion, alpha, threads)
    return _Plan(packed, sizes)


def _call(flat: Sequence[Tensor | None], branches: int, dilations: Sequence[int], act: str, gates: tuple[str, str]):
    """The C kernels' inputs, plan and temperatures from the operators' flat tensor arguments."""
    x, weights, router = flat[0], flat[_N : _N + branches], flat[9]
    dtype = compute_dtype(x.dtype)
    raw = [_ready(flat[i], dtype) for i in (*_KERNEL_ARGS, *range(_N, len(flat)))]
    specs = tuple((weight.shape[-1], d) for weight, d in zip(weights, dilations, strict=True))
    key = (
        tuple(x.shape), flat[1].shape[0], None if router is None else router.shape[0], specs, act, gates,
        flat[5] is not None, flat[8] is not None, torch.get_num_threads(),
    )  # fmt: skip
    return raw, _plan(key), (float(flat[6]), float(flat[7]))


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in ``x``'s dtype and as ``torch.empty_like(x)`` lays it out (``t`` itself where it already is)."""
    if t.dtype == x.dtype and t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def block_forward(*args: object) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """``cbam_dsa::block_forward`` on the CPU (arguments already checked: :func:`..library.implement`)."""
    x: Tensor = args[0]  # type: ignore[assignment]
    lib = native.library()
    if lib is None or x.numel() == 0:
        return pytorch.block_forward(*args)
    flat = library.gradient_inputs(args)
    branches, (dilations, act, ca_gate, sa_gate) = len(args[_N]), args[_N + 2 :]
    raw, plan, temperatures = _call(flat, branches, dilations, act, (ca_gate, sa_gate))
    f = lib.block_forward(raw, plan.packed, plan.sizes, temperatures)
    if args[9] is None:  # no router: the kernels leave its hidden layer unwritten; ones, as the PyTorch version
        f.router_hidden.fill_(1)
    keep = x.shape[2] * x.shape[3] >= pytorch.KEEP_POOLS_FROM_PIXELS
    saved = [f.z, f.s, f.logit, f.router, f.router_hidden, f.pre, f.pools if keep else f.pools.new_empty(0)]
    maps = (f.ca, f.sa, f.fusion_w, f.router_w)  # the C forward writes the fusion weights and a copy of the router's
    if x.dtype != f.z.dtype:
        maps = tuple(t.to(x.dtype) for t in maps)
    return (_like(f.out, x), *maps, saved)


def block_backward(*args: object) -> list[Tensor]:
    """``cbam_dsa::block_backward`` on the CPU (arguments already checked: :func:`..library.implement`)."""
    grads, rest = args[:5], args[5:]
    flat = library.gradient_inputs(rest)
    saved, (dilations, act, ca_gate, sa_gate), needs = rest[_N + 2], rest[_N + 3 : _N + 7], rest[_N + 7]
    branches = len(rest[_N])
    lib = native.library()
    if lib is None or grads[0] is None or any(g is not None and bool(g.any()) for g in grads[1:]):
        return pytorch.block_backward(*args)
    raw, plan, temperatures = _call(flat, branches, dilations, act, (ca_gate, sa_gate))
    dtype = raw[0].dtype
    order = (*_KERNEL_ARGS, *range(_N, len(flat)))
    wanted = [needs[i] for i in order]
    kept = [_ready(t, dtype) for t in (*saved[:6], saved[6] if saved[6].numel() else None)]
    grad = _ready(grads[0], dtype)
    found, scalars = lib.block_backward(grad, raw, kept, plan.packed, wanted, plan.sizes, temperatures)
    out: list[Tensor | None] = [None] * len(flat)
    for i, g in zip(order, found, strict=True):
        out[i] = g
    out[8], out[6], out[7] = scalars.unbind()
    if flat[8] is None:
        out[8] = None
    return library.gradients_like(out, flat, needs)
