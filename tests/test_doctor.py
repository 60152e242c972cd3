"""`gemmaspec doctor` and the loader's checks, on deliberately broken copies of real files.

The default model's GGUF (~250 MB) is copied and broken for the GGUF cases: those must be rejected by the header
checks alone (no conversion), so they stay fast. Safetensors cases use the tiny fixtures. Each broken file is
checked twice: `doctor` names the problem and exits 1, and `gemmaspec generate` on it fails with one line on
stderr and no traceback (run as a subprocess with a timeout, so nothing can hang).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gemmaspec.cli import main
from gemmaspec.loading import default_model_path

CLI_TIMEOUT = 300


# ---- helpers ------------------------------------------------------------------------------------------
def doctor(capsys, *args: str) -> tuple[int, dict]:
    """Run `gemmaspec doctor ARGS --json` in-process; returns (exit code, report)."""
    capsys.readouterr()
    rc = main(["doctor", *args, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def check(report: dict, name: str) -> dict:
    found = [c for c in report["checks"] if c["name"] == name]
    assert found, f"no check '{name}' in {[c['name'] for c in report['checks']]}"
    return found[0]


def statuses(report: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, GEMMASPEC_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "gemmaspec.cli", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if not line.startswith("note:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("gemmaspec: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def gguf_copy(tmp_path_factory, default_gguf) -> Path:
    """One full copy of the default GGUF per module; tests patch header bytes and restore them."""
    path = tmp_path_factory.mktemp("gguf") / "copy.gguf"
    shutil.copyfile(default_gguf, path)
    return path


class patched:
    """Overwrite bytes of a file in place for the duration of a `with` block."""

    def __init__(self, path: Path, offset: int, data: bytes):
        self.path, self.offset, self.data = path, offset, data

    def __enter__(self):
        with open(self.path, "r+b") as f:
            f.seek(self.offset)
            self.saved = f.read(len(self.data))
            f.seek(self.offset)
            f.write(self.data)
        return self.path

    def __exit__(self, *exc):
        with open(self.path, "r+b") as f:
            f.seek(self.offset)
            f.write(self.saved)


def tensor_entry_offset(path: Path, name: str) -> tuple[int, list[int]]:
    """Byte position of a tensor's table entry (after its name) and its dims, found by scanning the header."""
    from gemmaspec.checks.files import read_gguf

    info = read_gguf(path)
    with open(path, "rb") as f:
        head = f.read(info.data_start)
    needle = struct.pack("<Q", len(name)) + name.encode()
    pos = head.rindex(needle) + len(needle)  # the tensor table comes after the metadata
    n_dims = struct.unpack_from("<I", head, pos)[0]
    return pos, list(struct.unpack_from(f"<{n_dims}Q", head, pos + 4))


# ---- GGUF: fast, rejected by the header checks without a conversion ----------------------------------
def test_truncated_gguf(tmp_path, capsys, default_gguf):
    path = tmp_path / "truncated.gguf"
    keep = int(default_gguf.stat().st_size * 0.6)
    with open(default_gguf, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(keep))
    rc, report = doctor(capsys, str(path))
    assert rc == 1 and not report["ok"] and report["summary"]["fail"] >= 1
    assert check(report, "gguf-header")["status"] == "pass"
    data = check(report, "gguf-tensor-data")
    assert data["status"] == "fail" and "truncated" in data["message"] and str(keep) in data["message"]
    assert "smoke-generation" in {s["name"] for s in report["skipped"]}

    line = assert_one_line_error(run_cli("generate", "hello", "--model", str(path), "--max-new-tokens", "2",
                                         cache=tmp_path / "cache"), "truncated")
    assert line.endswith(data["message"])  # the loader says exactly what the doctor says
    assert not list((tmp_path / "cache").glob("gguf/*"))  # refused before any conversion


