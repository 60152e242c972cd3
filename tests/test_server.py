"""`gemmaspec serve`: the real server process spoken to with the official openai client, plus unit tests of the
tool-call parser and of the tool-call wire format (an in-process app over a scripted engine)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from gemmaspec.engine import GenerationResult, GenerationStats, StreamChunk
from gemmaspec.server_protocol import ChatRequest, prepare_chat, template_renders_tools
from gemmaspec.toolcalls import parse_tool_calls, safe_prefix_length

API_KEY = "test-key-123"
STATS_KEYS = {"prompt_tokens", "new_tokens", "target_forward_passes", "drafted_tokens", "accepted_tokens",
              "acceptance_rate", "mean_accepted_length", "prefill_seconds", "decode_seconds", "tokens_per_second",
              "drafter", "dtype", "device"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


# ---- the real server ------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _running_server(model: str, *extra: str, log_dir: Path):
    port = _free_port()
    cmd = [sys.executable, "-m", "gemmaspec.cli", "serve", "--model", model, "--threads", "1", "--port", str(port), *extra]
    log = open(Path(log_dir) / f"server-{port}.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail("server did not become healthy in 120 s")
            time.sleep(0.3)
        yield SimpleNamespace(base=base, proc=proc, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(tiny_gemma3_realtok_dir):
    with _running_server(str(tiny_gemma3_realtok_dir), "--drafter", "ngram", "--dtype", "float32", "--api-key", API_KEY,
                         "--served-model-name", "tiny", log_dir=tiny_gemma3_realtok_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _http(server) -> httpx.Client:
    return httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


def _metric(server, name: str) -> float:
    for line in httpx.get(server.base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_health_and_models(server, client):
    assert httpx.get(server.base + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_completion_plain_and_streamed(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 5 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    spec = r.model_extra["speculative"]
    assert STATS_KEYS <= set(spec) and spec["new_tokens"] == r.usage.completion_tokens and spec["drafter"] == "ngram"

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: streamed == non-streamed


def test_stream_ends_with_done(server):
    with _http(server) as http, http.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_completions(client):
    r = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    assert r.model_extra["speculative"]["new_tokens"] == 4
    chunks = list(client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=4,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    ids = client.completions.create(model="tiny", prompt=[2, 818, 5279], max_tokens=2, temperature=0)  # token ids
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 2


def _check_tool_reply(message, finish_reason):
    if message.tool_calls:
        assert finish_reason == "tool_calls"
        for call in message.tool_calls:
            assert call.type == "function" and call.function.name in ("get_weather", "search") and call.id
            assert isinstance(json.loads(call.function.arguments), dict)
    else:
        assert isinstance(message.content, str) and finish_reason in ("stop", "length")


def test_tool_call_request(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, SEARCH], max_tokens=6, temperature=0)
    _check_tool_reply(r.choices[0].message, r.choices[0].finish_reason)
    # A conversation that already holds a call and its result, streamed, with a forced tool.
    history = messages + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
    chunks = list(client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=6,
                                                 temperature=0, stream=True,
                                                 tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_concurrent_streaming_clients(client):
    results, errors = {}, []

    def run(i):
        try:
            stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Count to {i}"}],
                                                    max_tokens=4, temperature=0.7, seed=i, stream=True)
            chunks = list(stream)
            results[i] = ("".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 8
    assert all(finish in ("stop", "length") for _, finish in results.values())


def test_client_disconnect_mid_stream_frees_the_engine(server, client):
    cancelled = _metric(server, "gemmaspec_generations_cancelled_total")
    tokens = _metric(server, "gemmaspec_completion_tokens_total")
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Write a long story."}],
                                            max_tokens=400, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # drops the connection mid-stream
    deadline = time.time() + 20
    while _metric(server, "gemmaspec_generations_cancelled_total") <= cancelled:
        assert time.time() < deadline, "the server kept generating for a client that left"
        time.sleep(0.1)
    assert _metric(server, "gemmaspec_completion_tokens_total") - tokens < 400
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Still there?"}], max_tokens=2)
    assert r.usage.completion_tokens >= 1


def _assert_error(r: httpx.Response, status: int, param: str | None = "*", code: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "*":
        assert err["param"] == param
    if code:
        assert err["code"] == code


def test_bad_inputs_get_openai_errors(server, client):
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with _http(server) as http:
        chat = "/v1/chat/completions"
        _assert_error(http.post(chat, content=b"{not json", headers={"Content-Type": "application/json"}), 400, code="invalid_json")
        _assert_error(http.post(chat, content=b"[1, 2]"), 400)
        _assert_error(http.post(chat, json={"max_tokens": 2}), 400, "messages", "missing_required_parameter")
        _assert_error(http.post(chat, json={"messages": []}), 400, "messages")
        _assert_error(http.post(chat, json={"messages": "hi"}), 400, "messages")
        _assert_error(http.post(chat, json={"messages": [{"role": "wizard", "content": "x"}]}), 400, "messages.0.role")
        _assert_error(http.post(chat, json={"messages": [{"role": "user"}]}), 400, "messages.0.content")
        _assert_error(http.post(chat, json={**ok, "temperature": "hot"}), 400, "temperature")
        _assert_error(http.post(chat, json={**ok, "max_tokens": "5"}), 400, "max_tokens")
        _assert_error(http.post(chat, json={**ok, "max_tokens": 0}), 400, "max_tokens")
        _assert_error(http.post(chat, json={**ok, "max_tokens": -3}), 400, "max_tokens")
        _assert_error(http.post(chat, json={**ok, "max_completion_tokens": 0}), 400, "max_completion_tokens")
        _assert_error(http.post(chat, json={**ok, "n": 2}), 400, "n")
        _assert_error(http.post(chat, json={**ok, "temperature": 7}), 400, "temperature")
        _assert_error(http.post(chat, json={**ok, "stream": "yes"}), 400, "stream")
        _assert_error(http.post(chat, json={**ok, "tools": [{"type": "function"}]}), 400)
        _assert_error(http.post(chat, json={**ok, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                      400, "tool_choice")
        long = {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 2}
        _assert_error(http.post(chat, json=long), 400, code="context_length_exceeded")
        _assert_error(http.post(chat, json={**ok, "max_tokens": 100_000}), 400, code="context_length_exceeded")
        _assert_error(http.post(chat, json={**ok, "model": "gpt-4o"}), 404, "model", "model_not_found")
        _assert_error(http.post("/v1/completions", json={"prompt": "word " * 600}), 400, code="context_length_exceeded")
        _assert_error(http.post("/v1/completions", json={"prompt": ""}), 400, "prompt")
        _assert_error(http.post("/v1/completions", json={"prompt": ["a", "b"]}), 400, "prompt")
        _assert_error(http.post("/v1/completions", json={"prompt": [10**9]}), 400, "prompt")
        _assert_error(http.post("/v1/completions", json={"prompt": 5}), 400, "prompt")
        _assert_error(http.post("/v1/completions", json={}), 400, "prompt")
        _assert_error(http.get("/v1/nothing-here"), 404)
        _assert_error(http.get(chat), 405)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    # ... and the server keeps serving.
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.content is not None
    assert server.proc.poll() is None


def test_api_key(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    _assert_error(httpx.post(server.base + "/v1/chat/completions", json=body), 401, code="invalid_api_key")
    _assert_error(httpx.get(server.base + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    _assert_error(httpx.get(server.base + "/v1/models", headers={"Authorization": API_KEY}), 401)
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(server.base + "/health").status_code == 200  # health and metrics stay open
    assert httpx.get(server.base + "/metrics").status_code == 200


def test_metrics(server, client):
    client.completions.create(model="tiny", prompt="a b a b a b a b", max_tokens=6, temperature=0)
    text = httpx.get(server.base + "/metrics").text
    for name in ("requests_total", "prompt_tokens_total", "completion_tokens_total", "acceptance_rate",
                 "mean_accepted_length", "tokens_per_second"):
        assert f"# TYPE gemmaspec_{name} " in text
    assert _metric(server, "gemmaspec_completion_tokens_total") >= 6
    assert _metric(server, "gemmaspec_mean_accepted_length") >= 1.0
    assert _metric(server, "gemmaspec_tokens_per_second") > 0
    assert 'gemmaspec_requests_total{path="/v1/completions",code="200"}' in text


@pytest.mark.slow
def test_default_model_server(tmp_path):
    """The embedded default model behind the server: a tool request and a streamed chat, no errors."""
    with _running_server("default", "--drafter", "auto", log_dir=tmp_path) as srv:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=[WEATHER], max_tokens=24, temperature=0)
        _check_tool_reply(r.choices[0].message, r.choices[0].finish_reason)
        chunks = list(client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi!"}],
                                                     max_tokens=8, temperature=0, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert r.model_extra["speculative"]["new_tokens"] == r.usage.completion_tokens


# ---- the tool-call parser -------------------------------------------------------------------------------------

NAMES = ["get_weather", "search"]
PARSED = [
    # Gemma 3, as its function-calling guide prompts it: bare JSON, fenced JSON, a Python-style tool_code call.
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```', None, [("get_weather", {"city": "Paris"})]),
    ('I will check.\n```tool_code\nget_weather(city="Paris", days=3)\n```', "I will check.",
     [("get_weather", {"city": "Paris", "days": 3})]),
    ('```tool_code\n[get_weather(city="A"), search(q="b")]\n```', None, [("get_weather", {"city": "A"}), ("search", {"q": "b"})]),
    ('<tool_call>\n{"name": "search", "arguments": "{\\"q\\": \\"gemma\\"}"}\n</tool_call>', None, [("search", {"q": "gemma"})]),
    ('[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "search", "parameters": {"q": "b"}}]', None,
     [("get_weather", {"city": "A"}), ("search", {"q": "b"})]),
    ('{"type": "function", "function": {"name": "search", "arguments": {"q": "x"}}}', None, [("search", {"q": "x"})]),
    ('get_weather(city="Rome")', None, [("get_weather", {"city": "Rome"})]),
    # Gemma 4: <|tool_call>call:NAME{key:<|"|>str<|"|>,...}<tool_call|>, possibly several in a row.
    ('Let me look.<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:3,opts:{metric:true,tags:[<|"|>a<|"|>,2.5]}}<tool_call|>',
     "Let me look.", [("get_weather", {"city": "Paris, FR", "days": 3, "opts": {"metric": True, "tags": ["a", 2.5]}})]),
    ('<|tool_call>call:get_weather{city:<|"|>A<|"|>}<tool_call|><|tool_call>call:search{q:<|"|>say "hi"<|"|>}<tool_call|>', None,
     [("get_weather", {"city": "A"}), ("search", {"q": 'say "hi"'})]),
    ('<|tool_call>call:search{}<tool_call|>', None, [("search", {})]),
]
UNPARSED = [
    "The weather in Paris is sunny.",
    "",
    '{"name": "get_weather", "arguments": {"city": ',  # cut off by max_tokens
    '{"name": "launch_rockets", "arguments": {}}',  # not one of the request's tools
    '{"name": "get_weather", "arguments": [1, 2]}',  # arguments must be an object
    '{"name": "get_weather", "arguments": "not json"}',
    '<|tool_call>call:get_weather{city:<|"|>Par',  # Gemma 4 call cut off
    "<|tool_call>call:get_weather{city:}}}<tool_call|>",
    "```python\nimport os; os.system('x')\n```",
    'get_weather(city=open("/etc/passwd").read())',
    "Sets are {1, 2} and lists are [3, 4",
    "\ufffd\x00{[<tool_call>```",
]


@pytest.mark.parametrize("text,content,calls", PARSED)
def test_parser_finds_calls(text, content, calls):
    got_content, got = parse_tool_calls(text, NAMES)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    for c in got:
        wire = c.to_openai()
        assert wire["type"] == "function" and wire["id"].startswith("call_")
        assert json.loads(wire["function"]["arguments"]) == c.arguments


@pytest.mark.parametrize("text", UNPARSED)
def test_parser_leaves_other_text_as_content(text):
    assert parse_tool_calls(text, NAMES) == (text, [])


def test_safe_prefix_holds_back_possible_calls():
    assert safe_prefix_length("plain text") == len("plain text")
    assert safe_prefix_length('Sure. {"name"') == len("Sure. ")
    assert safe_prefix_length("ok ``") == len("ok ")
    assert safe_prefix_length("ok <|tool") == len("ok ")
    assert safe_prefix_length("call get_wea", ("get_weather(",)) == len("call ")


# ---- prompts for tools ------------------------------------------------------------------------------------------

def test_tools_go_into_the_system_turn_when_the_template_cannot_render_them():
    req = ChatRequest.model_validate({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "user", "content": "Thanks"}],
        "tools": [WEATHER, SEARCH], "tool_choice": "required"})
    chat = prepare_chat(req, renders_tools=False)
    system = chat.messages[0]
    assert system["role"] == "system" and "get_weather" in system["content"] and "JSON" in system["content"]
    assert system["content"].endswith("Be brief.") and "must call" in system["content"]
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user"]  # tool result merged into a user turn
    assert '"arguments": {"city": "Paris"}' in chat.messages[2]["content"] and "sunny" in chat.messages[3]["content"]
    assert chat.template_tools is None and chat.tool_names == ["get_weather", "search"]

    native = prepare_chat(req, renders_tools=True)  # Gemma 4: the template gets the tools and structured history
    assert native.template_tools[0]["function"]["name"] == "get_weather"
    assert native.messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert native.messages[3] == {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": "get_weather"}

    none = prepare_chat(ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
                                                    "tool_choice": "none"}), renders_tools=False)
    assert none.tool_names is None and none.messages == [{"role": "user", "content": "hi"}]


def test_template_renders_tools_probe():
    from gemmaspec.loading.tokenizer import _render

    def tok(template):
        return SimpleNamespace(has_chat_template=bool(template), apply_chat_template=lambda messages, tools=None: _render(
            template, messages=messages, tools=tools, add_generation_prompt=True, bos_token="<bos>"))

    assert template_renders_tools(tok("{% for t in tools or [] %}{{ t.function.name }}{% endfor %}{{ messages[0].content }}"))
    assert not template_renders_tools(tok("{{ messages[0].content }}"))
    assert not template_renders_tools(tok(None))


# ---- tool calls on the wire: the app in-process over a scripted engine ---------------------------------------------

class ScriptTokenizer:
    """Characters are tokens (id = ord + 10); ids 1-3 are Gemma 4's special tool-call markers."""
    SPECIAL = {1: "<|tool_call>", 2: "<tool_call|>", 3: '<|"|>'}
    has_chat_template = False
    vocab_size = 200

    def token_id(self, token):
        return {v: k for k, v in self.SPECIAL.items()}.get(token)

    def encode(self, text):
        ids, i = [], 0
        while i < len(text):
            for k, v in self.SPECIAL.items():
                if text.startswith(v, i):
                    ids.append(k)
                    i += len(v)
                    break
            else:
                ids.append(ord(text[i]) % 180 + 10)
                i += 1
        return ids

    def decode(self, ids, skip_special=True):
        return "".join(self.SPECIAL[i] if i in self.SPECIAL else chr(i - 10) for i in ids
                       if i not in self.SPECIAL or not skip_special)


