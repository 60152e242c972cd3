"""The decode loop: prefill -> [draft -> verify -> accept -> rollback]* -> stream.

Plain decoding is the same loop with zero drafted tokens, so every drafter shares one code path and
`verify()` alone decides what is emitted.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from .drafters import DraftContext, Drafter, make_drafter
from .draft_length import DraftLengthPolicy, VerifyCostModel, make_policy
from .errors import GemmaspecError, PromptTooLongError
from .loading import LoadedModel, load_model
from .loading.tokenizer import IncrementalDecoder
from .sampling import SamplingParams
from .verify import verify

# One sliding-ring margin for every request, plain or speculative: the ring's geometry enters the numbers
# (cache.py), and a verification chunk (at most MAX_DRAFT_TOKENS + 1 tokens) must fit in the margin to run in the
# same C block as a plain decode step.
SPEC_MARGIN = 64
# Most greedy steps of plain decoding in one call (Gemma3Model.decode_greedy): the Python around a step (~0.15 ms
# with the caches cold) once per run; 8 tokens stream together, ~40-80 ms apart on the default model.
PLAIN_RUN = 8


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forward_passes: int = 0  # decode passes (prefill not counted)
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0  # new tokens per decode forward pass
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    tokens_per_second: float = 0.0
    drafter: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "length" | "stop"
    stats: GenerationStats
    prompt_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats.to_dict()}


@dataclass
class StreamChunk:
    text: str  # new text since the previous chunk
    token_ids: list[int]  # tokens verified in this step
    result: GenerationResult | None = None  # set on the final chunk


class Engine:
    def __init__(self, target: LoadedModel, drafter: Drafter, draft_tokens: int | str = "auto"):
        self.target = target
        self.model = target.model
        self.tokenizer = target.tokenizer
        self.drafter = drafter
        self.draft_tokens = draft_tokens
        cfg = self.model.config
        self.eos_ids = set(cfg.eos_token_ids) | ({self.tokenizer.eos_id} if self.tokenizer.eos_id is not None else set())
        end_of_turn = self.tokenizer.token_id("<end_of_turn>")
        self.chat_stop_ids = {end_of_turn} if end_of_turn is not None else set()
        self.context_length = cfg.max_position_embeddings
        # Target time per verification size: a property of model + machine, shared by all requests.
        self.verify_costs = VerifyCostModel()

    @classmethod
    def load(cls, model: str = "default", drafter: str = "auto", dtype: str = "auto", device: str = "auto",
             draft_tokens: int | str = "auto", weights: str = "auto") -> "Engine":
        target = load_model(model, dtype=dtype, device=device, weights=weights)
        return cls(target, make_drafter(drafter, target), draft_tokens)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.device

    # ---- prompts ---------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int] | None = None, messages: list[dict] | None = None,
                      chat: bool = False, tools: list[dict] | None = None) -> list[int]:
        if messages is not None:
            return self.tokenizer.encode_chat(messages, tools=tools)
        if isinstance(prompt, list):
            ids = list(prompt)
        else:
            if prompt is None or not prompt.strip():
                raise GemmaspecError("the prompt is empty")
            if chat:
                return self.tokenizer.encode_chat([{"role": "user", "content": prompt}], tools=tools)
            ids = self.tokenizer.encode(prompt)
        if not ids:
            raise GemmaspecError("the prompt is empty")
        return ids

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int] | None = None, **kwargs) -> GenerationResult:
        result = None
        for chunk in self.stream(prompt, **kwargs):
            result = chunk.result or result
        return result

    def stream(self, prompt: str | list[int] | None = None, *, messages: list[dict] | None = None,
               chat: bool = False, tools: list[dict] | None = None, max_new_tokens: int = 128,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop: list[str] | str | None = None, draft_tokens: int | str | None = None) -> Iterator[StreamChunk]:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        prompt_ids = self.encode_prompt(prompt, messages=messages, chat=chat, tools=tools)
        if max_new_tokens is None or max_new_tokens < 1:
            raise GemmaspecError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt_ids) + 1 > self.context_length:
            raise PromptTooLongError(
                f"prompt of {len(prompt_ids)} tokens does not fit the model's context of {self.context_length} tokens"
            )
        max_new_tokens = min(max_new_tokens, self.context_length - len(prompt_ids))
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        eos_ids = self.eos_ids | (self.chat_stop_ids if (chat or messages is not None) else set())
        policy = make_policy(self.drafter, self.draft_tokens if draft_tokens is None else draft_tokens, self.verify_costs)
        with torch.inference_mode():
            yield from self._decode(prompt_ids, params, max_new_tokens, stops, eos_ids, policy)

    def _decode(self, prompt_ids: list[int], params: SamplingParams, max_new: int, stops: list[str],
                eos_ids: set[int], policy: DraftLengthPolicy) -> Iterator[StreamChunk]:
        model, drafter = self.model, self.drafter
        max_draft = policy.max_tokens
        capacity = len(prompt_ids) + max_new + max_draft + 2
        cache = model.new_cache(capacity, spec_margin=SPEC_MARGIN)
        generator = None if params.greedy else params.generator(self.device)
        drafter.reset(prompt_ids, params, capacity)
        stats = GenerationStats(prompt_tokens=len(prompt_ids), drafter=getattr(drafter, "name", "none"),
                                dtype=str(model.dtype).replace("torch.", ""), device=self.device.type)
        tokens = list(prompt_ids)
        new_ids: list[int] = []
        decoder = IncrementalDecoder(self.tokenizer)
        emitted_text = ""

        t0 = time.perf_counter()
        hidden = model(torch.tensor(tokens, device=self.device), cache)
        _, first = verify(model.logits(hidden[-1:]), [], None, params, generator)
        last_hidden = hidden[-1]
        stats.prefill_seconds = time.perf_counter() - t0
        pending = [first]
        # Greedy steps without drafts go in runs of steps in one call where the model has one, as many as the
        # policy allows before it wants a say again (the tokens then stream a run at a time: 1, 2, 4, then
        # PLAIN_RUN)
        plain_run = 1 if params.greedy and hasattr(model, "decode_greedy") else None
        # A run ends at a token after which a stop string may show (and at an EOS id): no step past a stop string
        run_stops = eos_ids
        if stops and plain_run is not None:
            may_end = self.tokenizer.ids_that_may_end(stops)
            run_stops = torch.unique(torch.cat([may_end, torch.tensor(sorted(eos_ids), dtype=torch.int64)]))
        t_decode = time.perf_counter()
        finish = None
        from_run = False  # pending came from a run of plain steps, a target pass each
        while True:
            # Emit what the last step verified, one token at a time so stops land exactly.
            step_ids: list[int] = []
            cut_at_stop_string = False
            for used, tok in enumerate(pending, 1):
                if tok in eos_ids:
                    finish = "stop"
                    break
                step_ids.append(tok)
                new_ids.append(tok)
                tokens.append(tok)
                decoder.add([tok])
                if stops:
                    cut = _find_stop(decoder.text, stops, len(emitted_text))
                    if cut is not None:
                        decoder.text = decoder.text[:cut]
                        finish, cut_at_stop_string = "stop", True
                        if from_run:  # the run's steps past the stop string made no token of the output
                            stats.target_forward_passes -= len(pending) - used
                        break
                if len(new_ids) >= max_new:
                    finish = "length"
                    break
            if finish is not None and not cut_at_stop_string:
                decoder.flush()  # a trailing partial character
            delta = decoder.text[len(emitted_text):]
            emitted_text = decoder.text
            if finish is not None:
                break
            if step_ids or delta:
                yield StreamChunk(delta, step_ids)

            # Draft, then verify the last token plus the drafts in one target pass.
            remaining = max_new - len(new_ids)
            k = min(policy.choose(), remaining - 1, capacity - cache.length - 2)
            if k == 0 and plain_run is not None:  # greedy plain steps: a run of them in one call, then emit them
                t = time.perf_counter()
                run = model.decode_greedy(tokens[-1], cache, min(plain_run, policy.plain_steps(), remaining), run_stops,
                                          hidden=drafter.needs_hidden)
                if run is not None:
                    run, last_hidden = run if drafter.needs_hidden else (run, None)
                    seconds = time.perf_counter() - t
                    stats.verify_seconds += seconds
                    stats.target_forward_passes += len(run)
                    policy.update_plain(len(run), seconds)
                    pending, plain_run, from_run = run, min(2 * plain_run, PLAIN_RUN), True
                    continue
                plain_run = None  # no such call for this model or cache: a pass at a time
            draft_tokens, draft_probs, draft_seconds = [], None, 0.0
            if k > 0:
                t = time.perf_counter()
                draft = drafter.propose(DraftContext(tokens, model, cache, last_hidden, params, generator), k)
                draft_tokens = draft.tokens[:k]
                draft_probs = draft.probs[: len(draft_tokens)] if draft.probs is not None else None
                draft_seconds = time.perf_counter() - t
                stats.draft_seconds += draft_seconds
            t = time.perf_counter()
            hidden, logits, best = _forward_logits(model, [tokens[-1]] + draft_tokens, cache, not params.greedy,
                                                   drafter.needs_hidden)
            n_accepted, next_token = verify(logits, draft_tokens, draft_probs, params, generator, greedy=best)
            cache.rollback(cache.length - (len(draft_tokens) - n_accepted))
            last_hidden = hidden[n_accepted] if hidden is not None else None
            verify_seconds = time.perf_counter() - t
            stats.verify_seconds += verify_seconds
            stats.target_forward_passes += 1
            stats.drafted_tokens += len(draft_tokens)
            stats.accepted_tokens += n_accepted
            if draft_tokens:
                drafter.observe(n_accepted)
            policy.update(len(draft_tokens), n_accepted, draft_seconds, verify_seconds)
            pending, from_run = draft_tokens[:n_accepted] + [next_token], False

        stats.decode_seconds = time.perf_counter() - t_decode
        stats.new_tokens = len(new_ids)
        stats.acceptance_rate = stats.accepted_tokens / stats.drafted_tokens if stats.drafted_tokens else 0.0
        # The first token comes from the prefill; every later one from a decode pass.
        decode_tokens = max(len(new_ids) - 1, 0)
        stats.mean_accepted_length = decode_tokens / stats.target_forward_passes if stats.target_forward_passes else 1.0
        stats.tokens_per_second = stats.new_tokens / stats.decode_seconds if stats.decode_seconds > 0 else 0.0
        result = GenerationResult(emitted_text, new_ids, finish, stats, prompt_ids)
        yield StreamChunk(delta, step_ids, result)


def _forward_logits(model, input_ids: list[int], cache, need_logits: bool, need_hidden: bool):
    """(hidden, logits, greedy tokens or None) of a target pass: in one call where the model has one (Gemma 3 on
    the CPU embeds the ids and computes the LM head and its argmax inside its C block stack; without need_logits
    it may return None for the logits with the greedy tokens, without need_hidden None for the hidden states)."""
    fused = getattr(model, "forward_logits", None)
    if fused is not None:
        return fused(input_ids, cache, logits=need_logits, hidden=need_hidden)
    hidden = model(torch.tensor(input_ids, device=cache.device), cache)
    return hidden, model.logits(hidden), None


def _find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Index where the earliest stop string starts, searching only text that could contain a new match."""
    best = None
    for s in stops:
        i = text.find(s, max(0, emitted - len(s)))
        if i != -1 and (best is None or i < best):
            best = i
    return best
