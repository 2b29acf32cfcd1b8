"""Fused CPU kernels for the block's heavy passes: compiled from ``_kernels.c`` on first use, loaded with ctypes.

PyTorch runs each heavy pass of the block as several kernels, each a full pass over memory (a product, then a
mean, then a max). The C kernels fuse them: one read of the input per pooling, one read and one write for the
output. They are compiled once per machine with the system C compiler (``$CC``, else ``cc``; OpenMP, ``-O3
-march=native``) into a cache folder (``$CBAM_DSA_CACHE``, else ``~/.cache/cbam_dsa``), keyed by the source, the
compiler and the CPU, and loaded with :mod:`ctypes`; OpenMP is the one PyTorch already loaded, so both share one
thread pool. Where no compiler works, or with ``CBAM_DSA_NATIVE=0`` in the environment, :func:`kernels` returns
``None`` and the block's fast path runs its PyTorch version instead: the results agree either way (tested).

The kernels take contiguous float32 or float64 NCHW tensors on the CPU (:func:`supports`).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .ops.cpu import build

__all__ = [
    "BlockForward",
    "BlockSaved",
    "Kernels",
    "block_dims",
    "block_layout",
    "enabled",
    "kernels",
    "one_sample_per_thread",
    "ready",
    "supports",
]

logger = logging.getLogger(__name__)

_SUFFIXES = {torch.float32: ("f32", "float"), torch.float64: ("f64", "double")}
_state: dict[str, object] = {}


enabled = build.enabled


def supports(x: Tensor) -> bool:
    """Whether the kernels can run on ``x``: a contiguous float32/float64 tensor on the CPU, and they are loaded."""
    return x.dtype in _SUFFIXES and x.device.type == "cpu" and x.is_contiguous() and kernels() is not None


def one_sample_per_thread(batch: int, pixels: int, hidden: int) -> bool:
    """Whether :meth:`Kernels.block_forward` and :meth:`Kernels.block_backward` run each sample on one thread from
    start to end, so that its slice of the input is read from memory once and from the cache after that.

    That needs at least as many samples as threads, and pays off where a sample's maps are larger than the channel
    MLP's weights, which each sample then reads again (``pixels >= 2 * hidden``: the two layers hold ``2 * C *
    hidden`` numbers, a sample ``C * pixels``). Otherwise each stage runs over the whole batch on all threads."""
    return batch >= torch.get_num_threads() and pixels >= 2 * hidden


def kernels() -> Kernels | None:
    """The loaded kernels, compiling them on the first call; ``None`` where they cannot be built or are disabled."""
    lib = build.library()
    if lib is None:
        return None
    if _state.get("library") is not lib:
        _state["library"], _state["kernels"] = lib, Kernels(lib)
    return _state["kernels"]  # type: ignore[return-value]


_I64, _PTR, _INT, _DOUBLE = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
_SIGNATURES = {
    "pool_hw": (_PTR, _PTR, _PTR, _I64, _I64, _INT),
    "pool_c": (_PTR, _PTR, _PTR, _I64, _I64, _I64, _INT),
    "blend": (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _DOUBLE, _INT, _INT),
    "blend_grad": (_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _INT),
    "pool_c_grad": (_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _INT),
    "grad_x": (_PTR, _PTR, _PTR, _PTR, _DOUBLE, _INT, *(_PTR,) * 8, _I64, _I64, _I64, _INT),
    "block_forward": (*(_PTR,) * 5, _INT),
    "block_backward": (*(_PTR,) * 6, _INT, _PTR, _PTR, _INT),
    "tap_conv": (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _INT),
    "tap_conv_grad_s": (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _INT),
    "tap_conv_grad_w": (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _INT),
}


_STATUS_RETURNING = ("block_forward", "block_backward")  # return a status: 0 = success (see _check)
_STATUS_ERRORS = {1: (MemoryError, "out of memory"), 2: (RuntimeError, "invalid dimensions")}


def _check(status: int, name: str) -> None:
    """Raise for a nonzero status of a C entry point: ``MemoryError`` for an allocation that failed, ``RuntimeError``
    otherwise."""
    if status != 0:
        error, what = _STATUS_ERRORS.get(status, (RuntimeError, f"unknown error code {status}"))
        raise error(f"cbam_dsa: the C kernel {name} failed: {what} (status {status})")


def ready(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype`` and contiguous (itself when it already is: ``.to`` costs a dispatch even then; ``None``
    stays ``None``)."""
    return t if t is None or (t.dtype == dtype and t.is_contiguous()) else t.to(dtype).contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _pointers(tensors: Sequence[Tensor | None]) -> ctypes.Array:
    """A C array of the tensors' data pointers (NULL for ``None``)."""
    return (ctypes.c_void_p * len(tensors))(*[_ptr(t) for t in tensors])


