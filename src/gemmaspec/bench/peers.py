"""`--peers hf`: the same prompts through Hugging Face transformers' `generate`, timed the same way.

Contestants (same weights folder, same dtype and device as our target, same prompt token ids, greedy):

    hf:none    plain greedy `generate`
    hf:ngram   prompt lookup decoding, `prompt_lookup_num_tokens=K`
    hf:draft   assisted generation, `assistant_model=` the model of a `draft:PATH` drafter (only when one is listed)

Timing. HF's `generate` has no separate prefill clock, so every timed call is paired with a 1-token greedy
`generate` of the same prompt right before it (a prefill plus one sampling step). decode_seconds = full time
minus that 1-token time, which matches the engine's convention (the prefill produces the first token; decode
time covers the rest). The full wall time is kept too (details.json, and the end-to-end column of report.md).
For assisted generation HF merges the prompt's forward with the first verification, so its decode time is an
estimate within one forward pass.

Acceptance is counted from the target model's forward calls (a pre-forward hook): each call after the first
verifies one token plus the drafted ones, so drafted = tokens fed - prompt - (calls - 1) and mean accepted
length = (new tokens - 1) / (calls - 1), as the engine counts it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import GemmaspecError
from .runner import Sample

HF_PROMPT_LOOKUP_DEFAULT = 10  # what HF's docs use when --draft-tokens is auto


def hf_folder(spec: str) -> Path:
    """The HF layout folder for a model spec (GGUF files resolve to their cached conversion)."""
    from ..loading import resolve_model_path
    from ..loading.gguf_convert import converted_folder

    path = resolve_model_path(spec)
    if path.is_file():
        return converted_folder(path) if path.suffix.lower() == ".gguf" else path.parent
    return path


def load_hf_model(folder: Path, dtype: torch.dtype, device: torch.device):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except Exception as e:
        raise GemmaspecError(f"--peers hf: transformers cannot load {folder}: {str(e).splitlines()[0]}") from e
    return model.to(device).eval()


class HFModel:
    """A transformers causal LM with a forward-call counter."""

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device, pad_id: int):
        self.model = load_hf_model(folder, dtype, device)
        self.device = device
        self.pad_id = pad_id
        self.calls: list[int] = []
        self.model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None and args:
            x = args[0]
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is not None:
            self.calls.append(int(x.shape[1]) if x.dim() >= 2 else int(x.shape[0]))

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int], **extra):
        """Returns (new token ids without a trailing eos, wall seconds, forward-call input lengths)."""
        ids = torch.tensor([prompt_ids], device=self.device)
        self.calls = []
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                temperature=None, top_p=None, top_k=None, eos_token_id=sorted(eos_ids), pad_token_id=self.pad_id,
                **extra)
        self._sync()
        seconds = time.perf_counter() - t0
        new = out[0, len(prompt_ids):].tolist()
        for i, tok in enumerate(new):  # HF keeps the eos token; the engine does not emit it
            if tok in eos_ids:
                new = new[:i]
                break
        return new, seconds, list(self.calls)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class HFContestant:
    kind = "hf"

    def __init__(self, label: str, hf: HFModel, engine, extra: dict, info: dict):
        self.label, self.hf, self.engine, self.extra, self.info = label, hf, engine, extra, info

    def run(self, prompt, prompt_ids: list[int], max_new_tokens: int) -> Sample:
        eos = set(self.engine.eos_ids) | (set(self.engine.chat_stop_ids) if prompt.chat else set())
        _, prefill, _ = self.hf.generate(prompt_ids, 1, eos)
        new, total, calls = self.hf.generate(prompt_ids, max_new_tokens, eos, **self.extra)
        n = len(new)
        decode = max(total - prefill, 0.0) if n > 1 else 0.0
        passes = max(len(calls) - 1, 0)
        drafted = max(sum(calls) - len(prompt_ids) - passes, 0) if calls else 0
        accepted = max(n - 1 - passes, 0) if passes else 0
        text = self.engine.tokenizer.decode(new)
        return Sample(new, text, n, prefill, decode, total,
                      acceptance_rate=accepted / drafted if drafted else 0.0,
                      mean_accepted_length=(n - 1) / passes if passes else 1.0)


def hf_contestants(loaded, engine, specs, draft_tokens, notes: list[str]) -> list[HFContestant]:
    """hf:none and hf:ngram always; hf:draft for each `draft:PATH` drafter among `specs`."""
    dtype, device = engine.model.dtype, engine.device
    pad = loaded.tokenizer.token_id("<pad>")
    pad = pad if pad is not None else next(iter(sorted(engine.eos_ids)), 0)
    hf = HFModel(loaded.path, dtype, device, pad)
    common = {"model_folder": str(loaded.path), "dtype": str(dtype).replace("torch.", ""), "device": device.type}
    k_fixed = draft_tokens if isinstance(draft_tokens, int) else None
    k_lookup = k_fixed or HF_PROMPT_LOOKUP_DEFAULT
    out = [HFContestant("hf:none", hf, engine, {}, dict(common, method="greedy generate")),
           HFContestant("hf:ngram", hf, engine, {"prompt_lookup_num_tokens": k_lookup},
                        dict(common, method=f"prompt lookup, prompt_lookup_num_tokens={k_lookup}"))]
    drafts = list(dict.fromkeys(s.drafter for s in specs if s.drafter.startswith("draft:")))
    for i, spec in enumerate(drafts):
        path = spec[len("draft:"):]
        assistant = load_hf_model(hf_folder(path), dtype, device)
        method = "assisted generation (HF's default draft-length schedule)"
        if k_fixed:
            assistant.generation_config.num_assistant_tokens = k_fixed
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            method = f"assisted generation, num_assistant_tokens={k_fixed} (constant)"
        label = "hf:draft" if len(drafts) == 1 else f"hf:draft{i + 1}"
        out.append(HFContestant(label, hf, engine, {"assistant_model": assistant},
                                dict(common, method=method, assistant=path)))
    if loaded.notes and any("weights held as" in n for n in loaded.notes):
        notes.append(f"HF peers hold float {common['dtype']} weights; our target uses quantized weights")
    return out
