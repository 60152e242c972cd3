"""The engine's one worker thread, the asyncio queue in front of it, and the server's metrics.

Requests become Jobs in an asyncio queue; a dispatcher task hands them one at a time to a single thread that
owns the Engine. The thread streams chunks back through the job's own asyncio queue and checks the job's
cancellation flag between chunks, so a client that goes away frees the engine after at most one decode step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from .errors import GemmaspecError
from .server_protocol import APIError

log = logging.getLogger("gemmaspec.server")


class Job:
    def __init__(self, kwargs: dict, loop: asyncio.AbstractEventLoop):
        self.kwargs = kwargs
        self.loop = loop
        self.cancelled = threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, kind: str, value=None) -> None:  # called from the worker thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: the server is shutting down
            self.cancelled.set()

    async def next_event(self, timeout: float | None = None):
        """The next ('chunk', StreamChunk) or ('end', None); errors are raised as APIError."""
        kind, value = await (asyncio.wait_for(self.events.get(), timeout) if timeout else self.events.get())
        if kind == "error":
            if isinstance(value, GemmaspecError):
                raise APIError(400, str(value), code="invalid_value")
            raise APIError(500, f"internal error: {type(value).__name__}: {value}", code="internal_error")
        return kind, value


class EngineWorker:
    def __init__(self, engine, metrics: "Metrics", max_queue: int = 256):
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemmaspec-engine")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.busy = False
        self.current: Job | None = None

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._dispatch())

    async def stop(self) -> None:
        """Cancel the running and the waiting jobs so that the worker thread ends promptly."""
        if self.task:
            self.task.cancel()
        if self.current:
            self.current.cancel()
        while self.queue and not self.queue.empty():
            self.queue.get_nowait().cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def waiting(self) -> int:
        return self.queue.qsize() if self.queue else 0

    def submit(self, kwargs: dict) -> Job:
        if self.waiting >= self.max_queue:
            raise APIError(503, f"the server is busy: {self.waiting} requests are waiting; retry later", code="server_busy")
        job = Job(kwargs, asyncio.get_running_loop())
        self.queue.put_nowait(job)
        return job

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            if job.cancelled.is_set():  # its client left while it waited
                self.metrics.add_cancelled()
                job.emit("end")
                continue
            self.busy, self.current = True, job
            try:
                await loop.run_in_executor(self.executor, self._run, job)
            except Exception:  # never let one job stop the dispatcher
                log.exception("engine job failed")
                job.emit("error", RuntimeError("the engine worker failed"))
            finally:
                self.busy, self.current = False, None

    def _run(self, job: Job) -> None:
        result, new_tokens = None, 0
        try:
            stream = self.engine.stream(**job.kwargs)
            try:
                for chunk in stream:
                    new_tokens += len(chunk.token_ids)
                    result = chunk.result or result
                    job.emit("chunk", chunk)
                    if job.cancelled.is_set():
                        break
            finally:
                stream.close()
        except Exception as e:  # noqa: BLE001 - handed to the request, which answers 4xx/5xx
            if not isinstance(e, GemmaspecError):
                log.exception("generation failed")
            job.emit("error", e)
            self.metrics.add_error()
            return
        if result is not None:
            self.metrics.add_result(result)
        else:
            self.metrics.add_cancelled(new_tokens)
        job.emit("end")


class Metrics:
    """Counters for /metrics (Prometheus text format). Written from the worker thread, read from the loop."""

    def __init__(self, model: str):
        self.model = model
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter = Counter()  # (path, status) -> count
        self.c = Counter()  # token and time totals

    def add_request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(path, status)] += 1

    def add_result(self, result) -> None:
        s = result.stats
        with self.lock:
            self.c["generations"] += 1
            self.c[f"finish_{result.finish_reason}"] += 1
            self.c["prompt_tokens"] += s.prompt_tokens
            self.c["completion_tokens"] += s.new_tokens
            self.c["finished_tokens"] += s.new_tokens
            self.c["drafted_tokens"] += s.drafted_tokens
            self.c["accepted_tokens"] += s.accepted_tokens
            self.c["forward_passes"] += s.target_forward_passes
            self.c["decode_tokens"] += max(s.new_tokens - 1, 0)  # the first token comes from the prefill
            self.c["decode_seconds"] += s.decode_seconds
            self.c["prefill_seconds"] += s.prefill_seconds

    def add_cancelled(self, new_tokens: int = 0) -> None:
        with self.lock:
            self.c["cancelled"] += 1
            self.c["completion_tokens"] += new_tokens

    def add_error(self) -> None:
        with self.lock:
            self.c["generation_errors"] += 1

    def render(self, waiting: int, busy: bool) -> str:
        with self.lock:
            c, requests = Counter(self.c), Counter(self.requests)
        acceptance = c["accepted_tokens"] / c["drafted_tokens"] if c["drafted_tokens"] else 0.0
        mal = c["decode_tokens"] / c["forward_passes"] if c["forward_passes"] else 1.0
        # Completed generations' tokens over their decode time: the engine's speed, not the server's load.
        tps = c["finished_tokens"] / c["decode_seconds"] if c["decode_seconds"] else 0.0
        out: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP gemmaspec_{name} {help}")
            out.append(f"# TYPE gemmaspec_{name} {kind}")
            for labels, value in samples:
                out.append(f"gemmaspec_{name}{labels} {_num(value)}")

        metric("requests_total", "counter", "HTTP requests by path and status code.",
               [(f'{{path="{p}",code="{s}"}}', n) for (p, s), n in sorted(requests.items())] or [("", 0)])
        metric("generations_total", "counter", "Generations finished, by finish reason.",
               [(f'{{finish_reason="{r}"}}', c[f"finish_{r}"]) for r in ("stop", "length")])
        metric("generations_cancelled_total", "counter", "Generations stopped or skipped because the client left.",
               [("", c["cancelled"])])
        metric("generation_errors_total", "counter", "Generations that failed.", [("", c["generation_errors"])])
        metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [("", c["prompt_tokens"])])
        metric("completion_tokens_total", "counter", "Tokens generated.", [("", c["completion_tokens"])])
        metric("drafted_tokens_total", "counter", "Tokens proposed by the drafter.", [("", c["drafted_tokens"])])
        metric("accepted_tokens_total", "counter", "Drafted tokens accepted by the target.", [("", c["accepted_tokens"])])
        metric("target_forward_passes_total", "counter", "Target decode forward passes.", [("", c["forward_passes"])])
        metric("finished_generation_tokens_total", "counter", "Tokens of finished generations.", [("", c["finished_tokens"])])
        metric("decode_tokens_total", "counter", "Tokens generated by decode passes (all but each reply's first).",
               [("", c["decode_tokens"])])
        metric("decode_seconds_total", "counter", "Seconds spent decoding.", [("", c["decode_seconds"])])
        metric("prefill_seconds_total", "counter", "Seconds spent on prefill.", [("", c["prefill_seconds"])])
        metric("acceptance_rate", "gauge", "Accepted / drafted tokens since start.", [("", acceptance)])
        metric("mean_accepted_length", "gauge", "Tokens per target decode forward pass since start.", [("", mal)])
        metric("tokens_per_second", "gauge", "Generated tokens per second of decode time since start.", [("", tps)])
        metric("queue_waiting", "gauge", "Requests waiting for the engine.", [("", waiting)])
        metric("engine_busy", "gauge", "1 while the engine is generating.", [("", int(busy))])
        metric("uptime_seconds", "gauge", "Seconds since the server started.", [("", time.time() - self.started)])
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"
