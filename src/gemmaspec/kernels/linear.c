// gemmaspec matmul kernels for decoding: y[M,N] = x[M,K] @ W[N,K]^T with W held as int8, packed int4, bfloat16
// or float32, x float32.
//
// Weights are row-major over N (one output feature per row), in groups of `g` along K; each group has a
// scale s and an optional bias b (float16, or float32 when f32 != 0):  w = s * q + b.
//   int8: q is int8 [N, K].
//   int4: q is uint8 [N, K/2]; each 32-weight chunk is 16 bytes, byte i holding weight i in its low nibble
//         and weight i + 16 in its high nibble (values 0..15).
// Each weight is read from memory once per call and converted in registers for every row of x, whatever M is:
// the speculative-verification shape (M = k + 1 rows).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(GS_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__AVX512VNNI__) && !defined(GS_NO_X8_512)
#define GS_X8_512 1  // the int8-activation matmuls in 512-bit vectors (tile8 below); -DGS_NO_X8_512: AVX2 ones
#endif

static inline float h2f(uint16_t h) {
#ifdef GS_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal half -> normal float
            exp = 113;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

// scale / bias number i of a float16 or float32 array
#define SC(p, i) (f32 ? ((const float *)(p))[i] : h2f(((const uint16_t *)(p))[i]))

// ---- one row -> float ------------------------------------------------------------------------------
static void deq_row_i8(const int8_t *q, const void *s, const void *b, int f32, int K, int g, float *out) {
    for (int j = 0; j < K / g; j++) {
        const float sc = SC(s, j), bi = b ? SC(b, j) : 0.0f;
        const int8_t *qj = q + (size_t)j * g;
        float *o = out + (size_t)j * g;
#ifdef GS_AVX2
        const __m256 vs = _mm256_set1_ps(sc), vb = _mm256_set1_ps(bi);
        for (int c = 0; c < g; c += 16) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(qj + c));
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8)));
            _mm256_storeu_ps(o + c, _mm256_add_ps(_mm256_mul_ps(w0, vs), vb));
            _mm256_storeu_ps(o + c + 8, _mm256_add_ps(_mm256_mul_ps(w1, vs), vb));
        }
#else
        for (int c = 0; c < g; c++) o[c] = (float)qj[c] * sc + bi;
#endif
    }
}

static void deq_row_i4(const uint8_t *q, const void *s, const void *b, int f32, int K, int g, float *out) {
    // values in 32-value chunks of 16 bytes (value i | value i + 16 << 4); groups of 16 or a multiple of 32
    for (int k = 0; k < K; k += 16) {
        const int j = k / g;
        const float sc = SC(s, j), bi = b ? SC(b, j) : 0.0f;
        const uint8_t *qc = q + (k & ~31) / 2;
        const int shift = (k & 16) ? 4 : 0;
        float *o = out + k;
#ifdef GS_AVX2
        const __m256 vs = _mm256_set1_ps(sc), vb = _mm256_set1_ps(bi);
        __m128i raw = _mm_loadu_si128((const __m128i *)qc);
        __m128i v = _mm_and_si128(shift ? _mm_srli_epi16(raw, 4) : raw, _mm_set1_epi8(0x0f));
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_mul_ps(w0, vs), vb));
        _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_mul_ps(w1, vs), vb));
#else
        for (int i = 0; i < 16; i++) o[i] = (float)((qc[i] >> shift) & 0x0f) * sc + bi;
#endif
    }
}

// ---- the block layout ------------------------------------------------------------------------------------
// Where the AVX-512 tiles read a matrix (gsq_blocked below), its rows may be stored with every full block of 16
// byte groups (256 bytes) already transposed the way those tiles use it: byte 64v + 4l + c holds byte 16l + 4v + c
// of the layout above (dword v of group l in lane l of vector v). The tiles then skip the eight two-source
// permutes per block and weight row that transposing in registers cost (on Zen 4 a third of an int4 block's
// work at one row of x). Partial blocks and int4's tail quad stay as they are. gsq_to_blocks converts in place.
static inline size_t row_bytes_of(int bits, int K) { return bits == 8 ? (size_t)K : (size_t)K / 2; }

static void block_transpose(const uint8_t *in, uint8_t *out, int inverse) {
    for (int l = 0; l < 16; l++)
        for (int v = 0; v < 4; v++) {
            if (inverse)
                memcpy(out + 16 * l + 4 * v, in + 64 * v + 4 * l, 4);
            else
                memcpy(out + 64 * v + 4 * l, in + 16 * l + 4 * v, 4);
        }
}

// a row held in the block layout, in the row layout (out: row_bytes)
static void unblock_row(const uint8_t *q, size_t row_bytes, uint8_t *out) {
    const size_t full = row_bytes / 256;
    for (size_t k = 0; k < full; k++) block_transpose(q + 256 * k, out + 256 * k, 1);
    memcpy(out + 256 * full, q + 256 * full, row_bytes - 256 * full);
}

static inline void deq_row(int bits, int f32, int blocked, const void *q, const void *s, const void *b, int K,
                           int g, int64_t n, float *out) {
    const size_t row = (size_t)(K / g) * (f32 ? 4 : 2);  // bytes of scales per row
    const char *sn = (const char *)s + n * row, *bn = b ? (const char *)b + n * row : NULL;
    const size_t rb = row_bytes_of(bits, K);
    const uint8_t *qn = (const uint8_t *)q + (size_t)n * rb;
    uint8_t plain[blocked ? rb : 1];
    if (blocked) {
        unblock_row(qn, rb, plain);
        qn = plain;
    }
    if (bits == 8)
        deq_row_i8((const int8_t *)qn, sn, bn, f32, K, g, out);
    else
        deq_row_i4(qn, sn, bn, f32, K, g, out);
}

// ---- tiles: one weight row x up to QMT (int8 / int4) or MT (float) rows of x --------------------------------
// The activations are quantized first, per row and per weight group: x ~= xs_j * xq with xq int16 and
// xs_j = max|x in group j| / 32767 (a relative error of at most 2^-16 of the group's largest value, far below
// the weights' own quantization error). Integer dot products are exact, and pmaddwd does 16 multiply-adds per
// instruction where widening every weight to float took three instructions per 8 values: on Zen 3 int4
// matmuls ran 1.6x faster per core and int8 ones 1.2-1.5x.
// Each output y[m, n] is accumulated in one fixed order whatever M is, so y[m] does not depend on M bitwise
// (speculative verification sees exactly the values plain decoding would): per group the exact int32 dot, its
// lanes folded four groups at a time (see tile()), scaled and summed into one 8-lane float accumulator, then the
// leftover groups one at a time, then hsum + the bias term (sum_j b_j * sum(x in group j), 8 groups per FMA).
// For several rows of x, one weight row at a time keeps the weights a single sequential stream (interleaving
// rows halved the DRAM read rate on Zen 3) and each weight vector is widened once for all rows of x in the tile
// (groups of 16 or 32). One row of x (plain decoding) takes QR weight rows side by side instead (tile_rows), with
// a software prefetch PF_TILES tiles ahead that keeps that stream at the DRAM rate. BITS, G (group size 16 or
// 32; 0: read g, a multiple of 32 up to MAX_GROUP) and the tile's row count are constants at each call site.
// int32 sums cannot overflow: a group adds at most MAX_GROUP products of |q| <= 128 and |xq| <= 32767
// (2^31 - 65536 in the portable path's single sum; less per AVX2 lane). Do not raise MAX_GROUP.
#define MT 4
#if defined(__AVX512VL__)
#define QMT 8  // rows of x per int8/int4 tile: with 32 vector registers the accumulators of 8 rows fit
#else
#define QMT 4
#endif
#define MAX_GROUP 512
// One row of x (plain decoding): QR rows of W at a time, so QR accumulator chains run side by side where a single
// row's chain (dots -> folds -> FMA -> hsum) left the core waiting: at K = 640 a lone row cost ~40 cycles beyond
// its arithmetic. Each row gets exactly tile()'s operations for mt = 1 in the same order (same bits). Zen 4, one
// call over the 262k-row LM head, interleaved medians: int4 0.67-0.72x the time of one row at a time, int8
// 0.8-0.95x (without the prefetch int8 was 1.1x: four interleaved rows are not one stream to the prefetcher);
// prefetching the scale (and bias) rows too: int8 head ~0.92x again, plain decode 1.04x.
#define QR 4
// every cache line of [p, p + n), into L1 (to_l2 = 0) or L2. Plain decoding's one-row tiles prefetch into L2: on
// the 2-core Xeon the auto-weights step took 15.0 ms instead of 15.8 (the LM head streamed at 20.8 GB/s, not 19.2);
// the multi-row loop into L1 (L2 there cost verification ~3%).
static inline __attribute__((always_inline)) void prefetch_span(const char *p, size_t n, int to_l2) {
    if (to_l2) {
        for (size_t c = 0; c < n; c += 64) __builtin_prefetch(p + c, 0, 2);
        __builtin_prefetch(p + n - 1, 0, 2);
    } else {
        for (size_t c = 0; c < n; c += 64) __builtin_prefetch(p + c);
        __builtin_prefetch(p + n - 1);
    }
}
#ifndef PF_TILES
// tiles ahead (QR rows each: 5-10 KB of an int4 / int8 head at K = 640). Zen 4 VM (read bandwidth 33-55 GB/s), plain
// decoding, same process, median ratios over 16 generations: 4, 6 and 8 tiles 1.06-1.08x the speed of 2 (auto
// weights), 1.06-1.12x (int4); the int4 LM head 2.76 -> 2.29 ms at 8 (16-64: no better). 1-3 measured alike on
// the 2-core Xeon (24-34 GB/s)
#define PF_TILES 6
#endif
// How a one-row tile issues its prefetch of the tile PF_TILES ahead: 0 in one burst before the tile, 1 spread over
// the tile's blocks (spread_prefetch: a few lines before each block's loads, in address order), 2 (default) spread
// for int4 and for rows of 1 KB or more, else a burst. A burst of 4 rows x 2 KB (the down projection, K = 2048)
// held up the tile's own loads: the down matrices read at 22-27 GB/s against 31-37 for gate_up. Zen 4 VM, per-phase
// timers (GS_PROFILE), same process, alternating: down 1.15-1.25x the rate spread, the int4 LM head ~1.03x, the
// int8 one (K = 640, light arithmetic per byte) 0.9-0.98x, so it keeps the burst; plain decoding 1.07x (auto) and
// 1.085x (int4), identical tokens.
#ifndef PF_SPREAD
#define PF_SPREAD 2
#endif
#ifndef PF_ROWS
#define PF_ROWS 8  // rows ahead where a weight row is read for several rows of x
#endif
// `rows` weight rows from row `ahead`: values, and scales and biases (streams of their own). Inlined: as a call
// in the tile loop it cost the one-row int4 / int8 heads 10-20% of their rate. Several rows of x (verification)
// take a weight row at a time, each compute-bound on its own: without a prefetch PF_ROWS rows ahead the core
// waited for memory and computed in turn (a 5-row call over the LM head took the sum of both times).
static inline __attribute__((always_inline)) void prefetch_rows(const char *q, size_t row_bytes, const char *s,
                                                                const char *b, size_t srow, size_t ahead, int rows,
                                                                int to_l2) {
    prefetch_span(q + ahead * row_bytes, rows * row_bytes, to_l2);
    prefetch_span(s + ahead * srow, rows * srow, to_l2);
    if (b) prefetch_span(b + ahead * srow, rows * srow, to_l2);
}
#ifdef GS_AVX2
// values k..k+15 (k a multiple of 16) as int16: int4 values are nibbles of bytes (k & 15).. of their 32-value
// chunk, low ones for k & 16 == 0
static inline __attribute__((always_inline)) __m256i load16(const int BITS, const void *qrow, int k) {
    if (BITS == 8) return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)((const int8_t *)qrow + k)));
    const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint8_t *)qrow + (k & ~31) / 2));
    const __m128i v = _mm_and_si128((k & 16) ? _mm_srli_epi16(raw, 4) : raw, _mm_set1_epi8(0x0f));
    return _mm256_cvtepu8_epi16(v);
}

