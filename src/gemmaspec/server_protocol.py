"""OpenAI request shapes for `gemmaspec serve`: validation, errors, chat messages and tools -> engine input."""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .toolcalls import GEMMA4_CALL_END, GEMMA4_CALL_START, GEMMA4_QUOTE, tool_instruction


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request models (strict: "5" is not a number, true is not an integer) ----------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class CallFunction(_Strict):
    name: str
    arguments: str | dict = "{}"


class MessageToolCall(_Strict):
    id: str | None = None
    type: str = "function"
    function: CallFunction


class ContentPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not in OpenAI's API; vLLM and llama.cpp accept it too
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    logprobs: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def validate(model: type[BaseModel], body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # Union members add their type name to the location; keep the field path only.
        param = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p)) or None
        missing = err["type"] == "missing"
        message = f"'{param}' is a required field" if missing else f"invalid '{param}': {err['msg']}"
        raise APIError(400, message, param=param, code="missing_required_parameter" if missing else "invalid_type") from None


def _is_type_tag(p) -> bool:
    """Pydantic names the member of a union it tried ('str', 'list[int]', 'NamedToolChoice'); fields are snake_case."""
    return isinstance(p, str) and (not re.fullmatch(r"[a-z_][a-z0-9_]*", p) or p in ("str", "int", "float", "bool", "dict", "list"))


# ---- sampling -------------------------------------------------------------------------------------------------

def sampling_kwargs(req: _Sampling, prompt_len: int, context: int, default_max: int, requested: int | None) -> dict:
    if req.n is not None and req.n != 1:
        raise APIError(400, f"only n=1 is supported, got n={req.n}", param="n", code="invalid_value")
    if requested is not None:
        name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        if requested < 1:
            raise APIError(400, f"{name} must be at least 1, got {requested}", param=name, code="invalid_value")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise APIError(400, f"temperature must be between 0 and 2, got {req.temperature}", param="temperature", code="invalid_value")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise APIError(400, f"top_p must be in (0, 1], got {req.top_p}", param="top_p", code="invalid_value")
    if req.top_k is not None and req.top_k < 0:
        raise APIError(400, f"top_k must be >= 0, got {req.top_k}", param="top_k", code="invalid_value")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if prompt_len >= context:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's maximum context length is {context} tokens",
                       param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
    room = context - prompt_len
    if requested is not None and requested > room:
        raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt has {prompt_len} "
                            f"and {requested} more were requested", param="max_tokens", code="context_length_exceeded")
    return dict(max_new_tokens=min(requested or default_max, room),
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed,
                stop=[s for s in stops if s])


# ---- chat messages and tools ------------------------------------------------------------------------------------

def _text(content, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"only text content parts are supported, got '{part.type}'", param=where, code="invalid_value")
        parts.append(part.text)
    return "".join(parts)


def _args_dict(arguments, where: str) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        raise APIError(400, "tool call arguments must be a JSON object", param=where, code="invalid_value") from None
    if not isinstance(value, dict):
        raise APIError(400, "tool call arguments must be a JSON object", param=where, code="invalid_value")
    return value


def template_renders_tools(tokenizer) -> bool:
    """Whether the model's chat template writes tool definitions into the prompt (Gemma 4's does, Gemma 3's not)."""
    if not tokenizer.has_chat_template:
        return False
    probe = "zz_probe_tool_4217"
    tool = {"type": "function", "function": {"name": probe, "description": "probe", "parameters": {"type": "object", "properties": {}}}}
    try:
        return probe in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[tool])
    except Exception:
        return False


class ChatInput:
    """What the engine gets for a chat request: template messages, tools for the template, tool names to parse."""

    def __init__(self, messages: list[dict], template_tools: list[dict] | None, tool_names: list[str] | None):
        self.messages, self.template_tools, self.tool_names = messages, template_tools, tool_names


