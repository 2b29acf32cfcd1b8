/* Fused CPU kernels for the heavy passes of CBAMResidualDynamicSA (build.py compiles, verifies and loads them).
 *
 * Compiled once per scalar type: -DSCALAR=float -DSUFFIX=f32 and -DSCALAR=double -DSUFFIX=f64. Tensors are
 * contiguous NCHW, seen as (B, C, P) with P = H * W; x, the output, its gradient and x's gradient may instead be
 * channels_last (B, P, C), which the passes over them read as they are (the _nhwc functions, dims[15], chosen in
 * one place: passes_for). Long sums accumulate in SCALAR over short blocks, then in double; maxima propagate NaN as
 * torch.amax does. Every loop has a fixed order (static OpenMP schedule, one writer per output), so results are
 * bitwise reproducible for a given thread count.
 *
 * The exported entry points of the fused block are block_forward and block_backward (at the end): the whole block,
 * channel MLP included (small matrix products), from its own tensors, in one call each way. They run either each
 * stage over the whole batch on all threads, or the batch in chunks of a few samples, each chunk from start to end
 * on one thread (its slice of x is then read from memory once and from the cache after that). They return a
 * status: STATUS_OK (0), STATUS_NO_MEMORY (an allocation failed, also inside a parallel region) or
 * STATUS_BAD_ARGUMENT (a dimension not positive, a chunk longer than the batch, or sizes that overflow); the caller
 * raises for a nonzero one. No array on the stack is sized by the input.
 *
 * Non-finite values spread as through the reference (PyTorch autograd over functional.py): ReLU keeps NaN and its
 * backward passes the gradient where the output is NaN (threshold_backward), maxima are NaN where any value is,
 * their gradients NaN where no value attains a NaN maximum, the blend is x + alpha * (y - x), and the branch
 * kernels' gradients include the products with the zero padding where the gradient holds a NaN or an infinity.
 *
 * Forward:
 *   pool_hw:   mean[b, c] = mean_p x,  max[b, c] = max_p x                          one read of x
 *              (planes shorter than SHORT_PLANE, 7 x 7 maps say, eight at a time: pool_hw_short)
 *   pool_c:    s[b, 0, p] = mean_c x * ca,  s[b, 1, p] = max_c x * ca               one read of x
 *   blend:     out = (x * ca) * sa                    (alpha: x + alpha * ((x * ca) * sa - x))
 * Max gradients split evenly among ties, as torch.amax's: tie * grad / ties, written as a product so that a set
 * with no tie (its max is NaN) gets 0 * inf = NaN, as torch.amax's gradient does.
 * Backward (first order):
 *   blend_grad: t = g * x;  gsa[b, p] = sum_c t * ca;  gca[b, c] = sum_p t * sa;  gsum[b, c] = sum_p t;
 *              count[b, p] = #c with x * ca == smax (and pool_hw again where the forward did not keep it)
 *   pool_c_grad: gca[b, c] = sum_p (cmean[p] + tie * cmax[p] / count) * x
 *              (both on short planes eight at a time, as pool_hw: blend_grad_short, pool_c_grad_short)
 *   grad_x:    gx = g * ((x * 0 + ca * sa) * alpha + (1 - alpha))            (blend, if g is given)
 *                 + (cmean[p] + tie_c * cmax[p] / count[p]) * ca             (pool over C, if cmean is given)
 *                 + hmean[b, c] + tie_hw * hmax[b, c] / count_hw             (pool over H, W, if hmean is given)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SUFFIX)

#define TILE 256
#define BLOCK 32
#define CHUNK 1024

#define LANES 8
/* LANES values as one vector (GCC and Clang vector extensions); loads by VLOAD and stores through a VEC pointer need
   no alignment (the type is aligned as one SCALAR). */
typedef SCALAR FN(vec) __attribute__((vector_size(LANES * sizeof(SCALAR)), aligned(sizeof(SCALAR)), may_alias));
#define VEC FN(vec)
#define VLOAD(p) (*(const VEC *)(p))
/* the same bytes as integers, for masks */
typedef long long FN(bits) __attribute__((vector_size(LANES * sizeof(SCALAR)), may_alias));

/* the same bytes as integers of SCALAR's width: what a comparison of two vectors gives */
typedef __typeof__((VEC){0} < (VEC){0}) FN(mask);
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (FN(mask)){__VA_ARGS__})
#endif

/* The lanes of a and b, the larger of each pair (a's where b's is NaN: the fast loops' maximum, max_fast); a and b
   are evaluated more than once. (Macros and pointers here: a vector wider than the target's registers passed or
   returned by value would change the calling convention.) */
#define VMAX(a, b) ((VEC)((((FN(mask))(b)) & ((b) > (a))) | (((FN(mask))(a)) & ~((b) > (a)))))
#define VADD(a, b) ((a) + (b))

/* Eight vectors' lanes reduced, one value per vector: out = {sum a[0], ..., sum a[7]} (or the maxima), in three
   rounds of pairwise shuffles, where eight separate horizontal reductions take several times as long. */
#define REDUCE8(name, op)                                                                                 \
    static inline void FN(name)(const VEC *a, VEC *out) {                                                 \
        VEC p[4], q[2];                                                                                   \
        for (int k = 0; k < 4; ++k) {                                                                     \
            const VEC even = SHUFFLE(a[2 * k], a[2 * k + 1], 0, 8, 2, 10, 4, 12, 6, 14);                  \
            const VEC odd = SHUFFLE(a[2 * k], a[2 * k + 1], 1, 9, 3, 11, 5, 13, 7, 15);                   \
            p[k] = op(even, odd);                                                                         \
        }                                                                                                 \
        for (int k = 0; k < 2; ++k) {                                                                     \
            const VEC low = SHUFFLE(p[2 * k], p[2 * k + 1], 0, 1, 8, 9, 4, 5, 12, 13);                    \
            const VEC high = SHUFFLE(p[2 * k], p[2 * k + 1], 2, 3, 10, 11, 6, 7, 14, 15);                 \
            q[k] = op(low, high);                                                                         \
        }                                                                                                 \
        const VEC low = SHUFFLE(q[0], q[1], 0, 1, 2, 3, 8, 9, 10, 11);                                    \
        const VEC high = SHUFFLE(q[0], q[1], 4, 5, 6, 7, 12, 13, 14, 15);                                 \
        *out = op(low, high);                                                                             \
    }
REDUCE8(sums8, VADD)
REDUCE8(maxes8, VMAX)

/* The status the two entry points return (the internal functions that allocate return it too). */
#define STATUS_OK 0
#define STATUS_NO_MEMORY 1    /* an allocation failed: nothing is left allocated, the outputs are incomplete */
#define STATUS_BAD_ARGUMENT 2 /* a dimension is negative, or the sizes overflow */

/* Every function but the two entry points is internal (static). */

/* n elements of the given size, NULL when n is negative or the byte count overflows (a NULL is checked as any
   failed allocation). At least one byte, so that a zero-size request is not mistaken for a failure. */
static void *alloc_array(int64_t n, size_t size) {
    if (n < 0 || (uint64_t)n > SIZE_MAX / size) return NULL;
    return malloc((size_t)n * size > 0 ? (size_t)n * size : 1);
}
#define NEW(type, n) ((type *)alloc_array((int64_t)(n), sizeof(type)))

/* The larger of m and v, NaN if either is (as torch.amax): for the exact result after the fast loops. */
static inline SCALAR FN(max_nan)(SCALAR m, SCALAR v) { return (v > m || v != v) ? v : m; }
/* The larger of m and v, ignoring a NaN v: the fast loops' maximum. A NaN makes the sum NaN, and a NaN sum
   sends its column to the exact loop, so NaN still propagates. */
static inline SCALAR FN(max_fast)(SCALAR m, SCALAR v) { return v > m ? v : m; }

/* Planes of fewer values than this (7 x 7 maps, say) are reduced eight at a time: a plane's few vectors cost less
   than its horizontal reductions otherwise. */
#define SHORT_PLANE 128

/* One vector of lanes, each the value v: how a scalar becomes a vector (GCC and Clang broadcast it). */
#define BROADCAST(v) ((VEC){0} + (v))

/* pool_hw for short planes: eight at a time, their vector sums and maxima reduced together (sums8, maxes8); the
   values past the last whole vector of a plane are summed one by one. */
static void FN(pool_hw_short)(const SCALAR *x, SCALAR *mean, SCALAR *max, int64_t planes, int64_t count,
                              int threads) {
    const int64_t groups = (planes + 7) / 8, full = count / LANES * LANES;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t group = 0; group < groups; ++group) {
        const int64_t first = group * 8, rows = planes - first < 8 ? planes - first : 8;
        VEC sums[8], tops[8], total, best;
        SCALAR rest[8], high[8];
        for (int64_t k = 0; k < 8; k += 2) { /* two planes at a time: four independent vector chains */
            /* the rows past the last plane repeat it (computed, never stored) */
            const SCALAR *u = x + (first + (k < rows ? k : rows - 1)) * count;
            const SCALAR *v = x + (first + (k + 1 < rows ? k + 1 : rows - 1)) * count;
            VEC su = {0}, sv = {0}, tu = BROADCAST(u[0]), tv = BROADCAST(v[0]);
            for (int64_t i = 0; i < full; i += LANES) {
                const VEC a = VLOAD(u + i), b = VLOAD(v + i);
                su += a;
                sv += b;
                tu = VMAX(tu, a);
                tv = VMAX(tv, b);
            }
            SCALAR ru = 0, rv = 0, hu = u[0], hv = v[0];
            for (int64_t i = full; i < count; ++i) {
                ru += u[i];
                rv += v[i];
                hu = FN(max_fast)(hu, u[i]);
                hv = FN(max_fast)(hv, v[i]);
            }
            sums[k] = su, sums[k + 1] = sv, tops[k] = tu, tops[k + 1] = tv;
            rest[k] = ru, rest[k + 1] = rv, high[k] = hu, high[k + 1] = hv;
        }
        FN(sums8)(sums, &total);
        FN(maxes8)(tops, &best);
        for (int64_t k = 0; k < rows; ++k) {
            const SCALAR *v = x + (first + k) * count;
            const double sum = (double)(total[k] + rest[k]);
            SCALAR top = FN(max_fast)(best[k], high[k]);
            if (sum != sum) /* as pool_hw: a NaN sum sends the maximum to the exact loop */
                for (int64_t i = 0; i < count; ++i) top = FN(max_nan)(top, v[i]);
            mean[first + k] = (SCALAR)(sum / (double)count);
            max[first + k] = top;
        }
    }
}

static void FN(pool_hw)(const SCALAR *x, SCALAR *mean, SCALAR *max, int64_t planes, int64_t count, int threads) {
    if (count < SHORT_PLANE) {
        FN(pool_hw_short)(x, mean, max, planes, count, threads);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t plane = 0; plane < planes; ++plane) {
        const SCALAR *v = x + plane * count;
        double total = 0;
        SCALAR best = v[0];
        for (int64_t start = 0; start < count; start += CHUNK) {  /* SCALAR sums per chunk, then double */
            const int64_t end = start + CHUNK < count ? start + CHUNK : count;
            SCALAR part = 0;
#pragma omp simd reduction(+ : part) reduction(max : best)
            for (int64_t i = start; i < end; ++i) {
                part += v[i];
                best = FN(max_fast)(best, v[i]);
            }
            total += part;
        }
        if (total != total)
            for (int64_t i = 0; i < count; ++i) best = FN(max_nan)(best, v[i]);
        mean[plane] = (SCALAR)(total / (double)count);
        max[plane] = best;
    }
}

static void FN(pool_c)(const SCALAR *x, const SCALAR *ca, SCALAR *s, int64_t batch, int64_t channels, int64_t count,
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

static void FN(blend)(const SCALAR *x, const SCALAR *ca, const SCALAR *sa, SCALAR *out, int64_t batch, int64_t channels,
               int64_t count, double alpha, int use_alpha, int threads) {
    const SCALAR a = (SCALAR)alpha;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t plane = 0; plane < batch * channels; ++plane) {
        const SCALAR *v = x + plane * count, *m = sa + (plane / channels) * count;
        SCALAR *o = out + plane * count;
        const SCALAR w = ca[plane];
        if (use_alpha) { /* the reference's x + alpha * (y - x): an infinite x gives inf - inf = NaN there too */
            for (int64_t i = 0; i < count; ++i) o[i] = v[i] + a * ((v[i] * w) * m[i] - v[i]);
        } else {
            for (int64_t i = 0; i < count; ++i) o[i] = (v[i] * w) * m[i];
        }
    }
}

/* Backward of blend, the reductions: t = g * x; gsa[b, p] = sum_c t * ca; gca[b, c] = sum_p t * sa; and, if gsum
   is given, gsum[b, c] = sum_p t; with top (B, P), the maximum over C of x * ca, also ties[b, p] = #c with
   x * ca == top[b, p] (for pool_c_grad, in the same pass). If hmean is given, also pool_hw's hmean[b, c] = mean_p x
   and hmax[b, c] = max_p x (for a backward whose forward did not keep them). Sums run in SCALAR over blocks of BLOCK
   channels or CHUNK pixels, then in double. */
/* the terms every variant of blend_grad's loop sums, pixel i of one channel */
#define BLEND_GRAD_TERMS                    \
    const SCALAR t = gv[i] * xv[i];         \
    part[i] += t * w;                       \
    s_sa += t * m[i];                       \
    s_plain += t;                           \
    tie[i] += xv[i] * w == best[i] ? 1 : 0
/* blend_grad's loop for up to eight planes of one sample's short map (fewer than SHORT_PLANE values), the planes
   first to first + rows - 1: their vector sums and maxima reduced together (sums8, maxes8), as pool_hw_short's. Adds
   each plane's terms to part and tie, and writes gca, gsum, hmean and hmax (the last three where given). */
