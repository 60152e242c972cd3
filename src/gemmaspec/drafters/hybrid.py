"""`--drafter auto` with an MTP assistant: MTP drafts, except when prompt lookup finds a continuation that
is likely to be accepted further than the MTP proposal would be (copying from the prompt, repeated code)."""

from __future__ import annotations

from .base import Draft, DraftContext, Drafter
from .ngram import NgramDrafter


class HybridDrafter(Drafter):
    def __init__(self, mtp: Drafter, ngram: NgramDrafter | None = None, smoothing: float = 0.2):
        self.mtp = mtp
        self.ngram = ngram or NgramDrafter()
        self.name = f"auto({mtp.name}+ngram)"
        self.max_tokens = max(mtp.max_tokens, self.ngram.max_tokens)
        self.smoothing = smoothing
        self.reset_estimates()

    def reset_estimates(self) -> None:
        self.mtp_accepted = 1.0  # running mean of drafts accepted per MTP round
        self.ngram_rate = 0.6  # running fraction of an n-gram proposal that is accepted
        self.last: tuple[str, int] | None = None

    def reset(self, prompt_ids, params, max_len) -> None:
        self.mtp.reset(prompt_ids, params, max_len)
        self.ngram.reset(prompt_ids, params, max_len)
        self.reset_estimates()

    def propose(self, context: DraftContext, k: int) -> Draft:
        lookup = self.ngram.propose(context, k)
        if lookup.tokens and len(lookup.tokens) * self.ngram_rate > self.mtp_accepted:
            self.last = ("ngram", len(lookup.tokens))
            return lookup
        draft = self.mtp.propose(context, min(k, self.mtp.max_tokens))
        self.last = ("mtp", len(draft.tokens))
        return draft

    def observe(self, accepted: int) -> None:
        if self.last is None:
            return
        source, proposed = self.last
        a = self.smoothing
        if source == "ngram":
            self.ngram_rate += a * (accepted / max(proposed, 1) - self.ngram_rate)
            self.ngram.observe(accepted)
        else:
            self.mtp_accepted += a * (accepted - self.mtp_accepted)
            self.mtp.observe(accepted)
        self.last = None
