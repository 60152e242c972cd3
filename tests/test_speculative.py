"""Lossless speculation on tiny random models: greedy equality, cache equality after rejection, and the
sampling distribution (chi-square against the target's exact probabilities)."""

from __future__ import annotations

import math

import pytest
import torch

from gemmaspec.drafters import Draft, Drafter, make_drafter
from gemmaspec.engine import Engine
from gemmaspec.loading import load_model
from gemmaspec.sampling import SamplingParams, probabilities

PROMPTS = [
    [2, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11],  # repetitive: prompt lookup drafts often
    [2, 50, 7, 33, 90, 61, 5],  # little to copy: drafts mostly wrong
    [2] + list(range(20, 60)),  # longer than the sliding window (8): ring buffer wraps
]


@pytest.fixture(scope="module")
def tiny_target(tiny_gemma3_dir):
    return load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu")


def _engine(target, drafter_spec, k):
    engine = Engine(target, make_drafter(drafter_spec, target), k)
    engine.eos_ids = set()  # random weights: keep going so every run compares the full length
    return engine


@pytest.mark.parametrize("drafter", ["ngram", "draft"])
@pytest.mark.parametrize("k", [1, 2, 4, 8, "auto"])
def test_greedy_equals_plain_decoding(tiny_target, tiny_gemma3_draft_dir, drafter, k):
    spec = f"draft:{tiny_gemma3_draft_dir}" if drafter == "draft" else drafter
    plain = _engine(tiny_target, "none", 0)
    spec_engine = _engine(tiny_target, spec, k)
    drafted = 0
    for prompt in PROMPTS:
        want = plain.generate(prompt, max_new_tokens=40).token_ids
        got = spec_engine.generate(prompt, max_new_tokens=40)
        assert got.token_ids == want
        assert got.stats.new_tokens == 40
        drafted += got.stats.drafted_tokens
        assert got.stats.target_forward_passes <= 39
    assert drafted > 0 or k == "auto"  # auto may rightly decide that drafting does not pay


class WrongDrafter(Drafter):
    """Always proposes tokens the target would not pick: every draft is rejected."""

    name = "wrong"
    max_tokens = 8

    def propose(self, context, k):
        return Draft([3] * k)


def test_cache_after_rejected_draft_equals_plain_cache(tiny_target):
    model = tiny_target.model
    tokens = torch.tensor(PROMPTS[2])
    with torch.inference_mode():
        plain = model.new_cache(64, spec_margin=16)
        model(tokens, plain)
        spec = model.new_cache(64, spec_margin=16)
        model(tokens[:20], spec)
        for pos in range(20, len(tokens)):
            model(torch.cat([tokens[pos : pos + 1], torch.tensor([3, 3, 3, 3, 3])]), spec)
            spec.rollback(pos + 1)  # keep the real token, drop five rejected drafts
    assert spec.length == plain.length
    for layer, s in enumerate(model.cache_specs()):
        pk, pv, ppos = plain.layer_kv(layer)
        sk, sv, spos = spec.layer_kv(layer)
        if s.window is None:
            assert torch.equal(ppos, spos)
            assert (pk - sk).abs().max() < 1e-5 and (pv - sv).abs().max() < 1e-5
        else:  # compare slot by slot for every position still in the window
            for p in range(plain.length - s.window, plain.length):
                a, b = (ppos == p).nonzero().item(), (spos == p).nonzero().item()
                assert (pk[:, a] - sk[:, b]).abs().max() < 1e-5
                assert (pv[:, a] - sv[:, b]).abs().max() < 1e-5


def test_always_rejected_drafts_still_lossless(tiny_target):
    plain = _engine(tiny_target, "none", 0)
    engine = Engine(tiny_target, WrongDrafter(), 4)
    engine.eos_ids = set()
    for prompt in PROMPTS:
        result = engine.generate(prompt, max_new_tokens=20)
        assert result.token_ids == plain.generate(prompt, max_new_tokens=20).token_ids
        assert result.stats.accepted_tokens <= result.stats.drafted_tokens


