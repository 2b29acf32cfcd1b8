/* Fused CPU kernels for the heavy passes of CBAMResidualDynamicSA (see _native.py, which compiles and loads them).
 *
 * Compiled once per scalar type: -DSCALAR=float -DSUFFIX=f32 and -DSCALAR=double -DSUFFIX=f64. Tensors are
 * contiguous NCHW, seen as (B, C, P) with P = H * W. Sums accumulate in double; maxima propagate NaN as torch.amax
 * does. Every loop has a fixed order (static OpenMP schedule, one writer per output), so results are bitwise
 * reproducible for a given thread count.
 *
 * Forward:
 *   pool_hw:   mean[b, c] = mean_p x,  max[b, c] = max_p x                          one read of x
 *   pool_c:    s[b, 0, p] = mean_c x * ca,  s[b, 1, p] = max_c x * ca               one read of x
 *   blend:     out = (x * ca) * sa                    (alpha: (x * ca) * (alpha * sa) + (1 - alpha) * x)
 * Max gradients split evenly among ties, as torch.amax's: tie * grad / ties, written as a product so that a set
 * with no tie (its max is NaN) gets 0 * inf = NaN, as torch.amax's gradient does.
 * Backward (first order):
 *   blend_reduce: t = g * x;  gsa[b, p] = sum_c t * ca;  gca[b, c] = sum_p t * sa;  gsum[b, c] = sum_p t
 *   pool_c_reduce: count[b, p] = #c with x * ca == smax;  gca[b, c] = sum_p (cmean[p] + tie * cmax[p] / count) * x
 *   grad_x:    gx = g * ((x * 0 + ca * sa) * alpha + (1 - alpha))            (blend, if g is given)
 *                 + (cmean[p] + tie_c * cmax[p] / count[p]) * ca             (pool over C, if cmean is given)
 *                 + hmean[b, c] + tie_hw * hmax[b, c] / count_hw             (pool over H, W, if hmean is given)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SUFFIX)

#define TILE 256
#define BLOCK 32
#define CHUNK 1024

/* The larger of m and v, NaN if either is (as torch.amax): for the exact result after the fast loops. */
static inline SCALAR FN(max_nan)(SCALAR m, SCALAR v) { return (v > m || v != v) ? v : m; }
/* The larger of m and v, ignoring a NaN v: the fast loops' maximum. A NaN makes the sum NaN, and a NaN sum
   sends its column to the exact loop, so NaN still propagates. */
static inline SCALAR FN(max_fast)(SCALAR m, SCALAR v) { return v > m ? v : m; }

void FN(pool_hw)(const SCALAR *x, SCALAR *mean, SCALAR *max, int64_t planes, int64_t count, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t plane = 0; plane < planes; ++plane) {
        const SCALAR *v = x + plane * count;
        double total = 0;
        SCALAR best = v[0];
        for (int64_t start = 0; start < count; start += CHUNK) {  /* SCALAR sums per chunk, then double */
            const int64_t end = start + CHUNK < count ? start + CHUNK : count;
            SCALAR part = 0;
#pragma omp simd reduction(+ : part)
            for (int64_t i = start; i < end; ++i) part += v[i];
#pragma omp simd reduction(max : best)
            for (int64_t i = start; i < end; ++i) best = FN(max_fast)(best, v[i]);  /* the chunk is in L1 now */
            total += part;
        }
        if (total != total)
            for (int64_t i = 0; i < count; ++i) best = FN(max_nan)(best, v[i]);
        mean[plane] = (SCALAR)(total / (double)count);
        max[plane] = best;
    }
}

