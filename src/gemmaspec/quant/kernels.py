"""The CPU kernel for low-bit weights: y = x @ W^T with W in int8 or packed int4, float32 activations.

PyTorch's own packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) are fast only with
bfloat16 activations on CPUs without AVX512 and are slow with float32 ones (see scripts/bench_weights.py
--kernels), and none handles int8 with per-group scales. This small C kernel reads each weight once per call
whatever the number of rows M of x (the speculative-verification shape), converts it in registers and
accumulates in float32. It is compiled with the system C compiler on first use into the gemmaspec cache
folder and loaded with ctypes; where no compiler works, `load()` returns None and callers fall back to
PyTorch (correct, slower). GEMMASPEC_NO_KERNELS=1 disables it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = r"""
// gemmaspec low-bit weight kernels: y[M,N] = x[M,K] @ W[N,K]^T with W held as int8 or packed int4.
//
// Weights are row-major over N (one output feature per row), in groups of `g` along K; each group has a
// scale s and an optional bias b (float16, or float32 when f32 != 0):  w = s * q + b.
//   int8: q is int8 [N, K].
//   int4: q is uint8 [N, K/2]; each 32-weight chunk is 16 bytes, byte i holding weight i in its low nibble
//         and weight i + 16 in its high nibble (values 0..15).
// A row is dequantized into a float buffer in L1 and dotted with every row of x, so the weights are read
// from memory once per call whatever M is: the speculative-verification shape (M = k + 1 rows).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define GSQ_AVX2 1
#endif

static inline float h2f(uint16_t h) {
#ifdef GSQ_AVX2
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
#ifdef GSQ_AVX2
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
#ifdef GSQ_AVX2
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

// ---- dot products of one float row with 1 or 4 rows of x (K a multiple of 32) ------------------------
#ifdef GSQ_AVX2
static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}
#endif

// ---- fused tiles: up to MT rows of x against one weight row, each weight converted once per tile -------
// Every row of x is accumulated in the same order whatever M is, so y[m] does not depend on M bitwise
// (speculative verification sees exactly the values plain decoding would). BITS, MT (and the usual group
// sizes) are constants at each call site, so branches fold away and the accumulators stay in registers.
#define MT 5
#ifdef GSQ_AVX2
static inline __attribute__((always_inline)) void tile(const int BITS, int f32, const void *qrow, const void *s,
        const void *b, int K, const int g, const float *x, const float *xs, int G, const int mt, float *r) {
    __m256 tot[MT], acc[MT];
    float bacc[MT];
    for (int m = 0; m < mt; m++) { tot[m] = _mm256_setzero_ps(); bacc[m] = 0.0f; }
    const __m128i m4 = _mm_set1_epi8(0x0f);
    for (int j = 0; j < K / g; j++) {
        const int k0 = j * g;
        for (int m = 0; m < mt; m++) acc[m] = _mm256_setzero_ps();
        for (int c = 0; c < g; c += 16) {  // 16 weights -> two vectors of 8 floats
            __m128i v;
            if (BITS == 8) {
                v = _mm_loadu_si128((const __m128i *)((const int8_t *)qrow + k0 + c));
            } else {  // values k..k+15 are the low nibbles of their 32-value chunk's 16 bytes, or the high ones
                const int k = k0 + c;
                __m128i raw = _mm_loadu_si128((const __m128i *)((const uint8_t *)qrow + (k & ~31) / 2));
                v = (k & 16) ? _mm_and_si128(_mm_srli_epi16(raw, 4), m4) : _mm_and_si128(raw, m4);
            }
            const __m256 w0 = _mm256_cvtepi32_ps(BITS == 8 ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
            const __m128i v8 = _mm_srli_si128(v, 8);
            const __m256 w1 = _mm256_cvtepi32_ps(BITS == 8 ? _mm256_cvtepi8_epi32(v8) : _mm256_cvtepu8_epi32(v8));
            for (int m = 0; m < mt; m++) {
                const float *xm = x + (size_t)m * K + k0 + c;
                acc[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m]);
                acc[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc[m]);
            }
        }
        const __m256 vs = _mm256_set1_ps(SC(s, j));
        for (int m = 0; m < mt; m++) tot[m] = _mm256_fmadd_ps(acc[m], vs, tot[m]);
        if (b) {
            const float bj = SC(b, j);
            for (int m = 0; m < mt; m++) bacc[m] += bj * xs[(size_t)m * G + j];
        }
    }
    for (int m = 0; m < mt; m++) r[m] = hsum(tot[m]) + bacc[m];
}
#else
static void tile(const int BITS, int f32, const void *qrow, const void *s, const void *b, int K, int g,
                 const float *x, const float *xs, int G, const int mt, float *r) {
    for (int m = 0; m < mt; m++) {
        float tot = 0.0f, bacc = 0.0f;
        for (int j = 0; j < K / g; j++) {
            float acc = 0.0f;
            for (int c = 0; c < g; c++) {
                const int k = j * g + c;  // int4: byte (k & ~31) / 2 + (k & 15), high nibble when k & 16
                const float v = BITS == 8 ? (float)((const int8_t *)qrow)[k]
                    : (float)((((const uint8_t *)qrow)[(k & ~31) / 2 + (k & 15)] >> ((k & 16) ? 4 : 0)) & 15);
                acc += v * x[(size_t)m * K + k];
            }
            tot += acc * SC(s, j);
            if (b) bacc += SC(b, j) * xs[(size_t)m * G + j];
        }
        r[m] = tot + bacc;
    }
}
#endif

