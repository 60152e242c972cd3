// Shared by the gemmaspec kernels: SIMD detection, a horizontal sum, bfloat16 conversion, and the split of output
// rows over threads.
#pragma once
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define GS_AVX2 1
#endif

// malloc, or a one-line message and abort where memory has run out (instead of a crash on the NULL pointer later)
static inline void *gs_alloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "gemmaspec kernels: out of memory (%zu bytes)\n", bytes);
        abort();
    }
    return p;
}

// bfloat16 -> float32 is exact; float32 -> bfloat16 rounds to nearest even (NaN: 0x7fc0), as PyTorch's .to()
static inline float bf16_to_f32(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// element i of a float32 (EB = 32) or bfloat16 (EB = 16) array as float32 (widening is exact); f32x8: 8 from i
static inline float f32_at(const int EB, const void *p, int64_t i) {
    return EB == 32 ? ((const float *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}

#ifdef GS_AVX2
static inline __attribute__((always_inline)) __m256 f32x8_at(const int EB, const void *p, int64_t i) {
    if (EB == 32) return _mm256_loadu_ps((const float *)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}
#endif

// fn(ctx, begin, end) over rows [0, n), split in contiguous ranges (multiples of `align`) over up to nthreads
// threads; one thread when the call is small (`work` multiply-adds): a thread team costs microseconds. The
// ranges are arguments of fn, not fields of an OpenMP closure (GCC reloads those inside hot loops: 1.5x slower).
typedef void (*row_range_fn)(const void *ctx, int64_t begin, int64_t end);

// thread t of nt's rows [*r0, *r1) of n: a contiguous range, multiples of `align` (split_rows' split)
static inline void row_range(int64_t n, int64_t align, int64_t t, int64_t nt, int64_t *r0, int64_t *r1) {
    const int64_t blocks = (n + align - 1) / align, b0 = blocks * t / nt * align, b1 = blocks * (t + 1) / nt * align;
    *r0 = b0 < n ? b0 : n, *r1 = b1 < n ? b1 : n;
}

static inline void split_rows(row_range_fn fn, const void *ctx, int64_t n, int64_t align, int64_t work, int nthreads) {
    const int threads = work > (1 << 19) ? nthreads : 1;
    if (threads <= 1) {
        fn(ctx, 0, n);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int64_t t = 0, nt = 1;
#endif
        int64_t r0, r1;
        row_range(n, align, t, nt, &r0, &r1);
        fn(ctx, r0, r1);
    }
}
