// A whole Gemma 3 decoder block in one call, for the few tokens of a decode or verification step.
//
// At batch 1 a 270M model's step is short (~15 ms), and the Python around each of a block's ~11 kernel calls
// (module dispatch, tensor allocation, ctypes argument conversion) cost ~4 ms of it. This runs the same kernels,
// in the same order, on the same values as models/gemma3.py's Python path, so its output is bit for bit that
// path's: RMSNorm -> qkv -> q/k norm + RoPE -> K/V into the cache -> attention -> o -> norm + residual ->
// norm -> gate_up -> GeGLU -> down -> norm + residual.
#include <stdlib.h>
#include <string.h>

#include "common.h"

// the kernels of linear.c and ops.c
void gsq_linear(int bits, int f32, const float *x, int M, int K, const void *q, const void *s, const void *b,
                int g, int64_t N, float *y, int nthreads);
void gsq_linear_f32(const float *x, int M, int K, const float *w, int64_t N, float *y, int nthreads);
void gsq_linear_bf16(const float *x, int M, int K, const uint16_t *w, int64_t N, float *y, int nthreads);
void gso_rms_norm(const float *x, const float *w, float eps, int rows, int dim, const float *add, float *out);
void gso_qk_norm_rope(float *qkv, int T, int row, int nq, int nkv, int hd, const float *qw, const float *kw,
                      float eps, const float *cos, const float *sin, int rot);
void gso_attention(const float *q, int T, int nq, int64_t q_head, int64_t q_tok, int hd,
                   const float *keys, int64_t k_head, int64_t k_slot, const float *values, int64_t v_head,
                   int64_t v_slot, int nkv, int S, int vd, const uint8_t *mask, float scale, float *out, int nthreads);
void gso_gelu_mul(const float *gu, int T, int I, float *out);

// A weight as the matmul kernels take it (kernels/__init__.py builds these).
struct gs_weight {
    int kind;  // 0 float32, 1 bfloat16, 4 int4, 8 int8
    int f32;   // float32 scales (int4 / int8)
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

static void matmul(const struct gs_weight *w, const float *x, int M, int K, float *y, int nthreads) {
    if (w->kind == 0)
        gsq_linear_f32(x, M, K, (const float *)w->q, w->N, y, nthreads);
    else if (w->kind == 1)
        gsq_linear_bf16(x, M, K, (const uint16_t *)w->q, w->N, y, nthreads);
    else
        gsq_linear(w->kind, w->f32, x, M, K, w->q, w->s, w->b, w->group, w->N, y, nthreads);
}

// x_out[T, hidden] = the block applied to x_in. The new tokens' K/V go to cache slots slots[t] of kbuf/vbuf
// [n_kv, capacity, head_dim]; attention then reads slots [0, S) under mask [T, S] (NULL: all of them).
void gs_gemma3_block(const struct gs_gemma3_block *b, const float *x_in, float *x_out, int T, const float *cos,
                     const float *sin, float *kbuf, float *vbuf, int64_t capacity, const int64_t *slots, int S,
                     const uint8_t *mask, int nthreads) {
    const int H = b->hidden, hd = b->head_dim, q_dim = b->n_q * hd, kv_dim = b->n_kv * hd;
    const int row = q_dim + 2 * kv_dim, I = b->inter;
    float *h = (float *)malloc(sizeof(float) * (size_t)T * H);
    float *qkv = (float *)malloc(sizeof(float) * (size_t)T * row);
    float *attn = (float *)malloc(sizeof(float) * (size_t)T * q_dim);
    float *gu = (float *)malloc(sizeof(float) * (size_t)T * 2 * I);
    float *act = (float *)malloc(sizeof(float) * (size_t)T * I);

    gso_rms_norm(x_in, b->input_norm, b->eps, T, H, NULL, h);
    matmul(&b->qkv, h, T, H, qkv, nthreads);
    gso_qk_norm_rope(qkv, T, row, b->n_q, b->n_kv, hd, b->q_norm, b->k_norm, b->eps, cos, sin, hd);
    for (int t = 0; t < T; t++)
        for (int j = 0; j < b->n_kv; j++) {
            const size_t at = ((size_t)j * capacity + slots[t]) * hd;
            memcpy(kbuf + at, qkv + (size_t)t * row + q_dim + (size_t)j * hd, sizeof(float) * hd);
            memcpy(vbuf + at, qkv + (size_t)t * row + q_dim + kv_dim + (size_t)j * hd, sizeof(float) * hd);
        }
    gso_attention(qkv, T, b->n_q, hd, row, hd, kbuf, capacity * hd, hd, vbuf, capacity * hd, hd, b->n_kv, S, hd,
                  mask, b->scale, attn, nthreads);
    matmul(&b->o, attn, T, q_dim, h, nthreads);
    gso_rms_norm(h, b->post_attn_norm, b->eps, T, H, x_in, x_out);

    gso_rms_norm(x_out, b->pre_ff_norm, b->eps, T, H, NULL, h);
    matmul(&b->gate_up, h, T, H, gu, nthreads);
    gso_gelu_mul(gu, T, I, act);
    matmul(&b->down, act, T, I, h, nthreads);
    gso_rms_norm(h, b->post_ff_norm, b->eps, T, H, x_out, x_out);

    free(h);
    free(qkv);
    free(attn);
    free(gu);
    free(act);
}