class Kernels:
    """Typed wrappers over the loaded library; every wrapper allocates its outputs.

    The main input (``x``, ``s``) must suit the kernels (:func:`supports`); the small inputs are brought to its
    dtype and made contiguous, and kept referenced until the call returns (the C code reads their memory).
    """

    def __init__(self, library: ctypes.CDLL) -> None:
        self._functions: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}
        for name, argtypes in _SIGNATURES.items():
            for dtype, (suffix, _) in _SUFFIXES.items():
                function = getattr(library, f"{name}_{suffix}", None)
                if function is None:  # a single-pass kernel the library keeps internal (built without its export)
                    continue
                function.argtypes = argtypes
                function.restype = ctypes.c_int if name in _STATUS_RETURNING else None
                self._functions[name, dtype] = function

    def pool_hw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean_hw(x), max_hw(x))``, each ``(B, C, 1, 1)``, in one pass.

        Shape:
            - x: :math:`(B, C, H, W)`
            - Output: two :math:`(B, C, 1, 1)` tensors
        """
        b, c, h, w = x.shape
        mean, top = x.new_empty(b, c, 1, 1), x.new_empty(b, c, 1, 1)
        self._functions["pool_hw", x.dtype](_ptr(x), _ptr(mean), _ptr(top), b * c, h * w, torch.get_num_threads())
        return mean, top

    def pool_c(self, x: Tensor, ca: Tensor) -> Tensor:
        """``[mean_c(x * ca), max_c(x * ca)]`` in one pass, without forming ``x * ca``.

        Shape:
            - x: :math:`(B, C, H, W)`; ca: :math:`(B, C, 1, 1)`
            - Output: :math:`(B, 2, H, W)`
        """
        b, c, h, w = x.shape
        ca = ready(ca, x.dtype)  # kept alive through the call
        s = x.new_empty(b, 2, h, w)
        self._functions["pool_c", x.dtype](_ptr(x), _ptr(ca), _ptr(s), b, c, h * w, torch.get_num_threads())
        return s

    def blend(self, x: Tensor, ca: Tensor, sa: Tensor, alpha: float | None) -> Tensor:
        """``(x * ca) * sa``, or with ``alpha``: ``(x * ca) * (alpha * sa) + (1 - alpha) * x``, in one pass.

        Shape:
            - x: :math:`(B, C, H, W)`; ca: :math:`(B, C, 1, 1)`; sa: :math:`(B, 1, H, W)`
            - Output: :math:`(B, C, H, W)`
        """
        b, c, h, w = x.shape
        ca, sa = ready(ca, x.dtype), ready(sa, x.dtype)  # kept alive through the call
        out = torch.empty_like(x)
        use_alpha = alpha is not None
        self._functions["blend", x.dtype](
            _ptr(x), _ptr(ca), _ptr(sa), _ptr(out), b, c, h * w, alpha if use_alpha else 1.0, int(use_alpha),
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    def blend_grad(self, g: Tensor, x: Tensor, ca: Tensor, sa: Tensor, plain_sum: bool) -> tuple[Tensor, ...]:
        """The reductions of the blend's backward, with ``t = g * x``: ``sum_c t * ca``, ``sum_hw t * sa`` and, if
        ``plain_sum``, ``sum_hw t``.

        Shape:
            - g, x: :math:`(B, C, H, W)`; ca: :math:`(B, C, 1, 1)`; sa: :math:`(B, 1, H, W)`
            - Output: :math:`(B, 1, H, W)`, :math:`(B, C, 1, 1)` and, if ``plain_sum``, :math:`(B, C, 1, 1)`
        """
        b, c, h, w = x.shape
        by_ca, by_sa = x.new_empty(b, 1, h, w), x.new_empty(b, c, 1, 1)
        plain = x.new_empty(b, c, 1, 1) if plain_sum else None
        ca, sa = ready(ca, x.dtype), ready(sa, x.dtype)  # kept alive through the call
        self._functions["blend_grad", x.dtype](
            _ptr(g), _ptr(x), _ptr(ca), _ptr(sa), None, _ptr(by_ca), _ptr(by_sa), _ptr(plain), None,
            b, c, h * w, torch.get_num_threads(),
        )  # fmt: skip
        return (by_ca, by_sa) if plain is None else (by_ca, by_sa, plain)

    def pool_c_grad(self, x: Tensor, ca: Tensor, smax: Tensor, cmean: Tensor, gmax: Tensor) -> tuple[Tensor, Tensor]:
        """The reductions of the C pooling's backward: ``(coef, grad_ca)`` with ``coef = gmax / ties`` (``ties``: the
        channels where ``x * ca`` attains ``smax``) and ``grad_ca = sum_hw (cmean + tie * coef) * x``.

        Shape:
            - x: :math:`(B, C, H, W)`; ca: :math:`(B, C, 1, 1)`; smax, cmean, gmax: :math:`(B, 1, H, W)`
            - Output: coef :math:`(B, 1, H, W)`, grad_ca :math:`(B, C, 1, 1)`
        """
        b, c, h, w = x.shape
        coef, grad_ca = x.new_empty(b, 1, h, w), x.new_empty(b, c, 1, 1)
        ca, smax, cmean, gmax = (ready(t, x.dtype) for t in (ca, smax, cmean, gmax))  # kept alive
        self._functions["pool_c_grad", x.dtype](
            _ptr(x), _ptr(ca), _ptr(smax), _ptr(cmean), _ptr(gmax), None, _ptr(coef), _ptr(grad_ca), b, c, h * w,
            torch.get_num_threads(),
        )  # fmt: skip
        return coef, grad_ca

    def grad_x(
        self,
        x: Tensor,
        ca: Tensor | None,
        blend: tuple[Tensor, Tensor, float | None] | None,
        pool_c: tuple[Tensor, Tensor, Tensor] | None,
        pool_hw: tuple[Tensor, Tensor, Tensor] | None,
        base: Tensor | None,
    ) -> Tensor:
        """The gradient of ``x``, all its terms in one pass (``None`` leaves a term out):

        * ``blend = (g, sa, alpha)``: ``(g * ca) * sa``, or ``(g * ca) * (alpha * sa) + g * (1 - alpha)``;
        * ``pool_c = (cmean, coef, smax)``: ``(cmean + (x * ca == smax) * coef) * ca``;
        * ``pool_hw = (hmean, hmax, at)``: ``hmean + (x == at) * hmax / ties``, ties counted per map;
        * ``base``: added as is.

        ``ca`` may be ``None`` when neither ``blend`` nor ``pool_c`` is given.

        Shape:
            - x, g, base: :math:`(B, C, H, W)`; ca, hmean, hmax, at: :math:`(B, C, 1, 1)`; sa, cmean, coef, smax:
              :math:`(B, 1, H, W)`
            - Output: :math:`(B, C, H, W)`
        """
        b, c, h, w = x.shape
        g, sa, alpha = blend if blend is not None else (None, None, None)
        cmean, coef, smax = pool_c if pool_c is not None else (None, None, None)
        hmean, hmax, at = pool_hw if pool_hw is not None else (None, None, None)
        keep = [ready(t, x.dtype) for t in (g, sa, cmean, coef, smax, hmean, hmax, at, base)]
        g, sa, cmean, coef, smax, hmean, hmax, at, base = keep  # kept alive through the call
        ca = ready(ca, x.dtype)  # kept alive through the call
        out = torch.empty_like(x)
        self._functions["grad_x", x.dtype](
            _ptr(g), _ptr(x), _ptr(ca), _ptr(sa), 1.0 if alpha is None else alpha, int(alpha is not None),
            _ptr(cmean), _ptr(coef), _ptr(smax), _ptr(hmean), _ptr(hmax), _ptr(at), _ptr(base), _ptr(out),
            b, c, h * w, torch.get_num_threads(),
        )  # fmt: skip
        return out

    def tap_conv(self, s: Tensor, weight: Tensor, taps: Tensor) -> Tensor:
        """``out[b, i, j] = sum_t weight[b, t] * s[b, c_t, i + dy_t, j + dx_t]`` (zero padding), ``taps[t] = (c_t,
        dy_t, dx_t)``.

        Shape:
            - s: :math:`(B, C, H, W)`; weight: :math:`(B, T)`; taps: :math:`(T, 3)` int64
            - Output: :math:`(B, 1, H, W)`
        """
        b, c, h, w = s.shape
        weight = ready(weight, s.dtype)  # kept alive through the call
        out = s.new_empty(b, 1, h, w)
        self._functions["tap_conv", s.dtype](
            _ptr(s), _ptr(weight), _ptr(taps), _ptr(out), b, c, h, w, taps.shape[0], torch.get_num_threads()
        )
        return out

    def tap_conv_grad_s(self, grad: Tensor, weight: Tensor, taps: Tensor, channels: int) -> Tensor:
        """The gradient of :meth:`tap_conv` with respect to ``s``.

        Shape:
            - grad: :math:`(B, 1, H, W)`; weight: :math:`(B, T)`; taps: :math:`(T, 3)`
            - Output: :math:`(B, C, H, W)`
        """
        b, _, h, w = grad.shape
        grad, weight = grad.contiguous(), ready(weight, grad.dtype)  # kept alive through the call
        out = grad.new_empty(b, channels, h, w)
        self._functions["tap_conv_grad_s", grad.dtype](
            _ptr(grad), _ptr(weight), _ptr(taps), _ptr(out), b, channels, h, w, taps.shape[0], torch.get_num_threads()
        )
        return out

    def tap_conv_grad_w(self, grad: Tensor, s: Tensor, taps: Tensor) -> Tensor:
        """The gradient of :meth:`tap_conv` with respect to the weights.

        Shape:
            - grad: :math:`(B, 1, H, W)`; s: :math:`(B, C, H, W)`; taps: :math:`(T, 3)`
            - Output: :math:`(B, T)`
        """
        b, c, h, w = s.shape
        grad = ready(grad, s.dtype)  # kept alive through the call
        out = s.new_empty(b, taps.shape[0])
        self._functions["tap_conv_grad_w", s.dtype](
            _ptr(grad), _ptr(s), _ptr(taps), _ptr(out), b, c, h, w, taps.shape[0], torch.get_num_threads()
        )
        return out

    def block_forward(
        self, raw: Sequence[Tensor | None], layout: Tensor, dims: ctypes.Array, temperatures: tuple[float, float]
    ) -> BlockForward:
        """The whole block's forward in one call, from its own tensors: the pooling over H, W; the channel MLP, fused
        on its hidden layer (``z = (w0 * act(pre_avg) + w1 * act(pre_max)) @ W2^T + (w0 + w1) * b2``, ``w`` the
        softmax of the fusion logits or ``(1, 1)``); ``ca = gate(z / T_ca)``; the pooling over C of ``x * ca``; the
        router; the merged branches (``router @ mixing`` over the taps, the mixing matrix gathered from the branch
        kernels); ``sa = gate(logit / T_sa)``; and the blend.

        Args:
            raw: ``(x, fc1 weight, fc1 bias, fc2 weight, fc2 bias, fusion logits, alpha, router fc1 weight, fc1 bias,
                fc2 weight, fc2 bias, *branch kernels, *branch biases)``, contiguous, in ``x``'s dtype (``None``
                where the block has no such part).
            layout: the packed int64 layout of the merged branches (:func:`block_layout`).
            dims: from :func:`block_dims`.
            temperatures: ``(T_ca, T_sa)``, the effective temperatures.

        Shape:
            - x: :math:`(B, C, H, W)`
            - Output: :class:`BlockForward`
        """
        x, fc1_weight = raw[0], raw[1]
        b, c, h, w = x.shape
        new = x.new_empty
        f = BlockForward(
            new(2 * b, c), new(2 * b, fc1_weight.shape[0]), new(b, c), new(b, c, 1, 1), new(b, 2, h, w),
            new(b, dims[4]), new(b, dims[5]), new(b, 1, h, w), new(b, 1, h, w), torch.empty_like(x),
        )  # fmt: skip
        pointers, scal = _pointers([*raw, *f]), (ctypes.c_double * 2)(*temperatures)
        at = ctypes.addressof(pointers)
        status = self._functions["block_forward", x.dtype](
            at, layout.data_ptr(), at + 8 * len(raw), ctypes.addressof(dims), ctypes.addressof(scal),
            torch.get_num_threads(),
        )  # fmt: skip
        _check(status, "block_forward")
        return f

    def block_backward(
        self,
        grad: Tensor,
        raw: Sequence[Tensor | None],
        saved: BlockSaved,
        layout: Tensor,
        wanted: Sequence[bool],
        dims: ctypes.Array,
        temperatures: tuple[float, float],
    ) -> tuple[list[Tensor | None], Tensor]:
        """:meth:`block_forward`'s backward pass from the output's gradient, from what the forward pass kept
        (``saved``; ``saved.pools`` may be ``None``: then recomputed), in one call.

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
        status = self._functions["block_backward", grad.dtype](
            grad.data_ptr(), at, at + 8 * n, layout.data_ptr(), at + 8 * (n + 7), scalars.data_ptr(),
            int(wanted[6]), ctypes.addressof(dims), ctypes.addressof(scal), torch.get_num_threads(),
        )  # fmt: skip
        _check(status, "block_backward")
        return grads, scalars