def prepare_chat(req: ChatRequest, renders_tools: bool) -> ChatInput:
    if not req.messages:
        raise APIError(400, "'messages' must contain at least one message", param="messages", code="invalid_value")
    tools = [t.model_dump(exclude_none=True) for t in (req.tools or [])]
    choice = req.tool_choice
    required: bool | str = False
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise APIError(400, f"tool_choice names '{name}', which is not among 'tools'", param="tool_choice", code="invalid_value")
        required = name
    elif choice == "required":
        if not tools:
            raise APIError(400, "tool_choice 'required' needs 'tools'", param="tool_choice", code="invalid_value")
        required = True
    elif choice == "none":
        tools = []

    call_names: dict[str, str] = {}  # tool_call_id -> function name, to label tool results
    messages = []
    for i, m in enumerate(req.messages):
        where = f"messages.{i}"
        content = _text(m.content, f"{where}.content")
        role = "system" if m.role == "developer" else m.role
        if role in ("system", "user") and content is None:
            raise APIError(400, f"a {m.role} message needs 'content'", param=f"{where}.content", code="missing_required_parameter")
        msg: dict = {"role": role, "content": content}
        if m.tool_calls:
            calls = []
            for j, c in enumerate(m.tool_calls):
                args = _args_dict(c.function.arguments, f"{where}.tool_calls.{j}.function.arguments")
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
                if c.id:
                    call_names[c.id] = c.function.name
            msg["tool_calls"] = calls
        if role == "tool":
            msg["tool_call_id"] = m.tool_call_id
            msg["name"] = m.name or call_names.get(m.tool_call_id or "", "")
        elif m.name:
            msg["name"] = m.name
        messages.append(msg)

    names = [t["function"]["name"] for t in tools] or None
    if renders_tools:
        return ChatInput(messages, tools or None, names)
    # The template knows nothing of tools: describe them in the system turn and write past calls as text.
    messages = _tools_as_text(messages)
    if tools:
        instruction = tool_instruction(tools, required)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": instruction + "\n\n" + (messages[0]["content"] or "")}
        else:
            messages.insert(0, {"role": "system", "content": instruction})
    return ChatInput(messages, None, names)


def _tools_as_text(messages: list[dict]) -> list[dict]:
    """Assistant tool calls become their JSON, tool results a user turn; consecutive same-role turns merge
    (Gemma 3's template insists on alternating user/model turns)."""
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if m.get("tool_calls"):
            calls = "\n".join(json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                         ensure_ascii=False) for c in m["tool_calls"])
            content = (content + "\n" if content else "") + calls
        if role == "tool":
            role = "user"
            label = f"Result of function {m['name']}" if m.get("name") else "Function result"
            content = f"{label}:\n{content}"
        if out and out[-1]["role"] == role and role != "system":
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + content}
        else:
            out.append({"role": role, "content": content})
    return out


# ---- output text for tool parsing ---------------------------------------------------------------------------------

class ToolText:
    """The reply as the tool parser should see it. The engine's text skips special tokens, which would erase
    Gemma 4's `<|tool_call>` / `<|"|>` markers; when the vocabulary has them, decode with those kept."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        ids = {tokenizer.token_id(t): t for t in (GEMMA4_CALL_START, GEMMA4_CALL_END, GEMMA4_QUOTE)}
        self.marker_ids = {i: t for i, t in ids.items() if i is not None}
        self.ids: list[int] = []
        self.plain = ""

    def add(self, text: str, ids: list[int]) -> None:
        self.plain += text
        self.ids.extend(ids)

    @property
    def text(self) -> str:
        if not self.marker_ids or not any(i in self.marker_ids for i in self.ids):
            return self.plain
        parts, seg = [], []
        for i in self.ids:
            if i in self.marker_ids:
                parts.append(self.tokenizer.decode(seg))
                parts.append(self.marker_ids[i])
                seg = []
            else:
                seg.append(i)
        parts.append(self.tokenizer.decode(seg))
        text = "".join(parts)
        cuts = [j for j in (text.find(s) for s in self.stops) if j != -1]
        return text[:min(cuts)] if cuts else text