def test_bad_magic_gguf(tmp_path, capsys, gguf_copy):
    with patched(gguf_copy, 0, b"GGUX"):
        rc, report = doctor(capsys, str(gguf_copy))
        assert rc == 1
        header = check(report, "gguf-header")
        assert header["status"] == "fail" and "not a GGUF file" in header["message"] and "magic" in header["message"]
        assert_one_line_error(run_cli("generate", "hello", "--model", str(gguf_copy), cache=tmp_path / "cache"),
                              "magic")


def _first_key_value_type_offset(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(24)
        n = struct.unpack("<Q", f.read(8))[0]
    return 24 + 8 + n


@pytest.mark.parametrize("corruption", ["version", "tensor-count", "value-type", "key-length", "tensor-dims",
                                        "tensor-offset", "tensor-type"])
def test_corrupted_gguf_header(capsys, gguf_copy, corruption):
    if corruption == "version":
        offset, data, needle = 4, struct.pack("<I", 99), "unsupported GGUF version 99"
    elif corruption == "tensor-count":
        offset, data, needle = 8, struct.pack("<Q", 2**40), "corrupt"
    elif corruption == "value-type":
        offset, data, needle = _first_key_value_type_offset(gguf_copy), struct.pack("<I", 77), "unknown value type 77"
    elif corruption == "key-length":
        offset, data, needle = 24, struct.pack("<Q", 2**45), "corrupt"
    else:
        pos, dims = tensor_entry_offset(gguf_copy, "blk.3.ffn_down.weight")
        after_dims = pos + 4 + 8 * len(dims)
        if corruption == "tensor-dims":
            offset, data, needle = pos + 4, struct.pack("<Q", dims[0] * 1000), "blk.3.ffn_down.weight"
        elif corruption == "tensor-type":
            offset, data, needle = after_dims, struct.pack("<I", 200), "unknown tensor type 200"
        else:  # the data offset: misaligned
            with open(gguf_copy, "rb") as f:
                f.seek(after_dims + 4)
                current = struct.unpack("<Q", f.read(8))[0]
            offset, data, needle = after_dims + 4, struct.pack("<Q", current + 3), "alignment"
    with patched(gguf_copy, offset, data):
        rc, report = doctor(capsys, str(gguf_copy))
    assert rc == 1
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert failed and failed[0]["name"].startswith("gguf-"), report
    assert needle in failed[0]["message"], failed[0]["message"]
    assert all(len(c["message"].splitlines()) == 1 for c in report["checks"])


def test_corrupted_gguf_header_generate_fails_fast(tmp_path, gguf_copy):
    pos, dims = tensor_entry_offset(gguf_copy, "token_embd.weight")
    with patched(gguf_copy, pos + 4 + 8 * len(dims), struct.pack("<I", 200)):
        assert_one_line_error(run_cli("generate", "hello", "--model", str(gguf_copy), cache=tmp_path / "cache"),
                              "corrupt", "token_embd.weight")


def test_human_table_and_json_shape(capsys, tmp_path, default_gguf):
    path = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(10_000_000))
    capsys.readouterr()
    assert main(["doctor", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  gguf-tensor-data" in out and "PASS  gguf-header" in out and "failed" in out
    rc, report = doctor(capsys, str(path))
    assert set(report) >= {"path", "ok", "checks", "summary"}
    assert set(report["summary"]) >= {"pass", "warn", "fail"}
    assert all(set(c) == {"name", "status", "message"} and c["status"] in ("pass", "warn", "fail")
               for c in report["checks"])


def test_usage_errors(capsys, tmp_path):
    assert main(["doctor", str(tmp_path / "nope.gguf")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["doctor", "--bogus-flag"])
    assert e.value.code == 2


def test_gguf_control_token_types():
    """Gemma 4's turn and tool-call markers typed USER_DEFINED instead of CONTROL: the known broken-download bug."""
    from gemmaspec.doctor import Report, _gguf_token_checks

    tokens = ["<pad>", "<eos>", "<bos>", "<|tool_call>", "<tool_call|>", "<|turn>", "<turn|>", "hello"]
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.token_type": np.array([3, 3, 3, 4, 4, 3, 3, 1], dtype=np.int32)}
    report = Report("x")
    _gguf_token_checks(report, meta, "gemma4")
    (c,) = report.checks
    assert c.status == "fail" and "<|tool_call>" in c.message and "USER_DEFINED" in c.message
    meta["tokenizer.ggml.token_type"] = np.array([3, 3, 3, 3, 3, 3, 3, 1], dtype=np.int32)
    report = Report("x")
    _gguf_token_checks(report, meta, "gemma4")
    assert report.checks[0].status == "pass"


# ---- safetensors (tiny fixtures) ---------------------------------------------------------------------
def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_safetensors_wrong_shape(tmp_path, capsys, tiny_gemma3_dir):
    from safetensors.torch import load_file, save_file

    folder = _copy_model(tiny_gemma3_dir, tmp_path / "bad_shape")
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.2.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:24].contiguous()  # 32 rows expected (2 KV heads x 16)
    save_file(tensors, str(folder / "model.safetensors"))

    rc, report = doctor(capsys, str(folder), "--no-generate")
    assert rc == 1
    assert check(report, "safetensors")["status"] == "pass"  # the file itself is intact
    bad = check(report, "tensors")
    assert bad["status"] == "fail" and name in bad["message"] and "[24, 64]" in bad["message"]
    assert "[32, 64]" in bad["message"]
    line = assert_one_line_error(run_cli("generate", "t5 t6", "--model", str(folder), "--drafter", "none",
                                         cache=tmp_path / "cache"), name)
    assert line.endswith(bad["message"])


def test_safetensors_missing_tensor_and_truncation(tmp_path, capsys, tiny_gemma3_dir):
    from safetensors.torch import load_file, save_file

    folder = _copy_model(tiny_gemma3_dir, tmp_path / "missing")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    rc, report = doctor(capsys, str(folder), "--no-generate")
    assert rc == 1 and "model.layers.1.mlp.up_proj.weight" in check(report, "tensors")["message"]

    folder = _copy_model(tiny_gemma3_dir, tmp_path / "cut")
    file = folder / "model.safetensors"
    os.truncate(file, file.stat().st_size - 1000)
    rc, report = doctor(capsys, str(folder), "--no-generate")
    st = check(report, "safetensors")
    assert rc == 1 and st["status"] == "fail" and "truncated" in st["message"]
    assert_one_line_error(run_cli("generate", "t5 t6", "--model", str(folder), "--drafter", "none",
                                  cache=tmp_path / "cache"), "truncated")


def test_sha256_manifest(tmp_path, capsys, tiny_gemma3_dir):
    from gemmaspec.checks.files import sha256_file

    folder = _copy_model(tiny_gemma3_dir, tmp_path / "sums")
    digest = sha256_file(folder / "model.safetensors")
    (folder / "SHA256SUMS").write_text(f"{digest}  model.safetensors\n")
    rc, report = doctor(capsys, str(folder), "--no-generate")
    assert check(report, "sha256")["status"] == "pass"
    (folder / "SHA256SUMS").write_text(f"{'0' * 64}  model.safetensors\n")
    rc, report = doctor(capsys, str(folder), "--no-generate")
    assert rc == 1 and check(report, "sha256")["status"] == "fail"
    assert "SHA-256 does not match" in check(report, "sha256")["message"]


# ---- chat template of an instruction-tuned model -------------------------------------------------------
@pytest.mark.slow
def test_instruction_tuned_without_chat_template(tmp_path, capsys, tiny_gemma3_realtok_dir):
    folder = _copy_model(tiny_gemma3_realtok_dir, tmp_path / "tiny-stripped")
    config_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(config_path.read_text())
    tok_cfg.pop("chat_template", None)
    tok_cfg["eos_token"] = "<end_of_turn>"  # what instruction-tuned Gemma tokenizers use
    config_path.write_text(json.dumps(tok_cfg))

    rc, report = doctor(capsys, str(folder), "--no-generate")
    tpl = check(report, "chat-template")
    assert rc == 1 and tpl["status"] == "fail" and "instruction-tuned" in tpl["message"]
    assert "<end_of_turn> as end of sequence" in tpl["message"]
    line = assert_one_line_error(run_cli("generate", "Hello", "--model", str(folder), "--drafter", "none",
                                         cache=tmp_path / "cache"), "chat template")
    assert line.endswith(tpl["message"])

    # Restoring the template fixes it; the template renders and its markers are single tokens.
    from gemmaspec.loading.tokenizer import GEMMA_CHAT_TEMPLATE

    tok_cfg["chat_template"] = GEMMA_CHAT_TEMPLATE
    config_path.write_text(json.dumps(tok_cfg))
    rc, report = doctor(capsys, str(folder), "--no-generate")
    assert check(report, "chat-template")["status"] == "pass"
    assert check(report, "turn-markers")["status"] == "pass"


@pytest.mark.slow
def test_it_name_without_chat_template_fails_base_warns(tmp_path, capsys, tiny_gemma3_realtok_dir):
    base = _copy_model(tiny_gemma3_realtok_dir, tmp_path / "tiny-base")
    rc, report = doctor(capsys, str(base), "--no-generate")
    assert check(report, "chat-template")["status"] == "warn"
    it = base.rename(tmp_path / "gemma-3-tiny-it")
    rc, report = doctor(capsys, str(it), "--no-generate")
    assert check(report, "chat-template")["status"] == "fail" and "gemma-3-tiny-it" in check(report, "chat-template")["message"]


# ---- Gemma 4 vocabularies: turn and tool-call markers, tool calls in the template -------------------------
GEMMA4_MARKERS = ["<|turn>", "<turn|>", "<|tool_call>", "<tool_call|>", "<|tool>", "<tool|>", "<|tool_response>",
                  "<tool_response|>", '<|"|>']
GEMMA4_TEMPLATE = (
    "{{ bos_token }}{%- if tools -%}<|turn>system\n{%- for t in tools -%}<|tool>declaration:{{ t['function']['name'] }}"
    "<tool|>{%- endfor -%}<turn|>\n{%- endif -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'tool' -%}"
    "<|tool_response>response:{{ m['name'] }}{{ m['content'] }}<tool_response|>"
    "{%- else -%}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
    "{%- for c in m.get('tool_calls') or [] -%}<|tool_call>call:{{ c['function']['name'] }}"
    "{{ c['function']['arguments'] | tojson }}<tool_call|>{%- endfor -%}<turn|>\n{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|turn>model\n{%- endif -%}"
)


def _tiny_gemma4(folder: Path, markers: list[str], template: str | None) -> Path:
    from tiny_models import save_tiny_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    config = dict(model_type="gemma4_text", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                  layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                  hidden_size_per_layer_input=0, vocab_size_per_layer_input=64, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=2, eos_token_id=1)
    save_tiny_model(folder, config, seed=5, chat_template=template)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + markers
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), 64)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_gemma4_markers_and_tool_call_template(tmp_path, capsys):
    good = _tiny_gemma4(tmp_path / "g4", GEMMA4_MARKERS, GEMMA4_TEMPLATE)
    rc, report = doctor(capsys, str(good), "--no-generate")
    s = statuses(report)
    assert s["turn-markers"] == s["tool-call-markers"] == s["chat-template"] == "pass", report["checks"]
    assert s["tensors"] == "pass"

    # A vocabulary without the tool-call markers (the broken early downloads) cannot carry tool calls.
    no_tools = _tiny_gemma4(tmp_path / "g4-no-tools", ["<|turn>", "<turn|>"], GEMMA4_TEMPLATE)
    rc, report = doctor(capsys, str(no_tools), "--no-generate")
    markers = check(report, "tool-call-markers")
    assert rc == 1 and markers["status"] == "fail" and "<|tool_call>" in markers["message"]

    # A template that drops tool calls.
    dropping = GEMMA4_TEMPLATE.replace("<|tool_call>call:", "").replace("<tool_call|>", "")
    broken = _tiny_gemma4(tmp_path / "g4-drops-calls", GEMMA4_MARKERS, dropping)
    rc, report = doctor(capsys, str(broken), "--no-generate")
    tpl = check(report, "chat-template")
    assert rc == 1 and tpl["status"] == "fail" and "tool call" in tpl["message"]


