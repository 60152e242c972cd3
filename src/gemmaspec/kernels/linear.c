// gemmaspec matmul kernels for decoding: y[M,N] = x[M,K] @ W[N,K]^T with W held as int8, packed int4 or float32.
//
// Weights are row-major over N (one output feature per row), in groups of `g` along K; each group has a
// scale s and an optional bias b (float16, or float32 when f32 != 0):  w = s * q + b.
//   int8: q is int8 [N, K].
//   int4: q is uint8 [N, K/2]; each 32-weight chunk is 16 bytes, byte i holding weight i in its low nibble
//         and weight i + 16 in its high nibble (values 0..15).
// A row is dequantized into a float buffer in L1 and dotted with every row of x, so the weights are read
// from memory once per call whatever M is: the speculative-verification shape (M = k + 1 rows).
#include <stdlib.h>
#include <string.h>

#include "common.h"

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

static inline void deq_row(int bits, int f32, const void *q, const void *s, const void *b, int K, int g,
                           int64_t n, float *out) {
    const size_t row = (size_t)(K / g) * (f32 ? 4 : 2);  // bytes of scales per row
    const char *sn = (const char *)s + n * row, *bn = b ? (const char *)b + n * row : NULL;
    if (bits == 8)
        deq_row_i8((const int8_t *)q + (size_t)n * K, sn, bn, f32, K, g, out);
    else
        deq_row_i4((const uint8_t *)q + (size_t)n * K / 2, sn, bn, f32, K, g, out);
}

// ---- fused tiles: NR weight rows x MT rows of x, each weight converted once per tile -------------------------
// Every output y[m, n] is accumulated in one fixed order whatever M and the tile shape are, so y[m] does not
// depend on M bitwise (speculative verification sees exactly the values plain decoding would): per group, two
// 8-lane accumulators (weights at offsets 0-7 mod 16 and 8-15 mod 16), then total += (a + b) * scale. Tiles of 4
// weight rows give the CPU 8 independent FMA chains when M is 1 (one chain is latency-bound: 3x slower).
// BITS, NR, MT and the usual group sizes are constants at each call site, so branches fold away and the
// accumulators stay in registers.
#define MT 4
#define NR 4
#ifdef GS_AVX2
// weights k..k+7 of a row as floats (k a multiple of 8)
static inline __attribute__((always_inline)) __m256 load8(const int BITS, const void *qrow, int k) {
    if (BITS == 8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)qrow + k))));
    // int4: values k..k+7 are nibbles of bytes (k & 15)..+7 of their 32-value chunk: low ones for k & 16 == 0
    const __m128i raw = _mm_loadl_epi64((const __m128i *)((const uint8_t *)qrow + (k & ~31) / 2 + (k & 15)));
    const __m128i v = _mm_and_si128((k & 16) ? _mm_srli_epi16(raw, 4) : raw, _mm_set1_epi8(0x0f));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}

// int4 weights k..k+31 (one 16-byte chunk, k a multiple of 32) as four vectors of 8 floats: each byte read once
static inline __attribute__((always_inline)) void load32_i4(const void *qrow, int k, __m256 *w) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint8_t *)qrow + k / 2)), m4 = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

static inline __attribute__((always_inline)) void tile(const int BITS, int f32, const char *q, size_t qrow_bytes,
        const char *s, const char *b, size_t srow, int K, const int g, const float *x, const float *xs, int G,
        const int nr, const int mt, float *r) {
    __m256 tot[NR][MT], acc0[NR][MT], acc1[NR][MT];
    float bacc[NR][MT];
    for (int n = 0; n < nr; n++)
        for (int m = 0; m < mt; m++) { tot[n][m] = _mm256_setzero_ps(); bacc[n][m] = 0.0f; }
    for (int j = 0; j < K / g; j++) {
        const int k0 = j * g;
        for (int n = 0; n < nr; n++)
            for (int m = 0; m < mt; m++) { acc0[n][m] = _mm256_setzero_ps(); acc1[n][m] = _mm256_setzero_ps(); }
        if (BITS == 4 && g % 32 == 0) {
            for (int c = 0; c < g; c += 32) {
                for (int n = 0; n < nr; n++) {
                    __m256 w[4];
                    load32_i4(q + n * qrow_bytes, k0 + c, w);
                    for (int m = 0; m < mt; m++) {
                        const float *xm = x + (size_t)m * K + k0 + c;
                        acc0[n][m] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xm), acc0[n][m]);
                        acc1[n][m] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xm + 8), acc1[n][m]);
                        acc0[n][m] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xm + 16), acc0[n][m]);
                        acc1[n][m] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xm + 24), acc1[n][m]);
                    }
                }
            }
        } else {
            for (int c = 0; c < g; c += 16) {
                for (int n = 0; n < nr; n++) {
                    const __m256 w0 = load8(BITS, q + n * qrow_bytes, k0 + c), w1 = load8(BITS, q + n * qrow_bytes, k0 + c + 8);
                    for (int m = 0; m < mt; m++) {
                        const float *xm = x + (size_t)m * K + k0 + c;
                        acc0[n][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc0[n][m]);
                        acc1[n][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc1[n][m]);
                    }
                }
            }
        }
        for (int n = 0; n < nr; n++) {
            const __m256 vs = _mm256_set1_ps(SC(s + n * srow, j));
            for (int m = 0; m < mt; m++) tot[n][m] = _mm256_fmadd_ps(_mm256_add_ps(acc0[n][m], acc1[n][m]), vs, tot[n][m]);
            if (b) {
                const float bj = SC(b + n * srow, j);
                for (int m = 0; m < mt; m++) bacc[n][m] += bj * xs[(size_t)m * G + j];
            }
        }
    }
    for (int n = 0; n < nr; n++)
        for (int m = 0; m < mt; m++) r[n * MT + m] = hsum(tot[n][m]) + bacc[n][m];
}

