"""The `gemmaspec bench` sub-command."""

from __future__ import annotations

import argparse
import shlex

from ..errors import GemmaspecError

DEFAULT_DRAFTERS = "none,ngram,mtp"

EPILOG = """\
drafter names (--drafters, comma-separated):
  none, ngram, mtp, mtp:PATH, draft:PATH, auto     as for `gemmaspec generate --drafter`
  NAME@K                                            that drafter with a fixed draft length K (or @auto),
                                                    e.g. none,ngram@2,ngram@4,ngram@6,ngram@8,ngram
                                                    compares `auto` with every fixed K in one run
  `none` (plain decoding) always runs: it is the baseline for speedup and for matches_baseline.
  Default: none,ngram,mtp (a drafter this build or model lacks is skipped with a note).

peers:
  --peers hf        the same prompts through transformers' generate: hf:none (greedy), hf:ngram (prompt
                    lookup), hf:draft (assistant_model, when a draft:PATH drafter is listed)
  --endpoint URL    the same prompts against an OpenAI-compatible server (drafter name `endpoint`);
                    point --model at the model it serves so outputs can be compared

output (under --out): results.json (per prompt and drafter, plus a per-category summary), details.json
(first-token and wall times, every repeat, the text), report.md (the table) and speedup.png.
speedup = tokens/s over drafter `none` on the same prompt in the same run, median over prompts.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..cli import _add_model_args

    p = subparsers.add_parser(
        "bench", help="time drafters (and peers) side by side on a prompt suite",
        description="Time every drafter on every prompt, interleaved in one run, greedy, against plain decoding.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default=None,
                   help="JSONL prompt file(s), comma-separated (default: the shipped public suite)")
    p.add_argument("--drafters", default=None, help=f"comma-separated drafter names, NAME@K allowed (default: {DEFAULT_DRAFTERS})")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default="bench-results", help="output folder (default: ./bench-results)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per prompt and drafter; the median is kept")
    p.add_argument("--categories", default=None, help="only these categories, comma-separated")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts of each category")
    p.add_argument("--peers", default=None, help="comparison peers, comma-separated: hf")
    p.add_argument("--endpoint", default=None, help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint-model", default=None, help="model name to request from --endpoint (default: its first in /v1/models)")
    p.add_argument("--endpoint-timeout", type=float, default=600.0, help="seconds per endpoint request")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_args(p, drafter_default=None)
    for action in p._actions:  # bench takes --drafters (a list); hide generate's single --drafter
        if action.dest == "drafter":
            action.help = argparse.SUPPRESS
    p.set_defaults(func=cmd_bench)
    return p


def _split(value: str | None) -> list[str]:
    return [s.strip() for s in (value or "").split(",") if s.strip()]


def command_line(args) -> str:
    """The run as one reproducible command line (every effective option spelled out)."""
    parts = ["gemmaspec", "bench"] + (["--prompts", args.prompts] if args.prompts else [])
    parts += ["--drafters", args.drafters or DEFAULT_DRAFTERS, "--max-new-tokens", str(args.max_new_tokens),
              "--out", args.out, "--repeats", str(args.repeats), "--model", args.model, "--dtype", args.dtype,
              "--weights", args.weights, "--device", args.device, "--draft-tokens", str(args.draft_tokens)]
    for flag, value in (("--categories", args.categories), ("--limit", args.limit), ("--peers", args.peers),
                        ("--endpoint", args.endpoint), ("--endpoint-model", args.endpoint_model),
                        ("--threads", args.threads)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def cmd_bench(args) -> int:
    import sys
    from pathlib import Path

    from ..draft_length import parse_draft_tokens
    from .runner import BenchConfig, parse_drafter_specs, run_bench
    from .suite import load_prompts

    if args.drafter is not None:
        raise GemmaspecError("bench takes --drafters (a comma-separated list), not --drafter")
    # Check every flag before loading a model.
    draft_tokens = parse_draft_tokens(args.draft_tokens)
    specs = parse_drafter_specs(args.drafters, DEFAULT_DRAFTERS)
    prompts = load_prompts(_split(args.prompts) or None, _split(args.categories) or None, args.limit)
    peers = _split(args.peers)
    for peer in peers:
        if peer != "hf":
            raise GemmaspecError(f"--peers: unknown peer '{peer}' (known: hf)")
    config = BenchConfig(
        prompts=prompts, drafters=specs, max_new_tokens=args.max_new_tokens, out=Path(args.out),
        model=args.model, dtype=args.dtype, device=args.device, weights=args.weights, draft_tokens=draft_tokens,
        repeats=args.repeats, peers=peers, endpoint=args.endpoint, endpoint_model=args.endpoint_model,
        endpoint_timeout=args.endpoint_timeout, command=command_line(args), progress=not args.no_progress)
    results = run_bench(config)

    out = Path(args.out)
    overall = results["summary"].get("all") or next(iter(results["summary"].values()), {})
    line = ", ".join(f"{d} {s['speedup']:.2f}x" for d, s in overall.items() if d != "none" and s["speedup"] is not None)
    bad = sum(not r["matches_baseline"] for r in results["results"])
    print(f"median speedup over none: {line or '-'}", file=sys.stderr)
    if bad:
        print(f"warning: {bad} run(s) differ from plain decoding (see {out / 'report.md'})", file=sys.stderr)
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'speedup.png'}", file=sys.stderr)
    return 0
