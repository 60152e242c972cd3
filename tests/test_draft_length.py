"""The adaptive draft-length controller on synthetic timings and acceptance."""

import random

from gemmaspec.draft_length import (AdaptiveDraftLength, DraftLengthPolicy, PerSourceDraftLength, VerifyCostModel,
                                    make_policy)
from gemmaspec.drafters import Drafter, NgramDrafter
from gemmaspec.drafters.base import Draft
from gemmaspec.drafters.hybrid import HybridDrafter


def _run(policy, steps, accept_prob, verify_time, draft_time_per_token=0.0, seed=0):
    """Drive the controller like the engine does; returns the k chosen at each step."""
    rng = random.Random(seed)
    chosen = []
    for _ in range(steps):
        k = policy.choose()
        chosen.append(k)
        accepted = 0
        while accepted < k and rng.random() < accept_prob:
            accepted += 1
        policy.update(k, accepted, k * draft_time_per_token, verify_time(k + 1))
    return chosen


def linear_cost(base=0.010, per_token=0.002):
    return lambda n_tokens: base + per_token * n_tokens


def test_drafts_always_fail_gives_plain_decoding():
    policy = AdaptiveDraftLength(8, VerifyCostModel())
    chosen = _run(policy, 200, accept_prob=0.0, verify_time=linear_cost())
    tail = chosen[-100:]
    assert tail.count(0) >= 90  # plain decoding, with rare cheap probes (k = 1)
    assert max(tail) <= 1


def test_plain_runs_end_where_the_controller_would_probe():
    """After a plain choice the engine may take plain_steps() plain steps in one call (update_plain): the
    controller then probes on the step it would have probed on had it chosen each of them."""
    by_step, by_run = AdaptiveDraftLength(8, VerifyCostModel()), AdaptiveDraftLength(8, VerifyCostModel())
    one_by_one = _run(by_step, 120, accept_prob=0.0, verify_time=linear_cost())
    in_runs = []
    while len(in_runs) < 120:
        k = by_run.choose()
        if k:
            in_runs.append(k)
            by_run.update(k, 0, 0.0, linear_cost()(k + 1))
            continue
        n = by_run.plain_steps()
        assert n >= 1
        in_runs += [0] * n
        by_run.update_plain(n, n * linear_cost()(1))
    assert in_runs[:120] == one_by_one
    assert max(len(r) for r in "".join(map(str, in_runs)).split("1")) >= 8  # the back-off gives long plain runs
    assert DraftLengthPolicy(0).plain_steps() >= 1 << 20  # a fixed length of 0: plain from start to end


def test_a_run_of_plain_steps_weighs_in_the_cost_model_as_its_steps():
    """update_plain's run of s steps moves the plain-step cost estimate as s observations would, not as one."""
    one_by_one, in_one = VerifyCostModel(), VerifyCostModel()
    for model in (one_by_one, in_one):
        model.observe(1, 0.010)
    for _ in range(6):
        one_by_one.observe(1, 0.004)
    in_one.observe(1, 0.004, count=6)
    assert abs(in_one.estimate(1) - one_by_one.estimate(1)) < 1e-12
    assert in_one.estimate(1) < 0.006  # 0.00557 (a single observation would have left it at 0.0088)
    policy = AdaptiveDraftLength(8, VerifyCostModel())
    policy.update(0, 0, 0.0, 0.010)
    policy.update_plain(6, 6 * 0.004)
    assert abs(policy.costs.estimate(1) - one_by_one.estimate(1)) < 1e-12


def test_drafts_always_pass_gives_long_drafts():
    policy = AdaptiveDraftLength(8, VerifyCostModel())
    chosen = _run(policy, 100, accept_prob=1.0, verify_time=linear_cost())
    assert all(k == 8 for k in chosen[-50:])


def test_expensive_verification_limits_draft_length():
    # Verifying costs 40% more per extra token: only short drafts pay at 60% acceptance.
    policy = AdaptiveDraftLength(8, VerifyCostModel())
    chosen = _run(policy, 300, accept_prob=0.6, verify_time=linear_cost(0.010, 0.004))
    assert 1 <= sorted(chosen[-100:])[50] <= 2


def test_recovers_when_acceptance_comes_back():
    costs = VerifyCostModel()
    policy = AdaptiveDraftLength(8, costs)
    _run(policy, 200, accept_prob=0.0, verify_time=linear_cost())
    chosen = _run(policy, 200, accept_prob=0.95, verify_time=linear_cost(), seed=1)
    assert sorted(chosen[-50:])[25] >= 6


