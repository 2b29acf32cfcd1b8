"""FFT convolution for the merged spatial branches of the fast path.

The spatial branches of :class:`~cbam_dsa.DynamicSpatialAttention` are linear in the same descriptors ``s``, so
their router-weighted sum is one convolution with a per-sample kernel. With an FFT, every branch embeds, centred,
in one kernel of dilation 1 (a dilated kernel as a zero-interleaved one, the default 7x7 dilated by 2 as a 13x13),
and one transform of ``s`` serves all of them: the cost does not grow with the taps.

:class:`FFTConv` computes ``out[b] = sum_c xcorr(s[b, c], weight[b, c])`` ('same' cross-correlation with zero
padding, the semantics of :func:`torch.nn.functional.conv2d`) as a circular convolution on a grid large enough
to have no wrap-around. It saves only ``s`` and the kernels for backward (no spectra) and recomputes the
transforms there; its backward is written with out-of-place differentiable ops, so it can itself be
differentiated (``create_graph=True``). :func:`fft_branch_logit` is the whole merged-branch logit on top of it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ._checks import check_int

__all__ = ["FFTConv", "fft_branch_logit", "fft_size", "mixed_kernel"]


@functools.lru_cache(maxsize=256)
def fft_size(n: int) -> int:
    """The smallest ``2^a * 3^b * 5^c >= n``: a length the FFT handles fast.

    Args:
        n (int): the minimum length, ``>= 1``.

    Returns:
        int: the length.

    Raises:
        TypeError, ValueError: ``n`` is not an integer ``>= 1``.
    """
    n = check_int("n", n)
    m = n
    while True:
        rest = m
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return m
        m += 1


@functools.lru_cache(maxsize=64)
def _tap_index(size: int, dilation: int, grid_h: int, grid_w: int, device: torch.device) -> Tensor:
    """Where each tap ``(a, b)`` of a ``size x size`` kernel of the given dilation lies on the flat ``grid_h x
    grid_w`` grid: at ``(-(a - r) * dilation, -(b - r) * dilation)`` modulo the grid, ``r = size // 2``, so that
    the circular convolution with the grid is the cross-correlation with the kernel.

    Taps that land on one grid cell (a grid narrower than the kernel's span) reach beyond the map on both
    sides: they meet no pixel, and neither does their cell.
    """
    with torch.inference_mode(False):  # a cached tensor must stay usable by autograd later
        offsets = (torch.arange(size) - size // 2) * dilation
        rows = (-offsets % grid_h).view(size, 1)
        cols = (-offsets % grid_w).view(1, size)
        return (rows * grid_w + cols).reshape(-1).to(device)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The promoted dtype, at least float32 (``torch.fft`` on CPU has no half-precision kernels)."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _kernel_spectrum(weight: Tensor, dilation: int, grid: tuple[int, int]) -> Tensor:
    """``rfft2`` of the kernels scattered on the zero grid.

    Shape:
        - weight: :math:`(B, C, k, k)`
        - Output: :math:`(B, C, H_g, W_g / 2 + 1)`, complex
    """
    b, c, k, _ = weight.shape
    grid_h, grid_w = grid
    index = _tap_index(k, dilation, grid_h, grid_w, weight.device)
    flat = weight.new_zeros(b * c, grid_h * grid_w).index_add(1, index, weight.reshape(b * c, k * k))
    return torch.fft.rfft2(flat.view(b, c, grid_h, grid_w))


class FFTConv(torch.autograd.Function):
    """``out[b] = sum_c xcorr(s[b, c], weight[b, c])``: a 'same' convolution with a kernel per sample and channel,
    by FFT.

    The same contract as :class:`~cbam_dsa._fast.SampleConv`: zero padding ``(k // 2) * dilation``, the
    cross-correlation of :func:`torch.nn.functional.conv2d`. It runs as a circular convolution on the grid
    ``(fft_size(H + reach), fft_size(W + reach))``, ``reach = (k // 2) * dilation``, which has no wrap-around.
    Saves ``s`` and ``weight`` only; backward recomputes the spectra it needs (only those of the gradients
    asked for). Half-precision inputs compute in float32 and give a float32 output.

    Use as ``FFTConv.apply(s, weight, dilation)``.

    Shape:
        - s: :math:`(B, C, H, W)`; weight: :math:`(B, C, k, k)` with odd ``k``; dilation: an int ``>= 1``
        - Output: :math:`(B, 1, H, W)` in float32 or float64
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, weight: Tensor, dilation: int) -> Tensor:
        b, c, h, w = s.shape
        k = weight.shape[-1]
        if weight.dim() != 4 or weight.shape[:2] != s.shape[:2] or weight.shape[2] != k or k % 2 == 0:
            raise ValueError(
                f"weight must have shape (B, C, k, k) = ({b}, {c}, k, k) with odd k for s of shape "
                f"{tuple(s.shape)}, but got {tuple(weight.shape)}"
            )
        dilation = check_int("dilation", dilation)
        dtype = _compute_dtype(s, weight)
        reach = (k // 2) * dilation
        grid = (fft_size(h + reach), fft_size(w + reach))
        ctx.dilation, ctx.grid, ctx.compute_dtype = dilation, grid, dtype
        ctx.save_for_backward(s, weight)
        s, weight = s.to(dtype), weight.to(dtype)
        product = torch.fft.rfft2(s, s=grid) * _kernel_spectrum(weight, dilation, grid)
        out = torch.fft.irfft2(product.sum(dim=1, keepdim=True), s=grid)
        return out[..., :h, :w].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        s_in, weight_in = ctx.saved_tensors
        dtype, grid, dilation = ctx.compute_dtype, ctx.grid, ctx.dilation
        s, weight = s_in.to(dtype), weight_in.to(dtype)
        b, c, h, w = s.shape
        k = weight.shape[-1]
        spectrum = torch.fft.rfft2(grad.to(dtype), s=grid)  # (B, 1, H_g, W_g / 2 + 1)
        grad_s = grad_weight = None
        if ctx.needs_input_grad[0]:
            kernels = _kernel_spectrum(weight, dilation, grid)
            grad_s = torch.fft.irfft2(spectrum * kernels.conj(), s=grid)[..., :h, :w].to(s_in.dtype)
        if ctx.needs_input_grad[1]:
            correlation = torch.fft.irfft2(spectrum * torch.fft.rfft2(s, s=grid).conj(), s=grid)
            index = _tap_index(k, dilation, grid[0], grid[1], s.device)
            taps = correlation.reshape(b * c, grid[0] * grid[1]).index_select(1, index)
            grad_weight = taps.view(b, c, k, k).to(weight_in.dtype)
        return grad_s, grad_weight, None


@functools.lru_cache(maxsize=32)
def _branch_taps(specs: tuple[tuple[int, int], ...], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """Where the taps of all branches ``(kernel_size, dilation)`` lie in one kernel of dilation 1, each branch
    centred (a dilated kernel zero-interleaved): ``(position, branch, n)``.

    ``position[j]`` is the flat index in the ``n x n`` kernel, ``n = max (k - 1) * d + 1``, of tap ``j`` of the
    branches' kernels flattened and concatenated; ``branch[j]`` is its branch.
    """
    size = max((k - 1) * d + 1 for k, d in specs)
    positions, branches = [], []
    with torch.inference_mode(False):  # a cached tensor must stay usable by autograd later
        for index, (k, d) in enumerate(specs):
            offsets = torch.arange(k) * d + (size - (k - 1) * d - 1) // 2
            positions.append((offsets.view(k, 1) * size + offsets.view(1, k)).reshape(-1))
            branches.append(torch.full((k * k,), index))
        return torch.cat(positions).to(device), torch.cat(branches).to(device), size


def mixed_kernel(branch_weights: list[Tensor], dilations: list[int], router: Tensor) -> Tensor:
    """The per-sample kernel ``sum_k r_k * W_k`` of dilation 1, every branch embedded centred in it.

    Args:
        branch_weights (list[Tensor]): one ``(1, C, k, k)`` kernel per branch, odd ``k``.
        dilations (list[int]): one dilation per branch.
        router (Tensor): ``(B, K)`` branch weights.

    Returns:
        Tensor: the kernels ``(B, C, n, n)``, ``n = max_k (k - 1) * d + 1``, in the router's dtype.

    Shape:
        - branch_weights: ``K`` tensors :math:`(1, C, k_i, k_i)`; router: :math:`(B, K)`
        - Output: :math:`(B, C, n, n)`
    """
    specs = tuple((int(w.shape[-1]), int(d)) for w, d in zip(branch_weights, dilations, strict=True))
    position, branch, size = _branch_taps(specs, router.device)
    b, c = router.shape[0], branch_weights[0].shape[1]
    taps = torch.cat([weight.reshape(c, -1) for weight in branch_weights], dim=1).to(router.dtype)  # (C, T)
    scaled = router.index_select(1, branch).unsqueeze(1) * taps  # (B, C, T)
    kernel = router.new_zeros(b * c, size * size).index_add(1, position, scaled.reshape(b * c, -1))
    return kernel.view(b, c, size, size)


def fft_branch_logit(
    s: Tensor,
    branch_weights: list[Tensor],
    branch_biases: list[Tensor],
    dilations: list[int],
    router: Tensor,
) -> Tensor:
    """``sum_k r_k * (conv_k(s) + bias_k)`` as one FFT convolution with the per-sample kernel ``sum_k r_k * W_k``.

    A drop-in for :func:`~cbam_dsa._fast.routed_branch_logit` (same arguments, same result): every branch is
    embedded in one kernel of dilation 1 and mixed by the router (:func:`mixed_kernel`), and run by
    :class:`FFTConv`.

    Args:
        s (Tensor): ``[mean_c, max_c]`` descriptors.
        branch_weights (list[Tensor]): one ``(1, 2, k, k)`` kernel per branch.
        branch_biases (list[Tensor]): one ``(1,)`` bias per branch.
        dilations (list[int]): one dilation per branch.
        router (Tensor): ``(B, K)`` branch weights.

    Returns:
        Tensor: the logit ``(B, 1, H, W)`` (float32 for half-precision ``s``).

    Shape:
        - s: :math:`(B, 2, H, W)`; router: :math:`(B, K)`
        - Output: :math:`(B, 1, H, W)`
    """
    router = router.to(s.dtype)
    logit = FFTConv.apply(s, mixed_kernel(branch_weights, dilations, router), 1)
    bias = torch.mv(router, torch.cat(branch_biases).to(s.dtype)).to(logit.dtype)
    return logit + bias.view(-1, 1, 1, 1)
