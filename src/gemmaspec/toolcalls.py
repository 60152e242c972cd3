"""Tool calls: the system instruction for templates that cannot render tools, and the output parser.

Shapes the parser understands (first that matches wins; anything unparsable stays plain content):

- Gemma 4:  `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3,xs:[1,2],o:{a:true}}<tool_call|>` (several may follow
  one another; keys are bare words, strings are wrapped in the `<|"|>` token).
- `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes/Qwen style).
- Fenced blocks: ```tool_code / ```json / ```python / ``` holding a JSON call or a Python-style call
  `get_weather(city="Paris")` (Gemma 3's function-calling guide), or a list of them.
- Bare JSON anywhere in the text: `{"name": ..., "arguments" | "parameters": {...}}`, a list of those, or
  `{"tool_calls": [...]}`; OpenAI's `{"type": "function", "function": {...}}` is unwrapped.
- A bare Python-style call when it is the whole reply and names a known tool.

A call is kept only when its arguments are a JSON object (a JSON string holding one is decoded) and, when the
request's tool names are known, its name is one of them. Arguments are re-serialised with json.dumps, so
callers always receive valid JSON.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field

GEMMA4_CALL_START = "<|tool_call>"
GEMMA4_CALL_END = "<tool_call|>"
GEMMA4_QUOTE = '<|"|>'

# Text that may begin a tool call: a streaming server holds output back from the first of these on.
CALL_MARKERS = ("```", "{", "[", "<tool_call>", GEMMA4_CALL_START)


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


# ---- prompting -----------------------------------------------------------------------------------------

def tool_instruction(tools: list[dict], required: str | bool = False) -> str:
    """A system instruction that lists `tools` (OpenAI shape) and asks for a JSON tool call.

    `required`: False (the model may answer in prose), True (it must call one), or a function name.
    """
    specs = [t.get("function", t) for t in tools]
    lines = [
        "You have access to the functions listed below. To call a function, reply with only a JSON object "
        "and no other text, in this format:",
        '{"name": "<function name>", "arguments": {"<argument name>": <value>, ...}}',
    ]
    if required is True:
        lines.append("You must call one of these functions.")
    elif isinstance(required, str) and required:
        lines.append(f"You must call the function {required}.")
    else:
        lines.append("If none of the functions fits the request, answer normally instead.")
    lines.append("")
    lines.append("Functions:")
    lines.extend(json.dumps(s, ensure_ascii=False) for s in specs)
    return "\n".join(lines)


# ---- parsing -------------------------------------------------------------------------------------------

def parse_tool_calls(text: str, tool_names: list[str] | set[str] | None = None) -> tuple[str | None, list[ToolCall]]:
    """Split model output into (content, tool calls). Never raises; no calls found -> (text, [])."""
    names = set(tool_names) if tool_names else None
    for finder in (_gemma4_blocks, _xml_blocks, _fenced_blocks, _bare_json, _bare_python):
        try:
            found = finder(text, names)
        except Exception:  # a parser bug must never turn a reply into a server error
            found = []
        if found:
            calls = [c for _, _, cs in found for c in cs]
            content, pos = [], 0
            for start, end, _ in sorted(found, key=lambda f: f[0]):
                content.append(text[pos:start])
                pos = end
            content.append(text[pos:])
            rest = "".join(content).strip()
            return (rest or None), calls
    return text, []


Found = list[tuple[int, int, list[ToolCall]]]


def _to_call(obj, names: set[str] | None) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI's {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    name = name.strip()
    if names is not None and name not in names:
        return None
    args = None
    for key in ("arguments", "parameters", "args"):
        if key in obj:
            args = obj[key]
            break
    else:
        if names is None or set(obj) - {"name", "type"}:
            return None  # a bare {"name": ...} is a call only for a known tool and nothing else in it
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return ToolCall(name, args)


def _calls_from_json(value, names: set[str] | None) -> list[ToolCall] | None:
    """A call, a list of calls or {"tool_calls": [...]}; None unless every element is a call."""
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        value = value["tool_calls"]
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    calls = [_to_call(v, names) for v in items]
    return calls if all(calls) else None


def _calls_from_python(src: str, names: set[str] | None) -> list[ToolCall] | None:
    """`f(a=1, b="x")` or `[f(a=1), g()]` with literal keyword arguments only."""
    try:
        tree = ast.parse(src.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args:
            return None
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name is None or (names is not None and name not in names):
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        except (ValueError, SyntaxError, TypeError):
            return None
        if len(args) != len(node.keywords):
            return None
        try:
            json.dumps(args)
        except (TypeError, ValueError):  # sets, bytes, complex numbers
            return None
        calls.append(ToolCall(name, args))
    return calls or None


def _loads(src: str):
    try:
        return json.loads(src)
    except (json.JSONDecodeError, ValueError):
        return None


_XML_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z_]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_FENCE_KINDS = {"", "tool_code", "tool_call", "json", "python", "py"}


def _xml_blocks(text: str, names) -> Found:
    found = []
    for m in _XML_RE.finditer(text):
        body = m.group(1)
        calls = _calls_from_json(_loads(body), names) or _calls_from_python(body, names)
        if calls:
            found.append((m.start(), m.end(), calls))
    return found


def _fenced_blocks(text: str, names) -> Found:
    found = []
    for m in _FENCE_RE.finditer(text):
        kind, body = m.group(1).lower(), m.group(2)
        if kind not in _FENCE_KINDS:
            continue
        calls = _calls_from_json(_loads(body), names)
        if calls is None and (names is not None or kind in ("tool_code", "tool_call")):
            calls = _calls_from_python(body, names)
        if calls:
            found.append((m.start(), m.end(), calls))
    return found


def _bare_json(text: str, names, max_attempts: int = 200) -> Found:
    decoder = json.JSONDecoder()
    found, i, attempts = [], 0, 0
    while attempts < max_attempts:
        starts = [j for j in (text.find("{", i), text.find("[", i)) if j != -1]
        if not starts:
            break
        i = min(starts)
        attempts += 1
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        calls = _calls_from_json(value, names)
        if calls:
            found.append((i, end, calls))
            i = end
        else:
            i += 1
    return found


def _bare_python(text: str, names) -> Found:
    if names is None:
        return []
    calls = _calls_from_python(text, names)
    return [(0, len(text), calls)] if calls else []


# ---- Gemma 4 -------------------------------------------------------------------------------------------

_G4_RE = re.compile(re.escape(GEMMA4_CALL_START) + r"(.*?)(?:" + re.escape(GEMMA4_CALL_END) + r"|\Z)", re.DOTALL)


def _gemma4_blocks(text: str, names) -> Found:
    found = []
    for m in _G4_RE.finditer(text):
        calls = _parse_gemma4_calls(m.group(1), names)
        if calls:
            found.append((m.start(), m.end(), calls))
    return found


def _parse_gemma4_calls(body: str, names) -> list[ToolCall] | None:
    """`call:NAME{...}` repeated (Gemma 4 concatenates calls without separators)."""
    p = _G4Parser(body)
    calls = []
    while True:
        p.skip_ws()
        if p.done():
            break
        if not p.body.startswith("call:", p.i):
            return None
        p.i += len("call:")
        m = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*").match(p.body, p.i)
        if not m:
            return None
        name, p.i = m.group(1), m.end()
        if names is not None and name not in names:
            return None
        args = p.value() if not p.done() and p.peek() == "{" else {}
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(name, args))
    return calls or None


class _G4Error(ValueError):
    pass


class _G4Parser:
    """Values of Gemma 4's argument syntax: <|"|>strings<|"|>, JSON strings, numbers, true/false/null,
    [lists] and {objects} with bare or quoted keys; a bare word is read as a string."""

    def __init__(self, body: str):
        self.body, self.i = body, 0

    def done(self) -> bool:
        return self.i >= len(self.body)

    def peek(self) -> str:
        return self.body[self.i]

    def skip_ws(self) -> None:
        while not self.done() and self.body[self.i].isspace():
            self.i += 1

    def expect(self, ch: str) -> None:
        self.skip_ws()
        if self.done() or self.peek() != ch:
            raise _G4Error(f"expected {ch!r} at {self.i}")
        self.i += 1

    def value(self):
        self.skip_ws()
        if self.done():
            raise _G4Error("unexpected end")
        b, ch = self.body, self.peek()
        if b.startswith(GEMMA4_QUOTE, self.i):
            end = b.find(GEMMA4_QUOTE, self.i + len(GEMMA4_QUOTE))
            if end == -1:
                raise _G4Error("unterminated string")
            s = b[self.i + len(GEMMA4_QUOTE):end]
            self.i = end + len(GEMMA4_QUOTE)
            return s
        if ch == '"':
            s, self.i = json.JSONDecoder().raw_decode(b, self.i)
            return s
        if ch == "{":
            return self._object()
        if ch == "[":
            return self._list()
        m = re.compile(r"[^,}\]]*").match(b, self.i)
        word, self.i = m.group(0).strip(), m.end()
        if not word:
            raise _G4Error(f"empty value at {self.i}")
        literal = {"true": True, "false": False, "null": None, "None": None, "True": True, "False": False}
        if word in literal:
            return literal[word]
        try:
            return int(word)
        except ValueError:
            pass
        try:
            return float(word)
        except ValueError:
            return word

    def _key(self) -> str:
        self.skip_ws()
        b = self.body
        if b.startswith(GEMMA4_QUOTE, self.i) or (not self.done() and self.peek() == '"'):
            return str(self.value())
        m = re.compile(r"[^:,{}\[\]]+").match(b, self.i)
        if not m:
            raise _G4Error(f"expected a key at {self.i}")
        self.i = m.end()
        return m.group(0).strip()

    def _object(self) -> dict:
        self.expect("{")
        out = {}
        self.skip_ws()
        if not self.done() and self.peek() == "}":
            self.i += 1
            return out
        while True:
            key = self._key()
            self.expect(":")
            out[key] = self.value()
            self.skip_ws()
            if self.done():
                raise _G4Error("unterminated object")
            if self.peek() == ",":
                self.i += 1
                continue
            self.expect("}")
            return out

    def _list(self) -> list:
        self.expect("[")
        out = []
        self.skip_ws()
        if not self.done() and self.peek() == "]":
            self.i += 1
            return out
        while True:
            out.append(self.value())
            self.skip_ws()
            if self.done():
                raise _G4Error("unterminated list")
            if self.peek() == ",":
                self.i += 1
                continue
            self.expect("]")
            return out


# ---- streaming -----------------------------------------------------------------------------------------

def safe_prefix_length(text: str, extra_markers: tuple[str, ...] = ()) -> int:
    """How much of `text` can be streamed as content now: everything before the first place a tool call
    could begin (a marker, or a partial marker at the very end)."""
    markers = CALL_MARKERS + tuple(extra_markers)
    cut = len(text)
    for m in markers:
        j = text.find(m)
        if j != -1:
            cut = min(cut, j)
    # A marker cut in half by the chunk boundary.
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), 0, -1):
            if text.endswith(m[:k]):
                cut = min(cut, len(text) - k)
                break
    return cut
