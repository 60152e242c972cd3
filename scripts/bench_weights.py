#!/usr/bin/env python
"""Low-bit weights (issue 9): plain-decode speed and quality of the default model per weight format.

    python scripts/bench_weights.py                        # decode tok/s + quality, all formats, one process
    python scripts/bench_weights.py --kernels              # the matmul micro-benchmark behind the kernel choice
    python scripts/bench_weights.py --max-new-tokens 16 --repeats 1 --formats float32,int4   # a smoke run

Decode: tokens/s of plain greedy decoding (drafter none) for float32, bf16, int8, int4 and auto (the GGUF's own
int8/int4 mix), same prompts, formats interleaved round by round, medians; next to llama.cpp on the same GGUF
when `llama-cpp-python` is installed. Each is also given as a fraction of its bandwidth limit = measured read
bandwidth / bytes of weights read per token (every matrix once; the tied embedding once, as the LM head), and
as a fraction of a pass that only reads those same weights (C, same threads), timed right after each run: this
VM's bandwidth moves by 2x within minutes, and a best-of-9 1 GiB sum catches its peaks where a generation
averages over them.

Quality, against bf16 weights (the unquantized model in the dtype users get) on the prompts of the bench suite
(`gemmaspec bench`'s 61 prompts, six categories): greedy continuations of each format compared position by
position with bf16's (free-running: one early difference changes everything after it) and with the common
prefix; teacher-forced agreement, the fraction of bf16's greedy tokens that the format also ranks first given
the same preceding tokens; and perplexity on a held-out text of a few hundred tokens, through the prompt path
(one long forward) and through the decode kernels (forwards of 8 tokens, whose rows equal one-token steps).

Machines are shared and noisy: quote the ratios measured side by side, not a lone absolute number.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

PROMPTS = [
    "def quicksort(items):\n    \"\"\"Sort a list with quicksort.\"\"\"\n",
    "The history of the printing press begins in",
    '{"users": [{"id": 1, "name": "Ada", "role": "admin"}, {"id": 2, "name": "',
    "Question: A train travels 60 km in 45 minutes. What is its average speed in km/h?\nAnswer:",
]

# Held-out text for perplexity (written for this benchmark, so no model has seen it verbatim).
HELD_OUT = """\
The lighthouse on the northern cape was built in 1871, after three ships were lost on the same reef in a
single winter. Its first keeper, a former schoolteacher named Elias Brandt, kept a logbook in which he wrote
down the weather every four hours, the ships that passed, and, in the margins, the names of the birds he saw.
For forty years the light burned paraffin. Every evening the keeper carried the fuel up one hundred and twelve
steps, trimmed the wick, and wound the clockwork that turned the lens. If the clockwork stopped, the beam stood
still, and a ship at sea could mistake the lighthouse for a house on the shore. Brandt wrote that on the
coldest nights he wound the mechanism every two hours, and that he slept in a chair beside the stairs so he
would hear it slow down.

In 1912 the paraffin lamp was replaced by an acetylene burner, and in 1954 by an electric lamp fed by a
cable from the village. The keepers stayed until 1987, when the light was automated. Today the tower is a
small museum. Visitors can climb the stairs, look through the lens, and read a copy of the first logbook.
The museum's guide likes to point out one entry from March 1880: "Wind north-west, strong. Sea heavy. No
ships. A pair of eiders on the rocks below; the male very bright. Wound the clock at two, at four, at six."

