// A whole Gemma 3 decoder block in one call, for the few tokens of a decode or verification step.
//
// At batch 1 a 270M model's step is short (~15 ms), and the Python around each of a block's ~11 kernel calls
// (module dispatch, tensor allocation, ctypes argument conversion) cost ~4 ms of it. This runs the same kernels,
// in the same order, on the same values as models/gemma3.py's Python path, so for a float32 model its output is
// bit for bit that path's: RMSNorm -> qkv -> q/k norm + RoPE -> K/V into the cache -> attention -> o -> norm +
// residual -> norm -> gate_up -> GeGLU -> down -> norm + residual.
// With bf16 set, x and the KV cache are bfloat16 (the model's dtype): x is widened on entry, the block computes in
// float32 like the float32 path, and its output and new K/V are rounded to bfloat16 once. That is not what the
// per-op bfloat16 path computes (it rounds after every op), so every decode and verification step of a bfloat16
// model must take this block (cache.block_target, engine.SPEC_MARGIN) for speculation to stay exact.
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

// the kernels of linear.c and ops.c
void gsq_linear(int bits, int f32, int blocked, int x8, const float *x, int M, int K, const void *q, const void *s,
                const void *b, int g, int64_t N, float *y, int nthreads);
int gsq_linear_argmax(int bits, int f32, int blocked, int x8, const float *x, int K, const void *q, const void *s,
                      const void *b, int g, int64_t N, float *y, int64_t *best, int nthreads);
void gsq_linear_f32(const float *x, int M, int K, const float *w, int64_t N, float *y, int nthreads);
void gsq_linear_bf16(const float *x, int M, int K, const uint16_t *w, int64_t N, float *y, int nthreads);
void gso_rms_norm(const float *x, const float *w, float eps, int rows, int dim, const float *add, float *out);
void gso_qk_norm_rope(float *qkv, int T, int row, int nq, int nkv, int hd, const float *qw, const float *kw,
                      float eps, const float *cos, const float *sin, int rot);
void gso_attention(const float *q, int T, int nq, int64_t q_head, int64_t q_tok, int hd,
                   const void *keys, int64_t k_head, int64_t k_slot, const void *values, int64_t v_head,
                   int64_t v_slot, int nkv, int S, int vd, const uint8_t *mask, float scale, float *out, int kv_bf16,
                   int nthreads);
void *gso_attention_begin(const float *q, int T, int nq, int64_t q_head, int64_t q_tok, int hd,
                          const void *keys, int64_t k_head, int64_t k_slot, const void *values, int64_t v_head,
                          int64_t v_slot, int nkv, int S, int vd, const uint8_t *mask, float scale, float *out,
                          int kv_bf16, int nthreads);
void gso_attention_run(const void *call, int t, int nt, void (*sync)(void *), void *ctx);
void gso_attention_end(void *call);
void gso_gelu_mul(const float *gu, int T, int I, float *out);
void gso_argmax(const float *x, int R, int64_t n, int64_t *out, int nthreads);
void gso_step_views(const int64_t *slot_pos, int64_t ring, int64_t window, int64_t start, int T, int64_t *slots_r,
                    uint8_t *mask_r, int64_t *slots_f, uint8_t *mask_f);
int gsq_rows(int bits, int f32, int blocked, const void *q, const void *s, const void *b, int K, int g, int64_t N,
             const int64_t *ids, int64_t R, void *out, int out_bf16);
int gsq_team_ok(int bits, int blocked, int x8, int K, int g, int has_bias);
void *gsq_team_prepare(int bits, int f32, int blocked, int x8, const float *x, int K, const void *q, const void *s,
                       const void *b, int g, int64_t N, float *y);
void gsq_team_rows(const void *call, int t, int nt);
void gsq_team_free(void *call);
void gsq_team_prefetch(int bits, int f32, int K, const void *q, const void *s, const void *b, int g, int64_t N, int t,
                       int nt, const int *flag, int want, size_t max_bytes);