// The M = 1 tile (plain decoding, the LM head) written out: the same arithmetic as tile(BITS, 4 rows, 1), with
// the four rows' accumulators as named registers (GCC keeps the arrays above partly on the stack).
static inline __attribute__((always_inline)) void rows4(const int BITS, int f32, const char *q, size_t qrow_bytes,
        const char *s, const char *b, size_t srow, int K, const int g, const float *x, const float *xs, float *r) {
    __m256 t0 = _mm256_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
    float b0 = 0.0f, b1 = 0.0f, b2 = 0.0f, b3 = 0.0f;
    const char *q1 = q + qrow_bytes, *q2 = q1 + qrow_bytes, *q3 = q2 + qrow_bytes;
    for (int j = 0; j < K / g; j++) {
        const int k0 = j * g;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
        if (BITS == 4 && g % 32 == 0) {
            for (int c = 0; c < g; c += 32) {
                const int k = k0 + c;
                const __m256 xa = _mm256_loadu_ps(x + k), xb = _mm256_loadu_ps(x + k + 8);
                const __m256 xc = _mm256_loadu_ps(x + k + 16), xd = _mm256_loadu_ps(x + k + 24);
                __m256 w[4];
#define ROW(QR, A, C) load32_i4(QR, k, w); A = _mm256_fmadd_ps(w[0], xa, A); C = _mm256_fmadd_ps(w[1], xb, C); \
                      A = _mm256_fmadd_ps(w[2], xc, A); C = _mm256_fmadd_ps(w[3], xd, C);
                ROW(q, a0, c0) ROW(q1, a1, c1) ROW(q2, a2, c2) ROW(q3, a3, c3)
#undef ROW
            }
        } else {
            for (int c = 0; c < g; c += 16) {
                const int k = k0 + c;
                const __m256 xa = _mm256_loadu_ps(x + k), xb = _mm256_loadu_ps(x + k + 8);
                a0 = _mm256_fmadd_ps(load8(BITS, q, k), xa, a0);
                c0 = _mm256_fmadd_ps(load8(BITS, q, k + 8), xb, c0);
                a1 = _mm256_fmadd_ps(load8(BITS, q1, k), xa, a1);
                c1 = _mm256_fmadd_ps(load8(BITS, q1, k + 8), xb, c1);
                a2 = _mm256_fmadd_ps(load8(BITS, q2, k), xa, a2);
                c2 = _mm256_fmadd_ps(load8(BITS, q2, k + 8), xb, c2);
                a3 = _mm256_fmadd_ps(load8(BITS, q3, k), xa, a3);
                c3 = _mm256_fmadd_ps(load8(BITS, q3, k + 8), xb, c3);
            }
        }
        t0 = _mm256_fmadd_ps(_mm256_add_ps(a0, c0), _mm256_set1_ps(SC(s, j)), t0);
        t1 = _mm256_fmadd_ps(_mm256_add_ps(a1, c1), _mm256_set1_ps(SC(s + srow, j)), t1);
        t2 = _mm256_fmadd_ps(_mm256_add_ps(a2, c2), _mm256_set1_ps(SC(s + 2 * srow, j)), t2);
        t3 = _mm256_fmadd_ps(_mm256_add_ps(a3, c3), _mm256_set1_ps(SC(s + 3 * srow, j)), t3);
        if (b) {
            const float xj = xs[j];
            b0 += SC(b, j) * xj;
            b1 += SC(b + srow, j) * xj;
            b2 += SC(b + 2 * srow, j) * xj;
            b3 += SC(b + 3 * srow, j) * xj;
        }
    }
    r[0] = hsum(t0) + b0;
    r[MT] = hsum(t1) + b1;
    r[2 * MT] = hsum(t2) + b2;
    r[3 * MT] = hsum(t3) + b3;
}
#else
static void tile(const int BITS, int f32, const char *q, size_t qrow_bytes, const char *s, const char *b, size_t srow,
                 int K, int g, const float *x, const float *xs, int G, const int nr, const int mt, float *r) {
    for (int n = 0; n < nr; n++) {
        const void *qrow = q + n * qrow_bytes;
        const char *sn = s + n * srow, *bn = b ? b + n * srow : NULL;
        for (int m = 0; m < mt; m++) {
            float tot = 0.0f, bacc = 0.0f;
            for (int j = 0; j < K / g; j++) {
                float acc[2] = {0.0f, 0.0f};
                for (int c = 0; c < g; c++) {
                    const int k = j * g + c;  // int4: byte (k & ~31) / 2 + (k & 15), high nibble when k & 16
                    const float v = BITS == 8 ? (float)((const int8_t *)qrow)[k]
                        : (float)((((const uint8_t *)qrow)[(k & ~31) / 2 + (k & 15)] >> ((k & 16) ? 4 : 0)) & 15);
                    acc[(c / 8) & 1] += v * x[(size_t)m * K + k];
                }
                tot += (acc[0] + acc[1]) * SC(sn, j);
                if (bn) bacc += SC(bn, j) * xs[(size_t)m * G + j];
            }
            r[n * MT + m] = tot + bacc;
        }
    }
}
static void rows4(const int BITS, int f32, const char *q, size_t qrow_bytes, const char *s, const char *b, size_t srow,
                  int K, int g, const float *x, const float *xs, float *r) {
    tile(BITS, f32, q, qrow_bytes, s, b, srow, K, g, x, xs, K / g, 4, 1, r);
}
#endif