void FN(pool_c)(const SCALAR *x, const SCALAR *ca, SCALAR *s, int64_t batch, int64_t channels, int64_t count,
                int threads) {
    const int64_t tiles = (count + TILE - 1) / TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < batch * tiles; ++task) {
        const int64_t b = task / tiles, start = (task % tiles) * TILE;
        const int64_t n = count - start < TILE ? count - start : TILE;
        const SCALAR *xb = x + b * channels * count + start;
        const SCALAR *w = ca + b * channels;
        double sum[TILE];
        SCALAR part[TILE], top[TILE];
        for (int64_t i = 0; i < n; ++i) {
            sum[i] = 0;
            top[i] = xb[i] * w[0];
        }
        /* Blocks of BLOCK channels sum in SCALAR (four rows at a time), then into the double total. */
        for (int64_t c0 = 0; c0 < channels; c0 += BLOCK) {
            const int64_t end = c0 + BLOCK < channels ? c0 + BLOCK : channels;
            for (int64_t i = 0; i < n; ++i) part[i] = 0;
            int64_t c = c0;
            for (; c + 4 <= end; c += 4) {
                const SCALAR *r0 = xb + c * count, *r1 = r0 + count, *r2 = r1 + count, *r3 = r2 + count;
                const SCALAR w0 = w[c], w1 = w[c + 1], w2 = w[c + 2], w3 = w[c + 3];
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) {
                    const SCALAR v0 = r0[i] * w0, v1 = r1[i] * w1, v2 = r2[i] * w2, v3 = r3[i] * w3;
                    part[i] += (v0 + v1) + (v2 + v3);
                    top[i] = FN(max_fast)(FN(max_fast)(top[i], FN(max_fast)(v0, v1)), FN(max_fast)(v2, v3));
                }
            }
            for (; c < end; ++c) {
                const SCALAR *row = xb + c * count;
                const SCALAR wc = w[c];
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) {
                    const SCALAR v = row[i] * wc;
                    part[i] += v;
                    top[i] = FN(max_fast)(top[i], v);
                }
            }
            for (int64_t i = 0; i < n; ++i) sum[i] += part[i];
        }
        for (int64_t i = 0; i < n; ++i)
            if (sum[i] != sum[i])
                for (int64_t c = 0; c < channels; ++c) top[i] = FN(max_nan)(top[i], xb[c * count + i] * w[c]);
        SCALAR *mean_out = s + b * 2 * count + start, *max_out = mean_out + count;
        for (int64_t i = 0; i < n; ++i) {
            mean_out[i] = (SCALAR)(sum[i] / (double)channels);
            max_out[i] = top[i];
        }
    }
}

void FN(blend)(const SCALAR *x, const SCALAR *ca, const SCALAR *sa, SCALAR *out, int64_t batch, int64_t channels,
               int64_t count, double alpha, int use_alpha, int threads) {
    const SCALAR a = (SCALAR)alpha, keep = (SCALAR)(1.0 - alpha);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t plane = 0; plane < batch * channels; ++plane) {
        const SCALAR *v = x + plane * count, *m = sa + (plane / channels) * count;
        SCALAR *o = out + plane * count;
        const SCALAR w = ca[plane];
        if (use_alpha) {
            for (int64_t i = 0; i < count; ++i) o[i] = (v[i] * w) * (a * m[i]) + keep * v[i];
        } else {
            for (int64_t i = 0; i < count; ++i) o[i] = (v[i] * w) * m[i];
        }
    }
}

/* Backward of blend, the reductions: t = g * x; gsa[b, p] = sum_c t * ca; gca[b, c] = sum_p t * sa; and, if gsum
   is given, gsum[b, c] = sum_p t. */
void FN(blend_grad)(const SCALAR *g, const SCALAR *x, const SCALAR *ca, const SCALAR *sa, SCALAR *gsa, SCALAR *gca,
                    SCALAR *gsum, int64_t batch, int64_t channels, int64_t count, int threads) {
#pragma omp parallel num_threads(threads)
    {
        double *acc = malloc(sizeof(double) * (size_t)count);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            const SCALAR *m = sa + b * count;
            for (int64_t i = 0; i < count; ++i) acc[i] = 0;
            for (int64_t c = 0; c < channels; ++c) {
                const int64_t plane = b * channels + c;
                const SCALAR *gv = g + plane * count, *xv = x + plane * count;
                const SCALAR w = ca[plane];
                double by_sa = 0, plain = 0;
#pragma omp simd reduction(+ : by_sa, plain)
                for (int64_t i = 0; i < count; ++i) {
                    const SCALAR t = gv[i] * xv[i];
                    acc[i] += t * w;
                    by_sa += t * m[i];
                    plain += t;
                }
                gca[plane] = (SCALAR)by_sa;
                if (gsum) gsum[plane] = (SCALAR)plain;
            }
            for (int64_t i = 0; i < count; ++i) gsa[b * count + i] = (SCALAR)acc[i];
        }
        free(acc);
    }
}

