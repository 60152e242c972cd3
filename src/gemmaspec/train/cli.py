"""`gemmaspec train-drafter`: train an MTP assistant for a target by self-distillation.

Stages (each resumable; `--resume` continues where an interrupted run stopped):
1. corpus     assembled offline (train/corpus.py), split train/eval by a hash of each document id;
2. teacher    the target runs over the corpus once (teacher forcing): ids, its greedy predictions, final
              hidden states and the K/V of the layers the drafter reads, in shards under OUT/work/;
3. train      the drafter learns to predict the target's tokens 1..D steps ahead through its own recurrence,
              checkpointing every few minutes, with held-out acceptance on the eval split;
4. export     OUT/config.json + OUT/model.safetensors, loadable with `--drafter mtp:OUT`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("train-drafter", help="train an MTP drafter for a target model (self-distillation)")
    p.add_argument("--model", default="default", help="the target: 'default', an HF folder or a .gguf file")
    p.add_argument("--out", required=True, help="output folder for the drafter")
    p.add_argument("--corpus", nargs="*", default=None, help="extra text files to train on")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--draft-depth", type=int, default=4, help="tokens ahead the drafter learns to predict (D)")
    p.add_argument("--sequences", type=int, default=400, help="training sequences of --seq-len tokens to distill")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-sequences", type=int, default=24)
    p.add_argument("--vocab", type=int, default=8192, help="drafter vocabulary: the target's most frequent tokens")
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=1024)
    p.add_argument("--batch-positions", type=int, default=256, help="anchor positions per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's choice, capped by a container's CPU quota)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--self-generated", type=int, default=0,
                   help="also distill on N of the target's own greedy continuations of corpus pieces (N/8 held out)")
    p.add_argument("--openers", type=int, default=0,
                   help="also distill on the target's continuations of N generated openers of many kinds of text "
                        "(code in 12 languages, JSON, e-mail/news/stories, maths, translation; N/8 held out)")
    p.add_argument("--opener-genres", default=None, metavar="LIST",
                   help="only openers of these genres (comma-separated: code,json,prose,translation,math); a series "
                        "of its own, so a resumed run can add e.g. more code to the openers it already has")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from a trained drafter of this target and the same shape (its vocabulary may differ)")
    p.add_argument("--max-documents", type=int, default=0, help="use only the first N corpus documents (quick runs)")
    p.set_defaults(func=cmd_train_drafter)


def cmd_train_drafter(args) -> int:
    import torch
    from tqdm import tqdm

    from ..errors import GemmaspecError
    from ..loading import load_model
    from .corpus import build_corpus, interleave
    from .teacher import build_shards, frequent_tokens, mixed_frequencies, token_frequencies

    out = Path(args.out)
    work = out / "work"
    if out.exists() and any(out.iterdir()) and not args.resume and not (work / "run.json").exists():
        raise GemmaspecError(f"{out} is not empty (use --resume to continue a run there, or another --out)")
    work.mkdir(parents=True, exist_ok=True)
    run_path = work / "run.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "resume", "threads", "debug", "command")}
    if run_path.exists():
        previous = json.loads(run_path.read_text())
        if not args.resume:
            raise GemmaspecError(f"{out} holds an earlier run; pass --resume to continue it")
        changed = [k for k in ("model", "max_documents", "seq_len", "vocab", "hidden_size", "layers", "intermediate_size", "draft_depth",
                               "seed")
                   if previous.get(k, settings.get(k)) != settings.get(k)]
        if changed:
            raise GemmaspecError(f"--resume with different {', '.join(changed)} than the run in {out}")
    run_path.write_text(json.dumps(settings, indent=2))

    target = load_model(args.model, dtype="float32", device="cpu", weights="float")
    docs = interleave(build_corpus(args.corpus))
    if args.max_documents:
        docs = docs[: args.max_documents]
    own = _own_continuations(args, docs, work) if (args.self_generated or args.openers) else []
    vocab_path = work / "vocab.pt"
    if vocab_path.exists():
        vocabs = torch.load(vocab_path)
    else:
        print("counting corpus tokens ...", file=sys.stderr)
        counts = mixed_frequencies(token_frequencies(docs, target.tokenizer, target.model.config.vocab_size),
                                   token_frequencies([d for d, _ in own], target.tokenizer, target.model.config.vocab_size))
        always = sorted(set(target.model.config.eos_token_ids) | {i for i in [target.tokenizer.token_id("<end_of_turn>")] if i is not None})
        vocabs = {"labels": frequent_tokens(counts, 2 * args.vocab, always),
                  "drafter": frequent_tokens(counts, args.vocab, always)}
        torch.save(vocabs, vocab_path)

    total = args.sequences + args.eval_sequences
    with tqdm(total=total, desc="teacher forcing", unit="seq", file=sys.stderr) as bar:
        build_shards(target.model, target.tokenizer, docs, work, "eval", args.seq_len, args.eval_sequences, vocabs["labels"], bar)
        build_shards(target.model, target.tokenizer, docs, work, "train", args.seq_len, args.sequences, vocabs["labels"], bar)
    for name in dict.fromkeys(name for _, name in own):
        series = [d for d, n in own if n == name]
        with tqdm(total=len(series), desc=f"teacher forcing (own, {name})", unit="seq", file=sys.stderr) as bar:
            for split in ("eval", "train"):
                part = [d for d in series if d.split == split]
                build_shards(target.model, target.tokenizer, part, work, split, args.seq_len, len(part),
                             vocabs["labels"], bar, prefix=name)

    from .loop import train_drafter

    train_drafter(target, work, out, vocabs["drafter"], args)
    return 0


def _own_continuations(args, docs, work: Path) -> list[tuple]:
    """The target's own continuations (train/selfgen.py) of corpus pieces and of generated openers
    (train/openers.py), generated with prompt lookup (fast, and greedy output is exact):
    (document, series name) pairs, teacher-forced like the corpus. They come before the vocabulary is chosen:
    the drafter's vocabulary must hold what the target writes (code in many languages), not only what the
    corpus holds (Python)."""
    from tqdm import tqdm

    from ..drafters.ngram import NgramDrafter
    from ..engine import Engine
    from ..loading import load_model
    from ..errors import GemmaspecError
    from .openers import GENRES, opener_pool
    from .selfgen import self_generated

    series = []  # (name, source documents, whole document as prompt, new tokens, count per split)
    if args.self_generated:
        series.append(("selfgen", docs, False, 96, {"train": args.self_generated, "eval": max(1, args.self_generated // 8)}))
    if args.openers:
        pool, name = opener_pool(args.seed), "opener"
        if args.opener_genres:
            genres = sorted({g.strip() for g in args.opener_genres.split(",") if g.strip()})
            unknown = [g for g in genres if g not in GENRES]
            if unknown or not genres:
                raise GemmaspecError(f"--opener-genres: unknown genre {', '.join(unknown) or '(none)'} "
                                     f"(known: {', '.join(GENRES)})")
            pool = [d for d in pool if d.kind.removeprefix("opener-") in genres]
            name = "opener-" + "-".join(genres)
        series.append((name, pool, True, 128, {"train": args.openers, "eval": max(1, args.openers // 8)}))
    # Generated as users run the target (its default dtype and weights): that is the text the drafter will see.
    engine = Engine(load_model(args.model, dtype="auto", device="cpu", weights="auto"), NgramDrafter(), "auto")
    engine.eos_ids = set()  # keep every continuation the same length
    own = []
    for name, sources, whole, new_tokens, counts in series:
        with tqdm(total=sum(counts.values()), desc=f"own continuations ({name})", unit="seq", file=sys.stderr) as bar:
            for split, count in counts.items():
                own += [(d, name) for d in self_generated(engine, sources, work, split, count, new_tokens=new_tokens,
                                                          seed=args.seed, progress=bar, name=name, whole=whole)]
    return own