// ---- exported ---------------------------------------------------------------------------------------
// y[M, N] = x[M, K] @ dequant(W)^T, rows of W split over threads.
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
    const size_t row_bytes = bits == 8 ? (size_t)K : (size_t)K / 2, srow = (size_t)G * (f32 ? 4 : 2);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const void *qrow = (const char *)q + (size_t)n * row_bytes;
        const char *sn = (const char *)s + (size_t)n * srow, *bn = b ? (const char *)b + (size_t)n * srow : NULL;
        float r[MT];
        for (int m0 = 0; m0 < M; m0 += MT) {
            const int mt = M - m0 < MT ? M - m0 : MT;
            const float *xm = x + (size_t)m0 * K, *xsm = xs ? xs + (size_t)m0 * G : NULL;
#define TILE(BITS, GC, MTC) tile(BITS, f32, qrow, sn, bn, K, GC, xm, xsm, G, MTC, r)
#define TILES(BITS, GC)                          \
    switch (mt) {                                \
        case 5: TILE(BITS, GC, 5); break;        \
        case 4: TILE(BITS, GC, 4); break;        \
        case 3: TILE(BITS, GC, 3); break;        \
        case 2: TILE(BITS, GC, 2); break;        \
        default: TILE(BITS, GC, 1); break;       \
    }
            if (bits == 8) {
                if (g == 32) TILES(8, 32) else if (g == 16) TILES(8, 16) else TILES(8, g)
            } else {
                if (g == 32) TILES(4, 32) else if (g == 16) TILES(4, 16) else TILES(4, g)
            }
#undef TILES
#undef TILE
            for (int i = 0; i < mt; i++) y[(size_t)(m0 + i) * N + n] = r[i];
        }
    }
    free(xs);
}

// out[r, K] = dequant(W[rows[r]]) for r < R (rows == NULL: rows n0 .. n0 + R - 1).
void gsq_dequant(int bits, int f32, const void *q, const void *s, const void *b, int K, int g,
                 const int64_t *rows, int64_t n0, int64_t R, float *out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < R; r++) deq_row(bits, f32, q, s, b, K, g, rows ? rows[r] : n0 + r, out + (size_t)r * K);
}