class ScriptEngine:
    context_length = 4096

    def __init__(self):
        self.tokenizer = ScriptTokenizer()
        self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=200))
        self.drafter = None
        self.reply = ""
        self.messages = None

    def encode_prompt(self, prompt=None, messages=None, chat=False, tools=None):
        if messages is not None:
            self.messages = messages
            prompt = "\n".join(m["content"] or "" for m in messages)
        return prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def stream(self, prompt=None, *, max_new_tokens, stop=None, **kwargs):
        ids = self.tokenizer.encode(self.reply)[:max_new_tokens]
        stats = GenerationStats(prompt_tokens=len(prompt), new_tokens=len(ids), drafter="script")
        for i in range(0, len(ids), 4):  # four tokens per step, like a drafter with accepted drafts
            step = ids[i:i + 4]
            last = i + 4 >= len(ids)
            result = GenerationResult(self.tokenizer.decode(ids), ids, "stop", stats) if last else None
            yield StreamChunk(self.tokenizer.decode(step), step, result)


@pytest.fixture(scope="module")
def scripted():
    from fastapi.testclient import TestClient

    from gemmaspec.server_app import build_app

    engine = ScriptEngine()
    with TestClient(build_app(engine, "script")) as http:
        yield engine, openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)


SCRIPTS = [
    ('```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```', None, {"city": "Paris"}),
    ('Checking.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>', "Checking.", {"city": "Paris"}),
    ('The answer is {"name": oops', 'The answer is {"name": oops', None),
]


