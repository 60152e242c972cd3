"""The drafter protocol. The engine calls every drafter the same way and never asks what kind it is."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams


@dataclass
class DraftContext:
    """What a drafter may read when proposing; the engine fills it identically for every drafter.

    tokens: prompt + emitted tokens; the last one is not yet in the target cache.
    target / cache: the target model and its KV cache (read-only for drafters), valid up to cache.length.
    hidden: the target's final hidden state [hidden] at the position that produced tokens[-1] (None after a
    decode step where the drafter does not declare needs_hidden).
    """

    tokens: list[int]
    target: torch.nn.Module
    cache: object
    hidden: torch.Tensor | None
    params: SamplingParams
    generator: torch.Generator | None = None


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), vocab] after the request's sampling processing
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class Drafter:
    """Base class: proposes nothing (plain decoding)."""

    name = "none"
    max_tokens = 0  # most tokens this drafter can propose in one round (0 = never drafts)
    needs_hidden = False  # whether propose() reads the target's hidden state (DraftContext.hidden; else None)

    def reset(self, prompt_ids: list[int], params: SamplingParams, max_len: int) -> None:
        """A new request starts with these prompt tokens."""

    def propose(self, context: DraftContext, k: int) -> Draft:
        return Draft([])

    def observe(self, accepted: int) -> None:
        """How many of the last proposal's tokens the target kept."""
