"""`gemmaspec serve`: an OpenAI-compatible HTTP server on uvicorn.

    gemmaspec serve --model M --drafter D --host 127.0.0.1 --port 8000 [--api-key KEY]

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics.
The app lives in server_app.py, the engine worker and metrics in server_worker.py, request handling in
server_protocol.py and tool-call parsing in toolcalls.py. This module stays light: the CLI imports it.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from .errors import GemmaspecError


def add_parser(subparsers) -> None:
    from .cli import _add_model_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", default=os.environ.get("GEMMASPEC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GEMMASPEC_API_KEY, else no key)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    p.add_argument("--max-queue", type=int, default=256, help="requests allowed to wait (default 256); more get 503")
    p.add_argument("--default-max-tokens", type=int, default=1024,
                   help="chat reply length when a request sets no max_tokens (default 1024)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning; info logs each request)", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def served_model_name(spec: str) -> str:
    if spec in ("default", "", None):
        return "gemma-3-270m"
    path = Path(spec)
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def _check_port(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise GemmaspecError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise GemmaspecError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def cmd_serve(args) -> int:
    from .cli import _load_engine
    from .draft_length import parse_draft_tokens

    if not 0 <= args.port <= 65535:
        raise GemmaspecError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_queue < 1 or args.default_max_tokens < 1:
        raise GemmaspecError("--max-queue and --default-max-tokens must be at least 1")
    parse_draft_tokens(args.draft_tokens)
    _check_port(args.host, args.port)
    try:
        import uvicorn

        from .server_app import build_app
    except ImportError as e:
        raise GemmaspecError(f"the server needs fastapi and uvicorn ({e.name} is missing)") from None

    engine = _load_engine(args)
    engine.tokenizer.ids_that_may_end([])  # the vocabulary's token texts (~0.2 s) now, not in the first stop request
    name = args.served_model_name or served_model_name(args.model)
    app = build_app(engine, name, aliases=(args.model, "default") if args.model == "default" else (args.model,),
                    api_key=args.api_key, max_queue=args.max_queue, default_max_tokens=args.default_max_tokens)
    s = engine.drafter
    print(f"gemmaspec: serving '{name}' (drafter {getattr(s, 'name', 'none')}) on http://{args.host}:{args.port}/v1"
          + (" with an API key" if args.api_key else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.log_level in ("info", "debug"),
                timeout_graceful_shutdown=5)
    return 0