// ---- row ranges -----------------------------------------------------------------------------------------
// Rows [n_begin, n_end) of y = x @ W^T for one (BITS, group size): every argument a register, not a field of
// an OpenMP closure (GCC reloads those inside the loops: 1.5x slower).
struct job {
    int f32, M, K, G, g;
    const float *x, *xs;
    const char *q, *s, *b;
    size_t row_bytes, srow;
    int64_t N;
    float *y;
};

#define RANGE_FN(NAME, BITS, GC)                                                                                   \
static __attribute__((noinline)) void NAME(const void *ctx, int64_t n_begin, int64_t n_end) {                     \
    const struct job *jb = (const struct job *)ctx;                                                             \
    const int f32 = jb->f32, M = jb->M, K = jb->K, G = jb->G, g = jb->g;                                        \
    const size_t row_bytes = jb->row_bytes, srow = jb->srow;                                                    \
    const int64_t N = jb->N;                                                                                    \
    float r[NR * MT];                                                                                           \
    (void)g;                                                                                                    \
    for (int m0 = 0; m0 < M;) {                                                                                 \
        /* tile shape: 4 weight rows x 1 (plain decoding) or 1 weight row x up to 4 (verification) */           \
        const int rem = M - m0, tr = rem == 1 ? NR : 1, tm = rem < MT ? rem : MT;                               \
        const float *xm = jb->x + (size_t)m0 * K, *xsm = jb->xs ? jb->xs + (size_t)m0 * G : NULL;               \
        for (int64_t row = n_begin; row < n_end;) {                                                             \
            const int nrt = n_end - row >= tr ? tr : 1; /* the range's tail one row at a time */                \
            const char *qn = jb->q + (size_t)row * row_bytes, *sn = jb->s + (size_t)row * srow;                 \
            const char *bn = jb->b ? jb->b + (size_t)row * srow : NULL;                                         \
            if (nrt == 4) rows4(BITS, f32, qn, row_bytes, sn, bn, srow, K, GC, xm, xsm, r);                     \
            else switch (tm) {                                                                                  \
                case 4: tile(BITS, f32, qn, row_bytes, sn, bn, srow, K, GC, xm, xsm, G, 1, 4, r); break;       \
                case 3: tile(BITS, f32, qn, row_bytes, sn, bn, srow, K, GC, xm, xsm, G, 1, 3, r); break;       \
                case 2: tile(BITS, f32, qn, row_bytes, sn, bn, srow, K, GC, xm, xsm, G, 1, 2, r); break;       \
                default: tile(BITS, f32, qn, row_bytes, sn, bn, srow, K, GC, xm, xsm, G, 1, 1, r); break;      \
            }                                                                                                   \
            for (int i = 0; i < nrt; i++)                                                                       \
                for (int mm = 0; mm < tm; mm++) jb->y[(size_t)(m0 + mm) * N + row + i] = r[i * MT + mm];        \
            row += nrt;                                                                                         \
        }                                                                                                       \
        m0 += tm;                                                                                               \
    }                                                                                                           \
}
RANGE_FN(range_i8_g32, 8, 32)
RANGE_FN(range_i8_g16, 8, 16)
RANGE_FN(range_i8_any, 8, g)
RANGE_FN(range_i4_g32, 4, 32)
RANGE_FN(range_i4_g16, 4, 16)
RANGE_FN(range_i4_any, 4, g)
#undef RANGE_FN

