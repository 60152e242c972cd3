"""The target's own continuations: the text a drafter actually sees at inference.

Teacher forcing on corpus text teaches the drafter what the target predicts after *human* text; at inference
the context is mostly the target's *own* output (its style, its repetitions), which a drafter trained on
corpus text alone predicts much worse (held-out 2.4 vs ~1.5 accepted tokens on the public bench suite).
So we prompt the target with pieces of corpus documents and keep its greedy continuation, token ids exact.

Continuations are appended to DIR/selfgen-{split}.jsonl one per line, so an interrupted run resumes where it
stopped. A continuation keeps its source document's split: held-out text never reaches training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .corpus import Document


def prompt_piece(ids: list[int], rng: random.Random, bos: int | None, min_len: int = 24, max_len: int = 150) -> list[int]:
    """A random window of a document's tokens (its start or a later point), BOS first like a real prompt."""
    body = ids[1:] if bos is not None and ids and ids[0] == bos else ids
    length = min(len(body), rng.randint(min_len, max_len))
    start = rng.randint(0, max(0, len(body) - length - 1)) if rng.random() < 0.7 else 0
    piece = body[start : start + length]
    return ([bos] if bos is not None else []) + piece


def self_generated(engine, docs: list[Document], out_dir: Path, split: str, count: int, new_tokens: int = 96,
                   seed: int = 0, progress=None, name: str = "selfgen", whole: bool = False) -> list[Document]:
    """`count` continuations of pieces of `split` documents (generated now or read back from an earlier run).
    `whole`: the prompt is the whole document (openers, train/openers.py), not a random window of it."""
    path = Path(out_dir) / f"{name}-{split}.jsonl"
    done = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    sources = [d for d in docs if d.split == split and d.token_ids is None]
    rng = random.Random(f"{seed}/{split}")
    order = rng.sample(range(len(sources)), len(sources))  # fixed order: a resumed run picks the same documents
    tok = engine.tokenizer
    if progress is not None:
        progress.update(min(len(done), count))
    with path.open("a") as f:
        for n in range(len(done), min(count, len(order))):
            src = sources[order[n]]
            piece_rng = random.Random(f"{seed}/{src.id}")
            ids = tok.encode(src.text)
            prompt = ids if whole else prompt_piece(ids, piece_rng, tok.bos_id)
            result = engine.generate(prompt, max_new_tokens=new_tokens)
            record = {"source": src.id, "kind": src.kind, "ids": prompt + list(result.token_ids)}
            f.write(json.dumps(record) + "\n")
            f.flush()
            done.append(record)
            if progress is not None:
                progress.update(1)
    # A continuation takes its source's split, whatever decides it (an opener's split follows its text, not its id:
    # keying on the id had put continuations of held-out openers into training).
    split_key = {d.id: d.split_of or d.id for d in docs}
    return [Document(f"{name}/" + r["source"], "own-" + r["kind"], "", token_ids=tuple(r["ids"]),
                     split_of=split_key.get(r["source"], r["source"]))
            for r in done[:count]]
