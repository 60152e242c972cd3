"""The embedded default model (Gemma 3 270M GGUF): agreement with transformers, lossless speculation, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gemmaspec.drafters import make_drafter
from gemmaspec.engine import Engine

PROMPTS = {
    "code": "def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\"\n",
    "json": '[{"id": 1, "name": "Alice", "email": "alice@example.com"}, {"id": 2, "name": "Bob", "email": "',
    "copy": "The meeting is on Tuesday at 10am in room 4B. Repeat: The meeting is on",
    "prose": "Once upon a time, in a village at the edge of a great forest,",
}


@pytest.fixture(scope="module")
def hf_gguf_model():
    """transformers' own GGUF loader: an independent path from the same file to the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemmaspec.loading import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return tok, model.eval()


def test_greedy_matches_transformers_on_the_same_gguf(default_engine, hf_gguf_model):
    tok, model = hf_gguf_model
    for name, prompt in PROMPTS.items():
        ids = default_engine.encode_prompt(prompt)
        assert ids == tok(prompt).input_ids, name  # same tokenizer from the GGUF metadata
        want = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        got = default_engine.generate(prompt, max_new_tokens=24).token_ids
        eos = want.index(1) if 1 in want else len(want)
        assert got == want[:eos], name


def test_cli_json_contract():
    out = subprocess.run(
        [sys.executable, "-m", "gemmaspec.cli", "generate", "def add(a, b):", "--drafter", "ngram",
         "--temperature", "0", "--dtype", "float32", "--max-new-tokens", "12", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout)
    assert set(obj) == {"text", "token_ids", "finish_reason", "stats"}
    assert obj["finish_reason"] in ("length", "stop")
    stats = obj["stats"]
    for key, kind in [("prompt_tokens", int), ("new_tokens", int), ("target_forward_passes", int),
                      ("drafted_tokens", int), ("accepted_tokens", int), ("acceptance_rate", float),
                      ("mean_accepted_length", float), ("prefill_seconds", float), ("decode_seconds", float),
                      ("tokens_per_second", float), ("drafter", str), ("dtype", str), ("device", str)]:
        assert isinstance(stats[key], kind), key
    assert stats["new_tokens"] == len(obj["token_ids"]) <= 12
    assert stats["dtype"] == "float32" and stats["device"] == "cpu" and stats["drafter"] == "ngram"


@pytest.mark.parametrize("k", [4])
def test_ngram_lossless_on_default_model(default_engine, k):
    _check_lossless(default_engine, "ngram", [k], ["code", "copy"])


def test_shipped_mtp_drafter_is_paired_and_lossless(default_engine):
    from gemmaspec.drafters.hybrid import HybridDrafter
    from gemmaspec.drafters.mtp import find_paired_assistant

    assert find_paired_assistant(default_engine.target) is not None  # shipped with the package
    assert isinstance(make_drafter("auto", default_engine.target), HybridDrafter)
    _check_lossless(default_engine, "mtp", [4, "auto"], ["code", "json"])


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["ngram", "mtp", "auto"])
def test_every_drafter_and_k_lossless_on_default_model(default_engine, drafter):
    _check_lossless(default_engine, drafter, [1, 2, 4, 8, "auto"], list(PROMPTS))


def _check_lossless(engine, drafter, ks, prompt_names):
    plain_drafter = engine.drafter
    try:
        baseline = {n: engine.generate(PROMPTS[n], max_new_tokens=40).token_ids for n in prompt_names}
        engine.drafter = make_drafter(drafter, engine.target)
        for k in ks:
            for n in prompt_names:
                got = engine.generate(PROMPTS[n], max_new_tokens=40, draft_tokens=k)
                assert got.token_ids == baseline[n], (n, k)
    finally:
        engine.drafter = plain_drafter
