// gemmaspec small fused ops for decoding and verification (a few tokens at a time, float32).
//
// At batch 1 a decode step of a small model spends more time in PyTorch's per-op overhead (norms, RoPE,
// attention over a masked ring, GeLU) than in reading weights; each function here replaces several ops.
// Every row (token) is computed on its own, in an order that does not depend on how many rows the call has,
// so a token verified among k + 1 gives bit for bit what plain decoding gives.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#ifdef GS_AVX2

// exp(x) for 8 floats, Cephes' expf polynomial (relative error ~1e-7), inputs clamped to +-88.
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}
#endif

// a . b for float32 a and a float32 (EB = 32) or bfloat16 (EB = 16) b, in one fixed order
static inline __attribute__((always_inline)) float dot_eb(const int EB, const float *a, const void *b, int n) {
#ifdef GS_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), f32x8_at(EB, b, i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), f32x8_at(EB, b, i + 8), acc1);
    }
    float t = hsum(_mm256_add_ps(acc0, acc1));
#else
    float t = 0.0f;
    int i = 0;
#endif
    for (; i < n; i++) t += a[i] * f32_at(EB, b, i);
    return t;
}

static inline float dot(const float *a, const float *b, int n) { return dot_eb(32, a, b, n); }

// ---- RMSNorm --------------------------------------------------------------------------------------------
// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w (+ add[r]); rows `stride` floats apart, w may be NULL (= 1).
// out may be x (in place).
static void norm_row(const float *x, const float *w, float eps, int dim, const float *add, float *out) {
    const float inv = 1.0f / sqrtf(dot(x, x, dim) / (float)dim + eps);
    for (int i = 0; i < dim; i++) {
        const float v = x[i] * inv * (w ? w[i] : 1.0f);
        out[i] = add ? add[i] + v : v;
    }
}

void gso_rms_norm(const float *x, const float *w, float eps, int rows, int dim, const float *add, float *out) {
    for (int r = 0; r < rows; r++)
        norm_row(x + (size_t)r * dim, w, eps, dim, add ? add + (size_t)r * dim : NULL, out + (size_t)r * dim);
}

