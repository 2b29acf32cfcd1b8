"""ctypes bindings of the C library's two entry points: the whole block forward, and its backward, in one call each.

The library (:mod:`.build`) takes contiguous float32/float64 tensors. Every binding here allocates its outputs and
keeps its inputs referenced until the call returns (the C code reads their memory). The K spatial branches reach
the kernels as one list of merged taps (:func:`tap_layout`): the default 3x3, 7x7 and dilated 7x7 branches share
9 + 9 of their offsets, so 178 taps in all, and the router-weighted sum of the branches is one convolution over
that list with a weight per sample and tap.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import build

__all__ = ["BlockForward", "Library", "dims", "layout", "library", "one_sample_per_thread", "tap_layout"]

DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_PTR, _INT = ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "block_forward": (*(_PTR,) * 5, _INT),
    "block_backward": (*(_PTR,) * 6, _INT, _PTR, _PTR, _INT),
}
# The entry points' status codes (kernels.c: STATUS_NO_MEMORY, STATUS_BAD_ARGUMENT); 0 is success.
_STATUS = {1: (MemoryError, "out of memory"), 2: (RuntimeError, "invalid dimensions")}


class BlockForward(NamedTuple):
    """The outputs of :meth:`Library.block_forward`."""

    pools: Tensor  # (2B, C): [avg; max]
    pre: Tensor  # (2B, Rm): the MLP's first layer, before the activation
    z: Tensor  # (B, C): the channel gate's input
    ca: Tensor  # (B, C, 1, 1)
    s: Tensor  # (B, 2, H, W)
    router_hidden: Tensor  # (B, Rh)
    router: Tensor  # (B, K)
    logit: Tensor  # (B, 1, H, W)
    sa: Tensor  # (B, 1, H, W)
    out: Tensor  # (B, C, H, W)
    fusion_w: Tensor  # (2,): the fusion weights
    router_w: Tensor  # (B, K): a copy of router (an output of its own)


def _pointers(tensors: Sequence[Tensor | None]) -> ctypes.Array:
    """A C array of the tensors' data pointers (NULL for ``None``)."""
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def _check(status: int, name: str) -> None:
    """Turn a nonzero status of an entry point into a Python exception that says what failed."""
    if status:
        error, what = _STATUS.get(status, (RuntimeError, f"unknown error code {status}"))
        raise error(f"cbam_dsa: the C kernel {name} failed: {what} (status {status})")


class Library:
    """Typed wrappers over the loaded library.

    Args:
        handle (ctypes.CDLL): the library (:func:`.build.library`).
    """

    def __init__(self, handle: ctypes.CDLL) -> None:
        self._functions: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}
        for name, argtypes in _SIGNATURES.items():
            for dtype, suffix in DTYPES.items():
                function = getattr(handle, f"{name}_{suffix}")
                function.argtypes, function.restype = argtypes, ctypes.c_int
                self._functions[name, dtype] = function

    def block_forward(
        self,
        raw: Sequence[Tensor | None],
        packed: Tensor,
        sizes: ctypes.Array,
        temperatures: tuple[float, float],
    ) -> BlockForward:
        """The whole block's forward in one call: the pooling over H, W; the channel MLP, fused on its hidden layer
        (``z = (w0 * act(pre_avg) + w1 * act(pre_max)) @ W2^T + (w0 + w1) * b2``); ``ca = gate(z / T_ca)``; the
        pooling over C of ``x * ca``; the router; the merged branches; ``sa = gate(logit / T_sa)``; the blend.

        Args:
            raw: ``(x, fc1 weight, fc1 bias, fc2 weight, fc2 bias, fusion logits, alpha, router fc1 weight, fc1 bias,
                fc2 weight, fc2 bias, *branch kernels, *branch biases)``, contiguous, in ``x``'s dtype (``None``
                where the block has no such part).
            packed: the merged branches' layout (:func:`layout`).
            sizes: from :func:`dims`.
            temperatures: ``(T_ca, T_sa)``, the effective temperatures.

        Shape:
            - x: :math:`(B, C, H, W)`
            - Output: :class:`BlockForward`
        """
        x = raw[0]
        b, c, h, w = x.shape
        new = x.new_empty
        f = BlockForward(
            new(2 * b, c), new(2 * b, raw[1].shape[0]), new(b, c), new(b, c, 1, 1), new(b, 2, h, w),
            new(b, sizes[4]), new(b, sizes[5]), new(b, 1, h, w), new(b, 1, h, w), torch.empty_like(x), new(2),
            new(b, sizes[5]),
        )  # fmt: skip
        pointers, scal = _pointers([*raw, *f]), (ctypes.c_double * 2)(*temperatures)
        at = ctypes.addressof(pointers)
        _check(
            self._functions["block_forward", x.dtype](
                at, packed.data_ptr(), at + 8 * len(raw), ctypes.addressof(sizes), ctypes.addressof(scal),
                torch.get_num_threads(),
            ),
            "block_forward",
        )  # fmt: skip
        return f

    def block_backward(
        self,
        grad: Tensor,
        raw: Sequence[Tensor | None],
        saved: Sequence[Tensor | None],
        packed: Tensor,
        wanted: Sequence[bool],
        sizes: ctypes.Array,
        temperatures: tuple[float, float],
    ) -> tuple[list[Tensor | None], Tensor]:
        """:meth:`block_forward`'s backward pass from the output's gradient, in one call.

        Args:
            grad: the output's gradient, contiguous, in ``x``'s dtype.
            raw, packed, sizes, temperatures: as given to :meth:`block_forward`.
            saved: ``(z, s, logit, router, router hidden, pre, pools)`` from :meth:`block_forward` (``pools`` may be
                ``None``: then recomputed).
            wanted: per ``raw`` tensor, whether its gradient is wanted.

        Returns:
            ``(grads, scalars)``: the gradient of each ``raw`` tensor where ``wanted`` (else ``None``; alpha's is
            ``None`` either way), and float64 ``(alpha, T_ca, T_sa)``: the gradients of alpha (if wanted) and of the
            two effective temperatures.
        """
        grads = [
            None if t is None or not need or i == 6 else torch.empty_like(t)
            for i, (t, need) in enumerate(zip(raw, wanted, strict=True))
        ]
        scalars, scal = torch.zeros(3, dtype=torch.float64), (ctypes.c_double * 2)(*temperatures)
        pointers = _pointers([*raw, *saved, *grads])
        at, n = ctypes.addressof(pointers), len(raw)
        _check(
            self._functions["block_backward", grad.dtype](
                grad.data_ptr(), at, at + 8 * n, packed.data_ptr(), at + 8 * (n + 7), scalars.data_ptr(),
                int(wanted[6]), ctypes.addressof(sizes), ctypes.addressof(scal), torch.get_num_threads(),
            ),
            "block_backward",
        )  # fmt: skip
        return grads, scalars