/* Backward of pool_c, the reductions. With y = x * ca, count[p] = #c with y == smax[p] and
   coef[b, p] = gmax[b, p] / count[p] (written out); gca[b, c] = sum_p (cmean[b, p] + (y == smax) * coef) * x. */
void FN(pool_c_grad)(const SCALAR *x, const SCALAR *ca, const SCALAR *smax, const SCALAR *cmean, const SCALAR *gmax,
                     SCALAR *coef, SCALAR *gca, int64_t batch, int64_t channels, int64_t count, int threads) {
#pragma omp parallel num_threads(threads)
    {
        SCALAR *ties = malloc(sizeof(SCALAR) * (size_t)count);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            const SCALAR *top = smax + b * count, *mean = cmean + b * count;
            SCALAR *k = coef + b * count;
            for (int64_t i = 0; i < count; ++i) ties[i] = 0;
            for (int64_t c = 0; c < channels; ++c) {
                const SCALAR *xv = x + (b * channels + c) * count;
                const SCALAR w = ca[b * channels + c];
#pragma omp simd
                for (int64_t i = 0; i < count; ++i) ties[i] += xv[i] * w == top[i] ? 1 : 0;
            }
            for (int64_t i = 0; i < count; ++i) k[i] = gmax[b * count + i] / ties[i];
            for (int64_t c = 0; c < channels; ++c) {
                const SCALAR *xv = x + (b * channels + c) * count;
                const SCALAR w = ca[b * channels + c];
                double total = 0;
#pragma omp simd reduction(+ : total)
                for (int64_t i = 0; i < count; ++i) total += (mean[i] + (SCALAR)(xv[i] * w == top[i]) * k[i]) * xv[i];
                gca[b * channels + c] = (SCALAR)total;
            }
        }
        free(ties);
    }
}

/* The gradient of x, every term in one pass (a NULL pointer leaves its term out):
     blend (g):            (g * ca) * sa, or with alpha: (g * ca) * (alpha * sa) + g * (1 - alpha)
     pool over C (cmean):  (cmean[p] + (x * ca == smax[p]) * coef[p]) * ca
     pool over H, W (hmean): hmean[b, c] + (x == hmax_at[b, c]) * hmax[b, c] / #ties in the plane
   and, if base is given, plus base. */
void FN(grad_x)(const SCALAR *g, const SCALAR *x, const SCALAR *ca, const SCALAR *sa, double alpha, int use_alpha,
                const SCALAR *cmean, const SCALAR *coef, const SCALAR *smax, const SCALAR *hmean, const SCALAR *hmax,
                const SCALAR *hmax_at, const SCALAR *base, SCALAR *out, int64_t batch, int64_t channels,
                int64_t count, int threads) {
    const SCALAR keep = (SCALAR)(1.0 - alpha);
#pragma omp parallel num_threads(threads)
    {
        SCALAR *scaled = malloc(sizeof(SCALAR) * (size_t)count);
#pragma omp for schedule(static)
        for (int64_t plane = 0; plane < batch * channels; ++plane) {
            const int64_t b = plane / channels, offset = plane * count;
            const SCALAR *xv = x + offset, *m = sa ? sa + b * count : 0;
            const SCALAR w = ca ? ca[plane] : 0;
            SCALAR *o = out + offset;
            if (base) {
#pragma omp simd
                for (int64_t i = 0; i < count; ++i) o[i] = base[offset + i];
            } else {
#pragma omp simd
                for (int64_t i = 0; i < count; ++i) o[i] = 0;
            }
            if (g) {
                const SCALAR *gv = g + offset;
                if (use_alpha) {
#pragma omp simd
                    for (int64_t i = 0; i < count; ++i) scaled[i] = (SCALAR)alpha * m[i];
#pragma omp simd
                    for (int64_t i = 0; i < count; ++i) o[i] += (gv[i] * w) * scaled[i] + gv[i] * keep;
                } else {
#pragma omp simd
                    for (int64_t i = 0; i < count; ++i) o[i] += (gv[i] * w) * m[i];
                }
            }
            if (cmean) {
                const SCALAR *mean = cmean + b * count, *k = coef + b * count, *top = smax + b * count;
#pragma omp simd
                for (int64_t i = 0; i < count; ++i) o[i] += (mean[i] + (SCALAR)(xv[i] * w == top[i]) * k[i]) * w;
            }
            if (hmean) {
                const SCALAR at = hmax_at[plane];
                SCALAR ties = 0;
#pragma omp simd reduction(+ : ties)
                for (int64_t i = 0; i < count; ++i) ties += (SCALAR)(xv[i] == at);
                /* 0 * share is NaN when there is no tie (share = x / 0), as tie * share would give */
                const SCALAR share = hmax[plane] / ties, elsewhere = 0 * share, mean = hmean[plane];
#pragma omp simd
                for (int64_t i = 0; i < count; ++i) o[i] += mean + (xv[i] == at ? share : elsewhere);
            }
        }
        free(scaled);
    }
}