def test_max_new_tokens_and_stop_inside_accepted_run(tiny_target):
    engine = _engine(tiny_target, "ngram", 8)
    plain = _engine(tiny_target, "none", 0)
    full = plain.generate(PROMPTS[0], max_new_tokens=30)
    for n in (1, 2, 7, 13):
        assert engine.generate(PROMPTS[0], max_new_tokens=n).token_ids == full.token_ids[:n]
    # An EOS id inside a drafted run ends generation exactly there.
    stop_token = full.token_ids[10]
    engine.eos_ids = {stop_token}
    result = engine.generate(PROMPTS[0], max_new_tokens=30)
    first = full.token_ids.index(stop_token)
    assert result.token_ids == full.token_ids[:first]
    assert result.finish_reason == "stop"
    # A stop string cuts the text exactly before it.
    engine.eos_ids = set()
    text = full.text
    stop = text.split()[12]
    result = engine.generate(PROMPTS[0], max_new_tokens=30, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == text[: text.index(stop)]
    # Plain decoding takes its steps in runs (1, 2, 4, then 8) and cuts a run at a stop string that ends on the
    # 13th token; the run's steps past it made no output token and are not counted as passes
    stop = " ".join(text.split()[:13])
    result = plain.generate(PROMPTS[0], max_new_tokens=30, stop=[stop])
    assert result.finish_reason == "stop" and result.text == text[: text.index(stop)]
    assert len(result.token_ids) == 13 and result.stats.target_forward_passes == 12
    assert result.stats.mean_accepted_length == 1.0


def test_plain_runs_compute_no_step_past_a_stop_string(tiny_target, monkeypatch):
    # A run of plain steps (1, 2, 4, then 8 in one C call) ends at any token after which the stop string may show
    # (tokenizer.ids_that_may_end), so the 13th token, which completes it, is the last step computed
    plain = _engine(tiny_target, "none", 0)
    full = plain.generate(PROMPTS[0], max_new_tokens=30)
    stop = " ".join(full.text.split()[:13])
    runs = []
    decode_greedy = tiny_target.model.decode_greedy

    def counted(*args, **kwargs):
        run = decode_greedy(*args, **kwargs)
        runs.append(len(run))
        return run
    monkeypatch.setattr(tiny_target.model, "decode_greedy", counted)
    result = plain.generate(PROMPTS[0], max_new_tokens=30, stop=[stop])
    assert result.finish_reason == "stop" and result.text == full.text[: full.text.index(stop)]
    assert sum(runs) == 12  # the steps after the prefill's token (runs that ignored the stop string: 15)
    # a stop string that never shows changes nothing
    assert plain.generate(PROMPTS[0], max_new_tokens=30, stop=["never"]).token_ids == full.token_ids


def test_streaming_emits_verified_tokens_in_order(tiny_target):
    engine = _engine(tiny_target, "ngram", 4)
    chunks = list(engine.stream(PROMPTS[0], max_new_tokens=25))
    ids = [t for c in chunks for t in c.token_ids]
    result = chunks[-1].result
    assert ids == result.token_ids
    assert "".join(c.text for c in chunks) == result.text
    assert len(chunks) > 2


# ---- sampling: the emitted distribution equals the target's ----------------------------------------

class SkewedDrafter(Drafter):
    """Samples drafts from a fixed, deliberately bad distribution q and reports it."""

    name = "skewed"
    max_tokens = 4

    def __init__(self, vocab: int, params: SamplingParams):
        q = torch.full((vocab,), 0.2 / vocab)
        q[5] += 0.5
        q[6] += 0.3
        self.q = q / q.sum()

    def propose(self, context, k):
        tokens = torch.multinomial(self.q, k, replacement=True, generator=context.generator).tolist()
        return Draft(tokens, self.q.expand(k, -1).clone())


def _next_token_probs(model, tokens, params):
    with torch.inference_mode():
        logits = model.logits(model(torch.tensor(tokens), model.new_cache(64)))[-1:]
    return probabilities(logits, params)[0]


def _exact_joint(model, prompt, params, vocab, depth):
    """Exact target probability of every continuation of `depth` tokens, shape [vocab] * depth."""
    joint = _next_token_probs(model, prompt, params)
    for _ in range(depth - 1):
        flat = joint.reshape(-1)
        nxt = torch.zeros(flat.numel(), vocab)
        for idx in range(flat.numel()):
            if flat[idx] > 1e-7:
                prefix = list(torch.unravel_index(torch.tensor(idx), joint.shape)) if joint.dim() > 1 else [idx]
                nxt[idx] = flat[idx] * _next_token_probs(model, prompt + [int(t) for t in prefix], params)
        joint = nxt.reshape(*joint.shape, vocab)
    return joint


def _chi_square_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square test, pooling cells with expected count < 5 into one."""
    n = observed.sum().item()
    expected = expected_probs * n
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if exp[-1] < 5:  # fold a tiny pooled cell into the smallest big one
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        obs[exp.argmin()] += observed[~big].sum()
        exp[exp.argmin()] += expected[~big].sum()
    stat = ((obs - exp) ** 2 / exp).sum().item()
    dof = len(obs) - 1
    # chi2.sf(stat, dof) = Q(dof / 2, stat / 2), the regularized upper incomplete gamma function
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


SAMPLING = {
    "temperature": SamplingParams(temperature=1.0),
    "top_k": SamplingParams(temperature=0.8, top_k=5),
    "top_p": SamplingParams(temperature=1.2, top_p=0.8),
}


@pytest.fixture(scope="module")
def small_vocab_target(tmp_path_factory):
    from tiny_models import save_tiny_model, tiny_gemma3_config

    folder = save_tiny_model(tmp_path_factory.mktemp("vocab12"), tiny_gemma3_config(vocab_size=12), seed=3,
                             embed_std=0.15)
    return load_model(str(folder), dtype="float32", device="cpu")


@pytest.mark.parametrize(
    "setting, drafter_kind",
    [("temperature", "skewed"), ("top_k", "skewed"), ("top_p", "skewed"), ("temperature", "ngram")],
)
def test_sampling_distribution_matches_target(small_vocab_target, setting, drafter_kind):
    params = SAMPLING[setting]
    vocab = 12
    model = small_vocab_target.model
    prompt = [2, 5, 6, 7, 5, 6, 7, 5, 6]
    drafter = SkewedDrafter(vocab, params) if drafter_kind == "skewed" else make_drafter("ngram", small_vocab_target)
    engine = Engine(small_vocab_target, drafter, 3)
    engine.eos_ids = set()
    joint = _exact_joint(model, prompt, params, vocab, depth=3)
    n = 1500
    counts = torch.zeros(vocab, vocab, vocab)
    accepted = 0
    for seed in range(n):
        # t1 comes from the prefill; t2..t4 from one verification of 3 drafts.
        r = engine.generate(prompt, max_new_tokens=4, temperature=params.temperature, top_k=params.top_k,
                            top_p=params.top_p, seed=seed)
        counts[tuple(r.token_ids[:3])] += 1
        accepted += r.stats.accepted_tokens
    assert 0 < accepted < 3 * n  # both acceptances and rejections happened
    assert _chi_square_pvalue(counts.sum((0, 2)), joint.sum((0, 2))) > 1e-3  # t2
    assert _chi_square_pvalue(counts.sum((0, 1)), joint.sum((0, 1))) > 1e-3  # t3
    assert _chi_square_pvalue(counts.sum(2).flatten(), joint.sum(2).flatten()) > 1e-3  # (t1, t2)


def test_seeded_sampling_is_reproducible(tiny_target):
    engine = _engine(tiny_target, "ngram", 4)
    a = engine.generate(PROMPTS[0], max_new_tokens=20, temperature=0.9, top_p=0.9, seed=123)
    b = engine.generate(PROMPTS[0], max_new_tokens=20, temperature=0.9, top_p=0.9, seed=123)
    assert a.token_ids == b.token_ids
