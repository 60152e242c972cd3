"""Weight-only int8 / int4 formats with per-group scales, and the matmuls that read them.

A weight W [N, K] (N output features) is cut into groups of `group` consecutive values along K; each group
has a scale s and, optionally, a bias b (float16; float32 where a GGUF K-quant's scale products need it to
stay exact), and holds integers q:  W = s * q + b.

    int8  q int8  [N, K]       symmetric from float weights (b = None); GGUF Q8_0 / Q5_0 / Q6_K exactly
    int4  q uint8 [N, K / 2]   values 0..15, asymmetric (b = group minimum); GGUF Q4_K / Q4_0 exactly
                               each 32-value chunk is 16 bytes: byte i = value i | value (i + 16) << 4

On a CPU whose AVX-512 kernel reads a weight (bfloat16 models), q's rows are held in that kernel's block layout
(`blocked`, kernels/linear.c: each full 256-byte block of a row transposed ahead of time); `values()` and every
reader here undo it.

The matmul (`QuantizedWeight.linear`) reads the packed weights: on a CPU the C kernel of `gemmaspec.kernels` for
small M (decoding and speculative verification), a dequantize-in-blocks + float32 GEMM for large M
(prefill), and a PyTorch fallback where the kernel cannot be built; on CUDA the int4 tinygemm kernel
(`_weight_int4pack_mm`) with bfloat16 activations, else dequantize-on-the-fly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError
from .. import kernels

GROUP = 32
DEQUANT_BLOCK_ROWS = 4096  # rows of W dequantized per GEMM for large M (~10 MB of float32 at K = 640)


class QuantizedWeight(nn.Module):
    """A [N, K] weight held as int8 or packed int4; usable as a Linear weight and as an embedding table.

    `dtype` is the compute dtype of the model (activations in, outputs out), not the storage type.
    """

    def __init__(self, bits: int, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, group: int,
                 in_features: int, dtype: torch.dtype = torch.float32, blocked: bool = False):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if in_features % group or (group != 16 and group % 32) or (bits == 4 and in_features % 32):
            raise ValueError(f"group {group} does not fit K = {in_features} for int{bits} (16 or a multiple of 32)")
        self.bits, self.group, self.in_features = bits, group, in_features
        self.out_features = q.shape[0]
        self.compute_dtype = dtype
        self.register_buffer("q", q)
        sdtype = torch.float32 if scales.dtype == torch.float32 else torch.float16
        self.register_buffer("scales", scales.to(sdtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(sdtype).contiguous())
        self.blocked = blocked  # q's rows in the C kernel's block layout (use_block_layout)
        self._cuda_int4 = None  # (packed, scales_and_zeros) for tinygemm, built on first CUDA call

    # ---- tensor-like surface used by the models ---------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def format(self) -> str:
        return f"int{self.bits}"

    @property
    def nbytes(self) -> int:
        """Bytes read per full matmul: packed values, scales and biases."""
        return sum(t.numel() * t.element_size() for t in (self.q, self.scales, self.bias) if t is not None)

    def extra_repr(self) -> str:
        bias = ", bias" if self.bias is not None else ""
        return f"int{self.bits}, [{self.out_features}, {self.in_features}], group={self.group}{bias}"

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: dequantizes only the rows it reads (on the CPU in the C kernel: a decode step's
        one row costs ~10 us there, ~250 us through PyTorch's ops)."""
        ids = torch.as_tensor(ids, device=self.device)
        k = kernels.load() if self.q.is_cpu else None
        if k is not None and self.group <= k.max_group:  # (it checks the range: the C kernel reads what it is told)
            if self.compute_dtype in (torch.float32, torch.bfloat16):
                return k.rows(self, ids, self.compute_dtype)
            return k.rows(self, ids, torch.float32).to(self.compute_dtype)
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.out_features):
            raise IndexError(f"embedding row out of range [0, {self.out_features})")
        return self.dequantize(flat).reshape(*ids.shape, self.in_features)

    def kernel_args(self) -> tuple:
        """(bits, float32 scales?, q, scales, bias pointers, group, N) for the C kernel, built once per set of
        buffers: reading them through nn.Module attributes costs more than a small matmul."""
        buffers = self._buffers
        key = (buffers["q"], buffers["scales"], buffers["bias"], self.blocked)
        cached = self.__dict__.get("_kernel_args")
        if cached is None or any(a is not b for a, b in zip(cached[0], key)):
            q, scales, bias, blocked = key
            args = (self.bits, int(scales.dtype == torch.float32), int(blocked), q.data_ptr(), scales.data_ptr(),
                    bias.data_ptr() if bias is not None else None, self.group, self.out_features)
            cached = self.__dict__["_kernel_args"] = (key, args)
        return cached[1]

    def use_block_layout(self) -> bool:
        """Hold q in the block layout of the CPU kernel that reads it, where there is one (AVX-512 with int8
        activations: a bfloat16 model). In place, once; returns whether q is held so."""
        k = kernels.load()
        if (not self.blocked and k is not None and self.q.is_cpu and self.q.is_contiguous() and self.q.shape[1] >= 256
                and self.compute_dtype == torch.bfloat16 and self.group <= k.max_group and k.blocked_layout(self)):
            k.to_blocks(self)
            self.blocked = True
        return self.blocked

    # ---- dequantization ---------------------------------------------------------------------------------
    def row_layout_q(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """q of some rows (all by default) in the row layout of the module docstring, whatever `blocked` is."""
        q = self.q if rows is None else self.q[rows]
        if not self.blocked:
            return q
        R, row_bytes = q.shape
        full = row_bytes // 256 * 256
        # a full block holds byte (a, b, v, c) (digits base 4: group 4a + b, its dword v, byte c) at (v, a, b, c)
        blocks = q[:, :full].reshape(R, -1, 4, 4, 4, 4).permute(0, 1, 3, 4, 2, 5).reshape(R, full)
        return torch.cat([blocks, q[:, full:]], dim=1)

    def values(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The integers q of some rows (all by default) as int16 [R, K] (int4 unpacked to 0..15)."""
        q = self.row_layout_q(rows)
        if self.bits == 8:
            return q.to(torch.int16)
        chunks = q.view(q.shape[0], -1, 16)
        lo, hi = (chunks & 0x0F).to(torch.int16), (chunks >> 4).to(torch.int16)
        return torch.cat([lo, hi], dim=-1).view(q.shape[0], -1)

    def dequantize(self, rows: torch.Tensor | slice | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (or some of its rows) in float: s * q + b computed in float32, then cast to `dtype`."""
        q = self.values(rows).float()
        R = q.shape[0]
        s = (self.scales if rows is None else self.scales[rows]).float()
        w = q.view(R, -1, self.group) * s[:, :, None]
        if self.bias is not None:
            b = (self.bias if rows is None else self.bias[rows]).float()
            w = w + b[:, :, None]
        return w.view(R, self.in_features).to(dtype or self.compute_dtype)

    # ---- matmul -----------------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, x8: bool = False) -> torch.Tensor:
        """x [..., K] @ W^T -> [..., N] in x's dtype. x8: float32 x standing for a bfloat16 model's activations
        (the kernel may round them to int8, as it does bfloat16 x). A blocked weight is a bfloat16 model's and the
        int8-activation tiles are what read its layout: the kernel takes every x that way (e.g. a float32 MTP
        assistant scoring with the target's tied table)."""
        if (x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= kernels.MAX_ROWS and self.q.is_cpu
                and not (x.requires_grad and torch.is_grad_enabled())):
            k = kernels.load()  # the decode / verification fast path: no reshapes, no casts
            if k is not None and self.group <= k.max_group:
                return k.linear(self, x.contiguous(), x8=x8 or self.blocked)
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        if self.q.device.type == "cuda":
            y = self._linear_cuda(x2)
        else:
            y = self._linear_cpu(x2)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _linear_cpu(self, x: torch.Tensor) -> torch.Tensor:
        k = kernels.load()
        if k is not None and x.shape[0] <= kernels.MAX_ROWS and self.group <= k.max_group:
            return k.linear(self, x.float().contiguous(), x8=x.dtype == torch.bfloat16 or self.blocked)
        # Large M (prefill): dequantize blocks of rows and use a GEMM, which is compute-bound there: bfloat16 for a
        # bfloat16 model on a CPU that computes it natively (4-5x the float32 GEMM's rate on Zen 4), else float32.
        from ..loading import native_bf16

        gemm_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 and native_bf16(x.device) else torch.float32
        xg = x.to(gemm_dtype).contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=gemm_dtype)
        block = min(DEQUANT_BLOCK_ROWS, self.out_features)
        buf = torch.empty(block, self.in_features, dtype=torch.float32) if k is not None else None
        for start in range(0, self.out_features, block):
            n = min(block, self.out_features - start)
            if k is not None:
                w = k.dequant(self, start, n, out=buf[:n])
            else:
                w = self.dequantize(slice(start, start + n), torch.float32)
            y[:, start:start + n] = xg @ w.to(gemm_dtype).t()
        return y

    def _linear_cuda(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 4 and x.dtype == torch.bfloat16:
            if self._cuda_int4 is None:
                self._cuda_int4 = _tinygemm_pack(self) or False
            if self._cuda_int4:
                packed, sz = self._cuda_int4
                return torch.ops.aten._weight_int4pack_mm(x.contiguous(), packed, self.group, sz)
        return F.linear(x, self.dequantize(dtype=x.dtype))


def _tinygemm_pack(w: QuantizedWeight):
    """CUDA int4 tinygemm layout for `w`, checked once against the dequantized reference; None if unusable."""
    K = w.in_features
    inner = next((t for t in (8, 4, 2) if K % (t * 16) == 0), None)
    if inner is None or w.group not in (32, 64, 128, 256) or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return None
    try:
        v = w.values().to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack((v[:, ::2] << 4 | v[:, 1::2]).to(torch.uint8), inner)
        s = w.scales.float()
        z = (w.bias.float() if w.bias is not None else torch.zeros_like(s)) + 8 * s  # tinygemm: (q - 8) * s + z
        sz = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        x = torch.randn(3, K, device=w.device, dtype=torch.bfloat16)
        ref = x.float() @ w.dequantize(dtype=torch.float32).t()
        got = torch.ops.aten._weight_int4pack_mm(x, packed, w.group, sz).float()
        if (got - ref).abs().max() > 0.05 * ref.abs().max() + 1e-3:
            return None
        return packed, sz
    except Exception:
        return None


# ---- float -> int8 / int4 ---------------------------------------------------------------------------------
def quantize(w: torch.Tensor, bits: int, group: int = GROUP, dtype: torch.dtype | None = None,
             chunk_rows: int = 8192, importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a float [N, K] weight, a block of rows at a time (bounded temporary memory). `importance` [K]
    (int4 only): how much each input feature counts, see quantize_int4."""
    N, K = w.shape
    qs, ss, bs = [], [], []
    for start in range(0, N, chunk_rows):
        rows = w[start:start + chunk_rows].float()
        q, s, b = quantize_int8(rows, group) if bits == 8 else quantize_int4(rows, group, importance)
        qs.append(q), ss.append(s), bs.append(b)
    bias = torch.cat(bs) if bits == 4 else None
    return QuantizedWeight(bits, torch.cat(qs), torch.cat(ss), bias, group, K,
                           dtype or (w.dtype if w.dtype.is_floating_point else torch.float32))


def quantize_int8(w: torch.Tensor, group: int = GROUP):
    """Symmetric: s = max|w| / 127 per group (as float16), q = round(w / s)."""
    N, K = w.shape
    g = w.view(N, K // group, group)
    s = (g.abs().amax(-1) / 127).to(torch.float16)
    sf = s.float()
    q = torch.round(g / torch.where(sf == 0, 1.0, sf)[:, :, None]).clamp_(-127, 127)
    return q.to(torch.int8).view(N, K), s, None


def quantize_int4(w: torch.Tensor, group: int = GROUP, importance: torch.Tensor | None = None, refine: int = 2):
    """Asymmetric, values 0..15 per group, scale s and bias b (float16) fitted to minimise
    sum_k a_k (w_k - s q_k - b)^2 over each group: start from b = min, s = (max - min) / 15, then `refine` rounds
    of weighted least squares (the s, b that best fit w given the rounded values, then round again).

    a_k = `importance` [K], the mean square of input feature k over calibration text (quant/calibrate.py): an
    error on a feature that is large in practice moves the output more. None: all 1. On Gemma 3 270M
    (all-int4 weights from the Q4_K_M GGUF, held-out text of bench_weights.py) the refinement lowered perplexity
    noticeably over plain min/max, and the importance took it from 31.5 to 27.2 (bfloat16 weights: 25.1); trying
    narrower starting ranges as well gained ~0.4 more for twice the load time, not kept."""
    N, K = w.shape
    g = w.view(N, K // group, group)
    if importance is None:
        a = torch.ones(1, 1, group, device=w.device)
    else:
        a = importance.to(w.device, torch.float32).view(1, K // group, group)
    b = g.amin(-1, keepdim=True)
    s = (g.amax(-1, keepdim=True) - b) / 15
    sa = a.sum(-1, keepdim=True)
    wm = (a * g).sum(-1, keepdim=True) / sa.clamp_min(1e-30)  # weighted means: centred sums stay accurate in
    dw = g - wm                                               # float32 even when a few features dominate a
    for _ in range(refine):
        v = torch.round((g - b) / s.clamp_min(1e-12)).clamp_(0, 15)
        vm = (a * v).sum(-1, keepdim=True) / sa.clamp_min(1e-30)
        dv = a * (v - vm)
        var, cov = (dv * (v - vm)).sum(-1, keepdim=True), (dv * dw).sum(-1, keepdim=True)
        ok = var > 1e-6 * sa  # all values equal (or no weight on the group): keep what we have
        s = torch.where(ok, cov / torch.where(ok, var, 1.0), s)
        b = torch.where(ok, wm - s * vm, b)
    s, b = s[..., 0].to(torch.float16), b[..., 0].to(torch.float16)
    sf = s.float()
    q = torch.round((g - b.float()[:, :, None]) / torch.where(sf == 0, 1.0, sf)[:, :, None]).clamp_(0, 15)
    return pack_int4(q.to(torch.uint8).view(N, K)), s, b


def pack_int4(v: torch.Tensor) -> torch.Tensor:
    """Values 0..15 [N, K] -> [N, K / 2] bytes, each 32-value chunk as 16 bytes (value i | value i + 16 << 4)."""
    N, K = v.shape
    c = v.view(N, K // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def concat(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights along N (fused projections), exactly: int4 parts become int8 next to int8 ones, and
    groups split to the smallest group size."""
    if len(parts) == 1:
        return parts[0]
    bits = max(p.bits for p in parts)
    group = min(p.group for p in parts)
    sdtype = torch.float32 if any(p.scales.dtype == torch.float32 for p in parts) else torch.float16
    qs, ss, bs = [], [], []
    any_bias = any(p.bias is not None for p in parts)
    for p in parts:
        q = p.row_layout_q() if p.bits == bits else p.values().to(torch.int8)  # int4 values 0..15 fit int8
        rep = p.group // group
        s = p.scales.to(sdtype).repeat_interleave(rep, dim=1)
        b = p.bias.to(sdtype).repeat_interleave(rep, dim=1) if p.bias is not None else torch.zeros_like(s)
        qs.append(q), ss.append(s), bs.append(b)
    return QuantizedWeight(bits, torch.cat(qs), torch.cat(ss), torch.cat(bs) if any_bias else None, group,
                           parts[0].in_features, parts[0].compute_dtype)


# ---- installing into models --------------------------------------------------------------------------------
def set_linear(linear, packed: QuantizedWeight) -> None:
    if (linear.out_features, linear.in_features) != tuple(packed.shape):
        raise ModelFileError(f"weight of shape {list(packed.shape)} where [{linear.out_features}, "
                             f"{linear.in_features}] is expected")
    linear.qweight = packed
    linear.weight = None


def replace_parameter(module, name: str, value: torch.nn.Module) -> None:
    """Swap a Parameter attribute (an embedding table) for a QuantizedWeight submodule of the same name."""
    module._parameters.pop(name, None)
    setattr(module, name, value)
