"""The MTP drafter: a Gemma 4 assistant drafting from the target's own KV cache and last hidden state.

Each round starts from what the engine hands every drafter: the last seen token (tokens[-1], not yet in the target
cache), the target's final-normed hidden state of the position before it, and the target cache valid up to
cache.length. The assistant then drafts k tokens autoregressively, all at the position of the last seen token,
feeding each step the target's embedding of the token just drafted and its own projected hidden state. It reads
the target's K/V buffers in place; nothing is copied or written, so rollback stays the engine's business.

Spec forms: `mtp` (the assistant paired with the model: an `assistant/` or `*-assistant` folder next to it, or a
drafter shipped in this package for the default model) and `mtp:PATH` (an assistant folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import GemmaspecError, ModelFileError
from ..models.assistant import (
    ASSISTANT_TYPES,
    AssistantConfig,
    AssistantModel,
    load_assistant,
    pairing_problems,
    read_assistant_config,
    resolve_kv_layers,
    target_text_config,
)
from ..sampling import SamplingParams, probabilities
from .base import Draft, DraftContext, Drafter

SHIPPED_DIR = Path(__file__).parent / "shipped"
DEFAULT_SHIPPED_NAME = "gemma-3-270m"  # shipped/<name>/ holds the default model's trained drafter

__all__ = ["MTPDrafter", "make_mtp_drafter", "find_paired_assistant", "check_pairing", "SHIPPED_DIR",
           "DEFAULT_SHIPPED_NAME"]


def check_pairing(assistant_config, target) -> list[str]:
    """Problems that keep this assistant from drafting for this target (empty list: it fits).

    assistant_config: AssistantConfig or an assistant config.json dict; target: LoadedModel, model, config
    dataclass or HF config dict. Checks vocabulary, backbone hidden size, and the head_dim / KV heads and
    attention kind of the target layers the assistant reads."""
    try:
        acfg = assistant_config if isinstance(assistant_config, AssistantConfig) else AssistantConfig.from_hf(
            assistant_config)
        return pairing_problems(acfg, target)
    except ModelFileError as e:
        return [str(e)]


class MTPDrafter(Drafter):
    max_tokens = 16
    needs_hidden = True

    def __init__(self, assistant: AssistantModel, target_model: torch.nn.Module, name: str = "mtp"):
        problems = check_pairing(assistant.config, target_model)
        if problems:
            raise GemmaspecError(f"the MTP assistant does not fit this target: {'; '.join(problems)}")
        layers, _ = resolve_kv_layers(assistant.config, target_text_config(target_model))
        self.kv_layers = {kind: layer.index for kind, layer in layers.items()}
        self.assistant = assistant
        self.target = target_model
        self.name = name
        self.params = SamplingParams()

    def reset(self, prompt_ids: list[int], params: SamplingParams, max_len: int) -> None:
        self.params = params

    @torch.inference_mode()
    def propose(self, context: DraftContext, k: int) -> Draft:
        if k <= 0:
            return Draft([])
        if context.hidden is None:
            raise GemmaspecError("the MTP drafter needs the target's hidden state")
        model, target, cache = self.assistant, context.target, context.cache
        position = cache.length  # the last seen token's position: it is not in the cache yet
        views = model.draft_views(cache, self.kv_layers, position)
        rope = model.rope(torch.tensor([position], device=model.device))
        greedy = self.params.greedy
        vocab = model.config.text.vocab_size
        hidden = context.hidden.reshape(1, -1).to(model.dtype)
        token = torch.tensor([context.tokens[-1]], device=model.device)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(k):
            x = torch.cat([target.embed(token).to(model.dtype), hidden], dim=-1)
            h = model(x, rope, views)
            ids, logits = model.candidates(h)
            if greedy:
                best = logits[0].argmax()
                token = (ids[0, best] if ids is not None else best).reshape(1)
            else:
                q = probabilities(logits, self.params)[0]
                pick = torch.multinomial(q, 1, generator=context.generator)
                token = ids[0, pick] if ids is not None else pick
                if ids is not None:  # tokens outside the selected clusters have q = 0
                    q = torch.zeros(vocab, dtype=q.dtype, device=q.device).scatter_(0, ids[0], q)
                rows.append(q)
            tokens.append(int(token))
            hidden = model.project(h)
        return Draft(tokens, torch.stack(rows) if rows else None)


def match_target_weights(assistant: AssistantModel, target_model: torch.nn.Module,
                         weights: str | None = None) -> str | None:
    """Hold the assistant's weights in the packed format of the target's (`--weights`, a packed GGUF): a draft step
    is memory-bound like a target step, so float drafter weights next to int4 target weights would cost a large
    share of a target step. The drafter takes the format most of the target's matrices have (int8 for the
    default Q4_K_M GGUF, bf16 under --weights bf16). Returns the format applied, or None (weights stay float)."""
    if weights is None:
        counts: dict[str, int] = {}
        for m in target_model.modules():
            packed = getattr(m, "qweight", None)
            if packed is not None:  # "int8", "int4" or "bf16"
                counts[packed.format] = counts.get(packed.format, 0) + 1
        if not counts:
            return None
        weights = max(counts, key=counts.get)
    if weights in ("float", "none"):
        return None
    try:
        from ..quant import quantize_model
    except ImportError:
        return None
    quantize_model(assistant, weights)
    return weights


# ---- finding and loading ------------------------------------------------------------------------------
def _is_assistant_folder(folder: Path) -> bool:
    try:
        d = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and d.get("model_type") in ASSISTANT_TYPES


def _candidate_folders(target) -> list[Path]:
    """Where a paired assistant may live, most specific first."""
    raw = getattr(target, "source", None)
    source = Path(raw) if raw else None
    out: list[Path] = []
    if getattr(target, "name", None) == "default":
        out.append(SHIPPED_DIR / DEFAULT_SHIPPED_NAME)
    names = {getattr(target, "name", None)}
    if source is not None:
        stem = source.name if source.is_dir() else source.stem
        names |= {source.name, stem}
        if source.is_dir():
            out.append(source / "assistant")
        out += [source.parent / f"{stem}-assistant", source.parent / "assistant"]
        if source.parent.is_dir():
            out += sorted(p for p in source.parent.glob("*-assistant") if p.is_dir())
    if SHIPPED_DIR.is_dir():  # shipped drafters that name this target
        for folder in sorted(p for p in SHIPPED_DIR.iterdir() if p.is_dir()):
            try:
                if json.loads((folder / "config.json").read_text()).get("gemmaspec_target") in names:
                    out.append(folder)
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
    seen, unique = set(), []
    for p in out:
        key = p.resolve() if p.exists() else p
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _paired_candidates(target) -> list[tuple[Path, list[str]]]:
    """Assistant folders near the target, each with its pairing problems."""
    found = []
    for folder in _candidate_folders(target):
        if folder.is_dir() and _is_assistant_folder(folder):
            try:
                problems = check_pairing(read_assistant_config(folder), target)
            except (ModelFileError, TypeError) as e:
                problems = [str(e)]
            found.append((folder, problems))
    return found


def find_paired_assistant(target) -> Path | None:
    """The assistant folder paired with a loaded target (first that fits), or None."""
    for folder, problems in _paired_candidates(target):
        if not problems:
            return folder
    return None


def make_mtp_drafter(spec: str, target) -> MTPDrafter:
    """`mtp` or `mtp:PATH` for a loaded target (loading.LoadedModel)."""
    model = target.model
    if spec == "mtp":
        path = find_paired_assistant(target)
        if path is None:
            misfits = _paired_candidates(target)
            if misfits:
                folder, problems = misfits[0]
                raise GemmaspecError(f"the MTP assistant {folder} does not fit {target.name}: {'; '.join(problems)}")
            raise GemmaspecError(
                f"no MTP assistant is paired with {target.name} (looked for an 'assistant' or '*-assistant' folder "
                f"next to it and for a shipped drafter); pass --drafter mtp:PATH or use --drafter ngram"
            )
    else:
        raw = spec[len("mtp:"):]
        if not raw:
            raise GemmaspecError("--drafter mtp:PATH needs the path of an MTP assistant folder")
        path = Path(raw).expanduser()
        if path.is_file() and path.name in ("config.json", "model.safetensors"):
            path = path.parent
        if not path.exists():
            raise GemmaspecError(f"MTP assistant not found: {raw}")
    cfg = read_assistant_config(path)
    problems = check_pairing(cfg, target)
    if problems:
        raise GemmaspecError(f"the MTP assistant {path} does not fit {target.name}: {'; '.join(problems)}")
    device = model.embed_tokens.device
    # On the CPU the assistant computes in float32 whatever the target's dtype: its matmuls and its attention over
    # the target's (bfloat16) cache run in our C kernels, which take float32 activations; PyTorch's bfloat16 ops
    # on its small tensors made a draft step 2.5x slower (1.34 vs 0.54 ms, scripts/bench_mtp_step.py).
    dtype = torch.float32 if device.type == "cpu" else model.dtype
    assistant = load_assistant(path, dtype=dtype, device=device,
                               target_embeddings=model.embed_tokens if cfg.tie_target_embeddings else None)
    match_target_weights(assistant, model)
    return MTPDrafter(assistant, model, name=spec)
