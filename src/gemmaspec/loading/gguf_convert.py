"""GGUF -> cached HF folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).

Parsing a GGUF's metadata (262k token strings) and dequantizing takes ~20 s on a small CPU, so the first load
converts once into the user cache dir; later loads read the cached folder in about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelFileError

CONVERSION_VERSION = 1
GGUF_MAGIC = b"GGUF"

# GGUF tensor names (llama.cpp) -> HF names, per architecture.
_GEMMA_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def cache_root() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("GEMMASPEC_CACHE", user_cache_dir("gemmaspec")))


def check_gguf_header(path: Path) -> None:
    """Cheap sanity check before handing the file to the gguf parser."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror}") from e
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (bad magic bytes)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise ModelFileError(f"{path}: unsupported GGUF version {version}")


def converted_folder(path: Path) -> Path:
    """The cached HF folder for a GGUF file, converting it first if needed."""
    path = path.resolve()
    from ..checks import check_gguf_structure

    check_gguf_structure(path)  # header, tensor table, every tensor's data inside the file (truncated downloads)
    st = path.stat()
    key = f"{path.stem}-{st.st_size}-{int(st.st_mtime)}-v{CONVERSION_VERSION}"
    folder = cache_root() / "gguf" / key
    if (folder / "done").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _convert(path, tmp)
        (tmp / "done").write_text("ok\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(path: Path, out: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise ModelFileError(f"{path} is not a valid GGUF file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "gemma3":
        raise ModelFileError(f"{path}: unsupported GGUF architecture '{arch}' (supported: gemma3)")
    config = _gemma3_config(meta)
    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise ModelFileError(f"{path}: unexpected tensor '{t.name}'")
        try:
            data = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ModelFileError(f"{path}: cannot read tensor '{t.name}': {e}") from e
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims fastest-first
        data = np.asarray(data, dtype=np.float32).reshape(shape)
        tensor = torch.from_numpy(data.copy())
        if name.endswith("norm.weight"):  # llama.cpp stores Gemma norms as 1 + w
            tensor = tensor - 1.0
        tensors[name] = tensor
    if not np.isfinite(tensors["model.embed_tokens.weight"][:64].numpy()).all():
        raise ModelFileError(f"{path}: token embedding contains NaN/Inf")
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(path, meta, out)
    (out / "source.json").write_text(json.dumps({"gguf": str(path), "file_type": meta.get("general.file_type"), "name": meta.get("general.name")}))


def _metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "scores", "token_type", "merges"):
            continue  # large arrays, read by the tokenizer converter
        try:
            meta[key] = field.contents()
        except Exception:
            continue
    return meta


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GEMMA_TOP_NAMES:
        return _GEMMA_TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GEMMA_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_GEMMA_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    return None


def _gemma3_config(meta: dict) -> dict:
    a = "gemma3."
    n_layers = int(meta[a + "block_count"])
    window = int(meta.get(a + "attention.sliding_window", 512))
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": None,  # filled from the tokenizer
        "hidden_size": int(meta[a + "embedding_length"]),
        "intermediate_size": int(meta[a + "feed_forward_length"]),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(meta[a + "attention.head_count"]),
        "num_key_value_heads": int(meta[a + "attention.head_count_kv"]),
        "head_dim": int(meta[a + "attention.key_length"]),
        "query_pre_attn_scalar": int(meta[a + "attention.key_length"]),
        "rms_norm_eps": float(meta[a + "attention.layer_norm_rms_epsilon"]),
        "sliding_window": window,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)],
        "max_position_embeddings": int(meta.get(a + "context_length", 32768)),
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": float(meta.get(a + "rope.freq_base", 1e6))},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "bos_token_id": int(meta.get("tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(meta.get("tokenizer.ggml.eos_token_id", 1)),
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", 0)),
        "final_logit_softcapping": meta.get(a + "final_logit_softcapping"),
        "tie_word_embeddings": True,
    }


def _write_tokenizer(path: Path, meta: dict, out: Path) -> None:
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
    fast, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    fast.save(str(out / "tokenizer.json"))
    tokenizer_config = {k: v for k, v in tokenizer_config.items() if v is not None}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] = len(tokenizer_dict["tokens"])
    (out / "config.json").write_text(json.dumps(config, indent=2))
