"""Tiny random Gemma checkpoints in HF layout, made with transformers (the oracle), for fast tests.

A small-vocabulary model gets a word-level tokenizer ("t0 t1 ..."); `real_tokenizer=True` copies the default
model's Gemma tokenizer instead (vocab 262144), for tests of text handling, chat templates and the server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def tiny_gemma3_config(vocab_size: int = 96, **overrides) -> dict:
    cfg = dict(
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=512,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        rms_norm_eps=1e-6,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    cfg.update(overrides)
    return cfg


def hf_model(config: dict, seed: int = 0, embed_std: float = 1.0):
    """A transformers model for `config` with random weights, norms included (they start at zero).

    A smaller `embed_std` flattens the next-token distribution (useful for sampling tests)."""
    import transformers

    torch.manual_seed(seed)
    if config["model_type"] == "gemma3_text":
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**config))
    elif config["model_type"] == "gemma4_text":
        model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**config))
    else:
        raise ValueError(config["model_type"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5 if "embed" not in name else embed_std)
    return model.float().eval()


def save_tiny_model(folder: Path, config: dict, seed: int = 0, real_tokenizer: bool = False,
                    chat_template: str | None = None, embed_std: float = 1.0) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if real_tokenizer:
        config = dict(config, vocab_size=262144)
    model = hf_model(config, seed, embed_std)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if real_tokenizer:
        src = default_tokenizer_folder()
        shutil.copy(src / "tokenizer.json", folder / "tokenizer.json")
        tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    else:
        write_wordlevel_tokenizer(folder, config["vocab_size"])
        tok_cfg = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}
    if chat_template:
        tok_cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return folder


def write_wordlevel_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    for s in specials:
        tok.add_special_tokens([s])
    tok.save(str(folder / "tokenizer.json"))


def default_tokenizer_folder() -> Path:
    """The converted default model's cache folder (converting it on first use)."""
    from gemmaspec.loading import default_model_path
    from gemmaspec.loading.gguf_convert import converted_folder

    return converted_folder(default_model_path())
