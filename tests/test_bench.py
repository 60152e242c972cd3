"""`gemmaspec bench`: the CLI end to end on a tiny model, results.json's schema, the shipped prompt suite."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemmaspec.bench.runner import parse_drafter_specs, summarize
from gemmaspec.bench.suite import PROMPTS_DIR, REQUIRED_CATEGORIES, default_prompt_files, load_prompts
from gemmaspec.cli import main
from gemmaspec.errors import GemmaspecError

TOP_KEYS = {"model": str, "device": str, "dtype": str, "max_new_tokens": int, "results": list, "summary": dict}
RESULT_KEYS = {"id": str, "category": str, "drafter": str, "new_tokens": int, "decode_seconds": (int, float),
               "tokens_per_second": (int, float), "acceptance_rate": (int, float, type(None)),
               "mean_accepted_length": (int, float, type(None)), "matches_baseline": bool}

PROMPTS = [
    {"id": "p-code", "category": "code", "prompt": "def add(a, b):\n    return a + b\n\ndef add(a, b):\n"},
    {"id": "p-copy", "category": "extraction",
     "prompt": "The red fox jumps over the lazy dog. The red fox jumps over the lazy dog. The red fox"},
    {"id": "p-chat", "category": "extraction", "prompt": "Repeat after me: one two three.", "chat": True},
]


def write_prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def check_schema(results: dict, ids: set[str], drafters: set[str], max_new: int) -> None:
    assert set(results) == set(TOP_KEYS)
    for key, typ in TOP_KEYS.items():
        assert isinstance(results[key], typ), key
    assert results["max_new_tokens"] == max_new
    rows = results["results"]
    assert {(r["id"], r["drafter"]) for r in rows} == {(i, d) for i in ids for d in drafters}
    assert len(rows) == len(ids) * len(drafters)
    for r in rows:
        assert set(r) == set(RESULT_KEYS), r
        for key, typ in RESULT_KEYS.items():
            assert isinstance(r[key], typ), (key, r)
        assert 0 < r["new_tokens"] <= max_new
        assert r["decode_seconds"] >= 0 and r["tokens_per_second"] >= 0
    cats = {r["category"] for r in rows}
    summary = results["summary"]
    assert cats <= set(summary) <= cats | {"all"}
    for cat, per_drafter in summary.items():
        assert set(per_drafter) == drafters, cat
        for d, s in per_drafter.items():
            assert set(s) == {"tokens_per_second", "speedup"}
            assert isinstance(s["tokens_per_second"], float) and s["tokens_per_second"] > 0
            assert isinstance(s["speedup"], float) and s["speedup"] > 0
        assert per_drafter["none"]["speedup"] == 1.0


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"IHDR" in data[:32] and data.rstrip().endswith(b"IEND\xaeB`\x82")


def test_bench_cli_end_to_end_with_hf_peers(tiny_gemma3_realtok_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path)
    out = tmp_path / "out"
    rc = main(["bench", "--prompts", str(prompts), "--model", str(tiny_gemma3_realtok_dir), "--dtype", "float32",
               "--device", "cpu", "--drafters", "none,ngram,ngram@2", "--max-new-tokens", "8", "--peers", "hf",
               "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    drafters = {"none", "ngram", "ngram@2", "hf:none", "hf:ngram"}
    check_schema(results, {p["id"] for p in PROMPTS}, drafters, 8)
    assert results["device"] == "cpu" and results["dtype"] == "float32"
    assert results["model"] == str(tiny_gemma3_realtok_dir)
    bad = [(r["id"], r["drafter"]) for r in results["results"] if not r["matches_baseline"]]
    assert not bad, f"outputs differ from drafter none: {bad}"
    for r in results["results"]:  # plain decoding: one token per target pass, on both sides
        if r["drafter"] in ("none", "hf:none"):
            assert r["mean_accepted_length"] == 1.0 and r["acceptance_rate"] == 0.0

    report = (out / "report.md").read_text()
    for needle in ("| category | drafter | tok/s | speedup |", "| code | ngram@2 |", "| all | hf:ngram |",
                   "gemmaspec bench --prompts", "--drafters none,ngram,ngram@2", "## Machine and model",
                   "prefill"):
        assert needle in report, needle
    check_png(out / "speedup.png")
    details = json.loads((out / "details.json").read_text())
    assert len(details["runs"]) == len(results["results"])
    assert all(r["first_token_seconds"] > 0 for r in details["runs"])


def test_bench_flag_errors_are_one_line(tiny_gemma3_realtok_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path)
    base = ["bench", "--prompts", str(prompts), "--model", str(tiny_gemma3_realtok_dir), "--out", str(tmp_path / "o")]
    for extra, needle in ((["--drafter", "ngram"], "--drafters"), (["--drafters", "ngram@x"], "after '@'"),
                          (["--peers", "vllm"], "unknown peer"), (["--categories", "poetry"], "poetry"),
                          (["--drafters", "bogus"], "unknown drafter")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1 and needle in err, (extra, err)
    assert main(["bench", "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_drafter_specs():
    specs = parse_drafter_specs("ngram,ngram@4,draft:/models/a@b/small@2,ngram@auto")
    assert [(s.label, s.drafter, s.draft_tokens) for s in specs] == [
        ("none", "none", None), ("ngram", "ngram", None), ("ngram@4", "ngram", 4),
        ("draft:/models/a@b/small@2", "draft:/models/a@b/small", 2), ("ngram@auto", "ngram", "auto")]
    assert not any(s.optional for s in specs)
    default = parse_drafter_specs(None, "none,ngram,mtp")
    assert [s.label for s in default] == ["none", "ngram", "mtp"] and default[2].optional
    for bad in ("ngram,ngram", "ngram@-1", "@4", "hf:none"):
        with pytest.raises(GemmaspecError):
            parse_drafter_specs(bad)


def test_summary_speedup_is_median_of_per_prompt_ratios():
    def row(pid, cat, drafter, tps):
        return {"id": pid, "category": cat, "drafter": drafter, "tokens_per_second": tps}

    rows = [row("a", "x", "none", 10.0), row("a", "x", "ngram", 30.0),   # 3.0x
            row("b", "x", "none", 20.0), row("b", "x", "ngram", 20.0),   # 1.0x
            row("c", "x", "none", 5.0), row("c", "x", "ngram", 10.0),    # 2.0x
            row("d", "y", "none", 8.0), row("d", "y", "ngram", 4.0)]     # 0.5x
    s = summarize(rows)
    assert s["x"]["ngram"] == {"tokens_per_second": 20.0, "speedup": 2.0}  # not 20/10 from the medians' ratio
    assert s["x"]["none"] == {"tokens_per_second": 10.0, "speedup": 1.0}
    assert s["y"]["ngram"]["speedup"] == 0.5
    assert s["all"]["ngram"]["speedup"] == 1.5  # median of 3.0, 1.0, 2.0, 0.5
    assert "all" not in summarize([r for r in rows if r["category"] == "x"])


# ---- the shipped public prompt suite ---------------------------------------------------------------
def test_shipped_prompt_suite():
    files = default_prompt_files()
    assert files, f"no prompt files in {PROMPTS_DIR}"
    ids = set()
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert line.strip(), f"{path.name}:{n}: blank line"
            obj = json.loads(line)
            assert set(obj) <= {"id", "category", "prompt", "chat"}, f"{path.name}:{n}: unknown keys"
            assert {"id", "category", "prompt"} <= set(obj), f"{path.name}:{n}: missing keys"
            assert all(isinstance(obj[k], str) and obj[k].strip() for k in ("id", "category", "prompt"))
            assert isinstance(obj.get("chat", False), bool)
            assert obj["category"] == path.stem, f"{path.name}:{n}: category {obj['category']} in the wrong file"
            assert obj["id"] not in ids, f"duplicate id {obj['id']}"
            ids.add(obj["id"])
    prompts = load_prompts()  # the loader agrees (and enforces unique ids itself)
    assert {p.id for p in prompts} == ids
    for cat in REQUIRED_CATEGORIES:
        mine = [p for p in prompts if p.category == cat]
        assert len(mine) >= 8, f"category {cat} has {len(mine)} prompts"
        assert sum(not p.chat for p in mine) >= 6, f"category {cat} needs mostly completion-style prompts"
    assert any(p.chat for p in prompts)
    # Extraction prompts carry a document to copy from: a few hundred tokens (roughly 4 characters a token).
    for p in prompts:
        if p.category == "extraction":
            assert 400 <= len(p.prompt) <= 2400, (p.id, len(p.prompt))


def test_load_prompts_rejects_bad_lines(tmp_path):
    cases = {'{"id": "a", "category": "c"}': "prompt", '{"id": "a", "category": "c", "prompt": "x", "chat": 1}': "chat",
             "not json": "JSON", '["a"]': "object"}
    for line, needle in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(GemmaspecError, match=needle):
            load_prompts([path])
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": "a", "category": "c", "prompt": "x"}\n{"id": "a", "category": "d", "prompt": "y"}\n')
    with pytest.raises(GemmaspecError, match="duplicate"):
        load_prompts([path])
    path.write_text('{"id": "a", "category": "c", "prompt": "x"}\n{"id": "b", "category": "c", "prompt": "y"}\n'
                    '{"id": "c", "category": "d", "prompt": "z"}\n')
    assert [p.id for p in load_prompts([path], limit=1)] == ["a", "c"]
    assert [p.id for p in load_prompts([path], categories=["d"])] == ["c"]


# ---- --endpoint against our own server ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(importlib.util.find_spec("gemmaspec.server") is None,
                    reason="gemmaspec.server (the `serve` command) is not in this build yet; --endpoint is tested "
                           "against our real server only, never a stub")
def test_bench_endpoint_against_our_server(tiny_gemma3_realtok_dir, tmp_path, capsys):
    import httpx

    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen([sys.executable, "-m", "gemmaspec.cli", "serve", "--model", str(tiny_gemma3_realtok_dir),
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"server exited with {server.returncode}: {(tmp_path / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy in 180 s"
            time.sleep(0.5)
        prompts = write_prompts(tmp_path)
        out = tmp_path / "out"
        rc = main(["bench", "--prompts", str(prompts), "--model", str(tiny_gemma3_realtok_dir), "--drafters", "none",
                   "--max-new-tokens", "8", "--endpoint", f"http://127.0.0.1:{port}", "--out", str(out),
                   "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        results = json.loads((out / "results.json").read_text())
        check_schema(results, {p["id"] for p in PROMPTS}, {"none", "endpoint"}, 8)
        rows = [r for r in results["results"] if r["drafter"] == "endpoint"]
        assert all(r["matches_baseline"] for r in rows), rows
        served = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]["id"]
        raw = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                         json={"model": served, "prompt": PROMPTS[0]["prompt"], "max_tokens": 2, "temperature": 0}).json()
        assert raw.get("choices"), raw
        if isinstance(raw.get("speculative"), dict) and "mean_accepted_length" in raw["speculative"]:
            assert all(r["mean_accepted_length"] is not None for r in rows)  # read from the `speculative` object
        details = json.loads((out / "details.json").read_text())
        assert all(r["first_token_seconds"] > 0 for r in details["runs"] if r["drafter"] == "endpoint")
        assert "| all | endpoint |" in (out / "report.md").read_text()
        check_png(out / "speedup.png")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
