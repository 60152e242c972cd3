"""Bad input to `gemmaspec generate`: one readable line on stderr, non-zero exit, no traceback."""

import json
import subprocess
import sys

import pytest

from tiny_models import save_tiny_model, tiny_gemma3_config


def _generate(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "gemmaspec.cli", "generate", *args],
                          capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("gemmaspec: error:")
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tiny_gemma3_dir):
    folder = tmp_path_factory.mktemp("llama")
    for f in tiny_gemma3_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_missing_path():
    _assert_one_line_error(_generate("hi", "--model", "/no/such/model.gguf"), "not found")


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    _assert_one_line_error(_generate("hi", "--model", str(path)), "neither a GGUF")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all, just text" * 10)
    _assert_one_line_error(_generate("hi", "--model", str(fake)), "GGUF")


def test_unsupported_architecture(llama_folder):
    _assert_one_line_error(_generate("hi", "--model", str(llama_folder)), "llama")


def test_empty_prompt(tiny_gemma3_dir):
    _assert_one_line_error(_generate("  ", "--model", str(tiny_gemma3_dir)), "empty")


def test_prompt_longer_than_the_context(tiny_gemma3_dir):
    prompt = " ".join(f"t{4 + i % 90}" for i in range(600))  # context is 512 tokens
    _assert_one_line_error(_generate(prompt, "--model", str(tiny_gemma3_dir)), "context")


@pytest.mark.parametrize("flags, word", [
    (["--draft-tokens", "many"], "--draft-tokens"),
    (["--drafter", "magic"], "unknown drafter"),
    (["--temperature", "-1"], "temperature"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
])
def test_bad_flags(tiny_gemma3_dir, flags, word):
    _assert_one_line_error(_generate("t5 t6", "--model", str(tiny_gemma3_dir), *flags), word)


def test_debug_shows_the_traceback(tiny_gemma3_dir):
    proc = subprocess.run([sys.executable, "-m", "gemmaspec.cli", "--debug", "generate", " ", "--model",
                           str(tiny_gemma3_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