static void FN(blend_grad_short)(const SCALAR *g, const SCALAR *x, const SCALAR *ca, const SCALAR *m,
                                 const SCALAR *best, SCALAR *part, SCALAR *tie, SCALAR *gca, SCALAR *gsum,
                                 SCALAR *hmean, SCALAR *hmax, int64_t first, int64_t rows, int64_t count) {
    const int64_t full = count / LANES * LANES;
    const FN(mask) one = (FN(mask))BROADCAST((SCALAR)1);
    VEC by_sa[8], plain[8], sum_x[8], high[8], total_sa, total_plain, total_x, top;
    SCALAR rest_sa[8], rest_plain[8], rest_x[8], rest_high[8];
    for (int64_t k = 0; k < 8; ++k) {
        VEC v_sa = {0}, v_plain = {0}, v_x = {0}, h = {0};
        SCALAR s_sa = 0, s_plain = 0, s_x = 0, s_high = 0;
        if (k < rows) { /* the rows past the last plane stay zero (never stored) */
            const SCALAR *gv = g + (first + k) * count, *xv = x + (first + k) * count;
            const SCALAR w = ca[first + k];
            const VEC wv = BROADCAST(w);
            h = BROADCAST(xv[0]), s_high = xv[0];
            for (int64_t i = 0; i < full; i += LANES) {
                const VEC xi = VLOAD(xv + i), t = VLOAD(gv + i) * xi;
                *(VEC *)(part + i) += t * wv;
                v_sa += t * VLOAD(m + i);
                v_plain += t;
                *(VEC *)(tie + i) += (VEC)(one & (xi * wv == VLOAD(best + i)));
                v_x += xi;
                h = VMAX(h, xi);
            }
            for (int64_t i = full; i < count; ++i) {
                BLEND_GRAD_TERMS;
                s_x += xv[i];
                s_high = FN(max_fast)(s_high, xv[i]);
            }
        }
        by_sa[k] = v_sa, plain[k] = v_plain, sum_x[k] = v_x, high[k] = h;
        rest_sa[k] = s_sa, rest_plain[k] = s_plain, rest_x[k] = s_x, rest_high[k] = s_high;
    }
    FN(sums8)(by_sa, &total_sa);
    FN(sums8)(plain, &total_plain);
    FN(sums8)(sum_x, &total_x);
    FN(maxes8)(high, &top);
    for (int64_t k = 0; k < rows; ++k) {
        const int64_t plane = first + k;
        gca[plane] = total_sa[k] + rest_sa[k];
        if (gsum) gsum[plane] = total_plain[k] + rest_plain[k];
        if (hmean) { /* as pool_hw: a NaN sum sends the maximum to the exact loop */
            const double sum = (double)(total_x[k] + rest_x[k]);
            SCALAR h = FN(max_fast)(top[k], rest_high[k]);
            if (sum != sum)
                for (int64_t i = 0; i < count; ++i) h = FN(max_nan)(h, x[plane * count + i]);
            hmean[plane] = (SCALAR)(sum / (double)count);
            hmax[plane] = h;
        }
    }
}

static int FN(blend_grad)(const SCALAR *g, const SCALAR *x, const SCALAR *ca, const SCALAR *sa, const SCALAR *top,
                    SCALAR *gsa, SCALAR *gca, SCALAR *gsum, SCALAR *ties, SCALAR *hmean, SCALAR *hmax,
                    int64_t batch, int64_t channels, int64_t count, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        double *acc = NEW(double, count);
        SCALAR *part = NEW(SCALAR, count);
        if (!acc || !part) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            if (!acc || !part) continue;
            const SCALAR *m = sa + b * count, *best = top + b * count;
            SCALAR *tie = ties + b * count;
            for (int64_t i = 0; i < count; ++i) acc[i] = 0;
            for (int64_t i = 0; i < count; ++i) tie[i] = 0;
            for (int64_t c0 = 0; c0 < channels; c0 += BLOCK) {
                const int64_t end = c0 + BLOCK < channels ? c0 + BLOCK : channels;
                for (int64_t i = 0; i < count; ++i) part[i] = 0;
                if (count < SHORT_PLANE) {
                    for (int64_t c = c0; c < end; c += 8)
                        FN(blend_grad_short)(g, x, ca, m, best, part, tie, gca, gsum, hmean, hmax, b * channels + c,
                                             end - c < 8 ? end - c : 8, count);
                    for (int64_t i = 0; i < count; ++i) acc[i] += part[i];
                    continue;
                }
                for (int64_t c = c0; c < end; ++c) {
                    const int64_t plane = b * channels + c;
                    const SCALAR *gv = g + plane * count, *xv = x + plane * count;
                    const SCALAR w = ca[plane];
                    double by_sa = 0, plain = 0, total = 0;
                    SCALAR high = xv[0];
                    for (int64_t start = 0; start < count; start += CHUNK) {
                        const int64_t stop = start + CHUNK < count ? start + CHUNK : count;
                        SCALAR s_sa = 0, s_plain = 0, s_x = 0;
                        if (hmean) {
#pragma omp simd reduction(+ : s_sa, s_plain, s_x) reduction(max : high)
                            for (int64_t i = start; i < stop; ++i) {
                                BLEND_GRAD_TERMS;
                                s_x += xv[i];
                                high = FN(max_fast)(high, xv[i]);
                            }
                        } else {
#pragma omp simd reduction(+ : s_sa, s_plain)
                            for (int64_t i = start; i < stop; ++i) {
                                BLEND_GRAD_TERMS;
                            }
                        }
                        by_sa += s_sa;
                        plain += s_plain;
                        total += s_x;
                    }
                    gca[plane] = (SCALAR)by_sa;
                    if (gsum) gsum[plane] = (SCALAR)plain;
                    if (hmean) { /* as pool_hw: a NaN sum sends the maximum to the exact loop */
                        if (total != total)
                            for (int64_t i = 0; i < count; ++i) high = FN(max_nan)(high, xv[i]);
                        hmean[plane] = (SCALAR)(total / (double)count);
                        hmax[plane] = high;
                    }
                }
                for (int64_t i = 0; i < count; ++i) acc[i] += part[i];
            }
            for (int64_t i = 0; i < count; ++i) gsa[b * count + i] = (SCALAR)acc[i];
        }
        free(acc);
        free(part);
    }
    return failed ? STATUS_NO_MEMORY : STATUS_OK;
}

/* pool_c_grad's sums for up to eight planes of a short map (the planes first to first + rows - 1 of one sample),
   their vector sums reduced together (sums8), as pool_hw_short's. */
static void FN(pool_c_grad_short)(const SCALAR *x, const SCALAR *ca, const SCALAR *top, const SCALAR *mean,
                                  const SCALAR *k, SCALAR *gca, int64_t first, int64_t rows, int64_t count) {
    const int64_t full = count / LANES * LANES;
    const FN(mask) one = (FN(mask))BROADCAST((SCALAR)1);
    VEC sums[8], total;
    SCALAR rest[8];
    for (int64_t r = 0; r < 8; ++r) {
        VEC part = {0};
        SCALAR tail = 0;
        if (r < rows) { /* the rows past the last plane stay zero (never stored) */
            const SCALAR *xv = x + (first + r) * count;
            const SCALAR w = ca[first + r];
            const VEC wv = BROADCAST(w);
            for (int64_t i = 0; i < full; i += LANES) {
                const VEC xi = VLOAD(xv + i);
                const VEC tie = (VEC)(one & (xi * wv == VLOAD(top + i)));
                part += (VLOAD(mean + i) + tie * VLOAD(k + i)) * xi;
            }
            for (int64_t i = full; i < count; ++i)
                tail += (mean[i] + (SCALAR)(xv[i] * w == top[i]) * k[i]) * xv[i];
        }
        sums[r] = part, rest[r] = tail;
    }
    FN(sums8)(sums, &total);
    for (int64_t r = 0; r < rows; ++r) gca[first + r] = total[r] + rest[r];
}

/* Backward of pool_c, the reductions. With y = x * ca, count[p] = #c with y == smax[p] (counted here, or given as
   counted, (B, P)) and coef[b, p] = gmax[b, p] / count[p] (written out); gca[b, c] = sum_p (cmean[b, p] + (y == smax)
   * coef) * x. */
static int FN(pool_c_grad)(const SCALAR *x, const SCALAR *ca, const SCALAR *smax, const SCALAR *cmean, const SCALAR *gmax,
                     const SCALAR *counted, SCALAR *coef, SCALAR *gca, int64_t batch, int64_t channels, int64_t count,
                     int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        SCALAR *ties = NEW(SCALAR, count);
        if (!ties) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            if (!ties) continue;
            const SCALAR *top = smax + b * count, *mean = cmean + b * count;
            SCALAR *k = coef + b * count;
            if (counted) {
                for (int64_t i = 0; i < count; ++i) ties[i] = counted[b * count + i];
            } else {
                for (int64_t i = 0; i < count; ++i) ties[i] = 0;
                for (int64_t c = 0; c < channels; ++c) {
                    const SCALAR *xv = x + (b * channels + c) * count;
                    const SCALAR w = ca[b * channels + c];
#pragma omp simd
                    for (int64_t i = 0; i < count; ++i) ties[i] += xv[i] * w == top[i] ? 1 : 0;
                }
            }
            for (int64_t i = 0; i < count; ++i) k[i] = gmax[b * count + i] / ties[i];
            if (count < SHORT_PLANE) {
                for (int64_t c = 0; c < channels; c += 8)
                    FN(pool_c_grad_short)(x, ca, top, mean, k, gca, b * channels + c,
                                          channels - c < 8 ? channels - c : 8, count);
                continue;
            }
            for (int64_t c = 0; c < channels; ++c) {
                const SCALAR *xv = x + (b * channels + c) * count;
                const SCALAR w = ca[b * channels + c];
                double total = 0;
                for (int64_t start = 0; start < count; start += CHUNK) {
                    const int64_t end = start + CHUNK < count ? start + CHUNK : count;
                    SCALAR part = 0;
#pragma omp simd reduction(+ : part)
                    for (int64_t i = start; i < end; ++i) part += (mean[i] + (SCALAR)(xv[i] * w == top[i]) * k[i]) * xv[i];
                    total += part;
                }
                gca[b * channels + c] = (SCALAR)total;
            }
        }
        free(ties);
    }
    return failed ? STATUS_NO_MEMORY : STATUS_OK;
}

/* The gradient of x, every term in one pass (a NULL pointer leaves its term out):
     blend (g):            (g * ca) * sa, or with alpha: (g * ca) * (alpha * sa) + g * (1 - alpha)
     pool over C (cmean):  (cmean[p] + (x * ca == smax[p]) * coef[p]) * ca
     pool over H, W (hmean): hmean[b, c] + (x == hmax_at[b, c]) * hmax[b, c] / #ties in the plane
   and, if base is given, plus base. */
static int FN(grad_x)(const SCALAR *g, const SCALAR *x, const SCALAR *ca, const SCALAR *sa, double alpha, int use_alpha,
                const SCALAR *cmean, const SCALAR *coef, const SCALAR *smax, const SCALAR *hmean, const SCALAR *hmax,
                const SCALAR *hmax_at, const SCALAR *base, SCALAR *out, int64_t batch, int64_t channels,
                int64_t count, int threads) {
    const SCALAR keep = (SCALAR)(1.0 - alpha);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        SCALAR *scaled = NEW(SCALAR, count);
        if (!scaled) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t plane = 0; plane < batch * channels; ++plane) {
            if (!scaled) continue;
            const int64_t b = plane / channels, offset = plane * count;
            const SCALAR *xv = x + offset, *m = sa ? sa + b * count : 0;
            const SCALAR w = ca ? ca[plane] : 0;
            SCALAR *o = out + offset;
            if (!base && g && cmean && hmean) {  /* the usual case: every term, in one loop, in the same order */
                const SCALAR *gv = g + offset, *mean = cmean + b * count, *k = coef + b * count;
                const SCALAR *top = smax + b * count, at = hmax_at[plane], a = (SCALAR)alpha;
                SCALAR ties = 0;
#pragma omp simd reduction(+ : ties)
                for (int64_t i = 0; i < count; ++i) ties += (SCALAR)(xv[i] == at);
                const SCALAR share = hmax[plane] / ties, elsewhere = 0 * share, hm = hmean[plane];
#pragma omp simd
                for (int64_t i = 0; i < count; ++i) {
                    SCALAR v = use_alpha ? (gv[i] * w) * (a * m[i]) + gv[i] * keep : (gv[i] * w) * m[i];
                    v += (mean[i] + (SCALAR)(xv[i] * w == top[i]) * k[i]) * w;
                    o[i] = v + (hm + (xv[i] == at ? share : elsewhere));
                }
                continue;
            }
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
    return failed ? STATUS_NO_MEMORY : STATUS_OK;
}

/* ---------------------------------------------------------------------------------------------------------------
   The same passes over channels_last tensors (dims[15] = 1): x, g, out and x's gradient laid out as (B, P, C), a
   pixel's C values contiguous; every small tensor (ca, sa, s, the descriptors) as in NCHW. Sums over C run along a
   pixel's row (SCALAR over NHWC_BLOCK channels, then double: one horizontal reduction per block); sums over P take a
   row of C at a time, in tasks of one sample's NHWC_TILE pixels each, kept per task in SCALAR and then added in
   double in the tiles' order, so results do not depend on the thread count. Maxima over P take max_fast as they go
   and are recomputed exactly where the mean is NaN (pool_hw_nhwc, as pool_hw), or are exact as they go (max_nan:
   blend_grad_nhwc's, for short maps). */
#define NHWC_TILE 64
#define NHWC_TILES(count) (((count) + NHWC_TILE - 1) / NHWC_TILE) /* the tasks of one sample */
#define NHWC_BLOCK 256

/* The tiles' partial sums (and maxima) over P, reduced per (b, c) in tile order: out[b, c] = sum of the tiles'
   parts (scaled by scale), top[b, c] = max_nan of their maxima (where given). A row of up to REDUCE_ROW channels at
   a time, a tile's row after the other, so that the loop over the channels is a vector one. */
