"""A separate small Gemma model as drafter: its own KV cache, rolled back in step with the target."""

from __future__ import annotations

import torch

from ..errors import GemmaspecError
from ..sampling import SamplingParams, greedy_tokens, probabilities, sample
from .base import Draft, DraftContext, Drafter


class DraftModelDrafter(Drafter):
    max_tokens = 16

    def __init__(self, loaded, target_tokenizer, name: str):
        self.model = loaded.model
        self.name = name
        check_same_vocabulary(loaded.tokenizer, target_tokenizer, what="draft model")
        self.cache = None
        self.cached: list[int] = []
        self.params = SamplingParams()

    def reset(self, prompt_ids: list[int], params: SamplingParams, max_len: int) -> None:
        self.cache = self.model.new_cache(max_len + self.max_tokens + 2, spec_margin=max(64, self.max_tokens + 2))
        self.cached = []
        self.params = params

    @torch.inference_mode()
    def propose(self, context: DraftContext, k: int) -> Draft:
        tokens = context.tokens
        keep = _common_prefix(self.cached, tokens, limit=len(tokens) - 1)
        self.cache.rollback(keep)
        del self.cached[keep:]
        feed = tokens[keep:]
        out: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(k):
            hidden = self.model(torch.tensor(feed, device=self.cache.device), self.cache)
            self.cached.extend(feed)
            logits = self.model.logits(hidden[-1:])
            if self.params.greedy:
                token = greedy_tokens(logits)[0]
            else:
                q = probabilities(logits, self.params)[0]
                token = sample(q, context.generator)
                rows.append(q)
            out.append(token)
            feed = [token]
        return Draft(out, torch.stack(rows) if rows else None)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def check_same_vocabulary(drafter_tok, target_tok, what: str) -> None:
    if drafter_tok.vocab_size != target_tok.vocab_size or drafter_tok.fast.get_vocab() != target_tok.fast.get_vocab():
        raise GemmaspecError(
            f"{what} does not share the target's tokenizer "
            f"({drafter_tok.vocab_size} vs {target_tok.vocab_size} tokens); speculation needs the same vocabulary"
        )
