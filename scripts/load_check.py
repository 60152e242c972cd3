#!/usr/bin/env python
"""Load check for `gemmaspec serve`: N concurrent OpenAI clients for S seconds; zero errors expected.

    python scripts/load_check.py                          # starts `gemmaspec serve` on the default model
    python scripts/load_check.py --url http://127.0.0.1:8000 [--api-key KEY] [--pid PID]
    python scripts/load_check.py --seconds 10 --clients 4 --model PATH --drafter ngram   # a short smoke run

Each client loops over streamed chat, plain chat and completion requests; every `--abandon-every`-th request is
a stream it drops after a few chunks (a client that disconnects; not an error). Reports errors, the server's
RSS at start and end (VmRSS from /proc/PID/status), tokens/s and mean accepted length from /metrics, and
exits non-zero on any error or if the server died.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai

PROMPTS = [
    "Write a Python function that checks whether a number is prime, with a docstring.",
    "Explain in three sentences why the sky is blue.",
    "List the days of the week, one per line, then list them again in reverse order.",
    "Translate to French: The cat sits on the mat. The cat sits on the mat again.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server; omit to start one")
    p.add_argument("--api-key", default=None)
    p.add_argument("--pid", type=int, default=None, help="server PID for RSS (found from the port when omitted)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--abandon-every", type=int, default=10, help="drop every N-th stream mid-way (0: never)")
    p.add_argument("--model", default="default", help="when starting a server: --model for `gemmaspec serve`")
    p.add_argument("--drafter", default="auto", help="when starting a server")
    p.add_argument("--dtype", default="auto", help="when starting a server")
    p.add_argument("--threads", type=int, default=None, help="when starting a server")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p.parse_args()


# ---- server process -----------------------------------------------------------------------------------------

def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "gemmaspec.cli", "serve", "--model", args.model, "--drafter", args.drafter,
           "--dtype", args.dtype, "--port", str(port)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    print("starting:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    threading.Thread(target=lambda: [sys.stderr.write("server: " + line) for line in proc.stderr], daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # the first run converts the default GGUF
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"load_check: the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("load_check: the server did not become healthy")


def pid_listening_on(url: str) -> int | None:
    port = httpx.URL(url).port or 80
    try:
        import psutil
    except ImportError:
        return None
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return conn.pid
    except (psutil.AccessDenied, PermissionError):
        return None
    return None


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("gemmaspec_") and "{" not in line:
            name, value = line.split()
            out[name[len("gemmaspec_"):]] = float(value)
    return out


# ---- clients --------------------------------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = Counter()
        self.errors: list[str] = []
        self.latencies: list[float] = []

    def add(self, key: str, n: int = 1):
        with self.lock:
            self.counts[key] += n

    def error(self, message: str):
        with self.lock:
            self.counts["errors"] += 1
            if len(self.errors) < 10:
                self.errors.append(message)


def client_loop(i: int, client: openai.OpenAI, model: str, args, deadline: float, tally: Tally):
    n = 0
    while time.time() < deadline:
        n += 1
        prompt = PROMPTS[(i + n) % len(PROMPTS)]
        kind = ("stream", "chat", "completion")[n % 3]
        abandon = args.abandon_every and n % args.abandon_every == 0
        t0 = time.time()
        try:
            if kind == "stream" or abandon:
                stream = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                    temperature=0.7, seed=n, stream=True, stream_options={"include_usage": True})
                finish, usage = None, None
                for k, chunk in enumerate(stream):
                    if abandon and k == 3:
                        break
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                    usage = chunk.usage or usage
                stream.close()
                if abandon:
                    tally.add("abandoned")
                    continue
                if finish is None or usage is None:
                    raise RuntimeError(f"stream ended without finish_reason/usage (finish={finish})")
                tally.add("tokens", usage.completion_tokens)
            elif kind == "chat":
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=args.max_tokens, temperature=0)
                if r.choices[0].message.content is None:
                    raise RuntimeError("chat reply without content")
                tally.add("tokens", r.usage.completion_tokens)
            else:
                r = client.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=0)
                tally.add("tokens", r.usage.completion_tokens)
            tally.add("ok")
            tally.add(kind)
            with tally.lock:
                tally.latencies.append(time.time() - t0)
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            tally.error(f"client {i} {kind}: {type(e).__name__}: {e}")


def main() -> int:
    args = parse_args()
    proc = None
    if args.url:
        url = args.url.rstrip("/")
        pid = args.pid or pid_listening_on(url)
    else:
        proc, url = start_server(args)
        pid = proc.pid
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"]
        model = models[0]["id"]
        # One warm-up request so the first measured one does not pay one-time costs.
        client = openai.OpenAI(base_url=url + "/v1", api_key=args.api_key or "none", max_retries=0, timeout=600,
                               http_client=httpx.Client(limits=httpx.Limits(max_connections=args.clients * 2)))
        client.completions.create(model=model, prompt="Hello", max_tokens=4)
        rss_start, before = rss_mib(pid), scrape(url)
        tally = Tally()
        t0 = time.time()
        deadline = t0 + args.seconds
        threads = [threading.Thread(target=client_loop, args=(i, client, model, args, deadline, tally), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        time.sleep(0.5)  # let the server finish accounting for abandoned streams
        rss_end, after = rss_mib(pid), scrape(url)
        alive = httpx.get(url + "/health", timeout=10).status_code == 200 and (proc is None or proc.poll() is None)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()

    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    lat = sorted(tally.latencies)
    report = {
        "url": url, "model": model, "clients": args.clients, "seconds": round(wall, 1),
        "requests_ok": tally.counts["ok"], "requests_abandoned": tally.counts["abandoned"],
        "errors": tally.counts["errors"], "error_samples": tally.errors, "server_alive": alive,
        "server_pid": pid, "rss_mib_start": rss_start and round(rss_start, 1), "rss_mib_end": rss_end and round(rss_end, 1),
        "completion_tokens_received": tally.counts["tokens"],
        "server_tokens_per_second_wall": round(tally.counts["tokens"] / wall, 2) if wall else 0.0,
        # From /metrics, over this run only (counter deltas) and since the server started (gauges).
        "tokens_per_second": round(d["finished_generation_tokens_total"] / d["decode_seconds_total"], 2)
        if d.get("decode_seconds_total") else 0.0,
        "mean_accepted_length": round(d["decode_tokens_total"] / d["target_forward_passes_total"], 3)
        if d.get("target_forward_passes_total") else 1.0,
        "acceptance_rate": round(d["accepted_tokens_total"] / d["drafted_tokens_total"], 3) if d.get("drafted_tokens_total") else 0.0,
        "metrics_gauges": {k: after.get(k) for k in ("tokens_per_second", "mean_accepted_length", "acceptance_rate")},
        "latency_p50_s": round(lat[len(lat) // 2], 2) if lat else None,
        "latency_p95_s": round(lat[int(len(lat) * 0.95)], 2) if lat else None,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['clients']} clients for {report['seconds']} s against {url} ({model})")
        print(f"  requests ok: {report['requests_ok']}, abandoned streams: {report['requests_abandoned']}, "
              f"errors: {report['errors']}, server alive: {alive}")
        for e in tally.errors:
            print("    " + e)
        print(f"  server RSS: {report['rss_mib_start']} MiB at start -> {report['rss_mib_end']} MiB at end (pid {pid})")
        print(f"  tokens/s (decode, /metrics): {report['tokens_per_second']}, mean accepted length: "
              f"{report['mean_accepted_length']}, acceptance rate: {report['acceptance_rate']}")
        print(f"  tokens/s delivered to all clients: {report['server_tokens_per_second_wall']}, "
              f"latency p50 {report['latency_p50_s']} s, p95 {report['latency_p95_s']} s")
    return 0 if report["errors"] == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