def test_slow_drafter_is_not_used():
    # A drafter costing as much per token as a whole target pass never pays at 50% acceptance.
    policy = AdaptiveDraftLength(8, VerifyCostModel())
    chosen = _run(policy, 200, accept_prob=0.5, verify_time=linear_cost(), draft_time_per_token=0.012)
    assert chosen[-100:].count(0) >= 90


def test_cost_model_interpolates_and_extrapolates():
    costs = VerifyCostModel()
    assert costs.estimate(3) is None
    costs.observe(1, 0.010)
    costs.observe(5, 0.020)
    assert abs(costs.estimate(3) - 0.015) < 1e-12
    assert costs.estimate(9) > 0.020


def test_make_policy():
    assert make_policy(Drafter(), "auto").choose() == 0
    assert isinstance(make_policy(NgramDrafter(), "auto", VerifyCostModel()), AdaptiveDraftLength)
    fixed = make_policy(NgramDrafter(), 6)
    assert isinstance(fixed, DraftLengthPolicy) and fixed.choose() == 6


class _Source(Drafter):
    """A synthetic draft source whose proposals are accepted with probability `accept`."""

    def __init__(self, name, accept, max_tokens=8):
        self.name, self.accept, self.max_tokens = name, accept, max_tokens
        self.proposed = []

        self.found = max_tokens

    def propose(self, context, k):
        self.proposed.append(k)
        return Draft(list(range(min(k, self.found))))


def _simulate(hybrid, policy, steps, acceptance_at, rng) -> list[tuple[str | None, int]]:
    """Run the hybrid under its policy for `steps` steps; acceptance_at(step) gives each source's per-token
    acceptance probability. Costs: a target pass of k + 1 tokens 10 + (k + 1) ms, an MTP token 0.2 ms.
    Returns (source, draft length) per step."""
    used = []
    for step in range(steps):
        accept = acceptance_at(step)
        k = policy.choose()
        draft = hybrid.propose(None, k) if k else Draft([])
        source = hybrid.last[0] if draft.tokens else None
        accepted = 0
        while accepted < len(draft.tokens) and rng.random() < accept.get(source, 0.0):
            accepted += 1
        if draft.tokens:
            hybrid.observe(accepted)
        policy.update(len(draft.tokens), accepted, 0.0002 * len(draft.tokens) if source == "mtp" else 0.0,
                      0.010 + 0.001 * (len(draft.tokens) + 1))
        used.append((source, len(draft.tokens)))
    return used


def test_per_source_lengths_let_a_good_source_draft_long_while_the_other_is_weak():
    """Prompt lookup copying perfectly next to an MTP drafter that is always wrong: under one shared record the
    failures of MTP would shorten (and stop) the lookup's drafts; per source, lookup drafts its full match."""
    lookup, mtp = _Source("ngram", 1.0), _Source("mtp", 0.0)
    hybrid = HybridDrafter(mtp, lookup)
    policy = make_policy(hybrid, "auto", VerifyCostModel())
    assert isinstance(policy, PerSourceDraftLength) and hybrid.lengths is policy

    def each_step(step):
        lookup.found = 8 if step % 2 else 0  # a match every other step
        return {"ngram": 1.0, "mtp": 0.0}

    tail = _simulate(hybrid, policy, 300, each_step, random.Random(0))[-100:]
    assert sum(1 for s, n in tail if s == "ngram" and n == 8) >= 45  # every match drafted in full
    assert sum(1 for s, n in tail if s == "mtp") <= 10  # MTP only probes now and then
    # a fixed length goes back to the running-estimate rule
    assert not isinstance(make_policy(hybrid, 4, VerifyCostModel()), PerSourceDraftLength) and hybrid.lengths is None


def test_a_source_that_failed_for_a_while_is_not_locked_out():
    """Both sources fail for a stretch (neither pays: a tie at plain decoding's rate); then MTP becomes good
    while the lookup still finds (wrong) matches at every step. MTP must keep probing and take over."""
    lookup, mtp = _Source("ngram", 0.0), _Source("mtp", 0.0)
    hybrid = HybridDrafter(mtp, lookup)
    policy = make_policy(hybrid, "auto", VerifyCostModel())
    tail = _simulate(hybrid, policy, 500, lambda step: {"ngram": 0.0, "mtp": 0.0 if step < 150 else 0.95},
                     random.Random(1))[-100:]
    assert sum(1 for s, n in tail if s == "mtp" and n >= 4) >= 80