// the g weights of the group from k0 as int16 vectors w[0 .. g/16)
static inline __attribute__((always_inline)) void widen(const int BITS, const int g, const char *q, int k0, __m256i *w) {
    for (int c = 0; c < g; c += 32) {
        if (g == 16) {
            w[0] = load16(BITS, q, k0);
            return;
        }
        if (BITS == 8) {
            w[c / 16] = load16(8, q, k0 + c);
            w[c / 16 + 1] = load16(8, q, k0 + c + 16);
        } else {  // one 16-byte chunk holds both halves: widen the bytes once, then split the nibbles
            const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)((const uint8_t *)q + (k0 + c) / 2)));
            w[c / 16] = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0f));
            w[c / 16 + 1] = _mm256_srli_epi16(bytes, 4);
        }
    }
}

// 8 int32 lanes summing to the exact dot product of a widened group with g values of xq
// (VNNI's vpdpwssd fuses pmaddwd and the add: the same exact int32 lanes in one instruction)
static inline __attribute__((always_inline)) __m256i dot(const int g, const __m256i *w, const int16_t *x) {
    __m256i d = _mm256_madd_epi16(w[0], _mm256_loadu_si256((const __m256i *)x));
    for (int c = 16; c < g; c += 16) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + c));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        d = _mm256_dpwssd_epi32(d, w[c / 16], xv);
#elif defined(__AVXVNNI__)
        d = _mm256_dpwssd_avx_epi32(d, w[c / 16], xv);
#else
        d = _mm256_add_epi32(d, _mm256_madd_epi16(w[c / 16], xv));
#endif
    }
    return d;
}

// The arithmetic of one (weight row, row of x) pair, shared by tile() and tile_rows() so both give the same bits.
// Scales s_j .. s_j+3 as float:
static inline __attribute__((always_inline)) __m128 scales4(int f32, const char *s, int j) {
    return f32 ? _mm_loadu_ps((const float *)s + j)
               : _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)((const uint16_t *)s + j)));
}

// The dots of groups j, j+1 (half 0: kept folded in *h01) or j+2, j+3 (half 1: all four folded, scaled by
// c4 * x's group scales xc and added to *acc).
static inline __attribute__((always_inline)) void fold_groups(int half, __m256i d0, __m256i d1, __m128 c4,
                                                              __m128 xc, __m256i *h01, __m256 *acc) {
    const __m256i h = _mm256_hadd_epi32(d0, d1);
    if (!half) {
        *h01 = h;
        return;
    }
    const __m128 cm = _mm_mul_ps(c4, xc);
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(*h01, h)), _mm256_set_m128(cm, cm), *acc);
}

// A leftover group (ngroups % 4) on its own.
static inline __attribute__((always_inline)) __m256 single_group(__m256i d, float sj, float xscj, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sj * xscj), acc);
}

// out[m] = sum_j b_j * (sum of x row m in group j) for mt rows of x: eight groups per FMA, then the leftover groups
// in order.
static inline __attribute__((always_inline)) void bias_terms(int f32, const char *b, const float *xs, int ngroups,
                                                             const int mt, float *out) {
    __m256 bv[QMT];
    for (int m = 0; m < mt; m++) bv[m] = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= ngroups; j += 8) {
        const __m256 b8 = f32 ? _mm256_loadu_ps((const float *)b + j)
                              : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)b + j)));
        for (int m = 0; m < mt; m++) bv[m] = _mm256_fmadd_ps(b8, _mm256_loadu_ps(xs + (size_t)m * ngroups + j), bv[m]);
    }
    for (int m = 0; m < mt; m++) out[m] = hsum(bv[m]);
    for (; j < ngroups; j++) {
        const float bj = SC(b, j);
        for (int m = 0; m < mt; m++) out[m] += bj * xs[(size_t)m * ngroups + j];
    }
}

// The same with the group bias b_j + off * s_j (b may be NULL): int4 centred against int8 activations.
static inline __attribute__((always_inline)) void centred_bias_terms(int f32, const char *b, const char *s, float off,
                                                                     const float *xs, int ngroups, const int mt,
                                                                     float *out) {
    __m256 bv[QMT];
    for (int m = 0; m < mt; m++) bv[m] = _mm256_setzero_ps();
    const __m256 o8 = _mm256_set1_ps(off);
    int j = 0;
    for (; j + 8 <= ngroups; j += 8) {
        const __m256 s8 = f32 ? _mm256_loadu_ps((const float *)s + j)
                              : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)s + j)));
        const __m256 b8 = !b ? _mm256_setzero_ps()
                          : f32 ? _mm256_loadu_ps((const float *)b + j)
                                : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)b + j)));
        const __m256 c8 = _mm256_fmadd_ps(o8, s8, b8);
        for (int m = 0; m < mt; m++) bv[m] = _mm256_fmadd_ps(c8, _mm256_loadu_ps(xs + (size_t)m * ngroups + j), bv[m]);
    }
    for (int m = 0; m < mt; m++) out[m] = hsum(bv[m]);
    for (; j < ngroups; j++) {
        const float cj = (b ? SC(b, j) : 0.0f) + off * SC(s, j);
        for (int m = 0; m < mt; m++) out[m] += cj * xs[(size_t)m * ngroups + j];
    }
}

// The bias terms of the int8-activation tiles for mt rows of x: int4's centred group bias b_j + 8 s_j (the centring's
// share), or int8's own biases when it has them.
static inline __attribute__((always_inline)) void x8_bias_terms(const int BITS, int f32, const char *b, const char *s,
                                                                const float *xs, int G, const int mt, float *bt) {
    for (int m = 0; m < mt; m++) bt[m] = 0.0f;
    if (BITS == 4)
        centred_bias_terms(f32, b, s, 8.0f, xs, G, mt, bt);
    else if (b)
        bias_terms(f32, b, xs, G, mt, bt);
}

// Groups go four at a time: two horizontal adds fold their four 8-lane dots into one vector
// [d0 d1 d2 d3 | d0' d1' d2' d3'] (each the sum of four lanes of one group's dot, exact in int32), converted and
// scaled by [c0 c1 c2 c3 | c0 c1 c2 c3] (c_j = s_j * xs_j) in one FMA: per group and row of x, two multiply-adds
// and under two other operations, where one convert + broadcast + FMA per group cost as much as the dots. The
// widened weights of two groups are shared by all rows of x in the tile; G = 0 (large groups) widens per row.
// Leftover groups (ngroups % 4) go one at a time. Fixed order, whatever M is.
static inline __attribute__((always_inline)) void tile(const int BITS, const int G, int f32, const char *q,
        const char *s, const char *b, int K, int g_runtime, const int16_t *xq, const float *xsc, const float *xs,
        int ngroups, const int mt, float *r) {
    const int g = G ? G : g_runtime;
    enum { WV = 4 };  // widened vectors kept for a pair of groups of 16 or 32
    __m256 acc[QMT];
    __m256i h01[QMT], wv[WV];
    for (int m = 0; m < mt; m++) acc[m] = _mm256_setzero_ps();
    int j = 0;
    for (; j + 4 <= ngroups; j += 4) {
        for (int half = 0; half < 2; half++) {
            const int j0 = j + 2 * half, k0 = j0 * g;
            if (G) {
                widen(BITS, G, q, k0, wv);
                widen(BITS, G, q, k0 + G, wv + G / 16);
            }
            const __m128 c4 = half ? scales4(f32, s, j) : _mm_setzero_ps();
            for (int m = 0; m < mt; m++) {
                const int16_t *xm = xq + (size_t)m * K + k0;
                __m256i d0, d1;
                if (G) {
                    d0 = dot(G, wv, xm);
                    d1 = dot(G, wv + G / 16, xm + G);
                } else {
                    __m256i w[MAX_GROUP / 16];
                    widen(BITS, g, q, k0, w);
                    d0 = dot(g, w, xm);
                    widen(BITS, g, q, k0 + g, w);
                    d1 = dot(g, w, xm + g);
                }
                const __m128 xc = half ? _mm_loadu_ps(xsc + (size_t)m * ngroups + j) : _mm_setzero_ps();
                fold_groups(half, d0, d1, c4, xc, &h01[m], &acc[m]);
            }
        }
    }
    for (; j < ngroups; j++) {
        const float sj = SC(s, j);
        __m256i w[MAX_GROUP / 16];
        widen(BITS, g, q, j * g, w);
        for (int m = 0; m < mt; m++)
            acc[m] = single_group(dot(g, w, xq + (size_t)m * K + j * g), sj, xsc[(size_t)m * ngroups + j], acc[m]);
    }
    float bt[QMT] = {0.0f};
    if (b) bias_terms(f32, b, xs, ngroups, mt, bt);
    for (int m = 0; m < mt; m++) r[m] = hsum(acc[m]) + bt[m];
}

static inline __attribute__((always_inline)) void tile_rows(const int BITS, const int G, int f32, const char *q,
        size_t row_bytes, const char *s, size_t srow, const char *b, const int16_t *xq, const float *xsc,
        const float *xs, int ngroups, float *r) {
    __m256 acc[QR];
    __m256i h01[QR];
    for (int i = 0; i < QR; i++) acc[i] = _mm256_setzero_ps();
    int j = 0;
    for (; j + 4 <= ngroups; j += 4) {
        for (int half = 0; half < 2; half++) {
            const int k0 = (j + 2 * half) * G;
            const __m128 xc = half ? _mm_loadu_ps(xsc + j) : _mm_setzero_ps();
            for (int i = 0; i < QR; i++) {
                __m256i wv[4];
                widen(BITS, G, q + i * row_bytes, k0, wv);
                widen(BITS, G, q + i * row_bytes, k0 + G, wv + G / 16);
                const __m128 c4 = half ? scales4(f32, s + i * srow, j) : _mm_setzero_ps();
                fold_groups(half, dot(G, wv, xq + k0), dot(G, wv + G / 16, xq + k0 + G), c4, xc, &h01[i], &acc[i]);
            }
        }
    }
    for (; j < ngroups; j++)
        for (int i = 0; i < QR; i++) {
            __m256i w[MAX_GROUP / 16];
            widen(BITS, G, q + i * row_bytes, j * G, w);
            acc[i] = single_group(dot(G, w, xq + j * G), SC(s + i * srow, j), xsc[j], acc[i]);
        }
    for (int i = 0; i < QR; i++) {
        float bt = 0.0f;
        if (b) bias_terms(f32, b + i * srow, xs, ngroups, 1, &bt);
        r[i] = hsum(acc[i]) + bt;
    }
}
#else
static void tile(const int BITS, const int G, int f32, const char *q, const char *s, const char *b, int K,
                 int g_runtime, const int16_t *xq, const float *xsc, const float *xs, int ngroups, const int mt,
                 float *r) {
    const int g = G ? G : g_runtime;
    const uint8_t *qrow = (const uint8_t *)q;
    for (int m = 0; m < mt; m++) {
        float tot[2] = {0.0f, 0.0f}, bacc = 0.0f;
        for (int j = 0; j < ngroups; j++) {
            int32_t dot = 0;
            for (int c = 0; c < g; c++) {
                const int k = j * g + c;  // int4: byte (k & ~31) / 2 + (k & 15), high nibble when k & 16
                const int v = BITS == 8 ? ((const int8_t *)qrow)[k]
                                        : (qrow[(k & ~31) / 2 + (k & 15)] >> ((k & 16) ? 4 : 0)) & 15;
                dot += v * xq[(size_t)m * K + k];
            }
            tot[j & 1] += (float)dot * (SC(s, j) * xsc[(size_t)m * ngroups + j]);
            if (b) bacc += SC(b, j) * xs[(size_t)m * ngroups + j];
        }
        r[m] = tot[0] + tot[1] + bacc;
    }
}

static void tile_rows(const int BITS, const int G, int f32, const char *q, size_t row_bytes, const char *s,
                      size_t srow, const char *b, const int16_t *xq, const float *xsc, const float *xs, int ngroups,
                      float *r) {
    for (int i = 0; i < QR; i++)
        tile(BITS, G, f32, q + i * row_bytes, s + i * srow, b ? b + i * srow : NULL, ngroups * G, G, xq, xsc, xs,
             ngroups, 1, r + i);
}
#endif

// Groups whose largest |x| is below this quantize to zeros: 127 / max|x| (or 32767 / ...) would overflow to
// infinity below ~4e-37 (an undefined conversion to int), and such values are far below any weight's resolution.
#define TINY_GROUP 0x1p-100f