#define REDUCE_ROW 64
static void FN(tiles_reduce)(const SCALAR *parts, const SCALAR *tops, SCALAR *out, SCALAR *top, int64_t batch,
                             int64_t tiles, int64_t channels, double scale, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t c0 = 0; c0 < channels; c0 += REDUCE_ROW) {
            const int64_t n = channels - c0 < REDUCE_ROW ? channels - c0 : REDUCE_ROW, first = b * tiles * channels + c0;
            double total[REDUCE_ROW];
            SCALAR high[REDUCE_ROW];
            for (int64_t i = 0; i < n; ++i) total[i] = 0, high[i] = tops ? tops[first + i] : 0;
            for (int64_t j = 0; j < tiles; ++j) {
                const SCALAR *row = parts + first + j * channels;
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) total[i] += row[i];
                if (tops) {
                    const SCALAR *peak = tops + first + j * channels;
                    for (int64_t i = 0; i < n; ++i) high[i] = FN(max_nan)(high[i], peak[i]);
                }
            }
            for (int64_t i = 0; i < n; ++i) out[b * channels + c0 + i] = (SCALAR)(total[i] * scale);
            if (top)
                for (int64_t i = 0; i < n; ++i) top[b * channels + c0 + i] = high[i];
        }
}

/* The task's sample and pixels: [start, end) of sample b. */
#define NHWC_TASK(task, tiles, count)                                                   \
    const int64_t b = (task) / (tiles), start = ((task) % (tiles)) * NHWC_TILE;         \
    const int64_t end = start + NHWC_TILE < (count) ? start + NHWC_TILE : (count)

/* pool_hw over (B, P, C): mean[b, c] = mean_p x, max[b, c] = max_p x (max_fast down the rows, then exact where the
   mean is NaN, as pool_hw). */
static int FN(pool_hw_nhwc)(const SCALAR *x, SCALAR *mean, SCALAR *max, int64_t batch, int64_t channels,
                            int64_t count, int threads) {
    const int64_t tiles = NHWC_TILES(count), C = channels;
    SCALAR *sums = NEW(SCALAR, batch * tiles * C), *tops = NEW(SCALAR, batch * tiles * C);
    if (!sums || !tops) {
        free(sums), free(tops);
        return STATUS_NO_MEMORY;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < batch * tiles; ++task) {
        NHWC_TASK(task, tiles, count);
        SCALAR *s = sums + task * C, *t = tops + task * C;
        const SCALAR *first = x + (b * count + start) * C;
        for (int64_t c = 0; c < C; ++c) s[c] = 0, t[c] = first[c];
        int64_t p = start;
        for (; p + 4 <= end; p += 4) { /* four rows at a time: a quarter of the partials' loads and stores */
            const SCALAR *r0 = x + (b * count + p) * C, *r1 = r0 + C, *r2 = r1 + C, *r3 = r2 + C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                s[c] += (r0[c] + r1[c]) + (r2[c] + r3[c]);
                t[c] = FN(max_fast)(FN(max_fast)(t[c], FN(max_fast)(r0[c], r1[c])), FN(max_fast)(r2[c], r3[c]));
            }
        }
        for (; p < end; ++p) {
            const SCALAR *row = x + (b * count + p) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                s[c] += row[c];
                t[c] = FN(max_fast)(t[c], row[c]);
            }
        }
    }
    FN(tiles_reduce)(sums, tops, mean, max, batch, tiles, C, 1.0 / (double)count, threads);
    free(sums), free(tops);
    /* as pool_hw: a NaN mean sends its channel's maximum to the exact loop (max_fast passed over a NaN) */
    for (int64_t i = 0; i < batch * C; ++i)
        if (mean[i] != mean[i]) {
            const SCALAR *column = x + (i / C) * count * C + i % C;
            SCALAR top = column[0];
            for (int64_t p = 1; p < count; ++p) top = FN(max_nan)(top, column[p * C]);
            max[i] = top;
        }
    return STATUS_OK;
}

/* pool_c over (B, P, C): s[b, 0, p] = mean_c x * ca, s[b, 1, p] = max_c x * ca. Eight pixels at a time, as
   pool_hw_short's planes: eight independent vector chains along their rows, their sums (per NHWC_BLOCK channels)
   and maxima reduced together (sums8, maxes8); the channels past the last whole vector are added one by one. */
static void FN(pool_c_nhwc)(const SCALAR *x, const SCALAR *ca, SCALAR *s, int64_t batch, int64_t channels,
                            int64_t count, int threads) {
    const int64_t tiles = NHWC_TILES(count), C = channels, full = C / LANES * LANES;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < batch * tiles; ++task) {
        NHWC_TASK(task, tiles, count);
        const SCALAR *w = ca + b * C;
        SCALAR *mean_out = s + b * 2 * count, *max_out = mean_out + count;
        for (int64_t p0 = start; p0 < end; p0 += 8) {
            const int64_t rows = end - p0 < 8 ? end - p0 : 8;
            const SCALAR *row[8];
            double sum[8] = {0};
            VEC tops[8], best;
            for (int64_t k = 0; k < 8; ++k) { /* the rows past the last pixel repeat it (computed, never stored) */
                row[k] = x + (b * count + p0 + (k < rows ? k : rows - 1)) * C;
                tops[k] = BROADCAST(row[k][0] * w[0]);
            }
            for (int64_t c0 = 0; c0 < full; c0 += NHWC_BLOCK) {
                const int64_t stop = c0 + NHWC_BLOCK < full ? c0 + NHWC_BLOCK : full;
                VEC parts[8], total;
                for (int64_t k = 0; k < 8; ++k) parts[k] = (VEC){0};
                for (int64_t c = c0; c < stop; c += LANES) {
                    const VEC wc = VLOAD(w + c);
                    for (int64_t k = 0; k < 8; ++k) {
                        const VEC v = VLOAD(row[k] + c) * wc;
                        parts[k] += v;
                        tops[k] = VMAX(tops[k], v);
                    }
                }
                FN(sums8)(parts, &total);
                for (int64_t k = 0; k < 8; ++k) sum[k] += total[k];
            }
            FN(maxes8)(tops, &best);
            for (int64_t k = 0; k < rows; ++k) {
                SCALAR rest = 0, top = best[k];
                for (int64_t c = full; c < C; ++c) {
                    const SCALAR v = row[k][c] * w[c];
                    rest += v;
                    top = FN(max_fast)(top, v);
                }
                const double total = sum[k] + rest;
                if (total != total) /* as pool_c: a NaN sum sends the maximum to the exact loop */
                    for (int64_t c = 0; c < C; ++c) top = FN(max_nan)(top, row[k][c] * w[c]);
                mean_out[p0 + k] = (SCALAR)(total / (double)C);
                max_out[p0 + k] = top;
            }
        }
    }
}

/* blend over (B, P, C). */
static void FN(blend_nhwc)(const SCALAR *x, const SCALAR *ca, const SCALAR *sa, SCALAR *out, int64_t batch,
                           int64_t channels, int64_t count, double alpha, int use_alpha, int threads) {
    const int64_t tiles = NHWC_TILES(count), C = channels;
    const SCALAR a = (SCALAR)alpha;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < batch * tiles; ++task) {
        NHWC_TASK(task, tiles, count);
        const SCALAR *w = ca + b * C;
        for (int64_t p = start; p < end; ++p) {
            const SCALAR *v = x + (b * count + p) * C, m = sa[b * count + p];
            SCALAR *o = out + (b * count + p) * C;
            if (use_alpha) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) o[c] = v[c] + a * ((v[c] * w[c]) * m - v[c]);
            } else {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) o[c] = (v[c] * w[c]) * m;
            }
        }
    }
}

/* blend_grad over (B, P, C): the same outputs as blend_grad's. */
static int FN(blend_grad_nhwc)(const SCALAR *g, const SCALAR *x, const SCALAR *ca, const SCALAR *sa,
                               const SCALAR *top, SCALAR *gsa, SCALAR *gca, SCALAR *gsum, SCALAR *ties,
                               SCALAR *hmean, SCALAR *hmax, int64_t batch, int64_t channels, int64_t count,
                               int threads) {
    const int64_t tiles = NHWC_TILES(count), C = channels, n = batch * tiles * C;
    /* per task: sum_p t * sa, sum_p t, sum_p x, max_p x */
    SCALAR *by_sa = NEW(SCALAR, n), *plain = NEW(SCALAR, n), *sum_x = NEW(SCALAR, n), *high = NEW(SCALAR, n);
    if (!by_sa || !plain || !sum_x || !high) {
        free(by_sa), free(plain), free(sum_x), free(high);
        return STATUS_NO_MEMORY;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < batch * tiles; ++task) {
        NHWC_TASK(task, tiles, count);
        const SCALAR *w = ca + b * C;
        SCALAR *ps = by_sa + task * C, *pp = plain + task * C, *px = sum_x + task * C, *ph = high + task * C;
        const SCALAR *first = x + (b * count + start) * C;
        for (int64_t c = 0; c < C; ++c) ps[c] = 0, pp[c] = 0, px[c] = 0, ph[c] = first[c];
        int64_t p = start;
        for (; p + 4 <= end; p += 4) { /* four pixels at a time: a quarter of the partials' loads and stores */
            const int64_t i = b * count + p;
            const SCALAR *g0 = g + i * C, *g1 = g0 + C, *g2 = g1 + C, *g3 = g2 + C;
            const SCALAR *x0 = x + i * C, *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
            const SCALAR m0 = sa[i], m1 = sa[i + 1], m2 = sa[i + 2], m3 = sa[i + 3];
            const SCALAR e0 = top[i], e1 = top[i + 1], e2 = top[i + 2], e3 = top[i + 3];
            double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
            SCALAR n0 = 0, n1 = 0, n2 = 0, n3 = 0;
            for (int64_t c0 = 0; c0 < C; c0 += NHWC_BLOCK) {
                const int64_t stop = c0 + NHWC_BLOCK < C ? c0 + NHWC_BLOCK : C;
                SCALAR q0 = 0, q1 = 0, q2 = 0, q3 = 0;
#pragma omp simd reduction(+ : q0, q1, q2, q3, n0, n1, n2, n3)
                for (int64_t c = c0; c < stop; ++c) {
                    const SCALAR wc = w[c];
                    const SCALAR t0 = g0[c] * x0[c], t1 = g1[c] * x1[c], t2 = g2[c] * x2[c], t3 = g3[c] * x3[c];
                    q0 += t0 * wc, q1 += t1 * wc, q2 += t2 * wc, q3 += t3 * wc;
                    ps[c] += (t0 * m0 + t1 * m1) + (t2 * m2 + t3 * m3);
                    pp[c] += (t0 + t1) + (t2 + t3);
                    n0 += x0[c] * wc == e0 ? 1 : 0;
                    n1 += x1[c] * wc == e1 ? 1 : 0;
                    n2 += x2[c] * wc == e2 ? 1 : 0;
                    n3 += x3[c] * wc == e3 ? 1 : 0;
                }
                a0 += q0, a1 += q1, a2 += q2, a3 += q3;
            }
            gsa[i] = (SCALAR)a0, gsa[i + 1] = (SCALAR)a1, gsa[i + 2] = (SCALAR)a2, gsa[i + 3] = (SCALAR)a3;
            ties[i] = n0, ties[i + 1] = n1, ties[i + 2] = n2, ties[i + 3] = n3;
            if (hmean) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    px[c] += (x0[c] + x1[c]) + (x2[c] + x3[c]);
                    ph[c] = FN(max_nan)(FN(max_nan)(ph[c], FN(max_nan)(x0[c], x1[c])), FN(max_nan)(x2[c], x3[c]));
                }
            }
        }
        for (; p < end; ++p) {
            const SCALAR *gv = g + (b * count + p) * C, *xv = x + (b * count + p) * C;
            const SCALAR m = sa[b * count + p], best = top[b * count + p];
            double acc = 0;
            SCALAR tie = 0;
            for (int64_t c0 = 0; c0 < C; c0 += NHWC_BLOCK) {
                const int64_t stop = c0 + NHWC_BLOCK < C ? c0 + NHWC_BLOCK : C;
                SCALAR part = 0;
#pragma omp simd reduction(+ : part, tie)
                for (int64_t c = c0; c < stop; ++c) {
                    const SCALAR t = gv[c] * xv[c];
                    part += t * w[c];
                    ps[c] += t * m;
                    pp[c] += t;
                    tie += xv[c] * w[c] == best ? 1 : 0;
                }
                acc += part;
            }
            gsa[b * count + p] = (SCALAR)acc;
            ties[b * count + p] = tie;
            if (hmean) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    px[c] += xv[c];
                    ph[c] = FN(max_nan)(ph[c], xv[c]);
                }
            }
        }
    }
    FN(tiles_reduce)(by_sa, NULL, gca, NULL, batch, tiles, C, 1.0, threads);
    if (gsum) FN(tiles_reduce)(plain, NULL, gsum, NULL, batch, tiles, C, 1.0, threads);
    if (hmean) FN(tiles_reduce)(sum_x, high, hmean, hmax, batch, tiles, C, 1.0 / (double)count, threads);
    free(by_sa), free(plain), free(sum_x), free(high);
    return STATUS_OK;
}

/* pool_c_grad over (B, P, C): the same outputs as pool_c_grad's. */
static int FN(pool_c_grad_nhwc)(const SCALAR *x, const SCALAR *ca, const SCALAR *smax, const SCALAR *cmean,
                                const SCALAR *gmax, const SCALAR *counted, SCALAR *coef, SCALAR *gca, int64_t batch,
                                int64_t channels, int64_t count, int threads) {
    const int64_t tiles = NHWC_TILES(count), C = channels;
    SCALAR *parts = NEW(SCALAR, batch * tiles * C);
    if (!parts) return STATUS_NO_MEMORY;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < batch * tiles; ++task) {
        NHWC_TASK(task, tiles, count);
        const SCALAR *w = ca + b * C;
        SCALAR *part = parts + task * C;
        for (int64_t c = 0; c < C; ++c) part[c] = 0;
        int64_t p = start;
        for (; counted && p + 4 <= end; p += 4) { /* four pixels at a time, where the ties are counted already */
            const int64_t i = b * count + p;
            const SCALAR *x0 = x + i * C, *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
            SCALAR k[4], e[4], mn[4];
            for (int j = 0; j < 4; ++j) {
                k[j] = coef[i + j] = gmax[i + j] / counted[i + j];
                e[j] = smax[i + j], mn[j] = cmean[i + j];
            }
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                const SCALAR wc = w[c];
                part[c] += ((mn[0] + (SCALAR)(x0[c] * wc == e[0]) * k[0]) * x0[c] +
                            (mn[1] + (SCALAR)(x1[c] * wc == e[1]) * k[1]) * x1[c]) +
                           ((mn[2] + (SCALAR)(x2[c] * wc == e[2]) * k[2]) * x2[c] +
                            (mn[3] + (SCALAR)(x3[c] * wc == e[3]) * k[3]) * x3[c]);
            }
        }
        for (; p < end; ++p) {
            const SCALAR *xv = x + (b * count + p) * C;
            const SCALAR top = smax[b * count + p], mean = cmean[b * count + p];
            SCALAR tie = 0;
            if (counted) {
                tie = counted[b * count + p];
            } else {
#pragma omp simd reduction(+ : tie)
                for (int64_t c = 0; c < C; ++c) tie += xv[c] * w[c] == top ? 1 : 0;
            }
            const SCALAR k = gmax[b * count + p] / tie;
            coef[b * count + p] = k;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) part[c] += (mean + (SCALAR)(xv[c] * w[c] == top) * k) * xv[c];
        }
    }
    FN(tiles_reduce)(parts, NULL, gca, NULL, batch, tiles, C, 1.0, threads);
    free(parts);
    return STATUS_OK;
}