A lens of this kind works by bending light from a single flame into a narrow horizontal beam. Rings of glass
prisms above and below the centre catch the rays that would otherwise escape upward or downward and turn them
toward the horizon. The result is a beam that can be seen more than twenty nautical miles away on a clear
night, although fog can reduce that distance to a few hundred metres. For this reason the station also had a
fog horn, driven first by a hand pump and later by compressed air. The sound, two long notes every minute,
could be heard in the village, and older residents still remember falling asleep to it.
"""

FORMATS = ["float32", "bf16", "int8", "int4", "auto"]


# ---- memory bandwidth and bytes per token ------------------------------------------------------------------
def read_bandwidth_gbs(megabytes: int = 1024, repeats: int = 9) -> float:
    """Read bandwidth of a large INITIALISED tensor (torch.empty reads the shared zero page: fake numbers).

    The best of several passes: the limit the hardware allows, as the weight reads would see it. In 2 MB pages
    where the system gives them, as the weights are held (gemmaspec.hugepages): through 4 KB pages the same pass
    read up to 1.4x slower here, a limit the weights in huge pages could pass."""
    x = filled_buffer(megabytes * 2**20)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def filled_buffer(nbytes: int) -> torch.Tensor:
    """float32 values over `nbytes`, initialised (an empty tensor reads the zero page), in 2 MB pages where the
    system gives them."""
    from gemmaspec.hugepages import huge_buffer

    held = huge_buffer(nbytes)
    x = held.view(torch.float32) if held is not None else torch.empty(nbytes // 4)
    return x.copy_(torch.randn(x.numel()))


def weight_reader(model):
    """A C pass over the model's weights (every tensor a decode step reads, once), or None without the kernels."""
    from gemmaspec import kernels
    from gemmaspec.quant import weight_tensors

    fast = kernels.load()
    return kernels.ReadPass(fast, weight_tensors(model)) if fast is not None else None


def read_only_tps(reader, passes: int) -> float:
    """Tokens/s of a decode step that did nothing but read its weights, right now: `passes` passes (one a token),
    timed as a whole like a generation. Timed right after each decode run, it measures the same bytes, threads and
    moment of this shared VM's bandwidth as the run (a best-of-9 1 GiB sum catches its peaks)."""
    reader()
    t = time.perf_counter()
    for _ in range(passes):
        reader()
    return passes / (time.perf_counter() - t)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gguf_bytes_per_token(path) -> int:
    """llama.cpp reads every tensor of the file once per token (the tied embedding as its LM head)."""
    from gemmaspec.checks.files import read_gguf

    return sum(t.nbytes for t in read_gguf(path).tensors)


# ---- decode -----------------------------------------------------------------------------------------------
def load_format(fmt: str):
    from gemmaspec.loading import load_model

    # float32: the float32 reference. The others in the dtype users get by default (`--dtype auto`: bfloat16
    # activations and cache where the CPU computes bfloat16 natively, else float32); the C kernels widen bf16
    # weights and compute the int8/int4 matmuls in float32 either way.
    dtype = "float32" if fmt == "float32" else "auto"
    weights = "float" if fmt == "float32" else fmt
    t = time.perf_counter()
    target = load_model("default", dtype=dtype, device="cpu", weights=weights)
    return target, time.perf_counter() - t


def decode_tps(engine, prompt: str, max_new: int) -> float:
    result = engine.generate(prompt, max_new_tokens=max_new)
    return (result.stats.new_tokens - 1) / result.stats.decode_seconds  # decode passes (the first token: prefill)


def llama_cpp_tps(path, prompts: list[str], max_new: int, repeats: int, threads: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_batch=512, verbose=False, seed=0)
    rates = []
    for _ in range(repeats):
        for prompt in prompts:
            llm.reset()
            stamps = []
            for _chunk in llm(prompt, max_tokens=max_new, temperature=0.0, top_k=1, stream=True):
                stamps.append(time.perf_counter())
            if len(stamps) > 2:  # decode only: from the first streamed token to the last
                rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"tokens_per_second": statistics.median(rates)} if rates else None


# ---- quality ----------------------------------------------------------------------------------------------
def perplexity(target, text: str, chunk: int = 64) -> float:
    model, tok = target.model, target.tokenizer
    ids = tok.encode(text, add_bos=True)
    with torch.inference_mode():
        cache = model.new_cache(len(ids) + 8)
        hidden = model(torch.tensor(ids), cache)
        nll = 0.0
        for start in range(0, len(ids) - 1, chunk):
            stop = min(start + chunk, len(ids) - 1)
            logits = model.logits(hidden[start:stop])
            nll += F.cross_entropy(logits, torch.tensor(ids[start + 1:stop + 1]), reduction="sum").item()
    return math.exp(nll / (len(ids) - 1)), len(ids) - 1


