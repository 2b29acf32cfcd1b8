"""The Triton kernels of the fused block's forward (launched by :mod:`.block`; backward in
:mod:`.kernels_backward_spatial` and :mod:`.kernels_backward_channel`, helpers in :mod:`._jit`).

Layout: ``x`` is contiguous ``(B, C, N)`` with ``N = H * W``. A *pixel tile* is ``NB`` consecutive pixels of one
sample; the passes over ``x`` run one program per ``(sample, pixel tile)`` and walk the channels in chunks of
``CB``, so every reduction over C finishes inside one program and every reduction over H, W leaves one partial per
tile, summed in a fixed order by a later kernel (deterministic, no atomics). Everything is computed in ``ACC``
(float32, float64 for float64 inputs); the full-size products are rounded to ``XDT`` (the input's dtype) after each
step, as the reference's tensors are.

Non-finite values spread as in the reference: maxima use ``_max_nan`` (``torch.amax`` keeps NaN), ReLU is
``where(z < 0, 0, z)`` (keeps NaN), padded lanes are zeroed before every cross-lane sum, and a max's gradient is
``(g / count) * mask`` as in autograd (NaN where the count is 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import (
    _fusion,
    _gate,
    _logit,
    _max_nan,
    _max_reduce,
    _mlp_hidden,
    _mlp_out,
    _round,
    _router,
    _to_x,
)

# ----------------------------------------------------------------------------------------------------------
# Forward.


@triton.jit
def channel_pool_kernel(x_ptr, avg_ptr, max_ptr, C, N, CB: tl.constexpr, NB: tl.constexpr, ACC: tl.constexpr):
    """Forward pass 1: mean and max over H, W of ``CB`` channels of one sample (grid ``(B, cdiv(C, CB))``)."""
    b = tl.program_id(0)
    cc = tl.program_id(1) * CB + tl.arange(0, CB)
    cmask = cc < C
    total = tl.zeros((CB,), ACC)
    best = tl.full((CB,), float("-inf"), ACC)
    base = x_ptr + b.to(tl.int64) * C * N
    for n0 in range(0, N, NB):
        n = n0 + tl.arange(0, NB)
        mask = cmask[:, None] & (n < N)[None, :]
        v = tl.load(base + cc[:, None] * N + n[None, :], mask=mask, other=0.0).to(ACC)
        total += tl.sum(v, axis=1)
        best = _max_nan(best, _max_reduce(tl.where(mask, v, float("-inf")), 1))
    tl.store(avg_ptr + b * C + cc, total / N, mask=cmask)
    tl.store(max_ptr + b * C + cc, best, mask=cmask)


@triton.jit
def spatial_pool_kernel(x_ptr, avg_ptr, max_ptr, fc1w_ptr, fc1b_ptr, fc2w_ptr, fc2b_ptr, fusion_ptr, tca_ptr,
                        ca_ptr, ca_saved_ptr, fw_ptr, s_ptr, spart_ptr, C, N, RM, n_tiles,
                        HAS_FUSION: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, CB: tl.constexpr,
                        NB: tl.constexpr, RB: tl.constexpr, CBM: tl.constexpr, XDT: tl.constexpr,
                        ACC: tl.constexpr):
    """Forward pass 2 (grid ``(B, tiles)``): the channel map from the pooled descriptors (each program computes its
    sample's MLP; the first tile writes ``ca``), then mean and max over C of ``x * ca`` on the pixel tile, and the
    tile's sums of both (for the router)."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    fw0, fw1 = _fusion(fusion_ptr, HAS_FUSION, ACC)
    if (b == 0) & (tile == 0):
        tl.store(fw_ptr, _to_x(fw0, XDT))
        tl.store(fw_ptr + 1, _to_x(fw1, XDT))
    temperature = tl.load(tca_ptr).to(ACC)
    _, h_avg = _mlp_hidden(avg_ptr + b * C, fc1w_ptr, fc1b_ptr, C, RM, ACT, RB, CBM, ACC)
    _, h_max = _mlp_hidden(max_ptr + b * C, fc1w_ptr, fc1b_ptr, C, RM, ACT, RB, CBM, ACC)
    n = tile * NB + tl.arange(0, NB)
    nmask = n < N
    total = tl.zeros((NB,), ACC)
    best = tl.full((NB,), float("-inf"), ACC)
    base = x_ptr + b.to(tl.int64) * C * N
    for c0 in range(0, C, CB):
        cc = c0 + tl.arange(0, CB)
        cmask = cc < C
        z = fw0 * _mlp_out(h_avg, cc, cmask, fc2w_ptr, fc2b_ptr, RM, RB, ACC) + fw1 * _mlp_out(
            h_max, cc, cmask, fc2w_ptr, fc2b_ptr, RM, RB, ACC)
        ca = _to_x(_gate(z / temperature, GATE), XDT)
        if tile == 0:
            tl.store(ca_ptr + b * C + cc, ca, mask=cmask)
            tl.store(ca_saved_ptr + b * C + cc, ca, mask=cmask)
        mask = cmask[:, None] & nmask[None, :]
        v = tl.load(base + cc[:, None] * N + n[None, :], mask=mask, other=0.0).to(ACC)
        y = _round(v * ca.to(ACC)[:, None], XDT)
        total += tl.sum(tl.where(mask, y, 0.0), axis=0)
        best = _max_nan(best, _max_reduce(tl.where(mask, y, float("-inf")), 0))
    s0 = total / C
    tl.store(s_ptr + b * 2 * N + n, s0, mask=nmask)
    tl.store(s_ptr + b * 2 * N + N + n, best, mask=nmask)
    tl.store(spart_ptr + (b * n_tiles + tile) * 2, tl.sum(tl.where(nmask, s0, 0.0), axis=0))
    tl.store(spart_ptr + (b * n_tiles + tile) * 2 + 1, tl.sum(tl.where(nmask, best, 0.0), axis=0))


@triton.jit
def blend_kernel(x_ptr, s_ptr, spart_ptr, rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr,
                 w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, tsa_ptr, alpha_ptr, ca_ptr,
                 out_ptr, sa_ptr, sa_saved_ptr, rwout_ptr, C, H, W, N, RH, n_tiles,
                 K: tl.constexpr, KS0: tl.constexpr, KS1: tl.constexpr, KS2: tl.constexpr, KS3: tl.constexpr,
                 D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
                 TB0: tl.constexpr, TB1: tl.constexpr, TB2: tl.constexpr, TB3: tl.constexpr,
                 GATE: tl.constexpr, HAS_ALPHA: tl.constexpr, CB: tl.constexpr, NB: tl.constexpr,
                 RHB: tl.constexpr, KB: tl.constexpr, TPB: tl.constexpr, XDT: tl.constexpr, ACC: tl.constexpr):
    """Forward pass 3 (grid ``(B, tiles)``): the router (each program for its sample; the first tile writes it), the
    routed branches on the pixel tile, the spatial gate, and the blend of every channel on the tile."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    rw, _, _, _ = _router(spart_ptr + b * n_tiles * 2, n_tiles, N, rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr, RH, K, RHB,
                          KB, TPB, ACC)
    kk = tl.arange(0, KB)
    if tile == 0:
        tl.store(rwout_ptr + b * K + kk, _to_x(rw, XDT), mask=kk < K)
    n = tile * NB + tl.arange(0, NB)
    nmask = n < N
    hh = n // W
    ww = n % W
    logit = _logit(s_ptr + b * 2 * N, hh, ww, nmask, H, W, N, rw, w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                   w3_ptr, b3_ptr, K, KB, KS0, KS1, KS2, KS3, D0, D1, D2, D3, TB0, TB1, TB2, TB3, ACC)
    sa = _to_x(_gate(logit / tl.load(tsa_ptr).to(ACC), GATE), XDT)
    tl.store(sa_ptr + b * N + n, sa, mask=nmask)
    tl.store(sa_saved_ptr + b * N + n, sa, mask=nmask)
    sa = sa.to(ACC)
    if HAS_ALPHA:
        alpha = tl.load(alpha_ptr).to(ACC)
    base = b.to(tl.int64) * C * N
    for c0 in range(0, C, CB):
        cc = c0 + tl.arange(0, CB)
        cmask = cc < C
        mask = cmask[:, None] & nmask[None, :]
        offs = base + cc[:, None] * N + n[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        ca = tl.load(ca_ptr + b * C + cc, mask=cmask, other=0.0).to(ACC)
        y = _round(v * ca[:, None], XDT)
        y = _round(y * sa[None, :], XDT)
        if HAS_ALPHA:
            d = _round(y - v, XDT)
            y = _round(v + _round(alpha * d, XDT), XDT)
        tl.store(out_ptr + offs, y.to(XDT), mask=mask)  # y is rounded already