/* grad_x over (B, P, C), every term (g, cmean and hmean given, no base): as grad_x's usual case. */
static int FN(grad_x_nhwc)(const SCALAR *g, const SCALAR *x, const SCALAR *ca, const SCALAR *sa, double alpha,
                           int use_alpha, const SCALAR *cmean, const SCALAR *coef, const SCALAR *smax,
                           const SCALAR *hmean, const SCALAR *hmax, const SCALAR *hmax_at, const SCALAR *base,
                           SCALAR *out, int64_t batch, int64_t channels, int64_t count, int threads) {
    if (!g || !cmean || !hmean || base) return STATUS_BAD_ARGUMENT; /* the C code calls it with every term */
    const int64_t tiles = NHWC_TILES(count), C = channels;
    const SCALAR keep = (SCALAR)(1.0 - alpha), a = (SCALAR)alpha;
    SCALAR *counts = NEW(SCALAR, batch * tiles * C), *share = NEW(SCALAR, 2 * batch * C);
    if (!counts || !share) {
        free(counts), free(share);
        return STATUS_NO_MEMORY;
    }
    /* first the ties of each plane's maximum: #p with x == hmax_at[b, c] */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < batch * tiles; ++task) {
        NHWC_TASK(task, tiles, count);
        const SCALAR *at = hmax_at + b * C;
        SCALAR *n = counts + task * C;
        for (int64_t c = 0; c < C; ++c) n[c] = 0;
        int64_t p = start;
        for (; p + 4 <= end; p += 4) {
            const SCALAR *x0 = x + (b * count + p) * C, *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c)
                n[c] += ((SCALAR)(x0[c] == at[c]) + (SCALAR)(x1[c] == at[c])) +
                        ((SCALAR)(x2[c] == at[c]) + (SCALAR)(x3[c] == at[c]));
        }
        for (; p < end; ++p) {
            const SCALAR *xv = x + (b * count + p) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) n[c] += (SCALAR)(xv[c] == at[c]);
        }
    }
    SCALAR *elsewhere = share + batch * C;
    FN(tiles_reduce)(counts, NULL, share, NULL, batch, tiles, C, 1.0, threads);
    for (int64_t i = 0; i < batch * C; ++i) {
        share[i] = hmax[i] / share[i];
        elsewhere[i] = 0 * share[i]; /* NaN when there is no tie (share = x / 0), as in grad_x */
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < batch * tiles; ++task) {
        NHWC_TASK(task, tiles, count);
        const SCALAR *w = ca + b * C, *at = hmax_at + b * C, *hm = hmean + b * C;
        const SCALAR *sh = share + b * C, *ew = elsewhere + b * C;
        for (int64_t p = start; p < end; ++p) {
            const int64_t i = b * count + p;
            const SCALAR *gv = g + i * C, *xv = x + i * C;
            const SCALAR m = sa[i], mean = cmean[i], k = coef[i], top = smax[i];
            SCALAR *o = out + i * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                SCALAR v = use_alpha ? (gv[c] * w[c]) * (a * m) + gv[c] * keep : (gv[c] * w[c]) * m;
                v += (mean + (SCALAR)(xv[c] * w[c] == top) * k) * w[c];
                o[c] = v + (hm[c] + (xv[c] == at[c] ? sh[c] : ew[c]));
            }
        }
    }
    free(counts), free(share);
    return STATUS_OK;
}

/* pool_hw over (B, C, P) with the (B, P, C) pass's arguments. */
static int FN(pool_hw_nchw)(const SCALAR *x, SCALAR *mean, SCALAR *max, int64_t batch, int64_t channels, int64_t count,
                            int threads) {
    FN(pool_hw)(x, mean, max, batch * channels, count, threads);
    return STATUS_OK;
}

/* The six passes over full-size tensors in one layout, x's (dims[15]): the one place that chooses between them. */
typedef struct {
    int (*pool_hw)(const SCALAR *, SCALAR *, SCALAR *, int64_t, int64_t, int64_t, int);
    __typeof__(&FN(pool_c)) pool_c;
    __typeof__(&FN(blend)) blend;
    __typeof__(&FN(blend_grad)) blend_grad;
    __typeof__(&FN(pool_c_grad)) pool_c_grad;
    __typeof__(&FN(grad_x)) grad_x;
} FN(passes);
static const FN(passes) FN(nchw_passes) = {FN(pool_hw_nchw), FN(pool_c), FN(blend), FN(blend_grad),
                                           FN(pool_c_grad), FN(grad_x)};
static const FN(passes) FN(nhwc_passes) = {FN(pool_hw_nhwc), FN(pool_c_nhwc), FN(blend_nhwc), FN(blend_grad_nhwc),
                                           FN(pool_c_grad_nhwc), FN(grad_x_nhwc)};
static inline const FN(passes) *FN(passes_for)(const int64_t *dims) {
    return dims[15] ? &FN(nhwc_passes) : &FN(nchw_passes);
}

/* The merged branches as correlations over zero-padded maps. Every tap (c_t, dy_t, dx_t), of every branch at any
   dilation, is one offset into maps padded with zeros by R (the taps' largest |dy| or |dx|) on every side, in rows of
   Wp = W + 2R, with LANES values of slack after the last map: so no tap of any pixel needs a bounds check, and the
   products with the padding are formed as a convolution with zero padding forms them (0 * a NaN or an infinity of
   the other factor is NaN there). Output rows run in blocks of LANES columns whose sums stay in registers over all
   the taps; lanes past W read the padding or the next row and are not stored. */
/* The taps' reach R: their largest |dy| or |dx|. */
static int64_t tap_reach(const int64_t *taps, int64_t ntaps) {
    int64_t reach = 0;
    for (int64_t t = 0; t < ntaps; ++t)
        for (int i = 1; i < 3; ++i) {
            const int64_t v = taps[3 * t + i] < 0 ? -taps[3 * t + i] : taps[3 * t + i];
            reach = v > reach ? v : reach;
        }
    return reach;
}

/* The n maps (n, H, W) of src, padded by R with zeros: (n, H + 2R, W + 2R), then LANES zeros. NULL if out of memory
   (or if the size overflows). */
static SCALAR *FN(padded)(const SCALAR *src, int64_t n, int64_t H, int64_t W, int64_t R, int threads) {
    const int64_t Hp = H + 2 * R, Wp = W + 2 * R;
    if (Hp > INT64_MAX / 64 / Wp || n > INT64_MAX / 64 / (Hp * Wp)) return NULL;
    SCALAR *out = calloc((size_t)(n * Hp * Wp + LANES), sizeof(SCALAR));
    if (!out) return NULL;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < n * H; ++row) {
        const SCALAR *from = src + row * W;
        SCALAR *to = out + ((row / H) * Hp + row % H + R) * Wp + R;
        for (int64_t j = 0; j < W; ++j) to[j] = from[j];
    }
    return out;
}

/* Up to LANES values of *v into o: n of them (v by pointer: a vector wider than the target's registers would
   change the calling convention). */
static inline void FN(store_lanes)(SCALAR *o, const VEC *v, int64_t n) {
    if (n >= LANES) {
        *(VEC *)o = *v;
    } else {
        for (int64_t l = 0; l < n; ++l) o[l] = (*v)[l];
    }
}

/* Up to four output rows (rows of them, W apart in o), each o[r, j] = sum_t w[t] * at[r * stride + j + off[t]] for
   j < W, the taps summed in order. Four rows at a time give four independent sums per tap; with fewer rows the last
   one is computed again in the spare sums and not stored. */
static inline void FN(correlate_rows)(const SCALAR *at, int64_t stride, int64_t rows, const int64_t *off,
                                      const SCALAR *w, int64_t ntaps, SCALAR *o, int64_t W) {
    const int64_t s1 = rows > 1 ? stride : 0, s2 = rows > 2 ? 2 * stride : s1, s3 = rows > 3 ? 3 * stride : s2;
    for (int64_t j = 0; j < W; j += LANES) {
        VEC a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        const SCALAR *p = at + j;
        for (int64_t t = 0; t < ntaps; ++t) {
            const SCALAR *q = p + off[t], wt = w[t];
            a0 += wt * VLOAD(q);
            a1 += wt * VLOAD(q + s1);
            a2 += wt * VLOAD(q + s2);
            a3 += wt * VLOAD(q + s3);
        }
        const int64_t n = W - j;
        FN(store_lanes)(o + j, &a0, n);
        if (rows > 1) FN(store_lanes)(o + W + j, &a1, n);
        if (rows > 2) FN(store_lanes)(o + 2 * W + j, &a2, n);
        if (rows > 3) FN(store_lanes)(o + 3 * W + j, &a3, n);
    }
}

/* The branches' logit: out[b, i, j] = sum_t w[b, t] * s[b, c_t, i + dy_t, j + dx_t] (zero outside the map), with
   taps[t] = (c_t, dy_t, dx_t) and per-sample weights. spad: s padded (padded(), reach R); out (B, H, W). */
static int FN(tap_conv)(const SCALAR *spad, const SCALAR *w, const int64_t *taps, SCALAR *out, int64_t batch,
                        int64_t channels, int64_t height, int64_t width, int64_t ntaps, int64_t R, int threads) {
    const int64_t Wp = width + 2 * R, plane = (height + 2 * R) * Wp;
    int64_t *off = NEW(int64_t, ntaps);
    if (!off) return STATUS_NO_MEMORY;
    for (int64_t t = 0; t < ntaps; ++t) off[t] = taps[3 * t] * plane + taps[3 * t + 1] * Wp + taps[3 * t + 2];
    const int64_t tiles = (height + 3) / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < batch * tiles; ++task) {
        const int64_t b = task / tiles, i = task % tiles * 4, rows = height - i < 4 ? height - i : 4;
        FN(correlate_rows)(spad + b * channels * plane + (i + R) * Wp + R, Wp, rows, off, w + b * ntaps, ntaps,
                           out + (b * height + i) * width, width);
    }
    free(off);
    return STATUS_OK;
}

/* Gradient of tap_conv's input: gs[b, c, r, k] = sum over the taps t of channel c of w[b, t] * g[b, r - dy_t, k - dx_t]
   (zero outside the map), the taps in order. gpad: g (B, H, W) padded (padded(), reach R). */
static int FN(tap_conv_grad_s)(const SCALAR *gpad, const SCALAR *w, const int64_t *taps, SCALAR *gs, int64_t batch,
                               int64_t channels, int64_t height, int64_t width, int64_t ntaps, int64_t R,
                               int threads) {
    const int64_t Wp = width + 2 * R, plane = (height + 2 * R) * Wp;
    /* the taps grouped by channel, in order: offsets into g's padded map, and each sample's weights */
    int64_t *off = NEW(int64_t, ntaps), *start = NEW(int64_t, channels + 1), *order = NEW(int64_t, ntaps);
    SCALAR *wc = NEW(SCALAR, batch * ntaps);
    int status = off && start && order && wc ? STATUS_OK : STATUS_NO_MEMORY;
    if (!status) {
        int64_t n = 0;
        for (int64_t c = 0; c < channels; ++c) {
            start[c] = n;
            for (int64_t t = 0; t < ntaps; ++t)
                if (taps[3 * t] == c) order[n] = t, off[n++] = -taps[3 * t + 1] * Wp - taps[3 * t + 2];
        }
        start[channels] = n;
        for (int64_t b = 0; b < batch; ++b)
            for (int64_t q = 0; q < n; ++q) wc[b * ntaps + q] = w[b * ntaps + order[q]];
        const int64_t tiles = (height + 3) / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t task = 0; task < batch * channels * tiles; ++task) {
            const int64_t bc = task / tiles, b = bc / channels, c = bc % channels, r = task % tiles * 4;
            FN(correlate_rows)(gpad + b * plane + (r + R) * Wp + R, Wp, height - r < 4 ? height - r : 4,
                               off + start[c], wc + b * ntaps + start[c], start[c + 1] - start[c],
                               gs + (bc * height + r) * width, width);
        }
    }
    free(off), free(start), free(order), free(wc);
    return status;
}

/* Gradient of tap_conv's weights: gw[b, t] = sum over the whole map of g[b, i, j] * s[b, c_t, i + dy_t, j + dx_t], the
   padding's products included (so a NaN or an infinity of g reaches every tap, as through the reference's
   convolution). Each lane sums FLUSH_ROWS rows in SCALAR, then those sums and the lanes add up in double. gpad,
   spad: g (B, H, W) and s padded (padded(), reach R). */
