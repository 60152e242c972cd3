"""Oracle tests: our Gemma 4 text decoder must reproduce transformers' Gemma4ForCausalLM logits.

Each tiny random config exercises one feature (and one combines them all). All weights, norm scales, router
scales and layer scalars are randomised so that nothing is silently the identity. Every config runs the same
schedule against both implementations: a 12-token prefill, a 4-token chunk (the speculative verification shape),
8 single-token decode steps and a final 4-token chunk, comparing logits at every step.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, Gemma4ForCausalLM, Gemma4TextConfig  # noqa: E402

from gemmaspec.errors import ModelFileError  # noqa: E402
from gemmaspec.models import build_model  # noqa: E402
from gemmaspec.models.gemma4 import Gemma4Config, Gemma4Model  # noqa: E402

S, F = "sliding_attention", "full_attention"
TOL = 1e-4

BASE = dict(
    vocab_size=160,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=16,
    layer_types=[S, F, S, F],
    sliding_window=8,
    hidden_size_per_layer_input=0,  # the reference defaults to 256: switch PLE off unless tested
    vocab_size_per_layer_input=160,
    rope_parameters={
        S: {"rope_type": "default", "rope_theta": 10_000.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    },
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)

CONFIGS = {
    # Sliding window 4 < sequence length; full layers: global_head_dim 32 with 1/4 proportional RoPE.
    "sliding_full_rope": dict(
        sliding_window=4,
        global_head_dim=32,
        rope_parameters={
            S: {"rope_type": "default", "rope_theta": 100.0},
            F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 10_000.0},
        },
    ),
    "k_eq_v": dict(attention_k_eq_v=True, global_head_dim=32, num_global_key_value_heads=1),
    "ple": dict(hidden_size_per_layer_input=8),
    "kv_shared": dict(num_hidden_layers=6, layer_types=[S, S, F, S, S, F], num_kv_shared_layers=3),
    "double_wide_mlp": dict(
        num_hidden_layers=5, layer_types=[S, F, S, S, F], num_kv_shared_layers=2, use_double_wide_mlp=True
    ),
    "moe": dict(enable_moe_block=True, num_experts=6, top_k_experts=2, moe_intermediate_size=24),
    "softcapping": dict(final_logit_softcapping=3.0),
    "attention_bias": dict(attention_bias=True),
    "linear_rope": dict(
        rope_parameters={
            S: {"rope_type": "default", "rope_theta": 1_000.0},
            F: {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0},
        },
    ),
    "all": dict(
        num_hidden_layers=6,
        layer_types=[S, F, S, S, F, F],
        sliding_window=4,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=3,
        use_double_wide_mlp=True,
        enable_moe_block=True,
        num_experts=5,
        top_k_experts=2,
        moe_intermediate_size=24,
        final_logit_softcapping=5.0,
    ),
}


def hf_config(name: str) -> Gemma4TextConfig:
    return Gemma4TextConfig(**{**BASE, **CONFIGS[name]})


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, scales near 1 for norms/routers/layer scalars (zero/one-initialised otherwise)."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.data_ptr() in seen or not t.is_floating_point():
                continue
            seen.add(t.data_ptr())
            if name.endswith(("norm.weight", "layer_scalar", "router.scale", "per_expert_scale")) or "norm_" in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(".bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1]))


def make_pair(name: str, seed: int = 0):
    cfg = hf_config(name)
    torch.manual_seed(seed)
    hf = Gemma4ForCausalLM(cfg).float().eval()
    randomize_(hf, seed)
    ours = Gemma4Model(Gemma4Config.from_hf(cfg.to_dict()))
    ours.load_hf_state({k: v.clone() for k, v in hf.state_dict().items()})
    return cfg, hf, ours.eval()


def hf_logits(hf, ids: torch.Tensor, pkv=None) -> torch.Tensor:
    """Reference logits [T, vocab] for ids [T]. An explicit position list for `logits_to_keep` keeps every position
    and sidesteps the reference's KV-shared slicing shortcut, which crashes on multi-token inputs without PLE."""
    out = hf(input_ids=ids[None], past_key_values=pkv, use_cache=pkv is not None, logits_to_keep=torch.arange(len(ids)))
    return out.logits[0].float()


SCHEDULE = [12, 4] + [1] * 8 + [4]  # prefill, verify chunk, decode steps, verify chunk


def run_schedule(cfg, hf, ours, spec_margin: int = 64, seed: int = 0):
    ids = torch.randint(3, cfg.vocab_size, (sum(SCHEDULE),), generator=torch.Generator().manual_seed(seed + 1))
    cache = ours.new_cache(capacity=64, spec_margin=spec_margin)
    pkv = DynamicCache(config=cfg)
    pos = 0
    for n in SCHEDULE:
        chunk = ids[pos : pos + n]
        with torch.no_grad():
            ref = hf_logits(hf, chunk, pkv)
            got = ours.logits(ours(chunk, cache))
        assert got.shape == ref.shape == (n, cfg.vocab_size)
        assert ref.std() > 0.3, "logits too flat for a meaningful comparison"
        diff = (got - ref).abs().max().item()
        assert diff < TOL, f"tokens {pos}..{pos + n}: max abs logit diff {diff:.2e}"
        pos += n
    assert cache.length == pos


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(name):
    cfg, hf, ours = make_pair(name)
    run_schedule(cfg, hf, ours)