def block_layout(taps: Tensor, gather: Tensor, sizes: Sequence[int]) -> Tensor:
    """The merged branches' layout for :meth:`Kernels.block_forward`, packed into one int64 tensor: the K kernels'
    element counts, ``gather`` (``(K, T)``: for each entry of the mixing matrix the position of its weight in the
    kernels concatenated, or their total count for none; :func:`._tapconv.tap_layout`), then ``taps`` (``(T, 3)``)."""
    return torch.cat([torch.tensor(list(sizes), dtype=torch.int64), gather.reshape(-1), taps.reshape(-1)])


def block_dims(
    raw: Sequence[Tensor | None], branches: int, taps: int, gates: tuple[str, str], act: str
) -> ctypes.Array:
    """The ``dims`` array of :meth:`Kernels.block_forward`: ``(B, C, H, W, router hidden, K, T, ca gate hard, sa gate
    hard, has router, uses alpha, MLP hidden, MLP activation silu, one sample per thread, has fusion logits)``, from
    :meth:`Kernels.block_forward`'s ``raw`` (``x`` first)."""
    b, c, h, w = raw[0].shape
    hidden, router = raw[1].shape[0], raw[7]
    return (ctypes.c_int64 * 15)(
        b, c, h, w, 1 if router is None else router.shape[0], branches, taps, gates[0] == "hardsigmoid",
        gates[1] == "hardsigmoid", router is not None, raw[6] is not None, hidden, act == "silu",
        one_sample_per_thread(b, h * w, hidden), raw[5] is not None,
    )  # fmt: skip


class BlockForward(NamedTuple):
    """The outputs of :meth:`Kernels.block_forward`."""

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


class BlockSaved(NamedTuple):
    """What :meth:`Kernels.block_backward` needs of :meth:`Kernels.block_forward`'s outputs (``pools`` may be
    ``None``: recomputed)."""

    z: Tensor
    s: Tensor
    logit: Tensor
    router: Tensor
    router_hidden: Tensor
    pre: Tensor
    pools: Tensor | None