// xq, xsc: the rows of x quantized per group of g (see above); xs: the float sums of x per group (bias term)
static void quantize_rows(const float *x, int M, int K, int g, int with_sums, int16_t *xq, float *xsc, float *xs) {
    for (int i = 0; i < M * (K / g); i++) {
        const float *xi = x + (size_t)i * g;
        float mx = 0.0f, sum = 0.0f;
        for (int c = 0; c < g; c++) {
            const float a = fabsf(xi[c]);
            mx = a > mx ? a : mx;
            sum += xi[c];
        }
        const int finite = isfinite(mx) && !isnan(sum);  // else the row's outputs are NaN, as in PyTorch
        const float inv = finite && mx > TINY_GROUP ? 32767.0f / mx : 0.0f;
        xsc[i] = finite ? mx / 32767.0f : NAN;
        for (int c = 0; c < g; c++) xq[(size_t)i * g + c] = (int16_t)(finite ? (int)rintf(xi[c] * inv) : 0);
        if (with_sums) xs[i] = sum;
    }
}

// ---- row ranges -----------------------------------------------------------------------------------------
// Rows [n_begin, n_end) of y = x @ W^T for one (BITS, group size).
struct job {
    int f32, M, K, G, g;
    const int16_t *xq;
    const float *xsc, *xs;
    const char *q, *s, *b;
    size_t row_bytes, srow;
    int64_t N;
    float *y;
};

#define TILE(B, GC, MTC) tile(B, GC, f32, qn, sn, bn, K, g, xm, xscm, xsm, G, MTC, r)
#if QMT == 8
#define WIDE_TILES(B, GC) case 8: TILE(B, GC, 8); break; case 7: TILE(B, GC, 7); break; \
                          case 6: TILE(B, GC, 6); break; case 5: TILE(B, GC, 5); break;
#else
#define WIDE_TILES(B, GC)
#endif
#define RANGE_FN(NAME, BITS, GC, F32)                                                                                   \
static __attribute__((noinline)) void NAME(const void *ctx, int64_t n_begin, int64_t n_end) {                      \
    const struct job *jb = (const struct job *)ctx;                                                             \
    const int f32 = F32, M = jb->M, K = jb->K, G = jb->G, g = jb->g;                                        \
    const size_t row_bytes = jb->row_bytes, srow = jb->srow;                                                    \
    const int64_t N = jb->N;                                                                                    \
    float r[QMT];                                                                                               \
    int64_t row = n_begin;                                                                                      \
    if (M == 1 && GC) {  /* plain decoding: QR rows of W side by side */                                       \
        for (; row + QR <= n_end; row += QR) {                                                                  \
            if (row + (PF_TILES + 1) * QR <= n_end)                                                             \
                prefetch_rows(jb->q, row_bytes, jb->s, jb->b, srow, (size_t)(row + PF_TILES * QR), QR, 1);         \
            tile_rows(BITS, GC, f32, jb->q + (size_t)row * row_bytes, row_bytes, jb->s + (size_t)row * srow,    \
                      srow, jb->b ? jb->b + (size_t)row * srow : NULL, jb->xq, jb->xsc, jb->xs, G, r);          \
            for (int i = 0; i < QR; i++) jb->y[row + i] = r[i];                                                 \
        }                                                                                                       \
    }                                                                                                           \
    for (; row < n_end; row++) {                                                                                \
        if (M > 1 && row + PF_ROWS < n_end)                                                                     \
            prefetch_rows(jb->q, row_bytes, jb->s, jb->b, srow, (size_t)(row + PF_ROWS), 1, 0);                    \
        const char *qn = jb->q + (size_t)row * row_bytes, *sn = jb->s + (size_t)row * srow;                     \
        const char *bn = jb->b ? jb->b + (size_t)row * srow : NULL;                                             \
        for (int m0 = 0; m0 < M; m0 += QMT) {                                                                   \
            const int tm = M - m0 < QMT ? M - m0 : QMT;                                                         \
            const int16_t *xm = jb->xq + (size_t)m0 * K;                                                        \
            const float *xscm = jb->xsc + (size_t)m0 * G, *xsm = jb->xs ? jb->xs + (size_t)m0 * G : NULL;       \
            switch (tm) {                                                                                       \
                WIDE_TILES(BITS, GC)                                                                            \
                case 4: TILE(BITS, GC, 4); break;                                                               \
                case 3: TILE(BITS, GC, 3); break;                                                               \
                case 2: TILE(BITS, GC, 2); break;                                                               \
                default: TILE(BITS, GC, 1); break;                                                              \
            }                                                                                                   \
            for (int mm = 0; mm < tm; mm++) jb->y[(size_t)(m0 + mm) * N + row] = r[mm];                         \
        }                                                                                                       \
    }                                                                                                           \
}
// every (bits, group size, scale type) its own loop: no branch on the format inside the hot loop
#define RANGE_FNS(SUFFIX, F32)                          \
    RANGE_FN(range_i8_g32_##SUFFIX, 8, 32, F32)         \
    RANGE_FN(range_i8_g16_##SUFFIX, 8, 16, F32)         \
    RANGE_FN(range_i8_any_##SUFFIX, 8, 0, F32)          \
    RANGE_FN(range_i4_g32_##SUFFIX, 4, 32, F32)         \
    RANGE_FN(range_i4_g16_##SUFFIX, 4, 16, F32)         \
    RANGE_FN(range_i4_any_##SUFFIX, 4, 0, F32)
RANGE_FNS(h, 0)  // float16 scales
RANGE_FNS(f, 1)  // float32 scales
#undef RANGE_FNS
#undef RANGE_FN
#undef TILE
#undef WIDE_TILES


// ---- int8 activations: int4 weights in groups of 32, int8 weights in groups of 16 (or 32 without biases) -----
// The int16 path above widens every weight to 16 bits and does 16 multiply-adds per instruction: at one row of x
// (plain decoding) int4 matmuls were bound by those instructions, not by DRAM (~24 GB/s of weights where float32
// ones streamed at ~36). For the formats of GGUF K-quants (Q4_K: int4 in 32s; Q6_K: int8 in 16s), and Q8_0 / Q5_0
// (int8 in 32s, two 16-byte groups sharing a scale), in every matmul of a bfloat16 model (its LM head included)
// x is quantized to int8 per group instead
// (xs_j = max|x in group j| / 127: a relative error of at most 2^-8 of the group's largest value, still well
// below the weights' own) and the weights
// are multiplied as unsigned bytes with vpdpbusd, 32 multiply-adds per instruction: int4 nibbles (0..15) as they
// are, int8 values offset by 128. The integer dot is then that of the centred weights, q - 8 (int4) or q (int8):
// the offset times the integer sum of the group's xq is subtracted exactly, and int4's 8 * s_j goes to the group
// bias term (b_j + 8 s_j, times the float sum of x). Centring matters for int4: the rounding of x is multiplied
// by s * (q - 8) instead of s * q, half as large in RMS (decode-path perplexity of the default model in int4
// 27.39 -> 27.11-27.23; the int16 path: 27.15).
// Both formats keep a group in 16 bytes, so 32 bytes hold a pair of groups j, j+1 and a pair's dot comes out with
// int32 lanes 0-3 summing group j, lanes 4-7 group j+1. int4: the low nibbles are [j: 0..15 | j+1: 0..15], the
// high ones [j: 16..31 | j+1: 16..31], and x is stored in that order (xq8_at); int8: in order.
// Groups go eight at a time: three horizontal adds fold four pairs into [j0 j2 j4 j6 | j1 j3 j5 j7] (exact in
// int32), converted and scaled in one FMA by s and xs in that order (xs and the corrections are stored so, the
// scales are permuted); then the leftover pairs one at a time, then a last odd group. A fixed order whatever M
// is, shared by the tile of several rows of x and the one-row tile of QR weight rows (same bits).
#define BYTE_GROUP(BITS) ((BITS) == 4 ? 32 : 16)  // values per group (16 bytes)

// offset of x value c of group j in a row of G groups
static inline size_t xq8_at(const int BITS, int G, int j, int c) {
    if (BITS == 8 || (j | 1) >= G) return (size_t)j * BYTE_GROUP(BITS) + c;  // in order (int4: a last odd group)
    return (size_t)(j & ~1) * 32 + (c >= 16 ? 32 : 0) + (j & 1) * 16 + (c & 15);
}

// offset of group j's scale / correction in a row of G groups: blocks of eight in the order [0 2 4 6 1 3 5 7],
// then in order
static inline size_t xs8_at(int G, int j) {
    if (j >= G / 8 * 8) return (size_t)j;
    const int i = j & 7;
    return (size_t)(j & ~7) + (i >> 1) + 4 * (i & 1);
}

// One group of g (16 or 32) values of x to int8: q[c] = round(x[c] * 127 / max|x|), *scale = max|x| / 127 (NaN
// when the group has a NaN or infinity: the row's outputs are then NaN, as in PyTorch), *sum = the float sum of
// the group (eight-lane partial sums with AVX2); returns the sum of q. The rounding is to nearest even, as rintf.
static inline __attribute__((always_inline)) int32_t quantize_group_i8(const float *x, int g, int8_t *q, float *scale,
                                                                       float *sum) {
#ifdef GS_AVX2
    __m256 mxv = _mm256_setzero_ps(), sv = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int c = 0; c < g; c += 8) {
        const __m256 v = _mm256_loadu_ps(x + c);
        mxv = _mm256_max_ps(mxv, _mm256_andnot_ps(sign, v));
        sv = _mm256_add_ps(sv, v);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mxv), _mm256_extractf128_ps(mxv, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))), total = hsum(sv);
#else
    float mx = 0.0f, total = 0.0f;
    for (int c = 0; c < g; c++) {
        const float a = fabsf(x[c]);
        mx = a > mx ? a : mx;
        total += x[c];
    }
#endif
    const int finite = isfinite(mx) && !isnan(total);  // a NaN shows in the sum, an infinity in the maximum
    const float inv = finite && mx > TINY_GROUP ? 127.0f / mx : 0.0f;
    int32_t isum = 0;
#ifdef GS_AVX2
    __m256i iv = _mm256_setzero_si256();
    for (int c = 0; c < g; c += 8) {
        const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + c), _mm256_set1_ps(inv)));
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64((__m128i *)(q + c), _mm_packs_epi16(w, w));
        iv = _mm256_add_epi32(iv, v);
    }
    if (finite) {
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(iv), _mm256_extracti128_si256(iv, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
        isum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1)));
    } else {
        memset(q, 0, (size_t)g);
    }
#else
    for (int c = 0; c < g; c++) {
        const int v = finite ? (int)rintf(x[c] * inv) : 0;
        q[c] = (int8_t)v;
        isum += v;
    }
#endif
    *scale = finite ? mx / 127.0f : NAN;
    *sum = total;
    return isum;
}

// xq, xsc as above; xcorr: the offset (int4 8, int8 128) times the sum of xq per group; xs: the float sums of x
// per group (bias terms), in order
static __attribute__((unused)) void quantize_rows_i8(const int BITS, const float *x, int M, int K, int with_sums,
                                                     int8_t *xq, float *xsc, int32_t *xcorr, float *xs) {
    const int g = BYTE_GROUP(BITS), G = K / g;
    for (int m = 0; m < M; m++)
        for (int j = 0; j < G; j++) {
            int8_t q[32];
            float scale, sum;
            const int32_t isum = quantize_group_i8(x + (size_t)m * K + (size_t)j * g, g, q, &scale, &sum);
            int8_t *row = xq + (size_t)m * K;
            if (BITS == 8 || (j | 1) >= G) {
                memcpy(row + xq8_at(BITS, G, j, 0), q, (size_t)g);
            } else {
                memcpy(row + xq8_at(BITS, G, j, 0), q, 16);
                memcpy(row + xq8_at(BITS, G, j, 16), q + 16, 16);
            }
            xsc[(size_t)m * G + xs8_at(G, j)] = scale;
            xcorr[(size_t)m * G + xs8_at(G, j)] = (BITS == 8 ? 128 : 8) * isum;
            if (with_sums) xs[(size_t)m * G + j] = sum;
        }
}