def decode_perplexity(target, text: str, step: int = 8) -> float:
    """Perplexity as decoding computes it: forwards of `step` tokens through the decode / verification kernels
    (whose rows equal one-token steps bit for bit), where `perplexity` runs the prompt path (one long forward)."""
    model, tok = target.model, target.tokenizer
    ids = tok.encode(text, add_bos=True)
    nll = 0.0
    with torch.inference_mode():
        cache = model.new_cache(len(ids) + 8)
        for start in range(0, len(ids) - 1, step):
            stop = min(start + step, len(ids) - 1)
            logits = model.logits(model(torch.tensor(ids[start:stop]), cache))
            nll += F.cross_entropy(logits.float(), torch.tensor(ids[start + 1:stop + 1]), reduction="sum").item()
    return math.exp(nll / (len(ids) - 1))


def teacher_forced_agreement(target, prompt_ids: list[int], ref: list[int]) -> tuple[int, int]:
    """(positions where `target` ranks ref's token first given ref's preceding tokens, len(ref))."""
    model = target.model
    ids = list(prompt_ids) + list(ref)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), model.new_cache(len(ids) + 8))
        pred = model.logits(hidden[len(prompt_ids) - 1:len(ids) - 1]).argmax(-1).tolist()
    return sum(a == b for a, b in zip(pred, ref)), len(ref)


def agreement(ref: list[int], got: list[int]) -> tuple[float, int]:
    n = min(len(ref), len(got))
    same = sum(a == b for a, b in zip(ref, got))
    prefix = next((i for i in range(n) if ref[i] != got[i]), n)
    return same / max(1, max(len(ref), len(got))), prefix


def quality(engines: dict, results: dict, max_new: int, limit: int | None) -> None:
    """Agreement with the reference format (bf16 when measured) on the bench suite, and perplexity."""
    from gemmaspec.bench.suite import load_prompts

    ref_fmt = "bf16" if "bf16" in engines else next(iter(engines))
    ref_engine = engines[ref_fmt]
    prompts = load_prompts(limit=limit)
    encoded = [ref_engine.encode_prompt(p.prompt, chat=p.chat) for p in prompts]
    outputs = {fmt: [engine.generate(list(ids), max_new_tokens=max_new).token_ids for ids in encoded]
               for fmt, engine in engines.items()}
    for fmt, engine in engines.items():
        pairs = [agreement(ref, got) for ref, got in zip(outputs[ref_fmt], outputs[fmt])]
        forced = [teacher_forced_agreement(engine.target, ids, ref) for ids, ref in zip(encoded, outputs[ref_fmt])]
        ppl, n = perplexity(engine.target, HELD_OUT)
        results[fmt].update(quality_reference=ref_fmt, quality_prompts=len(prompts),
                            greedy_agreement=statistics.mean(f for f, _ in pairs),
                            common_prefix=statistics.mean(p for _, p in pairs),
                            teacher_forced_agreement=sum(a for a, _ in forced) / max(1, sum(n for _, n in forced)),
                            perplexity=ppl, perplexity_tokens=n,
                            decode_perplexity=decode_perplexity(engine.target, HELD_OUT))


