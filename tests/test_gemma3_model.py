"""Our Gemma 3 decoder against transformers' Gemma3ForCausalLM with identical random weights."""

import pytest
import torch

from gemmaspec import kernels
from gemmaspec.models import build_model
from tiny_models import hf_model, tiny_gemma3_config


def _pair(config, seed=0):
    ref = hf_model(config, seed)
    ours = build_model(config)
    ours.load_hf_state({k: v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"})
    return ref, ours.eval()


CONFIGS = {
    "basic": tiny_gemma3_config(),
    "linear_rope_scaling": tiny_gemma3_config(
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        }
    ),
    "softcap_mqa": tiny_gemma3_config(final_logit_softcapping=30.0, num_key_value_heads=1),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_and_cached_decode_match_transformers(name):
    ref, ours = _pair(CONFIGS[name])
    torch.manual_seed(0)
    ids = torch.randint(4, 96, (20,))
    with torch.no_grad():
        # Prefill longer than the sliding window (8), then 8 decode steps of one token and a chunk of 4.
        out = ref(input_ids=ids[None, :12], use_cache=True)
        past = out.past_key_values
        cache = ours.new_cache(64)
        ours_logits = ours.logits(ours(ids[:12], cache))
        assert (ours_logits - out.logits[0]).abs().max().item() < 1e-4
        for i in range(12, 16):
            out = ref(input_ids=ids[None, i : i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            step = ours.logits(ours(ids[i : i + 1], cache))
            assert (step - out.logits[0]).abs().max().item() < 1e-4
        out = ref(input_ids=ids[None, 16:20], past_key_values=past, use_cache=True)
        chunk = ours.logits(ours(ids[16:20], cache))
        assert (chunk - out.logits[0]).abs().max().item() < 1e-4


def test_eight_decode_steps_after_rollback_match_plain():
    """Rolled-back positions must not leak into later attention (ring buffer of the sliding layers)."""
    _, ours = _pair(CONFIGS["basic"])
    torch.manual_seed(1)
    ids = torch.randint(4, 96, (30,))
    with torch.no_grad():
        plain = ours.new_cache(64, spec_margin=8)
        ref_logits = ours.logits(ours(ids, plain))
        spec = ours.new_cache(64, spec_margin=8)
        ours(ids[:10], spec)
        pos = 10
        while pos < 30:
            junk = torch.randint(4, 96, (5,))
            ours(torch.cat([ids[pos : pos + 1], junk]), spec)  # a wrong draft of 5 ...
            spec.rollback(pos)  # ... rejected entirely
            step = ours.logits(ours(ids[pos : pos + 3], spec))
            assert (step - ref_logits[pos : pos + 3]).abs().max().item() < 1e-4
            pos += 3


def test_multimodal_config_builds_text_model():
    cfg = {"model_type": "gemma3", "text_config": tiny_gemma3_config()}
    model = build_model(cfg)
    assert model.config.hidden_size == 64


def _spy_on_c_blocks(monkeypatch) -> list[str]:
    """Records 'block' for each one-block C call and 'stack' for each all-blocks call."""
    calls = []
    block, stack = kernels.Kernels.gemma3_block, kernels.Kernels.gemma3_stack
    monkeypatch.setattr(kernels.Kernels, "gemma3_block", lambda *a: calls.append("block") or block(*a))
    monkeypatch.setattr(kernels.Kernels, "gemma3_stack", lambda *a: calls.append("stack") or stack(*a))
    return calls


@pytest.mark.skipif(kernels.load() is None, reason="no C compiler: kernels not built")
@pytest.mark.parametrize("weights", ["float", "bf16", "int8", "int4"])
def test_fused_block_kernel_equals_the_python_path_bitwise(tiny_gemma3_dir, weights, monkeypatch):
    """kernels/block.c runs a decoder block in one call; it must give exactly what the per-op path gives, for
    decode steps and verification chunks, over a ring that wraps and after rollbacks."""
    from gemmaspec.loading import load_model
    from gemmaspec.models.gemma3 import Gemma3Block

    model = load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu", weights=weights).model
    calls = _spy_on_c_blocks(monkeypatch)
    torch.manual_seed(0)
    ids = torch.randint(4, 96, (60,))
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(Gemma3Block, "_block_args", lambda self, fast: None)
        cache = model.new_cache(128, spec_margin=8)
        outs = []
        with torch.inference_mode():
            outs.append(model(ids[:10], cache))
            at = 10
            for n in [1, 1, 4, 3, 1, 5, 2, 6, 1, 1, 4, 4]:  # decode steps and verification chunks
                outs.append(model(ids[at:at + n], cache))
                at += n
                if n > 2:  # a rejected draft: roll back part of the chunk
                    at -= 2
                    cache.rollback(at)
        runs.append(outs)
    assert set(calls) == {"block", "stack"}  # all blocks in one call; block by block where the ring cannot take it
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(kernels.load() is None, reason="no C compiler: kernels not built")
@pytest.mark.parametrize("dtype,weights", [("float32", "float"), ("float32", "int4"), ("bfloat16", "bf16"),
                                           ("bfloat16", "int8"), ("bfloat16", "int4")])
def test_forward_logits_equal_forward_then_logits(tiny_gemma3_dir, dtype, weights, monkeypatch):
    """The engine's target pass (forward_logits: the LM head and its argmax inside the C block stack's call) gives
    bit for bit what forward() then logits() then torch.argmax give, for decode steps and verification chunks."""
    from gemmaspec.loading import load_model

    model = load_model(str(tiny_gemma3_dir), dtype=dtype, device="cpu", weights=weights).model
    calls = _spy_on_c_blocks(monkeypatch)
    torch.manual_seed(0)
    ids = torch.randint(4, 96, (60,))
    caches = [model.new_cache(128, spec_margin=8) for _ in range(4)]
    with torch.inference_mode():
        for cache in caches:
            model(ids[:10], cache)
        at = 10
        for n in [1, 1, 4, 3, 1, 5, 2, 6, 1, 1, 4]:
            hidden, logits, best = model.forward_logits(ids[at:at + n], caches[0])
            ref_hidden = model(ids[at:at + n], caches[1])
            ref_logits = model.logits(ref_hidden)
            assert torch.equal(hidden, ref_hidden) and torch.equal(logits, ref_logits)
            assert best == ref_logits.argmax(-1).tolist()
            # greedy decoding asks for the argmax only: the logits stay in the call's buffer
            greedy_hidden, no_logits, greedy_best = model.forward_logits(ids[at:at + n].tolist(), caches[2], logits=False)
            assert no_logits is None and greedy_best == best and torch.equal(greedy_hidden, hidden)
            # a drafter without use for the hidden states: they stay in the call's buffer too
            no_hidden, _, plain_best = model.forward_logits(ids[at:at + n].tolist(), caches[3], logits=False,
                                                            hidden=False)
            assert no_hidden is None and plain_best == best
            at += n
            if n > 2:
                at -= 2
                for cache in caches:
                    cache.rollback(at)
    assert "stack" in calls


@pytest.mark.skipif(kernels.load() is None, reason="no C compiler: kernels not built")
@pytest.mark.parametrize("dtype,weights", [("float32", "float"), ("float32", "bf16"), ("float32", "int8"),
                                           ("bfloat16", "bf16"), ("bfloat16", "int8"), ("bfloat16", "int4")])
def test_embedding_in_the_c_stack_equals_the_lookup(tiny_gemma3_dir, dtype, weights, monkeypatch):
    """A step's embedding rows computed inside the C block stack's call (ids as a list or a tensor) give bit for bit
    the outputs of the model's own lookup (embed_tokens[ids] * sqrt(hidden)) passed to that call; an id outside
    the table is an IndexError."""
    from gemmaspec.loading import load_model

    model = load_model(str(tiny_gemma3_dir), dtype=dtype, device="cpu", weights=weights).model
    calls = _spy_on_c_blocks(monkeypatch)
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (50,))
    ids[12] = 95  # the table's first and last rows
    ids[13] = 0
    runs = []
    for c_embedding in (True, False):
        if not c_embedding:  # the table's kernel view withheld: the stack takes the looked-up rows
            matrix_args = kernels.Kernels.matrix_args
            monkeypatch.setattr(kernels.Kernels, "weight_args",
                                lambda self, lin: matrix_args(self, lin.qweight if lin.qweight is not None else lin.weight))
            monkeypatch.setattr(kernels.Kernels, "matrix_args", lambda self, w: None)
        cache, outs = model.new_cache(128, spec_margin=8), []
        with torch.inference_mode():
            model(ids[:10], cache)
            at = 10
            for n in [1, 1, 4, 3, 1, 5, 2, 6, 1]:
                step = ids[at:at + n].tolist() if c_embedding else ids[at:at + n]
                outs.append(model.forward_logits(step, cache))
                at += n
                if n > 2:
                    at -= 2
                    cache.rollback(at)
            if c_embedding:
                with pytest.raises(IndexError, match="out of range"):
                    model.forward_logits([3, 96], cache)
        runs.append(outs)
    assert "stack" in calls
    for (h, lg, best), (ref_h, ref_lg, ref_best) in zip(*runs):
        assert torch.equal(h, ref_h) and torch.equal(lg, ref_lg) and best == ref_best


@pytest.mark.skipif(kernels.load() is None, reason="no C compiler: kernels not built")
@pytest.mark.parametrize("dtype,weights", [("float32", "float"), ("bfloat16", "int8"), ("bfloat16", "int4")])
def test_greedy_runs_in_one_call_equal_step_by_step_decoding(tiny_gemma3_dir, dtype, weights):
    """decode_greedy (a run of greedy steps in one C call: each step's slots, masks, RoPE rows and ring positions
    in C) chooses the tokens that forward_logits gives step by step and leaves the cache as those steps do, past
    the sliding ring's end (8 + 8 slots) and across runs; it stops after a stop id, which it returns."""
    from gemmaspec.loading import load_model

    model = load_model(str(tiny_gemma3_dir), dtype=dtype, device="cpu", weights=weights).model
    prompt = torch.randint(0, 96, (5,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        step_cache, run_cache = model.new_cache(64, spec_margin=8), model.new_cache(64, spec_margin=8)
        first = int(model.logits(model(prompt, step_cache)[-1:]).argmax(-1))
        model(prompt, run_cache)
        want, token = [], first
        for _ in range(40):
            _, _, best = model.forward_logits([token], step_cache, logits=False)
            token = best[0]
            want.append(token)
        got, token = [], first
        for steps in (1, 3, 16, 20):
            run = model.decode_greedy(token, run_cache, steps, set())
            assert len(run) == steps
            got += run
            token = run[-1]
        assert got == want and run_cache.length == step_cache.length
        assert torch.equal(run_cache.slot_pos, step_cache.slot_pos)
        after_steps = model.forward_logits([token], step_cache)[1]
        assert torch.equal(model.forward_logits([token], run_cache)[1], after_steps)  # the same K/V, masks, ring
        stop = want[6]  # a stop id ends the run after it
        stop_cache = model.new_cache(64, spec_margin=8)
        model(prompt, stop_cache)
        run = model.decode_greedy(first, stop_cache, 30, {stop, 95})
        assert run == want[:want.index(stop) + 1] and stop_cache.length == 5 + len(run)


@pytest.mark.skipif(kernels.load() is None, reason="no C compiler: kernels not built")
def test_c_stack_after_a_forward_with_autograd_on(tiny_gemma3_dir, monkeypatch):
    """A cache whose first forward ran with autograd on (the per-layer path) takes the C stack for later steps
    under inference mode: the C path is not written off for that cache."""
    from gemmaspec.loading import load_model

    model = load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu", weights="float").model
    calls = _spy_on_c_blocks(monkeypatch)
    cache = model.new_cache(64, spec_margin=8)
    model(torch.tensor([1, 2, 3]), cache)
    assert "stack" not in calls
    with torch.inference_mode():
        model.forward_logits([4], cache)
    assert "stack" in calls


@pytest.mark.skipif(kernels.load() is None, reason="no C compiler: kernels not built")
@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_fused_block_kernel_in_bfloat16(tiny_gemma3_dir, weights, monkeypatch):
    """A bfloat16 model's decode steps also run in the C block (x and the KV cache in bfloat16, computed in
    float32): verification chunks give bit for bit what one-token steps give, over a ring that wraps, and the
    result is at least as close to the float32 model as the per-op bfloat16 path is."""
    from gemmaspec.loading import load_model
    from gemmaspec.models.gemma3 import Gemma3Block

    torch.manual_seed(0)
    ids = torch.randint(4, 96, (50,))

    def hidden(model, chunk: int) -> torch.Tensor:
        cache = model.new_cache(128, spec_margin=8)
        with torch.inference_mode():
            model(ids[:10], cache)
            return torch.cat([model(ids[at:at + chunk], cache) for at in range(10, 50, chunk)]).float()

    reference = hidden(load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu", weights=weights).model, 1)
    model = load_model(str(tiny_gemma3_dir), dtype="bfloat16", device="cpu", weights=weights).model
    calls = _spy_on_c_blocks(monkeypatch)
    fused = hidden(model, 1)
    assert "stack" in calls  # the C blocks ran in bfloat16
    for chunk in (4, 5):
        assert torch.equal(hidden(model, chunk), fused)
    monkeypatch.setattr(Gemma3Block, "_block_args", lambda self, fast: None)
    per_op = hidden(model, 1)
    fused_err, per_op_err = (fused - reference).abs().max().item(), (per_op - reference).abs().max().item()
    assert fused_err > 0
    # bf16 weights: the fused block's float32 intermediates make it closer. int8 / int4: both paths round x to int8
    # for the bytes kernel, which dominates both errors (int8: 0.046 against 0.045; int4: ~0.35 each)
    if weights == "bf16":
        assert fused_err <= per_op_err


@pytest.mark.skipif(kernels.load() is None, reason="no C compiler: kernels not built")
def test_fused_block_follows_weight_changes(tiny_gemma3_dir, monkeypatch):
    """The C block's cached weight pointers are rebuilt when a weight is replaced, moved by `.data =` or a
    format change, so the fused path keeps giving what the per-op path gives."""
    from gemmaspec.loading import load_model
    from gemmaspec.models.gemma3 import Gemma3Block
    from gemmaspec.quant import quantize_model

    model = load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu", weights="float").model
    ids = torch.randint(4, 96, (12,), generator=torch.Generator().manual_seed(0))

    def run() -> torch.Tensor:
        cache = model.new_cache(64)
        with torch.inference_mode():
            model(ids[:8], cache)
            return model(ids[8:12], cache)

    def per_op() -> torch.Tensor:
        with monkeypatch.context() as m:
            m.setattr(Gemma3Block, "_block_args", lambda self, fast: None)
            return run()

    run()  # builds the cached arguments
    layer = model.layers[0]
    layer.input_layernorm.weight.data = layer.input_layernorm.weight.data * 1.5
    layer.o_proj.weight = torch.nn.Parameter(layer.o_proj.weight.data * -1.0, requires_grad=False)
    assert torch.equal(run(), per_op())
    quantize_model(model, "int8")
    assert torch.equal(run(), per_op())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hidden_states_do_not_depend_on_the_cache_capacity(tmp_path, dtype):
    """A plain and a speculative run size their caches differently (the draft length adds slots); the sliding
    ring must not follow, or the same prompt gets different numbers (in bfloat16, different tokens)."""
    from gemmaspec.loading import load_model
    from tiny_models import save_tiny_model, tiny_gemma3_config

    folder = save_tiny_model(tmp_path / "m", tiny_gemma3_config(sliding_window=256), seed=3)
    model = load_model(str(folder), dtype=dtype, device="cpu", weights="int8").model
    ids = torch.randint(4, 96, (140,), generator=torch.Generator().manual_seed(5))
    runs = []
    for capacity in (141, 180, 400):  # rings of 141, 180 and 320 slots before the fix
        cache = model.new_cache(capacity)
        with torch.inference_mode():
            outs = [model(ids[:120], cache)]  # a prefill longer than the C block takes
            outs += [model(ids[at:at + 1], cache) for at in range(120, 140)]
        runs.append(torch.cat(outs))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_bfloat16_prefill_stays_close_to_float32(tiny_gemma3_dir):
    """A long bfloat16 prefill (the quantized matmuls as a bfloat16 GEMM where the CPU computes it natively) gives
    the float32 model's next-token logits up to bfloat16 rounding."""
    from gemmaspec.loading import load_model

    ids = torch.randint(4, 96, (70,), generator=torch.Generator().manual_seed(9))
    logits = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(str(tiny_gemma3_dir), dtype=dtype, device="cpu", weights="int8").model
        with torch.inference_mode():
            logits[dtype] = model.logits(model(ids, model.new_cache(80))).float()
    err = (logits["bfloat16"] - logits["float32"]).abs().max().item()
    assert err < 0.05 * logits["float32"].abs().max().item(), err
    assert (logits["bfloat16"].argmax(-1) == logits["float32"].argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("weights", ["float", "bf16", "int8"])
def test_bfloat16_model_gives_float32_logits(tiny_gemma3_dir, weights):
    """For decode and verification (up to kernels.MAX_ROWS rows) the LM head of a bfloat16 model on the CPU
    computes in float32 and is not rounded to bfloat16 (8 bits of mantissa would blur the sampling distribution
    and tie the argmax)."""
    from gemmaspec.loading import load_model

    model = load_model(str(tiny_gemma3_dir), dtype="bfloat16", device="cpu", weights=weights).model
    ids = torch.randint(4, 96, (40,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        hidden = model(ids, model.new_cache(48))
        for rows in (hidden[-1:], hidden[-5:], hidden[-kernels.MAX_ROWS:]):
            logits = model.logits(rows)
            assert logits.dtype == torch.float32
            assert not torch.equal(logits, logits.bfloat16().float())


def test_rope_tables_equal_rope_cos_sin():
    """The decode steps' RoPE rows come sliced out of tables computed 256 positions at a time: the same values bit
    for bit as computing each run on its own, for steps inside a table, across its end, after a rollback before
    its start, and for a prompt longer than a table."""
    from gemmaspec.models.layers import RopeTables, rope_cos_sin, rope_inv_freq

    inv_freq = rope_inv_freq(256, 1_000_000.0)
    tables = RopeTables(inv_freq, torch.float32)
    for start, n in [(0, 7), (7, 1), (8, 5), (250, 6), (254, 5), (258, 1), (200, 3), (203, 1), (1000, 300),
                     (1300, 1)]:
        cos, sin = tables.get(start, n)
        want_cos, want_sin = rope_cos_sin(torch.arange(start, start + n), inv_freq, torch.float32)
        assert cos.shape == (n, 256) and cos.is_contiguous()
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
        if n <= RopeTables.ROWS:  # the C stack's view of the same rows: their addresses
            assert tables.pointers(start, n) == (cos.data_ptr(), sin.data_ptr())