// A weight as the matmul kernels take it (kernels/__init__.py builds these).
struct gs_weight {
    int kind;  // 0 float32, 1 bfloat16, 4 int4, 8 int8
    int f32;   // float32 scales (int4 / int8)
    int blocked;  // int4 / int8 rows in the block layout (linear.c)
    const void *q, *s, *b;
    int group;
    int64_t N;
};

struct gs_gemma3_block {
    struct gs_weight qkv, o, gate_up, down;
    const float *input_norm, *post_attn_norm, *pre_ff_norm, *post_ff_norm, *q_norm, *k_norm;
    float eps, scale;
    int hidden, n_q, n_kv, head_dim, inter;
};

// Built with -DGS_PROFILE (scripts/profile_step.py), the block adds the seconds spent in each phase to
// gs_profile_seconds[phase] and to gs_profile_block_seconds[block of the step][phase] (the LM head and argmax
// under the last block); a normal build has no timers.
enum { PH_QKV, PH_O, PH_GATE_UP, PH_DOWN, PH_ATTENTION, PH_OTHER, PH_HEAD, PH_ARGMAX, PH_COUNT };
#define PROFILE_BLOCKS 64
#ifdef GS_PROFILE
#include <time.h>
double gs_profile_seconds[PH_COUNT];
double gs_profile_block_seconds[PROFILE_BLOCKS][PH_COUNT];
static double profile_t0;
static int profile_block;
static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
#define PHASE(ph)                                                                                   \
    do {                                                                                            \
        const double t_ = now_s();                                                                  \
        gs_profile_seconds[ph] += t_ - profile_t0;                                                  \
        gs_profile_block_seconds[profile_block][ph] += t_ - profile_t0;                             \
        profile_t0 = t_;                                                                            \
    } while (0)
#define PROFILE_BLOCK(i) (profile_block = (i) < PROFILE_BLOCKS ? (i) : PROFILE_BLOCKS - 1)
#define PHASE_START() (profile_t0 = now_s())
#else
#define PHASE(ph) ((void)0)
#define PHASE_START() ((void)0)
#define PROFILE_BLOCK(i) ((void)0)
#endif

// bf16: the model's dtype is bfloat16 (the int8/int4 kernels may round x to int8, linear.c)
static void matmul(const struct gs_weight *w, const float *x, int M, int K, float *y, int bf16, int nthreads) {
    if (w->kind == 0)
        gsq_linear_f32(x, M, K, (const float *)w->q, w->N, y, nthreads);
    else if (w->kind == 1)
        gsq_linear_bf16(x, M, K, (const uint16_t *)w->q, w->N, y, nthreads);
    else
        gsq_linear(w->kind, w->f32, w->blocked, bf16 || w->blocked, x, M, K, w->q, w->s, w->b, w->group, w->N, y,
                   nthreads);  // (a blocked weight is read by the int8-activation tiles, as QuantizedWeight.linear)
}

// matmul for one row of x that also gives *best, the first maximum of y, while the rows are computed (y NULL: not
// stored): 0 where w's kernel cannot (nothing computed)
static int matmul_argmax(const struct gs_weight *w, const float *x, int K, float *y, int64_t *best, int bf16,
                         int nthreads) {
#ifdef GS_ARGMAX_APART  // (an A/B switch: the head, then gso_argmax)
    return 0;
#endif
    return w->kind > 1 && gsq_linear_argmax(w->kind, w->f32, w->blocked, bf16 || w->blocked, x, K, w->q, w->s, w->b,
                                            w->group, w->N, y, best, nthreads);
}