# ---- kernel micro-benchmark -------------------------------------------------------------------------------
def kernel_table(shapes, Ms, repeats: int) -> list[dict]:
    """min and median ms of y = x @ W^T for each way of holding W, per shape and M, interleaved."""
    from gemmaspec.quant import kernels, quantize

    kern = kernels.load()
    rows = []
    for N, K in shapes:
        too_slow = set()  # candidates past 1 s at a smaller M are not run again at larger M
        W = torch.randn(N, K) * 0.02
        Wb = W.bfloat16()
        q8 = quantize(W, 8)
        q4 = quantize(W, 4)
        w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8)  # per-channel int8 for PyTorch's int8pack
        s8 = torch.rand(N) * 1e-3
        g = 32
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 1)
        sz = torch.stack([torch.rand(K // g, N), torch.randn(K // g, N)], -1)
        for M in Ms:
            x = torch.randn(M, K)
            xb = x.bfloat16()
            cands = {
                "f32 F.linear": lambda: F.linear(x, W),
                "bf16 F.linear": lambda: F.linear(xb, Wb),
                "torch int8pack (bf16 x)": lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, s8.bfloat16()),
                "torch int8pack (f32 x)": lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s8),
                "torch int4pack (bf16 x)": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w4, g, sz.bfloat16()),
                "torch int4pack (f32 x)": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, g, sz),
            }
            if kern is not None:
                cands["ours int8 (f32 x)"] = lambda: kern.linear(q8, x)
                cands["ours int4 (f32 x)"] = lambda: kern.linear(q4, x)
            cands = {name: fn for name, fn in cands.items() if name not in too_slow}
            reps = repeats if N * K > 1e7 else repeats * 10
            times = {name: [] for name in cands}
            for name, fn in cands.items():
                t = _timed(fn)
                if t > 1.0:  # one run is enough to rule it out
                    times[name] = [t * 1e3]
            cands = {name: fn for name, fn in cands.items() if not times[name]}
            for _ in range(reps):
                for name, fn in cands.items():
                    times[name].append(_timed(fn) * 1e3)
            for name, ts in times.items():
                rows.append({"shape": [N, K], "M": M, "kernel": name, "min_ms": min(ts),
                             "median_ms": statistics.median(ts)})
                if min(ts) > 1000:
                    too_slow.add(name)
            print(f"[{N},{K}] M={M}: " + "  ".join(f"{n}: {min(t):.2f}" for n, t in times.items()), flush=True)
    return rows


def print_kernel_table(rows):
    kernels_ = list(dict.fromkeys(r["kernel"] for r in rows))
    print("\nmin ms over repeats (median in parentheses), y = x[M,K] @ W[N,K]^T")
    print("| shape | M | " + " | ".join(kernels_) + " |")
    print("|---|---|" + "---|" * len(kernels_))
    keys = list(dict.fromkeys((tuple(r["shape"]), r["M"]) for r in rows))
    for shape, M in keys:
        cells = {r["kernel"]: r for r in rows if tuple(r["shape"]) == shape and r["M"] == M}
        print(f"| {list(shape)} | {M} | " + " | ".join(
            f"{cells[k]['min_ms']:.2f} ({cells[k]['median_ms']:.2f})" if k in cells else "skipped (>1 s)"
            for k in kernels_) + " |")