_state: dict[str, object] = {}


def library() -> Library | None:
    """The bound library, building it on first use (:func:`.build.library`); ``None`` where it cannot be built or
    is disabled (``CBAM_DSA_NATIVE=0``)."""
    handle = build.library()
    if handle is None:
        return None
    if _state.get("handle") is not handle:
        _state["handle"], _state["library"] = handle, Library(handle)
    return _state["library"]  # type: ignore[return-value]


def one_sample_per_thread(batch: int, pixels: int, hidden: int, threads: int) -> bool:
    """Whether the kernels run each sample on one thread from start to end, so that its slice of the input is read
    from memory once and from the cache after that.

    That needs at least as many samples as threads, and pays off where a sample's maps are larger than the channel
    MLP's weights, which each sample then reads again (``pixels >= 2 * hidden``). Otherwise each stage runs over the
    whole batch on all ``threads``."""
    return batch >= threads and pixels >= 2 * hidden


@functools.lru_cache(maxsize=64)
def tap_layout(specs: tuple[tuple[int, int], ...], channels: int) -> tuple[Tensor, Tensor]:
    """The merged tap list of the branches ``specs = ((size, dilation), ...)`` and how to fill the mixing matrix.

    Returns:
        ``(taps, gather)``: ``taps`` ``(T, 3)`` int64 rows ``(c, dy, dx)``; ``gather`` ``(K * T,)`` int64: for entry
        ``k * T + t`` of the ``(K, T)`` mixing matrix, the position of its weight in the branches' flattened
        ``(1, channels, size, size)`` kernels concatenated branch after branch, or their total size where branch
        ``k`` has no such tap.
    """
    columns: dict[tuple[int, int, int], int] = {}
    placed = []
    for k, (size, dilation) in enumerate(specs):
        r = size // 2
        for c in range(channels):
            for a in range(size):
                for b in range(size):
                    tap = (c, (a - r) * dilation, (b - r) * dilation)
                    placed.append((k, columns.setdefault(tap, len(columns))))
    count = len(columns)
    gather = [len(placed)] * (len(specs) * count)
    for element, (k, t) in enumerate(placed):
        gather[k * count + t] = element
    with torch.inference_mode(False):  # cached tensors must stay usable later
        return torch.tensor(list(columns), dtype=torch.int64).reshape(count, 3), torch.tensor(gather)


@functools.lru_cache(maxsize=64)
def layout(specs: tuple[tuple[int, int], ...]) -> tuple[int, Tensor]:
    """``(T, packed)`` for the branches ``specs = ((size, dilation), ...)`` on the 2 descriptor maps: the number of
    merged taps, and the layout the kernels read, packed into one int64 tensor (the K kernels' element counts, the
    gather list, then the taps)."""
    taps, gather = tap_layout(specs, 2)
    sizes = torch.tensor([2 * size * size for size, _ in specs], dtype=torch.int64)
    with torch.inference_mode(False):
        return taps.shape[0], torch.cat([sizes, gather, taps.reshape(-1)])


def dims(
    shape: Sequence[int],
    hidden: int,
    router_hidden: int | None,
    branches: int,
    taps: int,
    gates: tuple[str, str],
    act: str,
    fusion: bool,
    alpha: bool,
    threads: int,
) -> ctypes.Array:
    """The ``sizes`` array of :meth:`Library.block_forward`: ``(B, C, H, W, router hidden, K, T, ca gate hard, sa gate
    hard, has router, uses alpha, MLP hidden, MLP activation silu, one sample per thread, has fusion logits)``, for an
    input of ``shape`` (``router_hidden`` is ``None`` without a router) on ``threads`` threads."""
    b, c, h, w = shape
    return (ctypes.c_int64 * 15)(
        b, c, h, w, 1 if router_hidden is None else router_hidden, branches, taps, gates[0] == "hardsigmoid",
        gates[1] == "hardsigmoid", router_hidden is not None, alpha, hidden, act == "silu",
        one_sample_per_thread(b, h * w, hidden, threads), fusion,
    )  # fmt: skip
