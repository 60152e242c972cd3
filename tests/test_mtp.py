"""The MTP drafter (Gemma 4 assistant reading the target's KV cache).

- Oracle: with identical random weights and identical shared K/V, our assistant's logits and projected hidden
  states equal transformers' Gemma4AssistantForCausalLM over a chained draft (with and without the centroid head),
  our side reading the K/V from a wrapped, rolled-back sliding ring.
- Lossless: tiny random Gemma 4 and Gemma 3 targets with tiny random assistants give exactly the tokens of plain
  greedy decoding; the sampling distribution passes the chi-square test of test_speculative.
- Pairing: mismatched configs give clear errors; `mtp` finds `*-assistant` folders next to the model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4TextConfig  # noqa: E402

from gemmaspec.cache import AttentionView, CacheLayerSpec, KVCache  # noqa: E402
from gemmaspec.drafters import DraftContext, make_drafter  # noqa: E402
from gemmaspec.drafters.hybrid import HybridDrafter  # noqa: E402
from gemmaspec.drafters.mtp import MTPDrafter, check_pairing, find_paired_assistant, make_mtp_drafter  # noqa: E402
from gemmaspec.engine import Engine  # noqa: E402
from gemmaspec.errors import GemmaspecError  # noqa: E402
from gemmaspec.loading import load_model  # noqa: E402
from gemmaspec.models.assistant import AssistantConfig, AssistantModel, save_assistant  # noqa: E402
from gemmaspec.models.gemma4 import Gemma4Config  # noqa: E402
from gemmaspec.sampling import SamplingParams  # noqa: E402
from test_gemma4_model import randomize_  # noqa: E402
from test_speculative import SAMPLING, _chi_square_pvalue, _exact_joint, small_vocab_target  # noqa: E402,F401
from tiny_models import save_tiny_model  # noqa: E402

S, F = "sliding_attention", "full_attention"
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _reference_all_shared_kv():
    """transformers 5.23's Gemma4TextConfig.kv_sharing_modes raises when every layer is KV-shared (its 'store' layer
    search finds no producer), which is exactly the assistant's case; the assistant config's own comment says
    all layers reuse the shared K/V, so we give the reference that."""
    original = Gemma4TextConfig.kv_sharing_modes

    def modes(self):
        if self.num_kv_shared_layers and self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return original.fget(self)

    Gemma4TextConfig.kv_sharing_modes = property(modes)
    yield
    Gemma4TextConfig.kv_sharing_modes = original


def assistant_config(vocab: int, backbone: int, **overrides) -> dict:
    """An assistant config.json dict (HF layout)."""
    text = dict(
        model_type="gemma4_text", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, layer_types=[S, F],
        sliding_window=4, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, max_position_embeddings=256,
        rope_parameters={S: {"rope_type": "default", "rope_theta": 100.0},
                         F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 10_000.0}},
    )
    top = {k: overrides.pop(k) for k in list(overrides) if k in (
        "use_ordered_embeddings", "num_centroids", "centroid_intermediate_top_k", "target_kv_layers",
        "tie_target_embeddings", "gemmaspec_target")}
    text.update(overrides)
    return dict(model_type="gemma4_assistant", text_config=text, backbone_hidden_size=backbone, **top)


def random_assistant(config: dict, seed: int, head_std: float = 1.0) -> AssistantModel:
    model = AssistantModel(AssistantConfig.from_hf(config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or name.startswith("inv_freq"):
                continue
            if "norm" in name or name.endswith("layer_scalar"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name == "lm_head":
                t.copy_(torch.randn(t.shape, generator=g) * head_std)
            else:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1]))
        if model.centroids is not None:
            model.token_ordering.copy_(torch.randperm(model.config.text.vocab_size, generator=g))
    return model.eval()


# ---- oracle --------------------------------------------------------------------------------------------
ORACLE = {
    # Full layers: head_dim 32 with a single KV head (attention_k_eq_v), sliding layers 16 x 2 heads.
    "tied_head": dict(attention_k_eq_v=True, num_global_key_value_heads=1),
    "centroids": dict(attention_k_eq_v=True, num_global_key_value_heads=1, use_ordered_embeddings=True,
                      num_centroids=8, centroid_intermediate_top_k=3, num_hidden_layers=3, layer_types=[S, F, S],
                      attention_bias=True),
}


class FakeTarget(torch.nn.Module):
    """Stands in for a target: an embedding table and a config with the assistant's K/V geometry."""

    def __init__(self, vocab: int, hidden: int, seed: int):
        super().__init__()
        self.config = Gemma4Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, layer_types=[S, F],
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                                   num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=4)
        self.embed_tokens = torch.nn.Parameter(torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(seed)))

    def embed(self, ids):
        return self.embed_tokens[ids]


