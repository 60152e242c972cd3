"""`--endpoint URL`: the suite against any OpenAI-compatible server (ours, vLLM, llama.cpp's server).

Completion prompts go to a streamed `/v1/completions`, chat prompts (`"chat": true`) to a streamed
`/v1/chat/completions`, greedy (temperature 0) with `max_tokens` = --max-new-tokens. Per request:

- first_token_seconds: request sent -> first chunk carrying text (time to first token, network included);
- decode_seconds: first text chunk -> last chunk, and tokens_per_second = new_tokens / decode_seconds, the
  engine's convention (the first token belongs to the prefill);
- new_tokens: `usage.completion_tokens` when the server reports it (we ask with
  `stream_options.include_usage`), else the number of chunks that carried text;
- acceptance_rate / mean_accepted_length: from a `speculative` object (top level of a chunk, or inside
  `usage`) when the server sends one, else null;
- matches_baseline: the streamed text equals the local `none` drafter's text for that prompt, so point
  --model at the same model the server serves.
"""

from __future__ import annotations

import json
import time

from ..errors import GemmaspecError
from .runner import Sample


def base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


class EndpointContestant:
    kind = "endpoint"
    label = "endpoint"

    def __init__(self, url: str, model: str | None = None, timeout: float = 600.0):
        import httpx

        self.url = base_url(url)
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=10.0))
        self.model = model or self._first_model()
        self.info = {"url": self.url, "served_model": self.model}

    def _first_model(self) -> str:
        import httpx

        try:
            r = self.client.get("/v1/models")
            r.raise_for_status()
            data = r.json().get("data") or []
        except (httpx.HTTPError, ValueError) as e:
            raise GemmaspecError(f"--endpoint {self.url}: cannot list models at /v1/models ({e}); "
                                 "name one with --endpoint-model") from None
        if not data or not data[0].get("id"):
            raise GemmaspecError(f"--endpoint {self.url}: /v1/models lists no model; name one with --endpoint-model")
        return data[0]["id"]

    def run(self, prompt, prompt_ids: list[int], max_new_tokens: int) -> Sample:
        import httpx

        body = {"model": self.model, "max_tokens": max_new_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        if prompt.chat:
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": prompt.prompt}]
        else:
            path = "/v1/completions"
            body["prompt"] = prompt.prompt
        text_parts: list[str] = []
        chunks_with_text = 0
        usage, speculative = None, None
        t_first = t_last = None
        t0 = time.perf_counter()
        try:
            with self.client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise GemmaspecError(f"--endpoint {self.url}{path}: HTTP {resp.status_code}: {resp.text[:200]}")
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except json.JSONDecodeError:
                        raise GemmaspecError(f"--endpoint {self.url}{path}: a stream event is not JSON: {data[:100]}") from None
                    if "error" in chunk:
                        raise GemmaspecError(f"--endpoint {self.url}{path}: {chunk['error']}")
                    now = time.perf_counter()
                    piece = _chunk_text(chunk)
                    if piece:
                        text_parts.append(piece)
                        chunks_with_text += 1
                        if t_first is None:
                            t_first = now
                        t_last = now
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    spec = chunk.get("speculative") or (chunk.get("usage") or {}).get("speculative")
                    if spec:
                        speculative = spec
        except httpx.HTTPError as e:
            raise GemmaspecError(f"--endpoint {self.url}{path}: {type(e).__name__}: {e}") from None
        t_end = time.perf_counter()
        if t_first is None:
            t_first = t_last = t_end
        n = (usage or {}).get("completion_tokens") or chunks_with_text
        spec = speculative or {}
        if spec.get("drafter"):
            self.info["server_drafter"] = spec["drafter"]
        return Sample(None, "".join(text_parts), int(n), t_first - t0, max(t_last - t_first, 0.0), t_end - t0,
                      acceptance_rate=_float(spec.get("acceptance_rate")),
                      mean_accepted_length=_float(spec.get("mean_accepted_length")))


def _chunk_text(chunk: dict) -> str:
    out = []
    for choice in chunk.get("choices") or []:
        if "text" in choice:
            out.append(choice.get("text") or "")
        delta = choice.get("delta") or {}
        out.append(delta.get("content") or "")
    return "".join(out)


def _float(x):
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None
