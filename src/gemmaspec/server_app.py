"""The ASGI app of `gemmaspec serve`: OpenAI's /v1/chat/completions, /v1/completions and /v1/models,
plus /health and /metrics. Generation runs on the engine's one worker thread (server_worker.py)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import GemmaspecError
from .server_protocol import (APIError, ChatRequest, CompletionRequest, ToolText, parse_body, prepare_chat,
                              sampling_kwargs, template_renders_tools, validate)
from .server_worker import EngineWorker, Job, Metrics
from .toolcalls import parse_tool_calls, safe_prefix_length

log = logging.getLogger("gemmaspec.server")


class ClientGone(Exception):
    pass


def build_app(engine, model_name: str, aliases: tuple[str, ...] = (), api_key: str | None = None,
              max_queue: int = 256, default_max_tokens: int = 1024) -> FastAPI:
    metrics = Metrics(model_name)
    worker = EngineWorker(engine, metrics, max_queue)
    names = {model_name, *aliases}
    renders_tools = template_renders_tools(engine.tokenizer)
    vocab = getattr(engine.model.config, "vocab_size", None) or engine.tokenizer.vocab_size
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        await worker.start()
        yield
        await worker.stop()

    app = FastAPI(title="gemmaspec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics = worker, metrics

    # ---- errors: always OpenAI's body ----------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("internal error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", code="internal_error").body(), status_code=500)

    # ---- plain endpoints ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "waiting": worker.waiting, "busy": worker.busy}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(worker.waiting, worker.busy), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "gemmaspec",
                "context_length": engine.context_length}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card()

    def check_model(name: str | None) -> None:
        if name and name not in names:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    # ---- generation ----------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = validate(ChatRequest, parse_body(await request.body()))
        check_model(req.model)
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
        chat = prepare_chat(req, renders_tools)
        prompt_ids = await encode(messages=chat.messages, tools=chat.template_tools)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        kwargs = sampling_kwargs(req, len(prompt_ids), engine.context_length, default_max_tokens, requested)
        # chat=True: the prompt ids are already templated; it makes the engine stop at the end of the turn.
        job = worker.submit(dict(prompt=prompt_ids, chat=True, **kwargs))
        reply = Reply("chatcmpl", model_name, len(prompt_ids), chat.tool_names, ToolText(engine.tokenizer, kwargs["stop"]))
        return await respond(request, req, job, reply, reply.chat_events, reply.chat_response)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = validate(CompletionRequest, parse_body(await request.body()))
        check_model(req.model)
        for field, bad in (("best_of", req.best_of not in (None, 1)), ("logprobs", req.logprobs is not None),
                           ("suffix", bool(req.suffix))):
            if bad:
                raise APIError(400, f"'{field}' is not supported", param=field, code="unsupported_parameter")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt", code="invalid_value")
            prompt = prompt[0]
        if isinstance(prompt, list):
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
        prompt_ids = await encode(prompt=prompt)
        kwargs = sampling_kwargs(req, len(prompt_ids), engine.context_length, 16, req.max_tokens)
        job = worker.submit(dict(prompt=prompt_ids, **kwargs))
        echo = (prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)) if req.echo else ""
        reply = Reply("cmpl", model_name, len(prompt_ids), None, None, echo)
        return await respond(request, req, job, reply, reply.completion_events, reply.completion_response)

    async def respond(request: Request, req, job, reply, events, finish):
        """A stream of server-sent events, or the whole response once the job is done."""
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse(request, job, events(job, usage))
        try:
            result = await collect(request, job, reply)
        except ClientGone:
            return Response(status_code=499)
        return finish(result)

    async def encode(**kwargs) -> list[int]:
        try:
            return await run_in_threadpool(engine.encode_prompt, **kwargs)
        except GemmaspecError as e:
            raise APIError(400, str(e), param="messages" if "messages" in kwargs else "prompt", code="invalid_value") from None

    app.add_middleware(Gate, api_key=api_key, metrics=metrics)
    return app


async def collect(request: Request, job: Job, reply: "Reply"):
    """Run a non-streamed job to its end; cancel it if the client disconnects while it waits or runs."""
    try:
        while True:
            try:
                kind, chunk = await job.next_event(timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone() from None
                continue
            if kind == "end":
                if reply.result is None:
                    raise APIError(500, "generation ended without a result", code="internal_error")
                return reply.result
            reply.add(chunk)
    finally:
        job.cancel()  # no-op once finished; frees the engine if we are leaving early


def sse(request: Request, job: Job, events) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield "data: " + json.dumps(event, ensure_ascii=False) + "\n\n"
        except APIError as e:  # the status line is sent already: report in-band like OpenAI does
            yield "data: " + json.dumps(e.body()) + "\n\n"
        finally:
            job.cancel()  # the client left (this generator is cancelled) or we are done
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class Reply:
    """Builds OpenAI response objects and stream chunks from the engine's chunks."""

    def __init__(self, prefix: str, model: str, prompt_tokens: int, tool_names: list[str] | None,
                 tool_text: ToolText | None, echo: str = ""):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.tool_names = tool_names
        self.tool_text = tool_text
        self.echo = echo
        self.text = ""
        self.result = None

    def add(self, chunk) -> None:
        self.text += chunk.text
        if self.tool_text is not None:
            self.tool_text.add(chunk.text, chunk.token_ids)
        if chunk.result is not None:
            self.result = chunk.result

    def usage(self) -> dict:
        n = len(self.result.token_ids) if self.result else 0
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def speculative(self) -> dict | None:
        return self.result.stats.to_dict() if self.result else None

    def _common(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ---- chat ----------------------------------------------------------------------------------------------
    def chat_response(self, result) -> dict:
        content, calls = self.result.text, []
        if self.tool_names:
            parsed, calls = parse_tool_calls(self.tool_text.text, self.tool_names)
            if calls:
                content = parsed
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
        finish = "tool_calls" if calls else result.finish_reason
        return {**self._common("chat.completion"), "system_fingerprint": None,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": self.usage(), "speculative": self.speculative()}

    def _chat_chunk(self, delta: dict, finish: str | None = None, **extra) -> dict:
        return {**self._common("chat.completion.chunk"), "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}

    async def chat_events(self, job: Job, include_usage: bool):
        yield self._chat_chunk({"role": "assistant", "content": ""})
        sent = 0  # characters of tool_text streamed as content so far (tool requests only)
        holds = tuple(f"{n}(" for n in self.tool_names or ())
        while True:
            kind, chunk = await job.next_event()
            if kind == "end":
                break
            self.add(chunk)
            if not self.tool_names:
                if chunk.text:
                    yield self._chat_chunk({"content": chunk.text})
                continue
            # With tools, hold back text from where a tool call could begin; stream what comes before.
            text = self.tool_text.text.rstrip("\ufffd")
            cut = max(sent, safe_prefix_length(text, holds))
            if cut > sent:
                yield self._chat_chunk({"content": text[sent:cut]})
                sent = cut
        if self.result is None:
            raise APIError(500, "generation ended without a result", code="internal_error")
        finish = self.result.finish_reason
        if self.tool_names:
            tail = self.tool_text.text[sent:]
            content, calls = parse_tool_calls(tail, self.tool_names)
            if calls:
                if content:
                    yield self._chat_chunk({"content": content})
                yield self._chat_chunk({"tool_calls": [dict(c.to_openai(), index=i) for i, c in enumerate(calls)]})
                finish = "tool_calls"
            elif tail:
                yield self._chat_chunk({"content": tail})
        yield self._chat_chunk({}, finish, speculative=self.speculative())
        if include_usage:
            yield {**self._common("chat.completion.chunk"), "system_fingerprint": None, "choices": [],
                   "usage": self.usage(), "speculative": self.speculative()}

    # ---- completions -----------------------------------------------------------------------------------------
    def completion_response(self, result) -> dict:
        return {**self._common("text_completion"),
                "choices": [{"text": self.echo + result.text, "index": 0, "logprobs": None,
                             "finish_reason": result.finish_reason}],
                "usage": self.usage(), "speculative": self.speculative()}

    def _completion_chunk(self, text: str, finish: str | None = None, **extra) -> dict:
        return {**self._common("text_completion"),
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}], **extra}

    async def completion_events(self, job: Job, include_usage: bool):
        if self.echo:
            yield self._completion_chunk(self.echo)
        while True:
            kind, chunk = await job.next_event()
            if kind == "end":
                break
            self.add(chunk)
            if chunk.text:
                yield self._completion_chunk(chunk.text)
        if self.result is None:
            raise APIError(500, "generation ended without a result", code="internal_error")
        yield self._completion_chunk("", self.result.finish_reason, speculative=self.speculative())
        if include_usage:
            yield {**self._common("text_completion"), "choices": [], "usage": self.usage(),
                   "speculative": self.speculative()}


class Gate:
    """Pure ASGI middleware (safe for streaming): API-key check on /v1 and request counting for /metrics."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics") else "other"
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and path.startswith("/v1") and not self._authorized(scope):
                body = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key").body()
                await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.add_request(label, status[0])

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        return False
