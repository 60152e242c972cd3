"""Prompt suites: JSONL files, one `{"id": str, "category": str, "prompt": str, "chat"?: bool}` per line.

The shipped public suite is `prompts/*.jsonl` next to this file, one file per category. Its prompts are mostly
completion-style (a small base model continues them well) with a few `"chat": true` prompts that go through
the model's chat template, for instruction-tuned models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import GemmaspecError

PROMPTS_DIR = Path(__file__).parent / "prompts"
REQUIRED_CATEGORIES = ("code", "math", "json", "extraction", "translation", "creative")


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    prompt: str
    chat: bool = False
    source: str = ""  # file:line, for error messages


def default_prompt_files() -> list[Path]:
    return sorted(PROMPTS_DIR.glob("*.jsonl"))


def parse_prompt_line(line: str, where: str) -> Prompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise GemmaspecError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise GemmaspecError(f"{where}: each line must be a JSON object")
    for key in ("id", "category", "prompt"):
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            raise GemmaspecError(f"{where}: '{key}' must be a non-empty string")
    chat = obj.get("chat", False)
    if not isinstance(chat, bool):
        raise GemmaspecError(f"{where}: 'chat' must be true or false")
    return Prompt(obj["id"], obj["category"], obj["prompt"], chat, where)


def load_prompts(files: list[str | Path] | None = None, categories: list[str] | None = None,
                 limit: int | None = None) -> list[Prompt]:
    """Prompts from `files` (default: the shipped suite), optionally only `categories` and the first `limit`
    prompts of each category. Ids must be unique across all files."""
    paths = [Path(f).expanduser() for f in files] if files else default_prompt_files()
    if not paths:
        raise GemmaspecError(f"no prompt files found in {PROMPTS_DIR}")
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for path in paths:
        if not path.is_file():
            raise GemmaspecError(f"prompt file not found: {path}")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            p = parse_prompt_line(line, f"{path}:{n}")
            if p.id in seen:
                raise GemmaspecError(f"{p.source}: duplicate prompt id '{p.id}' (first at {seen[p.id]})")
            seen[p.id] = p.source
            prompts.append(p)
    if not prompts:
        raise GemmaspecError("the prompt files hold no prompts")
    if categories:
        known = {p.category for p in prompts}
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise GemmaspecError(f"no prompts in category '{unknown[0]}' (have: {', '.join(sorted(known))})")
        prompts = [p for p in prompts if p.category in categories]
    if limit is not None:
        if limit < 1:
            raise GemmaspecError(f"--limit must be >= 1, got {limit}")
        counts: dict[str, int] = {}
        kept = []
        for p in prompts:
            counts[p.category] = counts.get(p.category, 0) + 1
            if counts[p.category] <= limit:
                kept.append(p)
        prompts = kept
    return prompts