@pytest.mark.parametrize("name", list(ORACLE))
def test_matches_reference_over_a_chained_draft(name):
    V, B, P = 160, 24, 20
    config = assistant_config(V, B, **ORACLE[name])
    hf = Gemma4AssistantForCausalLM(Gemma4AssistantConfig(**json.loads(json.dumps(config)))).float().eval()
    randomize_(hf, seed=3)
    if config.get("use_ordered_embeddings"):
        hf.masked_embedding.token_ordering.copy_(torch.randperm(V, generator=torch.Generator().manual_seed(4)))
    ours = AssistantModel(AssistantConfig.from_hf(config))
    ours.load_hf_state({k: v.clone() for k, v in hf.state_dict().items()})
    ours.eval()

    # Target K/V for positions 0..P-1: sliding layer (2 heads x 16), full layer (1 head x 32).
    g = torch.Generator().manual_seed(5)
    ks, vs = torch.randn(2, P + 3, 16, generator=g), torch.randn(2, P + 3, 16, generator=g)
    kf, vf = torch.randn(1, P + 3, 32, generator=g), torch.randn(1, P + 3, 32, generator=g)
    # Our side: a live cache whose 8-slot sliding ring has wrapped, plus 3 rejected positions rolled back.
    cache = KVCache([CacheLayerSpec(2, 16, 16, 4), CacheLayerSpec(1, 32, 32, None)], capacity=64, dtype=torch.float32,
                    spec_margin=4)
    start = 0
    for n in (7, 1, 4, 1, 3, 4, 3):
        cache.begin(n)
        cache.update(0, ks[:, start : start + n], vs[:, start : start + n])
        cache.update(1, kf[:, start : start + n], vf[:, start : start + n])
        cache.end()
        start += n
    cache.rollback(P)
    shared = {S: (ks[None, :, :P], vs[None, :, :P]), F: (kf[None, :, :P], vf[None, :, :P])}

    target = FakeTarget(V, B, seed=6)
    hidden = torch.randn(B, generator=g)
    token = 7
    views = ours.draft_views(cache, {S: 0, F: 1}, P)
    rope = ours.rope(torch.tensor([P]))
    h_ref, h_ours, tok_ref, tokens_ref = hidden[None, None], hidden[None], token, []
    with torch.no_grad():
        for step in range(5):
            emb = target.embed(torch.tensor([tok_ref]))
            out = hf(inputs_embeds=torch.cat([emb[None], h_ref], dim=-1), position_ids=torch.tensor([[P]]),
                     shared_kv_states=shared, attention_mask=None)
            h = ours(torch.cat([emb, h_ours], dim=-1), rope, views)
            logits, projected = ours.logits(h), ours.project(h)
            ref_logits = out.logits[0].float()
            assert ref_logits.std() > 0.3
            assert (logits - ref_logits).abs().max().item() < TOL, f"step {step}: logits differ"
            assert (projected - out.last_hidden_state[0]).abs().max().item() < TOL, f"step {step}: hidden differs"
            tok_ref = int(ref_logits[0].argmax())
            tokens_ref.append(tok_ref)
            h_ref, h_ours = out.last_hidden_state, projected

        # The drafter itself, on the live cache: the same tokens; sampling q is a distribution over allowed tokens.
        drafter = MTPDrafter(ours, target)
        ctx = DraftContext([1] * P + [token], target, cache, hidden, SamplingParams())
        assert drafter.propose(ctx, 5).tokens == tokens_ref
        drafter.reset([], SamplingParams(temperature=1.0), 64)
        ctx.generator = torch.Generator().manual_seed(0)
        draft = drafter.propose(ctx, 3)
    assert draft.probs.shape == (3, V)
    assert torch.allclose(draft.probs.sum(-1), torch.ones(3))
    for t, q in zip(draft.tokens, draft.probs):
        assert q[t] > 0
    if config.get("use_ordered_embeddings"):  # only the 3 selected clusters of 20 tokens carry mass
        assert ((draft.probs > 0).sum(-1) <= 60).all()


