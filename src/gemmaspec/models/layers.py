"""Building blocks shared by the Gemma decoders: RMSNorm, RoPE, attention over the KV cache, linear layers.

Batch size is always 1: activations are [T, hidden] and attention tensors [heads, T, head_dim].
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..cache import AttentionView
from ..errors import ModelFileError
from ..quant.formats import QuantizedWeight



def fused_ops(x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)):
    """Our C kernels (gemmaspec.kernels) when they apply to x: on the CPU, of one of `dtypes`, no autograd; else
    None.

    At batch 1 a decode step of a small model is dominated by per-op overhead outside the matmuls."""
    if x.dtype not in dtypes or x.device.type != "cpu" or torch.is_grad_enabled():
        return None
    return kernels.load()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm computed in float32 (as the reference does), scaled by `weight` (already the effective scale),
    plus `residual` when given."""
    fast = fused_ops(x)
    if (fast is not None and x.is_contiguous() and (residual is None or _same(residual, x))
            and (weight is None or (weight.dtype == torch.float32 and weight.numel() == x.shape[-1]))):
        return fast.rms_norm(x, weight, eps, residual)
    y = F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)
    return y if residual is None else residual + y


class RMSNorm(nn.Module):
    """RMSNorm whose stored weight is the effective scale (Gemma 3's `1 + w` is folded in at load)."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False) if with_scale else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, residual)


class Linear(nn.Module):
    """A bias-free linear layer; the single place where weight formats (float, int8, int4) plug in."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.qweight = None  # a quant.QuantizedWeight (int8/int4) replacing `weight` when set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight.linear(x)
        fast = fused_ops(x, (torch.float32, torch.bfloat16))
        if (fast is not None and x.dim() == 2 and x.shape[0] <= kernels.MAX_ROWS
                and self.weight.dtype in (torch.float32, torch.bfloat16) and self.weight.is_contiguous()):
            # decode / verification: each row on its own whatever M is (PyTorch's GEMM promises no such thing)
            return fast.linear_float(self.weight, x.float().contiguous()).to(x.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight)  # (float32 LM-head input next to bfloat16 weights)


def rope_inv_freq(head_dim: int, theta: float, factor: float = 1.0, rotary_dim: int | None = None) -> torch.Tensor:
    """Inverse frequencies for RoPE over `rotary_dim` of `head_dim` dims; `factor` is linear position scaling."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    inv = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    return inv / factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [T, 2 * len(inv_freq)] in the layout of `rotate_half` (two halves)."""
    freqs = positions[:, None].float() * inv_freq[None, :].to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RopeTables:
    """rope_cos_sin's tables for runs of consecutive positions, computed ROWS positions at a time and sliced: a
    decode step then costs a slice instead of ~10 small tensor ops (~0.1 ms with the caches cold after the step's
    weights went through them). Each row is the same elementwise computation of its own position as
    rope_cos_sin, so the values are those it gives."""

    ROWS = 256

    def __init__(self, inv_freq: torch.Tensor, dtype: torch.dtype):
        self.inv_freq, self.dtype = inv_freq, dtype
        self._held = None  # _hold's tuple

    def get(self, start: int, n: int):
        """cos, sin [n, 2 * len(inv_freq)] for positions start .. start + n - 1."""
        if n > self.ROWS:  # a prompt: its own table
            positions = torch.arange(start, start + n, device=self.inv_freq.device)
            return rope_cos_sin(positions, self.inv_freq, self.dtype)
        held = self._hold(start, n)
        at = start - held[0]
        return held[1][at:at + n], held[2][at:at + n]

    def pointers(self, start: int, n: int) -> tuple[int, int]:
        """The addresses of get(start, n)'s rows (n <= ROWS; contiguous), without making tensors of them: what a
        C kernel takes (a tensor slice each costs a decode step ~10 us with the caches cold)."""
        held = self._hold(start, n)
        offset = (start - held[0]) * held[5]
        return held[3] + offset, held[4] + offset

    def row_floats(self) -> int:
        """Floats from one position's row to the next in pointers()' tables."""
        return 2 * self.inv_freq.numel()

    def _hold(self, start: int, n: int) -> tuple:
        """(first position, cos, sin, their addresses, bytes per row) of ROWS positions covering start .. + n."""
        held = self._held
        if held is None or not held[0] <= start <= start + n <= held[0] + self.ROWS:
            positions = torch.arange(start, start + self.ROWS, device=self.inv_freq.device)
            cos, sin = (t.contiguous() for t in rope_cos_sin(positions, self.inv_freq, self.dtype))
            held = self._held = (start, cos, sin, cos.data_ptr(), sin.data_ptr(), cos.stride(0) * cos.element_size())
        return held


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [H, T, D] by position; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def fused_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor | None:
    """Attention of q [Hq, T, D] over keys/values [n_kv, S, D] (float32 or bfloat16) through the C kernel, computed in
    float32 -> [T, Hq * Dv] in q's dtype, or None where it does not apply (mask: boolean [T, S] or None). Each query
    is computed on its own, so decode and verification agree bit for bit (PyTorch's SDPA does not promise it)."""
    fast = fused_ops(q, (torch.float32, torch.bfloat16))
    T, S = q.shape[1], keys.shape[1]
    if (fast is not None and T <= kernels.MAX_ROWS and q.stride(-1) == 1 and keys.dtype == values.dtype
            and all(t.dtype in (torch.float32, torch.bfloat16) and t.stride(-1) == 1 for t in (keys, values))
            and (mask is None or (mask.dtype == torch.bool and mask.shape == (T, S) and mask.is_contiguous()))):
        return fast.attention(q.float(), keys, values, mask, scale).to(q.dtype)
    return None