# ---- main -------------------------------------------------------------------------------------------------
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="rounds over all prompts and formats")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kernels", action="store_true", help="run the matmul micro-benchmark instead")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--quality-tokens", type=int, default=48, help="greedy tokens per suite prompt for agreement")
    p.add_argument("--quality-limit", type=int, default=None, help="only the first N suite prompts per category")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    if args.kernels:
        rows = kernel_table([(262144, 640), (2048, 640)], [1, 2, 5, 9], repeats=max(3, args.repeats))
        print_kernel_table(rows)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"threads": threads, "kernels": rows}, f, indent=1)
        return

    from gemmaspec.drafters import make_drafter
    from gemmaspec.engine import Engine
    from gemmaspec.loading import default_model_path
    from gemmaspec.quant import weight_bytes

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bandwidths = [read_bandwidth_gbs()]  # and after every round: this shared VM's bandwidth drifts
    print(f"threads {threads}; read bandwidth {bandwidths[0]:.1f} GB/s (best of 9 passes over 1 GiB)", flush=True)
    engines, info = {}, {}
    for fmt in formats:
        target, load_s = load_format(fmt)
        engines[fmt] = Engine(target, make_drafter("none", target), 0)
        info[fmt] = {"load_seconds": load_s, "bytes_per_token": weight_bytes(target.model), "notes": target.notes,
                     "dtype": str(target.model.dtype).replace("torch.", "")}
        print(f"loaded {fmt} ({info[fmt]['dtype']}) in {load_s:.1f} s: {info[fmt]['bytes_per_token'] / 1e6:.0f} MB per token; "
              f"{'; '.join(target.notes) or '-'}", flush=True)
    for engine in engines.values():  # warm up (kernel build, first-call allocations)
        engine.generate(PROMPTS[0], max_new_tokens=4)

    rates = {fmt: [] for fmt in formats}
    readers = {fmt: weight_reader(engine.model) for fmt, engine in engines.items()}
    read_fractions = {fmt: [] for fmt in formats}  # each run's tok/s over a read-only pass's right after it
    for _ in range(args.repeats):
        for prompt in PROMPTS:
            for fmt, engine in engines.items():
                rates[fmt].append(decode_tps(engine, prompt, args.max_new_tokens))
                if readers[fmt] is not None:
                    read_fractions[fmt].append(rates[fmt][-1] / read_only_tps(readers[fmt], args.max_new_tokens))
        bandwidths.append(read_bandwidth_gbs())
    bandwidth = statistics.median(bandwidths)
    results = {}
    for fmt in formats:
        tps = statistics.median(rates[fmt])
        limit = bandwidth * 1e9 / info[fmt]["bytes_per_token"]
        results[fmt] = dict(info[fmt], tokens_per_second=tps, limit_tokens_per_second=limit,
                            fraction_of_limit=tps / limit,
                            fraction_of_peak_limit=tps * info[fmt]["bytes_per_token"] / (max(bandwidths) * 1e9),
                            fraction_of_read_pass=statistics.median(read_fractions[fmt]) if read_fractions[fmt]
                            else None)
    path = default_model_path()
    llama = llama_cpp_tps(path, PROMPTS, args.max_new_tokens, args.repeats, threads)
    if llama is not None:
        nbytes = gguf_bytes_per_token(path)
        limit = bandwidth * 1e9 / nbytes
        results["llama.cpp"] = dict(llama, bytes_per_token=nbytes, limit_tokens_per_second=limit,
                                    fraction_of_limit=llama["tokens_per_second"] / limit,
                                    fraction_of_peak_limit=llama["tokens_per_second"] * nbytes / (max(bandwidths) * 1e9))

    if not args.no_quality:
        quality(engines, results, args.quality_tokens, args.quality_limit)

    base = results.get("float32", {}).get("tokens_per_second")
    print(f"\nplain decoding, default model, {args.max_new_tokens} new tokens x {len(PROMPTS)} prompts x "
          f"{args.repeats} rounds, medians; {threads} threads; bandwidth {bandwidth:.1f} GB/s (median of "
          f"{len(bandwidths)} measurements, {min(bandwidths):.1f}-{max(bandwidths):.1f})")
    ref = next((r["quality_reference"] for r in results.values() if "quality_reference" in r), None)
    if ref:
        n = next(r["quality_prompts"] for r in results.values() if "quality_prompts" in r)
        print(f"agreement with {ref} weights on {n} bench-suite prompts x {args.quality_tokens} greedy tokens: "
              "free-running (positions equal) / common prefix / teacher-forced")
    print("of read pass: the median of each run's tok/s over that of a pass that only read the same weights, timed "
          "right after it")
    print("| weights | MB/token | tok/s | vs float32 | limit tok/s | of limit | of peak | of read pass | agree | prefix | "
          "forced | ppl | decode ppl | load s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        vs = f"{r['tokens_per_second'] / base:.2f}x" if base else "-"
        q = (f"{r['greedy_agreement']:.0%} | {r['common_prefix']:.1f} | {r['teacher_forced_agreement']:.1%} | "
             f"{r['perplexity']:.2f} | {r['decode_perplexity']:.2f}" if "perplexity" in r else "- | - | - | - | -")
        print(f"| {name} | {r['bytes_per_token'] / 1e6:.0f} | {r['tokens_per_second']:.1f} | {vs} | "
              f"{r['limit_tokens_per_second']:.1f} | {r['fraction_of_limit']:.0%} | "
              f"{r['fraction_of_peak_limit']:.0%} | "
              f"{'-' if r.get('fraction_of_read_pass') is None else format(r['fraction_of_read_pass'], '.0%')} | {q} | "
              f"{r.get('load_seconds', float('nan')):.1f} |")
    if llama is None:
        print("(llama.cpp: `llama-cpp-python` is not installed; skipped)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": threads, "bandwidth_gbs": bandwidth, "bandwidth_measurements_gbs": bandwidths,
                       "max_new_tokens": args.max_new_tokens,
                       "repeats": args.repeats, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
