"""The Triton kernels of the fused block (launched by :mod:`.block`).

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

SIGMOID = 0
HARDSIGMOID = 1
RELU = 0
SILU = 1


# ----------------------------------------------------------------------------------------------------------
# Elementwise helpers.


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_reduce(v, axis: tl.constexpr):
    """``tl.max`` that keeps NaN (``tl.max`` drops it, as its interpreter does: ``np.nanmax``)."""
    has_nan = tl.max(tl.where(v != v, 1, 0), axis) > 0
    return tl.where(has_nan, float("nan"), tl.max(v, axis))


@triton.jit
def _round(v, XDT: tl.constexpr):
    """``v`` rounded to nearest-even in ``XDT`` and kept in ``v``'s dtype (as the reference's tensors are rounded
    after each product). bfloat16 is rounded on the float32 bits, as torch does; the interpreter's own cast to
    bfloat16 truncates."""
    if v.dtype == XDT:
        return v
    if tl.bfloat16 == XDT:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v.to(XDT).to(v.dtype)


@triton.jit
def _to_x(v, XDT: tl.constexpr):
    """``v`` stored in ``XDT``, rounded to nearest-even."""
    return _round(v, XDT).to(XDT)


@triton.jit
def _gate(q, GATE: tl.constexpr):
    if GATE == 0:
        return 1.0 / (1.0 + tl.exp(-q))
    h = q + 3.0
    h = tl.where(h < 0.0, 0.0, h)
    h = tl.where(h > 6.0, 6.0, h)
    return h / 6.0


@triton.jit
def _gate_grad(q, g, GATE: tl.constexpr):
    """d gate(q) / dq times g (autograd's formulas: sigmoid from its output, hardsigmoid 0 outside (-3, 3))."""
    if GATE == 0:
        s = 1.0 / (1.0 + tl.exp(-q))
        return g * (1.0 - s) * s
    return tl.where((q > -3.0) & (q < 3.0), g / 6.0, 0.0)  # 1 / 6 as a constant would be float32


@triton.jit
def _act(p, ACT: tl.constexpr):
    if ACT == 0:
        return tl.where(p < 0.0, 0.0, p)
    return p / (1.0 + tl.exp(-p))


@triton.jit
def _act_grad(p, h, g, ACT: tl.constexpr):
    if ACT == 0:
        return tl.where(h <= 0.0, 0.0, g)
    s = 1.0 / (1.0 + tl.exp(-p))
    return g * (s * (1.0 + p * (1.0 - s)))


@triton.jit
def _merge_max_count(best, count, new_best, new_count):
    """Running (max, number of ties) merged with a chunk's; NaN maxima give count 0."""
    merged = _max_nan(best, new_best)
    count = tl.where(best == merged, count, 0.0) + tl.where(new_best == merged, new_count, 0.0)
    return merged, count


# ----------------------------------------------------------------------------------------------------------
# The light networks.


@triton.jit
def _fusion(fusion_ptr, HAS_FUSION: tl.constexpr, ACC: tl.constexpr):
    """The fusion weights (softmax of the logits, or 1, 1)."""
    if HAS_FUSION:
        l0 = tl.load(fusion_ptr).to(ACC)
        l1 = tl.load(fusion_ptr + 1).to(ACC)
        top = _max_nan(l0, l1)
        e0 = tl.exp(l0 - top)
        e1 = tl.exp(l1 - top)
        return e0 / (e0 + e1), e1 / (e0 + e1)
    one = tl.full((), 1.0, ACC)
    return one, one


@triton.jit
def _mlp_hidden(v_ptr, fc1w_ptr, fc1b_ptr, C, RM, ACT: tl.constexpr, RB: tl.constexpr, CBM: tl.constexpr,
                ACC: tl.constexpr):
    """``pre = W1 @ v + b1`` and ``act(pre)`` (padded lanes zero) for one descriptor ``v`` of C values."""
    r = tl.arange(0, RB)
    rmask = r < RM
    pre = tl.zeros((RB,), ACC)
    for c0 in range(0, C, CBM):
        cc = c0 + tl.arange(0, CBM)
        cmask = cc < C
        v = tl.load(v_ptr + cc, mask=cmask, other=0.0).to(ACC)
        w = tl.load(fc1w_ptr + r[:, None] * C + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        prod = w.to(ACC) * v[None, :]
        pre += tl.sum(tl.where(rmask[:, None] & cmask[None, :], prod, 0.0), axis=1)
    pre += tl.load(fc1b_ptr + r, mask=rmask, other=0.0).to(ACC)
    pre = tl.where(rmask, pre, 0.0)
    hidden = tl.where(rmask, _act(pre, ACT), 0.0)
    return pre, hidden


@triton.jit
def _mlp_out(hidden, cc, cmask, fc2w_ptr, fc2b_ptr, RM, RB: tl.constexpr, ACC: tl.constexpr):
    """``W2[cc] @ hidden + b2[cc]`` for a chunk of channels."""
    r = tl.arange(0, RB)
    rmask = r < RM
    w = tl.load(fc2w_ptr + cc[:, None] * RM + r[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0)
    prod = tl.where(cmask[:, None] & rmask[None, :], w.to(ACC) * hidden[None, :], 0.0)
    return tl.sum(prod, axis=1) + tl.load(fc2b_ptr + cc, mask=cmask, other=0.0).to(ACC)


@triton.jit
def _router(spart_ptr, n_tiles, N, rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr, RH, K: tl.constexpr, RHB: tl.constexpr,
            KB: tl.constexpr, TPB: tl.constexpr, ACC: tl.constexpr):
    """The router of one sample from the per-tile sums of its descriptors: ``(weights (KB,), hidden, p0, p1)``."""
    p0 = tl.zeros((TPB,), ACC)
    p1 = tl.zeros((TPB,), ACC)
    for t0 in range(0, n_tiles, TPB):
        t = t0 + tl.arange(0, TPB)
        tmask = t < n_tiles
        p0 += tl.load(spart_ptr + 2 * t, mask=tmask, other=0.0)
        p1 += tl.load(spart_ptr + 2 * t + 1, mask=tmask, other=0.0)
    pooled0 = tl.sum(p0, axis=0) / N
    pooled1 = tl.sum(p1, axis=0) / N
    kk = tl.arange(0, KB)
    if K == 1:
        return tl.where(kk < 1, 1.0, 0.0).to(ACC), tl.zeros((RHB,), ACC), pooled0, pooled1
    r = tl.arange(0, RHB)
    rmask = r < RH
    pre = (tl.load(rw1_ptr + 2 * r, mask=rmask, other=0.0).to(ACC) * pooled0
           + tl.load(rw1_ptr + 2 * r + 1, mask=rmask, other=0.0).to(ACC) * pooled1
           + tl.load(rb1_ptr + r, mask=rmask, other=0.0).to(ACC))
    hidden = tl.where(rmask, tl.where(pre < 0.0, 0.0, pre), 0.0)
    kmask = kk < K
    w2 = tl.load(rw2_ptr + kk[:, None] * RH + r[None, :], mask=kmask[:, None] & rmask[None, :], other=0.0)
    prod = tl.where(kmask[:, None] & rmask[None, :], w2.to(ACC) * hidden[None, :], 0.0)
    logits = tl.sum(prod, axis=1) + tl.load(rb2_ptr + kk, mask=kmask, other=0.0).to(ACC)
    logits = tl.where(kmask, logits, float("-inf"))
    top = _max_reduce(logits, 0)
    e = tl.where(kmask, tl.exp(logits - top), 0.0)
    return e / tl.sum(e, axis=0), hidden, pooled0, pooled1


@triton.jit
def _pick(vector, k, KB: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, KB) == k, vector, 0.0), axis=0)


@triton.jit
def _taps(base_ptr, hh, ww, nmask, H, W, KS: tl.constexpr, DIL: tl.constexpr, TB: tl.constexpr, SIGN: tl.constexpr):
    """The map at ``(h + SIGN * dy, w + SIGN * dx)`` for every tap of a ``KS x KS`` kernel with dilation ``DIL``
    ('same' zero padding): a ``(TB, NB)`` tile, zero on padded taps and outside the map."""
    t = tl.arange(0, TB)
    pad = DIL * (KS - 1) // 2
    dy = (t // KS) * DIL - pad
    dx = (t % KS) * DIL - pad
    hs = hh[None, :] + SIGN * dy[:, None]
    ws = ww[None, :] + SIGN * dx[:, None]
    valid = (t < KS * KS)[:, None] & nmask[None, :] & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
    return tl.load(base_ptr + hs * W + ws, mask=valid, other=0.0)


@triton.jit
def _branch(s_ptr, hh, ww, nmask, H, W, N, w_ptr, b_ptr, KS: tl.constexpr, DIL: tl.constexpr, TB: tl.constexpr,
            ACC: tl.constexpr):
    """One branch convolution (with bias) of the two descriptor maps over a pixel tile, and the two tap tiles."""
    t = tl.arange(0, TB)
    tmask = t < KS * KS
    s0 = _taps(s_ptr, hh, ww, nmask, H, W, KS, DIL, TB, 1)
    s1 = _taps(s_ptr + N, hh, ww, nmask, H, W, KS, DIL, TB, 1)
    w0 = tl.load(w_ptr + t, mask=tmask, other=0.0).to(ACC)
    w1 = tl.load(w_ptr + KS * KS + t, mask=tmask, other=0.0).to(ACC)
    value = tl.sum(w0[:, None] * s0 + w1[:, None] * s1, axis=0) + tl.load(b_ptr).to(ACC)
    return value, s0, s1


@triton.jit
def _logit(s_ptr, hh, ww, nmask, H, W, N, rw, w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr,
           K: tl.constexpr, KB: tl.constexpr, KS0: tl.constexpr, KS1: tl.constexpr, KS2: tl.constexpr,
           KS3: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
           TB0: tl.constexpr, TB1: tl.constexpr, TB2: tl.constexpr, TB3: tl.constexpr, ACC: tl.constexpr):
    """``sum_k r_k * conv_k(s)`` over a pixel tile (up to four branches)."""
    value, _, _ = _branch(s_ptr, hh, ww, nmask, H, W, N, w0_ptr, b0_ptr, KS0, D0, TB0, ACC)
    logit = 0.0 + _pick(rw, 0, KB) * value
    if K > 1:
        value, _, _ = _branch(s_ptr, hh, ww, nmask, H, W, N, w1_ptr, b1_ptr, KS1, D1, TB1, ACC)
        logit = logit + _pick(rw, 1, KB) * value
    if K > 2:
        value, _, _ = _branch(s_ptr, hh, ww, nmask, H, W, N, w2_ptr, b2_ptr, KS2, D2, TB2, ACC)
        logit = logit + _pick(rw, 2, KB) * value
    if K > 3:
        value, _, _ = _branch(s_ptr, hh, ww, nmask, H, W, N, w3_ptr, b3_ptr, KS3, D3, TB3, ACC)
        logit = logit + _pick(rw, 3, KB) * value
    return logit


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
def _branch_backward(s_ptr, hh, ww, nmask, H, W, N, g_logit, r_k, w_ptr, b_ptr,
                     KS: tl.constexpr, DIL: tl.constexpr, TB: tl.constexpr, ACC: tl.constexpr):
    """One branch on a pixel tile: its value (for the router's gradient) and the tile's parts of the gradients of its
    two kernel planes and its bias."""
    value, s0, s1 = _branch(s_ptr, hh, ww, nmask, H, W, N, w_ptr, b_ptr, KS, DIL, TB, ACC)
    g_branch = tl.where(nmask, r_k * g_logit, 0.0)
    return value, tl.sum(s0 * g_branch[None, :], axis=1), tl.sum(s1 * g_branch[None, :], axis=1), tl.sum(
        g_branch, axis=0)


@triton.jit
def _branch_transpose(glogit_ptr, hh, ww, nmask, H, W, r_k, w_ptr, KS: tl.constexpr, DIL: tl.constexpr,
                      TB: tl.constexpr, ACC: tl.constexpr):
    """The gradient of both descriptor maps through one branch: the transposed convolution of ``r_k * g_logit``."""
    t = tl.arange(0, TB)
    tmask = t < KS * KS
    g = _taps(glogit_ptr, hh, ww, nmask, H, W, KS, DIL, TB, -1)
    w0 = tl.load(w_ptr + t, mask=tmask, other=0.0).to(ACC)
    w1 = tl.load(w_ptr + KS * KS + t, mask=tmask, other=0.0).to(ACC)
    return r_k * tl.sum(w0[:, None] * g, axis=0), r_k * tl.sum(w1[:, None] * g, axis=0)


@triton.jit
def _store_taps(ptr, gw0, gw1, KS: tl.constexpr, TB: tl.constexpr):
    t = tl.arange(0, TB)
    tl.store(ptr + t, gw0, mask=t < KS * KS)
    tl.store(ptr + KS * KS + t, gw1, mask=t < KS * KS)


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


@triton.jit
def _grad_y(v, g, ca, sa, gs0, gs1, s1, ties, alpha, C, HAS_ALPHA: tl.constexpr, XDT: tl.constexpr):
    """The gradient of ``y = x * ca`` on a tile: through ``y * sa`` and through the mean and max over C."""
    y = _round(v * ca[:, None], XDT)
    if HAS_ALPHA:
        g = alpha * g
    at_max = tl.where(y == s1[None, :], 1.0, 0.0)
    return g * sa[None, :] + (gs0 / C)[None, :] + (gs1 / ties)[None, :] * at_max


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
