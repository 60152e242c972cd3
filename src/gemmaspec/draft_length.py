"""How many tokens to draft at each step: a fixed K, or `auto`."""

from __future__ import annotations

from .errors import GemmaspecError

MAX_DRAFT_TOKENS = 32
DEFAULT_DRAFT_TOKENS = 4


class DraftLengthPolicy:
    def __init__(self, k: int):
        self.k = k
        self.max_tokens = k

    def choose(self) -> int:
        return self.k

    def update(self, drafted: int, accepted: int, seconds: float) -> None:
        pass


def parse_draft_tokens(value: int | str) -> int | str:
    if value == "auto" or value is None:
        return "auto"
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise GemmaspecError(f"--draft-tokens must be an integer or 'auto', got '{value}'") from None
    if not 0 <= k <= MAX_DRAFT_TOKENS:
        raise GemmaspecError(f"--draft-tokens must be between 0 and {MAX_DRAFT_TOKENS}, got {k}")
    return k


def make_policy(drafter, draft_tokens: int | str) -> DraftLengthPolicy:
    value = parse_draft_tokens(draft_tokens)
    if drafter.max_tokens == 0:
        return DraftLengthPolicy(0)
    if value == "auto":
        return DraftLengthPolicy(min(DEFAULT_DRAFT_TOKENS, drafter.max_tokens))
    return DraftLengthPolicy(min(value, drafter.max_tokens))