// q/k norms and RoPE on the T rows of qkv, then their K/V into cache slots slots[t]
static void rope_and_store(const struct gs_gemma3_block *b, float *qkv, int T, const float *cos, const float *sin,
                           void *kbuf, void *vbuf, int64_t capacity, const int64_t *slots, int bf16) {
    const int hd = b->head_dim, q_dim = b->n_q * hd, kv_dim = b->n_kv * hd, row = q_dim + 2 * kv_dim;
    gso_qk_norm_rope(qkv, T, row, b->n_q, b->n_kv, hd, b->q_norm, b->k_norm, b->eps, cos, sin, hd);
    for (int t = 0; t < T; t++)
        for (int j = 0; j < b->n_kv; j++) {
            const size_t at = ((size_t)j * capacity + slots[t]) * hd;
            const float *k = qkv + (size_t)t * row + q_dim + (size_t)j * hd, *v = k + kv_dim;
            if (bf16) {
                for (int i = 0; i < hd; i++) {
                    ((uint16_t *)kbuf)[at + i] = f32_to_bf16(k[i]);
                    ((uint16_t *)vbuf)[at + i] = f32_to_bf16(v[i]);
                }
            } else {
                memcpy((float *)kbuf + at, k, sizeof(float) * hd);
                memcpy((float *)vbuf + at, v, sizeof(float) * hd);
            }
        }
}

// x_out[T, hidden] = the block applied to x_in. The new tokens' K/V go to cache slots slots[t] of kbuf/vbuf
// [n_kv, capacity, head_dim]; attention then reads slots [0, S) under mask [T, S] (NULL: all of them).
// x_in, x_out, kbuf and vbuf are float32, or bfloat16 when bf16 != 0.
void gs_gemma3_block(const struct gs_gemma3_block *b, const void *x_in, void *x_out, int T, const float *cos,
                     const float *sin, void *kbuf, void *vbuf, int64_t capacity, const int64_t *slots, int S,
                     const uint8_t *mask, int bf16, int nthreads) {
    PHASE_START();
    const int H = b->hidden, hd = b->head_dim, q_dim = b->n_q * hd, kv_dim = b->n_kv * hd;
    const int row = q_dim + 2 * kv_dim, I = b->inter;
    float *h = (float *)gs_alloc(sizeof(float) * (size_t)T * H);
    float *qkv = (float *)gs_alloc(sizeof(float) * (size_t)T * row);
    float *attn = (float *)gs_alloc(sizeof(float) * (size_t)T * q_dim);
    float *gu = (float *)gs_alloc(sizeof(float) * (size_t)T * 2 * I);
    float *act = (float *)gs_alloc(sizeof(float) * (size_t)T * I);
    float *wide = bf16 ? (float *)gs_alloc(sizeof(float) * (size_t)T * H * 2) : NULL;  // x_in, x_out in float32
    const float *xi = (const float *)x_in;
    float *xo = (float *)x_out;
    if (bf16) {
        for (size_t i = 0; i < (size_t)T * H; i++) wide[i] = bf16_to_f32(((const uint16_t *)x_in)[i]);
        xi = wide;
        xo = wide + (size_t)T * H;
    }

    gso_rms_norm(xi, b->input_norm, b->eps, T, H, NULL, h);
    PHASE(PH_OTHER);
    matmul(&b->qkv, h, T, H, qkv, bf16, nthreads);
    PHASE(PH_QKV);
    rope_and_store(b, qkv, T, cos, sin, kbuf, vbuf, capacity, slots, bf16);
    PHASE(PH_OTHER);
    gso_attention(qkv, T, b->n_q, hd, row, hd, kbuf, capacity * hd, hd, vbuf, capacity * hd, hd, b->n_kv, S, hd,
                  mask, b->scale, attn, bf16, nthreads);
    PHASE(PH_ATTENTION);
    matmul(&b->o, attn, T, q_dim, h, bf16, nthreads);
    PHASE(PH_O);
    gso_rms_norm(h, b->post_attn_norm, b->eps, T, H, xi, xo);

    gso_rms_norm(xo, b->pre_ff_norm, b->eps, T, H, NULL, h);
    PHASE(PH_OTHER);
    matmul(&b->gate_up, h, T, H, gu, bf16, nthreads);
    PHASE(PH_GATE_UP);
    gso_gelu_mul(gu, T, I, act);
    PHASE(PH_OTHER);
    matmul(&b->down, act, T, I, h, bf16, nthreads);
    PHASE(PH_DOWN);
    gso_rms_norm(h, b->post_ff_norm, b->eps, T, H, xo, xo);

    if (bf16)
        for (size_t i = 0; i < (size_t)T * H; i++) ((uint16_t *)x_out)[i] = f32_to_bf16(xo[i]);
    free(h);
    free(qkv);
    free(attn);
    free(gu);
    free(act);
    free(wide);
    PHASE(PH_OTHER);
}