// ---- q/k norm + RoPE, in place on the fused qkv rows ------------------------------------------------------
// qkv[t] = [q heads (nq x hd) | k heads (nkv x hd) | v ...], `row` floats per token. Each q and k head is
// RMS-normed (qw / kw, NULL = no norm) and rotated by RoPE in the two-halves layout over its first `rot` dims:
// cos / sin are [T, rot].
static void rope_head(float *h, const float *cos, const float *sin, int rot) {
    const int half = rot / 2;
    for (int i = 0; i < half; i++) {
        const float a = h[i], b = h[i + half];
        h[i] = a * cos[i] - b * sin[i];
        h[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

void gso_qk_norm_rope(float *qkv, int T, int row, int nq, int nkv, int hd, const float *qw, const float *kw,
                      float eps, const float *cos, const float *sin, int rot) {
    for (int t = 0; t < T; t++) {
        float *r = qkv + (size_t)t * row;
        const float *c = cos + (size_t)t * rot, *s = sin + (size_t)t * rot;
        for (int h = 0; h < nq + nkv; h++) {
            float *head = r + (size_t)h * hd;
            const float *w = h < nq ? qw : kw;
            if (w) norm_row(head, w, eps, hd, NULL, head);
            rope_head(head, c, s, rot);
        }
    }
}

// ---- attention of a few queries over the cache -------------------------------------------------------------
// out[t, h * vd ...] = softmax_s(scale * q[h, t] . K[h / group, s]) V[h / group, s] over the slots s < S with
// mask[t, s] != 0 (mask NULL: all). Strides in elements; keys / values rows are contiguous (stride 1 within),
// float32 or bfloat16 (kv_bf16: a bfloat16 cache, widened exactly in registers; q and out stay float32).
// The query heads that share a KV head (GQA) are taken up to MAX_HEADS at a time, so each key and value row is
// loaded and widened once for all of them, and the value sums stay in registers. The slots go in fixed chunks
// (gso_attention), each chunk's scores, exponentials and sums in slot order, the chunks merged in order. Each
// head's arithmetic is the same whichever heads it is taken with, so a query's result depends only on its own
// valid slots (not on T, S beyond them or the thread count).
#define MAX_HEADS 4
#ifndef ATTENTION_THREADED_WORK
// S * T * nq * hd above which attention takes all threads. 2-core Xeon, int4 default model, medians of 64 decode
// steps: at 1 << 15 instead of 1 << 18 attention took 0.66-0.68 ms a step instead of 0.79-0.84 after a 200-token
// prompt, 0.32-0.33 instead of 0.35-0.37 after 40 (scripts/profile_step.py --define ATTENTION_THREADED_WORK=N).
#define ATTENTION_THREADED_WORK (1 << 15)
#endif
// While it computes a slot's scores, the AVX-512 kernel prefetches the slot's value row (into L2: locality 2),
// which the value sums then read from the cache (with the caches cold after a step's weights, they read the
// cache's rows from DRAM in 32-column passes). Default model, same process, attention of a decode step after a
// 64 / 400-token prompt: 0.78x / 0.73x the time.
#ifndef ATTN_PF_V
#define ATTN_PF_V 2
#endif
// Slots per chunk. Default model, bf16 cache, same process, decode steps after a 400 / 64-token prompt: chunks and
// the prefetch 0.67x / 0.77x the attention time of the unchunked kernel without it; chunks of 32 alike, of 128
// 0.77x (400).
#ifndef ATTENTION_CHUNK
#define ATTENTION_CHUNK 64
#endif
#ifndef ATTENTION_PARTIAL_BYTES
#define ATTENTION_PARTIAL_BYTES (1 << 20)
#endif

#ifdef GS_AVX2
// head_values' columns from i on, 8 then 1 at a time (shared by the AVX-512 and AVX2 versions)
static inline __attribute__((always_inline)) void head_values_tail(const int KB, const int NH, const float *const *p,
        const void *V, int64_t vs, int S, int vd, const uint8_t *mask, float *const *out, int i) {
    const size_t eb = KB / 8;
    for (; i + 8 <= vd; i += 8) {
        __m256 acc[MAX_HEADS];
        for (int h = 0; h < NH; h++) acc[h] = _mm256_setzero_ps();
        for (int s = 0; s < S; s++) {
            if (mask && !mask[s]) continue;
            const __m256 v0 = f32x8_at(KB, (const char *)V + (size_t)s * vs * eb, i);
            for (int h = 0; h < NH; h++) acc[h] = _mm256_fmadd_ps(_mm256_broadcast_ss(p[h] + s), v0, acc[h]);
        }
        for (int h = 0; h < NH; h++) _mm256_storeu_ps(out[h] + i, acc[h]);
    }
    for (; i < vd; i++)
        for (int h = 0; h < NH; h++) {
            float acc = 0.0f;
            for (int s = 0; s < S; s++)
                if (!mask || mask[s]) acc = fmaf(p[h][s], f32_at(KB, (const char *)V + (size_t)s * vs * eb, i), acc);
            out[h][i] = acc;
        }
}

#if defined(__AVX512F__) && !defined(GS_NO_ATTN_512)
// AVX-512: 16 lanes per FMA, two accumulators per head (a step of 32 dimensions or columns), which halves the
// FMAs of the AVX2 version. Per head and slot the order is fixed whatever T, NH or the thread count is.
static inline __attribute__((always_inline)) __m512 f32x16_at(const int EB, const void *p, int64_t i) {
    if (EB == 32) return _mm512_loadu_ps((const float *)p + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// scores[h][s] = scale * q_h . K[s] for NH heads at once
static inline __attribute__((always_inline)) void head_scores(const int KB, const int NH, const float *const *q,
        const void *K, int64_t ks, int S, int hd, const uint8_t *mask, float scale, float *const *scores,
        const void *V, int64_t vs, int vd) {
    const size_t eb = KB / 8;
    for (int s = 0; s < S; s++) {
#if ATTN_PF_V
        if (!mask || mask[s]) {
            const char *v = (const char *)V + (size_t)s * vs * eb;
            for (size_t c = 0; c < vd * eb; c += 64) __builtin_prefetch(v + c, 0, ATTN_PF_V);
        }
#endif
        if (mask && !mask[s]) {
            for (int h = 0; h < NH; h++) scores[h][s] = -INFINITY;
            continue;
        }
        const void *k = (const char *)K + (size_t)s * ks * eb;
        __m512 acc0[MAX_HEADS], acc1[MAX_HEADS];
        for (int h = 0; h < NH; h++) acc0[h] = acc1[h] = _mm512_setzero_ps();
        int i = 0;
        for (; i + 32 <= hd; i += 32) {
            const __m512 k0 = f32x16_at(KB, k, i), k1 = f32x16_at(KB, k, i + 16);
            for (int h = 0; h < NH; h++) {
                acc0[h] = _mm512_fmadd_ps(_mm512_loadu_ps(q[h] + i), k0, acc0[h]);
                acc1[h] = _mm512_fmadd_ps(_mm512_loadu_ps(q[h] + i + 16), k1, acc1[h]);
            }
        }
        if (i + 16 <= hd) {
            const __m512 k0 = f32x16_at(KB, k, i);
            for (int h = 0; h < NH; h++) acc0[h] = _mm512_fmadd_ps(_mm512_loadu_ps(q[h] + i), k0, acc0[h]);
            i += 16;
        }
        for (int h = 0; h < NH; h++) {
            const __m512 a = _mm512_add_ps(acc0[h], acc1[h]);
            float t = hsum(_mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)));
            for (int r = i; r < hd; r++) t += q[h][r] * f32_at(KB, k, r);
            scores[h][s] = t * scale;
        }
    }
}

// out_h[i] = sum_s p_h[s] V[s][i] for NH heads, 32 columns at a time in registers (slot order, from 0)
static inline __attribute__((always_inline)) void head_values(const int KB, const int NH, const float *const *p,
        const void *V, int64_t vs, int S, int vd, const uint8_t *mask, float *const *out) {
    const size_t eb = KB / 8;
    int i = 0;
    for (; i + 32 <= vd; i += 32) {
        __m512 acc0[MAX_HEADS], acc1[MAX_HEADS];
        for (int h = 0; h < NH; h++) acc0[h] = acc1[h] = _mm512_setzero_ps();
        for (int s = 0; s < S; s++) {
            if (mask && !mask[s]) continue;
            const void *v = (const char *)V + (size_t)s * vs * eb;
            const __m512 v0 = f32x16_at(KB, v, i), v1 = f32x16_at(KB, v, i + 16);
            for (int h = 0; h < NH; h++) {
                const __m512 ph = _mm512_set1_ps(p[h][s]);
                acc0[h] = _mm512_fmadd_ps(ph, v0, acc0[h]);
                acc1[h] = _mm512_fmadd_ps(ph, v1, acc1[h]);
            }
        }
        for (int h = 0; h < NH; h++) {
            _mm512_storeu_ps(out[h] + i, acc0[h]);
            _mm512_storeu_ps(out[h] + i + 16, acc1[h]);
        }
    }
    head_values_tail(KB, NH, p, V, vs, S, vd, mask, out, i);
}
#else
// scores[h][s] = scale * q_h . K[s] for NH heads at once: dot_eb's order for each head
static inline __attribute__((always_inline)) void head_scores(const int KB, const int NH, const float *const *q,
        const void *K, int64_t ks, int S, int hd, const uint8_t *mask, float scale, float *const *scores,
        const void *V, int64_t vs, int vd) {
    (void)V, (void)vs, (void)vd;
    const size_t eb = KB / 8;
    for (int s = 0; s < S; s++) {
        if (mask && !mask[s]) {
            for (int h = 0; h < NH; h++) scores[h][s] = -INFINITY;
            continue;
        }
        const void *k = (const char *)K + (size_t)s * ks * eb;
        __m256 acc0[MAX_HEADS], acc1[MAX_HEADS];
        for (int h = 0; h < NH; h++) acc0[h] = acc1[h] = _mm256_setzero_ps();
        int i = 0;
        for (; i + 16 <= hd; i += 16) {
            const __m256 k0 = f32x8_at(KB, k, i), k1 = f32x8_at(KB, k, i + 8);
            for (int h = 0; h < NH; h++) {
                acc0[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q[h] + i), k0, acc0[h]);
                acc1[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q[h] + i + 8), k1, acc1[h]);
            }
        }
        for (int h = 0; h < NH; h++) {
            float t = hsum(_mm256_add_ps(acc0[h], acc1[h]));
            for (int r = i; r < hd; r++) t += q[h][r] * f32_at(KB, k, r);
            scores[h][s] = t * scale;
        }
    }
}

// out_h[i] = sum_s p_h[s] V[s][i] for NH heads, 16 columns at a time in registers (slot order, from 0)
static inline __attribute__((always_inline)) void head_values(const int KB, const int NH, const float *const *p,
        const void *V, int64_t vs, int S, int vd, const uint8_t *mask, float *const *out) {
    const size_t eb = KB / 8;
    int i = 0;
    for (; i + 16 <= vd; i += 16) {
        __m256 acc0[MAX_HEADS], acc1[MAX_HEADS];
        for (int h = 0; h < NH; h++) acc0[h] = acc1[h] = _mm256_setzero_ps();
        for (int s = 0; s < S; s++) {
            if (mask && !mask[s]) continue;
            const void *v = (const char *)V + (size_t)s * vs * eb;
            const __m256 v0 = f32x8_at(KB, v, i), v1 = f32x8_at(KB, v, i + 8);
            for (int h = 0; h < NH; h++) {
                const __m256 ph = _mm256_broadcast_ss(p[h] + s);
                acc0[h] = _mm256_fmadd_ps(ph, v0, acc0[h]);
                acc1[h] = _mm256_fmadd_ps(ph, v1, acc1[h]);
            }
        }
        for (int h = 0; h < NH; h++) {
            _mm256_storeu_ps(out[h] + i, acc0[h]);
            _mm256_storeu_ps(out[h] + i + 8, acc1[h]);
        }
    }
    head_values_tail(KB, NH, p, V, vs, S, vd, mask, out, i);
}

#endif  // AVX-512

// exp(scores - max) in place, the tail through the same vector exp (padded), so no slot's value depends on S
static inline void exp_shifted(float *scores, int S, float mx) {
    const __m256 vmx = _mm256_set1_ps(mx);
    int s = 0;
    for (; s + 8 <= S; s += 8) _mm256_storeu_ps(scores + s, exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + s), vmx)));
    if (s < S) {
        float pad[8];
        for (int i = 0; i < 8; i++) pad[i] = s + i < S ? scores[s + i] : -INFINITY;
        _mm256_storeu_ps(pad, exp8(_mm256_sub_ps(_mm256_loadu_ps(pad), vmx)));
        for (int i = 0; s + i < S; i++) scores[s + i] = pad[i];
    }
}
#else
static void head_scores(const int KB, const int NH, const float *const *q, const void *K, int64_t ks, int S, int hd,
                        const uint8_t *mask, float scale, float *const *scores, const void *V, int64_t vs, int vd) {
    (void)V, (void)vs, (void)vd;
    for (int h = 0; h < NH; h++)
        for (int s = 0; s < S; s++)
            scores[h][s] = mask && !mask[s] ? -INFINITY
                                            : dot_eb(KB, q[h], (const char *)K + (size_t)s * ks * (KB / 8), hd) * scale;
}

