"""Plain decoding of the default model: ours vs transformers' `generate`, same dtype, one process, one run.

Prints tokens/s of both (median over prompts), their ratio, and ours as a fraction of the memory-bandwidth
limit = measured read bandwidth / bytes of weights read per token. The bandwidth of this shared VM moved
between 22 and 72 GB/s from one minute to the next, so it is measured (best of 9 passes over 1 GiB) right before
each of our decode runs: `ours_fraction_of_limit` is the median of the per-run fractions, and
`ours_fraction_of_peak_limit` takes the highest bandwidth seen in the whole run instead (the stricter figure).
`ours_fraction_of_read_pass`: the median of each run's tok/s over that of a C pass that only reads the same
weights (same threads), timed right after the run: the same bytes at the same moment (a best-of-9 sum catches
the bandwidth's peaks, a generation averages over them).

    python scripts/bench_plain.py [--dtype float32|bfloat16|auto] [--max-new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

# The same prompts and bandwidth measurement as the weight-format benchmark (scripts/ is on sys.path).
from bench_weights import PROMPTS, read_bandwidth_gbs, read_only_tps, weight_reader  # noqa: E402


def ours(engine, prompt: str, max_new: int) -> float:
    """Decode-only tokens/s: the decode passes over their time (the first token comes from the prefill, outside
    decode_seconds), as transformers_tps below counts them."""
    result = engine.generate(prompt, max_new_tokens=max_new)
    return (result.stats.new_tokens - 1) / result.stats.decode_seconds


def transformers_tps(model, ids: list[int], max_new: int) -> float:
    """Decode-only tokens/s: a full generate minus a 1-token generate (its prefill), same prompt."""
    inputs = torch.tensor([ids])
    t = time.perf_counter()
    model.generate(inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = model.generate(inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
    total = time.perf_counter() - t
    new = out.shape[1] - len(ids)
    return (new - 1) / max(total - prefill, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from gemmaspec.drafters import Drafter
    from gemmaspec.engine import Engine
    from gemmaspec.loading import load_model
    from gemmaspec.quant import weight_bytes

    target = load_model("default", dtype=args.dtype, device="cpu", weights=args.weights)
    engine = Engine(target, Drafter(), 0)
    engine.eos_ids = set()  # time exactly max_new_tokens for every prompt
    dtype = target.model.dtype
    hf = None if args.no_hf else AutoModelForCausalLM.from_pretrained(str(target.path), dtype=dtype).eval()
    ours(engine, PROMPTS[0], 8)  # warm-up
    if hf is not None:
        transformers_tps(hf, engine.encode_prompt(PROMPTS[0]), 8)

    reader = weight_reader(target.model)
    rows = []
    for _ in range(args.repeats):  # interleaved so machine noise hits both alike
        for prompt in PROMPTS:
            row = {"bandwidth": read_bandwidth_gbs()}
            row["ours"] = ours(engine, prompt, args.max_new_tokens)
            if reader is not None:
                row["read_pass"] = read_only_tps(reader, args.max_new_tokens)
            if hf is not None:
                row["hf"] = transformers_tps(hf, engine.encode_prompt(prompt), args.max_new_tokens)
            rows.append(row)
    nbytes = weight_bytes(target.model)
    bandwidth = statistics.median(r["bandwidth"] for r in rows)
    limit = bandwidth * 1e9 / nbytes
    ours_tps = statistics.median(r["ours"] for r in rows)
    fraction = statistics.median(r["ours"] * nbytes / (r["bandwidth"] * 1e9) for r in rows)
    report = {
        "dtype": str(dtype).replace("torch.", ""),
        "weights": args.weights,
        "threads": torch.get_num_threads(),
        "max_new_tokens": args.max_new_tokens,
        "ours_tokens_per_second": round(ours_tps, 2),
        "weight_megabytes_per_token": round(nbytes / 2**20, 1),
        "read_bandwidth_gb_s": round(bandwidth, 1),
        "read_bandwidth_range_gb_s": [round(min(r["bandwidth"] for r in rows), 1),
                                      round(max(r["bandwidth"] for r in rows), 1)],
        "bandwidth_limit_tokens_per_second": round(limit, 2),
        "ours_fraction_of_limit": round(fraction, 3),
        "ours_fraction_of_peak_limit": round(ours_tps * nbytes / (max(r["bandwidth"] for r in rows) * 1e9), 3),
    }
    if reader is not None:
        report["ours_fraction_of_read_pass"] = round(statistics.median(r["ours"] / r["read_pass"] for r in rows), 3)
    if hf is not None:
        hf_tps = statistics.median(r["hf"] for r in rows)
        report["transformers_tokens_per_second"] = round(hf_tps, 2)
        report["ratio_ours_over_transformers"] = round(statistics.median(r["ours"] / r["hf"] for r in rows), 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