// x[T, K] (the model's dtype: bfloat16 when bf16) = rows ids of the embedding table e (K = its row length) times
// scale, as models/gemma3.py's embed computes them: each row in the model's dtype (dequantized or widened), then
// multiplied by scale (sqrt(hidden) in that dtype) and rounded to it once. -1 for an id outside the table.
static int embed_rows(const struct gs_weight *e, int K, const int64_t *ids, int T, float scale, void *x, int bf16) {
    if (e->kind == 4 || e->kind == 8) {
        if (gsq_rows(e->kind, e->f32, e->blocked, e->q, e->s, e->b, K, e->group, e->N, ids, T, x, bf16)) return -1;
    } else {
        for (int t = 0; t < T; t++) {
            if (ids[t] < 0 || ids[t] >= e->N) return -1;
            for (int i = 0; i < K; i++) {
                const float v = f32_at(e->kind == 0 ? 32 : 16, e->q, ids[t] * K + i);
                if (bf16)
                    ((uint16_t *)x)[(size_t)t * K + i] = f32_to_bf16(v);
                else
                    ((float *)x)[(size_t)t * K + i] = v;
            }
        }
    }
    for (size_t i = 0; i < (size_t)T * K; i++) {  // a float32 product of two bfloat16 values is exact: one rounding
        if (bf16)
            ((uint16_t *)x)[i] = f32_to_bf16(bf16_to_f32(((uint16_t *)x)[i]) * scale);
        else
            ((float *)x)[i] *= scale;
    }
    return 0;
}

// Every block of the model for one decode / verification step in one call: the Python around each block's call
// cost ~85 us (~1.5 ms of a ~13 ms step at 18 layers). The arguments come in one struct, which the caller keeps
// between steps and updates in place (the layers, table, norm and head once per cache; the tokens, buffers, RoPE
// rows and cache views each step): converting ~30 ctypes arguments cost a step ~0.1 ms with the caches cold after
// the previous one (kernels/__init__.py StackStep mirrors it).
// Layer i has K/V buffers kbufs[i] / vbufs[i]; sliding layers (sliding[i] != 0) use the ring view (ring_cap
// slots, slots_r, S_r, mask_r) and the local RoPE rows, full layers the linear view and the global ones; the views
// are shared by all layers of a kind. x_in, x_out and scratch are [T, hidden] in the model's dtype; x_out may not
// be x_in. final_norm (NULL: none) is the model's last RMSNorm, applied to the last block's output (bfloat16: from
// the rounded output, rounded again) with ops.c's RMSNorm: for a float32 model what models/gemma3.py computes, for
// a bfloat16 one that path's F.rms_norm up to the last bit of a few values in a million. Every decode and
// verification step takes this call, so speculation stays exact. In here it costs ~1 us, as three PyTorch ops
// ~0.25 ms with the caches cold.
// head (NULL: none; with the final norm) is the LM head: logits[T, head->N] = x_out widened to float32 @ head^T,
// as models/layers.py lm_logits computes them (the same kernel and values), and best[t] (NULL: none) the first
// maximum of row t, as torch.argmax: for one row of an int8 / int4 head while its logits are computed, else
// while they are still in the cores' caches. store_logits = 0 (with best): the logits buffer may be left as it
// is (a greedy decode step then writes no 1 MB of logits).
// ids (NULL: none) are the step's tokens: x_in is then first filled with their rows of the embedding table embed
// (embed_rows above; ~0.1 ms of Python and PyTorch a step with the caches cold).
struct gs_gemma3_step {
    int n;
    const struct gs_gemma3_block *const *blocks;
    const uint8_t *sliding;
    void *const *kbufs, *const *vbufs;
    const int64_t *ids;
    const struct gs_weight *embed;
    float embed_scale;
    void *x_in, *x_out, *scratch;
    int T;
    const float *cos_l, *sin_l, *cos_f, *sin_f;
    int64_t ring_cap;
    const int64_t *slots_r;
    int S_r;
    const uint8_t *mask_r;
    int64_t full_cap;
    const int64_t *slots_f;
    int S_f;
    const uint8_t *mask_f;
    const float *final_norm;
    float final_eps;
    const struct gs_weight *head;
    float *logits;
    int64_t *best;
    int store_logits, bf16, nthreads;
};