#ifdef GS_X8_512
// The layout of the AVX-512 tiles (tile8 below): blocks of 16 byte groups (zeros past the last group), each block
// for all M rows of x in turn (a tile then finds its rows at fixed offsets). xq: a block as four (int8) or eight (int4) 64-byte vectors, vector v holding in bytes 4l..4l+3 the values
// 4v..4v+3 of the block's group l (int4: v < 4 the values of the low nibbles, 4v..4v+3; v >= 4 those of the high
// ones, 16 + 4(v - 4)..); xc: the groups' scales xs_j, 16 per block; xnc: per group, minus the offset (int4 8,
// int8 128) times the sum of its xq values; xs: the float sums of x per group, in order.
// int4 rows whose last block would hold at most four groups (K = 640: 20 groups) end with a quad instead: those
// groups' 64 bytes as they are, lanes 4l..4l+3 of the dot for group l (a quarter of a block's work)
static inline int x8_quad_tail(int bits, int G) { return bits == 4 && G % 16 != 0 && G % 16 <= 4; }

#define X8_BLOCK_BYTES(BITS) ((BITS) == 4 ? 512 : 256)  // bytes of x per block of 16 groups

static inline size_t x8_blocks(int G) { return (size_t)(G + 15) / 16; }

static void quantize_rows_blocks(const int BITS, const float *x, int M, int K, int with_sums, int8_t *xq, float *xc,
                                 int32_t *xnc, float *xs) {
    const int g = BYTE_GROUP(BITS), G = K / g, XB = X8_BLOCK_BYTES(BITS), off = BITS == 8 ? 128 : 8;
    const size_t nblocks = x8_blocks(G);
    memset(xq, 0, (size_t)M * nblocks * XB);
    memset(xc, 0, sizeof(float) * M * nblocks * 16);
    memset(xnc, 0, sizeof(int32_t) * M * nblocks * 16);
    for (int m = 0; m < M; m++)
        for (int j = 0; j < G; j++) {
            int8_t q[32];
            float scale, sum;
            const int32_t isum = quantize_group_i8(x + (size_t)m * K + (size_t)j * g, g, q, &scale, &sum);
            const size_t block = (size_t)(j / 16) * M + m, l = j % 16;
            if (x8_quad_tail(BITS, G) && j >= G / 16 * 16) {  // see tile8_blocks: lanes 4l..4l+3 are group l's
                memcpy(xq + block * XB + 16 * l, q, 16);
                memcpy(xq + block * XB + 64 + 16 * l, q + 16, 16);
                for (int k = 0; k < 4; k++) {
                    int32_t lane = 0;
                    for (int c = 4 * k; c < 4 * k + 4; c++) lane += q[c] + q[16 + c];
                    xc[block * 16 + 4 * l + k] = scale;
                    xnc[block * 16 + 4 * l + k] = -off * lane;
                }
            } else {
                for (int v = 0; v < g / 4; v++)  // values 4v..4v+3 (int4: v >= 4 are those of the high nibbles)
                    memcpy(xq + block * XB + 64 * v + 4 * l, q + 4 * v, 4);
                xc[block * 16 + l] = scale;
                xnc[block * 16 + l] = -off * isum;
            }
            if (with_sums) xs[(size_t)m * G + j] = sum;
        }
}
#endif

#ifdef GS_AVX2
static inline __attribute__((always_inline)) __m256i dot_u8s8(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, w, x);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, w, x);
#else  // bytes widened to int16 (pmaddubsw could saturate on 255 * 127 * 2); the same exact sum per 128-bit lane
    const __m256i lo = _mm256_madd_epi16(_mm256_unpacklo_epi8(w, _mm256_setzero_si256()),
                                         _mm256_srai_epi16(_mm256_unpacklo_epi8(x, x), 8));
    const __m256i hi = _mm256_madd_epi16(_mm256_unpackhi_epi8(w, _mm256_setzero_si256()),
                                         _mm256_srai_epi16(_mm256_unpackhi_epi8(x, x), 8));
    return _mm256_add_epi32(acc, _mm256_add_epi32(lo, hi));
#endif
}

// the weight vectors of groups j, j+1 (the 32 bytes at q): int4 low and high nibbles, int8 offset to unsigned
static inline __attribute__((always_inline)) void pair_weights(const int BITS, const char *q, __m256i *a, __m256i *b) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)q);
    if (BITS == 8) {
        *a = _mm256_xor_si256(raw, _mm256_set1_epi8((char)0x80));
        return;
    }
    const __m256i mask = _mm256_set1_epi8(0x0f);
    *a = _mm256_and_si256(raw, mask);
    *b = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
}

static inline __attribute__((always_inline)) __m256i pair_dot(const int BITS, __m256i a, __m256i b, const int8_t *x) {
    const __m256i d = dot_u8s8(_mm256_setzero_si256(), a, _mm256_loadu_si256((const __m256i *)x));
    return BITS == 8 ? d : dot_u8s8(d, b, _mm256_loadu_si256((const __m256i *)(x + 32)));
}

// the scales of byte groups j .. j+7 in the order [0 2 4 6 1 3 5 7]: s_j .. s_j+7 (SG = 0), or with one scale per
// pair of byte groups (SG = 1: int8 in groups of 32) s_j/2 .. s_j/2+3 twice
static inline __attribute__((always_inline)) __m256 scales8(const int SG, int f32, const char *s, int j) {
    if (SG) {
        const __m128 v = f32 ? _mm_loadu_ps((const float *)s + j / 2)
                             : _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)((const uint16_t *)s + j / 2)));
        return _mm256_set_m128(v, v);
    }
    const __m256 v = f32 ? _mm256_loadu_ps((const float *)s + j)
                         : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)s + j)));
    return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
}

// pairs (j, j+1) + (j+2, j+3) folded: half 0 keeps them in *h, half 1 (groups j+4..j+7) folds all eight, less
// the corrections, scaled by c8 * xs8 into *acc
static inline __attribute__((always_inline)) void fold_pairs(int half, __m256i d0, __m256i d1, __m256 c8,
        const float *xs8, const int32_t *corr8, __m256i *h, __m256 *acc) {
    const __m256i f = _mm256_hadd_epi32(d0, d1);
    if (!half) {
        *h = f;
        return;
    }
    const __m256i t = _mm256_sub_epi32(_mm256_hadd_epi32(*h, f), _mm256_loadu_si256((const __m256i *)corr8));
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(c8, _mm256_loadu_ps(xs8)), *acc);
}

// a leftover pair (j, j+1), less the corrections: lanes 0-3 scaled by c0 = s_j xs_j, lanes 4-7 by c1
static inline __attribute__((always_inline)) __m256 pair_leftover(__m256i d, const int32_t *corr, float c0, float c1,
                                                                  __m256 acc) {
    d = _mm256_sub_epi32(d, _mm256_setr_epi32(corr[0], 0, 0, 0, corr[1], 0, 0, 0));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set_m128(_mm_set1_ps(c1), _mm_set1_ps(c0)), acc);
}

// a last odd group j: its 16 bytes at q, x in order
static inline __attribute__((always_inline)) __m256 odd_group(const int BITS, const char *q, const int8_t *x,
                                                              int32_t corr, float c, __m256 acc) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)q), mask = _mm_set1_epi8(0x0f);
    __m256i d;
    if (BITS == 8) {
        const __m256i w = _mm256_zextsi128_si256(_mm_xor_si128(raw, _mm_set1_epi8((char)0x80)));
        d = dot_u8s8(_mm256_setzero_si256(), w, _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)x)));
    } else {
        const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
        d = dot_u8s8(_mm256_setzero_si256(), w, _mm256_loadu_si256((const __m256i *)x));
    }
    d = _mm256_sub_epi32(d, _mm256_setr_epi32(corr, 0, 0, 0, 0, 0, 0, 0));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(c), acc);
}

#ifdef GS_X8_512
// AVX-512 (VNNI): byte groups sixteen at a time, and no horizontal adds. The AVX2 fold above spends three
// horizontal adds (shuffle-port uops) per eight groups and row of x, so every extra row of x cost ~40% of the
// first at the verification shape. Here the block's 256 weight bytes (16 groups of 16) are transposed in registers
// once per weight row (eight two-source permutes: vector v, int32 lane l = bytes 4v..4v+3 of group l), so four
// vpdpbusd (int4: eight, the nibbles split after the transpose) leave in lane l the whole dot of group l with x (laid
// out to match, quantize_rows_blocks), started from the group's offset correction: exact and centred. Per block and
// row of x then one convert, a multiply by the 16 scales s_j xs_j and one FMA into a 16-lane float accumulator.
// A last partial block is read under a mask (zero bytes and scales); int4's last <= 4 groups go as a quad instead
// (x8_quad_tail). Fixed order per (weight row, row of x)
// whatever M is: blocks in order, then a 16-lane sum, then the bias term (as the AVX2 path).
// the 16 scales of block k (nb groups): s_j (SG = 0) or s_(j/2) (SG = 1)
static inline __attribute__((always_inline)) __m512 block_scales(const int SG, int f32, const char *s, int k, int nb) {
    if (SG) {
        const int n = (nb + 1) / 2;
        const __mmask8 m = (__mmask8)((1u << n) - 1);
        const __m256 v = f32 ? _mm256_maskz_loadu_ps(m, (const float *)s + 8 * k)
                             : _mm256_cvtph_ps(_mm_maskz_loadu_epi16(m, (const uint16_t *)s + 8 * k));
        return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
                                     _mm512_castps256_ps512(v));
    }
    const __mmask16 m = nb == 16 ? (__mmask16)0xffff : (__mmask16)((1u << nb) - 1);
    return f32 ? _mm512_maskz_loadu_ps(m, (const float *)s + 16 * k)
               : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)s + 16 * k));
}

// a block's four vectors of weight bytes as in[0..3] (groups 0-3, 4-7, ...) transposed into t: lane l of t[v] =
// bytes 4v..4v+3 of group l
static inline __attribute__((always_inline)) void transpose_block(const __m512i *in, __m512i *t) {
    // stage 1: groups 0-7 (in0, in1) and 8-15 (in2, in3), their dwords 0, 1 (a) and 2, 3 (b), as lane 2g + v
    const __m512i ia = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
    const __m512i ib = _mm512_add_epi32(ia, _mm512_set1_epi32(2));
    const __m512i a01 = _mm512_permutex2var_epi32(in[0], ia, in[1]), b01 = _mm512_permutex2var_epi32(in[0], ib, in[1]);
    const __m512i a23 = _mm512_permutex2var_epi32(in[2], ia, in[3]), b23 = _mm512_permutex2var_epi32(in[2], ib, in[3]);
    // stage 2: dword v of group l in lane l
    const __m512i i0 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i i1 = _mm512_add_epi32(i0, _mm512_set1_epi32(1));
    t[0] = _mm512_permutex2var_epi32(a01, i0, a23), t[1] = _mm512_permutex2var_epi32(a01, i1, a23);
    t[2] = _mm512_permutex2var_epi32(b01, i0, b23), t[3] = _mm512_permutex2var_epi32(b01, i1, b23);
}

// block k's weights (nb groups at q + 256 k) transposed: w[v] lane l = bytes 4v..4v+3 of group l; then int4's low
// nibbles in w[0..3], high ones in w[4..7]; int8's offset to unsigned bytes
static inline __attribute__((always_inline)) void block_weights(const int BITS, int pre, const char *q, int k,
                                                                int nb, __m512i *w) {
    __m512i in[4], t[4];
    const char *p = q + (size_t)k * 256;
    for (int u = 0; u < 4; u++) {
        if (nb == 16) {
            in[u] = _mm512_loadu_si512((const void *)(p + 64 * u));
        } else {
            const int bytes = 16 * nb - 64 * u;  // of this vector
            const __mmask64 m = bytes >= 64 ? ~(__mmask64)0 : bytes <= 0 ? 0 : ((__mmask64)1 << bytes) - 1;
            in[u] = _mm512_maskz_loadu_epi8(m, p + 64 * u);
        }
    }
    if (pre && nb == 16) {  // stored transposed (the block layout)
        for (int v = 0; v < 4; v++) t[v] = in[v];
    } else {
        transpose_block(in, t);
    }
    if (BITS == 8) {
        for (int v = 0; v < 4; v++) w[v] = _mm512_xor_si512(t[v], _mm512_set1_epi8((char)0x80));
        return;
    }
    const __m512i mask = _mm512_set1_epi8(0x0f);
    for (int v = 0; v < 4; v++) {
        w[v] = _mm512_and_si512(t[v], mask);
        w[4 + v] = _mm512_and_si512(_mm512_srli_epi16(t[v], 4), mask);
    }
}