static void head_values(const int KB, const int NH, const float *const *p, const void *V, int64_t vs, int S, int vd,
                        const uint8_t *mask, float *const *out) {
    for (int h = 0; h < NH; h++)
        for (int i = 0; i < vd; i++) {
            float acc = 0.0f;
            for (int s = 0; s < S; s++)
                if (!mask || mask[s]) acc += p[h][s] * f32_at(KB, (const char *)V + (size_t)s * vs * (KB / 8), i);
            out[h][i] = acc;
        }
}

static void exp_shifted(float *scores, int S, float mx) {
    for (int s = 0; s < S; s++) scores[s] = expf(scores[s] - mx);
}
#endif

// NH query heads of one token over the S <= ATTENTION_CHUNK slots of a chunk of one KV head (K, V and mask from
// the chunk's first slot), unnormalised: m[h] = the largest score of a valid slot (-inf: none; then acc[h] and
// l[h] are not set), acc[h][i] = sum_s exp(score_s - m[h]) V[s][i] and l[h] = sum_s exp(score_s - m[h]) over the
// valid slots, in slot order.
static inline __attribute__((always_inline)) void attend_chunk(const int KB, const int NH, const float *const *q,
        const void *K, int64_t ks, const void *V, int64_t vs, int S, int hd, int vd, const uint8_t *mask, float scale,
        float *const *acc, float *m, float *l) {
    float scores[MAX_HEADS * ATTENTION_CHUNK];
    float *sc[MAX_HEADS];
    for (int h = 0; h < NH; h++) sc[h] = scores + (size_t)h * ATTENTION_CHUNK;
    int any = 0;
    for (int s = 0; s < S && !any; s++) any = !mask || mask[s];
    if (!any) {  // a chunk the query does not see (a verification's later slots): nothing read
        for (int h = 0; h < NH; h++) m[h] = -INFINITY;
        return;
    }
    head_scores(KB, NH, q, K, ks, S, hd, mask, scale, sc, V, vs, vd);
    for (int h = 0; h < NH; h++) {
        float mx = -INFINITY;
        for (int s = 0; s < S; s++) mx = sc[h][s] > mx ? sc[h][s] : mx;
        m[h] = mx;
        if (mx == -INFINITY) continue;  // (its acc below is not used)
        exp_shifted(sc[h], S, mx);
        float sum = 0.0f;
        for (int s = 0; s < S; s++)
            if (!mask || mask[s]) sum += sc[h][s];
        l[h] = sum;
    }
    head_values(KB, NH, (const float *const *)sc, V, vs, S, vd, mask, acc);
}