int gs_gemma3_step_size(void) { return (int)sizeof(struct gs_gemma3_step); }  // (the ctypes mirror checks it)


// The layer's view of the cache and RoPE rows (gs_gemma3_step's sliding or full ones)
struct layer_view {
    const float *cos, *sin;
    int64_t capacity;
    const int64_t *slots;
    int S;
    const uint8_t *mask;
};

static struct layer_view view_of(const struct gs_gemma3_step *a, int i) {
    if (a->sliding[i]) return (struct layer_view){a->cos_l, a->sin_l, a->ring_cap, a->slots_r, a->S_r, a->mask_r};
    return (struct layer_view){a->cos_f, a->sin_f, a->full_cap, a->slots_f, a->S_f, a->mask_f};
}

#ifdef _OPENMP
// ---- a decode step's blocks on one team of threads ----------------------------------------------------------
// A decode step (T = 1) on two or more threads whose matrices all have one-row team kernels (int8 / int4 weights:
// linear.c gsq_team_*) runs its blocks in one parallel region. Thread 0 does the small ops between the matmuls
// (norms, RoPE and the cache writes, attention, rounding x for the next matmul) while the other threads prefetch
// the first rows of the next matrix, their own and thread 0's, into their L2: memory would be idle then. Then
// every thread computes its rows. Each op is gs_gemma3_block's on the same values (the same bits), and a matmul's
// fork and join (~1.1 us on Zen 4) become two barriers.
int gs_team_decode = 1;  // 0: every step takes gs_gemma3_block (tests compare the two)
long gs_team_steps;       // the steps run on a team (tests)
#ifndef TEAM_PREFETCH_BYTES
#define TEAM_PREFETCH_BYTES (256 << 10)  // most of a range's values a helper prefetches (L2: 1 MB on Zen 4)
#endif

struct team {
    void *call;  // the matmul thread 0 prepared
    int serial;  // thread 0's small-op phases done (the helpers prefetch until it reaches theirs)
    float *h, *qkv, *attn, *gu, *act, *wide;
    _Alignas(64) int arrived;  // team_sync's, a cache line of their own (the waiters spin on it)
    int round;
};

// Every thread of the team waits here for the others. A spinning barrier: the team has at most one thread per
// processor (team_step) and a wait lasts microseconds (OpenMP's barrier: ~0.5 us on Zen 4); past ~2000 spins
// (~40 us: another process holds the core) it yields the core at every check.
static void team_sync(struct team *tm, int nt, int *round) {
#ifdef GS_TEAM_OMP_BARRIER
    (void)tm, (void)nt, (void)round;
#pragma omp barrier
#else
    const int next = ++*round;
    if (__atomic_add_fetch(&tm->arrived, 1, __ATOMIC_ACQ_REL) == nt) {
        __atomic_store_n(&tm->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&tm->round, next, __ATOMIC_RELEASE);
        return;
    }
    for (long spins = 0; __atomic_load_n(&tm->round, __ATOMIC_ACQUIRE) != next; spins++) {
        if (spins > 2000) sched_yield();
#ifdef GS_AVX2
        _mm_pause();
#endif
    }
#endif
}