// acc += (the 16 centred dots of a block for one row of x: its values x, scales xc, corrections xnc) * s * xs, over
// nv weight vectors w (a block: 4 for int8, 8 for int4; int4's tail quad: 2, its low and high nibbles)
static inline __attribute__((always_inline)) __m512 block_fma(const int nv, const __m512i *w, __m512 s16,
        const int8_t *x, const float *xc, const int32_t *xnc, __m512 acc) {
    __m512i d = _mm512_loadu_si512((const void *)xnc);
    for (int v = 0; v < nv; v++)
        d = _mm512_dpbusd_epi32(d, w[v], _mm512_loadu_si512((const void *)(x + 64 * v)));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s16, _mm512_loadu_ps(xc)), acc);
}

// The tail quad (nb <= 4 int4 groups at q + 256 k, x as quantize_rows_blocks lays it out, lanes 4l..4l+3 for
// group l): its low and high nibbles in w[0], w[1] for block_fma, and its scales per lane
static inline __attribute__((always_inline)) void quad_weights(const char *q, int k, int nb, __m512i *w) {
    const __mmask64 m = nb >= 4 ? ~(__mmask64)0 : ((__mmask64)1 << (16 * nb)) - 1;
    const __m512i raw = _mm512_maskz_loadu_epi8(m, q + (size_t)k * 256);
    const __m512i mask = _mm512_set1_epi8(0x0f);
    w[0] = _mm512_and_si512(raw, mask);
    w[1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
}

static inline __attribute__((always_inline)) __m512 quad_scales(int f32, const char *s, int k, int nb) {
    const __mmask8 m = (__mmask8)((1u << nb) - 1);
    const __m128 v = f32 ? _mm_maskz_loadu_ps(m, (const float *)s + 16 * k)
                         : _mm_cvtph_ps(_mm_maskz_loadu_epi16(m, (const uint16_t *)s + 16 * k));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(v));
}

// The bias terms' factors of block k's nb groups (lanes 0..nb-1) for one weight row: int4's centred group bias
// b_j + 8 s_j, int8's own b_j; each multiplies the float sum of x over its group (xs16)
static inline __attribute__((always_inline)) __m512 block_bias(const int BITS, int f32, const char *b, const char *s,
                                                               int k, int nb) {
    const __m512 bv = b ? block_scales(0, f32, b, k, nb) : _mm512_setzero_ps();
    return BITS == 4 ? _mm512_fmadd_ps(_mm512_set1_ps(8.0f), block_scales(0, f32, s, k, nb), bv) : bv;
}

static inline __attribute__((always_inline)) __m512 xs16(const float *xs, int k, int nb) {
    return _mm512_maskz_loadu_ps(nb == 16 ? (__mmask16)0xffff : (__mmask16)((1u << nb) - 1), xs + 16 * k);
}

static inline float hsum16(__m512 v) {
    return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

// acc + one int4 weight row's tail quad k (nb groups) with one row of x: its dots (x at xk, scales xc,
// corrections xn) and its bias terms (xs16 of x's group sums)
static inline __attribute__((always_inline)) __m512 quad_row(int f32, const char *q, const char *s, const char *b, int k,
        int nb, const int8_t *xk, const float *xc, const int32_t *xn, __m512 x16, __m512 acc) {
    __m512i w[2];
    quad_weights(q, k, nb, w);
    acc = block_fma(2, w, quad_scales(f32, s, k, nb), xk, xc, xn, acc);
    return _mm512_fmadd_ps(block_bias(4, f32, b, s, k, nb), x16, acc);
}

// one weight row (q, s, b) x mt rows of x; byte group j's scale is s[j >> SG] (b: none when SG = 1). xq_stride,
// xc_stride: from one block of x to the next. pre: the row is in the block layout
static inline __attribute__((always_inline)) void tile8_blocks(const int BITS, int pre, const int SG, int f32, const char *q, const char *s,
        const char *b, size_t xq_stride, const int8_t *xq, const float *xsc, const int32_t *xcorr, size_t xc_stride,
        const float *xs, int G, const int mt, float *r) {
    const int XB = X8_BLOCK_BYTES(BITS), with_bias = BITS == 4 || b;
    __m512 acc[QMT];
    for (int m = 0; m < mt; m++) acc[m] = _mm512_setzero_ps();
    const int nblocks = (int)x8_blocks(G);
    for (int k = 0; k < nblocks; k++) {
        const int nb = G - 16 * k < 16 ? G - 16 * k : 16;
        const int8_t *xk = xq + k * xq_stride;
        const float *ck = xsc + k * xc_stride;
        const int32_t *nk = xcorr + k * xc_stride;
        const __m512 c16 = with_bias ? block_bias(BITS, f32, b, s, k, nb) : _mm512_setzero_ps();
        __m512i w[8];
        if (nb < 16 && x8_quad_tail(BITS, G)) {
            quad_weights(q, k, nb, w);
            const __m512 s16 = quad_scales(f32, s, k, nb);
            for (int m = 0; m < mt; m++) {
                acc[m] = block_fma(2, w, s16, xk + m * XB, ck + 16 * m, nk + 16 * m, acc[m]);
                if (with_bias) acc[m] = _mm512_fmadd_ps(c16, xs16(xs + (size_t)m * G, k, nb), acc[m]);
            }
            continue;
        }
        block_weights(BITS, pre, q, k, nb, w);
        const __m512 s16 = block_scales(SG, f32, s, k, nb);
        for (int m = 0; m < mt; m++) {
            acc[m] = block_fma(BITS == 4 ? 8 : 4, w, s16, xk + m * XB, ck + 16 * m, nk + 16 * m, acc[m]);
            if (with_bias) acc[m] = _mm512_fmadd_ps(c16, xs16(xs + (size_t)m * G, k, nb), acc[m]);
        }
    }
    for (int m = 0; m < mt; m++) r[m] = hsum16(acc[m]);
}

// step c of n of a tile's prefetch of the QR rows at pf: the c-th n-th of their lines, in address order
static inline __attribute__((always_inline)) void spread_prefetch(const char *pf, size_t row_bytes, int c, int n) {
    const size_t lines = (QR * row_bytes + 63) / 64, l0 = lines * c / n, l1 = lines * (c + 1) / n;
    for (size_t l = l0; l < l1; l++) __builtin_prefetch(pf + 64 * l, 0, 2);
}

// one row of x, QR weight rows side by side: tile8_blocks' operations for mt = 1, row by row in the same order
static inline __attribute__((always_inline)) void tile8_rows_blocks(const int BITS, int pre, const int SG, int f32, const char *q,
        size_t row_bytes, const char *s, size_t srow, const char *b, const int8_t *xq, const float *xsc,
        const int32_t *xcorr, const float *xs, int G, const char *pf, float *r) {
    const int with_bias = BITS == 4 || b;
    __m512 acc[QR];
    for (int i = 0; i < QR; i++) acc[i] = _mm512_setzero_ps();
    const int nblocks = (int)x8_blocks(G);
    for (int k = 0; k < nblocks; k++) {
        const int nb = G - 16 * k < 16 ? G - 16 * k : 16;
        const int8_t *xk = xq + (size_t)k * X8_BLOCK_BYTES(BITS);
        const __m512 x16 = with_bias ? xs16(xs, k, nb) : _mm512_setzero_ps();
        if (nb < 16 && x8_quad_tail(BITS, G)) {
            for (int i = 0; i < QR; i++) {
                if (pf) spread_prefetch(pf, row_bytes, k * QR + i, nblocks * QR);
                acc[i] = quad_row(f32, q + i * row_bytes, s + i * srow, b ? b + i * srow : NULL, k, nb, xk,
                                  xsc + 16 * k, xcorr + 16 * k, x16, acc[i]);
            }
            continue;
        }
        for (int i = 0; i < QR; i++) {
            if (pf) spread_prefetch(pf, row_bytes, k * QR + i, nblocks * QR);
            const char *si = s + i * srow, *bi = b ? b + i * srow : NULL;
            __m512i w[8];
            block_weights(BITS, pre, q + i * row_bytes, k, nb, w);
            acc[i] = block_fma(BITS == 4 ? 8 : 4, w, block_scales(SG, f32, si, k, nb), xk, xsc + 16 * k,
                               xcorr + 16 * k, acc[i]);
            if (with_bias) acc[i] = _mm512_fmadd_ps(block_bias(BITS, f32, bi, si, k, nb), x16, acc[i]);
        }
    }
    for (int i = 0; i < QR; i++) r[i] = hsum16(acc[i]);
}

#ifndef GS_NO_FIXED_ROWS
// tile8_rows_blocks for int4 rows in the block layout whose group count G is a constant (the range functions
// range_i4x8_*_gG below): the same operations per row in the same order (same bits), but with the block count
// known the loops unroll, the QR rows' accumulators stay in registers (the general tile keeps them on the stack), and
// each block's eight dots run as two chains, low and high nibbles (int32 sums: exact in any order), where one chain
// waited on vpdpbusd's latency. Zen 4, one thread, in cache: 1.2-1.35x the rate of tile8_rows_blocks at K = 640,
// 1024, 2048. (The same for int8 at K = 640 computed 1.1x faster in cache but read the LM head 1.12x slower on two
// threads: not used.)
static inline __attribute__((always_inline)) void tile8_rows_i4(const int G, int f32, const char *q, size_t row_bytes,
        const char *s, size_t srow, const char *b, const int8_t *xq, const float *xsc, const int32_t *xcorr,
        const float *xs, const char *pf, float *r) {
    const int NF = G / 16, NQ = G % 16, nblocks = NF + (NQ ? 1 : 0);
    const __m512i mask = _mm512_set1_epi8(0x0f);
    __m512 acc[QR];
#pragma GCC unroll 4
    for (int i = 0; i < QR; i++) acc[i] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int k = 0; k < NF; k++) {
        const int8_t *xk = xq + (size_t)k * X8_BLOCK_BYTES(4);
        const __m512 x16 = xs16(xs, k, 16), xc = _mm512_loadu_ps(xsc + 16 * k);
        const __m512i xn = _mm512_loadu_si512((const void *)(xcorr + 16 * k));
#pragma GCC unroll 4
        for (int i = 0; i < QR; i++) {
            if (pf) spread_prefetch(pf, row_bytes, k * QR + i, nblocks * QR);
            const char *p = q + i * row_bytes + (size_t)k * 256, *si = s + i * srow, *bi = b ? b + i * srow : NULL;
            __m512i lo = xn, hi = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) {  // bytes 4v.. of each group: low nibbles against x vector v, high ones 4 + v
                const __m512i raw = _mm512_loadu_si512((const void *)(p + 64 * v));
                lo = _mm512_dpbusd_epi32(lo, _mm512_and_si512(raw, mask), _mm512_loadu_si512((const void *)(xk + 64 * v)));
                hi = _mm512_dpbusd_epi32(hi, _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask),
                                         _mm512_loadu_si512((const void *)(xk + 64 * (4 + v))));
            }
            const __m512 s16 = block_scales(0, f32, si, k, 16);
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), _mm512_mul_ps(s16, xc), acc[i]);
            acc[i] = _mm512_fmadd_ps(block_bias(4, f32, bi, si, k, 16), x16, acc[i]);
        }
    }
    if (NQ) {  // the tail quad, as tile8_rows_blocks
        const int8_t *xk = xq + (size_t)NF * X8_BLOCK_BYTES(4);
        const __m512 x16 = xs16(xs, NF, NQ);
#pragma GCC unroll 4
        for (int i = 0; i < QR; i++) {
            if (pf) spread_prefetch(pf, row_bytes, NF * QR + i, nblocks * QR);
            acc[i] = quad_row(f32, q + i * row_bytes, s + i * srow, b ? b + i * srow : NULL, NF, NQ, xk,
                              xsc + 16 * NF, xcorr + 16 * NF, x16, acc[i]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < QR; i++) r[i] = hsum16(acc[i]);
}
#endif
#endif  // GS_X8_512
// one weight row (q, s, b) x mt rows of x; byte group j's scale is s[j >> SG] (b: none when SG = 1)
static inline __attribute__((always_inline)) void tile8(const int BITS, const int SG, int f32, const char *q, const char *s,
        const char *b, size_t xq_row, const int8_t *xq, const float *xsc, const int32_t *xcorr, size_t xc_row,
        const float *xs, int G, const int mt, float *r) {
    const int GX = BYTE_GROUP(BITS);  // x values per group
    __m256 acc[QMT];
    __m256i h[QMT];
    for (int m = 0; m < mt; m++) acc[m] = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= G; j += 8)
        for (int half = 0; half < 2; half++) {
            const int j0 = j + 4 * half;
            __m256i a0, b0, a1, b1;
            pair_weights(BITS, q + (size_t)j0 * 16, &a0, &b0);
            pair_weights(BITS, q + (size_t)j0 * 16 + 32, &a1, &b1);
            const __m256 c8 = half ? scales8(SG, f32, s, j) : _mm256_setzero_ps();
            for (int m = 0; m < mt; m++) {
                const int8_t *xm = xq + m * xq_row + (size_t)j0 * GX;
                fold_pairs(half, pair_dot(BITS, a0, b0, xm), pair_dot(BITS, a1, b1, xm + 2 * GX), c8,
                           xsc + m * xc_row + j, xcorr + m * xc_row + j, &h[m], &acc[m]);
            }
        }
    for (; j + 2 <= G; j += 2) {
        __m256i a, bb;
        pair_weights(BITS, q + (size_t)j * 16, &a, &bb);
        const float s0 = SC(s, j >> SG), s1 = SC(s, (j + 1) >> SG);
        for (int m = 0; m < mt; m++) {
            const float *xc = xsc + m * xc_row + j;
            acc[m] = pair_leftover(pair_dot(BITS, a, bb, xq + m * xq_row + (size_t)j * GX),
                                   xcorr + m * xc_row + j, s0 * xc[0], s1 * xc[1], acc[m]);
        }
    }
    if (j < G)
        for (int m = 0; m < mt; m++)
            acc[m] = odd_group(BITS, q + (size_t)j * 16, xq + m * xq_row + (size_t)j * GX,
                               xcorr[m * xc_row + j], SC(s, j >> SG) * xsc[m * xc_row + j], acc[m]);
    float bt[QMT];
    x8_bias_terms(BITS, f32, b, s, xs, G, mt, bt);
    for (int m = 0; m < mt; m++) r[m] = hsum(acc[m]) + bt[m];
}