#define FLUSH_ROWS 8
static void FN(tap_conv_grad_w)(const SCALAR *gpad, const SCALAR *spad, const int64_t *taps, SCALAR *gw,
                                int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t ntaps,
                                int64_t R, int threads) {
    const int64_t Wp = width + 2 * R, plane = (height + 2 * R) * Wp, full = width / LANES * LANES;
    /* the last block's lanes past W: their products (which a NaN or an infinity there makes NaN) are masked out */
    unsigned char keep_bytes[LANES * sizeof(SCALAR)] = {0};
    for (size_t i = 0; i < (size_t)(width - full) * sizeof(SCALAR); ++i) keep_bytes[i] = 0xff;
    FN(bits) keep;
    memcpy(&keep, keep_bytes, sizeof keep);
    const int64_t groups = (ntaps + 3) / 4; /* four taps per task share the loads of g */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < batch * groups; ++task) {
        const int64_t b = task / groups, t0 = task % groups * 4, n = ntaps - t0 < 4 ? ntaps - t0 : 4;
        const SCALAR *gb = gpad + b * plane + R * Wp + R, *sb[4];
        for (int q = 0; q < 4; ++q) { /* a spare slot repeats the last tap */
            const int64_t *tap = taps + 3 * (t0 + (q < n ? q : n - 1));
            sb[q] = spad + (b * channels + tap[0]) * plane + (R + tap[1]) * Wp + R + tap[2];
        }
        double total[4][LANES] = {{0}};
        VEC a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t i = 0; i < height; ++i) {
            const SCALAR *grow = gb + i * Wp, *s0 = sb[0] + i * Wp, *s1 = sb[1] + i * Wp, *s2 = sb[2] + i * Wp;
            const SCALAR *s3 = sb[3] + i * Wp;
            for (int64_t j = 0; j < full; j += LANES) {
                const VEC v = VLOAD(grow + j);
                a0 += v * VLOAD(s0 + j), a1 += v * VLOAD(s1 + j), a2 += v * VLOAD(s2 + j), a3 += v * VLOAD(s3 + j);
            }
            if (full < width) {
                const VEC v = VLOAD(grow + full);
                a0 += (VEC)((FN(bits))(v * VLOAD(s0 + full)) & keep);
                a1 += (VEC)((FN(bits))(v * VLOAD(s1 + full)) & keep);
                a2 += (VEC)((FN(bits))(v * VLOAD(s2 + full)) & keep);
                a3 += (VEC)((FN(bits))(v * VLOAD(s3 + full)) & keep);
            }
            if (i % FLUSH_ROWS == FLUSH_ROWS - 1 || i == height - 1) {
                for (int l = 0; l < LANES; ++l)
                    total[0][l] += a0[l], total[1][l] += a1[l], total[2][l] += a2[l], total[3][l] += a3[l];
                a0 = a1 = a2 = a3 = (VEC){0};
            }
        }
        for (int64_t q = 0; q < n; ++q) {
            double sum = 0;
            for (int l = 0; l < LANES; ++l) sum += total[q][l];
            gw[b * ntaps + t0 + q] = (SCALAR)sum;
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------------
   The block's light work after the channel MLP, forward and backward, around the heavy passes above.

   dims = (B, C, H, W, router hidden Rh, branches K, taps T, ca gate hard, sa gate hard, has router, use alpha)
   scal = (ca temperature, sa temperature, alpha). A temperature of exactly 1 skips its division.
   Gates: sigmoid 1 / (1 + exp(-u)); hard: 0 for u <= -3, 1 for u >= 3, else u / 6 + 1 / 2 (PyTorch's). */

/* exp in the scalar type (expf for float: the double exp costs several times more) */
#define EXP(v) _Generic((v), float: expf, default: exp)(v)

static inline SCALAR FN(gate)(SCALAR u, int64_t hard) {
    if (hard) return u <= -3 ? 0 : u >= 3 ? 1 : u / 6 + (SCALAR)0.5;
    return 1 / (1 + EXP(-u));
}

/* d gate / d u times grad, from u and the gate's value y, as PyTorch's sigmoid_backward and hardsigmoid_backward
   compute it (the latter multiplies by 1/6 rounded to float, in every dtype). */
static inline SCALAR FN(gate_grad)(SCALAR grad, SCALAR u, SCALAR y, int64_t hard) {
    if (hard) return (u > -3 && u < 3) ? grad * (SCALAR)(1.0f / 6.0f) : 0;
    return grad * ((1 - y) * y);
}

/* y = gate(z / t) over n values (on all threads from GATE_PARALLEL_FROM values: exp costs about 20 cycles). */
#define GATE_PARALLEL_FROM 4096
static void FN(gate_all)(const SCALAR *z, SCALAR *y, int64_t n, double t, int64_t hard, int threads) {
    const SCALAR tt = (SCALAR)t;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= GATE_PARALLEL_FROM)
    for (int64_t i = 0; i < n; ++i) y[i] = FN(gate)(t == 1.0 ? z[i] : z[i] / tt, hard);
}

/* dz = d gate(z / t) / dz * grad over n values (in place of grad allowed); returns sum(grad_u * z) for the
   temperature's gradient, -sum / t^2. */
static double FN(gate_back)(const SCALAR *grad, const SCALAR *z, const SCALAR *y, SCALAR *dz, int64_t n, double t,
                            int64_t hard, int threads) {
    const SCALAR tt = (SCALAR)t;
    const int parts = n >= GATE_PARALLEL_FROM ? threads : 1;
    double part[64] = {0}; /* the sum by equal slices in slice order: the same for a given thread count */
    const int used = parts < 64 ? parts : 64;
#pragma omp parallel for num_threads(used) schedule(static)
    for (int q = 0; q < used; ++q) {
        const int64_t start = n * q / used, end = n * (q + 1) / used;
        double total = 0;
        for (int64_t i = start; i < end; ++i) {
            const SCALAR u = t == 1.0 ? z[i] : z[i] / tt;
            const SCALAR gu = FN(gate_grad)(grad[i], u, y[i], hard);
            total += (double)gu * (double)z[i];
            dz[i] = t == 1.0 ? gu : gu / tt;
        }
        part[q] = total;
    }
    double total = 0;
    for (int q = 0; q < used; ++q) total += part[q];
    return total;
}

/* pooled[i] = mean over the P pixels of s[b, i], for i = 0, 1 (the router's input). */
static void FN(router_input)(const SCALAR *s, int64_t b, int64_t P, SCALAR *pooled) {
    for (int64_t i = 0; i < 2; ++i) {
        double total = 0;
        for (int64_t p = 0; p < P; ++p) total += s[(b * 2 + i) * P + p];
        pooled[i] = (SCALAR)(total / (double)P);
    }
}

/* The tap weights of sample b: tapw[b, t] = sum_k router[b, k] * mixing[k, t]. */
static void FN(tap_weights)(const SCALAR *router, const SCALAR *mixing, int64_t b, int64_t K, int64_t T,
                            SCALAR *tapw) {
    for (int64_t t = 0; t < T; ++t) {
        SCALAR v = 0;
        for (int64_t k = 0; k < K; ++k) v += router[b * K + k] * mixing[k * T + t];
        tapw[b * T + t] = v;
    }
}

/* Forward after the channel MLP's gate input z (B, C): ca = gate(z / T_ca); s = pool_c(x, ca); the router on
   mean_hw(s) (Rh hidden units, ReLU, K logits, softmax; all ones without a router); tap weights router @ mixing;
   logit = tap_conv(s) + router @ bias; sa = gate(logit / T_sa); out = blend(x, ca, sa). */
static int FN(spatial_forward)(const SCALAR *x, const SCALAR *z, const SCALAR *r1w, const SCALAR *r1b,
                                const SCALAR *r2w, const SCALAR *r2b, const SCALAR *mixing, const SCALAR *bias,
                                const int64_t *taps, SCALAR *ca, SCALAR *s, SCALAR *rhid, SCALAR *router,
                                SCALAR *logit, SCALAR *sa, SCALAR *out, const int64_t *dims, const double *scal,
                                int threads) {
    const int64_t B = dims[0], C = dims[1], H = dims[2], W = dims[3], P = H * W, Rh = dims[4], K = dims[5];
    const int64_t T = dims[6];
    const FN(passes) *pass = FN(passes_for)(dims);
    FN(gate_all)(z, ca, B * C, scal[0], dims[7], threads);
    pass->pool_c(x, ca, s, B, C, P, threads);
    SCALAR *tapw = NEW(SCALAR, B * T);
    if (!tapw) return STATUS_NO_MEMORY;
    for (int64_t b = 0; b < B; ++b) {
        SCALAR *r = router + b * K;
        if (dims[9]) {
            SCALAR pooled[2];
            FN(router_input)(s, b, P, pooled);
            SCALAR *h = rhid + b * Rh;
            for (int64_t j = 0; j < Rh; ++j) {
                const SCALAR v = r1b[j] + r1w[2 * j] * pooled[0] + r1w[2 * j + 1] * pooled[1];
                h[j] = v <= 0 ? 0 : v; /* F.relu: NaN stays NaN */
            }
            SCALAR top = -INFINITY;
            for (int64_t k = 0; k < K; ++k) {
                SCALAR v = r2b[k];
                for (int64_t j = 0; j < Rh; ++j) v += r2w[k * Rh + j] * h[j];
                r[k] = v;
                top = FN(max_nan)(top, v);
            }
            double total = 0;
            for (int64_t k = 0; k < K; ++k) total += (r[k] = EXP(r[k] - top));
            for (int64_t k = 0; k < K; ++k) r[k] = (SCALAR)(r[k] / total);
        } else {
            for (int64_t k = 0; k < K; ++k) r[k] = 1;
        }
        FN(tap_weights)(router, mixing, b, K, T, tapw);
    }
    const int64_t R = tap_reach(taps, T);
    SCALAR *spad = FN(padded)(s, B * 2, H, W, R, threads);
    const int status = spad ? FN(tap_conv)(spad, tapw, taps, logit, B, 2, H, W, T, R, threads) : STATUS_NO_MEMORY;
    free(tapw), free(spad);
    if (status) return status;
    for (int64_t b = 0; b < B; ++b) {
        SCALAR shift = 0;
        for (int64_t k = 0; k < K; ++k) shift += router[b * K + k] * bias[k];
        for (int64_t p = 0; p < P; ++p) logit[b * P + p] += shift;
    }
    FN(gate_all)(logit, sa, B * P, scal[1], dims[8], threads);
    pass->blend(x, ca, sa, out, B, C, P, scal[2], (int)dims[10], threads);
    return STATUS_OK;
}

/* Backward of spatial_forward, from grad (the output's gradient) down to dz, the gradient of the channel gate's
   input. Writes ca, sa (recomputed), dz (B, C), the terms of x's gradient from the pooling over C (cmean, coef and
   smax, (B, P) each, for grad_x), the parameter gradients g_mixing (K, T), g_bias (K), g_r1w (Rh, 2), g_r1b (Rh),
   g_r2w (K, Rh), g_r2b (K) (unused without a router), and g_scal = (alpha, T_ca, T_sa) (alpha's only if need_alpha);
   if hmean is given, also the pooling over H, W that the forward did not keep (hmean, hmax: (B, C) each), in the same
   pass over x. */
static int FN(spatial_backward)(const SCALAR *g, const SCALAR *x, const SCALAR *z, const SCALAR *s,
                                 const SCALAR *logit, const SCALAR *router, const SCALAR *rhid, const SCALAR *r1w,
                                 const SCALAR *r2w, const SCALAR *mixing, const SCALAR *bias, const int64_t *taps,
                                 SCALAR *ca, SCALAR *sa, SCALAR *dz, SCALAR *cmean, SCALAR *coef, SCALAR *smax,
                                 SCALAR *g_mixing, SCALAR *g_bias, SCALAR *g_r1w, SCALAR *g_r1b, SCALAR *g_r2w,
                                 SCALAR *g_r2b, SCALAR *hmean, SCALAR *hmax, double *g_scal, int need_alpha,
                                 const int64_t *dims, const double *scal, int threads) {
    const int64_t B = dims[0], C = dims[1], H = dims[2], W = dims[3], P = H * W, Rh = dims[4], K = dims[5];
    const int64_t T = dims[6];
    const double alpha = scal[2];
    const FN(passes) *pass = FN(passes_for)(dims);
    SCALAR *gsa = NEW(SCALAR, B * P), *gmax = NEW(SCALAR, B * P);
    SCALAR *gca = NEW(SCALAR, B * C), *gpool = NEW(SCALAR, B * C);
    SCALAR *gsum = need_alpha ? NEW(SCALAR, B * C) : NULL;
    SCALAR *tapw = NEW(SCALAR, B * T), *gtaps = NEW(SCALAR, B * T);
    SCALAR *gs = NEW(SCALAR, B * 2 * P), *per_sample = NEW(SCALAR, B);
    SCALAR *ties = NEW(SCALAR, B * P);
    SCALAR *gr = NEW(SCALAR, 2 * K); /* the router's softmax backward, per sample: gr (K), then dl (K) */
    double *gmix = NEW(double, K * T); /* the mixing matrix's gradient, summed in double */
    SCALAR *spad = NULL, *gpad = NULL; /* s and the logit's gradient, padded for the branches' backward */
    int status = STATUS_OK;
    if (!gsa || !gmax || !gca || !gpool || (need_alpha && !gsum) || !tapw || !gtaps || !gs || !per_sample || !ties ||
        !gr || !gmix) {
        status = STATUS_NO_MEMORY;
        goto done;
    }
    FN(gate_all)(z, ca, B * C, scal[0], dims[7], threads);
    FN(gate_all)(logit, sa, B * P, scal[1], dims[8], threads);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t p = 0; p < P; ++p) smax[b * P + p] = s[(b * 2 + 1) * P + p];
    status = pass->blend_grad(g, x, ca, sa, smax, gsa, gca, gsum, ties, hmean, hmax, B, C, P, threads);
    if (status) goto done;
    if (need_alpha) {
        double total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t i = 0; i < B * C; ++i) total += (double)ca[i] * gca[i] - gsum[i];
        g_scal[0] = total;
    }
    if (dims[10]) {
        for (int64_t i = 0; i < B * P; ++i) gsa[i] = (SCALAR)(gsa[i] * alpha);
        for (int64_t i = 0; i < B * C; ++i) gca[i] = (SCALAR)(gca[i] * alpha);
    }
    /* the spatial gate, in place: gsa becomes the logit's gradient */
    g_scal[2] = -FN(gate_back)(gsa, logit, sa, gsa, B * P, scal[1], dims[8], threads) / (scal[1] * scal[1]);
    for (int64_t b = 0; b < B; ++b) {
        double total = 0;
        for (int64_t p = 0; p < P; ++p) total += gsa[b * P + p];
        per_sample[b] = (SCALAR)total;
        FN(tap_weights)(router, mixing, b, K, T, tapw);
    }
    const int64_t R = tap_reach(taps, T);
    spad = FN(padded)(s, B * 2, H, W, R, threads);
    gpad = FN(padded)(gsa, B, H, W, R, threads);
    if (!spad || !gpad) {
        status = STATUS_NO_MEMORY;
        goto done;
    }
    FN(tap_conv_grad_w)(gpad, spad, taps, gtaps, B, 2, H, W, T, R, threads);
    if ((status = FN(tap_conv_grad_s)(gpad, tapw, taps, gs, B, 2, H, W, T, R, threads))) goto done;
    for (int64_t k = 0; k < K; ++k) {
        double by_bias = 0;
        for (int64_t b = 0; b < B; ++b) by_bias += (double)router[b * K + k] * per_sample[b];
        g_bias[k] = (SCALAR)by_bias;
    }
    /* each entry of the mixing matrix's gradient summed over the samples in order, all entries in one pass */
    for (int64_t i = 0; i < K * T; ++i) gmix[i] = 0;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < K; ++k) {
            const double r = router[b * K + k];
            for (int64_t t = 0; t < T; ++t) gmix[k * T + t] += r * gtaps[b * T + t];
        }
    for (int64_t i = 0; i < K * T; ++i) g_mixing[i] = (SCALAR)gmix[i];
    if (dims[9]) {
        for (int64_t i = 0; i < Rh * 2; ++i) g_r1w[i] = 0;
        for (int64_t j = 0; j < Rh; ++j) g_r1b[j] = 0;
        for (int64_t i = 0; i < K * Rh; ++i) g_r2w[i] = 0;
        for (int64_t k = 0; k < K; ++k) g_r2b[k] = 0;
        for (int64_t b = 0; b < B; ++b) {
            const SCALAR *r = router + b * K, *h = rhid + b * Rh;
            SCALAR *dl = gr + K, pooled[2], dm[2] = {0, 0};
            SCALAR dot = 0;
            for (int64_t k = 0; k < K; ++k) {
                SCALAR v = per_sample[b] * bias[k];
                for (int64_t t = 0; t < T; ++t) v += gtaps[b * T + t] * mixing[k * T + t];
                gr[k] = v;
                dot += v * r[k];
            }
            for (int64_t k = 0; k < K; ++k) {
                dl[k] = r[k] * (gr[k] - dot);
                g_r2b[k] += dl[k];
                for (int64_t j = 0; j < Rh; ++j) g_r2w[k * Rh + j] += dl[k] * h[j];
            }
            FN(router_input)(s, b, P, pooled);
            for (int64_t j = 0; j < Rh; ++j) {
                SCALAR dh = 0;
                for (int64_t k = 0; k < K; ++k) dh += dl[k] * r2w[k * Rh + j];
                if (h[j] <= 0) dh = 0; /* threshold_backward: where the output is NaN the gradient passes */
                g_r1b[j] += dh;
                g_r1w[2 * j] += dh * pooled[0];
                g_r1w[2 * j + 1] += dh * pooled[1];
                dm[0] += dh * r1w[2 * j];
                dm[1] += dh * r1w[2 * j + 1];
            }
            for (int64_t i = 0; i < 2; ++i) {
                const SCALAR share = (SCALAR)(dm[i] / (double)P);
                for (int64_t p = 0; p < P; ++p) gs[(b * 2 + i) * P + p] += share;
            }
        }
    }
    /* the pooling over C */
    for (int64_t b = 0; b < B; ++b)
        for (int64_t p = 0; p < P; ++p) {
            cmean[b * P + p] = gs[b * 2 * P + p] / (SCALAR)C;
            gmax[b * P + p] = gs[(b * 2 + 1) * P + p];
        }
    status = pass->pool_c_grad(x, ca, smax, cmean, gmax, ties, coef, gpool, B, C, P, threads);
    if (status) goto done;
    for (int64_t i = 0; i < B * C; ++i) gca[i] += gpool[i];
    g_scal[1] = -FN(gate_back)(gca, z, ca, dz, B * C, scal[0], dims[7], threads) / (scal[0] * scal[0]);
