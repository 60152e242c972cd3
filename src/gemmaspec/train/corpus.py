"""The offline drafter-training corpus: assembled reproducibly from what every Python install has, plus text
generated from a fixed seed. No downloads.

Kinds (each document has a stable id; the split is a hash of the id, so it never changes between runs):
- code:    the Python standard library's top-level modules (`Lib/*.py`), in chunks;
- prose:   the Python documentation topics shipped with the interpreter (`pydoc_data/topics.py`);
- math:    generated arithmetic worked examples (sums, products, percentages, unit conversions);
- json:    generated JSON records, API responses and tool calls;
- copying: a passage followed by a request to quote or summarise it (the answer copies from the passage).

`--corpus PATHS` adds the user's own text files (each file one document, kind "user").
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EVAL_FRACTION = 0.05


@dataclass(frozen=True)
class Document:
    id: str
    kind: str
    text: str
    token_ids: tuple[int, ...] | None = None  # exact tokens (the target's own continuations), else encode text
    split_of: str | None = None  # a derived document keeps its source's split, so eval text never trains

    @property
    def split(self) -> str:
        h = int(hashlib.sha256((self.split_of or self.id).encode()).hexdigest()[:8], 16)
        return "eval" if h / 0xFFFFFFFF < EVAL_FRACTION else "train"


def stdlib_code(max_chars: int = 6000) -> list[Document]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(lib.glob("*.py")):
        text = path.read_text(errors="replace")
        for i in range(0, len(text), max_chars):
            docs.append(Document(f"code/{path.name}/{i // max_chars}", "code", text[i : i + max_chars]))
    return docs


def python_doc_prose(max_chars: int = 4000) -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    docs = []
    for name in sorted(topics):
        text = topics[name]
        for i in range(0, len(text), max_chars):
            docs.append(Document(f"prose/{name}/{i // max_chars}", "prose", text[i : i + max_chars]))
    return docs


def generated_math(n: int = 1500, seed: int = 11) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = []
        for _ in range(rng.randint(3, 8)):
            a, b = rng.randint(2, 999), rng.randint(2, 999)
            kind = rng.randrange(6)
            if kind == 0:
                lines.append(f"Q: What is {a} + {b}?\nA: {a} + {b} = {a + b}.")
            elif kind == 1:
                lines.append(f"Q: What is {a} - {b}?\nA: {a} - {b} = {a - b}.")
            elif kind == 2:
                a, b = rng.randint(2, 99), rng.randint(2, 99)
                lines.append(f"Q: What is {a} * {b}?\nA: {a} * {b} = {a * b}.")
            elif kind == 3:
                p = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])
                lines.append(f"Q: What is {p}% of {a * 4}?\nA: {p}% of {a * 4} = {p} / 100 * {a * 4} = {p * a * 4 / 100:g}.")
            elif kind == 4:
                km = rng.randint(1, 500)
                lines.append(f"Q: Convert {km} km to meters.\nA: {km} km = {km} * 1000 m = {km * 1000} m.")
            else:
                x = rng.randint(1, 50)
                c = a + 3 * x
                lines.append(f"Solve 3x + {a} = {c}.\n3x = {c} - {a} = {3 * x}\nx = {3 * x} / 3 = {x}")
        docs.append(Document(f"math/{i}", "math", "\n\n".join(lines) + "\n"))
    return docs


_NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Niaj",
          "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Yara", "Zoe", "Liam", "Mia", "Noah"]
_CITIES = ["Paris", "Berlin", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Seoul", "Austin", "Madrid", "Delhi", "Quito"]
_TOOLS = [
    ("get_weather", {"city": "str", "unit": ["celsius", "fahrenheit"]}),
    ("search_flights", {"origin": "str", "destination": "str", "date": "date"}),
    ("send_email", {"to": "email", "subject": "str", "body": "str"}),
    ("create_event", {"title": "str", "start": "date", "duration_minutes": "int"}),
    ("convert_currency", {"amount": "int", "from": ["USD", "EUR", "JPY", "GBP"], "to": ["USD", "EUR", "JPY", "GBP"]}),
]


def _value(rng: random.Random, spec):
    if isinstance(spec, list):
        return rng.choice(spec)
    if spec == "int":
        return rng.randint(1, 500)
    if spec == "date":
        return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if spec == "email":
        return f"{rng.choice(_NAMES).lower()}@example.com"
    return rng.choice(_CITIES) if rng.random() < 0.5 else f"{rng.choice(['Meeting', 'Report', 'Trip', 'Lunch'])} with {rng.choice(_NAMES)}"


def generated_json(n: int = 1500, seed: int = 13) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        kind = rng.randrange(3)
        if kind == 0:  # a list of records
            records = [
                {"id": j + 1, "name": rng.choice(_NAMES), "email": f"user{rng.randint(1, 999)}@example.com",
                 "city": rng.choice(_CITIES), "active": rng.random() < 0.7, "score": round(rng.uniform(0, 100), 1)}
                for j in range(rng.randint(3, 8))
            ]
            text = json.dumps(records, indent=rng.choice([None, 2]))
        elif kind == 1:  # a tool call with its result
            name, params = rng.choice(_TOOLS)
            args = {k: _value(rng, v) for k, v in params.items()}
            call = {"name": name, "arguments": args}
            result = {"status": "ok", "result": {k: _value(rng, v) for k, v in params.items()}}
            text = ("Available tools: " + ", ".join(t for t, _ in _TOOLS) + "\n" + "User: please " + name.replace("_", " ")
                    + "\nAssistant: ```json\n" + json.dumps(call) + "\n```\nTool result: " + json.dumps(result) + "\n")
        else:  # an API response
            obj = {"request_id": f"req_{rng.randint(10**5, 10**6)}", "data": {"items": [
                {"sku": f"SKU-{rng.randint(100, 999)}", "qty": rng.randint(1, 9), "price": round(rng.uniform(1, 99), 2)}
                for _ in range(rng.randint(2, 5))]}, "page": rng.randint(1, 9), "has_more": rng.random() < 0.5}
            text = json.dumps(obj, indent=2)
        docs.append(Document(f"json/{i}", "json", text))
    return docs


def copying_tasks(prose: list[Document], n: int = 800, seed: int = 17) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    paragraphs = [p.strip() for d in prose for p in d.text.split("\n\n") if 200 < len(p.strip()) < 1200]
    for i in range(min(n, len(paragraphs))):
        passage = rng.choice(paragraphs)
        sentences = [s.strip() for s in passage.replace("\n", " ").split(". ") if len(s.strip()) > 20]
        if not sentences:
            continue
        quote = rng.choice(sentences)
        ask = rng.choice(["Quote the sentence that answers the question.", "Repeat the key sentence.",
                          "Extract the most important sentence.", "Summary:"])
        docs.append(Document(f"copy/{i}", "copying", f"{passage}\n\n{ask}\n{quote}.\n"))
    return docs


def user_files(paths: list[str]) -> list[Document]:
    return [Document(f"user/{Path(p).name}", "user", Path(p).read_text(errors="replace")) for p in paths]


def build_corpus(extra_paths: list[str] | None = None) -> list[Document]:
    prose = python_doc_prose()
    docs = stdlib_code() + prose + generated_math() + generated_json() + copying_tasks(prose)
    if extra_paths:
        docs += user_files(extra_paths)
    return docs


def interleave(docs: list[Document], seed: int = 0) -> list[Document]:
    """A fixed shuffle, so that any prefix of the corpus mixes every kind."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return docs