def test_config_round_trips_through_the_reference():
    config = assistant_config(160, 24, **ORACLE["centroids"], target_kv_layers={S: 0, F: 1}, gemmaspec_target="x")
    ours = AssistantConfig.from_hf(config)
    again = AssistantConfig.from_hf(ours.to_hf())
    assert again == ours
    hf = Gemma4AssistantConfig(**ours.to_hf())  # transformers reads what we write
    assert AssistantConfig.from_hf({**hf.to_dict(), "target_kv_layers": {S: 0, F: 1}, "gemmaspec_target": "x"}) == ours


def test_forward_trains_on_a_batch_of_positions():
    model = random_assistant(assistant_config(160, 24), seed=1)
    model.requires_grad_(True)
    N, S_len = 6, 12
    keys = {S: torch.randn(2, S_len, 16), F: torch.randn(1, S_len, 32)}
    positions = torch.arange(3, 3 + N)
    key_pos = torch.arange(S_len)
    views = {kind: AttentionView(k, k.clone(), model.masks(positions, key_pos, kind)) for kind, k in keys.items()}
    h = model(torch.randn(N, 48), model.rope(positions), views)
    loss = torch.nn.functional.cross_entropy(model.logits(h), torch.randint(0, 160, (N,))) + model.project(h).pow(2).mean()
    loss.backward()
    assert model.pre_projection.weight.grad is not None and model.layers[0].q_proj.weight.grad.abs().sum() > 0
    # Row n of the batch equals a single-position forward at that position.
    with torch.no_grad():
        x = torch.randn(N, 48)
        batch = model(x, model.rope(positions), views)
        n = 4
        one = {kind: AttentionView(v.keys, v.values, v.mask[n : n + 1]) for kind, v in views.items()}
        single = model(x[n : n + 1], model.rope(positions[n : n + 1]), one)
    assert (batch[n] - single[0]).abs().max() < 1e-5


# ---- lossless on tiny targets ----------------------------------------------------------------------------
PROMPTS = [
    [2, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11],
    [2] + list(range(20, 60)),  # longer than the sliding window (8): the ring buffer wraps
]

G4_TARGET = dict(
    model_type="gemma4_text", architectures=["Gemma4ForCausalLM"], vocab_size=96, hidden_size=48,
    intermediate_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    global_head_dim=32, layer_types=[S, S, F, S, F], num_kv_shared_layers=2, sliding_window=8,
    hidden_size_per_layer_input=0, vocab_size_per_layer_input=96, max_position_embeddings=512,
    rope_parameters={S: {"rope_type": "default", "rope_theta": 10_000.0},
                     F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}},
    bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
)


def gemma3_assistant_config(vocab: int, backbone: int, **top) -> dict:
    """An assistant for the tiny Gemma 3 targets: 16-dim heads x 2 KV heads on both kinds, Gemma 3's RoPE."""
    rope = {S: {"rope_type": "default", "rope_theta": 10_000.0}, F: {"rope_type": "default", "rope_theta": 1_000_000.0}}
    return assistant_config(vocab, backbone, **{"global_head_dim": 16, "sliding_window": 8, "rope_parameters": rope,
                                                **top})


@pytest.fixture(scope="module")
def g4_target(tmp_path_factory):
    root = tmp_path_factory.mktemp("g4")
    folder = save_tiny_model(root / "tiny-g4", G4_TARGET, seed=11)
    assistant = random_assistant(assistant_config(96, 48, use_ordered_embeddings=True, num_centroids=4,
                                                  centroid_intermediate_top_k=2), seed=12)
    save_assistant(assistant, root / "tiny-g4-assistant")  # found by --drafter mtp
    return load_model(str(folder), dtype="float32", device="cpu")


def _greedy_equal(target, spec, ks):
    plain = Engine(target, make_drafter("none", target), 0)
    plain.eos_ids = set()
    wants = [plain.generate(p, max_new_tokens=24).token_ids for p in PROMPTS]
    drafter = make_drafter(spec, target)
    assert isinstance(drafter, MTPDrafter)
    for k in ks:
        engine = Engine(target, drafter, k)
        engine.eos_ids = set()
        drafted = 0
        for prompt, want in zip(PROMPTS, wants):
            got = engine.generate(prompt, max_new_tokens=24)
            assert got.token_ids == want, f"k={k}"
            drafted += got.stats.drafted_tokens
        assert drafted > 0


