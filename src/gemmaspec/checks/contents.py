"""What a checkpoint holds against what its config implies; the chat-template policy; the load-time checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import ModelFileError
from .files import FLOAT_DTYPES, read_safetensors_folder, summarize

# Turn and tool-call markers per family (Gemma 4: `<|turn>user ... <turn|>`, tool calls
# `<|tool_call>call:NAME{...}<tool_call|>`, declarations `<|tool>declaration:NAME{...}<tool|>`, string quote `<|"|>`).
TURN_MARKERS = {"gemma3": ("<start_of_turn>", "<end_of_turn>"), "gemma4": ("<|turn>", "<turn|>")}
TOOL_MARKERS = {"gemma3": (), "gemma4": ("<|tool_call>", "<tool_call|>", "<|tool>", "<tool|>", "<|tool_response>",
                                       "<tool_response|>", '<|"|>')}
TURN_END_MARKERS = ("<end_of_turn>", "<turn|>")
_INSTRUCT_RE = re.compile(r"(?:^|[-_.\s])(?:it|instruct)(?:$|[-_.\s])", re.IGNORECASE)


def family(config: dict) -> str:
    """'gemma3' or 'gemma4' (text part of multimodal configs included); '' for anything else."""
    model_type = str(config.get("model_type") or "")
    for fam in ("gemma4", "gemma3"):
        if model_type.startswith(fam):
            return fam
    return ""


def text_config(config: dict) -> dict:
    if "text_config" in config and isinstance(config["text_config"], dict):
        d = dict(config["text_config"])
        d.setdefault("model_type", f"{family(config) or config.get('model_type')}_text")
        return d
    return config


# ---- tensors ------------------------------------------------------------------------------------------
def build_meta_model(config: dict):
    """Our decoder for `config`, allocated on the meta device (no memory); raises ModelFileError if unsupported."""
    from ..models import build_model

    with torch.device("meta"):
        return build_model(config)


def expected_shapes(model) -> dict[str, tuple] | None:
    """HF tensor name -> the shape the built model implies (optional tensors such as lm_head included).

    Read off the built decoder's own layers (head dims, fused widths, shared K/V layers), so it follows the
    config exactly as the model does. None for architectures without a table (the meta load still checks them).
    """
    cfg = model.config
    model_type = getattr(cfg, "model_type", "")
    if model_type not in ("gemma3_text", "gemma4_text"):
        return None
    V, H = model.embed_tokens.shape
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    if model_type == "gemma4_text" and getattr(model, "ple_dim", 0):
        shapes["model.embed_tokens_per_layer.weight"] = tuple(model.embed_tokens_per_layer.shape)
        shapes["model.per_layer_model_projection.weight"] = tuple(model.per_layer_model_projection.weight.shape)
        shapes["model.per_layer_projection_norm.weight"] = tuple(model.per_layer_projection_norm.weight.shape)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        head_dim = layer.head_dim
        q_dim, kv_dim = layer.n_heads * head_dim, layer.n_kv * head_dim
        shared = getattr(layer, "shared", False)
        kv_names = [] if shared else (["k"] if getattr(layer, "k_eq_v", False) else ["k", "v"])
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, H)
        for n in kv_names:
            shapes[p + f"self_attn.{n}_proj.weight"] = (kv_dim, H)
        shapes[p + "self_attn.o_proj.weight"] = (H, q_dim)
        if getattr(layer, "qkv_bias", None) is not None:
            shapes[p + "self_attn.q_proj.bias"] = (q_dim,)
            for n in kv_names:
                shapes[p + f"self_attn.{n}_proj.bias"] = (kv_dim,)
            shapes[p + "self_attn.o_proj.bias"] = (H,)
        inter = layer.down_proj.in_features
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (inter, H)
        shapes[p + "mlp.down_proj.weight"] = (H, inter)
        shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
        if not shared:
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            shapes[p + f"{norm}.weight"] = (H,)
        if getattr(layer, "ple_dim", 0):
            shapes[p + "per_layer_input_gate.weight"] = tuple(layer.per_layer_input_gate.weight.shape)
            shapes[p + "per_layer_projection.weight"] = tuple(layer.per_layer_projection.weight.shape)
            shapes[p + "post_per_layer_input_norm.weight"] = (H,)
        if getattr(layer, "moe", False):
            shapes[p + "router.proj.weight"] = tuple(layer.router_proj.weight.shape)
            shapes[p + "router.scale"] = (H,)
            shapes[p + "router.per_expert_scale"] = tuple(layer.per_expert_scale.shape)
            shapes[p + "experts.gate_up_proj"] = tuple(layer.experts_gate_up.shape)
            shapes[p + "experts.down_proj"] = tuple(layer.experts_down.shape)
            for norm in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
                shapes[p + f"{norm}.weight"] = (H,)
        if model_type == "gemma4_text":
            shapes[p + "layer_scalar"] = (1,)
    return shapes


def tensor_problems(config: dict, found: dict[str, tuple[str, tuple]], where: str = "checkpoint") -> list[str]:
    """Missing, unexpected, mis-shaped or non-float tensors. `found`: HF name -> (dtype, shape).

    Names are those of the file (multimodal prefixes are mapped and vision/audio towers dropped as the loader does).
    """
    from ..loading import text_tensors

    found = text_tensors(dict(found))
    model = build_meta_model(config)
    problems: list[str] = []
    shapes = expected_shapes(model)
    if shapes is not None:
        wrong = [(n, found[n][1], s) for n, s in shapes.items() if n in found and tuple(found[n][1]) != tuple(s)]
        for name, got, want in wrong[:3]:
            problems.append(f"{where}: tensor '{name}' has shape {list(got)}, but config.json implies {list(want)}")
        if len(wrong) > 3:
            problems.append(f"{where}: {len(wrong) - 3} more tensors have the wrong shape")
    problems += _meta_load_problems(model, found, where, shapes_checked=bool(problems))
    bad_dtype = [(n, d) for n, (d, _) in found.items() if d not in FLOAT_DTYPES]
    if bad_dtype:
        n, d = bad_dtype[0]
        problems.append(f"{where}: {len(bad_dtype)} tensors are not floating point, e.g. '{n}' is {d} "
                        "(gemmaspec reads F32/F16/BF16 weights)")
    return problems


def _meta_load_problems(model, found: dict, where: str, shapes_checked: bool) -> list[str]:
    """Run the model's own loader on meta tensors of the file's shapes: what it would refuse, without reading data."""
    fresh = {n: tuple(p.shape) for n, p in model.named_parameters()}
    tensors = {n: torch.empty(tuple(shape), dtype=torch.float32, device="meta") for n, (_, shape) in found.items()}
    try:
        model.load_hf_state(tensors)
    except ModelFileError as e:
        return [f"{where}: {e}"]
    except (RuntimeError, ValueError, IndexError) as e:
        if "meta" in str(e).lower() and "shape" not in str(e).lower():
            return []  # a loader step the meta device cannot run: nothing to conclude
        return [] if shapes_checked else [f"{where}: tensor shapes do not fit the model: {str(e).splitlines()[0]}"]
    except NotImplementedError:
        return []
    if shapes_checked:
        return []
    for name, p in model.named_parameters():
        if name in fresh and tuple(p.shape) != fresh[name]:
            return [f"{where}: the tensors loaded into '{name}' have shape {list(p.shape)}, but config.json implies "
                    f"{list(fresh[name])}"]
    return []


# ---- chat template policy -----------------------------------------------------------------------------
def name_hints(folder: Path, source: Path | None = None, config: dict | None = None) -> list[str]:
    """Names that may say what the model is: the folder, the file the user named, recorded source names."""
    hints = [folder.name]
    if source is not None:
        hints.append(source.stem if source.is_file() else source.name)
    for f in ("source.json",):
        try:
            meta = json.loads((folder / f).read_text())
            hints += [str(meta.get("name") or ""), Path(str(meta.get("gguf") or "")).stem]
        except (OSError, ValueError):
            pass
    if config:
        hints.append(Path(str(config.get("_name_or_path") or "")).name)
    return [h for h in hints if h]


def instruction_tuned_reason(tokenizer, config: dict, hints: list[str]) -> str | None:
    """Why the model looks instruction-tuned ('-it' in its name, turn-end markers as EOS), or None."""
    for h in hints:
        if _INSTRUCT_RE.search(h):
            return f"its name '{h}' says it is instruction-tuned"
    eos = tokenizer.eos_token
    if eos in TURN_END_MARKERS:
        return f"its tokenizer uses the turn marker {eos} as end of sequence"
    eos_ids = config.get("eos_token_id")
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    for marker in TURN_END_MARKERS:
        tid = tokenizer.token_id(marker)
        if tid is not None and tid in eos_ids:
            return f"config.json lists the turn marker {marker} as an end-of-sequence token"
    return None


def chat_template_problem(folder: Path, tokenizer, config: dict, hints: list[str]) -> str | None:
    """The failure for an instruction-tuned model whose chat template was stripped, else None."""
    if tokenizer.has_chat_template:
        return None
    reason = instruction_tuned_reason(tokenizer, config, hints)
    if reason is None:
        return None
    return (f"{folder}: the model is instruction-tuned ({reason}) but has no chat template (tokenizer_config.json "
            "'chat_template' or chat_template.jinja): the file was stripped or converted badly, re-download it")


# ---- load time ----------------------------------------------------------------------------------------
def load_time_checks(folder: Path, source: Path | None, tokenizer) -> None:
    """The cheap checks the loader runs before reading any weights; raises ModelFileError on the first failure.

    Safetensors headers and shard index (every tensor inside its file), every tensor present with the shape
    config.json implies, and the chat template of an instruction-tuned model present.
    """
    from ..loading import read_config

    config = read_config(folder)
    tensors, problems = read_safetensors_folder(folder)
    if problems:
        raise ModelFileError(summarize(problems))
    problems = tensor_problems(config, {n: (e.dtype, e.shape) for n, e in tensors.items()}, where=str(folder))
    if problems:
        raise ModelFileError(summarize(problems))
    problem = chat_template_problem(folder, tokenizer, config, name_hints(folder, source, config))
    if problem:
        raise ModelFileError(problem)
