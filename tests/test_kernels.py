"""Our C kernels for decoding (gemmaspec.kernels): each op against its PyTorch reference, and each row computed
independently of how many rows a call has (what makes verification of k + 1 tokens equal plain decoding)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gemmaspec import kernels
from gemmaspec.models.layers import apply_rope, rope_cos_sin, rope_inv_freq

K = kernels.load()
pytestmark = pytest.mark.skipif(K is None, reason="no C compiler: PyTorch fallback only")


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    assert got.shape == want.shape
    assert (got - want).abs().max() <= rel * want.abs().max() + 1e-7


@pytest.mark.parametrize("M", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("Kdim", [640, 100])  # 100: the 8-wide and scalar tails
def test_float32_linear_equals_torch_and_rows_are_independent(M, Kdim):
    w = torch.randn(37, Kdim, generator=_g(0))
    x = torch.randn(M, Kdim, generator=_g(1))
    y = K.linear_float(w, x)
    _close(y, x.double().mm(w.double().t()).float())
    for m in range(M):
        assert torch.equal(K.linear_float(w, x[m : m + 1].contiguous()), y[m : m + 1])


@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_with_and_without_residual(with_weight):
    x = torch.randn(5, 640, generator=_g(2)) * 3
    w = torch.rand(640, generator=_g(3)) + 0.5 if with_weight else None
    res = torch.randn(5, 640, generator=_g(4))
    want = F.rms_norm(x.double(), (640,), w.double() if w is not None else None, 1e-6).float()
    _close(K.rms_norm(x, w, 1e-6), want)
    _close(K.rms_norm(x, w, 1e-6, res), want + res)


def test_qk_norm_rope_in_place_equals_reference():
    T, nq, nkv, hd = 3, 4, 1, 256
    qkv = torch.randn(T, (nq + 2 * nkv) * hd, generator=_g(5))
    qw, kw = torch.rand(hd, generator=_g(6)) + 0.5, torch.rand(hd, generator=_g(7)) + 0.5
    cos, sin = rope_cos_sin(torch.arange(7, 7 + T), rope_inv_freq(hd, 10_000.0), torch.float32)
    q = qkv[:, : nq * hd].view(T, nq, hd).transpose(0, 1)
    k = qkv[:, nq * hd : (nq + nkv) * hd].view(T, nkv, hd).transpose(0, 1)
    want_q = apply_rope(F.rms_norm(q, (hd,), qw, 1e-6), cos, sin)
    want_k = apply_rope(F.rms_norm(k, (hd,), kw, 1e-6), cos, sin)
    v_before = qkv[:, (nq + nkv) * hd :].clone()
    K.qk_norm_rope(qkv, nq, nkv, hd, qw, kw, 1e-6, cos, sin)
    _close(qkv[:, : nq * hd].view(T, nq, hd).transpose(0, 1), want_q)
    _close(qkv[:, nq * hd : (nq + nkv) * hd].view(T, nkv, hd).transpose(0, 1), want_k)
    assert torch.equal(qkv[:, (nq + nkv) * hd :], v_before)  # v untouched


def _attention_case(T: int, S: int, seed: int):
    q = torch.randn(4, T, 64, generator=_g(seed))
    keys = torch.randn(2, S, 64, generator=_g(seed + 1))
    values = torch.randn(2, S, 48, generator=_g(seed + 2))
    mask = torch.rand(T, S, generator=_g(seed + 3)) < 0.6
    mask[:, 0] = True
    return q, keys, values, mask


@pytest.mark.parametrize("T,S", [(1, 5), (3, 37), (9, 576), (33, 4100)])
def test_attention_equals_sdpa_with_mask_and_gqa(T, S):
    q, keys, values, mask = _attention_case(T, S, 10)
    scale = 1 / math.sqrt(64)
    want = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, scale=scale,
                                          enable_gqa=True)[0].transpose(0, 1).reshape(T, -1)
    _close(K.attention(q, keys, values, mask, scale), want)
    _close(K.attention(q, keys, values, None, scale),
           F.scaled_dot_product_attention(q[None], keys[None], values[None], scale=scale, enable_gqa=True)[0]
           .transpose(0, 1).reshape(T, -1))


@pytest.mark.parametrize("S", [40, 300])
def test_attention_row_independent_of_other_queries_and_extra_slots(S):
    """A query's output is bit for bit the same alone or among others, and with masked slots appended (a
    verification step sees later positions that plain decoding does not have yet); over one chunk of slots and over
    several (300: five, the last partial; a causal mask leaves later chunks unseen by the first queries)."""
    q, keys, values, mask = _attention_case(5, S, 20)
    if S > 64:
        mask &= torch.arange(S)[None, :] <= torch.tensor([70, 128, 200, 250, 299])[:, None]
        mask[4, :100] = False  # a sliding window past the first chunk
    full = K.attention(q, keys, values, mask, 0.125)
    for t in range(5):
        alone = K.attention(q[:, t : t + 1], keys, values, mask[t : t + 1].contiguous(), 0.125)
        assert torch.equal(alone, full[t : t + 1])
        valid = int(mask[t].nonzero().max()) + 1  # drop the trailing slots this query cannot see
        short = K.attention(q[:, t : t + 1], keys[:, :valid], values[:, :valid], mask[t : t + 1, :valid].contiguous(), 0.125)
        assert torch.equal(short, full[t : t + 1])


@pytest.mark.parametrize("nq,nkv,T,dtype", [(12, 2, 2, torch.float32), (4, 1, 1, torch.float32),
                                             (6, 2, 3, torch.bfloat16), (4, 1, 2, torch.bfloat16)])
def test_attention_same_for_any_grouping_of_heads(nq, nkv, T, dtype):
    """Query heads sharing a KV head are taken up to four at a time, fewer when threads would idle (six per KV
    head: 4 + 2; four over one KV head with two threads: 2 + 2; three: 3, or 2 + 1). Each head gets the bits it
    gets alone (its KV head repeated for it), with one or two threads, with a value width that leaves vector and
    scalar tails, a bfloat16 cache, a token that sees no slot and a head whose scores are all -inf; and SDPA's values."""
    S = 1100  # long enough for two threads
    q = torch.randn(nq, T, 64, generator=_g(40))
    q[1, 0] = -torch.inf  # a head with no finite score: zeros, alone or not
    keys = torch.randn(nkv, S, 64, generator=_g(41)).abs().to(dtype)
    values = torch.randn(nkv, S, 40, generator=_g(42)).to(dtype)
    mask = torch.rand(T, S, generator=_g(43)) < 0.7
    mask[:, 0] = True
    if T > 1:
        mask[-1] = False  # a token that sees nothing
    group = nq // nkv
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(K.attention(q, keys, values, mask, 0.125))
            results.append(K.attention(q, keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0),
                                       mask, 0.125))  # one query head per KV head: each head alone
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(other, results[0])
    one = results[0].view(T, nq, 40)
    assert (one[0, 1] == 0).all()
    if T > 1:
        assert (one[-1] == 0).all()
    for t in range(T):
        assert torch.equal(K.attention(q[:, t : t + 1], keys, values, mask[t : t + 1].contiguous(), 0.125),
                           results[0][t : t + 1])
    live = torch.ones(nq, dtype=torch.bool)
    live[1] = False
    want = F.scaled_dot_product_attention(q[None], keys[None].float(), values[None].float(), attn_mask=mask,
                                          scale=0.125, enable_gqa=True)[0].transpose(0, 1)
    rows = slice(0, T - 1) if T > 1 else slice(0, T)
    _close(one[rows][:, live], want[rows][:, live])


