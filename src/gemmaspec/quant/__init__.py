"""Low-bit weights for memory-bound decoding: int8 / int4 with per-group scales (issue 9).

Plain decoding reads every weight once per token, so tokens/s is bounded by bytes of weights / memory
bandwidth; holding weights in 8 or 4 bits raises that bound 4-7x over float32.

- `formats.py`  the QuantizedWeight format (a Linear's weight and an embedding table) and its matmuls
- `gguf.py`     GGUF Q8_0 / Q5_0 / Q6_K / Q4_K / Q4_0 tensors repacked exactly, tensor by tensor
- `calibrate.py` the importance of each input feature, measured on text, that weighs int4's fit

`--weights`:  int8 / int4 quantize every Linear and the (tied) embedding; `auto` keeps a quantized GGUF's
own precision (each tensor in the int format that holds it exactly) on CPUs where the kernel builds, and the
float `--dtype` everywhere else (float checkpoints, CUDA where float is fast, no C compiler).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import kernels
from .bf16 import BF16Weight
from .formats import GROUP, QuantizedWeight, concat, quantize, replace_parameter, set_linear

__all__ = ["QuantizedWeight", "BF16Weight", "quantize", "quantize_model", "load_gguf_model", "resolve_weights",
           "weight_bytes", "kernels"]

BITS = {"int8": 8, "int4": 4}


def resolve_weights(weights: str | None, gguf: "object | None", device: torch.device) -> str | None:
    """What `--weights` means here: 'int8', 'int4', 'native' (a GGUF's own precision) or None (float)."""
    if weights in BITS:
        return weights
    if weights != "auto" or gguf is None:
        return None
    from .gguf import has_quantized_matrices

    if device.type != "cpu" or kernels.load() is None or not has_quantized_matrices(gguf.info):
        return None
    return "native"


def load_gguf_model(folder: Path, source: Path, weights: str | None, dtype: torch.dtype, device: torch.device,
                    notes: list[str], tokenizer=None):
    """A model whose weights come packed straight from the GGUF file, or None when they stay float. int4
    is fitted with the activation importance measured on the file's own precision (int8 for its float tensors;
    calibrate.py; needs `tokenizer`, cached per file)."""
    from ..errors import ModelFileError
    from ..loading import read_config
    from ..models import build_model
    from .gguf import GGUFTensors, load_gemma3

    if weights not in BITS and weights != "auto":
        return None
    gguf = GGUFTensors(source)
    fmt = resolve_weights(weights, gguf, device)
    if fmt is None:
        return None
    config = read_config(folder)

    def packed_model(bits, importance=None):
        model = build_model(config)
        if model.config.model_type != "gemma3_text":
            raise ModelFileError(f"{source}: packed GGUF loading supports gemma3 only")
        with torch.no_grad():
            load_gemma3(model, gguf, bits, dtype, importance)
        return model.eval()

    importance = None
    if fmt == "int4" and tokenizer is not None:
        from .calibrate import cached_importance

        importance = cached_importance(source, lambda: packed_model(None), tokenizer)  # the file's own values
    model = packed_model(BITS.get(fmt), importance)
    model.to(device)
    use_block_layout(model)
    notes.append(_note(model, fmt, device))
    return model


def quantize_model(model: torch.nn.Module, weights: str, notes: list[str] | None = None,
                   importance: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Re-hold a float model's weights as `weights` (int8, int4, or bf16 computed in float32) in place, tensor by
    tensor: every Linear and the (tied) embedding tables. `importance` (calibrate.py, by module name; the tied
    table takes 'lm_head') weighs the int4 fit."""
    from ..models.layers import Linear

    dtype = model.dtype
    group = 1 if weights == "bf16" else GROUP  # what in_features must be a multiple of
    importance = importance or {}

    def pack(w, name):
        if weights == "bf16":
            return BF16Weight(w, dtype)
        return quantize(w, BITS[weights], dtype=dtype, importance=importance.get(name))
    with torch.no_grad():
        # tables: embeddings (tied to a Linear LM head or not), and a head held as a bare table (the MTP assistant's
        # trimmed-vocabulary head, read in full at every draft step)
        for name in ("embed_tokens", "embed_tokens_per_layer", "lm_head"):
            table = model._parameters.get(name)
            if table is None or table.dim() != 2 or table.shape[1] % group:
                continue
            tied = [m for m in model.modules() if isinstance(m, Linear) and m.weight is table]
            head_input = name == "lm_head" or any(m is getattr(model, "lm_head", None) for m in tied)
            packed = pack(table.data, "lm_head" if head_input else name)
            replace_parameter(model, name, packed)
            for linear in tied:
                set_linear(linear, packed)
            del table
        for name, module in list(model.named_modules()):
            if isinstance(module, Linear) and module.qweight is None and module.in_features % group == 0:
                set_linear(module, pack(module.weight.data, name))
    use_block_layout(model)
    if notes is not None:
        device = next((t.device for t in model.buffers()), torch.device("cpu"))
        notes.append(_note(model, weights, device))
    return model


def use_block_layout(model: torch.nn.Module) -> None:
    """Every quantized weight of `model` that the CPU's AVX-512 kernel reads held in its block layout (in place)."""
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            module.use_block_layout()


def weight_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors of weights one decode step reads, each once (a tied table once, as the LM head)."""
    seen, found = set(), []
    for module in model.modules():
        if isinstance(module, (QuantizedWeight, BF16Weight)):
            tensors = [t for t in module.buffers(recurse=False) if t is not None]
        else:
            tensors = list(module.parameters(recurse=False))
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                found.append(t)
    return found


def parameter_count(model: torch.nn.Module) -> int:
    """The model's parameters as the checkpoint counts them: a quantized or bf16-held matrix as its [out, in]
    values (its packed buffers are not parameters), a tied table once."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, (QuantizedWeight, BF16Weight)):
            if id(module) not in seen:
                seen.add(id(module))
                total += module.out_features * module.in_features
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every matrix once (a tied table counts once, as the LM head)."""
    return sum(t.numel() * t.element_size() for t in weight_tensors(model))


def _note(model, fmt: str, device: torch.device) -> str:
    what = "each tensor in the int8/int4 format of the GGUF file" if fmt == "native" else fmt
    how = kernels.status() if device.type == "cpu" else "CUDA"
    return f"weights held as {what} ({weight_bytes(model) / 1e6:.0f} MB; matmuls: {how})"
