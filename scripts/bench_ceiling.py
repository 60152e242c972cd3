#!/usr/bin/env python
"""How close plain decoding of one weight format gets to the machine's read bandwidth, moment by moment.

One process, interleaved: per prompt, a plain greedy decode (its weight bytes per second), the C pass that only
reads the same weights (bench_weights.py's "read pass"), a sum over one buffer as large as the weights, and a
single sum over 1 GiB; per round, the best of 9 sums over 1 GiB (bench_weights.py's limit). On a shared VM whose
bandwidth moves by 2x, the rounds show whether decoding follows the bandwidth (bound by memory) or stays flat
(bound by its own computing), and the ratios to the same-moment sum separate the two.

    python scripts/bench_ceiling.py [--weights int4] [--rounds 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import bench_weights as bw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    from gemmaspec.drafters import make_drafter
    from gemmaspec.engine import Engine
    from gemmaspec.quant import weight_bytes

    target, _ = bw.load_format(args.weights)
    engine = Engine(target, make_drafter("none", target), 0)
    nbytes = weight_bytes(target.model)
    reader = bw.weight_reader(engine.model)

    same, big = bw.filled_buffer(nbytes), bw.filled_buffer(2**30)
    engine.generate(bw.PROMPTS[0], max_new_tokens=4)
    timed = bw._timed

    rows: dict[str, list[float]] = {k: [] for k in ("limit", "sum_1g", "sum_same", "read_pass", "decode")}
    print(f"{args.weights}: {nbytes / 1e6:.1f} MB of weights per token; GB/s, one line per round (last prompt)")
    for r in range(args.rounds):
        for prompt in bw.PROMPTS:
            rows["decode"].append(bw.decode_tps(engine, prompt, args.max_new_tokens) * nbytes / 1e9)
            if reader is not None:
                rows["read_pass"].append(bw.read_only_tps(reader, args.max_new_tokens) * nbytes / 1e9)
            rows["sum_same"].append(nbytes / min(timed(same.sum) for _ in range(3)) / 1e9)
            rows["sum_1g"].append(2**30 / timed(big.sum) / 1e9)
        rows["limit"].append(2**30 / min(timed(big.sum) for _ in range(9)) / 1e9)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items() if v), flush=True)
    limit = statistics.median(rows["limit"])
    print("medians, GB/s: " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in rows.items() if v))
    print("of the limit (median of the best-of-9 sums): "
          + ", ".join(f"{k} {statistics.median(v) / limit:.0%}" for k, v in rows.items() if v))
    for k in ("decode", "read_pass", "sum_same"):
        if rows[k]:
            ratios = [a / b for a, b in zip(rows[k], rows["sum_1g"])]
            print(f"{k} over the 1 GiB sum timed next to it: median {statistics.median(ratios):.0%}")
    hot_matmul_rate(target.model)


def hot_matmul_rate(model) -> None:
    """One thread's rate over the first block's qkv matrix held in its L2 (called again and again): how fast a
    core computes this format's one-row matmul when memory is not in the way."""
    from gemmaspec import kernels

    w = model.layers[0].qkv_proj.qweight
    fast = kernels.load()
    if w is None or fast is None:
        return
    x = torch.randn(1, w.in_features)
    x8 = model.dtype == torch.bfloat16  # as the decode step computes it
    nbytes = sum(t.numel() * t.element_size() for t in (w.q, w.scales, w.bias) if t is not None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(50):
            fast.linear(w, x, x8=x8)
        best = min(timed_calls(lambda: fast.linear(w, x, x8=x8), 100) for _ in range(20))
    finally:
        torch.set_num_threads(threads)
    print(f"one thread, the first block's qkv matrix ({w.out_features} x {w.in_features}, {nbytes / 1e3:.0f} KB) "
          f"hot in its cache: {best * 1e6:.1f} us a call, {nbytes / best / 1e9:.1f} GB/s of weights")


def timed_calls(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


if __name__ == "__main__":
    main()