def test_geglu_equals_reference():
    gu = torch.randn(3, 2 * 2050, generator=_g(30)) * 4  # 2050: the scalar tail
    gate, up = gu.chunk(2, dim=-1)
    _close(K.gelu_mul(gu), F.gelu(gate.double(), approximate="tanh").float() * up, rel=1e-5)


def test_every_verification_size_runs_in_the_kernels():
    """Verification of the longest draft must use the same kernels as plain decoding (or its logits could
    differ from plain decoding's in the last bits)."""
    from gemmaspec.draft_length import MAX_DRAFT_TOKENS
    from gemmaspec.models.layers import Linear

    from gemmaspec.engine import SPEC_MARGIN

    assert kernels.MAX_ROWS >= MAX_DRAFT_TOKENS + 1
    assert SPEC_MARGIN >= MAX_DRAFT_TOKENS + 1  # cache.block_target takes chunks up to the ring's margin
    lin = Linear(64, 48)
    lin.weight.data = torch.randn(48, 64, generator=_g(40))
    x = torch.randn(MAX_DRAFT_TOKENS + 1, 64, generator=_g(41))
    with torch.inference_mode():
        full = lin(x)
        for m in (0, MAX_DRAFT_TOKENS):
            assert torch.equal(lin(x[m : m + 1]), full[m : m + 1])


