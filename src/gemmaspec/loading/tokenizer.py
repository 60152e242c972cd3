"""Tokenizer: a `tokenizers` fast tokenizer plus the model's chat template (jinja2, HF semantics)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import torch
from tokenizers import Tokenizer as FastTokenizer

from ..errors import ModelFileError

# Used by `chat`/`serve` when a model ships no chat template (the default Gemma 3 270M base GGUF has none).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\n\n' -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + (message['content'] or '') + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class Tokenizer:
    def __init__(self, fast: FastTokenizer, config: dict):
        self.fast = fast
        self.config = config
        self.chat_template: str | None = _template_text(config.get("chat_template"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_id = fast.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = fast.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos = bool(config.get("add_bos_token", True))
        self.vocab_size = fast.get_vocab_size()
        self._token_texts: list[str] | None = None  # (ids_that_may_end)
        self._ids_ending: dict[frozenset[str], torch.Tensor] = {}

    @classmethod
    def from_folder(cls, folder: Path) -> "Tokenizer":
        path = folder / "tokenizer.json"
        if not path.exists():
            raise ModelFileError(f"no tokenizer.json in {folder}")
        try:
            fast = FastTokenizer.from_file(str(path))
        except Exception as e:  # corrupt JSON / unknown model type
            raise ModelFileError(f"cannot read {path}: {str(e).splitlines()[0]}") from e
        config = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as e:
                raise ModelFileError(f"cannot parse {config_path}: {e}") from e
        template_path = folder / "chat_template.jinja"
        if "chat_template" not in config and template_path.exists():
            config["chat_template"] = template_path.read_text()
        return cls(fast, config)

    # ---- ids <-> text -----------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.fast.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.fast.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int | None:
        return self.fast.token_to_id(token)

    def ids_that_may_end(self, stops: list[str]) -> torch.Tensor:
        """The sorted ids (int64) after which one of `stops` may newly show in a decoded text: those whose text
        contains a stop's last character, and bytes of longer UTF-8 characters (their text shows with a later
        token). A text can only gain a stop string with a token among them (engine.py ends plain decoding's runs
        of steps there). Built once per set of last characters (the token texts the first time: ~0.2 s at a 262k
        vocabulary)."""
        if self._token_texts is None:
            self._token_texts = token_texts(self.fast)
        chars = frozenset(s[-1] for s in stops if s)
        ids = self._ids_ending.get(chars)
        if ids is None:
            ids = self._ids_ending[chars] = torch.tensor(
                [i for i, t in enumerate(self._token_texts) if "\ufffd" in t or any(c in t for c in chars)]
                if chars else [], dtype=torch.int64)
        return ids

    # ---- chat ---------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        template = self.chat_template or GEMMA_CHAT_TEMPLATE
        return _render(template, messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                       bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = self.apply_chat_template(messages, tools=tools)
        # The template writes <bos> itself.
        return self.encode(text, add_bos=not (self.bos_token and text.startswith(self.bos_token)))


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters.

    Each add decodes only a window from the last few tokens (as vLLM's detokenizer does): the text of
    ids[prefix:] beyond that of ids[prefix:read], so a step costs the same at token 5000 as at token 5 (decoding
    every id each step cost ~0.1 ms a step at 64 tokens, with the caches cold after a decode step, and grew with
    the text). The window starts a token before the new ones, so a tokenizer that drops a leading space
    does so in both texts alike. `text` is the deltas so far; `flush()` replaces it by a decode of every id."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # ids[_prefix:_read] became text already; ids[_read:] not yet

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        new_text = self.tokenizer.decode(self.ids[self._prefix:])
        if new_text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        if "\ufffd" in new_text or not new_text.startswith(prefix_text):
            # invalid bytes (a window may start inside their sequence) or a text that is not an extension of the
            # window's: decode everything, as every step once did
            return self._restart(self.tokenizer.decode(self.ids))
        delta = new_text[len(prefix_text):]
        if delta:  # (a token without text, e.g. a special one, waits in the window)
            self.text += delta
            self._prefix, self._read = self._read, len(self.ids)
        return delta

    def flush(self) -> str:
        """`text` as a decode of every id (the end of a generation: a trailing partial character shows as
        U+FFFD); returns the change, as add."""
        return self._restart(self.tokenizer.decode(self.ids))

    def _restart(self, text: str) -> str:
        delta = text[len(self.text):] if text.startswith(self.text) else text
        self.text = text
        self._prefix, self._read = max(len(self.ids) - 1, 0), len(self.ids)
        return delta


# SentencePiece-style decoding (Gemma 3 and 4): "\u2581" is a space, "<0xNN>" a byte, the rest concatenated
_PIECE_DECODER = {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                   {"type": "ByteFallback"}, {"type": "Fuse"}]}


def token_texts(fast: FastTokenizer) -> list[str]:
    """Each token's text as it reads inside a text: "\ufffd" for a byte of a longer UTF-8 character, "" for a
    special token. SentencePiece-style pieces are read directly (~0.2 s at a 262k vocabulary); other tokenizers
    decode each token after another (~0.5 s)."""
    n = fast.get_vocab_size()
    decoder = json.loads(fast.decoder.__getstate__()) if fast.decoder is not None else None
    if decoder == _PIECE_DECODER:
        special = {i for i, token in fast.get_added_tokens_decoder().items() if token.special}
        texts = []
        for i in range(n):
            piece = fast.id_to_token(i) or ""
            if i in special:
                texts.append("")
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                byte = int(piece[3:5], 16)
                texts.append(chr(byte) if byte < 0x80 else "\ufffd")
            else:
                texts.append(piece.replace("\u2581", " "))
        return texts
    before = fast.encode("a", add_special_tokens=False).ids[:1]
    head = fast.decode(before)
    pairs = fast.decode_batch([before + [i] for i in range(n)], skip_special_tokens=True)
    return [t[len(head):] if t.startswith(head) else t for t in pairs]


def _template_text(template) -> str | None:
    if isinstance(template, list):  # HF allows named templates; take the default one
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _token_text(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


_JINJA_ENV = None


def _render(template: str, **context) -> str:
    global _JINJA_ENV
    if _JINJA_ENV is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message):
            from jinja2.exceptions import TemplateError

            raise TemplateError(message)

        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, sort_keys=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _JINJA_ENV = env
    try:
        return _JINJA_ENV.from_string(template).render(**context)
    except Exception as e:
        from ..errors import GemmaspecError

        raise GemmaspecError(f"chat template failed to render: {e}") from e
