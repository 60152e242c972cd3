"""GGUF tensors repacked into int8 / int4 straight from the file, tensor by tensor, a block of rows at a time.

Exact repacks (the integers and group scales of the file; float16 scales where the file has them, float32
for the K-quants' products of two scales):

    Q8_0   w = d * q              q  -128..127, 32 per group   -> int8
    Q5_0   w = d * (q - 16)       q  0..31,     32 per group   -> int8
    Q6_K   w = d * sc * (q - 32)  q  0..63,     16 per group   -> int8
    Q4_K   w = d * sc * q - dmin * m, q 0..15,  32 per group   -> int4 (or int8 with a bias)
    Q4_0   w = d * (q - 8)        q  0..15,     32 per group   -> int4 (or int8 with a bias)

Asking for fewer bits than a tensor has (int4 from Q8_0 / Q5_0 / Q6_K) requantizes its float values; other
GGUF types (F16, BF16, F32, Q5_K, ...) are dequantized by the `gguf` package a block at a time and quantized.
The whole model never exists in float: peak memory is the packed model plus one block of rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ModelFileError
from .formats import GROUP, QuantizedWeight, concat, pack_int4, quantize_int4, quantize_int8, replace_parameter, set_linear

CHUNK_ROWS = 2048  # rows converted at a time: bounds the temporaries (~5 MB of float32 at K = 640)

# Our Gemma 3 projections, made of GGUF block tensors stacked along the output dimension.
GEMMA3_FUSED = {
    "qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "o_proj": ("attn_output",),
    "gate_up_proj": ("ffn_gate", "ffn_up"),
    "down_proj": ("ffn_down",),
}
EXACT_INT8 = ("Q8_0", "Q5_0", "Q6_K", "Q4_K", "Q4_0")
EXACT_INT4 = ("Q4_K", "Q4_0")
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
F32_SCALES = ("Q4_K", "Q6_K")  # d * sc has more bits than a float16 holds


def native_bits(type_name: str) -> int:
    """The int format that holds a GGUF type exactly (or most closely): `--weights auto` on a GGUF file."""
    return 4 if type_name in EXACT_INT4 else 8


def has_quantized_matrices(info) -> bool:
    return any(len(t.dims) == 2 and t.type_name not in FLOAT_TYPES for t in info.tensors)


# ---- block decoders: raw rows [R, bytes] -> integers [R, K], scales [R, G], biases [R, G] | None ----------
def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)[..., 0]


def _decode_q8_0(raw: np.ndarray, K: int):
    b = raw.reshape(raw.shape[0], K // 32, 34)
    return b[:, :, 2:].view(np.int8).reshape(-1, K), _f16(b[:, :, :2]), None, 32


def _decode_q5_0(raw: np.ndarray, K: int):
    b = raw.reshape(raw.shape[0], K // 32, 22)
    qh = np.ascontiguousarray(b[:, :, 2:6]).view("<u4")  # [R, G, 1]: bit j = 5th bit of value j
    qs = b[:, :, 6:].astype(np.int16)
    bits = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16) << 4
    v = np.concatenate([(qs & 0x0F) | bits[:, :, :16], (qs >> 4) | bits[:, :, 16:]], axis=-1) - 16
    return v.astype(np.int8).reshape(-1, K), _f16(b[:, :, :2]), None, 32


def _decode_q4_0(raw: np.ndarray, K: int):
    b = raw.reshape(raw.shape[0], K // 32, 18)
    qs = b[:, :, 2:]
    v = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    d = _f16(b[:, :, :2])
    return v.astype(np.int8).reshape(-1, K), d, -8 * d, 32


def _decode_q4_k(raw: np.ndarray, K: int):
    R = raw.shape[0]
    b = raw.reshape(R, K // 256, 144)
    d, dmin = _f16(b[:, :, 0:2]), _f16(b[:, :, 2:4])
    sc12 = b[:, :, 4:16].astype(np.int16)
    lo4, hi4 = sc12[:, :, 0:4], sc12[:, :, 4:8]
    tail = sc12[:, :, 8:12]
    sc = np.concatenate([lo4 & 63, (tail & 0x0F) | ((lo4 >> 6) << 4)], axis=-1)  # [R, B, 8] 6-bit scales
    mn = np.concatenate([hi4 & 63, (tail >> 4) | ((hi4 >> 6) << 4)], axis=-1)  # 6-bit mins
    qs = b[:, :, 16:].reshape(R, K // 256, 4, 32)  # 4 pairs of sub-blocks: low nibbles, then high nibbles
    v = np.stack([qs & 0x0F, qs >> 4], axis=3)  # [R, B, 4, 2, 32]
    s = d[:, :, None] * sc
    bias = -(dmin[:, :, None] * mn)
    return v.astype(np.int8).reshape(R, K), s.reshape(R, -1), bias.reshape(R, -1), 32


def _decode_q6_k(raw: np.ndarray, K: int):
    R = raw.shape[0]
    b = raw.reshape(R, K // 256, 210)
    ql = b[:, :, 0:128].reshape(R, -1, 2, 64).astype(np.int16)
    qh = b[:, :, 128:192].reshape(R, -1, 2, 32).astype(np.int16)
    sc = b[:, :, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[:, :, 208:210])
    v = np.stack([
        (ql[..., :32] & 0x0F) | ((qh & 3) << 4),
        (ql[..., 32:] & 0x0F) | (((qh >> 2) & 3) << 4),
        (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4),
        (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4),
    ], axis=3) - 32  # [R, B, 2 halves, 4, 32]
    return v.astype(np.int8).reshape(R, K), (d[:, :, None] * sc).reshape(R, -1), None, 16


DECODERS = {"Q8_0": _decode_q8_0, "Q5_0": _decode_q5_0, "Q4_0": _decode_q4_0, "Q4_K": _decode_q4_k,
            "Q6_K": _decode_q6_k}


def _float_rows(raw: np.ndarray, type_name: str, K: int) -> torch.Tensor:
    """Any GGUF type, a block of rows, as float32 (the `gguf` package's dequantizer)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = dequantize(raw, GGMLQuantizationType[type_name])
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(raw.shape[0], K))


