"""Our CPU kernels for decoding, in C: the matmuls of every weight format and a few fused small ops.

`linear.c`: y = x @ W^T with W in int8, packed int4, bfloat16 or float32, float32 activations (quantized per
group inside the int8/int4 matmuls for integer multiply-adds: to int16, or for a bfloat16 model to int8 against
int4 in groups of 32 and int8 in groups of 16, the GGUF K-quants' formats, whose bytes vpdpbusd multiplies as
they are). PyTorch's own packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) are fast only with
bfloat16 activations on CPUs without AVX512 and are slow with float32 ones (see scripts/bench_weights.py
--kernels), and none handles int8 with per-group scales. This small C kernel reads each weight once per call
whatever the number of rows M of x (the speculative-verification shape), converts it in registers and
accumulates in float32. It is compiled with the system C compiler on first use into the gemmaspec cache
folder and loaded with ctypes; where no compiler works, `load()` returns None and callers fall back to
PyTorch (correct, slower). GEMMASPEC_NO_KERNELS=1 disables it. For float32 weights MKL's GEMV reaches only
13-23 GB/s on the 262k-row LM head on this 2-core machine; the same tiling in C reads the weights at
close to the memory bandwidth.

`ops.c`: RMSNorm (+ residual), q/k norm + RoPE in place, attention of a few queries over the (ring) cache, GeGLU.
A decode step of a 270M model otherwise spends more time in PyTorch's per-op overhead than in its matmuls.

`block.c`: a whole Gemma 3 decoder block in one call (the kernels above in the Python path's order), since even
one Python call per op cost ~4 ms of a ~20 ms step.

All kernels compute each row (token) independently of how many rows a call has, so speculative verification
of k + 1 tokens gives bit for bit what plain decoding gives.
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

SOURCES = ("linear.c", "ops.c", "block.c")  # compiled together into one library
HEADERS = ("common.h",)

# Calls of up to MAX_ROWS tokens (decode, verification of up to draft_length.MAX_DRAFT_TOKENS + 1) run here;
# longer ones (prefill) use PyTorch's GEMM and SDPA. Verification must never cross it: a verified token's logits
# must come from the same kernel as plain decoding's (tests/test_kernels.py checks the bound).
MAX_ROWS = 33

_FLAG_SETS = (
    ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp"],
    ["-O3", "-march=native", "-fPIC", "-shared"],  # no OpenMP (e.g. Apple clang): one thread
    ["-O3", "-fPIC", "-shared"],
)
_lock = threading.Lock()
_state: dict = {}


class WeightArgs(ctypes.Structure):
    """A weight as the matmul kernels take it (struct gs_weight of block.c)."""
    _fields_ = [("kind", ctypes.c_int), ("f32", ctypes.c_int), ("blocked", ctypes.c_int), ("q", ctypes.c_void_p),
                ("s", ctypes.c_void_p), ("b", ctypes.c_void_p), ("group", ctypes.c_int), ("N", ctypes.c_int64)]


class Gemma3BlockArgs(ctypes.Structure):
    """struct gs_gemma3_block of block.c."""
    _fields_ = [("qkv", WeightArgs), ("o", WeightArgs), ("gate_up", WeightArgs), ("down", WeightArgs),
                *[(name, ctypes.c_void_p) for name in ("input_norm", "post_attn_norm", "pre_ff_norm", "post_ff_norm",
                                                       "q_norm", "k_norm")],
                ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                *[(name, ctypes.c_int) for name in ("hidden", "n_q", "n_kv", "head_dim", "inter")]]


class StackStep(ctypes.Structure):
    """struct gs_gemma3_step of block.c: gs_gemma3_step's arguments, kept between steps and updated in place."""
    _fields_ = [("n", ctypes.c_int), *[(name, ctypes.c_void_p) for name in ("blocks", "sliding", "kbufs", "vbufs",
                                                                            "ids", "embed")],
                ("embed_scale", ctypes.c_float), *[(name, ctypes.c_void_p) for name in ("x_in", "x_out", "scratch")],
                ("T", ctypes.c_int), *[(name, ctypes.c_void_p) for name in ("cos_l", "sin_l", "cos_f", "sin_f")],
                ("ring_cap", ctypes.c_int64), ("slots_r", ctypes.c_void_p), ("S_r", ctypes.c_int),
                ("mask_r", ctypes.c_void_p), ("full_cap", ctypes.c_int64), ("slots_f", ctypes.c_void_p),
                ("S_f", ctypes.c_int), ("mask_f", ctypes.c_void_p), ("final_norm", ctypes.c_void_p),
                ("final_eps", ctypes.c_float), *[(name, ctypes.c_void_p) for name in ("head", "logits", "best")],
                ("store_logits", ctypes.c_int), ("bf16", ctypes.c_int), ("nthreads", ctypes.c_int)]


