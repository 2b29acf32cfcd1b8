"""The Triton kernels of the fused block's backward, spatial side (launched by :mod:`.block`; helpers in
:mod:`._jit`; the channel side in :mod:`.kernels_backward_channel`).

``backward_pool_kernel`` is the two-axis reduction over ``x`` (one program per ``(sample, pixel tile)`` as in
forward, :mod:`.kernels`); ``backward_spatial_kernel`` runs the spatial gate's backward on tiles of pixels; the
per-sample ``backward_router_kernel`` (grid ``(B,)``) finishes the reductions from per-tile partials in a fixed
order and writes the sample's parts of the parameters' gradients to row ``b`` of a packed ``(B, P)`` buffer, which
:func:`.kernels_backward_channel.finish_kernel` sums over the batch. No atomics: two runs are bitwise equal.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import (
    _branch_backward,
    _gate_grad,
    _logit,
    _max_reduce,
    _merge_max_count,
    _pick,
    _round,
    _router,
    _store_taps,
)

# ----------------------------------------------------------------------------------------------------------
# Backward.


@triton.jit
def backward_pool_kernel(x_ptr, gout_ptr, ca_ptr, sa_ptr, alpha_ptr, s_ptr, cntc_ptr, t1_ptr, spart_ptr, psum_ptr,
                         pmax_ptr, pcnt_ptr, palpha_ptr, C, N, n_tiles, HAS_ALPHA: tl.constexpr, CB: tl.constexpr,
                         NB: tl.constexpr, XDT: tl.constexpr, ACC: tl.constexpr):
    """Backward pass 1 (grid ``(B, tiles)``), the two-axis reduction: over C, the descriptors ``s`` again (as forward
    pass 2 computes them), the number of channels tied at the max, and ``sum_c g_y2 * y``; over the tile's pixels,
    per channel, the sum, max and ties of ``x`` (the channel pooling again); and the tile's part of alpha's
    gradient."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    n = tile * NB + tl.arange(0, NB)
    nmask = n < N
    total = tl.zeros((NB,), ACC)
    best = tl.full((NB,), float("-inf"), ACC)
    ties = tl.zeros((NB,), ACC)
    gsum = tl.zeros((NB,), ACC)
    alpha_part = tl.zeros((NB,), ACC)
    if HAS_ALPHA:
        alpha = tl.load(alpha_ptr).to(ACC)
        sa = tl.load(sa_ptr + b * N + n, mask=nmask, other=0.0).to(ACC)
    base = b.to(tl.int64) * C * N
    for c0 in range(0, C, CB):
        cc = c0 + tl.arange(0, CB)
        cmask = cc < C
        mask = cmask[:, None] & nmask[None, :]
        offs = base + cc[:, None] * N + n[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(ACC)
        ca = tl.load(ca_ptr + b * C + cc, mask=cmask, other=0.0).to(ACC)
        y = _round(v * ca[:, None], XDT)
        total += tl.sum(tl.where(mask, y, 0.0), axis=0)
        masked_y = tl.where(mask, y, float("-inf"))
        chunk_best = _max_reduce(masked_y, 0)
        chunk_ties = tl.sum(tl.where(masked_y == chunk_best[None, :], 1.0, 0.0), axis=0)
        best, ties = _merge_max_count(best, ties, chunk_best, chunk_ties)
        if HAS_ALPHA:
            g2 = alpha * g
            y2 = _round(y * sa[None, :], XDT)
            d = _round(y2 - v, XDT)
            alpha_part += tl.sum(tl.where(mask, g * d, 0.0), axis=0)
        else:
            g2 = g
        gsum += tl.sum(tl.where(mask, g2 * y, 0.0), axis=0)
        masked_x = tl.where(mask, v, float("-inf"))
        x_best = _max_reduce(masked_x, 1)
        prow = (b * n_tiles + tile) * C + cc
        tl.store(psum_ptr + prow, tl.sum(tl.where(mask, v, 0.0), axis=1), mask=cmask)
        tl.store(pmax_ptr + prow, x_best, mask=cmask)
        tl.store(pcnt_ptr + prow, tl.sum(tl.where(masked_x == x_best[:, None], 1.0, 0.0), axis=1), mask=cmask)
    s0 = total / C
    tl.store(s_ptr + b * 2 * N + n, s0, mask=nmask)
    tl.store(s_ptr + b * 2 * N + N + n, best, mask=nmask)
    tl.store(cntc_ptr + b * N + n, ties, mask=nmask)
    tl.store(t1_ptr + b * N + n, gsum, mask=nmask)
    tl.store(spart_ptr + (b * n_tiles + tile) * 2, tl.sum(tl.where(nmask, s0, 0.0), axis=0))
    tl.store(spart_ptr + (b * n_tiles + tile) * 2 + 1, tl.sum(tl.where(nmask, best, 0.0), axis=0))
    tl.store(palpha_ptr + b * n_tiles + tile, tl.sum(alpha_part, axis=0))


@triton.jit
def backward_spatial_kernel(s_ptr, spart_ptr, t1_ptr, gsa_ptr, rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr,
                            w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, tsa_ptr, glogit_ptr,
                            part_ptr, Q, q_branch1, q_branch2, q_branch3, H, W, N, RH, n_tiles, n_stiles,
                            K: tl.constexpr, KS0: tl.constexpr, KS1: tl.constexpr, KS2: tl.constexpr,
                            KS3: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                            D3: tl.constexpr, TB0: tl.constexpr, TB1: tl.constexpr, TB2: tl.constexpr,
                            TB3: tl.constexpr, GATE: tl.constexpr, HAS_GSA: tl.constexpr, NB: tl.constexpr,
                            RHB: tl.constexpr, KB: tl.constexpr, TPB: tl.constexpr, ACC: tl.constexpr):
    """Backward of the spatial gate and the routed branches on one pixel tile (grid ``(B, tiles)``): writes
    ``g_logit`` for the tile, and the tile's parts of the gradients of the spatial temperature, the router weights,
    the branch biases and the branch kernels to row ``(b, tile)`` of ``part`` (``Q`` values: ``[T_sa, router (K),
    biases (K), kernel 0, kernel 1 from q_branch1, ...]``)."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    rw, _, _, _ = _router(spart_ptr + b * n_tiles * 2, n_tiles, N, rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr, RH, K, RHB,
                          KB, TPB, ACC)
    kk = tl.arange(0, KB)
    kmask = kk < K
    s_base = s_ptr + b * 2 * N
    n = tile * NB + tl.arange(0, NB)
    nmask = n < N
    hh = n // W
    ww = n % W
    temperature = tl.load(tsa_ptr).to(ACC)
    logit = _logit(s_base, hh, ww, nmask, H, W, N, rw, w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr,
                   b3_ptr, K, KB, KS0, KS1, KS2, KS3, D0, D1, D2, D3, TB0, TB1, TB2, TB3, ACC)
    g_sa = tl.load(t1_ptr + b * N + n, mask=nmask, other=0.0)
    if HAS_GSA:
        g_sa = g_sa + tl.load(gsa_ptr + b * N + n, mask=nmask, other=0.0).to(ACC)
    g_q = tl.where(nmask, _gate_grad(logit / temperature, g_sa, GATE), 0.0)
    g_logit = g_q / temperature
    tl.store(glogit_ptr + b * N + n, g_logit, mask=nmask)
    row = part_ptr + (b * n_stiles + tile) * Q
    tl.store(row, tl.sum(tl.where(nmask, g_q * logit, 0.0), axis=0))
    g_router = tl.zeros((KB,), ACC)
    g_bias = tl.zeros((KB,), ACC)
    value, d0, d1, db = _branch_backward(s_base, hh, ww, nmask, H, W, N, g_logit, _pick(rw, 0, KB), w0_ptr, b0_ptr,
                                         KS0, D0, TB0, ACC)
    _store_taps(row + 1 + 2 * K, d0, d1, KS0, TB0)
    g_bias += tl.where(kk == 0, db, 0.0)
    g_router += tl.where(kk == 0, tl.sum(tl.where(nmask, g_logit * value, 0.0), axis=0), 0.0)
    if K > 1:
        value, d0, d1, db = _branch_backward(s_base, hh, ww, nmask, H, W, N, g_logit, _pick(rw, 1, KB), w1_ptr,
                                             b1_ptr, KS1, D1, TB1, ACC)
        _store_taps(row + q_branch1, d0, d1, KS1, TB1)
        g_bias += tl.where(kk == 1, db, 0.0)
        g_router += tl.where(kk == 1, tl.sum(tl.where(nmask, g_logit * value, 0.0), axis=0), 0.0)
    if K > 2:
        value, d0, d1, db = _branch_backward(s_base, hh, ww, nmask, H, W, N, g_logit, _pick(rw, 2, KB), w2_ptr,
                                             b2_ptr, KS2, D2, TB2, ACC)
        _store_taps(row + q_branch2, d0, d1, KS2, TB2)
        g_bias += tl.where(kk == 2, db, 0.0)
        g_router += tl.where(kk == 2, tl.sum(tl.where(nmask, g_logit * value, 0.0), axis=0), 0.0)
    if K > 3:
        value, d0, d1, db = _branch_backward(s_base, hh, ww, nmask, H, W, N, g_logit, _pick(rw, 3, KB), w3_ptr,
                                             b3_ptr, KS3, D3, TB3, ACC)
        _store_taps(row + q_branch3, d0, d1, KS3, TB3)
        g_bias += tl.where(kk == 3, db, 0.0)
        g_router += tl.where(kk == 3, tl.sum(tl.where(nmask, g_logit * value, 0.0), axis=0), 0.0)
    tl.store(row + 1 + kk, g_router, mask=kmask)
    tl.store(row + 1 + K + kk, g_bias, mask=kmask)


@triton.jit
def backward_router_kernel(part_ptr, Q, n_stiles, spart_ptr, grw_ptr, rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr,
                           gpool_ptr, grad_ptr, P, off_tsa, off_router, off_bias, N, RH, n_tiles,
                           K: tl.constexpr, HAS_GRW: tl.constexpr, QB: tl.constexpr, RHB: tl.constexpr,
                           KB: tl.constexpr, TPB: tl.constexpr, ACC: tl.constexpr):
    """Per sample (grid ``(B,)``): the spatial backward's per-tile parts summed in order into row ``b`` of ``grad``
    (``T_sa`` and the biases followed by the kernels go to their offsets; the router's part is used here), then the
    router's backward (softmax, second layer, ReLU, first layer) down to the gradient of the pooled descriptors,
    ``gpool[b] = (g_p0 / N, g_p1 / N)``."""
    b = tl.program_id(0)
    q = tl.arange(0, QB)
    qmask = q < Q
    total = tl.zeros((QB,), ACC)
    for t in range(0, n_stiles):
        total += tl.load(part_ptr + (b * n_stiles + t) * Q + q, mask=qmask, other=0.0)
    grad_row = grad_ptr + b * P
    tl.store(grad_row + off_tsa, tl.sum(tl.where(q == 0, total, 0.0), axis=0))
    # The biases (K values) and then the kernels, in the same order in part's row and in grad's.
    tl.store(grad_row + off_bias + (q - 1 - K), total, mask=(q >= 1 + K) & qmask)
    g_pooled0 = 0.0
    g_pooled1 = 0.0
    if K > 1:
        kk = tl.arange(0, KB)
        kmask = kk < K
        g_router = tl.zeros((KB,), ACC)
        for k in tl.static_range(K):
            g_router += tl.where(kk == k, tl.sum(tl.where(q == 1 + k, total, 0.0), axis=0), 0.0)
        if HAS_GRW:
            g_router += tl.load(grw_ptr + b * K + kk, mask=kmask, other=0.0).to(ACC)
        rw, hidden, pooled0, pooled1 = _router(spart_ptr + b * n_tiles * 2, n_tiles, N, rw1_ptr, rb1_ptr, rw2_ptr,
                                               rb2_ptr, RH, K, RHB, KB, TPB, ACC)
        g_router = tl.where(kmask, g_router, 0.0)
        g_logits = tl.where(kmask, rw * (g_router - tl.sum(g_router * rw, axis=0)), 0.0)
        r = tl.arange(0, RHB)
        rmask = r < RH
        wmask = kmask[:, None] & rmask[None, :]
        w2 = tl.load(rw2_ptr + kk[:, None] * RH + r[None, :], mask=wmask, other=0.0).to(ACC)
        tl.store(grad_row + off_router + 3 * RH + kk[:, None] * RH + r[None, :],
                 g_logits[:, None] * hidden[None, :], mask=wmask)
        tl.store(grad_row + off_router + 3 * RH + K * RH + kk, g_logits, mask=kmask)
        g_hidden = tl.sum(tl.where(wmask, w2 * g_logits[:, None], 0.0), axis=0)
        g_pre = tl.where(rmask, tl.where(hidden <= 0.0, 0.0, g_hidden), 0.0)
        tl.store(grad_row + off_router + 2 * r, g_pre * pooled0, mask=rmask)
        tl.store(grad_row + off_router + 2 * r + 1, g_pre * pooled1, mask=rmask)
        tl.store(grad_row + off_router + 2 * RH + r, g_pre, mask=rmask)
        w1a = tl.load(rw1_ptr + 2 * r, mask=rmask, other=0.0).to(ACC)
        w1b = tl.load(rw1_ptr + 2 * r + 1, mask=rmask, other=0.0).to(ACC)
        g_pooled0 = tl.sum(tl.where(rmask, w1a * g_pre, 0.0), axis=0) / N
        g_pooled1 = tl.sum(tl.where(rmask, w1b * g_pre, 0.0), axis=0) / N
    tl.store(gpool_ptr + 2 * b, g_pooled0)
    tl.store(gpool_ptr + 2 * b + 1, g_pooled1)
