"""How many tokens to draft at each step: a fixed K, or `auto`, an online cost model that never loses.

`auto` picks, before every step, the k in [0, K] that maximises expected new tokens per second:

    E(k)    = 1 + sum_{j<=k} prod_{i<=j} a_i          (a_i: running acceptance of draft position i,
                                                       given the drafts before it were accepted)
    cost(k) = verify(k + 1) + k * draft_per_token + draft_overhead   (k > 0)
    k*      = argmax E(k) / cost(k)

verify(T) is the measured time of one target pass over T tokens. It is a property of the model and the
machine, so it lives in a `VerifyCostModel` kept by the engine across requests; acceptance is per request.
k = 0 is plain decoding. When k = 0 wins, a cheap probe (k = 1) runs now and then, with exponential
back-off, so speculation resumes when acceptance comes back.
"""

from __future__ import annotations

from .errors import GemmaspecError

MAX_DRAFT_TOKENS = 32
AUTO_MAX_TOKENS = 8  # longest draft `auto` considers
FIXED_AUTO_FALLBACK = 4


class DraftLengthPolicy:
    """A fixed draft length."""

    def __init__(self, k: int):
        self.k = k
        self.max_tokens = k

    def choose(self) -> int:
        return self.k

    def update(self, drafted: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        pass

    def plain_steps(self) -> int:
        """After choose() gave 0: how many plain steps may go in a row before the policy is asked again (the
        engine may take them in one call)."""
        return 1 << 30

    def update_plain(self, steps: int, seconds: float) -> None:
        """A run of `steps` plain steps (at most plain_steps()) took `seconds`."""
        self.update(0, 0, 0.0, seconds / steps)


class VerifyCostModel:
    """Seconds of one target pass over T tokens, learned online as an exponential moving average."""

    def __init__(self, smoothing: float = 0.2):
        self.smoothing = smoothing
        self.seconds: dict[int, float] = {}

    def observe(self, n_tokens: int, seconds: float, count: int = 1) -> None:
        """`count` passes that took `seconds` each (a run of plain steps: one observation per step)."""
        old = self.seconds.get(n_tokens)
        self.seconds[n_tokens] = seconds if old is None else seconds + (1 - self.smoothing) ** count * (old - seconds)

    def estimate(self, n_tokens: int) -> float | None:
        if n_tokens in self.seconds:
            return self.seconds[n_tokens]
        if not self.seconds:
            return None
        known = sorted(self.seconds)
        lower = [t for t in known if t < n_tokens]
        upper = [t for t in known if t > n_tokens]
        if lower and upper:  # interpolate between the nearest measurements
            lo, hi = lower[-1], upper[0]
            w = (n_tokens - lo) / (hi - lo)
            return self.seconds[lo] * (1 - w) + self.seconds[hi] * w
        # Extrapolate optimistically (+3% per token beyond the nearest measurement): the controller then
        # tries that length once and learns its true cost.
        nearest = lower[-1] if lower else upper[0]
        return self.seconds[nearest] * max(0.5, 1 + 0.03 * (n_tokens - nearest))


class AdaptiveDraftLength(DraftLengthPolicy):
    def __init__(self, max_tokens: int, costs: VerifyCostModel, prior_acceptance: float = 0.5,
                 prior_weight: float = 2.0, decay: float = 0.95):
        self.max_tokens = max_tokens
        self.costs = costs
        self.prior_acceptance, self.prior_weight, self.decay = prior_acceptance, prior_weight, decay
        self.tried = [0.0] * max_tokens  # decayed counts per draft position
        self.accepted = [0.0] * max_tokens
        self.draft_per_token: float | None = None
        self.zero_streak = 0
        self.probe_every = 4
        self.probing = False
        self._plain_steps = 1  # plain_steps() after the last choose()

    def acceptance(self) -> list[float]:
        """Acceptance per draft position; each position's prior is the estimate of the one before it."""
        out, prior = [], self.prior_acceptance
        for a, t in zip(self.accepted, self.tried):
            prior = (a + self.prior_weight * prior) / (t + self.prior_weight)
            out.append(prior)
        return out

    def expected_tokens(self, k: int) -> float:
        total, run = 1.0, 1.0
        for a in self.acceptance()[:k]:
            run *= a
            total += run
        return total

    def step_cost(self, k: int) -> float | None:
        verify = self.costs.estimate(k + 1)
        if verify is None:
            return None
        return verify + (k * self.draft_per_token if k and self.draft_per_token else 0.0)

    def best(self, limit: int | None = None) -> tuple[int, float]:
        """The k <= limit (default max_tokens) with the most expected tokens per second, and that rate
        (0.0 while no cost is known)."""
        limit = self.max_tokens if limit is None else min(limit, self.max_tokens)
        best_k, best_rate = 0, 0.0
        for k in range(limit + 1):
            cost = self.step_cost(k)
            rate = self.expected_tokens(k) / cost if cost and cost > 0 else 0.0
            if rate > best_rate * 1.0001:
                best_k, best_rate = k, rate
        return best_k, best_rate

    def choose(self, limit: int | None = None) -> int:
        self.probing = False
        self._plain_steps = 1
        limit = self.max_tokens if limit is None else min(limit, self.max_tokens)
        if not self.costs.seconds:  # nothing measured yet: start with a modest draft
            return min(2, limit)
        if 1 not in self.costs.seconds:  # measure plain decoding once: the baseline every draft must beat
            return 0
        best_k, _ = self.best(limit)
        if best_k == 0 and limit:
            self.zero_streak += 1
            if self.zero_streak >= self.probe_every:
                self.zero_streak = 0
                self.probing = True
                return 1
            self._plain_steps = self.probe_every - self.zero_streak  # the plain steps until the next probe
        else:
            self.zero_streak = 0
        return best_k

    def plain_steps(self) -> int:
        return self._plain_steps

    def update_plain(self, steps: int, seconds: float) -> None:
        self.zero_streak += steps - 1  # (as if choose() had given 0 for each)
        self.costs.observe(1, seconds / steps, count=steps)

    def update(self, drafted: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        self.costs.observe(drafted + 1, verify_seconds)
        if not drafted:
            return
        per_token = draft_seconds / drafted
        self.draft_per_token = per_token if self.draft_per_token is None else 0.8 * self.draft_per_token + 0.2 * per_token
        # Position i was "reached" if drafts 0..i-1 were accepted; it counts as tried only then.
        reached = min(accepted + 1, drafted)
        for i in range(self.max_tokens):
            self.tried[i] *= self.decay
            self.accepted[i] *= self.decay
        for i in range(reached):
            self.tried[i] += 1
            self.accepted[i] += 1 if i < accepted else 0
        if self.probing:  # a probe that paid off resets the back-off; one that failed doubles it
            self.probe_every = 4 if accepted else min(self.probe_every * 2, 64)


class PerSourceDraftLength(DraftLengthPolicy):
    """`auto` for a drafter that drafts from several sources (drafters/hybrid.py: prompt lookup or the MTP
    assistant): one adaptive length per source, all sharing the verify cost model. A source that copies well
    must not be held to the short drafts that a weak one earns, nor pay for its drafting cost. The engine sees
    only the upper bound; the drafter picks the source with the best expected rate and asks for its length."""

    def __init__(self, sources: list[str], max_tokens: int, costs: VerifyCostModel):
        self.max_tokens = max_tokens
        self.by_source = {name: AdaptiveDraftLength(max_tokens, costs) for name in sources}
        self.current = sources[0]

    def choose(self) -> int:
        return self.max_tokens

    def rate(self, source: str, limit: int) -> float:
        """Expected new tokens per second of drafting from `source` (at most `limit` tokens); 0.0 if unknown."""
        return self.by_source[source].best(limit)[1]

    def choose_for(self, source: str, limit: int) -> int:
        self.current = source
        return self.by_source[source].choose(limit)

    def update(self, drafted: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        self.by_source[self.current].update(drafted, accepted, draft_seconds, verify_seconds)


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


def make_policy(drafter, draft_tokens: int | str, costs: VerifyCostModel | None = None) -> DraftLengthPolicy:
    value = parse_draft_tokens(draft_tokens)
    sources = getattr(drafter, "sources", None)  # a drafter with several sources picks per source (see above)
    if sources:
        drafter.bind_lengths(None)
    if drafter.max_tokens == 0:
        return DraftLengthPolicy(0)
    if value == "auto":
        max_k = min(AUTO_MAX_TOKENS, drafter.max_tokens)
        if costs is None:
            return DraftLengthPolicy(min(FIXED_AUTO_FALLBACK, max_k))
        if sources:
            policy = PerSourceDraftLength(sources, max_k, costs)
            drafter.bind_lengths(policy)
            return policy
        return AdaptiveDraftLength(max_k, costs)
    return DraftLengthPolicy(min(value, drafter.max_tokens))
