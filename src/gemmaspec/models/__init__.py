"""Model registry: HF `model_type` -> (config dataclass, decoder class)."""

from __future__ import annotations

from ..errors import ModelFileError
from .gemma3 import Gemma3Config, Gemma3Model
from .gemma4 import Gemma4Config, Gemma4Model

ARCHITECTURES: dict[str, tuple[type, type]] = {
    "gemma3_text": (Gemma3Config, Gemma3Model),
    "gemma4_text": (Gemma4Config, Gemma4Model),
}

# Multimodal wrappers whose text part we load (towers are out of scope).
MULTIMODAL_TEXT_TYPES = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}


def build_model(config_dict: dict):
    """Build an empty decoder for an HF config dict (text part of multimodal configs)."""
    model_type = config_dict.get("model_type")
    if model_type in MULTIMODAL_TEXT_TYPES and "text_config" in config_dict:
        config_dict = dict(config_dict["text_config"])
        config_dict.setdefault("model_type", MULTIMODAL_TEXT_TYPES[model_type])
        model_type = config_dict["model_type"]
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelFileError(f"unsupported architecture '{model_type}' (supported: {supported})")
    config_cls, model_cls = ARCHITECTURES[model_type]
    return model_cls(config_cls.from_hf(config_dict))