done:
    free(gsa), free(gmax), free(gca), free(gpool), free(gsum), free(tapw), free(gtaps), free(gs), free(per_sample);
    free(ties), free(gr), free(gmix), free(spad), free(gpad);
    return status;
}

/* ---------------------------------------------------------------------------------------------------------------
   The channel MLP, forward and backward, as small matrix products (row-major; each output element is summed by one
   thread in a fixed order, so results do not depend on the thread count), and the whole block around it.

   mdims = (MLP hidden Rm, activation: 0 relu, 1 silu). fusion = (w0, w1): the weights of the avg and max rows. */

/* out[m, n] = sum_k A[m, k] * b[k, n] with A[m, k] at a[m * sm + k * sk] and b (K x N) row-major, for N of at least
   ROWS_WIDTH: tiles of GEMM_ROWS rows by ROWS_WIDTH columns, each tile's sums held in registers over the whole k loop
   (the loads of b shared by the tile's rows; 2 to 3 times the speed of the loops below on the MLP's products of a
   (32, 512, 7, 7) input here). Each output element is summed in k order by one thread. Columns past the last full
   tile by plain loops, in the same order. */
#define GEMM_ROWS 4
#define GEMM_VECS 4
#define ROWS_WIDTH (GEMM_VECS * LANES)

/* Task `task` of an M x N output cut into tiles of height x width, ntiles across: its first row and column and its
   size (smaller at the last rows and columns). */
static inline void tile_of(int64_t task, int64_t ntiles, int64_t M, int64_t N, int64_t height, int64_t width,
                           int64_t *m0, int64_t *n0, int64_t *rows, int64_t *cols) {
    *m0 = task / ntiles * height, *n0 = task % ntiles * width;
    *rows = M - *m0 < height ? M - *m0 : height, *cols = N - *n0 < width ? N - *n0 : width;
}

static void FN(gemm_rows)(const SCALAR *a, int64_t sm, int64_t sk, const SCALAR *b, SCALAR *out, int64_t M,
                          int64_t N, int64_t K, int threads) {
    const int64_t ntiles = (N + ROWS_WIDTH - 1) / ROWS_WIDTH, mtiles = (M + GEMM_ROWS - 1) / GEMM_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < mtiles * ntiles; ++task) {
        int64_t m0, n0, rows, cols;
        tile_of(task, ntiles, M, N, GEMM_ROWS, ROWS_WIDTH, &m0, &n0, &rows, &cols);
        if (rows == GEMM_ROWS && cols == ROWS_WIDTH) {
            VEC acc[GEMM_ROWS][GEMM_VECS];
            for (int r = 0; r < GEMM_ROWS; ++r)
                for (int v = 0; v < GEMM_VECS; ++v) acc[r][v] = (VEC){0};
            const SCALAR *am = a + m0 * sm;
            for (int64_t k = 0; k < K; ++k) {
                const SCALAR *bk = b + k * N + n0;
                VEC bv[GEMM_VECS];
                for (int v = 0; v < GEMM_VECS; ++v) bv[v] = VLOAD(bk + v * LANES);
                for (int r = 0; r < GEMM_ROWS; ++r) {
                    const SCALAR s = am[r * sm + k * sk];
                    for (int v = 0; v < GEMM_VECS; ++v) acc[r][v] += s * bv[v];
                }
            }
            for (int r = 0; r < GEMM_ROWS; ++r)
                for (int v = 0; v < GEMM_VECS; ++v) *(VEC *)(out + (m0 + r) * N + n0 + v * LANES) = acc[r][v];
        } else if (cols == ROWS_WIDTH) { /* the last rows (a single row where the MLP runs per sample), one at a time */
            for (int64_t r = m0; r < m0 + rows; ++r) {
                VEC acc[GEMM_VECS];
                for (int v = 0; v < GEMM_VECS; ++v) acc[v] = (VEC){0};
                for (int64_t k = 0; k < K; ++k) {
                    const SCALAR s = a[r * sm + k * sk], *bk = b + k * N + n0;
                    for (int v = 0; v < GEMM_VECS; ++v) acc[v] += s * VLOAD(bk + v * LANES);
                }
                for (int v = 0; v < GEMM_VECS; ++v) *(VEC *)(out + r * N + n0 + v * LANES) = acc[v];
            }
        } else {
            for (int64_t r = m0; r < m0 + rows; ++r) {
                SCALAR *o = out + r * N + n0;
                for (int64_t j = 0; j < cols; ++j) o[j] = 0;
                for (int64_t k = 0; k < K; ++k) {
                    const SCALAR s = a[r * sm + k * sk], *bk = b + k * N + n0;
                    for (int64_t j = 0; j < cols; ++j) o[j] += s * bk[j];
                }
            }
        }
    }
}

/* out[m, n] = sum_k a[m, k] * b[n, k]   (a: M x K, b: N x K) for K of at least 8 * LANES and M, N of at least
   GEMM_ROWS: tiles of GEMM_ROWS rows of a by GEMM_ROWS rows of b, each of their products summed in one vector over k
   (its lanes added in order after, then the last K % LANES terms); about 1.7 times the speed of gemm_nt's loops on
   pools @ w1^T of a (32, 512, 7, 7) input here, and no faster where K is the MLP's hidden width (32). Outside full
   tiles, gemm_nt's sums. */
static void FN(gemm_nt_tiles)(const SCALAR *a, const SCALAR *b, SCALAR *out, int64_t M, int64_t N, int64_t K,
                              int threads) {
    const int64_t mtiles = (M + GEMM_ROWS - 1) / GEMM_ROWS, ntiles = (N + GEMM_ROWS - 1) / GEMM_ROWS;
    const int64_t kv = K / LANES * LANES;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < mtiles * ntiles; ++task) {
        int64_t m0, n0, rows, cols;
        tile_of(task, ntiles, M, N, GEMM_ROWS, GEMM_ROWS, &m0, &n0, &rows, &cols);
        if (rows == GEMM_ROWS && cols == GEMM_ROWS) {
            VEC acc[GEMM_ROWS][GEMM_ROWS];
            for (int r = 0; r < GEMM_ROWS; ++r)
                for (int c = 0; c < GEMM_ROWS; ++c) acc[r][c] = (VEC){0};
            for (int64_t k = 0; k < kv; k += LANES) {
                VEC bv[GEMM_ROWS];
                for (int c = 0; c < GEMM_ROWS; ++c) bv[c] = VLOAD(b + (n0 + c) * K + k);
                for (int r = 0; r < GEMM_ROWS; ++r) {
                    const VEC av = VLOAD(a + (m0 + r) * K + k);
                    for (int c = 0; c < GEMM_ROWS; ++c) acc[r][c] += av * bv[c];
                }
            }
            for (int r = 0; r < GEMM_ROWS; ++r)
                for (int c = 0; c < GEMM_ROWS; ++c) {
                    SCALAR sum = 0;
                    for (int l = 0; l < LANES; ++l) sum += acc[r][c][l];
                    for (int64_t k = kv; k < K; ++k) sum += a[(m0 + r) * K + k] * b[(n0 + c) * K + k];
                    out[(m0 + r) * N + n0 + c] = sum;
                }
        } else {
            for (int64_t r = m0; r < m0 + rows; ++r)
                for (int64_t c = n0; c < n0 + cols; ++c) {
                    SCALAR sum = 0;
#pragma omp simd reduction(+ : sum)
                    for (int64_t k = 0; k < K; ++k) sum += a[r * K + k] * b[c * K + k];
                    out[r * N + c] = sum;
                }
        }
    }
}

/* out[m, n] = sum_k a[m, k] * b[n, k]   (a: M x K, b: N x K). Four rows of a at a time: four accumulators (by
   gemm_nt_tiles where it applies). */
static void FN(gemm_nt)(const SCALAR *a, const SCALAR *b, SCALAR *out, int64_t M, int64_t N, int64_t K,
                        int threads) {
    if (K >= 8 * LANES && M >= GEMM_ROWS && N >= GEMM_ROWS) {
        FN(gemm_nt_tiles)(a, b, out, M, N, K, threads);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const SCALAR *bn = b + n * K;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            const SCALAR *a0 = a + m * K, *a1 = a0 + K, *a2 = a1 + K, *a3 = a2 + K;
            SCALAR s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t k = 0; k < K; ++k) {
                s0 += a0[k] * bn[k];
                s1 += a1[k] * bn[k];
                s2 += a2[k] * bn[k];
                s3 += a3[k] * bn[k];
            }
            out[m * N + n] = s0, out[(m + 1) * N + n] = s1, out[(m + 2) * N + n] = s2, out[(m + 3) * N + n] = s3;
        }
        for (; m < M; ++m) {
            const SCALAR *am = a + m * K;
            SCALAR s0 = 0;
#pragma omp simd reduction(+ : s0)
            for (int64_t k = 0; k < K; ++k) s0 += am[k] * bn[k];
            out[m * N + n] = s0;
        }
    }
}

/* out[m, n] = sum_k a[m, k] * b[k, n]   (a: M x K, b: K x N), by tiles of ROWS rows and a column chunk of out,
   four k at a time; by gemm_rows where N is at least ROWS_WIDTH. (Chunks narrower than 128 for more threads were
   slower here: the threads then share cache lines of out; tiles of rows share none, and keep every thread busy where
   N is narrow, as dz @ w2 with N = Rm.) */