def test_gemma4_target_greedy_equals_plain_decoding(g4_target):
    assert find_paired_assistant(g4_target).name == "tiny-g4-assistant"
    auto = make_drafter("auto", g4_target)
    assert isinstance(auto, HybridDrafter) and isinstance(auto.mtp, MTPDrafter)
    drafter = make_drafter("mtp", g4_target)
    assert drafter.kv_layers == {S: 1, F: 2}  # the last cache-owning layer of each kind (layers 3, 4 are shared)
    _greedy_equal(g4_target, "mtp", ks=[1, 2, 4, 8])


def test_gemma4_bfloat16_target_greedy_equals_plain_decoding(g4_target):
    """A bfloat16 Gemma 4 target (its cache bfloat16) with the float32 assistant of the CPU."""
    target = load_model(str(g4_target.path), dtype="bfloat16", device="cpu")
    assert make_drafter("mtp", target).assistant.dtype == torch.float32
    _greedy_equal(target, "mtp", ks=[1, 4])


def test_auto_hybrid_of_mtp_and_prompt_lookup_is_lossless(g4_target):
    plain = Engine(g4_target, make_drafter("none", g4_target), 0)
    plain.eos_ids = set()
    sources = set()
    for k in (2, 4, "auto"):
        drafter = make_drafter("auto", g4_target)
        engine = Engine(g4_target, drafter, k)
        engine.eos_ids = set()
        original = drafter.observe

        def observe(accepted, original=original, drafter=drafter):
            sources.add(drafter.last[0])
            original(accepted)

        drafter.observe = observe
        for prompt in PROMPTS:
            assert engine.generate(prompt, max_new_tokens=24).token_ids == plain.generate(prompt, max_new_tokens=24).token_ids
    assert sources == {"mtp", "ngram"}  # both kinds of proposal were verified


@pytest.fixture(scope="module")
def g3_assistant_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("g3_assistants")
    default = save_assistant(random_assistant(gemma3_assistant_config(96, 64), seed=21), root / "default")
    chosen = save_assistant(random_assistant(gemma3_assistant_config(96, 64, target_kv_layers={S: 0, F: 2}), seed=22),
                            root / "chosen")
    # Centroid head over the target's own embedding table (nothing of the vocabulary stored in the drafter).
    tied = save_assistant(random_assistant(gemma3_assistant_config(
        96, 64, hidden_size=64, tie_target_embeddings=True, use_ordered_embeddings=True, num_centroids=4,
        centroid_intermediate_top_k=2), seed=23), root / "tied")
    return default, chosen, tied


def test_gemma3_target_greedy_equals_plain_decoding(tiny_gemma3_dir, g3_assistant_dirs):
    target = load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu")
    default, chosen, tied = g3_assistant_dirs
    assert make_drafter(f"mtp:{default}", target).kv_layers == {S: 3, F: 2}  # last sliding, last full
    assert make_drafter(f"mtp:{chosen}", target).kv_layers == {S: 0, F: 2}
    assert "model.embed_tokens.weight" not in load_file(tied / "model.safetensors")
    _greedy_equal(target, f"mtp:{default}", ks=[1, 2, 4, 8])
    _greedy_equal(target, f"mtp:{chosen}", ks=[4])
    _greedy_equal(target, f"mtp:{tied}", ks=[4])


def test_low_bit_target_gets_a_low_bit_drafter(tiny_gemma3_dir, g3_assistant_dirs):
    pytest.importorskip("gemmaspec.quant")
    target = load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu", weights="int8")
    drafter = make_drafter(f"mtp:{g3_assistant_dirs[2]}", target)
    assert getattr(drafter.assistant.layers[0].gate_up_proj, "qweight", None) is not None
    _greedy_equal(target, f"mtp:{g3_assistant_dirs[2]}", ks=[4])  # rows scored from the target's int8 table