@pytest.mark.parametrize("name", ["sliding_full_rope", "all"])
def test_matches_reference_with_wrapping_sliding_ring(name):
    # spec_margin 4 with window 4: the sliding ring holds 8 slots and wraps several times over 28 tokens.
    cfg, hf, ours = make_pair(name, seed=1)
    run_schedule(cfg, hf, ours, spec_margin=4, seed=1)


def test_kv_shared_layers_own_no_cache():
    cfg, hf, ours = make_pair("all")
    specs = ours.cache_specs()
    assert len(specs) == 3  # layers 3..5 reuse K/V of layers 0..2
    assert [(s.n_kv_heads, s.k_dim, s.v_dim, s.window) for s in specs] == [(2, 16, 16, 4), (1, 32, 32, None), (2, 16, 16, 4)]
    # The reference marks the last owning layer of each kind "store"; those are what the MTP drafter reads.
    modes = cfg.kv_sharing_modes
    assert ours.kv_layer_for(S) == 2 and modes[2] == "store"
    assert ours.kv_layer_for(F) == 1 and modes[1] == "store"
    _, _, ours2 = make_pair("sliding_full_rope")
    assert ours2.kv_layer_for(S) == 2 and ours2.kv_layer_for(F) == 3
    assert len(ours2.cache_specs()) == 4


def test_rollback_then_redecode_matches_reference():
    cfg, hf, ours = make_pair("all", seed=2)
    ids = torch.randint(3, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(5))
    cache = ours.new_cache(capacity=64, spec_margin=8)
    with torch.no_grad():
        ours(ids[:12], cache)
        ours(torch.tensor([7, 8, 9, 10]), cache)  # a rejected draft
        cache.rollback(12)
        got = ours.logits(ours(ids[12:16], cache))
        ref = hf_logits(hf, ids[:16])[12:16]
    assert (got - ref).abs().max().item() < TOL


def test_config_from_hub_style_dict_matches_serialised_form():
    cfg = hf_config("all")
    serialised = Gemma4Config.from_hf(cfg.to_dict())  # carries `per_layer_config`
    hub = {**BASE, **CONFIGS["all"], "model_type": "gemma4_text"}  # carries `global_head_dim` & co.
    assert Gemma4Config.from_hf(hub) == serialised
    assert serialised.global_head_dim == 32 and serialised.num_global_key_value_heads == 1
    # Without attention_k_eq_v the reference ignores num_global_key_value_heads.
    plain = Gemma4Config.from_hf({**hub, "attention_k_eq_v": False})
    assert plain.num_global_key_value_heads == 2


def test_multimodal_config_builds_text_decoder():
    from transformers import Gemma4Config as HFGemma4Config

    text = hf_config("all")
    d = HFGemma4Config(text_config=text.to_dict()).to_dict()
    assert d["model_type"] == "gemma4"
    model = build_model(d)
    assert isinstance(model, Gemma4Model)
    assert model.config.model_type == "gemma4_text"
    assert model.config == Gemma4Config.from_hf(text.to_dict())
    # And it runs once loaded with the text weights.
    _, hf, _ = make_pair("all")
    model.load_hf_state(dict(hf.state_dict()))
    ids = torch.arange(3, 9)
    with torch.no_grad():
        diff = (model.logits(model(ids, model.new_cache(16))) - hf_logits(hf, ids)).abs().max()
    assert diff < TOL


def test_load_reports_missing_and_unexpected_tensors():
    _, hf, ours = make_pair("kv_shared")
    state = dict(hf.state_dict())
    # Checkpoints may carry K/V weights of KV-shared layers (the reference ignores them): accepted.
    extra = {**state, "model.layers.4.self_attn.k_proj.weight": torch.zeros(32, 48),
             "model.layers.4.self_attn.k_norm.weight": torch.ones(16)}
    ours.load_hf_state(extra)
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ModelFileError, match="missing"):
        ours.load_hf_state(missing)
    with pytest.raises(ModelFileError, match="unexpected"):
        ours.load_hf_state({**state, "model.layers.0.self_attn.bogus.weight": torch.zeros(1)})


@pytest.mark.parametrize("name", ["sliding_full_rope", "moe", "all"])
def test_bfloat16_verification_chunks_equal_single_steps(name):
    """In bfloat16 on the CPU (dtype auto on bf16-native CPUs), a verification chunk gives bit for bit the logits
    of one-token steps: speculation over Gemma 4 stays exact."""
    cfg, hf, _ = make_pair(name)
    model = Gemma4Model(Gemma4Config.from_hf(cfg.to_dict()))
    model.load_hf_state({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in hf.state_dict().items()})
    model.eval()
    assert model.dtype == torch.bfloat16
    ids = torch.randint(3, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(3))

    def run(chunk: int) -> torch.Tensor:
        cache = model.new_cache(64, spec_margin=8)
        with torch.no_grad():
            model(ids[:10], cache)
            return torch.cat([model.logits(model(ids[at:at + chunk], cache)) for at in range(10, 30, chunk)])

    single = run(1)
    for chunk in (4, 5):
        assert torch.equal(run(chunk), single), chunk