def test_argmax_is_torch_argmax():
    """The first maximum of each row, as torch.argmax: ties, a maximum in the scalar tail, -inf, NaN."""
    from gemmaspec.sampling import greedy_tokens

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1003, generator=g)
    x[1, 500] = x[1, 900] = x[1].max() + 1  # tie: the first
    x[2, 1001] = 50.0  # in the tail after the last 8-wide step
    x[3] = float("-inf")
    x[3, 7] = -1e30
    x[4, 20] = float("nan")  # torch.argmax picks the first NaN
    x[4, 30] = float("nan")
    x[5, 0] = 9.0
    assert greedy_tokens(x) == x.argmax(dim=-1).tolist()
    assert K is None or K.argmax(x) == x.argmax(dim=-1).tolist()


def test_argmax_of_vocabulary_rows_split_over_threads():
    """Rows as long as a vocabulary go in chunks over threads: the first maximum or NaN of the whole row still,
    wherever it falls relative to the chunks, with one thread or two."""
    n = 262144
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, n, generator=g)
    x[0, n // 2] = x[0, n // 2 - 1] = 40.0  # a tie across the chunk boundary: the first
    x[1, 10] = x[1, n - 3] = 40.0  # a tie far apart
    x[2, n - 1] = 40.0  # the last value
    x[3, n // 2 + 5] = float("nan")  # a NaN in the second chunk beats a larger first-chunk maximum
    x[3, 3] = 99.0
    x[4, 100] = float("nan")
    x[4, n - 100] = float("nan")
    x[5] = float("-inf")
    x[6, n // 2] = 40.0  # the second chunk's first value
    want = x.argmax(dim=-1).tolist()
    if K is None:
        pytest.skip("no C compiler: the kernels are not built")
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert K.argmax(x) == want, t
            assert K.argmax(x[3:5].contiguous()) == want[3:5], t
    finally:
        torch.set_num_threads(threads)


def test_read_pass_reads_every_byte_once():
    """The benchmarks' read-only pass (kernels.ReadPass) covers every byte of every buffer, whatever their sizes
    and the thread count: its checksum is the XOR of all 8-byte words of the whole 64-byte lines, then of each
    remaining byte."""
    if K is None:
        pytest.skip("no C compiler: the kernels are not built")
    import numpy as np

    g = torch.Generator().manual_seed(2)
    buffers = [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
               for n in (64, 1000, 3 * 2**20 + 77, 5, 128 * 1024)]
    want = 0
    for b in buffers:
        a = b.numpy()
        whole = len(a) // 64 * 64
        want ^= int(np.bitwise_xor.reduce(a[:whole].view(np.uint64))) if whole else 0
        for byte in a[whole:]:
            want ^= int(byte)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert kernels.ReadPass(K, buffers)() == want, t
    finally:
        torch.set_num_threads(threads)
