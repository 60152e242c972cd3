"""Prompt lookup: propose the continuation of the most recent earlier occurrence of the context's suffix."""

from __future__ import annotations

import numpy as np

from .base import Draft, DraftContext, Drafter


class NgramDrafter(Drafter):
    name = "ngram"
    max_tokens = 32

    def __init__(self, min_ngram: int = 1, max_ngram: int = 4):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram

    def propose(self, context: DraftContext, k: int) -> Draft:
        return Draft(find_continuation(context.tokens, k, self.min_ngram, self.max_ngram))


def find_continuation(tokens: list[int], k: int, min_ngram: int, max_ngram: int) -> list[int]:
    """Longest suffix n-gram (max..min) with an earlier match, most recent match first; its next k tokens."""
    if k <= 0 or len(tokens) < min_ngram + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    n_tokens = len(arr)
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        suffix = arr[-n:]
        # Candidate starts: positions i < n_tokens - n where arr[i:i+n] == suffix.
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return arr[start : start + k].tolist()
    return []