#define ROWS 8
static void FN(gemm_nn)(const SCALAR *a, const SCALAR *b, SCALAR *out, int64_t M, int64_t N, int64_t K,
                        int threads) {
    if (N >= ROWS_WIDTH) {
        FN(gemm_rows)(a, K, 1, b, out, M, N, K, threads);
        return;
    }
    const int64_t width = 128, chunks = (N + width - 1) / width, tiles = (M + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < chunks * tiles; ++task) {
        const int64_t chunk = task / tiles, m0 = task % tiles * ROWS, m1 = M - m0 < ROWS ? M : m0 + ROWS;
        const int64_t n0 = chunk * width, n = N - n0 < width ? N - n0 : width;
        for (int64_t m = m0; m < m1; ++m)
            for (int64_t j = 0; j < n; ++j) out[m * N + n0 + j] = 0;
        int64_t k = 0;
        for (; k + 4 <= K; k += 4) {
            const SCALAR *b0 = b + k * N + n0, *b1 = b0 + N, *b2 = b1 + N, *b3 = b2 + N;
            for (int64_t m = m0; m < m1; ++m) {
                const SCALAR *am = a + m * K + k;
                const SCALAR v0 = am[0], v1 = am[1], v2 = am[2], v3 = am[3];
                SCALAR *o = out + m * N + n0;
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) o[j] += (v0 * b0[j] + v1 * b1[j]) + (v2 * b2[j] + v3 * b3[j]);
            }
        }
        for (; k < K; ++k) {
            const SCALAR *bk = b + k * N + n0;
            for (int64_t m = m0; m < m1; ++m) {
                const SCALAR v = a[m * K + k];
                SCALAR *o = out + m * N + n0;
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) o[j] += v * bk[j];
            }
        }
    }
}

/* out[m, n] = sum_k a[k, m] * b[k, n]   (a: K x M, b: K x N), four k at a time (by gemm_rows where N is at least
   ROWS_WIDTH). */
static void FN(gemm_tn)(const SCALAR *a, const SCALAR *b, SCALAR *out, int64_t M, int64_t N, int64_t K,
                        int threads) {
    if (N >= ROWS_WIDTH) {
        FN(gemm_rows)(a, 1, M, b, out, M, N, K, threads);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        SCALAR *o = out + m * N;
        for (int64_t j = 0; j < N; ++j) o[j] = 0;
        int64_t k = 0;
        for (; k + 4 <= K; k += 4) {
            const SCALAR v0 = a[k * M + m], v1 = a[(k + 1) * M + m], v2 = a[(k + 2) * M + m], v3 = a[(k + 3) * M + m];
            const SCALAR *b0 = b + k * N, *b1 = b0 + N, *b2 = b1 + N, *b3 = b2 + N;
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) o[j] += (v0 * b0[j] + v1 * b1[j]) + (v2 * b2[j] + v3 * b3[j]);
        }
        for (; k < K; ++k) {
            const SCALAR v = a[k * M + m];
            const SCALAR *bk = b + k * N;
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) o[j] += v * bk[j];
        }
    }
}

/* relu as F.relu: NaN stays NaN (v > 0 ? v : 0 would make it 0) */
static inline SCALAR FN(act)(SCALAR v, int64_t silu) { return silu ? v / (1 + EXP(-v)) : (v <= 0 ? 0 : v); }

/* d act / d v times grad, as PyTorch's threshold_backward (relu, from the output) and silu_backward compute it. */
static inline SCALAR FN(act_grad)(SCALAR grad, SCALAR v, SCALAR y, int64_t silu) {
    if (!silu) return y <= 0 ? 0 : grad;
    const SCALAR sig = 1 / (1 + EXP(-v));
    return grad * sig * (1 + v * (1 - sig));
}

/* pre = pools @ w1^T + b1 (2B x Rm); hidden = act(pre); mixed = w0 * hidden[:B] + w1 * hidden[B:];
   z = mixed @ w2^T + (w0 + w1) * b2 (B x C). */
static int FN(mlp_forward)(const SCALAR *pools, const SCALAR *w1, const SCALAR *b1, const SCALAR *w2,
                            const SCALAR *b2, const SCALAR *fusion, SCALAR *pre, SCALAR *z, int64_t B, int64_t C,
                            int64_t Rm, int64_t silu, int threads) {
    SCALAR *mixed = NEW(SCALAR, B * Rm);
    if (!mixed) return STATUS_NO_MEMORY;
    FN(gemm_nt)(pools, w1, pre, 2 * B, Rm, C, threads);
    for (int64_t r = 0; r < 2 * B; ++r)
        for (int64_t j = 0; j < Rm; ++j) pre[r * Rm + j] += b1[j];
    for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < Rm; ++j)
            mixed[b * Rm + j] = fusion[0] * FN(act)(pre[b * Rm + j], silu) +
                                fusion[1] * FN(act)(pre[(B + b) * Rm + j], silu);
    FN(gemm_nt)(mixed, w2, z, B, C, Rm, threads);
    const SCALAR both = fusion[0] + fusion[1];
    for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < C; ++c) z[b * C + c] += both * b2[c];
    free(mixed);
    return STATUS_OK;
}

/* The MLP's backward from dz (B x C), the gradient of z. Writes, each if its pointer is not NULL: g_w2 (C x Rm),
   g_b2 (C), g_fusion (2), g_w1 (Rm x C), g_b1 (Rm), g_pools (2B x C). g_mixed_io (B x Rm), if not NULL, receives
   dz @ w2, or holds it already where g_mixed_known (then it is not computed again). */
static int FN(mlp_backward)(const SCALAR *dz, const SCALAR *pools, const SCALAR *pre, const SCALAR *w1,
                             const SCALAR *w2, const SCALAR *b2, const SCALAR *fusion, SCALAR *g_w1, SCALAR *g_b1,
                             SCALAR *g_w2, SCALAR *g_b2, SCALAR *g_fusion, SCALAR *g_pools, SCALAR *g_mixed_io,
                             int g_mixed_known, int64_t B, int64_t C, int64_t Rm, int64_t silu, int threads) {
    SCALAR *hidden = NEW(SCALAR, 2 * B * Rm), *mixed = NEW(SCALAR, B * Rm);
    SCALAR *own = g_mixed_io ? NULL : NEW(SCALAR, B * Rm);
    SCALAR *g_mixed = g_mixed_io ? g_mixed_io : own;
    SCALAR *g_pre = NEW(SCALAR, 2 * B * Rm), *column = NEW(SCALAR, C);
    if (!hidden || !mixed || !g_mixed || !g_pre || !column) {
        free(hidden), free(mixed), free(own), free(g_pre), free(column);
        return STATUS_NO_MEMORY;
    }
    for (int64_t i = 0; i < 2 * B * Rm; ++i) hidden[i] = FN(act)(pre[i], silu);
    for (int64_t i = 0; i < B * Rm; ++i) mixed[i] = fusion[0] * hidden[i] + fusion[1] * hidden[B * Rm + i];
    if (g_w2) FN(gemm_tn)(dz, mixed, g_w2, C, Rm, B, threads);
    for (int64_t c = 0; c < C; ++c) column[c] = 0;
    for (int64_t b = 0; b < B; ++b) /* each column summed over the rows in order, all columns in one pass */
        for (int64_t c = 0; c < C; ++c) column[c] += dz[b * C + c];
    if (g_b2)
        for (int64_t c = 0; c < C; ++c) g_b2[c] = column[c] * (fusion[0] + fusion[1]);
    if (!g_mixed_known) FN(gemm_nn)(dz, w2, g_mixed, B, Rm, C, threads);
    if (g_fusion) { /* d z / d w_k = hidden_k @ w2^T + b2 */
        double bias = 0;
        for (int64_t c = 0; c < C; ++c) bias += (double)column[c] * b2[c];
        for (int64_t k = 0; k < 2; ++k) {
            double total = 0;
            for (int64_t i = 0; i < B * Rm; ++i) total += (double)hidden[k * B * Rm + i] * g_mixed[i];
            g_fusion[k] = (SCALAR)(total + bias);
        }
    }
    for (int64_t k = 0; k < 2; ++k)
        for (int64_t i = 0; i < B * Rm; ++i) {
            const int64_t at = k * B * Rm + i;
            g_pre[at] = FN(act_grad)(fusion[k] * g_mixed[i], pre[at], hidden[at], silu);
        }
    if (g_w1) FN(gemm_tn)(g_pre, pools, g_w1, Rm, C, 2 * B, threads);
    if (g_b1)
        for (int64_t j = 0; j < Rm; ++j) {
            SCALAR v = 0;
            for (int64_t r = 0; r < 2 * B; ++r) v += g_pre[r * Rm + j];
            g_b1[j] = v;
        }
    if (g_pools) FN(gemm_nn)(g_pre, w1, g_pools, 2 * B, C, Rm, threads);
    free(hidden), free(mixed), free(own), free(g_pre), free(column);
    return STATUS_OK;
}

/* The whole block's forward after derive_light: pools = [mean_hw(x); max_hw(x)] (2B x C), the MLP (pre, z), then
   spatial_forward. mlp = (w1, b1, w2, b2, fusion); spatial = (r1w, r1b, r2w, r2b, mixing, bias); outputs pools, pre,
   z, then
   spatial_forward's (ca, s, rhid, router, logit, sa, out). dims as spatial_forward's, then mdims, then the mode:
   dims[13] = S > 0 runs the batch in chunks of S samples (the last one may be shorter), each chunk from start to end
   on one thread (the chunk's slice of x is read from memory once and then from the cache; the MLP runs on the
   chunk's rows), 0 runs each stage over the whole batch on all threads (operators.cpp's chunk_samples chooses). The
   results are the same either way up to rounding. */
static int FN(forward_core)(const SCALAR *x, const SCALAR *const *mlp, const SCALAR *const *spatial,
                             const int64_t *taps, SCALAR *const *outs, const int64_t *dims, const double *scal,
                             int threads) {
    const int64_t B = dims[0], C = dims[1], P = dims[2] * dims[3], Rm = dims[11], silu = dims[12];
    const int64_t Rh = dims[4], K = dims[5];
    const FN(passes) *pass = FN(passes_for)(dims);
    SCALAR *pools = outs[0], *pre = outs[1], *z = outs[2];
    int status = STATUS_OK;
    if (!dims[13]) {
        if ((status = pass->pool_hw(x, pools, pools + B * C, B, C, P, threads))) return status;
        if ((status = FN(mlp_forward)(pools, mlp[0], mlp[1], mlp[2], mlp[3], mlp[4], pre, z, B, C, Rm, silu, threads)))
            return status;
        return FN(spatial_forward)(x, z, spatial[0], spatial[1], spatial[2], spatial[3], spatial[4], spatial[5], taps,
                                   outs[3], outs[4], outs[5], outs[6], outs[7], outs[8], outs[9], dims, scal, threads);
    }
    /* status is shared: any chunk's failure is reported (the other chunks still run) */
    const int64_t S = dims[13], chunks = (B + S - 1) / S;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < chunks; ++j) {
        const int64_t b = j * S, n = B - b < S ? B - b : S;
        int64_t one[16];
        for (int i = 0; i < 16; ++i) one[i] = dims[i];
        one[0] = n;
        const SCALAR *xb = x + b * C * P;
        SCALAR *rows = NEW(SCALAR, n * (2 * C + 2 * Rm));
        int own = rows ? STATUS_OK : STATUS_NO_MEMORY;
        if (!own) {
            SCALAR *pre2 = rows + 2 * n * C;
            own = pass->pool_hw(xb, rows, rows + n * C, n, C, P, 1);
            if (!own)
                own = FN(mlp_forward)(rows, mlp[0], mlp[1], mlp[2], mlp[3], mlp[4], pre2, z + b * C, n, C, Rm, silu, 1);
            for (int64_t c = 0; c < n * C; ++c) pools[b * C + c] = rows[c], pools[(B + b) * C + c] = rows[n * C + c];
            for (int64_t i = 0; i < n * Rm; ++i) pre[b * Rm + i] = pre2[i], pre[(B + b) * Rm + i] = pre2[n * Rm + i];
        }
        if (!own)
            own = FN(spatial_forward)(xb, z + b * C, spatial[0], spatial[1], spatial[2], spatial[3], spatial[4],
                                      spatial[5], taps, outs[3] + b * C, outs[4] + b * 2 * P, outs[5] + b * Rh,
                                      outs[6] + b * K, outs[7] + b * P, outs[8] + b * P, outs[9] + b * C * P, one,
                                      scal, 1);
        free(rows);
        if (own) {
#pragma omp atomic write
            status = own;
        }
    }
    return status;
}

/* The whole block's backward after derive_light, from g, the output's gradient. saved = (z, s, logit, router, rhid,
   pre, pools; pools NULL: recomputed in the spatial backward's first pass over x); mlp = (w1, w2, b2, fusion); spatial = (r1w, r2w, mixing, bias). grads = (mixing, bias, r1w,
   r1b, r2w, r2b, w1, b1, w2, b2, fusion, x): the gradients, each skipped where its pointer is NULL (x: NULL skips
   the pass over x); g_scal = (alpha, T_ca, T_sa). dims as block_forward's (dims[13]: samples per chunk). */