// out[i] = sum_c w_c acc_c[i] / sum_c w_c l_c over the n chunks with a valid slot, in chunk order, w_c =
// exp(m_c - max m): zeros where no chunk has one. One chunk gives its acc / l exactly (w = 1).
static void merge_chunks(int n, const float *acc, const float *m, const float *l, int vd, float *out) {
    float mx = -INFINITY;
    for (int c = 0; c < n; c++) mx = m[c] > mx ? m[c] : mx;
    memset(out, 0, sizeof(float) * (size_t)vd);
    if (mx == -INFINITY) return;
    float sum = 0.0f;
    for (int c = 0; c < n; c++) {
        if (m[c] == -INFINITY) continue;
        const float w = expf(m[c] - mx);
        const float *a = acc + (size_t)c * vd;
        sum = fmaf(w, l[c], sum);
        for (int i = 0; i < vd; i++) out[i] = fmaf(w, a[i], out[i]);
    }
    const float inv = 1.0f / sum;
    for (int i = 0; i < vd; i++) out[i] *= inv;
}

// Slots go in chunks of ATTENTION_CHUNK from slot 0 (flash-decoding's split): the threads share a long context's
// keys and values instead of each reading all of them for its heads, and a chunk a query does not see is not read.
// The chunks' bounds do not depend on S, T or the threads, so a query's result still depends only on its own
// valid slots (plain decoding and a verification give it bit for bit the same). The chunks' partial results are
// held for up to ATTENTION_PARTIAL_BYTES of (token, heads) units at a time.
struct attention_call {
    const float *q;
    int T, nq;
    int64_t q_head, q_tok;
    int hd;
    const void *keys, *values;
    int64_t k_head, k_slot, v_head, v_slot;
    int nkv, S, vd;
    const uint8_t *mask;
    float scale;
    float *out;
    int kv_bf16;
    int group, nch, per, hgroups, units, wave, threads;
    float *acc, *pm, *pl;  // the partial results of a wave of units
};

