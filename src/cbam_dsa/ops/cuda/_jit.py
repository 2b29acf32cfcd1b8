"""The ``@triton.jit`` helpers of the block's kernels (:mod:`.kernels`, :mod:`.kernels_backward_spatial`,
:mod:`.kernels_backward_channel`).

Everything is computed in ``ACC`` (float32, float64 for float64 inputs); the full-size products are rounded to
``XDT`` (the input's dtype) after each step, as the reference's tensors are (:func:`_round`).

Non-finite values spread as in the reference: maxima use ``_max_nan`` and ``_max_reduce`` (``torch.amax`` keeps
NaN), ReLU is ``where(z < 0, 0, z)`` (keeps NaN), padded lanes are zeroed before every cross-lane sum, and a max's
gradient is ``(g / count) * mask`` as in autograd (NaN where the count is 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

# The codes of the GATE and ACT constexprs (block.py passes them).
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
# Backward helpers.


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
def _grad_y(v, g, ca, sa, gs0, gs1, s1, ties, alpha, C, HAS_ALPHA: tl.constexpr, XDT: tl.constexpr):
    """The gradient of ``y = x * ca`` on a tile: through ``y * sa`` and through the mean and max over C."""
    y = _round(v * ca[:, None], XDT)
    if HAS_ALPHA:
        g = alpha * g
    at_max = tl.where(y == s1[None, :], 1.0, 0.0)
    return g * sa[None, :] + (gs0 / C)[None, :] + (gs1 / ties)[None, :] * at_max