def repack(raw, type_name: str, N: int, K: int, bits: int, dtype: torch.dtype,
           importance: torch.Tensor | None = None) -> QuantizedWeight:
    """One GGUF matrix of N rows of K values as int`bits`, a block of rows at a time.

    `raw` is its bytes (an array) or a function (start row, row count) -> bytes of those rows; `importance` [K]
    weighs the int4 fit where values are requantized (quantize_int4).
    """
    read = raw if callable(raw) else (lambda start, count: raw.reshape(N, -1)[start:start + count])
    out = None
    for start in range(0, N, CHUNK_ROWS):
        q, s, b, group = _repack_rows(read(start, min(CHUNK_ROWS, N - start)), type_name, K, bits, importance)
        if out is None:  # allocate the result once; blocks are copied in (no concatenation peak)
            out = (torch.empty(N, q.shape[1], dtype=q.dtype), torch.empty(N, s.shape[1], dtype=s.dtype),
                   None if b is None else torch.empty(N, s.shape[1], dtype=s.dtype), group)
        rows = slice(start, start + q.shape[0])
        out[0][rows], out[1][rows] = q, s
        if b is not None:
            out[2][rows] = b
    q, s, b, group = out
    return QuantizedWeight(bits, q, s, b, group, K, dtype)


def _repack_rows(raw: np.ndarray, type_name: str, K: int, bits: int, importance: torch.Tensor | None = None):
    decode = DECODERS.get(type_name)
    if decode is None:  # any other type: through float
        w = _float_rows(raw, type_name, K)
    else:
        v, s, b, group = decode(raw, K)
        s, b = torch.from_numpy(s), None if b is None else torch.from_numpy(b)
        if bits == 8 or type_name in EXACT_INT4:
            sdtype = torch.float32 if type_name in F32_SCALES else torch.float16
            s, b = s.to(sdtype), None if b is None else b.to(sdtype)
            if bits == 8:
                return torch.from_numpy(np.array(v, dtype=np.int8)), s, b, group
            return pack_int4(torch.from_numpy(v.astype(np.uint8))), s, b, group
        w = torch.from_numpy(v).float().view(v.shape[0], -1, group) * s[:, :, None]  # int4 from more bits
        if b is not None:
            w = w + b[:, :, None]
        w = w.view(v.shape[0], K)
    q, s, b = quantize_int8(w, GROUP) if bits == 8 else quantize_int4(w, GROUP, importance)
    return q, s, b, GROUP