static int FN(backward_core)(const SCALAR *g, const SCALAR *x, const SCALAR *const *saved,
                              const SCALAR *const *mlp, const SCALAR *const *spatial, const int64_t *taps,
                              SCALAR *const *grads, double *g_scal, int need_alpha, const int64_t *dims,
                              const double *scal, int threads) {
    const int64_t B = dims[0], C = dims[1], P = dims[2] * dims[3], Rm = dims[11], silu = dims[12];
    const int64_t Rh = dims[4], K = dims[5], T = dims[6], BC = B * C, BP = B * P;
    __typeof__(&FN(grad_x)) const grad_x = FN(passes_for)(dims)->grad_x;
    SCALAR *ca = NEW(SCALAR, BC), *dz = NEW(SCALAR, BC);
    SCALAR *sa = NEW(SCALAR, BP), *cmean = NEW(SCALAR, BP);
    SCALAR *coef = NEW(SCALAR, BP), *smax = NEW(SCALAR, BP);
    SCALAR *own = NULL;
    const SCALAR *pools = saved[6];
    if (!pools) own = NEW(SCALAR, 2 * BC);
    int status = STATUS_OK;
    if (!ca || !dz || !sa || !cmean || !coef || !smax || (!pools && !own)) {
        status = STATUS_NO_MEMORY;
    } else if (!dims[13]) {
        SCALAR *g_pools = grads[11] ? NEW(SCALAR, 2 * BC) : NULL;
        if (grads[11] && !g_pools) status = STATUS_NO_MEMORY;
        if (!status)
            status = FN(spatial_backward)(g, x, saved[0], saved[1], saved[2], saved[3], saved[4], spatial[0],
                                          spatial[1], spatial[2], spatial[3], taps, ca, sa, dz, cmean, coef, smax,
                                          grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], own,
                                          own ? own + BC : NULL, g_scal, need_alpha, dims, scal, threads);
        if (own) pools = own;
        if (!status)
            status = FN(mlp_backward)(dz, pools, saved[5], mlp[0], mlp[1], mlp[2], mlp[3], grads[6], grads[7],
                                      grads[8], grads[9], grads[10], g_pools, NULL, 0, B, C, Rm, silu, threads);
        if (!status && grads[11]) {
            for (int64_t i = 0; i < BC; ++i) g_pools[i] /= (SCALAR)P;
            status = grad_x(g, x, ca, sa, scal[2], (int)dims[10], cmean, coef, smax, g_pools, g_pools + BC,
                            pools + BC, NULL, grads[11], B, C, P, threads);
        }
        free(g_pools);
    } else {
        /* Chunks of S samples, one thread each: the spatial part, the MLP's adjoints for the chunk's rows (the
           weights' gradients come after, over the whole batch) and x's gradient. The parameters' gradients of each
           chunk are summed after the loop, in chunk order. */
        const int64_t per = K * T + K + 3 * Rh + K * Rh + K;
        const int64_t S = dims[13], chunks = (B + S - 1) / S;
        SCALAR *parts = (uint64_t)chunks * (uint64_t)per < SIZE_MAX / sizeof(SCALAR)
                            ? calloc((size_t)(chunks * per) + 1, sizeof(SCALAR)) : NULL;
        double *scal_parts = NEW(double, chunks * 3);
        /* dz @ w2, row by row where x's gradient needs it; then the weights' gradients reuse it */
        SCALAR *g_mixed = grads[11] ? NEW(SCALAR, B * Rm) : NULL;
        if (own) pools = own;
        if (!parts || !scal_parts || (grads[11] && !g_mixed)) {
            free(parts), free(scal_parts), free(g_mixed);
            free(ca), free(dz), free(sa), free(cmean), free(coef), free(smax), free(own);
            return STATUS_NO_MEMORY;
        }
        /* status is shared: any chunk's failure is reported (the other chunks still run) */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t j = 0; j < chunks; ++j) {
            const int64_t b = j * S, n = B - b < S ? B - b : S;
            int64_t one[16];
            for (int i = 0; i < 16; ++i) one[i] = dims[i];
            one[0] = n;
            const SCALAR *gb = g + b * C * P, *xb = x + b * C * P;
            SCALAR *part = parts + j * per;
            double *sp = scal_parts + j * 3;
            sp[0] = sp[1] = sp[2] = 0;
            int mine = FN(spatial_backward)(gb, xb, saved[0] + b * C, saved[1] + b * 2 * P, saved[2] + b * P,
                                 saved[3] + b * K, saved[4] + b * Rh, spatial[0], spatial[1], spatial[2], spatial[3],
                                 taps, ca + b * C, sa + b * P, dz + b * C, cmean + b * P, coef + b * P, smax + b * P,
                                 part, part + K * T, part + K * T + K, part + K * T + K + 2 * Rh,
                                 part + K * T + K + 3 * Rh, part + K * T + K + 3 * Rh + K * Rh,
                                 own ? own + b * C : NULL, own ? own + BC + b * C : NULL, sp, need_alpha, one, scal, 1);
            if (mine) {
                /* nothing more for this chunk */
            } else if (grads[11]) {
                SCALAR *rows = NEW(SCALAR, n * (4 * C + 2 * Rm));
                if (!rows) {
#pragma omp atomic write
                    status = STATUS_NO_MEMORY;
                    continue;
                }
                SCALAR *g_rows = rows + 2 * n * C, *pre2 = rows + 4 * n * C;
                for (int64_t c = 0; c < n * C; ++c) rows[c] = pools[b * C + c], rows[n * C + c] = pools[BC + b * C + c];
                for (int64_t i = 0; i < n * Rm; ++i) {
                    pre2[i] = saved[5][b * Rm + i];
                    pre2[n * Rm + i] = saved[5][(B + b) * Rm + i];
                }
                mine = FN(mlp_backward)(dz + b * C, rows, pre2, mlp[0], mlp[1], mlp[2], mlp[3], NULL, NULL, NULL, NULL,
                                        NULL, g_rows, g_mixed + b * Rm, 0, n, C, Rm, silu, 1);
                for (int64_t c = 0; c < n * C; ++c) g_rows[c] /= (SCALAR)P;
                if (!mine)
                    mine = grad_x(gb, xb, ca + b * C, sa + b * P, scal[2], (int)dims[10], cmean + b * P, coef + b * P,
                                  smax + b * P, g_rows, g_rows + n * C, rows + n * C, NULL, grads[11] + b * C * P, n,
                                  C, P, 1);
                free(rows);
            }
            if (mine) {
#pragma omp atomic write
                status = mine;
            }
        }
        const int64_t sizes[6] = {K * T, K, 2 * Rh, Rh, K * Rh, K};
        for (int64_t j = 0, at = 0; j < (dims[9] ? 6 : 2); at += sizes[j], ++j)
            for (int64_t i = 0; i < sizes[j]; ++i) {
                SCALAR total = 0;
                for (int64_t j = 0; j < chunks; ++j) total += parts[j * per + at + i];
                grads[j][i] = total;
            }
        for (int i = 0; i < 3; ++i) {
            double total = 0;
            for (int64_t j = 0; j < chunks; ++j) total += scal_parts[j * 3 + i];
            g_scal[i] = total;
        }
        free(parts), free(scal_parts);
        /* the MLP weights' gradients, over the whole batch */
        if (!status)
            status = FN(mlp_backward)(dz, pools, saved[5], mlp[0], mlp[1], mlp[2], mlp[3], grads[6], grads[7],
                                      grads[8], grads[9], grads[10], NULL, g_mixed, g_mixed != NULL, B, C, Rm, silu,
                                      threads);
        free(g_mixed);
    }
    free(ca), free(dz), free(sa), free(cmean), free(coef), free(smax), free(own);
    return status;
}

/* ---------------------------------------------------------------------------------------------------------------
   The block from its own tensors. raw = (x, fc1 weight, fc1 bias, fc2 weight, fc2 bias, fusion logits (NULL: sum
   fusion), alpha (NULL: no blend), router fc1 weight, fc1 bias, fc2 weight, fc2 bias (NULL without a router), the K
   branch kernels, the K branch biases), all in x's type. layout = (sizes: the K kernels' element counts; gather:
   (K, T), for each entry of the mixing matrix the position of its weight in the kernels concatenated, or their total
   count for none; taps: (T, 3)). scal = (T_ca, T_sa): the effective temperatures. dims as forward_core's, then
   dims[14] = has fusion logits, dims[15] = x (with out, g and x's gradient) is channels_last, seen as (B, P, C). */

enum { R_X, R_W1, R_B1, R_W2, R_B2, R_FUSION, R_ALPHA, R_R1W, R_R1B, R_R2W, R_R2B, R_BRANCH };

/* The derived light parameters: the fusion weights (softmax of the logits, or (1, 1)), the mixing matrix (K, T),
   the stacked branch biases (K) and (T_ca, T_sa, alpha). */
static void FN(derive_light)(const SCALAR *const *raw, const int64_t *layout, const int64_t *dims,
                             const double *scal, SCALAR *fusion, SCALAR *mixing, SCALAR *bias, double *scal3) {
    const int64_t K = dims[5], T = dims[6];
    const int64_t *sizes = layout, *gather = layout + K;
    if (dims[14]) {
        const SCALAR *l = raw[R_FUSION], top = FN(max_nan)(l[0], l[1]);
        const SCALAR e0 = EXP(l[0] - top), e1 = EXP(l[1] - top), total = e0 + e1;
        fusion[0] = e0 / total, fusion[1] = e1 / total;
    } else {
        fusion[0] = fusion[1] = 1;
    }
    for (int64_t i = 0; i < K * T; ++i) {
        int64_t at = gather[i], k = 0;
        while (k < K && at >= sizes[k]) at -= sizes[k++];
        mixing[i] = k < K ? raw[R_BRANCH + k][at] : 0;
    }
    for (int64_t k = 0; k < K; ++k) bias[k] = raw[R_BRANCH + K + k][0];
    scal3[0] = scal[0], scal3[1] = scal[1], scal3[2] = raw[R_ALPHA] ? (double)raw[R_ALPHA][0] : 1.0;
}

/* Whether the dims are usable: every size positive (B, C, H, W, Rh, K, T, Rm) and the largest products
   (B * C * H * W, K * T, B * K * T) far from overflowing. */
static int FN(dims_ok)(const int64_t *dims) {
    const int sizes[8] = {0, 1, 2, 3, 4, 5, 6, 11};
    const int64_t limit = INT64_MAX / 64;
    for (int i = 0; i < 8; ++i)
        if (dims[sizes[i]] <= 0 || dims[sizes[i]] > limit) return 0;
    int64_t n = 1;
    for (int i = 0; i < 4; ++i) {
        if (n > limit / dims[i]) return 0;
        n *= dims[i];
    }
    if (dims[5] > limit / dims[6] || dims[0] > limit / (dims[5] * dims[6])) return 0;
    if (dims[0] > limit / (2 * dims[11] + 4 * dims[1] + 2 * dims[4])) return 0;
    if (dims[13] < 0 || dims[13] > dims[0]) return 0; /* samples per chunk: 0 (stage-wise) to the batch */
    if (dims[15] != 0 && dims[15] != 1) return 0;     /* the layout: NCHW or channels_last */
    return 1;
}

/* outs as forward_core's, then the fusion weights (2) and a copy of the router's weights (B, K). Returns STATUS_OK,
   or STATUS_NO_MEMORY / STATUS_BAD_ARGUMENT (outputs incomplete). */
int FN(block_forward)(const SCALAR *const *raw, const int64_t *layout, SCALAR *const *outs, const int64_t *dims,
                      const double *scal, int threads) {
    if (!FN(dims_ok)(dims)) return STATUS_BAD_ARGUMENT;
    const int64_t K = dims[5], T = dims[6];
    SCALAR fusion[2], *mixing = NEW(SCALAR, K * T + K);
    if (!mixing) return STATUS_NO_MEMORY;
    double scal3[3];
    FN(derive_light)(raw, layout, dims, scal, fusion, mixing, mixing + K * T, scal3);
    const SCALAR *mlp[5] = {raw[R_W1], raw[R_B1], raw[R_W2], raw[R_B2], fusion};
    const SCALAR *spatial[6] = {raw[R_R1W], raw[R_R1B], raw[R_R2W], raw[R_R2B], mixing, mixing + K * T};
    const int status = FN(forward_core)(raw[R_X], mlp, spatial, layout + K + K * T, outs, dims, scal3, threads);
    free(mixing);
    if (status) return status;
    /* the maps that are outputs of their own: the fusion weights, and the router's weights beside the saved ones */
    outs[10][0] = fusion[0], outs[10][1] = fusion[1];
    for (int64_t i = 0; i < dims[0] * K; ++i) outs[11][i] = outs[6][i];
    return STATUS_OK;
}

/* grads: one per raw tensor (x's first), each skipped where NULL (the router's and the branches' gradients are
   computed either way); g_scal = (alpha, T_ca, T_sa): alpha's only if need_alpha. */
int FN(block_backward)(const SCALAR *g, const SCALAR *const *raw, const SCALAR *const *saved, const int64_t *layout,
                       SCALAR *const *grads, double *g_scal, int need_alpha, const int64_t *dims,
                       const double *scal, int threads) {
    if (!FN(dims_ok)(dims)) return STATUS_BAD_ARGUMENT;
    const int64_t K = dims[5], T = dims[6], Rh = dims[4];
    const int64_t *sizes = layout, *gather = layout + K;
    SCALAR fusion[2], g_fusion[2];
    SCALAR *mixing = NEW(SCALAR, 2 * (K * T + K) + 2 * Rh + Rh + K * Rh + K);
    if (!mixing) return STATUS_NO_MEMORY;
    SCALAR *g_mixing = mixing + K * T + K, *g_bias = g_mixing + K * T, *scratch = g_bias + K;
    double scal3[3];
    FN(derive_light)(raw, layout, dims, scal, fusion, mixing, mixing + K * T, scal3);
    const SCALAR *mlp[4] = {raw[R_W1], raw[R_W2], raw[R_B2], fusion};
    const SCALAR *spatial[4] = {raw[R_R1W], raw[R_R2W], mixing, mixing + K * T};
    SCALAR *router[4] = {scratch, scratch + 2 * Rh, scratch + 3 * Rh, scratch + 3 * Rh + K * Rh};
    for (int i = 0; i < 4; ++i)
        if (grads[R_R1W + i]) router[i] = grads[R_R1W + i];
    SCALAR *core[12] = {g_mixing, g_bias, router[0], router[1], router[2], router[3], grads[R_W1], grads[R_B1],
                        grads[R_W2], grads[R_B2], grads[R_FUSION] ? g_fusion : NULL, grads[R_X]};
    const int status = FN(backward_core)(g, raw[R_X], saved, mlp, spatial, layout + K + K * T, core, g_scal,
                                         need_alpha, dims, scal3, threads);
    if (status) {
        free(mixing);
        return status;
    }
    if (grads[R_FUSION]) { /* softmax backward */
        const SCALAR dot = g_fusion[0] * fusion[0] + g_fusion[1] * fusion[1];
        grads[R_FUSION][0] = fusion[0] * (g_fusion[0] - dot);
        grads[R_FUSION][1] = fusion[1] * (g_fusion[1] - dot);
    }
    for (int64_t k = 0; k < K; ++k) {
        if (grads[R_BRANCH + k])
            for (int64_t i = 0; i < sizes[k]; ++i) grads[R_BRANCH + k][i] = 0;
        if (grads[R_BRANCH + K + k]) grads[R_BRANCH + K + k][0] = g_bias[k];
    }
    for (int64_t i = 0; i < K * T; ++i) { /* in the order of index_add_ over the mixing matrix */
        int64_t at = gather[i], k = 0;
        while (k < K && at >= sizes[k]) at -= sizes[k++];
        if (k < K && grads[R_BRANCH + k]) grads[R_BRANCH + k][at] += g_mixing[i];
    }
    free(mixing);
    return STATUS_OK;
}