def attend(q: torch.Tensor, view: AttentionView, scale: float) -> torch.Tensor:
    """Attention of q [Hq, T, D] over the view's keys/values (grouped-query); returns [T, Hq * Dv]."""
    n_q, n_kv = q.shape[0], view.keys.shape[0]
    mask = view.mask
    out = fused_attention(q, view.keys, view.values, mask, scale)
    if out is not None:
        return out
    out = F.scaled_dot_product_attention(
        q.unsqueeze(0),
        view.keys.unsqueeze(0),
        view.values.unsqueeze(0),
        attn_mask=mask,
        scale=scale,
        enable_gqa=n_q != n_kv,
    )[0]
    return out.transpose(0, 1).reshape(q.shape[1], -1)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def geglu(gate_up: torch.Tensor, act=gelu_tanh) -> torch.Tensor:
    """act(gate) * up for rows [T, 2I] = [gate | up] (one fused kernel for Gemma's gelu_tanh)."""
    fast = fused_ops(gate_up) if act is gelu_tanh else None
    if fast is not None and gate_up.dim() == 2 and gate_up.is_contiguous():
        return fast.gelu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


@functools.lru_cache(maxsize=None)
def embed_scale(hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Gemma multiplies embeddings by sqrt(hidden) rounded to the compute dtype, as the reference does. One
    tensor per (size, dtype), never written: built once instead of at every step (outside inference mode, so that
    training can use it too)."""
    with torch.inference_mode(False):
        return torch.tensor(math.sqrt(hidden_size), dtype=dtype)


def lm_logits(lm_head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """float32 logits through the (tied) LM head, with Gemma's optional final tanh soft-capping. On the CPU the head
    gives float32 logits whatever the model's dtype: its kernels (decode and verification rows) compute in float32
    anyway, and bfloat16 logits (8 significant bits) would blur the target's distribution and tie its argmax. A
    packed (int8 / int4) head of a bfloat16 model rounds the activations to int8 inside, as the blocks' matmuls do
    (x8: the bytes-times-bytes kernel); other heads take float32 activations. Longer calls (perplexity, training)
    with a plain bfloat16 table run a bfloat16 GEMM."""
    packed = getattr(lm_head, "qweight", None)
    if hidden.device.type == "cpu" and isinstance(packed, QuantizedWeight):
        logits = packed.linear(hidden.float(), x8=hidden.dtype == torch.bfloat16)
    else:
        logits = lm_head(hidden.float() if hidden.device.type == "cpu" else hidden).float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def tie_lm_head(model: nn.Module, get) -> None:
    """The LM head is the input embedding unless the checkpoint carries its own `lm_head.weight`."""
    if get.has("lm_head.weight"):
        model.lm_head.weight = nn.Parameter(get("lm_head.weight"), requires_grad=False)
    else:
        model.lm_head.weight = model.embed_tokens


class TensorGetter:
    """Reads named tensors once each and reports missing or unexpected names."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ModelFileError(f"checkpoint is missing tensor '{name}'")
        self.used.add(name)
        return self.tensors[name]

    def check_all_used(self) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            raise ModelFileError(f"checkpoint has {len(unused)} unexpected tensors, e.g. '{unused[0]}'")