# ---- a whole Gemma 3 GGUF ----------------------------------------------------------------------------------
class GGUFTensors:
    """Tensor bytes of a GGUF file, read when asked (plain reads, not a memory map: the file's pages do not
    stay in this process's memory once converted)."""

    def __init__(self, path: Path):
        from ..checks.files import read_gguf

        self.path = Path(path)
        self.info = read_gguf(self.path)
        self.by_name = {t.name: t for t in self.info.tensors}

    def raw(self, t, start_row: int = 0, rows: int | None = None) -> np.ndarray:
        """Bytes of rows start_row .. start_row + rows - 1 of tensor t (all rows by default), [rows, bytes]."""
        shape = self.shape(t)
        n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        row_bytes = t.nbytes // n_rows
        rows = n_rows - start_row if rows is None else rows
        with open(self.path, "rb") as f:
            f.seek(self.info.data_start + t.offset + start_row * row_bytes)
            data = np.frombuffer(f.read(rows * row_bytes), dtype=np.uint8)
        if data.size != rows * row_bytes:
            raise ModelFileError(f"{self.path}: tensor '{t.name}' is truncated")
        return data.reshape(rows, row_bytes)

    def shape(self, t) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(t.dims))  # GGUF lists dims fastest first

    def float_tensor(self, t) -> torch.Tensor:
        shape = self.shape(t)
        return _float_rows(self.raw(t), t.type_name, shape[-1]).reshape(shape)

    def packed(self, name: str, bits: int | None, dtype: torch.dtype,
               importance: torch.Tensor | None = None) -> QuantizedWeight:
        t = self.by_name[name]
        N, K = self.shape(t)
        return repack(lambda start, rows: self.raw(t, start, rows), t.type_name, N, K,
                      bits or native_bits(t.type_name), dtype, importance)


def load_gemma3(model, gguf: GGUFTensors, bits: int | None, dtype: torch.dtype,
                importance: dict[str, torch.Tensor] | None = None) -> None:
    """Fill an empty Gemma3Model from a GGUF: norms in float, every matrix packed (bits None: native);
    `importance` (quant/calibrate.py, by our module names) weighs int4 requantization."""
    importance = importance or {}
    from ..loading.gguf_convert import _hf_name

    tensors = {}
    for t in gguf.info.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise ModelFileError(f"{gguf.path}: unexpected tensor '{t.name}'")
        shape = gguf.shape(t)
        if len(shape) == 1:
            value = gguf.float_tensor(t)
            tensors[name] = value - 1.0 if name.endswith("norm.weight") else value  # llama.cpp stores 1 + w
        else:  # an empty placeholder [rows, 0]: the model's own loader places norms and ties; matrices come next
            tensors[name] = torch.empty(shape[0], 0, dtype=dtype)
    model.load_hf_state(tensors)
    del tensors
    for i, layer in enumerate(model.layers):
        for attr, parts in GEMMA3_FUSED.items():
            weigh = importance.get(f"layers.{i}.{attr}")  # the parts of a fused projection share its input
            packed = concat([gguf.packed(f"blk.{i}.{p}.weight", bits, dtype, weigh) for p in parts])
            set_linear(getattr(layer, attr), packed)
    tied = model.lm_head.weight is model.embed_tokens
    embed = gguf.packed("token_embd.weight", bits, dtype, importance.get("lm_head") if tied else None)
    replace_parameter(model, "embed_tokens", embed)
    set_linear(model.lm_head, embed if tied else gguf.packed("output.weight", bits, dtype, importance.get("lm_head")))