/* Convolution by taps: out[b, i, j] = sum_t w[b, t] * s[b, c_t, i + dy_t, j + dx_t] (zero outside the map), with
   taps[t] = (c_t, dy_t, dx_t): every spatial branch, at any dilation, merged into one list with per-sample weights.
   out is (B, H, W); rows are independent tasks. */
void FN(tap_conv)(const SCALAR *s, const SCALAR *w, const int64_t *taps, SCALAR *out, int64_t batch,
                  int64_t channels, int64_t height, int64_t width, int64_t ntaps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < batch * height; ++task) {
        const int64_t b = task / height, i = task % height;
        SCALAR *o = out + task * width;
        for (int64_t j = 0; j < width; ++j) o[j] = 0;
        for (int64_t t = 0; t < ntaps; ++t) {
            const int64_t c = taps[3 * t], dy = taps[3 * t + 1], dx = taps[3 * t + 2], r = i + dy;
            if (r < 0 || r >= height) continue;
            const int64_t j0 = dx < 0 ? -dx : 0, j1 = dx > 0 ? width - dx : width;
            const SCALAR *row = s + ((b * channels + c) * height + r) * width + dx;
            const SCALAR wt = w[b * ntaps + t];
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) o[j] += wt * row[j];
        }
    }
}

/* Gradient of tap_conv's input: gs[b, c, r, k] = sum over taps t of channel c of w[b, t] * g[b, r - dy_t, k - dx_t].
   Rows of gs are independent tasks. */
void FN(tap_conv_grad_s)(const SCALAR *g, const SCALAR *w, const int64_t *taps, SCALAR *gs, int64_t batch,
                         int64_t channels, int64_t height, int64_t width, int64_t ntaps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < batch * channels * height; ++task) {
        const int64_t b = task / (channels * height), c = (task / height) % channels, r = task % height;
        SCALAR *o = gs + task * width;
        for (int64_t k = 0; k < width; ++k) o[k] = 0;
        for (int64_t t = 0; t < ntaps; ++t) {
            const int64_t dy = taps[3 * t + 1], dx = taps[3 * t + 2], i = r - dy;
            if (taps[3 * t] != c || i < 0 || i >= height) continue;
            const int64_t k0 = dx > 0 ? dx : 0, k1 = dx < 0 ? width + dx : width;
            const SCALAR *row = g + (b * height + i) * width - dx;
            const SCALAR wt = w[b * ntaps + t];
#pragma omp simd
            for (int64_t k = k0; k < k1; ++k) o[k] += wt * row[k];
        }
    }
}

/* Gradient of tap_conv's weights: gw[b, t] = sum_{i, j} g[b, i, j] * s[b, c_t, i + dy_t, j + dx_t]. */
void FN(tap_conv_grad_w)(const SCALAR *g, const SCALAR *s, const int64_t *taps, SCALAR *gw, int64_t batch,
                         int64_t channels, int64_t height, int64_t width, int64_t ntaps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < batch * ntaps; ++task) {
        const int64_t b = task / ntaps, t = task % ntaps;
        const int64_t c = taps[3 * t], dy = taps[3 * t + 1], dx = taps[3 * t + 2];
        const int64_t i0 = dy < 0 ? -dy : 0, i1 = dy > 0 ? height - dy : height;
        const int64_t j0 = dx < 0 ? -dx : 0, j1 = dx > 0 ? width - dx : width;
        double total = 0;
        for (int64_t i = i0; i < i1; ++i) {
            const SCALAR *grow = g + (b * height + i) * width;
            const SCALAR *srow = s + ((b * channels + c) * height + i + dy) * width + dx;
#pragma omp simd reduction(+ : total)
            for (int64_t j = j0; j < j1; ++j) total += grow[j] * srow[j];
        }
        gw[task] = (SCALAR)total;
    }
}