static int team_ok(const struct gs_weight *w, int K, int bf16) {
    return (w->kind == 4 || w->kind == 8) &&
           gsq_team_ok(w->kind, w->blocked, bf16 || w->blocked, K, w->group, w->b != NULL);
}

struct team_sync_args {
    struct team *tm;
    int nt, *round;
};

static void team_sync_call(void *args) {
    const struct team_sync_args *a = (const struct team_sync_args *)args;
    team_sync(a->tm, a->nt, a->round);
}

// Every thread of the team: y = x @ w^T; thread 0 arrives when its small ops have made x, the others at once
static void team_matmul(struct team *tm, int t, int nt, int *phase, const struct gs_weight *w, int K, const float *x,
                        float *y, int bf16, int *round) {
    ++*phase;
    if (t == 0) {
        tm->call = gsq_team_prepare(w->kind, w->f32, w->blocked, bf16 || w->blocked, x, K, w->q, w->s, w->b, w->group,
                                    w->N, y);
        __atomic_store_n(&tm->serial, *phase, __ATOMIC_RELEASE);
    } else {
        gsq_team_prefetch(w->kind, w->f32, K, w->q, w->s, w->b, w->group, w->N, t, nt, &tm->serial, *phase,
                          TEAM_PREFETCH_BYTES);
    }
    team_sync(tm, nt, round);
    gsq_team_rows(tm->call, t, nt);
    team_sync(tm, nt, round);
    if (t == 0) gsq_team_free(tm->call);
}

// gs_gemma3_block for one token, run by every thread of the team
static void team_block(const struct gs_gemma3_block *b, const void *x_in, void *x_out, const struct layer_view *v,
                       void *kbuf, void *vbuf, int bf16, struct team *tm, int t, int nt, int *phase, int *round) {
    const int H = b->hidden, hd = b->head_dim, q_dim = b->n_q * hd, row = q_dim + 2 * b->n_kv * hd;
    const float *xi = bf16 ? tm->wide : (const float *)x_in;
    float *xo = bf16 ? tm->wide + H : (float *)x_out;
    if (t == 0) {
        PHASE_START();
        if (bf16)
            for (int i = 0; i < H; i++) tm->wide[i] = bf16_to_f32(((const uint16_t *)x_in)[i]);
        gso_rms_norm(xi, b->input_norm, b->eps, 1, H, NULL, tm->h);
        PHASE(PH_OTHER);
    }
    team_matmul(tm, t, nt, phase, &b->qkv, H, tm->h, tm->qkv, bf16, round);
    if (t == 0) {
        PHASE(PH_QKV);
        rope_and_store(b, tm->qkv, 1, v->cos, v->sin, kbuf, vbuf, v->capacity, v->slots, bf16);
        PHASE(PH_OTHER);
        tm->call = gso_attention_begin(tm->qkv, 1, b->n_q, hd, row, hd, kbuf, v->capacity * hd, hd, vbuf,
                                       v->capacity * hd, hd, b->n_kv, v->S, hd, v->mask, b->scale, tm->attn, bf16, nt);
    }
    struct team_sync_args sync = {tm, nt, round};
    team_sync(tm, nt, round);
    if (tm->call) gso_attention_run(tm->call, t, nt, team_sync_call, &sync);
    team_sync(tm, nt, round);
    if (t == 0) {
        gso_attention_end(tm->call);
        PHASE(PH_ATTENTION);
    }
    team_matmul(tm, t, nt, phase, &b->o, q_dim, tm->attn, tm->h, bf16, round);
    if (t == 0) {
        PHASE(PH_O);
        gso_rms_norm(tm->h, b->post_attn_norm, b->eps, 1, H, xi, xo);
        gso_rms_norm(xo, b->pre_ff_norm, b->eps, 1, H, NULL, tm->h);
        PHASE(PH_OTHER);
    }
    team_matmul(tm, t, nt, phase, &b->gate_up, H, tm->h, tm->gu, bf16, round);
    if (t == 0) {
        PHASE(PH_GATE_UP);
        gso_gelu_mul(tm->gu, 1, b->inter, tm->act);
        PHASE(PH_OTHER);
    }
    team_matmul(tm, t, nt, phase, &b->down, b->inter, tm->act, tm->h, bf16, round);
    if (t == 0) {
        PHASE(PH_DOWN);
        gso_rms_norm(tm->h, b->post_ff_norm, b->eps, 1, H, xo, xo);
        if (bf16)
            for (int i = 0; i < H; i++) ((uint16_t *)x_out)[i] = f32_to_bf16(xo[i]);
        PHASE(PH_OTHER);
    }
}