// thread t of nt: its share of the tasks of units u0 .. u0 + nu - 1
static void attention_tasks(const struct attention_call *a, int u0, int nu, int t, int nt) {
    const int nch = a->nch, per = a->per, hgroups = a->hgroups, group = a->group, S = a->S, vd = a->vd;
    const size_t eb = a->kv_bf16 ? 2 : 4;
    for (int task = nu * nch * t / nt; task < nu * nch * (t + 1) / nt; task++) {
        const int c = task % nch, k = task / nch, u = u0 + k;
        const int g = u % hgroups, j = (u / hgroups) % a->nkv, t_ = u / (hgroups * a->nkv);
        const int h0 = j * group + g * per, nh = group - g * per < per ? group - g * per : per;
        const int s0 = c * ATTENTION_CHUNK, n = S - s0 < ATTENTION_CHUNK ? S - s0 : ATTENTION_CHUNK;
        const void *K = (const char *)a->keys + (j * a->k_head + (int64_t)s0 * a->k_slot) * eb;
        const void *V = (const char *)a->values + (j * a->v_head + (int64_t)s0 * a->v_slot) * eb;
        const uint8_t *mt = a->mask ? a->mask + (size_t)t_ * S + s0 : NULL;
        const float *qh[MAX_HEADS];
        float *ah[MAX_HEADS];
        for (int h = 0; h < nh; h++) {
            qh[h] = a->q + (h0 + h) * a->q_head + t_ * a->q_tok;
            ah[h] = a->acc + (((size_t)k * per + h) * nch + c) * vd;
        }
        float m[MAX_HEADS], l[MAX_HEADS] = {0};
#define ATTEND(KB, NH) \
    attend_chunk(KB, NH, qh, K, a->k_slot, V, a->v_slot, n > 0 ? n : 0, a->hd, vd, mt, a->scale, ah, m, l)
        switch ((a->kv_bf16 ? 16 : 0) + nh) {  // (cache dtype, heads) as compile-time constants
            case 20: ATTEND(16, 4); break;
            case 19: ATTEND(16, 3); break;
            case 18: ATTEND(16, 2); break;
            case 17: ATTEND(16, 1); break;
            case 4: ATTEND(32, 4); break;
            case 3: ATTEND(32, 3); break;
            case 2: ATTEND(32, 2); break;
            default: ATTEND(32, 1); break;
        }
#undef ATTEND
        for (int h = 0; h < nh; h++) {
            a->pm[((size_t)k * per + h) * nch + c] = m[h];
            a->pl[((size_t)k * per + h) * nch + c] = l[h];
        }
    }
}

// thread t of nt: its share of the merges of units u0 .. u0 + nu - 1, once their tasks are all done
static void attention_merges(const struct attention_call *a, int u0, int nu, int t, int nt) {
    const int per = a->per, hgroups = a->hgroups, group = a->group, nch = a->nch;
    for (int kh = nu * per * t / nt; kh < nu * per * (t + 1) / nt; kh++) {
        const int k = kh / per, h = kh % per, u = u0 + k;
        const int g = u % hgroups, j = (u / hgroups) % a->nkv, t_ = u / (hgroups * a->nkv);
        if (g * per + h >= group) continue;  // the last group's missing heads
        const size_t at = (size_t)kh * nch;
        merge_chunks(nch, a->acc + at * a->vd, a->pm + at, a->pl + at, a->vd,
                     a->out + ((size_t)t_ * a->nq + j * group + g * per + h) * a->vd);
    }
}

