"""Time one MTP draft step against one target decode step on the default model (Gemma 3 270M).

The assistant is randomly initialised at the size a trained drafter for this target would have: hidden = the
target's (640), 2 layers [sliding, full] reading the target's last sliding and last full cache layers, 4 query
heads of 256 over the target's single KV head, MLP 2048, and a centroid head (2048 clusters of 128 tokens, the top
32 scored: 4096 of 262144 tokens) whose rows are the target's own embedding table (`tie_target_embeddings`).
`--no-centroids` scores the whole vocabulary instead, to show what the centroid head saves.

Target step = one forward of one token at the end of a prompt + its logits (then rolled back). Draft step = the
marginal cost of one more drafted token, (t(k=K) - t(k=1)) / (K - 1); round overhead = t(k=1) - one step (views of
the cache, mask, RoPE, and the first step's cold reads after a target step); per token at K = t(k=K) / K; a
verification pass over T = k + 1 tokens against one target step. Medians of
interleaved repetitions; the machine is shared, so only ratios measured side by side mean anything.

The target loads as `gemmaspec generate` would (`--weights auto`: the GGUF's packed int4/int8 on CPUs where the
kernel builds); the drafter's Linear weights follow it as make_mtp_drafter does (the target's dominant bit width,
int8 for the default model), or as `--assistant-weights` says.

    python scripts/bench_mtp_step.py [--reps 40] [--prompt-tokens 256] [--threads 1] [--no-centroids]
        [--weights auto|bf16|int8|int4] [--assistant-weights match|float|int8|int4] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gemmaspec.drafters.base import DraftContext
from gemmaspec.drafters.mtp import MTPDrafter, match_target_weights
from gemmaspec.loading import load_model
from gemmaspec.models.assistant import AssistantConfig, AssistantModel
from gemmaspec.sampling import SamplingParams

S, F = "sliding_attention", "full_attention"


def drafter_config(target_cfg, layers: int, centroids: bool) -> dict:
    kinds = ([S] * (layers - 1) + [F]) if layers > 1 else [F]
    text = dict(
        model_type="gemma4_text", vocab_size=target_cfg.vocab_size, hidden_size=target_cfg.hidden_size,
        intermediate_size=target_cfg.intermediate_size, num_hidden_layers=layers,
        num_attention_heads=target_cfg.num_attention_heads, num_key_value_heads=target_cfg.num_key_value_heads,
        head_dim=target_cfg.head_dim, global_head_dim=target_cfg.head_dim, layer_types=kinds,
        sliding_window=target_cfg.sliding_window, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
        rope_parameters={S: {"rope_type": "default", "rope_theta": target_cfg.rope_local_base_freq},
                         F: {"rope_type": "default", "rope_theta": target_cfg.rope_theta}},
    )
    return dict(model_type="gemma4_assistant", text_config=text, backbone_hidden_size=target_cfg.hidden_size,
                use_ordered_embeddings=centroids, num_centroids=2048, centroid_intermediate_top_k=32,
                tie_target_embeddings=True, gemmaspec_target="default")


def random_drafter(target, layers: int, centroids: bool, weights: str | None = None) -> MTPDrafter:
    model = target.model
    cfg = AssistantConfig.from_hf(drafter_config(model.config, layers, centroids))
    assistant = AssistantModel(cfg)
    assistant.tie_to(model.embed_tokens)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in assistant.named_parameters():
            if name == "lm_head":
                continue
            if "norm" in name:
                t.fill_(1.0)
            else:
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5)
        if assistant.centroids is not None:
            assistant.token_ordering.copy_(torch.randperm(cfg.text.vocab_size, generator=g))
    assistant.to(torch.float32)  # as make_mtp_drafter does on the CPU, whatever the target's dtype
    n_params = sum(t.numel() for t in assistant.parameters())  # the tied embedding is the target's, not counted
    fmt = match_target_weights(assistant, model, weights)  # what make_mtp_drafter does (None: follow the target)
    drafter = MTPDrafter(assistant.eval(), model)
    drafter.weights, drafter.n_params = fmt or "float", n_params
    return drafter


VERIFY_TOKENS = (2, 3, 5, 9)  # target passes over k + 1 tokens, timed against one token's


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--draft-tokens", type=int, default=4, help="K for the per-step estimate")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-centroids", action="store_true")
    p.add_argument("--weights", default="auto", help="target weights (auto keeps the GGUF's packed int4/int8)")
    p.add_argument("--assistant-weights", default="match",
                   help="match (the target's dominant low-bit width, else float), float, int8, int4")
    p.add_argument("--drafter", default=None,
                   help="time a real drafter instead of a random one: mtp (the paired/shipped one) or mtp:PATH")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    target = load_model(args.model, dtype=args.dtype, device="cpu", weights=args.weights)
    model = target.model
    if args.drafter:
        from gemmaspec.drafters import make_drafter

        drafter = make_drafter(args.drafter, target)
        packed = getattr(drafter.assistant.pre_projection, "qweight", None)
        drafter.weights = f"int{packed.bits}" if packed is not None else "float"
        drafter.n_params = sum(t.numel() for t in drafter.assistant.parameters())
        args.layers = len(drafter.assistant.layers)
    else:
        drafter = random_drafter(target, args.layers, centroids=not args.no_centroids,
                                 weights=None if args.assistant_weights == "match" else args.assistant_weights)
    target_weights = "low-bit" if any(getattr(m, "qweight", None) is not None for m in model.modules()) else "float"
    n_params = drafter.n_params
    read_rows = (drafter.assistant.config.centroid_intermediate_top_k * drafter.assistant.config.vocab_per_centroid
                 if drafter.assistant.centroids is not None
                 else len(drafter.assistant.vocab_map) if drafter.assistant.vocab_map is not None
                 else model.config.vocab_size)

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, model.config.vocab_size, (args.prompt_tokens,), generator=g).tolist()
    K = args.draft_tokens
    with torch.inference_mode():
        cache = model.new_cache(args.prompt_tokens + 64, spec_margin=64)
        hidden = model(torch.tensor(prompt[:-1]), cache)[-1]
        length = cache.length
        last = torch.tensor(prompt[-1:])
        ctx = DraftContext(prompt, model, cache, hidden, SamplingParams())
        drafter.reset(prompt, SamplingParams(), cache.capacity)

        def target_step(tokens=last):
            t = time.perf_counter()
            h = model(tokens, cache)
            model.logits(h).argmax(-1)
            dt = time.perf_counter() - t
            cache.rollback(length)
            return dt

        # verification passes: the last prompt token + T - 1 drafted ones
        passes = {T: torch.cat([last, torch.tensor(prompt[:T - 1])]) for T in VERIFY_TOKENS}

        def draft(k):
            t = time.perf_counter()
            drafter.propose(ctx, k)
            return time.perf_counter() - t

        for _ in range(3):  # warm up
            target_step(), draft(1), draft(K)
        ts, d1, dk = [], [], []
        verify = {T: [] for T in VERIFY_TOKENS}
        for _ in range(args.reps):
            ts.append(target_step())
            d1.append(draft(1))
            dk.append(draft(K))
            for T, tokens in passes.items():
                verify[T].append(target_step(tokens))

    t_target = statistics.median(ts)
    t_one, t_k = statistics.median(d1), statistics.median(dk)
    step = (t_k - t_one) / (K - 1)
    result = {
        "model": target.name, "dtype": str(model.dtype).replace("torch.", ""), "target_weights": target_weights,
        "assistant_weights": drafter.weights, "threads": args.threads,
        "prompt_tokens": args.prompt_tokens, "reps": args.reps,
        "drafter": {"layers": args.layers, "hidden": drafter.assistant.config.text.hidden_size,
                    "centroid_head": drafter.assistant.centroids is not None, "head_rows_read": read_rows,
                    "params_excluding_shared_embeddings": n_params},
        "target_step_ms": round(t_target * 1e3, 3),
        "draft_step_ms": round(step * 1e3, 3),
        "draft_round_k1_ms": round(t_one * 1e3, 3),
        f"draft_round_k{K}_ms": round(t_k * 1e3, 3),
        "round_overhead_ms": round((t_one - step) * 1e3, 3),
        "draft_step_over_target_step": round(step / t_target, 4),
        f"draft_per_token_k{K}_over_target_step": round(t_k / K / t_target, 4),
        "draft_round_k1_over_target_step": round(t_one / t_target, 4),
        "verify_pass_over_target_step": {T: round(statistics.median(v) / t_target, 3) for T, v in verify.items()},
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:36s} {value}")
        verdict = "within" if step <= 0.10 * t_target else "ABOVE"
        print(f"draft step = {100 * step / t_target:.1f}% of a target step ({verdict} the 10% target); "
              f"{100 * t_k / K / t_target:.1f}% per token of a {K}-token round")


if __name__ == "__main__":
    main()