// The blocks of step a on one team, as above; 0 where that does not apply (nothing computed)
static int team_step(const struct gs_gemma3_step *a, int nthreads) {
    // (more threads than processors: a spinning wait holds the core the awaited thread needs, 10-50x slower steps)
    if (!gs_team_decode || a->T != 1 || nthreads < 2 || nthreads > omp_get_num_procs() || a->n <= 0) return 0;
    size_t H = 0, rows = 0, q = 0, I = 0;  // the buffers' sizes: the largest of any block
    for (int i = 0; i < a->n; i++) {
        const struct gs_gemma3_block *b = a->blocks[i];
        const int q_dim = b->n_q * b->head_dim, row = q_dim + 2 * b->n_kv * b->head_dim;
        if (!team_ok(&b->qkv, b->hidden, a->bf16) || !team_ok(&b->o, q_dim, a->bf16) ||
            !team_ok(&b->gate_up, b->hidden, a->bf16) || !team_ok(&b->down, b->inter, a->bf16))
            return 0;
        H = (size_t)b->hidden > H ? (size_t)b->hidden : H, q = (size_t)q_dim > q ? (size_t)q_dim : q;
        rows = (size_t)row > rows ? (size_t)row : rows, I = (size_t)b->inter > I ? (size_t)b->inter : I;
    }
    float *buf = (float *)gs_alloc(sizeof(float) * (3 * H + rows + q + 3 * I));
    struct team tm = {.h = buf};
    tm.qkv = tm.h + H, tm.attn = tm.qkv + rows, tm.gu = tm.attn + q, tm.act = tm.gu + 2 * I, tm.wide = tm.act + I;
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int phase = 0, round = 0;
        const void *in = a->x_in;
        for (int i = 0; i < a->n; i++) {
            void *out = (a->n - 1 - i) % 2 == 0 ? a->x_out : a->scratch;  // the last block writes x_out
            if (t == 0) PROFILE_BLOCK(i);
            const struct layer_view v = view_of(a, i);
            team_block(a->blocks[i], in, out, &v, a->kbufs[i], a->vbufs[i], a->bf16, &tm, t, nt, &phase, &round);
            in = out;
        }
    }
    free(buf);
    gs_team_steps++;
    return 1;
}
#endif