// The attention of gso_attention below as a call that a team of threads runs (gso_attention_run; block.c's decode
// step runs it on its own team): NULL where there is nothing to compute.
void *gso_attention_begin(const float *q, int T, int nq, int64_t q_head, int64_t q_tok, int hd,
                          const void *keys, int64_t k_head, int64_t k_slot, const void *values, int64_t v_head,
                          int64_t v_slot, int nkv, int S, int vd, const uint8_t *mask, float scale, float *out,
                          int kv_bf16, int nthreads) {
    if (T <= 0 || nq <= 0) return NULL;
    struct attention_call *a = (struct attention_call *)gs_alloc(sizeof(struct attention_call));
    *a = (struct attention_call){.q = q, .T = T, .nq = nq, .q_head = q_head, .q_tok = q_tok, .hd = hd, .keys = keys,
                                 .values = values, .k_head = k_head, .k_slot = k_slot, .v_head = v_head,
                                 .v_slot = v_slot, .nkv = nkv, .S = S, .vd = vd, .mask = mask, .scale = scale,
                                 .out = out, .kv_bf16 = kv_bf16};
    a->group = nq / nkv, a->nch = S > 0 ? (S + ATTENTION_CHUNK - 1) / ATTENTION_CHUNK : 1;
    // a unit: up to `per` query heads of one KV head for one token; a task: a unit over one chunk. Threads only pay
    // off for long contexts; then fewer heads per unit where there would be fewer tasks than threads (the same
    // result either way).
    a->threads = (int64_t)S * T * nq * hd > ATTENTION_THREADED_WORK ? nthreads : 1;
    int per = a->group < MAX_HEADS ? a->group : MAX_HEADS;
    while (per > 1 && (int64_t)T * nkv * a->nch * ((a->group + per - 1) / per) < a->threads) per = (per + 1) / 2;
    a->per = per, a->hgroups = (a->group + per - 1) / per, a->units = T * nkv * a->hgroups;
    const size_t unit_floats = (size_t)per * a->nch * (vd + 2);  // per head and chunk: values, largest score, sum
    int wave = (int)(ATTENTION_PARTIAL_BYTES / (unit_floats * sizeof(float)));
    a->wave = wave < 1 ? 1 : wave > a->units ? a->units : wave;
    a->acc = (float *)gs_alloc(sizeof(float) * unit_floats * a->wave);
    a->pm = a->acc + (size_t)a->wave * per * a->nch * vd, a->pl = a->pm + (size_t)a->wave * per * a->nch;
    return a;
}

// Every thread t of a team of nt runs this; sync(ctx) waits for the whole team (the tasks' partial results before
// their merge). Threads past the call's own count (gso_attention_begin's nthreads, or 1 for a short context) only
// wait.
void gso_attention_run(const void *call, int t, int nt, void (*sync)(void *), void *ctx) {
    const struct attention_call *a = (const struct attention_call *)call;
    const int used = a->threads < nt ? a->threads : nt;
    for (int u0 = 0; u0 < a->units; u0 += a->wave) {
        const int nu = a->units - u0 < a->wave ? a->units - u0 : a->wave;
        if (t < used) attention_tasks(a, u0, nu, t, used);
        sync(ctx);
        if (t < used) attention_merges(a, u0, nu, t, used);
        if (u0 + a->wave < a->units) sync(ctx);  // (the next wave writes the same partials)
    }
}

void gso_attention_end(void *call) {
    if (!call) return;
    free(((struct attention_call *)call)->acc);
    free(call);
}

#ifdef _OPENMP
static void omp_sync(void *ctx) {
    (void)ctx;
#pragma omp barrier
}
#endif

static void no_sync(void *ctx) { (void)ctx; }  // one thread (an orphaned barrier would bind to a caller's team)