int gsq_has_avx2(void) {
#ifdef GSQ_AVX2
    return 1;
#else
    return 0;
#endif
}
"""

_FLAG_SETS = (
    ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp"],
    ["-O3", "-march=native", "-fPIC", "-shared"],  # no OpenMP (e.g. Apple clang): one thread
    ["-O3", "-fPIC", "-shared"],
)
_lock = threading.Lock()
_state: dict = {}


class Kernels:
    """ctypes handle on the compiled library."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        P, I, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        lib.gsq_linear.argtypes = [I, I, P, I, I, P, P, P, I, I64, P, I]
        lib.gsq_linear.restype = None
        lib.gsq_dequant.argtypes = [I, I, P, P, P, I, I, P, I64, I64, P, I]
        lib.gsq_dequant.restype = None
        lib.gsq_has_avx2.restype = I
        self.lib, self.path = lib, path
        self.simd = "avx2" if lib.gsq_has_avx2() else "portable C"

    def linear(self, w, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 contiguous -> [M, N] float32, for a QuantizedWeight `w` on the CPU."""
        M, K = x.shape
        y = torch.empty(M, w.out_features, dtype=torch.float32)
        self.lib.gsq_linear(w.bits, _f32(w), x.data_ptr(), M, K, w.q.data_ptr(), w.scales.data_ptr(), _ptr(w.bias),
                            w.group, w.out_features, y.data_ptr(), torch.get_num_threads())
        return y

    def dequant(self, w, start: int, count: int, out: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start .. start + count - 1 (or the int64 `rows`) of `w` as float32 [count, K]."""
        if rows is not None:
            rows = rows.to(torch.int64).contiguous()
            count = rows.numel()
        if out is None:
            out = torch.empty(count, w.in_features, dtype=torch.float32)
        self.lib.gsq_dequant(w.bits, _f32(w), w.q.data_ptr(), w.scales.data_ptr(), _ptr(w.bias), w.in_features, w.group,
                             _ptr(rows), start, count, out.data_ptr(), torch.get_num_threads())
        return out


def _f32(w) -> int:
    return int(w.scales.dtype == torch.float32)


def _ptr(t: torch.Tensor | None):
    return t.data_ptr() if t is not None else None


def load() -> Kernels | None:
    """The compiled kernel library (built on first use), or None where it cannot be built."""
    if "kernels" in _state:
        return _state["kernels"]
    with _lock:
        if "kernels" not in _state:
            found, error = None, None
            if os.environ.get("GEMMASPEC_NO_KERNELS"):
                error = "disabled by GEMMASPEC_NO_KERNELS"
            else:
                try:
                    found = Kernels(_build())
                except Exception as e:  # no compiler, odd platform: fall back to PyTorch
                    error = str(e).splitlines()[0] if str(e) else type(e).__name__
            _state["error"], _state["kernels"] = error, found  # "kernels" last: readers without the lock
        return _state["kernels"]


def status() -> str:
    """One line for notes and the doctor: which kernel low-bit weights use here."""
    k = load()
    if k is not None:
        return f"C kernel ({k.simd})"
    return f"PyTorch fallback (no C kernel: {_state.get('error')})"


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> Path:
    from ..loading.gguf_convert import cache_root

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    key = hashlib.sha256("\0".join([SOURCE, cc, _cpu_id(), platform.machine()]).encode()).hexdigest()[:16]
    folder = cache_root() / "kernels" / key
    lib = folder / "libgemmaspec_quant.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / "quant.c"
        src.write_text(SOURCE)
        for flags in _FLAG_SETS:
            out = Path(tmp) / lib.name
            proc = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(out, lib)  # atomic: concurrent builders agree
                return lib
            errors.append(proc.stderr.strip().splitlines()[-1:] or ["?"])
    raise RuntimeError(f"cannot compile the quantized-matmul kernel with {cc}: {errors[0][0]}")
