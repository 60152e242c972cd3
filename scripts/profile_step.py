"""Where a plain decode step of the default model spends its time: the C block stack's phases (each matmul,
attention, the small ops), the LM head, its argmax, and the rest (Python, embedding, final norm, RoPE rows).

Builds the kernels with -DGS_PROFILE (block.c's phase timers; a normal build has none) and decodes greedily after
a prompt through the call `gemmaspec generate --drafter none` takes (forward_logits: the blocks, the head and its
argmax in one C call, the logits and hidden rows left in the call's buffers; an int8 / int4 head of one row finds
its argmax as it computes the logits: "head" includes it, "argmax" is then 0). Each matmul's rate is its weight bytes over its time.
The machine is shared: run it on an idle machine and compare phases within one run.

    python scripts/profile_step.py [--weights auto|bf16|int8|int4] [--prompt-tokens 256] [--steps 128] [--threads N]
        [--rows T]   (T tokens per step, as a verification of T - 1 drafts; the cache keeps one of them)
        [--define NAME=VALUE ...]   (extra -D for the kernels' build: an A/B experiment)
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import statistics
import time

import torch

from gemmaspec import kernels
from gemmaspec.loading import load_model
from gemmaspec.quant import weight_bytes

PHASES = ("qkv", "o", "gate_up", "down", "attention", "other", "head", "argmax")  # block.c's PH_* order
BLOCK_PHASES = 6
PROFILE_BLOCKS = 64  # block.c's
MATMULS = ("qkv", "o", "gate_up", "down")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rows", type=int, default=1, help="tokens per step: k + 1 is a verification of k drafts")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=VALUE",
                    help="an extra -D for the kernels' build (an experiment, e.g. ATTENTION_THREADED_WORK=65536)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    profiled = kernels.build_variant("GS_PROFILE", *args.define)
    kernels._state["kernels"] = profiled  # every caller of kernels.load() gets the timed build
    seconds = (ctypes.c_double * len(PHASES)).in_dll(profiled.lib, "gs_profile_seconds")
    per_block = ((ctypes.c_double * len(PHASES)) * PROFILE_BLOCKS).in_dll(profiled.lib, "gs_profile_block_seconds")

    model = load_model("default", dtype=args.dtype, device="cpu", weights=args.weights).model
    torch.manual_seed(0)
    prompt = torch.randint(1000, 20000, (args.prompt_tokens,))
    cache = model.new_cache(args.prompt_tokens + args.steps + args.rows + 8)
    with torch.inference_mode():
        hidden = model(prompt, cache)[-1:]
        token = int(model.logits(hidden).argmax(-1))
        steps, phases = [], []  # per step: seconds, of which each phase
        by_format = collections.defaultdict(list)  # (matmul, format): seconds of each layer's call, every step
        for _ in range(args.steps):
            before = list(seconds)
            before_block = [list(b) for b in per_block]
            t0 = time.perf_counter()
            _, _, best = model.forward_logits([token] * args.rows, cache, logits=False, hidden=False)
            token = best[0]
            steps.append(time.perf_counter() - t0)
            cache.rollback(cache.length - args.rows + 1)  # a verification keeps one token here
            phases.append([a - b for a, b in zip(seconds, before)])
            for i, name in enumerate(MATMULS):  # by weight format: the same phase may mix formats
                for layer, now, then in zip(model.layers, per_block, before_block):
                    by_format[format_of(getattr(layer, f"{name}_proj"), name)].append(now[i] - then[i])

    nbytes = {name: sum(weight_bytes(getattr(layer, f"{name}_proj")) for layer in model.layers)
              for name in ("qkv", "o", "gate_up", "down")}
    ms = lambda values: statistics.median(values) * 1e3  # noqa: E731 (medians: the machine is shared)
    step_ms = ms(steps)
    print(f"{args.weights} weights, {args.dtype} dtype, {torch.get_num_threads()} threads, prompt {args.prompt_tokens}, "
          f"{args.steps} steps of {args.rows} token(s): median step {step_ms:.2f} ms ({1e3 / step_ms:.1f} steps/s)")
    nbytes["head"] = weight_bytes(model.lm_head)
    for i, name in enumerate(PHASES):
        t = ms([p[i] for p in phases])
        rate = f"{nbytes[name] / t / 1e6:5.1f} GB/s ({nbytes[name] / 1e6:.1f} MB)" if name in nbytes else ""
        print(f"  {name:10s} {t:6.3f} ms  {rate}")
        if i == BLOCK_PHASES - 1:
            blocks = ms([sum(p[:BLOCK_PHASES]) for p in phases])
            block_bytes = sum(nbytes[n] for n in PHASES[:BLOCK_PHASES] if n in nbytes)
            print(f"  blocks     {blocks:6.3f} ms  {block_bytes / blocks / 1e6:5.1f} GB/s over their weights")
    print(f"  the rest   {ms([s - sum(p) for s, p in zip(steps, phases)]):6.3f} ms  (Python, embedding, final norm, "
          "RoPE rows)")
    print("  by weight format (median call):")
    for (name, fmt), values in sorted(by_format.items()):
        layers = [layer for layer in model.layers if format_of(getattr(layer, f"{name}_proj"), name) == (name, fmt)]
        t = statistics.median(values)
        print(f"    {name:8s} {fmt:16s} x{len(layers):<3d} {t * 1e6:7.1f} us  "
              f"{weight_bytes(getattr(layers[0], f'{name}_proj')) / t / 1e9:5.1f} GB/s")


def format_of(linear, name: str) -> tuple[str, str]:
    """(matmul name, its weight format: int bits / group size, "+bias" with per-group minimums, or the dtype)."""
    q = linear.qweight
    if q is None:
        return name, str(linear.weight.dtype).replace("torch.", "")
    return name, f"int{q.bits}/{q.group}" + ("+bias" if q.bias is not None else "")


if __name__ == "__main__":
    main()
