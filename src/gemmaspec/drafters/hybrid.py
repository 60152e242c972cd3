"""`--drafter auto` with an MTP assistant: MTP drafts, except when prompt lookup finds a continuation that
is likely to pay more than the MTP proposal would (copying from the prompt, repeated code).

With `--draft-tokens auto` each source has its own adaptive length (draft_length.PerSourceDraftLength): at every
step the source with the higher expected tokens per second drafts, as many tokens as its own record says,
so a weak MTP record neither shortens prompt-lookup drafts nor stops them. With a fixed length, a running
estimate of accepted tokens per round decides."""

from __future__ import annotations

from .base import Draft, DraftContext, Drafter
from .ngram import NgramDrafter


class HybridDrafter(Drafter):
    sources = ["ngram", "mtp"]

    def __init__(self, mtp: Drafter, ngram: NgramDrafter | None = None, smoothing: float = 0.2):
        self.mtp = mtp
        self.ngram = ngram or NgramDrafter()
        self.name = f"auto({mtp.name}+ngram)"
        self.max_tokens = max(mtp.max_tokens, self.ngram.max_tokens)
        self.needs_hidden = mtp.needs_hidden or self.ngram.needs_hidden
        self.smoothing = smoothing
        self.lengths = None  # draft_length.PerSourceDraftLength under --draft-tokens auto
        self.reset_estimates()

    def bind_lengths(self, lengths) -> None:
        self.lengths = lengths

    def reset_estimates(self) -> None:
        self.mtp_accepted = 1.0  # running mean of drafts accepted per MTP round
        self.ngram_rate = 0.6  # running fraction of an n-gram proposal that is accepted
        self.last: tuple[str, int] | None = None
        self.tie_turn = False

    def reset(self, prompt_ids, params, max_len) -> None:
        self.mtp.reset(prompt_ids, params, max_len)
        self.ngram.reset(prompt_ids, params, max_len)
        self.reset_estimates()

    def propose(self, context: DraftContext, k: int) -> Draft:
        lookup = self.ngram.propose(context, k)
        mtp_k = min(k, self.mtp.max_tokens)
        if self.lengths is not None:
            found = len(lookup.tokens)
            if found and self._lookup_first(found, mtp_k):
                n = self.lengths.choose_for("ngram", found)
                self.last = ("ngram", n)
                return Draft(lookup.tokens[:n], None if lookup.probs is None else lookup.probs[:n])
            mtp_k = self.lengths.choose_for("mtp", mtp_k)
        elif lookup.tokens and len(lookup.tokens) * self.ngram_rate > self.mtp_accepted:
            self.last = ("ngram", len(lookup.tokens))
            return lookup
        draft = self.mtp.propose(context, mtp_k) if mtp_k else Draft([])
        self.last = ("mtp", len(draft.tokens))
        return draft

    def _lookup_first(self, found: int, mtp_k: int) -> bool:
        """Whether prompt lookup drafts this step: the higher expected rate wins; on a tie (typically neither
        pays: both rates are plain decoding's) the sources take turns, so each keeps probing and neither is
        locked out by one bad stretch."""
        ngram, mtp = self.lengths.rate("ngram", found), self.lengths.rate("mtp", mtp_k)
        if ngram != mtp:
            return ngram > mtp
        self.tie_turn = not self.tie_turn
        return self.tie_turn

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
