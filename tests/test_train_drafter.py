"""`gemmaspec train-drafter`: a short run completes, its output loads with --drafter mtp:DIR and decodes
losslessly; an interrupted run resumes."""

import json

from gemmaspec.cli import main
from gemmaspec.drafters import make_drafter
from gemmaspec.engine import Engine
from gemmaspec.loading import load_model
from gemmaspec.train.corpus import build_corpus
from gemmaspec.train.openers import GENRES, opener_pool
from gemmaspec.train.openers import openers as generated_openers


def _train(model_dir, out, *extra):
    return main(["train-drafter", "--model", str(model_dir), "--out", str(out), "--steps", "20",
                 "--sequences", "8", "--eval-sequences", "2", "--seq-len", "64", "--max-documents", "60",
                 "--vocab", "512", "--hidden-size", "64", "--intermediate-size", "128", "--layers", "2",
                 "--batch-positions", "32", "--threads", "1", *extra])


def test_short_training_run_loads_and_is_lossless(tiny_gemma3_realtok_dir, tmp_path):
    out = tmp_path / "drafter"
    assert _train(tiny_gemma3_realtok_dir, out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4_assistant" and config["gemmaspec_vocab_size"] > 0
    report = json.loads((out / "training.json").read_text())
    assert 1.0 <= report["held_out"]["mean_accepted_length"] <= 5.0

    target = load_model(str(tiny_gemma3_realtok_dir), dtype="float32", device="cpu")
    plain = Engine(target, make_drafter("none", target), 0)
    for k in (1, 4):
        engine = Engine(target, make_drafter(f"mtp:{out}", target), k)
        for prompt in ("def add(a, b):", '{"name": "Ada", "id": 3}'):
            got = engine.generate(prompt, max_new_tokens=24)
            assert got.token_ids == plain.generate(prompt, max_new_tokens=24).token_ids
            assert got.stats.drafted_tokens > 0


def test_resume_continues_and_refuses_changed_settings(tiny_gemma3_realtok_dir, tmp_path, capsys):
    out = tmp_path / "drafter"
    assert _train(tiny_gemma3_realtok_dir, out) == 0
    assert _train(tiny_gemma3_realtok_dir, out) == 2  # an earlier run is there: needs --resume
    assert "--resume" in capsys.readouterr().err
    assert _train(tiny_gemma3_realtok_dir, out, "--resume") == 0  # finished run: resumes at its last step
    code = main(["train-drafter", "--model", str(tiny_gemma3_realtok_dir), "--out", str(out), "--resume",
                 "--seq-len", "32"])
    assert code == 2


def test_corpus_is_reproducible_with_a_held_out_split():
    a, b = build_corpus(), build_corpus()
    assert [d.id for d in a] == [d.id for d in b] and [d.text for d in a[:50]] == [d.text for d in b[:50]]
    kinds = {d.kind for d in a}
    assert {"code", "prose", "math", "json", "copying"} <= kinds
    splits = {d.split for d in a}
    assert splits == {"train", "eval"}
    assert len({d.id for d in a}) == len(a)


def test_openers_are_reproducible_and_cover_every_genre():
    a, b = generated_openers(200), generated_openers(200)
    assert [d.text for d in a] == [d.text for d in b] and len({d.text for d in a}) > 150
    assert {d.kind for d in a} == {"opener-" + g for g in GENRES}
    assert {d.split for d in a} == {"train", "eval"}
    assert all(d.text.strip() for d in a)
    # repeated texts share a split (no held-out prompt is ever trained on), and the pool holds each text once
    splits = {}
    for d in a:
        assert splits.setdefault(d.text, d.split) == d.split
    pool = opener_pool()
    assert len({d.text for d in pool}) == len(pool) > 5000


def test_self_generated_continuations_are_the_targets_greedy_output(tiny_gemma3_realtok_dir, tmp_path):
    from gemmaspec.train.corpus import interleave

    out = tmp_path / "drafter"
    assert _train(tiny_gemma3_realtok_dir, out, "--self-generated", "2", "--openers", "2") == 0
    work = out / "work"
    records = {split: [json.loads(line) for line in (work / f"selfgen-{split}.jsonl").read_text().splitlines()]
               for split in ("train", "eval")}
    assert len(records["train"]) == 2 and len(records["eval"]) == 1  # N, and N / 8 (at least 1) held out
    docs = {d.id: d for d in interleave(build_corpus())[:60]}
    target = load_model(str(tiny_gemma3_realtok_dir), dtype="auto", device="cpu")  # as they are generated
    plain = Engine(target, make_drafter("none", target), 0)
    plain.eos_ids = set()
    for split, recs in records.items():
        for r in recs:
            assert docs[r["source"]].split == split  # a continuation keeps its source's split
            new = 96
            prompt = r["ids"][:-new]
            assert plain.generate(prompt, max_new_tokens=new).token_ids == r["ids"][-new:]
    assert list((work / "teacher" / "train").glob("selfgen*.pt")) and list((work / "teacher" / "eval").glob("selfgen*.pt"))
    held_out = json.loads((out / "training.json").read_text())["held_out"]["by_kind"]
    assert any(kind.startswith("own-") for kind in held_out)
    # openers: the whole generated opener is the prompt, 128 new tokens
    openers = {d.id: d for d in opener_pool()}
    for split in ("train", "eval"):
        recs = [json.loads(line) for line in (work / f"opener-{split}.jsonl").read_text().splitlines()]
        assert len(recs) == {"train": 2, "eval": 1}[split]
        for r in recs:
            src = openers[r["source"]]
            assert src.split == split and r["ids"][:-128] == target.tokenizer.encode(src.text)
            assert plain.generate(r["ids"][:-128], max_new_tokens=128).token_ids == r["ids"][-128:]
    assert list((work / "teacher" / "train").glob("opener*.pt"))
    before = [(work / f"{name}-train.jsonl").read_text() for name in ("selfgen", "opener")]
    assert _train(tiny_gemma3_realtok_dir, out, "--self-generated", "2", "--openers", "2", "--resume") == 0
    assert [(work / f"{name}-train.jsonl").read_text() for name in ("selfgen", "opener")] == before  # resumed


def test_vocabulary_counts_the_targets_own_text_as_much_as_the_corpus():
    import torch

    from gemmaspec.train.teacher import frequent_tokens, mixed_frequencies

    corpus = torch.zeros(10, dtype=torch.long)
    corpus[:4] = torch.tensor([1000, 900, 800, 700])  # a large corpus without token 9
    own = torch.zeros(10, dtype=torch.long)
    own[9], own[0] = 30, 10  # the target's own (small) text: token 9 is most of it
    assert 9 not in frequent_tokens(corpus, 3, []).tolist()
    assert 9 in frequent_tokens(mixed_frequencies(corpus, own), 3, []).tolist()


def test_init_from_keeps_a_trained_drafter_and_maps_new_head_rows(tiny_gemma3_realtok_dir, tmp_path):
    import pytest
    import torch

    from gemmaspec.errors import GemmaspecError
    from gemmaspec.models.assistant import AssistantConfig, AssistantModel, load_assistant
    from gemmaspec.train.loop import warm_start

    first = tmp_path / "first"
    assert _train(tiny_gemma3_realtok_dir, first) == 0
    old = load_assistant(first)
    target = load_model(str(tiny_gemma3_realtok_dir), dtype="float32", device="cpu", weights="float")
    kept = old.vocab_map[:400]
    unseen = torch.tensor([t for t in range(target.model.config.vocab_size) if t not in set(old.vocab_map.tolist())][:50])
    vocab = torch.sort(torch.cat([kept, unseen])).values
    cfg = json.loads((first / "config.json").read_text()) | {"gemmaspec_vocab_size": len(vocab)}
    model = AssistantModel(AssistantConfig.from_hf(cfg))
    model.init_trainable(vocab, target.model)
    warm_start(model, first, target.model)

    for name, tensor in old.state_dict().items():
        if name not in ("lm_head", "vocab_map"):
            assert torch.equal(model.state_dict()[name], tensor), name
    row_of = {int(t): i for i, t in enumerate(model.vocab_map.tolist())}
    old_rows = {int(t): old.lm_head[i] for i, t in enumerate(old.vocab_map.tolist())}
    for t in kept.tolist():
        assert torch.equal(model.lm_head[row_of[t]], old_rows[t])
    embed = target.model.embed_tokens.float()
    fit = torch.linalg.lstsq(embed[kept].double(), torch.stack([old_rows[t] for t in kept.tolist()]).double()).solution
    new_rows = model.lm_head[[row_of[t] for t in unseen.tolist()]]
    torch.testing.assert_close(new_rows, (embed[unseen].double() @ fit).float())

    wider = json.loads((first / "config.json").read_text())
    wider["text_config"]["intermediate_size"] *= 2
    other = AssistantModel(AssistantConfig.from_hf(wider))
    other.init_trainable(old.vocab_map, target.model)
    with pytest.raises(GemmaspecError, match="shape differs"):
        warm_start(other, first, target.model)


def test_opener_genres_are_a_series_of_their_own(tiny_gemma3_realtok_dir, tmp_path, capsys):
    out = tmp_path / "drafter"
    assert _train(tiny_gemma3_realtok_dir, out, "--openers", "2", "--opener-genres", "poetry") == 2
    assert "unknown genre poetry" in capsys.readouterr().err
    assert _train(tiny_gemma3_realtok_dir, out, "--openers", "2", "--opener-genres", "code", "--resume") == 0
    recs = [json.loads(line) for line in (out / "work" / "opener-code-train.jsonl").read_text().splitlines()]
    pool = {d.id: d for d in opener_pool()}
    assert len(recs) == 2 and all(pool[r["source"]].kind == "opener-code" for r in recs)
    assert list((out / "work" / "teacher" / "train").glob("opener-code*.pt"))


def test_continuations_keep_their_sources_split(tmp_path):
    """An opener's split follows its text (a hash of it), not its id: each continuation must land in the split of
    the opener it continues, or held-out openers would be trained on."""
    from gemmaspec.train.selfgen import self_generated

    class Echo:  # the target's part is not under test here: a continuation of one token
        tokenizer = type("T", (), {"encode": staticmethod(lambda text: [2, len(text) % 7 + 3]), "bos_id": 2})()

        def generate(self, prompt, max_new_tokens):
            return type("R", (), {"token_ids": [5]})()

    pool = opener_pool()
    assert any(d.split != type(d)(d.id, d.kind, d.text).split for d in pool)  # id and text disagree for some
    for split in ("train", "eval"):
        docs = self_generated(Echo(), pool, tmp_path, split, 40, new_tokens=1, name="opener", whole=True)
        assert len(docs) == 40 and all(d.split == split for d in docs)
