"""The Triton kernels of the fused block's backward, channel side (launched by :mod:`.block`; helpers in
:mod:`._jit`; the spatial side in :mod:`.kernels_backward_spatial`).

The passes over ``x`` (``backward_channel_reduce_kernel``, ``backward_input_kernel``) run one program per
``(sample, pixel tile)`` as in forward (:mod:`.kernels`); the per-sample ``backward_channel_kernel`` (grid
``(B,)``) finishes the reductions from per-tile partials in a fixed order and writes the sample's parts of the
parameters' gradients to row ``b`` of a packed ``(B, P)`` buffer, which :func:`finish_kernel` sums over the batch.
No atomics: two runs are bitwise equal.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import (
    _act_grad,
    _branch_transpose,
    _fusion,
    _gate_grad,
    _grad_y,
    _merge_max_count,
    _mlp_hidden,
    _mlp_out,
    _pick,
    _router,
    _to_x,
)

# ----------------------------------------------------------------------------------------------------------
# Backward.


@triton.jit
def backward_channel_reduce_kernel(x_ptr, gout_ptr, ca_ptr, sa_ptr, alpha_ptr, s_ptr, cntc_ptr, spart_ptr, rw1_ptr,
                                   rb1_ptr, rw2_ptr, rb2_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr,
                                   b3_ptr, glogit_ptr, gpool_ptr, gs_ptr, pg_ptr, C, H, W, N, RH, n_tiles,
                                   K: tl.constexpr, KS0: tl.constexpr, KS1: tl.constexpr, KS2: tl.constexpr,
                                   KS3: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                                   D3: tl.constexpr, TB0: tl.constexpr, TB1: tl.constexpr, TB2: tl.constexpr,
                                   TB3: tl.constexpr, HAS_ALPHA: tl.constexpr, CB: tl.constexpr, NB: tl.constexpr,
                                   RHB: tl.constexpr, KB: tl.constexpr, TPB: tl.constexpr, XDT: tl.constexpr,
                                   ACC: tl.constexpr):
    """Backward pass 2 (grid ``(B, tiles)``): the gradient of the descriptors on the tile (the branches' transposed
    convolutions of ``r_k * g_logit`` plus the router's part), written for pass 3, then per channel the tile's part
    of ``sum_hw g_y * x`` (the gradient of ``ca``)."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    n = tile * NB + tl.arange(0, NB)
    nmask = n < N
    hh = n // W
    ww = n % W
    rw, _, _, _ = _router(spart_ptr + b * n_tiles * 2, n_tiles, N, rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr, RH, K, RHB,
                          KB, TPB, ACC)
    g_base = glogit_ptr + b * N
    gs0, gs1 = _branch_transpose(g_base, hh, ww, nmask, H, W, _pick(rw, 0, KB), w0_ptr, KS0, D0, TB0, ACC)
    if K > 1:
        a, c = _branch_transpose(g_base, hh, ww, nmask, H, W, _pick(rw, 1, KB), w1_ptr, KS1, D1, TB1, ACC)
        gs0 += a
        gs1 += c
    if K > 2:
        a, c = _branch_transpose(g_base, hh, ww, nmask, H, W, _pick(rw, 2, KB), w2_ptr, KS2, D2, TB2, ACC)
        gs0 += a
        gs1 += c
    if K > 3:
        a, c = _branch_transpose(g_base, hh, ww, nmask, H, W, _pick(rw, 3, KB), w3_ptr, KS3, D3, TB3, ACC)
        gs0 += a
        gs1 += c
    gs0 = gs0 + tl.load(gpool_ptr + 2 * b).to(ACC)
    gs1 = gs1 + tl.load(gpool_ptr + 2 * b + 1).to(ACC)
    tl.store(gs_ptr + b * 2 * N + n, gs0, mask=nmask)
    tl.store(gs_ptr + b * 2 * N + N + n, gs1, mask=nmask)
    sa = tl.load(sa_ptr + b * N + n, mask=nmask, other=0.0).to(ACC)
    s1 = tl.load(s_ptr + b * 2 * N + N + n, mask=nmask, other=0.0)
    ties = tl.load(cntc_ptr + b * N + n, mask=nmask, other=1.0)
    alpha = 1.0
    if HAS_ALPHA:
        alpha = tl.load(alpha_ptr).to(ACC)
    base = b.to(tl.int64) * C * N
    for c0 in range(0, C, CB):
        cc = c0 + tl.arange(0, CB)
        cmask = cc < C
        mask = cmask[:, None] & nmask[None, :]
        offs = base + cc[:, None] * N + n[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(ACC)
        ca = tl.load(ca_ptr + b * C + cc, mask=cmask, other=0.0).to(ACC)
        g_y = _grad_y(v, g, ca, sa, gs0, gs1, s1, ties, alpha, C, HAS_ALPHA, XDT)
        tl.store(pg_ptr + (b * n_tiles + tile) * C + cc, tl.sum(tl.where(mask, g_y * v, 0.0), axis=1), mask=cmask)


@triton.jit
def backward_channel_kernel(psum_ptr, pmax_ptr, pcnt_ptr, pg_ptr, palpha_ptr, gca_ptr, fc1w_ptr, fc1b_ptr, fc2w_ptr,
                            fc2b_ptr, fusion_ptr, tca_ptr, avg_ptr, mx_ptr, cnt_ptr, gavg_ptr, gmx_ptr, grad_ptr, P,
                            off_fc1w, off_fc1b, off_fc2w, off_fc2b, off_fw, off_tca, off_alpha, C, N, RM, n_tiles,
                            HAS_FUSION: tl.constexpr, HAS_GCA: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr,
                            CB: tl.constexpr, RB: tl.constexpr, CBM: tl.constexpr, TPB: tl.constexpr,
                            ACC: tl.constexpr):
    """Backward of the channel part for one sample (grid ``(B,)``): the pooled descriptors from the per-tile
    partials, the MLP again, the gate, the fusion and the MLP's backward, down to the gradients of the mean and the
    max over H, W; the parameters' parts go to row ``b`` of ``grad``."""
    b = tl.program_id(0)
    grad_row = grad_ptr + b * P
    # The channel pooling from the partials of backward pass 1 (sum, max and ties over H, W).
    for c0 in range(0, C, CB):
        cc = c0 + tl.arange(0, CB)
        cmask = cc < C
        total = tl.zeros((CB,), ACC)
        best = tl.full((CB,), float("-inf"), ACC)
        ties = tl.zeros((CB,), ACC)
        g_ca = tl.zeros((CB,), ACC)
        for t in range(0, n_tiles):
            row = (b * n_tiles + t) * C + cc
            total += tl.load(psum_ptr + row, mask=cmask, other=0.0)
            best, ties = _merge_max_count(best, ties, tl.load(pmax_ptr + row, mask=cmask, other=0.0),
                                          tl.load(pcnt_ptr + row, mask=cmask, other=0.0))
            g_ca += tl.load(pg_ptr + row, mask=cmask, other=0.0)
        tl.store(avg_ptr + b * C + cc, total / N, mask=cmask)
        tl.store(mx_ptr + b * C + cc, best, mask=cmask)
        tl.store(cnt_ptr + b * C + cc, ties, mask=cmask)
        tl.store(gavg_ptr + b * C + cc, g_ca, mask=cmask)  # g_ca for now, the mean's gradient below
    alpha_part = tl.zeros((TPB,), ACC)
    for t0 in range(0, n_tiles, TPB):
        t = t0 + tl.arange(0, TPB)
        alpha_part += tl.load(palpha_ptr + b * n_tiles + t, mask=t < n_tiles, other=0.0)
    tl.store(grad_row + off_alpha, tl.sum(alpha_part, axis=0))
    tl.debug_barrier()
    pre_avg, h_avg = _mlp_hidden(avg_ptr + b * C, fc1w_ptr, fc1b_ptr, C, RM, ACT, RB, CBM, ACC)
    pre_max, h_max = _mlp_hidden(mx_ptr + b * C, fc1w_ptr, fc1b_ptr, C, RM, ACT, RB, CBM, ACC)
    fw0, fw1 = _fusion(fusion_ptr, HAS_FUSION, ACC)
    temperature = tl.load(tca_ptr).to(ACC)
    r = tl.arange(0, RB)
    rmask = r < RM
    g_h_avg = tl.zeros((RB,), ACC)
    g_h_max = tl.zeros((RB,), ACC)
    g_temp = tl.zeros((CB,), ACC)
    g_fw0 = tl.zeros((CB,), ACC)
    g_fw1 = tl.zeros((CB,), ACC)
    for c0 in range(0, C, CB):
        cc = c0 + tl.arange(0, CB)
        cmask = cc < C
        a = _mlp_out(h_avg, cc, cmask, fc2w_ptr, fc2b_ptr, RM, RB, ACC)
        m = _mlp_out(h_max, cc, cmask, fc2w_ptr, fc2b_ptr, RM, RB, ACC)
        z = fw0 * a + fw1 * m
        q = z / temperature
        g_ca = tl.load(gavg_ptr + b * C + cc, mask=cmask, other=0.0)
        if HAS_GCA:
            g_ca += tl.load(gca_ptr + b * C + cc, mask=cmask, other=0.0).to(ACC)
        g_q = tl.where(cmask, _gate_grad(q, g_ca, GATE), 0.0)
        g_z = g_q / temperature
        g_temp += tl.where(cmask, g_q * z, 0.0)
        g_fw0 += tl.where(cmask, g_z * a, 0.0)
        g_fw1 += tl.where(cmask, g_z * m, 0.0)
        g_a = fw0 * g_z
        g_m = fw1 * g_z
        wmask = cmask[:, None] & rmask[None, :]
        tl.store(grad_row + off_fc2w + cc[:, None] * RM + r[None, :],
                 g_a[:, None] * h_avg[None, :] + g_m[:, None] * h_max[None, :], mask=wmask)
        tl.store(grad_row + off_fc2b + cc, g_a + g_m, mask=cmask)
        w2 = tl.load(fc2w_ptr + cc[:, None] * RM + r[None, :], mask=wmask, other=0.0).to(ACC)
        g_h_avg += tl.sum(tl.where(wmask, w2 * g_a[:, None], 0.0), axis=0)
        g_h_max += tl.sum(tl.where(wmask, w2 * g_m[:, None], 0.0), axis=0)
    tl.store(grad_row + off_tca, tl.sum(g_temp, axis=0))
    tl.store(grad_row + off_fw, tl.sum(g_fw0, axis=0))
    tl.store(grad_row + off_fw + 1, tl.sum(g_fw1, axis=0))
    g_pre_avg = tl.where(rmask, _act_grad(pre_avg, h_avg, g_h_avg, ACT), 0.0)
    g_pre_max = tl.where(rmask, _act_grad(pre_max, h_max, g_h_max, ACT), 0.0)
    tl.store(grad_row + off_fc1b + r, g_pre_avg + g_pre_max, mask=rmask)
    tl.debug_barrier()
    for c0 in range(0, C, CBM):
        cc = c0 + tl.arange(0, CBM)
        cmask = cc < C
        wmask = rmask[:, None] & cmask[None, :]
        v_avg = tl.load(avg_ptr + b * C + cc, mask=cmask, other=0.0)
        v_max = tl.load(mx_ptr + b * C + cc, mask=cmask, other=0.0)
        tl.store(grad_row + off_fc1w + r[:, None] * C + cc[None, :],
                 g_pre_avg[:, None] * v_avg[None, :] + g_pre_max[:, None] * v_max[None, :], mask=wmask)
        w1 = tl.load(fc1w_ptr + r[:, None] * C + cc[None, :], mask=wmask, other=0.0).to(ACC)
        tl.store(gavg_ptr + b * C + cc, tl.sum(tl.where(wmask, w1 * g_pre_avg[:, None], 0.0), axis=0) / N,
                 mask=cmask)
        tl.store(gmx_ptr + b * C + cc, tl.sum(tl.where(wmask, w1 * g_pre_max[:, None], 0.0), axis=0), mask=cmask)


@triton.jit
def backward_input_kernel(x_ptr, gout_ptr, ca_ptr, sa_ptr, alpha_ptr, s_ptr, cntc_ptr, gs_ptr, gavg_ptr, gmx_ptr,
                          mx_ptr, cnt_ptr, gx_ptr, C, N, HAS_ALPHA: tl.constexpr, CB: tl.constexpr, NB: tl.constexpr,
                          XDT: tl.constexpr, ACC: tl.constexpr):
    """Backward pass 3 (grid ``(B, tiles)``): the gradient of ``x``, written once: through the blend, through
    ``x * ca`` and through the mean and max over H, W."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    n = tile * NB + tl.arange(0, NB)
    nmask = n < N
    sa = tl.load(sa_ptr + b * N + n, mask=nmask, other=0.0).to(ACC)
    gs0 = tl.load(gs_ptr + b * 2 * N + n, mask=nmask, other=0.0)
    gs1 = tl.load(gs_ptr + b * 2 * N + N + n, mask=nmask, other=0.0)
    s1 = tl.load(s_ptr + b * 2 * N + N + n, mask=nmask, other=0.0)
    ties = tl.load(cntc_ptr + b * N + n, mask=nmask, other=1.0)
    alpha = 1.0
    if HAS_ALPHA:
        alpha = tl.load(alpha_ptr).to(ACC)
    base = b.to(tl.int64) * C * N
    for c0 in range(0, C, CB):
        cc = c0 + tl.arange(0, CB)
        cmask = cc < C
        mask = cmask[:, None] & nmask[None, :]
        offs = base + cc[:, None] * N + n[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(ACC)
        ca = tl.load(ca_ptr + b * C + cc, mask=cmask, other=0.0).to(ACC)
        g_y = _grad_y(v, g, ca, sa, gs0, gs1, s1, ties, alpha, C, HAS_ALPHA, XDT)
        g_avg = tl.load(gavg_ptr + b * C + cc, mask=cmask, other=0.0)
        g_max = tl.load(gmx_ptr + b * C + cc, mask=cmask, other=0.0)
        best = tl.load(mx_ptr + b * C + cc, mask=cmask, other=0.0)
        count = tl.load(cnt_ptr + b * C + cc, mask=cmask, other=1.0)
        g_x = g_y * ca[:, None] + g_avg[:, None] + (g_max / count)[:, None] * tl.where(v == best[:, None], 1.0, 0.0)
        if HAS_ALPHA:
            g_x += g - alpha * g
        tl.store(gx_ptr + offs, _to_x(g_x, XDT), mask=mask)


@triton.jit
def finish_kernel(grad_ptr, total_ptr, fusion_ptr, gfw_ptr, tca_ptr, tsa_ptr, B, P, off_fw, off_tca, off_tsa,
                  HAS_FUSION: tl.constexpr, HAS_GFW: tl.constexpr, PB: tl.constexpr, ACC: tl.constexpr):
    """The parameters' gradients: the per-sample rows of ``grad`` (``(B, P)``) summed over B in order into
    ``total[:P]`` (grid ``(cdiv(P, PB),)``); the first program also writes the chain rule of the scalars after
    them: ``total[P:P + 2]`` the fusion logits' gradient (softmax backward), ``total[P + 2]`` and ``total[P + 3]``
    the temperatures' (``-sum(g_q * z) / T ** 2``)."""
    cols = tl.program_id(0) * PB + tl.arange(0, PB)
    cmask = cols < P
    acc = tl.zeros((PB,), ACC)
    for b in range(0, B):
        acc += tl.load(grad_ptr + b * P + cols, mask=cmask, other=0.0)
    tl.store(total_ptr + cols, acc, mask=cmask)
    if tl.program_id(0) == 0:
        g_fw0 = tl.zeros((), ACC)
        g_fw1 = tl.zeros((), ACC)
        g_tca = tl.zeros((), ACC)
        g_tsa = tl.zeros((), ACC)
        for b in range(0, B):
            g_fw0 += tl.load(grad_ptr + b * P + off_fw)
            g_fw1 += tl.load(grad_ptr + b * P + off_fw + 1)
            g_tca += tl.load(grad_ptr + b * P + off_tca)
            g_tsa += tl.load(grad_ptr + b * P + off_tsa)
        if HAS_GFW:
            g_fw0 += tl.load(gfw_ptr).to(ACC)
            g_fw1 += tl.load(gfw_ptr + 1).to(ACC)
        fw0, fw1 = _fusion(fusion_ptr, HAS_FUSION, ACC)
        inner = g_fw0 * fw0 + g_fw1 * fw1
        tl.store(total_ptr + P, fw0 * (g_fw0 - inner))
        tl.store(total_ptr + P + 1, fw1 * (g_fw1 - inner))
        t_ca = tl.load(tca_ptr).to(ACC)
        t_sa = tl.load(tsa_ptr).to(ACC)
        tl.store(total_ptr + P + 2, -g_tca / (t_ca * t_ca))
        tl.store(total_ptr + P + 3, -g_tsa / (t_sa * t_sa))