// one row of x, QR weight rows side by side: tile8's operations for mt = 1, row by row in the same order
static inline __attribute__((always_inline)) void tile8_rows(const int BITS, const int SG, int f32, const char *q,
        size_t row_bytes, const char *s, size_t srow, const char *b, const int8_t *xq, const float *xsc,
        const int32_t *xcorr, const float *xs, int G, const char *pf, float *r) {
    if (pf) prefetch_span(pf, QR * row_bytes, 1);
    const int GX = BYTE_GROUP(BITS);
    __m256 acc[QR];
    __m256i h[QR];
    for (int i = 0; i < QR; i++) acc[i] = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= G; j += 8)
        for (int half = 0; half < 2; half++) {
            const int j0 = j + 4 * half;
            const int8_t *x0 = xq + (size_t)j0 * GX;
            for (int i = 0; i < QR; i++) {
                __m256i a0, b0, a1, b1;
                pair_weights(BITS, q + i * row_bytes + (size_t)j0 * 16, &a0, &b0);
                pair_weights(BITS, q + i * row_bytes + (size_t)j0 * 16 + 32, &a1, &b1);
                const __m256 c8 = half ? scales8(SG, f32, s + i * srow, j) : _mm256_setzero_ps();
                fold_pairs(half, pair_dot(BITS, a0, b0, x0), pair_dot(BITS, a1, b1, x0 + 2 * GX), c8, xsc + j,
                           xcorr + j, &h[i], &acc[i]);
            }
        }
    for (; j + 2 <= G; j += 2)
        for (int i = 0; i < QR; i++) {
            __m256i a, bb;
            pair_weights(BITS, q + i * row_bytes + (size_t)j * 16, &a, &bb);
            const char *si = s + i * srow;
            acc[i] = pair_leftover(pair_dot(BITS, a, bb, xq + (size_t)j * GX), xcorr + j, SC(si, j >> SG) * xsc[j],
                                   SC(si, (j + 1) >> SG) * xsc[j + 1], acc[i]);
        }
    if (j < G)
        for (int i = 0; i < QR; i++)
            acc[i] = odd_group(BITS, q + i * row_bytes + (size_t)j * 16, xq + (size_t)j * GX, xcorr[j],
                               SC(s + i * srow, j >> SG) * xsc[j], acc[i]);
    for (int i = 0; i < QR; i++) {
        float bt;
        x8_bias_terms(BITS, f32, b ? b + i * srow : NULL, s + i * srow, xs, G, 1, &bt);
        r[i] = hsum(acc[i]) + bt;
    }
}
#else
static void tile8(const int BITS, const int SG, int f32, const char *q, const char *s, const char *b, size_t xq_row,
                  const int8_t *xq, const float *xsc, const int32_t *xcorr, size_t xc_row, const float *xs, int G,
                  const int mt, float *r) {
    const int g = BYTE_GROUP(BITS);
    for (int m = 0; m < mt; m++) {
        float tot[2] = {0.0f, 0.0f}, bacc = 0.0f;
        for (int j = 0; j < G; j++) {
            int32_t dot = 0;  // the dot of the centred weights (the offsets and corrections cancel exactly)
            for (int c = 0; c < g; c++) {
                const int v = BITS == 8 ? ((const int8_t *)q)[j * 16 + c]
                                        : ((((const uint8_t *)q)[j * 16 + (c & 15)] >> (c & 16 ? 4 : 0)) & 15) - 8;
                dot += v * xq[m * xq_row + xq8_at(BITS, G, j, c)];
            }
            tot[j & 1] += (float)dot * (SC(s, j >> SG) * xsc[m * xc_row + xs8_at(G, j)]);
            if (b || BITS == 4) bacc += ((b ? SC(b, j) : 0.0f) + (BITS == 4 ? 8.0f * SC(s, j) : 0.0f)) * xs[(size_t)m * G + j];
        }
        r[m] = tot[0] + tot[1] + bacc;
    }
    (void)xcorr;
}

static void tile8_rows(const int BITS, const int SG, int f32, const char *q, size_t row_bytes, const char *s,
                       size_t srow, const char *b, const int8_t *xq, const float *xsc, const int32_t *xcorr,
                       const float *xs, int G, const char *pf, float *r) {
    (void)pf;
    for (int i = 0; i < QR; i++)
        tile8(BITS, SG, f32, q + i * row_bytes, s + i * srow, b ? b + i * srow : NULL, (size_t)G * BYTE_GROUP(BITS), xq,
              xsc, xcorr, (size_t)G, xs, G, 1, r + i);
}
#endif

// Where the CPU has them, int8 weights take the AVX-512 blocks, and int4 ones when their groups fill whole blocks
// (G % 16 == 0: Gemma 3 270M's o and down projections) or end with at most four (a quad, x8_quad_tail: K = 640).
// Other int4 shapes keep the AVX2 tiles: a nearly empty last block doubled the work at K = 640 (all-int4 plain
// step 10.3-10.9 ms against 9.4-10.2 before the quad tail; with it the 5-token step is 19.0-19.4 ms against
// 22.2-23.5 with the AVX2 tiles, the plain step level). A matrix takes one path for every M (its outputs stay bit
// for bit independent of M). -DGS_INT4_AVX2 keeps int4 in the AVX2 tiles (an A/B switch).
#ifdef GS_X8_512
static inline int x8_blocks_for(int bits, int G) {
#ifdef GS_INT4_AVX2
    (void)G;
    return bits == 8;
#else
    return bits == 8 || G % 16 == 0 || x8_quad_tail(bits, G);
#endif
}
#define TILE8_CALL(FN, BITS, ...) (jb->blocks ? FN##_blocks(BITS, jb->blocked, __VA_ARGS__) : FN(BITS, __VA_ARGS__))
#else
#define TILE8_CALL(FN, BITS, ...) FN(BITS, __VA_ARGS__)
#endif

// A running first maximum of a row of outputs (torch.argmax: the first NaN, else the first largest value), one
// per thread's range of rows, merged in range order (ops.c gso_argmax's rule)
struct first_max {
    float val;
    int64_t at;
    int nan;
};

static inline void first_max_take(struct first_max *f, float v, int64_t at) {
    if (f->nan) return;
    if (v != v) {
        f->nan = 1, f->at = at;
    } else if (v > f->val) {
        f->val = v, f->at = at;
    }
}

static inline int this_thread(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

#if defined(GS_X8_512) && !defined(GS_NO_FIXED_ROWS)
#define FIXED_TILE(GC)                                                                                    \
    tile8_rows_i4(GC, f32, jb->q + (size_t)row * row_bytes, row_bytes, jb->s + (size_t)row * srow, srow,   \
                  jb->b ? jb->b + (size_t)row * srow : NULL, jb->xq, jb->xsc, jb->xcorr, jb->xs, spread ? pf : NULL, r)
#else
#define FIXED_TILE(GC) ((void)0)
#endif
struct job8 {
    int M, K, G, blocks, blocked;  // blocks: the AVX-512 block tiles and x layout; blocked: W in the block layout
    size_t xq_step, xc_step;      // from one row of x to the next: bytes of xq, values of xsc / xcorr
    size_t xq_stride, xc_stride;  // what tile8 takes: the same (AVX2), or from one block of x to the next (AVX-512)
    const int8_t *xq;
    const float *xsc;
    const int32_t *xcorr;
    const float *xs;
    const char *q, *s, *b;
    size_t srow;
    int64_t N;
    float *y;                // NULL: not stored (M = 1 with maxima)
    struct first_max *maxima;  // NULL, or M = 1: each thread's first maximum of y over its rows
    int n_maxima;  // its entries (a call on one thread inside another team, split_rows running it on the caller,
                   // writes entry 0 whatever its number there: the only range)
};

#define TILE8(MTC) TILE8_CALL(tile8, BITS, SG, f32, qn, sn, bn, jb->xq_stride, jb->xq + m0 * jb->xq_step, jb->xsc + m0 * jb->xc_step, \
                         jb->xcorr + m0 * jb->xc_step, jb->xc_stride, jb->xs ? jb->xs + (size_t)m0 * G : NULL, G, MTC, r)