void gso_attention(const float *q, int T, int nq, int64_t q_head, int64_t q_tok, int hd,
                   const void *keys, int64_t k_head, int64_t k_slot, const void *values, int64_t v_head,
                   int64_t v_slot, int nkv, int S, int vd, const uint8_t *mask, float scale, float *out, int kv_bf16,
                   int nthreads) {
    void *call = gso_attention_begin(q, T, nq, q_head, q_tok, hd, keys, k_head, k_slot, values, v_head, v_slot, nkv,
                                     S, vd, mask, scale, out, kv_bf16, nthreads);
    if (!call) return;
    const int threads = ((const struct attention_call *)call)->threads;
    if (threads <= 1) {
        gso_attention_run(call, 0, 1, no_sync, NULL);
    } else {
#pragma omp parallel num_threads(threads)
        {
#ifdef _OPENMP
            gso_attention_run(call, omp_get_thread_num(), omp_get_num_threads(), omp_sync, NULL);
#else
            gso_attention_run(call, 0, 1, no_sync, NULL);
#endif
        }
    }
    gso_attention_end(call);
}

// ---- GeGLU -------------------------------------------------------------------------------------------------
// out[t, i] = gelu_tanh(gu[t, i]) * gu[t, I + i]; gelu_tanh(x) = x / (1 + exp(-2u)), u = sqrt(2/pi)(x + 0.044715x^3)
// (the same function as 0.5x(1 + tanh(u))).
void gso_gelu_mul(const float *gu, int T, int I, float *out) {
    const float c = 0.7978845608028654f;
    for (int t = 0; t < T; t++) {
        const float *g = gu + (size_t)t * 2 * I, *u = g + I;
        float *o = out + (size_t)t * I;
        int i = 0;
#ifdef GS_AVX2
        const __m256 vc = _mm256_set1_ps(-2.0f * c), vk = _mm256_set1_ps(0.044715f), one = _mm256_set1_ps(1.0f);
        for (; i + 8 <= I; i += 8) {
            const __m256 x = _mm256_loadu_ps(g + i);
            const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(vk, x), _mm256_mul_ps(x, x), x);
            const __m256 e = exp8(_mm256_mul_ps(vc, inner));
            const __m256 gelu = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(gelu, _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) {
            const float x = g[i];
            o[i] = x / (1.0f + expf(fminf(88.0f, -2.0f * c * (x + 0.044715f * x * x * x)))) * u[i];
        }
    }
}

// ---- a step's cache views ---------------------------------------------------------------------------------
// The slots and masks of a decode / verification step of T tokens at positions start .. start + T - 1, as
// cache.py's _Step gives them (block_target), in one call. Sliding layers (ring > 0 slots; slot_pos[s]: the
// position slot s holds, -1 none): slots_r[t] = (start + t) % ring, mask_r[t, s] = whether query t sees the
// position p that slot s holds once this step's keys are written (positions >= start are stale):
// 0 <= p <= start + t and p > start + t - window. Full layers: slots_f[t] = start + t, and with mask_f (NULL:
// none, a single query sees every slot) mask_f[t, s] = s <= start + t over start + T slots.
void gso_step_views(const int64_t *slot_pos, int64_t ring, int64_t window, int64_t start, int T, int64_t *slots_r,
                    uint8_t *mask_r, int64_t *slots_f, uint8_t *mask_f) {
    for (int t = 0; t < T; t++) slots_f[t] = start + t;
    if (mask_f)
        for (int t = 0; t < T; t++)
            for (int64_t s = 0; s < start + T; s++) mask_f[(size_t)t * (start + T) + s] = s <= start + t;
    if (ring <= 0) return;
    for (int t = 0; t < T; t++) slots_r[t] = (start + t) % ring;
    for (int64_t s = 0; s < ring; s++) {
        int64_t p = slot_pos[s] >= start ? -1 : slot_pos[s];
        const int64_t back = (s - start % ring + ring) % ring;  // this step writes position start + back here
        if (back < T) p = start + back;
        for (int t = 0; t < T; t++) {
            const int64_t q = start + t;
            mask_r[(size_t)t * ring + s] = p >= 0 && p <= q && p > q - window;
        }
    }
}

// ---- argmax ------------------------------------------------------------------------------------------------
// out[r] = the index of the first maximum of row r of x [R, n] (the first NaN if the row has one), as
// torch.argmax: greedy decoding's pick over a 262k vocabulary, which PyTorch takes ~0.25 ms for. Long rows are
// split in ARGMAX_CHUNKS contiguous chunks over the threads: the LM head's threads have just written their halves of
// the logits, each into its own core's cache (one thread read them in 0.12 ms a step, with the other half in the
// other core). The chunks' results are combined in order, so the answer does not depend on the thread count.
#define ARGMAX_CHUNKS 2
#define ARGMAX_THREADED_N 65536