class StackCall:
    """A model's blocks prepared for gs_gemma3_step over one KV cache: the layers' arguments, the embedding table
    (None: each step passes its embedded rows), the final RMSNorm (float32 weight) and the LM head (None: none) set
    once, in a StackStep that each step updates in place (Kernels.gemma3_stack): one pointer per call where ~30
    converted ctypes arguments, ~15 small tensors and their checks cost a step ~0.2 ms with the caches cold."""

    def __init__(self, blocks: list, sliding: list[bool], keys: list[torch.Tensor], values: list[torch.Tensor],
                 dtype: torch.dtype, final_norm: torch.Tensor, final_eps: float, head: WeightArgs | None,
                 embed: WeightArgs | None, embed_scale: float):
        n, hidden = len(blocks), blocks[0].hidden
        # what the pointers point into (not the K/V buffers: the caller uses a call only while its cache lives)
        self.refs = (blocks, final_norm, head, embed)
        self.vocab = None if embed is None else embed.N
        self.arrays = [(ctypes.c_void_p * n)(*[ctypes.addressof(b) for b in blocks]),
                       (ctypes.c_uint8 * n)(*[int(s) for s in sliding]),
                       (ctypes.c_void_p * n)(*[t.data_ptr() for t in keys]),
                       (ctypes.c_void_p * n)(*[t.data_ptr() for t in values])]
        self.ids, self.best = (ctypes.c_int64 * MAX_ROWS)(), (ctypes.c_int64 * MAX_ROWS)()
        self.x_in, self.scratch = torch.empty(MAX_ROWS, hidden, dtype=dtype), torch.empty(MAX_ROWS, hidden, dtype=dtype)
        self.x_out = torch.empty(MAX_ROWS, hidden, dtype=dtype)  # the rows out where the caller does not take them
        self.logits = None  # the head's logits where the caller wants only their argmax (grown to the largest T)
        self.dtype, self.hidden, self.head, self.has_table = dtype, hidden, head, embed is not None
        self.step = StackStep(n, *map(ctypes.addressof, self.arrays), None,
                              None if embed is None else ctypes.addressof(embed), embed_scale,
                              scratch=self.scratch.data_ptr(), final_norm=final_norm.data_ptr(), final_eps=final_eps,
                              bf16=int(dtype == torch.bfloat16))
        self.step_ptr = ctypes.byref(self.step)