@pytest.mark.parametrize("script,content,arguments", SCRIPTS)
def test_tool_calls_on_the_wire(scripted, script, content, arguments):
    engine, client = scripted
    engine.reply = script
    kwargs = dict(model="script", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER], max_tokens=200)
    r = client.chat.completions.create(**kwargs)
    message = r.choices[0].message
    assert message.content == content
    if arguments is None:
        assert message.tool_calls is None and r.choices[0].finish_reason == "stop"
    else:
        assert r.choices[0].finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [("get_weather", arguments)]
    assert "get_weather" in engine.messages[0]["content"]  # tools went into the system turn

    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert streamed == (content or "")
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    if arguments is not None:
        assert len(calls) == 1 and calls[0].index == 0 and calls[0].id and calls[0].function.name == "get_weather"
        assert json.loads(calls[0].function.arguments) == arguments
    else:
        assert not calls


def test_scripted_plain_stream_is_not_held_back(scripted):
    engine, client = scripted
    engine.reply = "Hello there, no tools needed today."
    chunks = list(client.chat.completions.create(model="script", messages=[{"role": "user", "content": "hi"}],
                                                 tools=[WEATHER], max_tokens=200, stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == engine.reply and len(deltas) > 3  # streamed as it came, not in one piece at the end
