"""The incremental detokenizer with the default model's real tokenizer (byte fallback, multi-byte characters)."""

from __future__ import annotations

import random

import pytest

from gemmaspec.loading.tokenizer import IncrementalDecoder, Tokenizer, token_texts

TEXTS = [
    "def f(x):\n    return x  # ok\n\n\n",
    "Émile 日本語のテキスト 🎉🎉 naïve café — “quotes” 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "   leading spaces\tand tabs",
    "<start_of_turn>user\nhi<end_of_turn>",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_gemma3_realtok_dir) -> Tokenizer:
    return Tokenizer.from_folder(tiny_gemma3_realtok_dir)


def _sequences(tokenizer: Tokenizer) -> list[list[int]]:
    rng = random.Random(0)
    seqs = [tokenizer.encode(t, add_bos=False) for t in TEXTS]
    for _ in range(100):
        seqs.append([rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))])
        seqs.append([rng.randrange(230, 500) for _ in range(rng.randrange(1, 30))])  # byte-fallback tokens
    return seqs


def test_incremental_text_equals_a_full_decode(tokenizer):
    """Token by token, the text is a decode of every id whenever that does not end inside a character, for real
    text and for random ids (invalid byte sequences included); flush() gives the full decode."""
    for ids in _sequences(tokenizer):
        decoder = IncrementalDecoder(tokenizer)
        for i in ids:
            decoder.add([i])
            full = tokenizer.decode(decoder.ids)
            if not full.endswith("\ufffd"):
                assert decoder.text == full, ids
        decoder.flush()
        assert decoder.text == tokenizer.decode(ids)


def test_incremental_decode_reads_a_window_not_the_whole_text(tokenizer):
    """Each step decodes a few tokens, however long the text is (decoding every id made a step's cost grow with
    the generation)."""
    ids = tokenizer.encode(" ".join(TEXTS[:3]) * 20, add_bos=False)
    assert len(ids) > 300
    decoded_lengths = []
    decode = tokenizer.decode
    tokenizer.decode = lambda window: decoded_lengths.append(len(window)) or decode(window)
    try:
        decoder = IncrementalDecoder(tokenizer)
        for i in ids:
            decoder.add([i])
    finally:
        del tokenizer.decode
    assert decoder.text == decode(ids)
    assert max(decoded_lengths) <= 8


def test_token_texts_read_from_pieces_equal_each_token_decoded_in_a_text(tokenizer):
    fast = tokenizer.fast
    texts = token_texts(fast)  # the Gemma tokenizer: read from its pieces
    head = fast.decode([tokenizer.token_id("a")])
    decoded = fast.decode_batch([[tokenizer.token_id("a"), i] for i in range(tokenizer.vocab_size)],
                                skip_special_tokens=True)
    assert texts == [t[len(head):] for t in decoded]


STOPS = ["ok", "\n\n", "é", "🎉", "日本", "”", "<end_of_turn>", "x  #"]


def test_a_stop_string_can_only_show_after_an_id_that_may_end_it(tokenizer):
    # engine.py ends plain decoding's runs of steps at these ids: a text must not gain a stop string at any other
    may_end = set(tokenizer.ids_that_may_end(STOPS).tolist())
    spelled = [[tokenizer.token_id(f"<0x{b:02X}>") for b in ("a " + s).encode()] for s in STOPS]  # byte by byte
    shown = 0
    for ids in _sequences(tokenizer) + spelled:
        decoder = IncrementalDecoder(tokenizer)
        for i in ids:
            before = decoder.text
            decoder.add([i])
            if any(s in decoder.text and s not in before for s in STOPS):
                shown += 1
                assert i in may_end, (tokenizer.decode([i]), decoder.text)
    assert shown >= 6 + len(STOPS)  # (the encoded TEXTS hold most of the stops)