#if QMT == 8
#define WIDE_TILES8 case 8: TILE8(8); break; case 7: TILE8(7); break; case 6: TILE8(6); break; case 5: TILE8(5); break;
#else
#define WIDE_TILES8
#endif
// GC: a constant group count (int4, one row of x, the block layout: tile8_rows_i4; linear_x8 takes these for
// M = 1 only), or 0 (G and M read at run time)
#define RANGE8_FN(NAME, B, SGV, F32, GC)                                                                           \
static __attribute__((noinline)) void NAME(const void *ctx, int64_t n_begin, int64_t n_end) {                      \
    const struct job8 *jb = (const struct job8 *)ctx;                                                           \
    const int BITS = B, SG = SGV, f32 = F32, M = GC ? 1 : jb->M, G = GC ? GC : jb->G;  /* (GC: one row of x) */  \
    const size_t row_bytes = (size_t)G * 16, srow = jb->srow;                                                   \
    float r[QMT];                                                                                               \
    int64_t row = n_begin;                                                                                      \
    struct first_max best = {-INFINITY, n_begin, 0};                                                            \
    if (M == 1) {                                                                                               \
        for (; row + QR <= n_end; row += QR) {                                                                  \
            const int ahead = row + (PF_TILES + 1) * QR <= n_end;                                               \
            const char *pf = ahead ? jb->q + (size_t)(row + PF_TILES * QR) * row_bytes : NULL;                  \
            const int spread = PF_SPREAD == 1 || (PF_SPREAD == 2 && (BITS == 4 || row_bytes >= 1024));         \
            if (ahead && spread) {                                                                              \
                prefetch_span(jb->s + (size_t)(row + PF_TILES * QR) * srow, QR * srow, 1);                      \
                if (jb->b) prefetch_span(jb->b + (size_t)(row + PF_TILES * QR) * srow, QR * srow, 1);           \
            } else if (ahead) {                                                                                 \
                prefetch_rows(jb->q, row_bytes, jb->s, jb->b, srow, (size_t)(row + PF_TILES * QR), QR, 1);         \
            }                                                                                                   \
            if (GC) {                                                                                           \
                FIXED_TILE(GC);                                                                                 \
            } else {                                                                                            \
                TILE8_CALL(tile8_rows, BITS, SG, f32, jb->q + (size_t)row * row_bytes, row_bytes, jb->s + (size_t)row * srow, srow, \
                           jb->b ? jb->b + (size_t)row * srow : NULL, jb->xq, jb->xsc, jb->xcorr, jb->xs, G,     \
                           spread ? pf : NULL, r);                                                              \
            }                                                                                                   \
            if (jb->y)                                                                                          \
                for (int i = 0; i < QR; i++) jb->y[row + i] = r[i];                                             \
            if (jb->maxima)                                                                                     \
                for (int i = 0; i < QR; i++) first_max_take(&best, r[i], row + i);                              \
        }                                                                                                       \
    }                                                                                                           \
    for (; row < n_end; row++) {                                                                                \
        if (M > 1 && row + PF_ROWS < n_end)                                                                     \
            prefetch_rows(jb->q, row_bytes, jb->s, jb->b, srow, (size_t)(row + PF_ROWS), 1, 0);                    \
        const char *qn = jb->q + (size_t)row * row_bytes, *sn = jb->s + (size_t)row * srow;                     \
        const char *bn = jb->b ? jb->b + (size_t)row * srow : NULL;                                             \
        for (size_t m0 = 0; m0 < (size_t)M; m0 += QMT) {                                                        \
            const int tm = M - (int)m0 < QMT ? M - (int)m0 : QMT;                                               \
            switch (tm) {                                                                                       \
                WIDE_TILES8                                                                                     \
                case 4: TILE8(4); break;                                                                        \
                case 3: TILE8(3); break;                                                                        \
                case 2: TILE8(2); break;                                                                        \
                default: TILE8(1); break;                                                                       \
            }                                                                                                   \
            if (jb->y)                                                                                          \
                for (int mm = 0; mm < tm; mm++) jb->y[(size_t)(m0 + mm) * jb->N + row] = r[mm];                 \
            if (jb->maxima) first_max_take(&best, r[0], row);                                                   \
        }                                                                                                       \
    }                                                                                                           \
    if (jb->maxima) jb->maxima[this_thread() < jb->n_maxima ? this_thread() : 0] = best;                        \
}
RANGE8_FN(range_i4x8_h, 4, 0, 0, 0)
RANGE8_FN(range_i4x8_f, 4, 0, 1, 0)
RANGE8_FN(range_i8x8_h, 8, 0, 0, 0)
RANGE8_FN(range_i8x8_f, 8, 0, 1, 0)
RANGE8_FN(range_i8g32x8_h, 8, 1, 0, 0)
RANGE8_FN(range_i8g32x8_f, 8, 1, 1, 0)
#if defined(GS_X8_512) && !defined(GS_NO_FIXED_ROWS)
RANGE8_FN(range_i4x8_h_g16, 4, 0, 0, 16) RANGE8_FN(range_i4x8_f_g16, 4, 0, 1, 16)
RANGE8_FN(range_i4x8_h_g20, 4, 0, 0, 20) RANGE8_FN(range_i4x8_f_g20, 4, 0, 1, 20)
RANGE8_FN(range_i4x8_h_g32, 4, 0, 0, 32) RANGE8_FN(range_i4x8_f_g32, 4, 0, 1, 32)
RANGE8_FN(range_i4x8_h_g36, 4, 0, 0, 36) RANGE8_FN(range_i4x8_f_g36, 4, 0, 1, 36)
RANGE8_FN(range_i4x8_h_g48, 4, 0, 0, 48) RANGE8_FN(range_i4x8_f_g48, 4, 0, 1, 48)
RANGE8_FN(range_i4x8_h_g52, 4, 0, 0, 52) RANGE8_FN(range_i4x8_f_g52, 4, 0, 1, 52)
RANGE8_FN(range_i4x8_h_g64, 4, 0, 0, 64) RANGE8_FN(range_i4x8_f_g64, 4, 0, 1, 64)
RANGE8_FN(range_i4x8_h_g68, 4, 0, 0, 68) RANGE8_FN(range_i4x8_f_g68, 4, 0, 1, 68)
// the one-row int4 range for G groups in the block layout, or NULL
static row_range_fn fixed_range_i4(int G, int f32) {
    static const int gs[] = {16, 20, 32, 36, 48, 52, 64, 68};
    static const row_range_fn fns[][2] = {
        {range_i4x8_h_g16, range_i4x8_f_g16}, {range_i4x8_h_g20, range_i4x8_f_g20}, {range_i4x8_h_g32, range_i4x8_f_g32},
        {range_i4x8_h_g36, range_i4x8_f_g36}, {range_i4x8_h_g48, range_i4x8_f_g48}, {range_i4x8_h_g52, range_i4x8_f_g52},
        {range_i4x8_h_g64, range_i4x8_f_g64}, {range_i4x8_h_g68, range_i4x8_f_g68}};
    for (int i = 0; i < 8; i++)
        if (gs[i] == G) return fns[i][f32 != 0];
    return NULL;
}
#endif
#undef RANGE8_FN
#undef TILE8
#undef WIDE_TILES8

// A call of the int8-activation kernels: its job (x rounded to int8 in buffers of its own) and range function
struct x8_call {
    struct job8 jb;
    row_range_fn fn;
};

// int4 in groups of 32, int8 in groups of 16, or int8 in groups of 32 without biases (two byte groups per scale),
// int8 activations: x rounded into the call's buffers (x8_release frees them) and the range function that computes
// rows of y. maxima (NULL: none; M = 1): n_maxima slots for the threads' first maxima of y (y may then be NULL)
static void x8_prepare(struct x8_call *c, int bits, int f32, int blocked, const float *x, int M, int K, const void *q,
                       const void *s, const void *b, int g, int64_t N, float *y, struct first_max *maxima,
                       int n_maxima) {
    const int G = K / BYTE_GROUP(bits), with_sums = b || bits == 4;
    size_t xq_step = (size_t)K, xc_step = (size_t)G, xq_stride = xq_step, xc_stride = xc_step;
    size_t xq_row = xq_step, xc_row = xc_step;  // per row of x in all
    int blocks = 0;
#ifdef GS_X8_512
    blocks = x8_blocks_for(bits, G);
    if (blocks) {
        xq_step = X8_BLOCK_BYTES(bits), xc_step = 16, xq_stride = M * xq_step, xc_stride = M * xc_step;
        xq_row = x8_blocks(G) * xq_step, xc_row = x8_blocks(G) * xc_step;
    }
#endif
    int8_t *xq = (int8_t *)gs_alloc((size_t)M * xq_row);
    float *xsc = (float *)gs_alloc(sizeof(float) * M * (xc_row + G)), *xs = with_sums ? xsc + M * xc_row : NULL;
    int32_t *xcorr = (int32_t *)gs_alloc(sizeof(int32_t) * M * xc_row);
#ifdef GS_X8_512
    if (blocks)
        quantize_rows_blocks(bits, x, M, K, with_sums, xq, xsc, xcorr, xs);
    else
#endif
        quantize_rows_i8(bits, x, M, K, with_sums, xq, xsc, xcorr, xs);
    c->jb = (struct job8){M, K, G, blocks, blocked, xq_step, xc_step, xq_stride, xc_stride, xq, xsc, xcorr, xs, (const char *)q, (const char *)s,
                          (const char *)b, (size_t)(K / g) * (f32 ? 4 : 2), N, y, maxima, n_maxima};
    static const row_range_fn fns[3][2] = {
        {range_i4x8_h, range_i4x8_f}, {range_i8x8_h, range_i8x8_f}, {range_i8g32x8_h, range_i8g32x8_f}};
    c->fn = fns[bits == 4 ? 0 : g == 16 ? 1 : 2][f32 != 0];
#if defined(GS_X8_512) && !defined(GS_NO_FIXED_ROWS)
    // Plain decoding's int4 rows in the block layout at the group counts of common hidden sizes (K = 512 .. 2176: 640,
    // 1152, 1536, 2048 of Gemma 3 270M, 1B and Gemma 4 E2B) take a range function with G a constant (tile8_rows_i4):
    // plain int4 decoding of the default model 1.07-1.11x on two threads (0.99x once, in a slow-bandwidth phase where
    // it is memory-bound), 1.09x on one; tokens identical
    const row_range_fn fixed = M == 1 && bits == 4 && blocks && blocked ? fixed_range_i4(G, f32) : NULL;
    if (fixed) c->fn = fixed;
#endif
}

static void x8_release(struct x8_call *c) {
    free((void *)c->jb.xq);
    free((void *)c->jb.xsc);
    free((void *)c->jb.xcorr);
}

// x8_prepare's matmul, its rows split over nthreads threads. best (NULL: none; M = 1): the first maximum of y,
// found as the rows are computed (y may then be NULL: not stored)
static void linear_x8(int bits, int f32, int blocked, const float *x, int M, int K, const void *q, const void *s,
                      const void *b, int g, int64_t N, float *y, int64_t *best, int nthreads) {
    const int nt = nthreads > 1 ? nthreads : 1;
    struct first_max *maxima = best ? (struct first_max *)gs_alloc(sizeof(struct first_max) * nt) : NULL;
    for (int t = 0; maxima && t < nt; t++) maxima[t] = (struct first_max){-INFINITY, 0, 0};  // (threads unused)
    struct x8_call c;
    x8_prepare(&c, bits, f32, blocked, x, M, K, q, s, b, g, N, y, maxima, nt);
    split_rows(c.fn, &c.jb, N, 4, N * K * M, nthreads);
    if (maxima) {  // the ranges in order: the first with a NaN, else the first with the largest maximum
        int w = 0;
        for (int t = 1; t < nt && !maxima[w].nan; t++)
            if (maxima[t].nan || maxima[t].val > maxima[w].val) w = t;
        *best = maxima[w].at;
        free(maxima);
    }
    x8_release(&c);
}

// ---- exported ---------------------------------------------------------------------------------------
// y[M, N] = x[M, K] @ dequant(W)^T, the rows of W split over threads. g <= MAX_GROUP (gsq_max_group()).
// x8: the model computes in bfloat16 (8 significant bits), so int4 in 32s and int8 in 16s, or in 32s without
// biases (GGUF Q8_0 / Q5_0, our symmetric int8), may round x to int8 (in groups of 32 for int4, 16 for int8); a
// float32 model keeps int16 activations (its greedy output then equals transformers' on the dequantized GGUF).
static inline int x8_format(int bits, int g, int has_bias) {
    return (bits == 4 && g == 32) || (bits == 8 && (g == 16 || (g == 32 && !has_bias)));
}

// Whether the block layout suits W: the int8-activation AVX-512 block tiles are what read it
int gsq_blocked(int bits, int K, int g, int has_bias) {
#ifdef GS_X8_512
    return x8_format(bits, g, has_bias) && x8_blocks_for(bits, K / BYTE_GROUP(bits));
#else
    (void)bits, (void)K, (void)g, (void)has_bias;
    return 0;
#endif
}

// W's rows [N] from the row layout into the block layout in place, or back (inverse)
void gsq_to_blocks(int bits, void *q, int64_t N, int K, int inverse, int nthreads) {
    const size_t rb = row_bytes_of(bits, K), full = rb / 256;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++)
        for (size_t k = 0; k < full; k++) {
            uint8_t tmp[256], *p = (uint8_t *)q + (size_t)n * rb + 256 * k;
            memcpy(tmp, p, 256);
            block_transpose(tmp, p, inverse);
        }
}

// y = x @ W^T through dequantized rows: a block-layout W where the block tiles do not apply (float32 x; a build
// without them). Correct, not fast: no model takes this path in decoding
static void linear_dequant(int bits, int f32, const float *x, int M, int K, const void *q, const void *s,
                           const void *b, int g, int64_t N, float *y, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        float w[K];
        deq_row(bits, f32, 1, q, s, b, K, g, n, w);
        for (int m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int c = 0; c < K; c++) acc += x[(size_t)m * K + c] * w[c];
            y[(size_t)m * N + n] = acc;
        }
    }
}