// [i0, i1) of row: its first NaN (*nan = 1) or its first maximum
static int64_t argmax_span(const float *row, int64_t i0, int64_t i1, float *best_out, int *nan_out) {
    float best = row[i0];
    int nan = 0;
    int64_t i = i0;
#ifdef GS_AVX2
    __m256 mx = _mm256_set1_ps(row[i0]), unord = _mm256_setzero_ps();
    for (; i + 8 <= i1; i += 8) {
        const __m256 v = _mm256_loadu_ps(row + i);
        mx = _mm256_max_ps(mx, v);
        unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, mx);
    for (int l = 0; l < 8; l++) best = lanes[l] > best ? lanes[l] : best;
    nan = _mm256_movemask_ps(unord) != 0;
#endif
    for (; i < i1; i++) {
        nan |= row[i] != row[i];
        best = row[i] > best ? row[i] : best;
    }
    int64_t at = i0;
    if (nan) {
        while (row[at] == row[at]) at++;
    } else {
        while (row[at] != best) at++;
    }
    *best_out = best;
    *nan_out = nan;
    return at;
}

void gso_argmax(const float *x, int R, int64_t n, int64_t *out, int nthreads) {
    if (R <= 0 || n <= 0) return;
    const int chunks = n >= ARGMAX_THREADED_N ? ARGMAX_CHUNKS : 1, tasks = R * chunks;
    int64_t *at = (int64_t *)gs_alloc(sizeof(int64_t) * (size_t)tasks);
    float *best = (float *)gs_alloc(sizeof(float) * (size_t)tasks);
    int *nan = (int *)gs_alloc(sizeof(int) * (size_t)tasks);
#pragma omp parallel for schedule(static) num_threads(chunks > 1 ? nthreads : 1)
    for (int task = 0; task < tasks; task++) {
        const int r = task / chunks, c = task % chunks;
        at[task] = argmax_span(x + (size_t)r * n, n * c / chunks, n * (c + 1) / chunks, &best[task], &nan[task]);
    }
    for (int r = 0; r < R; r++) {
        int w = r * chunks;  // the first chunk with a NaN, else the first with the largest maximum
        for (int c = r * chunks + 1; c < (r + 1) * chunks && !nan[w]; c++)
            if (nan[c] || best[c] > best[w]) w = c;
        out[r] = at[w];
    }
    free(at);
    free(best);
    free(nan);
}

// ---- a pass over the weights -------------------------------------------------------------------------------
// Reads every byte of the n buffers (ptrs[i], sizes[i] bytes) once over the threads and returns a checksum (so
// that nothing is optimised away). The benchmarks time it beside decoding: the speed limit of a decode step that
// did nothing but read its weights, at that moment (this shared VM's bandwidth moves by 2x within minutes). Large
// buffers go in 1 MB chunks taken in turn by the threads: over 1 GiB that read ~3% faster than two halves (as fast
// as PyTorch's sum, the other benchmarks' bandwidth figure); smaller ones in one piece per thread.
#define READ_CHUNK_LINES 16384
uint64_t gso_read_pass(const void *const *ptrs, const int64_t *sizes, int n, int nthreads) {
    uint64_t sum = 0;
#pragma omp parallel num_threads(nthreads) reduction(^ : sum)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const int t = 0, T = 1;
#endif
        for (int i = 0; i < n; i++) {
            const int64_t lines = sizes[i] / 64, per = (lines + T - 1) / T;
            const int64_t chunk = per < READ_CHUNK_LINES ? per : READ_CHUNK_LINES;
            const char *p = (const char *)ptrs[i];
            for (int64_t c0 = chunk * t; c0 < lines; c0 += chunk * T) {
                const int64_t c1 = c0 + chunk < lines ? c0 + chunk : lines;
                int64_t l = c0;
#ifdef GS_AVX2  // 256-bit loads: on Zen 4 512-bit ones streamed ~8% slower here
                __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
                for (; l + 2 <= c1; l += 2) {
                    a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(p + 64 * l)));
                    a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(p + 64 * l + 32)));
                    a2 = _mm256_xor_si256(a2, _mm256_loadu_si256((const __m256i *)(p + 64 * l + 64)));
                    a3 = _mm256_xor_si256(a3, _mm256_loadu_si256((const __m256i *)(p + 64 * l + 96)));
                }
                a0 = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
                uint64_t v[4];
                _mm256_storeu_si256((__m256i *)v, a0);
                sum ^= v[0] ^ v[1] ^ v[2] ^ v[3];
#endif
                for (; l < c1; l++) {
                    uint64_t v[8];
                    memcpy(v, p + 64 * l, 64);
                    sum ^= v[0] ^ v[1] ^ v[2] ^ v[3] ^ v[4] ^ v[5] ^ v[6] ^ v[7];
                }
            }
            if (t == T - 1)
                for (int64_t b = lines * 64; b < sizes[i]; b++) sum ^= (uint64_t)(uint8_t)p[b];
        }
    }
    return sum;
}
