"""Teacher forcing: run the target over the corpus once and keep what the drafter learns from.

Per sequence of `seq_len` tokens: the token ids, the target's own greedy next-token predictions, its final
hidden states, and the K/V of the layers the drafter reads. Written in shards under DIR/teacher/{split}/,
so an interrupted run resumes at the first missing shard.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .corpus import Document

SHARD_SEQUENCES = 8


def read_layers(model) -> dict[str, int]:
    """The target cache layers a drafter reads by default: the last sliding and the last full layer."""
    specs = model.cache_specs()
    sliding = [i for i, s in enumerate(specs) if s.window is not None]
    full = [i for i, s in enumerate(specs) if s.window is None]
    out = {"full_attention": full[-1]}
    if sliding:
        out["sliding_attention"] = sliding[-1]
    return out


def sequences(docs: list[Document], tokenizer, seq_len: int, min_len: int = 64):
    """Token sequences of exactly seq_len (documents split into chunks; short tails dropped), in order."""
    for doc in docs:
        ids = list(doc.token_ids) if doc.token_ids is not None else tokenizer.encode(doc.text)
        for i in range(0, len(ids), seq_len):
            chunk = ids[i : i + seq_len]
            if len(chunk) == seq_len or (len(chunk) >= min_len and i == 0):
                yield doc, chunk


@torch.inference_mode()
def teacher_outputs(model, ids: list[int], layers: dict[str, int], label_vocab: torch.Tensor) -> dict[str, torch.Tensor]:
    """The target's greedy prediction is taken over `label_vocab` (the corpus's most frequent tokens): the full
    262k-row head would cost 6x the rest of the forward on a CPU, and a drafter with a trimmed vocabulary
    cannot propose the other tokens anyway (positions whose prediction falls outside are masked in training)."""
    cache = model.new_cache(len(ids), spec_margin=len(ids))  # rings hold every position: K/V of all of them are kept
    hidden = model(torch.tensor(ids), cache)
    head = model.embed_tokens.index_select(0, label_vocab)
    preds = label_vocab[torch.nn.functional.linear(hidden, head).argmax(-1)]
    out = {"ids": torch.tensor(ids, dtype=torch.int32), "pred": preds.to(torch.int32), "hidden": hidden.half()}
    for kind, layer in layers.items():
        k, v, _ = cache.layer_kv(layer)
        tag = "full" if kind == "full_attention" else "sliding"
        out[f"k_{tag}"] = k[:, : len(ids)].half().clone()
        out[f"v_{tag}"] = v[:, : len(ids)].half().clone()
    return out


def build_shards(model, tokenizer, docs: list[Document], out_dir: Path, split: str, seq_len: int,
                 max_sequences: int, label_vocab: torch.Tensor, progress=None, prefix: str = "shard") -> int:
    """Write shards for up to max_sequences sequences of `split`; returns how many sequences exist.
    `prefix` names a separate series of shards (the target's own continuations are "selfgen")."""
    out_dir = Path(out_dir) / "teacher" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = read_layers(model)
    batch, shard_index, done = [], 0, 0
    for doc, ids in sequences([d for d in docs if d.split == split], tokenizer, seq_len):
        if done >= max_sequences:
            break
        shard_path = out_dir / f"{prefix}{shard_index:05d}.pt"
        if shard_path.exists():  # resume: this shard was written by an earlier run
            batch.append(None)
        else:
            batch.append((doc.kind, teacher_outputs(model, ids, layers, label_vocab)))
        done += 1
        if progress is not None:
            progress.update(1)
        if len(batch) == SHARD_SEQUENCES:
            _write(shard_path, batch, layers)
            batch, shard_index = [], shard_index + 1
    if batch:
        _write(out_dir / f"{prefix}{shard_index:05d}.pt", batch, layers)
    return done


def _write(path: Path, batch, layers) -> None:
    if path.exists() or all(b is None for b in batch):
        return
    items = [b for b in batch if b is not None]
    kinds = [k for k, _ in items]
    data = {key: [o[key] for _, o in items] for key in items[0][1]}
    tmp = path.with_suffix(".tmp")
    torch.save({"kinds": kinds, "layers": layers, **data}, tmp)
    tmp.rename(path)


def token_frequencies(docs: list[Document], tokenizer, vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in the training documents (their exact ids where they have them)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    train = [d for d in docs if d.split == "train"]
    texts = [d.text for d in train if d.token_ids is None]
    encoded = [enc.ids for enc in tokenizer.fast.encode_batch(texts, add_special_tokens=False)] if texts else []
    for ids in encoded + [list(d.token_ids) for d in train if d.token_ids is not None]:
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab_size)[:vocab_size]
    return counts


def mixed_frequencies(*counts: torch.Tensor) -> torch.Tensor:
    """Token frequencies of several sources weighted equally (each normalized to its own total), so a small
    source (the target's own continuations) counts as much as a large one (the corpus)."""
    mixed = torch.zeros(counts[0].shape, dtype=torch.float64)
    for c in counts:
        if c.sum() > 0:
            mixed += c.double() / c.sum()
    return mixed


def frequent_tokens(counts: torch.Tensor, n: int, always: list[int]) -> torch.Tensor:
    """The n most frequent tokens plus `always` (e.g. EOS), sorted by id."""
    top = set(torch.topk(counts, n).indices.tolist()) | set(always)
    return torch.tensor(sorted(top), dtype=torch.long)


def load_shards(directory: Path, split: str) -> list[dict]:
    return [torch.load(p, weights_only=False) for p in sorted((Path(directory) / "teacher" / split).glob("*.pt"))]
