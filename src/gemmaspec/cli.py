"""Command line: `gemmaspec generate | chat | serve | bench | doctor | train-drafter`.

User errors print one line on stderr and exit non-zero; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import GemmaspecError


def _add_model_args(p: argparse.ArgumentParser, drafter_default: str = "auto") -> None:
    p.add_argument("--model", default="default", help="'default', an HF model folder, or a .gguf file")
    p.add_argument("--drafter", default=drafter_default, help="auto, none, ngram, mtp, mtp:PATH, draft:PATH")
    p.add_argument("--draft-tokens", default="auto", help="tokens drafted per step: an integer or 'auto' (adaptive)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--weights", default="auto", choices=["auto", "float", "bf16", "int8", "int4"],
                   help="how weights are held in memory (auto keeps a quantized file's precision where fast)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: PyTorch's choice, capped by a container's CPU quota)")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_default: int = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_default)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemmaspec", description="Fast, lossless speculative decoding for Gemma.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a continuation of PROMPT")
    g.add_argument("prompt")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object with text, token ids and stats")
    g.add_argument("--no-stream", action="store_true", help="print the text only when done")

    c = sub.add_parser("chat", help="interactive chat (chat template, streamed tokens)")
    _add_model_args(c)
    _add_sampling_args(c, max_new_default=512)
    c.add_argument("--system", default=None, help="system prompt")

    for name, module in _EXTRA_COMMANDS.items():
        try:
            mod = __import__(f"gemmaspec.{module}", fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub)
    return parser


# Sub-commands that live in their own modules, registered when present: name -> module exposing
# add_parser(subparsers) which sets `func` on its parser.
_EXTRA_COMMANDS = {"serve": "server", "bench": "bench.cli", "doctor": "doctor", "train-drafter": "train.cli"}


def _load_engine(args):
    from .engine import Engine
    from .drafters import make_drafter
    from .loading import load_model

    target = load_model(args.model, dtype=args.dtype, device=args.device, weights=args.weights)
    for note in target.notes:
        print(f"note: {note}", file=sys.stderr)
    return Engine(target, make_drafter(args.drafter, target), args.draft_tokens)


def _sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop)


def cmd_generate(args) -> int:
    from .draft_length import parse_draft_tokens

    parse_draft_tokens(args.draft_tokens)  # fail on a bad flag before loading anything
    engine = _load_engine(args)
    kwargs = _sampling_kwargs(args)
    if args.json:
        result = engine.generate(args.prompt, chat=args.chat, **kwargs)
        print(json.dumps(result.to_dict()))
        return 0
    result = None
    for chunk in engine.stream(args.prompt, chat=args.chat, **kwargs):
        if not args.no_stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        result = chunk.result or result
    if args.no_stream:
        sys.stdout.write(result.text)
    s = result.stats
    print(
        f"\n[{s.new_tokens} tokens, {s.tokens_per_second:.1f} tok/s, drafter {s.drafter}, "
        f"mean accepted length {s.mean_accepted_length:.2f}, acceptance {s.acceptance_rate:.0%}, "
        f"{s.dtype} on {s.device}]",
        file=sys.stderr,
    )
    return 0


def cmd_chat(args) -> int:
    engine = _load_engine(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if not engine.tokenizer.has_chat_template:
        print("note: the model has no chat template; using the Gemma family's template", file=sys.stderr)
    print("Chat with the model; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line})
        reply, result = "", None
        for chunk in engine.stream(messages=messages, **_sampling_kwargs(args)):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            reply += chunk.text
            result = chunk.result or result
        s = result.stats
        print(f"\n[{s.tokens_per_second:.1f} tok/s, mean accepted length {s.mean_accepted_length:.2f}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"generate": cmd_generate, "chat": cmd_chat}
    handler = handlers.get(args.command) or getattr(args, "func", None)
    try:
        from .cpu_threads import configure_threads

        configure_threads(getattr(args, "threads", None))
        return handler(args) or 0
    except GemmaspecError as e:
        if args.debug:
            raise
        print(f"gemmaspec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except MemoryError:
        if args.debug:
            raise
        print("gemmaspec: error: out of memory", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