@pytest.mark.parametrize("weights", ["float", "int8"])
def test_bfloat16_target_gets_a_float32_drafter(tiny_gemma3_dir, g3_assistant_dirs, weights):
    """On the CPU the assistant computes in float32 next to a bfloat16 target (reading its bfloat16 cache and, when
    tied, its bfloat16 or int8 embedding table); greedy output still equals plain decoding."""
    target = load_model(str(tiny_gemma3_dir), dtype="bfloat16", device="cpu", weights=weights)
    for folder in g3_assistant_dirs:
        assert make_drafter(f"mtp:{folder}", target).assistant.dtype == torch.float32
        _greedy_equal(target, f"mtp:{folder}", ks=[1, 4])


def test_sampling_distribution_matches_target(small_vocab_target, tmp_path):
    """Rejection sampling with the MTP drafter's q (centroid head: q = 0 outside its clusters) keeps the target's
    distribution after top-p processing."""
    params = SAMPLING["top_p"]
    vocab = 12
    config = gemma3_assistant_config(vocab, 64, use_ordered_embeddings=True, num_centroids=4,
                                     centroid_intermediate_top_k=3)
    folder = save_assistant(random_assistant(config, seed=31, head_std=0.15), tmp_path / "a")
    engine = Engine(small_vocab_target, make_drafter(f"mtp:{folder}", small_vocab_target), 3)
    engine.eos_ids = set()
    prompt = [2, 5, 6, 7, 5, 6, 7, 5, 6]
    joint = _exact_joint(small_vocab_target.model, prompt, params, vocab, depth=3)
    n = 1500
    counts = torch.zeros(vocab, vocab, vocab)
    accepted = drafted = 0
    for seed in range(n):
        r = engine.generate(prompt, max_new_tokens=4, temperature=params.temperature, top_p=params.top_p, seed=seed)
        counts[tuple(r.token_ids[:3])] += 1
        accepted += r.stats.accepted_tokens
        drafted += r.stats.drafted_tokens
    assert 0.05 * drafted < accepted < drafted  # both acceptances and rejections happened, often
    assert _chi_square_pvalue(counts.sum((0, 2)), joint.sum((0, 2))) > 1e-3  # t2
    assert _chi_square_pvalue(counts.sum((0, 1)), joint.sum((0, 1))) > 1e-3  # t3
    assert _chi_square_pvalue(counts.sum(2).flatten(), joint.sum(2).flatten()) > 1e-3  # (t1, t2)


# ---- pairing ---------------------------------------------------------------------------------------------
def test_pairing_errors(tiny_gemma3_dir, tmp_path):
    target = load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu")
    ok = gemma3_assistant_config(96, 64)
    assert check_pairing(ok, target) == []
    target_dict = json.loads((tiny_gemma3_dir / "config.json").read_text())
    assert check_pairing(ok, target_dict) == []  # the doctor's form: two config dicts
    cases = {
        "vocab_size 100": gemma3_assistant_config(100, 64),
        "backbone_hidden_size 48": gemma3_assistant_config(96, 48),
        "head_dim 32": assistant_config(96, 64, sliding_window=8),  # full layers want 32-dim heads
        "KV heads": gemma3_assistant_config(96, 64, num_key_value_heads=1),
        "cache layers": gemma3_assistant_config(96, 64, target_kv_layers={S: 0, F: 9}),
        "sliding-window layer": gemma3_assistant_config(96, 64, target_kv_layers={S: 0, F: 1}),
    }
    for needle, config in cases.items():
        problems = check_pairing(config, target)
        assert problems and any(needle in p for p in problems), (needle, problems)
        folder = save_assistant(random_assistant(config, seed=0), tmp_path / needle.replace(" ", "_"))
        with pytest.raises(GemmaspecError, match="does not fit") as e:
            make_mtp_drafter(f"mtp:{folder}", target)
        assert "\n" not in str(e.value)
    assert check_pairing({"model_type": "gemma3_text"}, target) != []
    with pytest.raises(GemmaspecError, match="not found"):
        make_mtp_drafter(f"mtp:{tmp_path / 'nowhere'}", target)


def test_mtp_without_a_paired_assistant_is_a_clear_error(tiny_gemma3_dir):
    target = load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu")
    assert find_paired_assistant(target) is None
    with pytest.raises(GemmaspecError, match="no MTP assistant is paired"):
        make_drafter("mtp", target)
    assert make_drafter("auto", target).name == "ngram"