void gsq_linear(int bits, int f32, int blocked, int x8, const float *x, int M, int K, const void *q, const void *s,
                const void *b, int g, int64_t N, float *y, int nthreads) {
    const int x8_ok = x8 && x8_format(bits, g, b != NULL);
    if (blocked && !(x8_ok && gsq_blocked(bits, K, g, b != NULL))) {
        linear_dequant(bits, f32, x, M, K, q, s, b, g, N, y, nthreads);
        return;
    }
    if (x8_ok) {
        linear_x8(bits, f32, blocked, x, M, K, q, s, b, g, N, y, NULL, nthreads);
        return;
    }
    const int G = K / g;
    int16_t *xq = (int16_t *)gs_alloc((size_t)M * K * sizeof(int16_t));
    float *xsc = (float *)gs_alloc((size_t)M * G * sizeof(float) * 2), *xs = b ? xsc + (size_t)M * G : NULL;
    quantize_rows(x, M, K, g, b != NULL, xq, xsc, xs);
    const struct job jb = {f32, M, K, G, g, xq, xsc, xs, (const char *)q, (const char *)s, (const char *)b,
                           row_bytes_of(bits, K), (size_t)G * (f32 ? 4 : 2), N, y};
    static const row_range_fn fns[2][2][3] = {  // [int8?][float32 scales?][group 32, 16, other]
        {{range_i4_g32_h, range_i4_g16_h, range_i4_any_h}, {range_i4_g32_f, range_i4_g16_f, range_i4_any_f}},
        {{range_i8_g32_h, range_i8_g16_h, range_i8_any_h}, {range_i8_g32_f, range_i8_g16_f, range_i8_any_f}}};
    const row_range_fn fn = fns[bits == 8][f32 != 0][g == 32 ? 0 : g == 16 ? 1 : 2];
    split_rows(fn, &jb, N, 4, N * K * M, nthreads);
    free(xq);
    free(xsc);
}

// Whether W has the one-row int8-activation kernels that gsq_linear_argmax and gsq_team_prepare take
int gsq_team_ok(int bits, int blocked, int x8, int K, int g, int has_bias) {
    return x8 && x8_format(bits, g, has_bias) && (!blocked || gsq_blocked(bits, K, g, has_bias));
}

// gsq_linear for one row of x that also gives *best = the first maximum of y (torch.argmax: the first NaN, else
// the first largest value), found while the rows are computed (a decode step's LM head: no pass over 1 MB of
// cold logits after it); y may be NULL (not stored). Returns 0 where W's kernel has no such path (nothing
// computed: take gsq_linear and an argmax).
int gsq_linear_argmax(int bits, int f32, int blocked, int x8, const float *x, int K, const void *q, const void *s,
                      const void *b, int g, int64_t N, float *y, int64_t *best, int nthreads) {
    if (N <= 0 || !gsq_team_ok(bits, blocked, x8, K, g, b != NULL)) return 0;
    linear_x8(bits, f32, blocked, x, 1, K, q, s, b, g, N, y, best, nthreads);
    return 1;
}

// ---- one row of x over a team of threads that the caller runs (block.c's decode step) ----------------------
// One thread: x[K] rounded for W's one-row kernel; returns the call (NULL where not gsq_team_ok). Then each thread
// t of nt runs gsq_team_rows (split_rows' ranges: the same rows, the same bits as gsq_linear), then one thread
// gsq_team_free.
void *gsq_team_prepare(int bits, int f32, int blocked, int x8, const float *x, int K, const void *q, const void *s,
                       const void *b, int g, int64_t N, float *y) {
    if (!gsq_team_ok(bits, blocked, x8, K, g, b != NULL)) return NULL;
    struct x8_call *c = (struct x8_call *)gs_alloc(sizeof(struct x8_call));
    x8_prepare(c, bits, f32, blocked, x, 1, K, q, s, b, g, N, y, NULL, 0);
    return c;
}

void gsq_team_rows(const void *call, int t, int nt) {
    const struct x8_call *c = (const struct x8_call *)call;
    int64_t r0, r1;
    row_range(c->jb.N, QR, t, nt, &r0, &r1);
    if (r0 < r1) c->fn(&c->jb, r0, r1);
}

void gsq_team_free(void *call) {
    if (!call) return;
    x8_release((struct x8_call *)call);
    free(call);
}

// Thread t (>= 1) of nt, while thread 0 does the small ops before W's matmul: W's first rows of thread t's range
// (thread 1: and of thread 0's, which has no time of its own for it) into this core's L2, line by line in address
// order with their scales and biases, until *flag >= want or max_bytes of each range's values.
void gsq_team_prefetch(int bits, int f32, int K, const void *q, const void *s, const void *b, int g, int64_t N, int t,
                       int nt, const int *flag, int want, size_t max_bytes) {
    const size_t rb = row_bytes_of(bits, K), srow = (size_t)(K / g) * (f32 ? 4 : 2);
    const char *qs[2], *ss[2], *bs[2];
    size_t lim[2];
    int n = 0;
    for (int u = t == 1 ? 0 : t; u <= t; u += t == 1 ? 1 : nt) {
        int64_t r0, r1;
        row_range(N, QR, u, nt, &r0, &r1);
        qs[n] = (const char *)q + r0 * rb, ss[n] = (const char *)s + r0 * srow;
        bs[n] = b ? (const char *)b + r0 * srow : NULL;
        lim[n++] = (size_t)(r1 - r0) * rb < max_bytes ? (size_t)(r1 - r0) * rb : max_bytes;
    }
    const size_t end = lim[0] > lim[n - 1] ? lim[0] : lim[n - 1];
    size_t s_next = 0;
    for (size_t off = 0; off < end; off += 64) {
        if ((off & 511) == 0 && __atomic_load_n(flag, __ATOMIC_ACQUIRE) >= want) return;
        for (int i = 0; i < n; i++)
            if (off < lim[i]) __builtin_prefetch(qs[i] + off, 0, 2);
        for (const size_t s_end = (off / rb + 1) * srow; s_next < s_end; s_next += 64)  // the rows' scales, biases
            for (int i = 0; i < n; i++)
                if (off < lim[i]) {
                    __builtin_prefetch(ss[i] + s_next, 0, 2);
                    if (bs[i]) __builtin_prefetch(bs[i] + s_next, 0, 2);
                }
    }
}

int gsq_max_group(void) { return MAX_GROUP; }

// ---- float32 and bfloat16 weights --------------------------------------------------------------------------
// y[M, N] = x[M, K] @ W[N, K]^T, W float32 (WB = 32) or bfloat16 (WB = 16, widened exactly to float32 in
// registers: half the bytes, for CPUs without bf16 arithmetic). The same tiling: each weight row is read once per
// call and dotted with up to MT rows of x, every row accumulated in the same order whatever M is (two 8-lane
// accumulators over 16-value steps, then an 8-value step, then scalars).
#ifdef GS_AVX2

static inline __attribute__((always_inline)) void tile_float(const int WB, const void *w, int K, const float *x,
                                                             const int mt, float *r) {
    __m256 a0[MT], a1[MT];
    for (int m = 0; m < mt; m++) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); }
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        if (k % 64 == 0) _mm_prefetch((const char *)w + (size_t)(2 * K + k) * (WB / 8), _MM_HINT_T0);  // 2 rows ahead
        const __m256 w0 = f32x8_at(WB, w, k), w1 = f32x8_at(WB, w, k + 8);
        for (int m = 0; m < mt; m++) {
            a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (size_t)m * K + k), a0[m]);
            a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + (size_t)m * K + k + 8), a1[m]);
        }
    }
    if (k + 8 <= K) {
        const __m256 w0 = f32x8_at(WB, w, k);
        for (int m = 0; m < mt; m++) a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (size_t)m * K + k), a0[m]);
        k += 8;
    }
    for (int m = 0; m < mt; m++) {
        float t = hsum(_mm256_add_ps(a0[m], a1[m]));
        for (int kk = k; kk < K; kk++) t += f32_at(WB, w, kk) * x[(size_t)m * K + kk];
        r[m] = t;
    }
}
#else
static void tile_float(const int WB, const void *w, int K, const float *x, const int mt, float *r) {
    for (int m = 0; m < mt; m++) {
        float t = 0.0f;
        for (int k = 0; k < K; k++) t += f32_at(WB, w, k) * x[(size_t)m * K + k];
        r[m] = t;
    }
}
#endif

struct float_job {
    const float *x;
    int M, K;
    const void *w;
    int64_t N;
    float *y;
};

#define FLOAT_RANGE_FN(NAME, WB)                                                                                   \
static __attribute__((noinline)) void NAME(const void *ctx, int64_t n_begin, int64_t n_end) {                      \
    const struct float_job *jb = (const struct float_job *)ctx;                                                 \
    const float *x = jb->x;                                                                                     \
    const int M = jb->M, K = jb->K;                                                                             \
    const int64_t N = jb->N;                                                                                    \
    float r[MT];                                                                                                \
    for (int64_t n = n_begin; n < n_end; n++) {                                                                 \
        const char *wn = (const char *)jb->w + (size_t)n * K * (WB / 8);                                        \
        for (int m0 = 0; m0 < M; m0 += MT) {                                                                    \
            const int mt = M - m0 < MT ? M - m0 : MT;                                                           \
            const float *xm = x + (size_t)m0 * K;                                                               \
            switch (mt) {                                                                                       \
                case 4: tile_float(WB, wn, K, xm, 4, r); break;                                                 \
                case 3: tile_float(WB, wn, K, xm, 3, r); break;                                                 \
                case 2: tile_float(WB, wn, K, xm, 2, r); break;                                                 \
                default: tile_float(WB, wn, K, xm, 1, r); break;                                                \
            }                                                                                                   \
            for (int i = 0; i < mt; i++) jb->y[(size_t)(m0 + i) * N + n] = r[i];                                \
        }                                                                                                       \
    }                                                                                                           \
}
FLOAT_RANGE_FN(range_f32, 32)
FLOAT_RANGE_FN(range_bf16, 16)
#undef FLOAT_RANGE_FN

static void linear_float(const int WB, const float *x, int M, int K, const void *w, int64_t N, float *y, int nthreads) {
    const struct float_job jb = {x, M, K, w, N, y};
    split_rows(WB == 32 ? range_f32 : range_bf16, &jb, N, 1, N * K * M, nthreads);
}

void gsq_linear_f32(const float *x, int M, int K, const float *w, int64_t N, float *y, int nthreads) {
    linear_float(32, x, M, K, w, N, y, nthreads);
}

void gsq_linear_bf16(const float *x, int M, int K, const uint16_t *w, int64_t N, float *y, int nthreads) {
    linear_float(16, x, M, K, w, N, y, nthreads);
}

// out[r, K] = dequant(W[n0 + r]) for r < R.
void gsq_dequant(int bits, int f32, int blocked, const void *q, const void *s, const void *b, int K, int g,
                 int64_t n0, int64_t R, float *out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < R; r++) deq_row(bits, f32, blocked, q, s, b, K, g, n0 + r, out + (size_t)r * K);
}

// Embedding lookup: out[r] = dequant(W[ids[r]]) for r < R, float32 or (out_bf16) bfloat16 rounded as PyTorch's
// .to() rounds, on the calling thread: a decode step reads one row, which costs less than waking a thread team.
// Returns -1, writing nothing, if an id is outside [0, N).
int gsq_rows(int bits, int f32, int blocked, const void *q, const void *s, const void *b, int K, int g, int64_t N,
             const int64_t *ids, int64_t R, void *out, int out_bf16) {
    for (int64_t r = 0; r < R; r++)
        if (ids[r] < 0 || ids[r] >= N) return -1;
    float *row = out_bf16 ? (float *)gs_alloc(sizeof(float) * (size_t)K) : NULL;
    for (int64_t r = 0; r < R; r++) {
        if (!out_bf16) {
            deq_row(bits, f32, blocked, q, s, b, K, g, ids[r], (float *)out + (size_t)r * K);
            continue;
        }
        deq_row(bits, f32, blocked, q, s, b, K, g, ids[r], row);
        uint16_t *o = (uint16_t *)out + (size_t)r * K;
        for (int i = 0; i < K; i++) o[i] = f32_to_bf16(row[i]);
    }
    free(row);
    return 0;
}

// The SIMD paths of this build: bit 0 AVX2 + FMA + F16C, bit 1 VNNI (vpdpwssd), bit 2 AVX-512VL (8-row tiles).
int gsq_simd(void) {
    int bits = 0;
#ifdef GS_AVX2
    bits |= 1;
#endif
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
    bits |= 2;
#endif
#if QMT == 8
    bits |= 4;
#endif
    return bits;
}