# ---- drafter pairing ---------------------------------------------------------------------------------
def test_drafter_of_another_target(tmp_path, capsys, tiny_gemma3_dir, tiny_gemma3_draft_dir):
    # A drafter built for another target: same architecture, another vocabulary.
    from tiny_models import save_tiny_model, tiny_gemma3_config

    other = save_tiny_model(tmp_path / "other_draft", tiny_gemma3_config(vocab_size=128, num_hidden_layers=2,
                                                                          layer_types=["sliding_attention",
                                                                                       "full_attention"]), seed=3)
    rc, report = doctor(capsys, str(tiny_gemma3_dir), "--drafter", str(other), "--no-generate")
    pairing = check(report, "drafter-pairing")
    assert rc == 1 and pairing["status"] == "fail" and "tokenizer" in pairing["message"]
    assert_one_line_error(run_cli("generate", "t5 t6", "--model", str(tiny_gemma3_dir), "--drafter",
                                  f"draft:{other}", cache=tmp_path / "cache"), "vocabulary")

    rc, report = doctor(capsys, str(tiny_gemma3_dir), "--drafter", f"draft:{tiny_gemma3_draft_dir}", "--no-generate")
    assert check(report, "drafter-pairing")["status"] == "pass"


def test_assistant_of_another_target(tmp_path, capsys, tiny_gemma3_dir):
    """An MTP assistant config trained for another backbone: hidden size and KV geometry must match."""
    folder = tmp_path / "assistant"
    folder.mkdir()
    text = dict(model_type="gemma4_text", vocab_size=96, hidden_size=32, num_hidden_layers=2, head_dim=32,
                global_head_dim=32, num_key_value_heads=2, num_attention_heads=4,
                layer_types=["sliding_attention", "full_attention"])
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma4_assistant", "backbone_hidden_size": 128,
                                                    "text_config": text}))
    rc, report = doctor(capsys, str(tiny_gemma3_dir), "--drafter", f"mtp:{folder}", "--no-generate")
    pairing = check(report, "drafter-pairing")
    assert rc == 1 and pairing["status"] == "fail"
    assert "backbone_hidden_size 128" in pairing["message"] and "head_dim 32" in pairing["message"]

    text.update(head_dim=16, global_head_dim=16)
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma4_assistant", "backbone_hidden_size": 64,
                                                    "text_config": text}))
    rc, report = doctor(capsys, str(tiny_gemma3_dir), "--drafter", str(folder), "--no-generate")
    assert check(report, "drafter-pairing")["status"] == "pass", check(report, "drafter-pairing")


# ---- the default model: nothing fails ------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_is_healthy(capsys):
    rc, report = doctor(capsys, "default")
    assert rc == 0 and report["ok"], [c for c in report["checks"] if c["status"] != "pass"]
    s = statuses(report)
    assert s["chat-template"] == "warn"  # a base model without a template: chat uses the family template
    for name in ("gguf-header", "gguf-tensor-data", "tensors", "finite-values", "special-tokens", "turn-markers",
                 "round-trip", "smoke-generation"):
        assert s[name] == "pass", (name, check(report, name))
    assert report["summary"]["fail"] == 0
