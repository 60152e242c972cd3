"""Where a plain decode step of the default model spends its time: the C block stack's phases (each matmul,
attention, the small ops), the final norm + LM head + argmax, and the rest (Python, embedding, RoPE tables).

Builds the kernels with -DGS_PROFILE (block.c's phase timers; a normal build has none) and decodes greedily after
a prompt, as `gemmaspec generate --drafter none` does. Each matmul's rate is its weight bytes over its time.
The machine is shared: run it on an idle machine and compare phases within one run.

    python scripts/profile_step.py [--weights auto|bf16|int8|int4] [--prompt-tokens 256] [--steps 128] [--threads N]
        [--rows T]   (T tokens per step, as a verification of T - 1 drafts; the cache keeps one of them)
        [--define NAME=VALUE ...]   (extra -D for the kernels' build: an A/B experiment)
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from gemmaspec import kernels
from gemmaspec.loading import load_model
from gemmaspec.quant import weight_bytes

PHASES = ("qkv", "o", "gate_up", "down", "attention", "other")  # block.c's PH_* order


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

    model = load_model("default", dtype=args.dtype, device="cpu", weights=args.weights).model
    torch.manual_seed(0)
    prompt = torch.randint(1000, 20000, (args.prompt_tokens,))
    cache = model.new_cache(args.prompt_tokens + args.steps + args.rows + 8)
    with torch.inference_mode():
        hidden = model(prompt, cache)[-1:]
        token = int(model.logits(hidden).argmax(-1))
        steps, heads, phases = [], [], []  # per step: seconds, of which LM head, of which each block phase
        for _ in range(args.steps):
            before = list(seconds)
            t0 = time.perf_counter()
            hidden = model(torch.tensor([token] * args.rows), cache)
            t1 = time.perf_counter()
            token = int(model.logits(hidden).argmax(-1)[0])
            t2 = time.perf_counter()
            cache.rollback(cache.length - args.rows + 1)  # a verification keeps one token here
            steps.append(t2 - t0)
            heads.append(t2 - t1)
            phases.append([a - b for a, b in zip(seconds, before)])

    nbytes = {name: sum(weight_bytes(getattr(layer, f"{name}_proj")) for layer in model.layers)
              for name in ("qkv", "o", "gate_up", "down")}
    head_bytes = weight_bytes(model.lm_head)
    ms = lambda values: statistics.median(values) * 1e3  # noqa: E731 (medians: the machine is shared)
    step_ms = ms(steps)
    print(f"{args.weights} weights, {args.dtype} dtype, {torch.get_num_threads()} threads, prompt {args.prompt_tokens}, "
          f"{args.steps} steps of {args.rows} token(s): median step {step_ms:.2f} ms ({1e3 / step_ms:.1f} steps/s)")
    for i, name in enumerate(PHASES):
        t = ms([p[i] for p in phases])
        rate = f"{nbytes[name] / t / 1e6:5.1f} GB/s ({nbytes[name] / 1e6:.1f} MB)" if name in nbytes else ""
        print(f"  {name:10s} {t:6.3f} ms  {rate}")
    blocks, head = ms([sum(p) for p in phases]), ms(heads)
    print(f"  blocks     {blocks:6.3f} ms  {sum(nbytes.values()) / blocks / 1e6:5.1f} GB/s over their weights")
    print(f"  LM head    {head:6.3f} ms  {head_bytes / head / 1e6:5.1f} GB/s ({head_bytes / 1e6:.1f} MB; with norm + argmax)")
    print(f"  the rest   {ms([s - h - sum(p) for s, h, p in zip(steps, heads, phases)]):6.3f} ms  (embedding, RoPE tables, Python)")

if __name__ == "__main__":
    main()