class Kernels:
    """ctypes handle on the compiled library."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        P, I, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        lib.gsq_linear.argtypes = [I, I, I, I, P, I, I, P, P, P, I, I64, P, I]
        lib.gsq_linear.restype = None
        lib.gsq_linear_argmax.argtypes = [I, I, I, I, P, I, P, P, P, I, I64, P, P, I]
        lib.gsq_linear_argmax.restype = I
        lib.gsq_dequant.argtypes = [I, I, I, P, P, P, I, I, I64, I64, P, I]
        lib.gsq_dequant.restype = None
        lib.gsq_blocked.argtypes = [I, I, I, I]
        lib.gsq_blocked.restype = I
        lib.gsq_to_blocks.argtypes = [I, P, I64, I, I, I]
        lib.gsq_to_blocks.restype = None
        lib.gsq_rows.argtypes = [I, I, I, P, P, P, I, I, I64, P, I64, P, I]
        lib.gsq_rows.restype = I
        lib.gsq_simd.restype = I
        lib.gsq_max_group.restype = I
        F = ctypes.c_float
        lib.gsq_linear_f32.argtypes = [P, I, I, P, I64, P, I]
        lib.gsq_linear_bf16.argtypes = [P, I, I, P, I64, P, I]
        lib.gso_rms_norm.argtypes = [P, P, F, I, I, P, P]
        lib.gso_qk_norm_rope.argtypes = [P, I, I, I, I, I, P, P, F, P, P, I]
        lib.gso_attention.argtypes = [P, I, I, I64, I64, I, P, I64, I64, P, I64, I64, I, I, I, P, F, P, I, I]
        lib.gso_gelu_mul.argtypes = [P, I, I, P]
        lib.gso_argmax.argtypes = [P, I, I64, P, I]
        lib.gs_gemma3_block.argtypes = [P, P, P, I, P, P, P, P, I64, P, I, P, I, I]
        lib.gs_gemma3_block.restype = None
        lib.gs_gemma3_step.argtypes = [P]
        lib.gs_gemma3_step.restype = I
        lib.gs_gemma3_step_size.restype = I
        lib.gs_gemma3_decode.argtypes = [P, I64, I, I64, P, I64, I64, P, I, P]
        lib.gs_gemma3_decode.restype = I
        if lib.gs_gemma3_step_size() != ctypes.sizeof(StackStep):
            raise RuntimeError("StackStep does not match block.c's struct gs_gemma3_step")
        lib.gso_step_views.argtypes = [P, I64, I64, I64, I, P, P, P, P]
        lib.gso_read_pass.argtypes = [P, P, I, I]
        lib.gso_read_pass.restype = ctypes.c_uint64
        for fn in (lib.gsq_linear_f32, lib.gsq_linear_bf16, lib.gso_rms_norm, lib.gso_qk_norm_rope, lib.gso_attention,
                   lib.gso_gelu_mul, lib.gso_argmax, lib.gso_step_views):
            fn.restype = None
        self.lib, self.path = lib, path
        simd = lib.gsq_simd()
        self.simd = "+".join(name for bit, name in ((1, "avx2"), (2, "vnni"), (4, "avx512")) if simd & bit) or "portable C"
        self.max_group = lib.gsq_max_group()  # larger groups could overflow the int32 dot products

    def linear(self, w, x: torch.Tensor, x8: bool = False) -> torch.Tensor:
        """x [M, K] float32 contiguous -> [M, N] float32, for a QuantizedWeight `w` on the CPU (group at most
        `max_group`). x is quantized to int16 per row and group inside (linear.c); with x8 (a bfloat16 model), to
        int8 against int4 in groups of 32 and int8 in groups of 16, or of 32 without biases."""
        M, K = x.shape
        bits, f32, blocked, q, scales, bias, group, N = w.kernel_args()
        y = torch.empty(M, N, dtype=torch.float32)
        self.lib.gsq_linear(bits, f32, blocked, int(x8), x.data_ptr(), M, K, q, scales, bias, group, N, y.data_ptr(),
                            torch.get_num_threads())
        return y

    def linear_argmax(self, w, x: torch.Tensor, store: bool = True) -> tuple[torch.Tensor | None, int] | None:
        """linear(w, x, x8=True) for one row x [1, K] with its argmax found as the outputs are computed (the LM head
        of a greedy decode step in block.c): (y [1, N] or None without store, the first maximum as torch.argmax
        gives it), or None where w's format has no such kernel."""
        bits, f32, blocked, q, scales, bias, group, N = w.kernel_args()
        y = torch.empty(1, N, dtype=torch.float32) if store else None
        best = ctypes.c_int64(-1)
        if not self.lib.gsq_linear_argmax(bits, f32, blocked, 1, x.data_ptr(), x.shape[1], q, scales, bias, group, N,
                                          _ptr(y), ctypes.byref(best), torch.get_num_threads()):
            return None
        return y, best.value

    def linear_float(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 @ weight [N, K]^T, weight float32 or bfloat16 (widened in registers), both contiguous
        on the CPU -> [M, N] float32."""
        M, K = x.shape
        if weight.dtype not in (torch.float32, torch.bfloat16) or weight.dim() != 2 or weight.shape[1] != K \
                or not weight.is_contiguous():
            raise ValueError(f"kernel weight must be contiguous float32/bfloat16 [N, {K}], got {weight.dtype} "
                             f"{list(weight.shape)}")
        fn = self.lib.gsq_linear_f32 if weight.dtype == torch.float32 else self.lib.gsq_linear_bf16
        y = torch.empty(M, weight.shape[0], dtype=torch.float32)
        fn(x.data_ptr(), M, K, weight.data_ptr(), weight.shape[0], y.data_ptr(), torch.get_num_threads())
        return y

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm of the rows of x (float32 contiguous), plus `residual` (same shape) when given."""
        out = torch.empty_like(x)
        dim = x.shape[-1]
        self.lib.gso_rms_norm(x.data_ptr(), _ptr(weight), eps, x.numel() // dim, dim, _ptr(residual), out.data_ptr())
        return out

    def qk_norm_rope(self, qkv: torch.Tensor, n_q: int, n_kv: int, head_dim: int, q_weight, k_weight, eps: float,
                     cos: torch.Tensor, sin: torch.Tensor) -> None:
        """In place on fused qkv rows [T, (n_q + 2 n_kv) * head_dim]: q/k RMSNorm, then RoPE (cos/sin [T, rot])."""
        T = qkv.shape[0]
        self.lib.gso_qk_norm_rope(qkv.data_ptr(), T, qkv.stride(0), n_q, n_kv, head_dim, _ptr(q_weight), _ptr(k_weight),
                                  eps, cos.data_ptr(), sin.data_ptr(), cos.shape[-1])

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
        """q [Hq, T, D] float32 (any strides, last dim contiguous), keys/values [Hkv, S, D] float32 or bfloat16
        (one dtype) -> [T, Hq * Dv] float32."""
        n_q, T, D = q.shape
        n_kv, S, Dv = values.shape
        out = torch.empty(T, n_q * Dv, dtype=torch.float32)
        self.lib.gso_attention(q.data_ptr(), T, n_q, q.stride(0), q.stride(1), D, keys.data_ptr(), keys.stride(0),
                               keys.stride(1), values.data_ptr(), values.stride(0), values.stride(1), n_kv, S, Dv,
                               _ptr(mask), scale, out.data_ptr(), int(keys.dtype == torch.bfloat16),
                               torch.get_num_threads())
        return out

    def gelu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gelu_tanh(gate) * up for rows [T, 2I] = [gate | up] -> [T, I]."""
        T, I2 = gate_up.shape
        out = torch.empty(T, I2 // 2, dtype=torch.float32)
        self.lib.gso_gelu_mul(gate_up.data_ptr(), T, I2 // 2, out.data_ptr())
        return out

    def argmax(self, x: torch.Tensor) -> list[int]:
        """torch.argmax(x, dim=-1).tolist() for float32 rows [R, n] (contiguous): the first maximum of each row."""
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self.lib.gso_argmax(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
        return out.tolist()

    def weight_args(self, linear) -> WeightArgs | None:
        """The kernel's view of a Linear's weight (float32, bfloat16, int8 / int4 on the CPU), or None."""
        return self.matrix_args(linear.qweight if linear.qweight is not None else linear.weight)

    def matrix_args(self, w) -> WeightArgs | None:
        """The kernel's view of a weight matrix or embedding table: a QuantizedWeight, a BF16Weight or a float32 /
        bfloat16 tensor [N, K] on the CPU; None for anything else."""
        if hasattr(w, "kernel_args"):  # quant.formats.QuantizedWeight
            bits, f32, blocked, q, scales, bias, group, N = w.kernel_args()
            if not w.q.is_cpu or group > self.max_group:
                return None
            return WeightArgs(bits, f32, blocked, q, scales, bias, group, N)
        t = getattr(w, "w", w)  # quant.bf16.BF16Weight holds its bfloat16 tensor as .w; else a plain tensor
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.bfloat16) or not t.is_cpu \
                or t.dim() != 2 or not t.is_contiguous():
            return None
        return WeightArgs(0 if t.dtype == torch.float32 else 1, 0, 0, t.data_ptr(), None, None, 0, t.shape[0])

    def gemma3_block(self, args: Gemma3BlockArgs, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, S: int,
                     mask: torch.Tensor | None) -> torch.Tensor:
        """One Gemma 3 decoder block (block.c) over x [T, hidden] contiguous, float32 or bfloat16 like the cache
        buffers keys/values [n_kv, capacity, head_dim] (computed in float32 either way; cos/sin float32): the new
        K/V go to `slots` (int64 [T]); attention reads slots [0, S) under mask (bool [T, S] or None)."""
        out = torch.empty_like(x)
        self.lib.gs_gemma3_block(ctypes.addressof(args), x.data_ptr(), out.data_ptr(), x.shape[0], cos.data_ptr(),
                                 sin.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.shape[1], slots.data_ptr(),
                                 S, _ptr(mask), int(x.dtype == torch.bfloat16), torch.get_num_threads())
        return out

    def gemma3_stack(self, call: StackCall, ids: list[int] | None, x: torch.Tensor | None, cos_l: int, sin_l: int,
                     cos_f: int, sin_f: int, ring, full, with_head: bool, want_logits: bool = True,
                     want_hidden: bool = True) -> tuple:
        """A step's T tokens through every block in one call (block.c gs_gemma3_step), then the model's last
        RMSNorm, and with_head (where `call` has a head) the LM head's float32 logits [T, N] and their argmax:
        (hidden [T, hidden], logits or None, greedy tokens as a list or None); want_logits=False keeps the logits
        in a buffer of `call` (None returned), want_hidden=False the hidden rows (a torch.empty costs a step
        ~60 us with the caches cold). The rows come from `ids` (a list, embedded in the call: `call` has
        the table; IndexError for an id outside it) or are `x` [T, hidden] (contiguous, the model's dtype).
        cos/sin: the addresses of float32 RoPE rows [T, head_dim]; `ring` / `full` are the (buffer capacity, slots
        pointer, S, mask pointer) views of cache.kernel_views for the sliding and the full layers (None where the
        model has no such layer)."""
        step, T = call.step, len(ids) if ids is not None else x.shape[0]
        if not 0 < T <= MAX_ROWS or (ids is not None and call.vocab is None):
            raise ValueError(f"a stack call takes 1 to {MAX_ROWS} rows, ids only with its embedding table")
        if ids is not None:
            if min(ids) < 0 or max(ids) >= call.vocab:  # (ctypes would wrap an id past int64 silently)
                raise IndexError(f"embedding row out of range [0, {call.vocab})")
            call.ids[:T] = ids
            step.ids, step.x_in = ctypes.addressof(call.ids), call.x_in.data_ptr()
        else:
            step.ids, step.x_in = None, x.data_ptr()
        out = torch.empty(T, call.hidden, dtype=call.dtype) if want_hidden else None
        head = call.head if with_head else None
        logits = None
        if head is not None:
            logits = torch.empty(T, head.N, dtype=torch.float32) if want_logits else None
            step.logits = (logits if want_logits else _grown_logits(call, T)).data_ptr()
            step.best = ctypes.addressof(call.best)
            step.store_logits = want_logits
        step.x_out = (out if want_hidden else call.x_out).data_ptr()
        step.T, step.cos_l, step.sin_l, step.cos_f, step.sin_f = T, cos_l, sin_l, cos_f, sin_f
        step.ring_cap, step.slots_r, step.S_r, step.mask_r = ring if ring is not None else (0, None, 0, None)
        step.full_cap, step.slots_f, step.S_f, step.mask_f = full if full is not None else (0, None, 0, None)
        step.head = None if head is None else ctypes.addressof(head)
        step.nthreads = torch.get_num_threads()
        if self.lib.gs_gemma3_step(call.step_ptr):
            raise IndexError(f"embedding row out of range [0, {call.vocab})")
        return out, logits, None if head is None else call.best[:T]

    def gemma3_decode(self, call: StackCall, first_id: int, steps: int, start: int, slot_pos: torch.Tensor | None,
                      window: int, cos_l: int, sin_l: int, cos_f: int, sin_f: int, rope_row: int, ring, full,
                      stop_ids: list[int] | torch.Tensor) -> list[int]:
        """Greedy decoding of up to `steps` tokens in one call (block.c gs_gemma3_decode): first_id at position
        `start`, then each step's argmax, stopping after one in stop_ids; returns the tokens the steps chose. The
        call's head must be set. cos/sin: the addresses of position start's float32 RoPE rows, the next positions'
        rope_row floats apart; ring / full: cache.kernel_views' views for one token at `start` (their buffers are
        rewritten for each step); slot_pos: the cache's ring positions (updated in place), None without a ring.
        stop_ids: sorted (a list, or an int64 tensor: thousands of ids without a conversion per call)."""
        step = call.step
        if call.head is None or call.vocab is None or steps < 1:
            raise ValueError("a decode call needs the embedding table, the LM head and at least one step")
        if not 0 <= first_id < call.vocab:
            raise IndexError(f"embedding row out of range [0, {call.vocab})")
        if call.head.N > call.vocab:  # a step's argmax is the next step's id: it must have an embedding row
            raise ValueError(f"an LM head of {call.head.N} rows over an embedding table of {call.vocab}")
        out = (ctypes.c_int64 * steps)()
        if isinstance(stop_ids, torch.Tensor):
            stop_ids = stop_ids.to(torch.int64).contiguous()
            if stop_ids.numel() > 1 and not bool((stop_ids[1:] >= stop_ids[:-1]).all()):
                stop_ids = stop_ids.sort().values  # (the C loop binary-searches them)
            stops = ctypes.c_void_p(stop_ids.data_ptr() if stop_ids.numel() else None)
        else:
            stops = (ctypes.c_int64 * max(len(stop_ids), 1))(*stop_ids)
        step.ids, step.x_in, step.x_out = ctypes.addressof(call.ids), call.x_in.data_ptr(), call.x_out.data_ptr()
        step.logits, step.best, step.store_logits = _grown_logits(call, 1).data_ptr(), ctypes.addressof(call.best), 0
        step.T, step.cos_l, step.sin_l, step.cos_f, step.sin_f = 1, cos_l, sin_l, cos_f, sin_f
        step.ring_cap, step.slots_r, step.S_r, step.mask_r = ring if ring is not None else (0, None, 0, None)
        step.full_cap, step.slots_f, step.S_f, step.mask_f = full if full is not None else (0, None, 0, None)
        step.head, step.nthreads = ctypes.addressof(call.head), torch.get_num_threads()
        n = self.lib.gs_gemma3_decode(call.step_ptr, first_id, steps, start, _ptr(slot_pos), window, rope_row, stops,
                                      len(stop_ids), out)
        if n < 0:
            raise IndexError(f"embedding row out of range [0, {call.vocab})")
        return out[:n]

    def step_views(self, slot_pos: torch.Tensor | None, ring: int, window: int, start: int, T: int, slots_r,
                   mask_r, slots_f, mask_f) -> None:
        """ops.c gso_step_views into the given buffers (pointers; mask_f None: no full mask): cache.kernel_views."""
        self.lib.gso_step_views(_ptr(slot_pos), ring, window, start, T, slots_r, mask_r, slots_f, mask_f)

    def dequant(self, w, start: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start .. start + count - 1 of `w` as float32 [count, K] (over threads: prefill's blocks of rows)."""
        if out is None:
            out = torch.empty(count, w.in_features, dtype=torch.float32)
        self.lib.gsq_dequant(w.bits, _f32(w), int(w.blocked), w.q.data_ptr(), w.scales.data_ptr(), _ptr(w.bias),
                             w.in_features, w.group, start, count, out.data_ptr(), torch.get_num_threads())
        return out

    def rows(self, w, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` (int64, any shape) of `w` dequantized, as `dtype` (float32 or bfloat16) [*ids.shape, K]: an
        embedding lookup. IndexError for an id outside the table."""
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty(*ids.shape, w.in_features, dtype=dtype)
        if self.lib.gsq_rows(w.bits, _f32(w), int(w.blocked), w.q.data_ptr(), w.scales.data_ptr(), _ptr(w.bias),
                             w.in_features, w.group, w.out_features, ids.data_ptr(), ids.numel(), out.data_ptr(),
                             int(dtype == torch.bfloat16)):
            raise IndexError(f"embedding row out of range [0, {w.out_features})")
        return out

    def blocked_layout(self, w) -> bool:
        """Whether the AVX-512 int8-activation tiles read `w` (a QuantizedWeight) for bfloat16 x, so that its rows
        can be held in their block layout (linear.c)."""
        return bool(self.lib.gsq_blocked(w.bits, w.in_features, w.group, int(w.bias is not None)))

    def to_blocks(self, w, inverse: bool = False) -> None:
        """w.q (contiguous, on the CPU) from the row layout into the block layout in place, or back."""
        self.lib.gsq_to_blocks(w.bits, w.q.data_ptr(), w.out_features, w.in_features, int(inverse),
                               torch.get_num_threads())


class ReadPass:
    """A pass over a set of tensors' bytes in C (ops.c gso_read_pass), timed by the benchmarks beside decoding:
    the tokens/s of a decode step that only read its weights, at that moment."""

    def __init__(self, kernels: "Kernels", tensors: list[torch.Tensor]):
        self.lib, self.tensors = kernels.lib, tensors  # (held: the pointers are theirs)
        self.n = len(tensors)
        self.ptrs = (ctypes.c_void_p * self.n)(*[t.data_ptr() for t in tensors])
        self.sizes = (ctypes.c_int64 * self.n)(*[t.numel() * t.element_size() for t in tensors])

    def __call__(self) -> int:
        return self.lib.gso_read_pass(self.ptrs, self.sizes, self.n, torch.get_num_threads())


def _f32(w) -> int:
    return int(w.scales.dtype == torch.float32)


def _grown_logits(call: StackCall, T: int) -> torch.Tensor:
    """The call's buffer for logits its caller does not take (the head's argmax only), grown to T rows."""
    if call.logits is None or call.logits.shape[0] < T:
        call.logits = torch.empty(T, call.head.N, dtype=torch.float32)
    return call.logits


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


def build_variant(*defines: str) -> Kernels:
    """The kernels compiled with extra -D defines (GS_PROFILE: block.c's phase timers, scripts/profile_step.py)."""
    return Kernels(_build(defines))


def _build(defines: tuple[str, ...] = ()) -> Path:
    from ..loading.gguf_convert import cache_root

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    here = Path(__file__).parent
    sources = [(here / name).read_text() for name in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*sources, cc, _cpu_id(), platform.machine(), *defines]).encode()).hexdigest()[:16]
    folder = cache_root() / "kernels" / key
    lib = folder / "libgemmaspec.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        paths = []
        for name, text in zip(SOURCES + HEADERS, sources):
            (Path(tmp) / name).write_text(text)
            if name in SOURCES:
                paths.append(Path(tmp) / name)
        for flags in _FLAG_SETS:
            out = Path(tmp) / lib.name
            proc = subprocess.run([cc, *flags, *(f"-D{d}" for d in defines), *map(str, paths), "-o", str(out), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(out, lib)  # atomic: concurrent builders agree
                return lib
            errors.append(proc.stderr.strip().splitlines()[-1:] or ["?"])
    raise RuntimeError(f"cannot compile the CPU kernels with {cc}: {errors[0][0]}")