// Returns -1 (and computes nothing) for an id outside the table, else 0.
int gs_gemma3_step(const struct gs_gemma3_step *a) {
    const int n = a->n, T = a->T, bf16 = a->bf16;
    if (a->ids && (!a->embed || n <= 0 ||
                   embed_rows(a->embed, a->blocks[0]->hidden, a->ids, T, a->embed_scale, a->x_in, bf16)))
        return -1;
#ifdef _OPENMP
    const int teamed = team_step(a, a->nthreads);
#else
    const int teamed = 0;
#endif
    const void *in = a->x_in;
    for (int i = 0; i < n && !teamed; i++) {
        void *out = (n - 1 - i) % 2 == 0 ? a->x_out : a->scratch;  // the last block writes x_out
        PROFILE_BLOCK(i);
        const struct layer_view v = view_of(a, i);
        gs_gemma3_block(a->blocks[i], in, out, T, v.cos, v.sin, a->kbufs[i], a->vbufs[i], v.capacity, v.slots, v.S,
                        v.mask, bf16, a->nthreads);
        in = out;
    }
    if (a->final_norm == NULL || n == 0) return 0;
    const int H = a->blocks[0]->hidden;
    float *normed = (float *)a->x_out;  // the rows as float32: the head's input
    if (!bf16) {
        gso_rms_norm(normed, a->final_norm, a->final_eps, T, H, NULL, normed);
    } else {
        normed = (float *)gs_alloc(sizeof(float) * (size_t)T * H);
        uint16_t *y = (uint16_t *)a->x_out;
        for (int t = 0; t < T; t++) {
            float *row = normed + (size_t)t * H;
            for (int i = 0; i < H; i++) row[i] = bf16_to_f32(y[(size_t)t * H + i]);
            gso_rms_norm(row, a->final_norm, a->final_eps, 1, H, NULL, row);
            for (int i = 0; i < H; i++) row[i] = bf16_to_f32(y[(size_t)t * H + i] = f32_to_bf16(row[i]));
        }
    }
    if (a->head) {
        PHASE_START();
        if (a->best && T == 1 &&
            matmul_argmax(a->head, normed, H, a->store_logits ? a->logits : NULL, a->best, bf16, a->nthreads)) {
            PHASE(PH_HEAD);  // (with its argmax)
        } else {
            matmul(a->head, normed, T, H, a->logits, bf16, a->nthreads);
            PHASE(PH_HEAD);
            if (a->best) gso_argmax(a->logits, T, a->head->N, a->best, a->nthreads);
            PHASE(PH_ARGMAX);
        }
    }
    if (bf16) free(normed);
    return 0;
}

// Greedy decoding of up to `steps` tokens in one call (a plain greedy generation: the Python around each step,
// ~0.1-0.2 ms with the caches cold, once per call instead of once per token). Token 0 is first_id at position
// start; each step is gs_gemma3_step for one row, and its argmax (out[i]) is the next step's token. Per step
// this does what the Python around gs_gemma3_step does (cache.py kernel_views and end): the step's slots and
// masks (gso_step_views) into the buffers `a` points to, its RoPE rows (those of `a` are position start's,
// rope_row floats apart), and after the step the ring's slot_pos (ring: a->ring_cap, 0 for none). `a` is set for
// T = 1 with ids, head and best. Stops after a token in stop_ids (sorted). Returns the number of tokens in out, -1
// for an id outside the embedding table (only first_id can be: the caller checks that the head has no more rows
// than the table; a later failure would return the steps done).
int gs_gemma3_decode(struct gs_gemma3_step *a, int64_t first_id, int steps, int64_t start, int64_t *slot_pos,
                     int64_t window, int64_t rope_row, const int64_t *stop_ids, int n_stop, int64_t *out) {
    const float *cos_l = a->cos_l, *sin_l = a->sin_l, *cos_f = a->cos_f, *sin_f = a->sin_f;
    const int64_t ring = a->ring_cap;
    int64_t id = first_id;
    int n = 0;
    while (n < steps) {
        const int64_t p = start + n;
        gso_step_views(ring ? slot_pos : NULL, ring, window, p, 1, (int64_t *)a->slots_r, (uint8_t *)a->mask_r,
                       (int64_t *)a->slots_f, NULL);
        a->S_f = (int)(p + 1);
        a->cos_l = cos_l + n * rope_row, a->sin_l = sin_l + n * rope_row;
        a->cos_f = cos_f + n * rope_row, a->sin_f = sin_f + n * rope_row;
        *(int64_t *)a->ids = id;
        if (gs_gemma3_step(a)) return n ? n : -1;
        if (ring) slot_pos[p % ring] = p;
        id = out[n++] = a->best[0];
        int lo = 0, hi = n_stop;  // (stop_ids sorted: a binary search, for thousands of them)
        while (lo < hi) {
            const int mid = lo + (hi - lo) / 2;
            if (stop_ids[mid] < id)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo < n_stop && stop_ids[lo] == id) break;
    }
    return n;
}