// ---- exported ---------------------------------------------------------------------------------------
// y[M, N] = x[M, K] @ dequant(W)^T, the rows of W split over threads in blocks of NR.
void gsq_linear(int bits, int f32, const float *x, int M, int K, const void *q, const void *s, const void *b,
                int g, int64_t N, float *y, int nthreads) {
    const int G = K / g;
    float *xs = NULL;  // group sums of x, for the bias term sum_j b_j * sum(x in group j)
    if (b) {
        xs = (float *)malloc((size_t)M * G * sizeof(float));
        for (int i = 0; i < M * G; i++) {
            float acc = 0.0f;
            for (int c = 0; c < g; c++) acc += x[(size_t)i * g + c];
            xs[i] = acc;
        }
    }
    const struct job jb = {f32, M, K, G, g, x, xs, (const char *)q, (const char *)s, (const char *)b,
                           bits == 8 ? (size_t)K : (size_t)K / 2, (size_t)G * (f32 ? 4 : 2), N, y};
    const row_range_fn fn = bits == 8 ? (g == 32 ? range_i8_g32 : g == 16 ? range_i8_g16 : range_i8_any)
                                      : (g == 32 ? range_i4_g32 : g == 16 ? range_i4_g16 : range_i4_any);
    split_rows(fn, &jb, N, NR, N * K * M, nthreads);
    free(xs);
}

// ---- float32 and bfloat16 weights --------------------------------------------------------------------------
// y[M, N] = x[M, K] @ W[N, K]^T, W float32 (WB = 32) or bfloat16 (WB = 16, widened exactly to float32 in
// registers: half the bytes, for CPUs without bf16 arithmetic). The same tiling: each weight row is read once per
// call and dotted with up to MT rows of x, every row accumulated in the same order whatever M is (two 8-lane
// accumulators over 16-value steps, then an 8-value step, then scalars).
static inline float bf16_to_f32(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#define WLOAD1(WB, w, k) ((WB) == 32 ? ((const float *)(w))[k] : bf16_to_f32(((const uint16_t *)(w))[k]))
#ifdef GS_AVX2
static inline __attribute__((always_inline)) __m256 wload8(const int WB, const void *w, int k) {
    if (WB == 32) return _mm256_loadu_ps((const float *)w + k);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __attribute__((always_inline)) void tile_float(const int WB, const void *w, int K, const float *x,
                                                             const int mt, float *r) {
    __m256 a0[MT], a1[MT];
    for (int m = 0; m < mt; m++) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); }
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m256 w0 = wload8(WB, w, k), w1 = wload8(WB, w, k + 8);
        for (int m = 0; m < mt; m++) {
            a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (size_t)m * K + k), a0[m]);
            a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + (size_t)m * K + k + 8), a1[m]);
        }
    }
    if (k + 8 <= K) {
        const __m256 w0 = wload8(WB, w, k);
        for (int m = 0; m < mt; m++) a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (size_t)m * K + k), a0[m]);
        k += 8;
    }
    for (int m = 0; m < mt; m++) {
        float t = hsum(_mm256_add_ps(a0[m], a1[m]));
        for (int kk = k; kk < K; kk++) t += WLOAD1(WB, w, kk) * x[(size_t)m * K + kk];
        r[m] = t;
    }
}
#else
static void tile_float(const int WB, const void *w, int K, const float *x, const int mt, float *r) {
    for (int m = 0; m < mt; m++) {
        float t = 0.0f;
        for (int k = 0; k < K; k++) t += WLOAD1(WB, w, k) * x[(size_t)m * K + k];
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

// out[r, K] = dequant(W[rows[r]]) for r < R (rows == NULL: rows n0 .. n0 + R - 1).
void gsq_dequant(int bits, int f32, const void *q, const void *s, const void *b, int K, int g,
                 const int64_t *rows, int64_t n0, int64_t R, float *out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < R; r++) deq_row(bits, f32, q, s, b, K, g, rows ? rows[r] : n0 + r, out + (size_t)r * K);
}

int gsq_has_avx2(void) {
#ifdef GS_AVX2
    return 1;
#else
    return 0;
#endif
}
