"""Low-bit weights (issue 9): quantized matmuls against their dequantized reference, exact GGUF repacks, and
lossless speculation on a quantized tiny model."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from gemmaspec.drafters import make_drafter
from gemmaspec.engine import Engine
from gemmaspec.loading import load_model
from gemmaspec.quant import BF16Weight, QuantizedWeight, kernels, parameter_count, quantize
from gemmaspec.quant.formats import concat
from gemmaspec.quant.gguf import DECODERS, repack

KERNEL = kernels.load()
BACKENDS = ["kernel", "torch"] if KERNEL is not None else ["torch"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "torch":  # the PyTorch fallback where no C compiler exists
        monkeypatch.setattr(kernels, "load", lambda: None)
    return request.param


def _weight(N=300, K=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    w[:, 7] *= 20  # an outlier column, as real weights have
    return w


def byte_path(qw: QuantizedWeight, x: torch.Tensor) -> bool:
    """Whether the C kernel rounds x to int8 (kernels/linear.c): for a bfloat16 model, against int4 weights in
    groups of 32 and int8 weights in groups of 16, or of 32 without biases (vpdpbusd on the weights' bytes); else
    to int16."""
    return x.dtype == torch.bfloat16 and ((qw.bits, qw.group) in ((4, 32), (8, 16))
                                          or ((qw.bits, qw.group) == (8, 32) and qw.bias is None))


def kernel_rounded(x: torch.Tensor, group: int, levels: float) -> torch.Tensor:
    """x as the C kernel sees it: per row and group, xq = round(x * levels / max|x|), times max|x| / levels
    (float32 arithmetic, round half to even like lrintf)."""
    g = x.float().reshape(x.shape[0], -1, group)
    mx = g.abs().amax(-1, keepdim=True)
    inv = torch.where(mx > 0, torch.tensor(levels) / mx, torch.zeros_like(mx))
    return (torch.round(g * inv) * (mx / levels)).reshape(x.shape)


def _kernel_path(qw: QuantizedWeight, x: torch.Tensor) -> bool:
    k = kernels.load()
    return k is not None and x.shape[0] <= kernels.MAX_ROWS and qw.group <= k.max_group


def _reference(qw: QuantizedWeight, x: torch.Tensor, x8: bool = False) -> torch.Tensor:
    """The exact product (in float64) of the dequantized weights with the activations the matmul path uses:
    the kernel multiplies s * q by the integer-rounded x and the group bias b by the float group sums of x."""
    w = qw.dequantize(dtype=torch.float32).double()
    if not _kernel_path(qw, x):
        return (x.double() @ w.t()).float()
    multiplied, bias = kernel_split(qw, x8)
    # int8 activations go in groups of 16 values (one 16-byte weight group) against int8, 32 against int4
    x_group = (32 if qw.bits == 4 else 16) if x8 else qw.group
    rounded = kernel_rounded(x, x_group, 127.0 if x8 else 32767.0)
    return (rounded.double() @ multiplied.t() + x.double() @ bias.t()).float()


def kernel_split(qw: QuantizedWeight, x8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w = multiplied + bias as the kernel splits it (float64): s * q times the rounded x and the group bias b
    times the float group sums of x; int4 in groups of 32 against int8 activations (x8) centres its values,
    s * (q - 8) and b + 8 s."""
    w = qw.dequantize(dtype=torch.float32).double()
    bias = torch.zeros_like(w) if qw.bias is None else qw.bias.double().repeat_interleave(qw.group, 1)
    if x8 and (qw.bits, qw.group) == (4, 32):
        bias = bias + 8 * qw.scales.double().repeat_interleave(qw.group, 1)
    return w - bias, bias


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 2, 5, 40])  # 40 > kernels.MAX_ROWS: the dequantize-in-blocks + GEMM path
@pytest.mark.parametrize("group", [32, 16])
def test_matmul_equals_dequantized_reference(backend, bits, M, group):
    w = _weight()
    qw = quantize(w, bits, group=group)
    x = torch.randn(M, w.shape[1])
    y = qw.linear(x)
    ref = _reference(qw, x)
    assert y.shape == (M, w.shape[0]) and y.dtype == torch.float32
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()  # float32 rounding only
    # the integer rounding of the activations (kernel path) moves y by at most half a step of each group's grid
    # (it multiplies s * q, or s * (q - 8) for int4 in 32s, not the group bias: |s * q| can be twice |w|)
    step = x.view(M, -1, group).abs().amax(-1) / 32767
    sq = kernel_split(qw, False)[0] if _kernel_path(qw, x) else qw.dequantize().double()
    bound = (0.5 * sq.abs().view(w.shape[0], -1, group).sum(-1).double() @ step.double().t()).t()
    exact = (x.double() @ qw.dequantize().double().t())
    assert ((y.double() - exact).abs() <= bound + 1e-5 * exact.abs().max()).all()
    # and the format's own error against the float weights: rounding to the group's grid
    groups = w.view(w.shape[0], -1, group)
    err = (qw.dequantize() - w).view_as(groups).abs()
    if bits == 8:  # half a step of max|w| / 127
        assert (err.amax(-1) <= 0.5 * groups.abs().amax(-1) / 127 + 1e-6).all()
    else:  # least-squares fit of the min/max grid: within a step, and about the rounding noise on average
        step = (groups.amax(-1) - groups.amin(-1)) / 15
        assert (err.amax(-1) <= step + 1e-6).all()
        assert (err.pow(2).mean(-1).sqrt() <= 0.35 * step + 1e-6).all()  # uniform rounding: step / sqrt(12)


@pytest.mark.parametrize("bits, group", [(8, 32), (4, 32), (8, 16), (4, 16)])  # int8 activations for (4, 32), (8, 16)
def test_bfloat16_activations_and_leading_dims(bits, group):
    qw = quantize(_weight(K=64), bits, group=group, dtype=torch.bfloat16)
    x = torch.randn(3, 2, 64).bfloat16()
    y = qw.linear(x)
    assert y.shape == (3, 2, 300) and y.dtype == torch.bfloat16
    x2 = x.float().reshape(6, 64)
    ref = _reference(qw, x2, byte_path(qw, x) and _kernel_path(qw, x2)).reshape(3, 2, 300)
    assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.skipif(KERNEL is None, reason="no C compiler: kernel not built")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("K, group", [(640, 32), (672, 32), (96, 16), (672, 16), (656, 16), (448, 64)])  # leftover groups, G = 0 path
@pytest.mark.parametrize("f32_scales", [False, True])  # float32: the GGUF K-quants' scales
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16: int8 activations where they apply
def test_kernel_rows_do_not_depend_on_M(bits, K, group, f32_scales, dtype):
    """Each row of x is accumulated in the same order whatever M is (one row of x takes a path of its own, four
    weight rows at a time; N = 257 leaves one over): verification logits equal decode ones."""
    if bits == 4 and K % 32:
        pytest.skip("int4 packs 32 values at a time")
    qw = quantize(_weight(N=257, K=K), bits, group=group)
    if f32_scales:
        qw = QuantizedWeight(bits, qw.q, qw.scales.float(), None if qw.bias is None else qw.bias.float(), group, K)
    x = torch.randn(33, K).to(dtype)
    full = qw.linear(x)
    for m in range(33):
        assert torch.equal(qw.linear(x[m:m + 1]), full[m:m + 1])
    for lo, hi in ((2, 7), (0, 9), (3, 20)):  # tiles of up to 8 rows and their leftovers
        assert torch.equal(qw.linear(x[lo:hi]), full[lo:hi])


@pytest.mark.skipif(KERNEL is None, reason="no C compiler: kernel not built")
@pytest.mark.parametrize("bits, group, K", [(4, 32, 640), (4, 32, 672), (4, 32, 736),
                                            (4, 32, 1024), (4, 32, 1536),  # whole blocks of 16 groups (AVX-512)
                                            (4, 32, 544), (4, 32, 608),  # blocks + a quad of 1 or 3 groups
                                            (8, 16, 640), (8, 16, 656),
                                            (8, 16, 688), (8, 16, 720),  # 8-group folds, leftover pairs, odd last
                                            (8, 32, 640), (8, 32, 672), (8, 32, 704)])  # a scale per two byte groups
@pytest.mark.parametrize("f32_scales", [False, True])
def test_int8_activation_path_equals_its_reference(bits, group, K, f32_scales):
    """The bfloat16-model path (x rounded to int8, int4 centred): float32 outputs against the exact product with
    the same rounding, at float32 accuracy, for one and for several rows of x."""
    qw = quantize(_weight(N=67, K=K), bits, group=group)
    if f32_scales:
        qw = QuantizedWeight(bits, qw.q, qw.scales.float(), None if qw.bias is None else qw.bias.float(), group, K)
    x = torch.randn(9, K)
    ref = _reference(qw, x, x8=True)
    for rows in (slice(0, 1), slice(0, 9)):
        y = KERNEL.linear(qw, x[rows].contiguous(), x8=True)
        assert (y - ref[rows]).abs().max() <= 1e-5 * ref.abs().max()
    full = KERNEL.linear(qw, x, x8=True)
    for m in range(9):  # float32 outputs, bit for bit whatever M is
        assert torch.equal(KERNEL.linear(qw, x[m:m + 1].contiguous(), x8=True), full[m:m + 1])


BLOCK_TILES = KERNEL is not None and KERNEL.blocked_layout(quantize(_weight(N=4, K=512), 4, dtype=torch.bfloat16))


@pytest.mark.skipif(not BLOCK_TILES, reason="no AVX-512 block tiles in this CPU's kernel build")
@pytest.mark.parametrize("bits, group, K", [(4, 32, 640), (4, 32, 1024), (4, 32, 2048), (4, 32, 544),
                                            (8, 16, 640), (8, 16, 1024), (8, 16, 688), (8, 32, 640)])
@pytest.mark.parametrize("f32_scales", [False, True])
def test_block_layout_changes_no_output(bits, group, K, f32_scales):
    """A bfloat16 model's weights held in the AVX-512 kernel's block layout (full blocks of 16 byte groups
    transposed ahead of time) give every reader the same values bit for bit: the matmul at any M, dequantize,
    embedding rows, q in the row layout; float32 x (which those tiles do not take) gets its dequantized product;
    and the conversion undoes exactly."""
    qw = quantize(_weight(N=37, K=K), bits, group=group, dtype=torch.bfloat16)
    if f32_scales:
        qw = QuantizedWeight(bits, qw.q, qw.scales.float(), None if qw.bias is None else qw.bias.float(), group, K,
                             torch.bfloat16)
    row_q = qw.q.clone()
    x = torch.randn(9, K).bfloat16().float()  # a bfloat16 model's activations
    ids = torch.tensor([36, 0, 5, 5])
    want = {M: KERNEL.linear(qw, x[:M], x8=True) for M in (1, 2, 5, 9)}
    want_deq, want_rows = qw.dequantize(), qw[ids]
    assert qw.use_block_layout() and qw.blocked
    full_blocks = (K // (2 if bits == 4 else 1)) // 256
    assert torch.equal(qw.q[:, full_blocks * 256:], row_q[:, full_blocks * 256:])  # partial blocks, quads: as they were
    assert not torch.equal(qw.q, row_q)
    for M, y in want.items():
        assert torch.equal(KERNEL.linear(qw, x[:M], x8=True), y)
        assert torch.equal(qw.linear(x[:M].bfloat16()).float(), y.bfloat16().float())
    assert torch.equal(qw.row_layout_q(), row_q) and torch.equal(qw.dequantize(), want_deq)
    assert torch.equal(qw[ids], want_rows)
    # float32 x (a float32 MTP assistant scoring with the target's tied table): the same int8-activation tiles
    assert torch.equal(qw.linear(x), want[9]) and torch.equal(qw.linear(x[:1]), want[1])
    exact = x.double() @ qw.dequantize(dtype=torch.float32).double().t()
    y = KERNEL.linear(qw, x)  # the C kernel asked for int16 activations on this layout: through dequantized rows
    assert (y.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    sub = QuantizedWeight(bits, qw.q[ids], qw.scales[ids], None if qw.bias is None else qw.bias[ids], group, K,
                          torch.bfloat16, blocked=True)  # gathered rows keep the layout (the assistant's head)
    assert torch.equal(sub.linear(x[:3].bfloat16()), want[9][:3, ids].bfloat16())
    assert torch.equal(sub.linear(x[:3]), want[9][:3, ids])
    KERNEL.to_blocks(qw, inverse=True)
    assert torch.equal(qw.q, row_q)


@pytest.mark.skipif(not BLOCK_TILES, reason="no AVX-512 block tiles in this CPU's kernel build")
@pytest.mark.parametrize("K", [512, 640, 1152, 1536, 1664, 2048, 2176,  # one-row int4 tiles specialised by shape
                               544, 2560])  # the general one-row tiles: a quad of 1 group, 5 full blocks
@pytest.mark.parametrize("f32_scales", [False, True])
def test_int4_one_row_tiles_equal_the_multi_row_tiles(K, f32_scales):
    """Plain decoding's one-row int4 tiles (four weight rows side by side, linear.c tile8_rows_i4 for the shapes it
    specialises) give each output bit for bit what the tiles of several rows of x give it (speculative verification
    must see exactly the values plain decoding would), and both match the exact product."""
    qw = quantize(_weight(N=37, K=K, seed=K), 4, group=32, dtype=torch.bfloat16)  # 9 tiles of 4 rows + a leftover
    if f32_scales:
        qw = QuantizedWeight(4, qw.q, qw.scales.float(), qw.bias.float(), 32, K, torch.bfloat16)
    assert qw.use_block_layout() and qw.blocked
    x = torch.randn(9, K).bfloat16().float()
    full = KERNEL.linear(qw, x, x8=True)
    ref = _reference(qw, x, x8=True)
    assert (full - ref).abs().max() <= 1e-5 * ref.abs().max()
    for m in range(9):
        assert torch.equal(KERNEL.linear(qw, x[m:m + 1].contiguous(), x8=True), full[m:m + 1])


def test_block_layout_only_where_its_kernel_reads_it():
    """float32 models keep the row layout (their int16-activation kernel reads rows); so do weights the block tiles
    do not take (int4 with 5-15 groups in its last block, int8 in groups of 32 with biases)."""
    assert not quantize(_weight(N=4, K=1024), 4, dtype=torch.float32).use_block_layout()
    assert not quantize(_weight(N=4, K=736), 4, dtype=torch.bfloat16).use_block_layout()  # 23 groups: 16 + 7
    assert not quantize(_weight(N=4, K=128), 4, dtype=torch.bfloat16).use_block_layout()  # no full block
    w = quantize(_weight(N=4, K=512), 8, dtype=torch.bfloat16)
    with_bias = QuantizedWeight(8, w.q, w.scales, torch.zeros_like(w.scales), 32, 512, torch.bfloat16)
    assert not with_bias.use_block_layout()


@pytest.mark.skipif(KERNEL is None, reason="no C compiler: kernel not built")
@pytest.mark.parametrize("bits, group, x8", [(8, 32, False), (4, 32, False), (4, 32, True), (8, 16, True),
                                             (8, 32, True)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_give_nan_rows(bits, group, x8, bad):
    """A NaN or infinity in a row of x makes that row's outputs NaN (not numbers from an undefined integer
    rounding), and leaves the other rows as they were: a broken model shows as broken."""
    qw = quantize(_weight(N=67, K=128), bits, group=group)
    x = torch.randn(3, 128)
    clean = KERNEL.linear(qw, x, x8=x8)
    x[1, 40] = bad
    y = KERNEL.linear(qw, x, x8=x8)
    assert y[1].isnan().all()
    assert torch.equal(y[[0, 2]], clean[[0, 2]])


@pytest.mark.skipif(KERNEL is None, reason="no C compiler: kernel not built")
@pytest.mark.parametrize("bits, group, K, blocked", [(4, 32, 640, True), (4, 32, 128, False), (8, 16, 2048, True),
                                                     (8, 32, 640, True), (8, 32, 640, False)])
@pytest.mark.parametrize("threads", [1, 2])
def test_argmax_found_while_computing_equals_torch_argmax(bits, group, K, blocked, threads):
    """The LM head of a greedy decode step finds its argmax while it computes the rows (linear.c
    gsq_linear_argmax): the same outputs as the matmul, bit for bit, and torch.argmax's index of them -- the first
    of tied maxima, in either thread's rows, and the first NaN -- with or without the outputs stored."""
    N = 4099  # a leftover row past the tiles of four, and two threads' ranges
    w = _weight(N=N, K=K, seed=3)
    w[[1000, 2500, 4098]] = w[3000].clone()  # identical rows: tied maxima, the largest output (x lines up with them)
    qw = quantize(w, bits, group=group, dtype=torch.bfloat16)
    if blocked:  # (else the row layout, which the same tiles transpose as they read it)
        assert qw.use_block_layout()
    x = w[3000:3001].bfloat16().float()
    x[:, 7] = 0  # (without the outlier column every row shares)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want = KERNEL.linear(qw, x, x8=True)
        y, best = KERNEL.linear_argmax(qw, x)
        assert torch.equal(y, want) and best == int(want.argmax(-1)) == 1000
        assert KERNEL.linear_argmax(qw, x, store=False) == (None, best)
        scales = qw.scales.clone()
        for nan_rows, first in (([2600], 2600), ([3500, 700], 700)):
            qw.scales.copy_(scales)
            qw.scales[nan_rows] = float("nan")  # NaN rows: torch.argmax gives the first of them
            want = KERNEL.linear(qw, x, x8=True)
            assert int(want.argmax(-1)) == first and KERNEL.linear_argmax(qw, x)[1] == first
    finally:
        torch.set_num_threads(saved)


@pytest.mark.skipif(KERNEL is None, reason="no C compiler: kernel not built")
@pytest.mark.parametrize("bits, group, x8", [(8, 32, False), (4, 32, False), (4, 32, True), (8, 16, True),
                                             (8, 32, True)])
def test_tiny_activations_give_tiny_outputs(bits, group, x8):
    """Activations so small that 127 / max|x| overflows a float (below ~4e-37) give finite outputs near zero (the
    kernel quantizes such groups to zeros rather than convert infinity to an integer); other rows are untouched."""
    qw = quantize(_weight(N=67, K=128), bits, group=group)
    x = torch.randn(3, 128)
    clean = KERNEL.linear(qw, x, x8=x8)
    x[1] *= 1e-37  # max|x| ~3e-37: 127 / max|x| is infinite in float32
    y = KERNEL.linear(qw, x, x8=x8)
    assert y[1].isfinite().all() and y[1].abs().max() < 1e-30
    assert torch.equal(y[[0, 2]], clean[[0, 2]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_lookup_dequantizes_rows(backend, dtype):
    for bits in (8, 4):
        qw = quantize(_weight(K=1024), bits, dtype=dtype)
        qw.use_block_layout()  # (where this CPU's kernel has one)
        ids = torch.tensor([[3, 0, 299], [5, 5, 7]])
        rows = qw[ids]
        assert rows.shape == (2, 3, 1024) and rows.dtype == dtype
        assert torch.equal(rows, qw.dequantize()[ids])
        for bad in ([3, 300], [-1]):
            with pytest.raises(IndexError):
                qw[torch.tensor(bad)]


def test_concat_mixed_formats_is_exact():
    """Fused projections whose parts differ (int4 next to int8, float32 next to float16 scales, group 16)."""
    a, b = quantize(_weight(N=40, seed=1), 4), quantize(_weight(N=24, seed=2), 8)
    c = QuantizedWeight(8, b.q[:8].clone(), b.scales[:8].float().repeat_interleave(2, 1), None, 16, 128)
    fused = concat([a, b, c])
    assert fused.bits == 8 and fused.group == 16 and fused.scales.dtype == torch.float32
    want = torch.cat([a.dequantize(), b.dequantize(), c.dequantize()])
    assert torch.equal(fused.dequantize(), want)
    x = torch.randn(3, 128)
    assert (fused.linear(x) - _reference(fused, x)).abs().max() <= 1e-5 * want.abs().max() * 128


# ---- GGUF blocks ------------------------------------------------------------------------------------------
_BLOCKS = {"Q8_0": (32, 34, [0]), "Q5_0": (32, 22, [0]), "Q4_0": (32, 18, [0]), "Q4_K": (256, 144, [0, 2]),
           "Q6_K": (256, 210, [208])}  # values per block, bytes per block, offsets of float16 scales


def _random_blocks(type_name: str, rows: int, K: int, seed: int = 0) -> np.ndarray:
    per, size, f16_at = _BLOCKS[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, K // per, size), dtype=np.uint8)
    for at in f16_at:  # sane scales instead of random float16 bit patterns (NaN, inf)
        raw[:, :, at:at + 2] = (rng.uniform(0.001, 0.02, size=(rows, K // per, 1))).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", sorted(DECODERS))
@pytest.mark.parametrize("bits", [8, 4])
def test_gguf_repack_matches_gguf_dequantize(type_name, bits):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    N, K = 6, 512
    raw = _random_blocks(type_name, N, K)
    want = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(N, K).astype(np.float32))
    qw = repack(raw, type_name, N, K, bits, torch.float32)
    got = qw.dequantize()
    if bits == 8 or type_name in ("Q4_K", "Q4_0"):  # the file's own integers and scales: exact
        assert qw.bits == bits
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    else:  # fewer bits than the file has: requantized, within an int4 step per group
        step = (want.view(N, -1, 32).amax(-1) - want.view(N, -1, 32).amin(-1)) / 15
        assert ((got - want).view(N, -1, 32).abs().amax(-1) <= step + 1e-3 * step.max()).all()
    x = torch.randn(3, K)
    assert (qw.linear(x) - _reference(qw, x)).abs().max() <= 1e-5 * _reference(qw, x).abs().max()


def test_default_gguf_repacks_equal_the_converted_float_weights():
    """Every tensor type of the default file, repacked natively, equals its float conversion (same file)."""
    from safetensors import safe_open

    from gemmaspec.loading import default_model_path
    from gemmaspec.loading.gguf_convert import _hf_name, converted_folder
    from gemmaspec.quant.gguf import GGUFTensors

    path = default_model_path()
    gguf = GGUFTensors(path)
    seen = {}
    for t in gguf.info.tensors:
        if len(t.dims) == 2 and t.type_name not in seen and t.name != "token_embd.weight":
            seen[t.type_name] = t
    with safe_open(str(converted_folder(path) / "model.safetensors"), framework="pt") as f:
        for type_name, t in seen.items():
            qw = gguf.packed(t.name, None, torch.float32)
            want = f.get_tensor(_hf_name(t.name))
            assert torch.equal(qw.dequantize(), want), (type_name, t.name)
        emb = gguf.by_name["token_embd.weight"]  # the first rows of the Q8_0 embedding
        rows = 1000
        raw = gguf.raw(emb, 0, rows)
        qw = repack(raw, emb.type_name, rows, gguf.shape(emb)[1], 8, torch.float32)
        assert torch.equal(qw.dequantize(), f.get_slice("model.embed_tokens.weight")[:rows])


# ---- bfloat16 weights computed in float32 ---------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 3, 6, 40])  # 40: the large-M (prefill) path
def test_bf16_weight_matmul_equals_widened_reference(backend, M):
    w = BF16Weight(_weight(N=300, K=136))  # K = 136: the 8-wide tail of the kernel
    x = torch.randn(M, 136, generator=torch.Generator().manual_seed(3))
    ref = x.double() @ w.w.double().t()  # bf16 -> float widening is exact
    y = w.linear(x)
    assert y.dtype == torch.float32 and y.shape == (M, 300)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    if M <= 6 and backend == "kernel":  # decode / verification rows do not depend on each other
        for m in range(M):
            assert torch.equal(w.linear(x[m:m + 1]), y[m:m + 1])
    assert torch.equal(w[torch.tensor([4, 0])], w.w[[4, 0]].float())  # embedding rows


# ---- a quantized tiny model decodes losslessly --------------------------------------------------------------
PROMPTS = [
    [2, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11],
    [2, 50, 7, 33, 90, 61, 5],
    [2] + list(range(20, 60)),  # 41 tokens: prefill takes the large-M path
]


@pytest.fixture(scope="module", params=["int8", "int4", "bf16"])
def quantized_tiny(request, tiny_gemma3_dir):
    return load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu", weights=request.param)


def _engine(target, drafter, k):
    engine = Engine(target, make_drafter(drafter, target), k)
    engine.eos_ids = set()
    return engine


def test_quantized_tiny_model_is_quantized(quantized_tiny, tiny_gemma3_dir):
    model = quantized_tiny.model
    assert isinstance(model.embed_tokens, (QuantizedWeight, BF16Weight))
    assert model.lm_head.qweight is model.embed_tokens  # tied, held once
    assert all(layer.qkv_proj.qweight is not None and layer.qkv_proj.weight is None for layer in model.layers)
    assert model.dtype == torch.float32
    assert any(f"weights held as {model.embed_tokens.format}" in n for n in quantized_tiny.notes)
    float_model = load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu").model
    with torch.inference_mode():
        ids = torch.tensor(PROMPTS[2])
        a = model.logits(model(ids, model.new_cache(64)))
        b = float_model.logits(float_model(ids, float_model.new_cache(64)))
    assert (a - b).abs().max() < 0.25 * b.abs().max()  # close to the float model, not equal


def test_parameter_count_counts_held_matrices_as_the_checkpoint_does(quantized_tiny, tiny_gemma3_dir):
    float_model = load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu").model
    expected = sum(p.numel() for p in float_model.parameters())  # (a tied table is one Parameter)
    assert parameter_count(float_model) == expected
    assert parameter_count(quantized_tiny.model) == expected  # the packed buffers are not parameters


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_decode_team_equals_the_block_by_block_step(tiny_gemma3_dir, weights):
    # block.c runs a decode step's blocks on one team of threads (one token, int8 / int4 matrices read with int8
    # activations: a bfloat16 model): thread 0's small ops, every thread's rows. Same bits as block by block.
    lib = kernels.load()
    if lib is None or not hasattr(lib.lib, "gs_team_steps"):
        pytest.skip("no C kernels with OpenMP")
    team, steps = ctypes.c_int.in_dll(lib.lib, "gs_team_decode"), ctypes.c_long.in_dll(lib.lib, "gs_team_steps")
    model = load_model(str(tiny_gemma3_dir), dtype="bfloat16", device="cpu", weights=weights).model
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    runs = {}
    try:
        for on in (1, 0):
            team.value, before = on, steps.value
            cache = model.new_cache(64)
            with torch.inference_mode():
                model(torch.tensor(PROMPTS[2]), cache)  # 41 tokens: the sliding ring (8 slots) has wrapped
                token, out = 5, []
                for _ in range(12):
                    hidden, logits, _ = model.forward_logits([token], cache)
                    out.append((hidden.clone(), logits.clone()))
                    token = int(logits[0].argmax())
            runs[on] = (out, [t.clone() for t in cache.keys + cache.values], steps.value - before)
    finally:
        team.value = 1
        torch.set_num_threads(threads)
    assert runs[1][2] == 12 and runs[0][2] == 0  # (each path ran)
    for (h1, l1), (h0, l0) in zip(runs[1][0], runs[0][0]):
        assert torch.equal(h1, h0) and torch.equal(l1, l0)
    assert all(torch.equal(a, b) for a, b in zip(runs[1][1], runs[0][1]))


@pytest.mark.parametrize("drafter", ["none", "ngram"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_quantized_greedy_equals_plain_decoding(quantized_tiny, drafter, k):
    plain = _engine(quantized_tiny, "none", 0)
    spec = _engine(quantized_tiny, drafter, k)
    for prompt in PROMPTS:
        want = plain.generate(prompt, max_new_tokens=40).token_ids
        got = spec.generate(prompt, max_new_tokens=40)
        assert got.token_ids == want
        assert got.stats.new_tokens == 40


# ---- int4 fitted with activation importance (quant/calibrate.py) -------------------------------------------
def test_int4_importance_lowers_the_output_error_on_real_inputs():
    """Inputs where a few features run 10x larger (as in real activations): weighing the int4 fit by the features'
    mean square lowers the layer's output error on them, against the unweighted fit of the same weights."""
    w = _weight(N=256, K=128)
    g = torch.Generator().manual_seed(3)
    scale = torch.ones(128)
    scale[::8] = 10.0
    x = torch.randn(512, 128, generator=g) * scale
    ref = x.double() @ w.double().t()

    def output_error(qw):
        return ((x.double() @ qw.dequantize(dtype=torch.float32).double().t() - ref) ** 2).mean().item()

    plain, weighted = quantize(w, 4), quantize(w, 4, importance=(x * x).mean(0))
    assert output_error(weighted) < 0.7 * output_error(plain)
    uniform = quantize(w, 4, importance=torch.full((128,), 3.0))  # equal weights: the unweighted fit
    assert torch.equal(uniform.q, plain.q) and torch.equal(uniform.scales, plain.scales)


def _long_text(tokenizer) -> str:
    words = [tokenizer.decode([i]).strip() for i in range(10, 60)]
    return " ".join(w for w in words if w) * 3


def test_activation_importance_is_the_mean_square_of_each_linear_input(tiny_gemma3_dir):
    from gemmaspec.models.layers import Linear
    from gemmaspec.quant.calibrate import SEQ_LEN, activation_importance

    target = load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu", weights="float")
    model, tok = target.model, target.tokenizer
    text = _long_text(tok)
    ids = tok.encode(text, add_bos=True)[:SEQ_LEN]
    assert len(ids) > kernels.MAX_ROWS
    imp = activation_importance(model, tok, [text])
    assert set(imp) == {name for name, m in model.named_modules() if isinstance(m, Linear)}
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), model.new_cache(len(ids) + 8))
        first = model.layers[0].input_layernorm(model.embed(torch.tensor(ids)))
    assert torch.allclose(imp["lm_head"], (hidden.double() ** 2).mean(0).float(), rtol=1e-5)
    assert torch.allclose(imp["layers.0.qkv_proj"], (first.double() ** 2).mean(0).float(), rtol=1e-5)


def test_importance_is_measured_once_per_file(tiny_gemma3_dir, tmp_path, monkeypatch):
    from gemmaspec.quant.calibrate import cached_importance

    monkeypatch.setenv("GEMMASPEC_CACHE", str(tmp_path))
    target = load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu", weights="float")
    first = cached_importance(tiny_gemma3_dir, lambda: target.model, target.tokenizer)

    def no_model():
        raise AssertionError("measured again")
    again = cached_importance(tiny_gemma3_dir, no_model, target.tokenizer)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    import gemmaspec.quant.calibrate as calibrate

    monkeypatch.setattr(calibrate, "activation_importance", lambda *a: no_model())
    int4 = load_model(str(tiny_gemma3_dir), dtype="float32", device="cpu", weights="int4")  # the cached one
    assert int4.model.layers[0].qkv_proj.qweight.bits == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_int4_quantizes_weights_on_the_gpu():
    w = _weight().cuda()
    for importance in (None, torch.rand(w.shape[1])):
        qw = quantize(w, 4, importance=importance)
        assert qw.q.is_cuda
        assert (qw.dequantize(dtype=torch.float32) - w).abs().max() < 0.1 * w.abs().max()


@pytest.mark.parametrize("weights", ["float", "int4"])
def test_weights_in_huge_pages_change_nothing_but_where_they_live(tiny_gemma3_dir, weights, monkeypatch):
    """hugepages.hold_weights_in_huge_pages moves every weight a decode step reads into one huge-page mapping in
    place: the same tensor objects (a tied table stays tied), the same values and decode results, and no kernel
    argument cache left on the old pointers."""
    from gemmaspec.hugepages import hold_weights_in_huge_pages
    from gemmaspec.loading import load_model
    from gemmaspec.quant import weight_tensors

    monkeypatch.setenv("GEMMASPEC_NO_HUGE_PAGES", "1")  # loaded where PyTorch puts them
    model = load_model(str(tiny_gemma3_dir), dtype="bfloat16", device="cpu", weights=weights).model
    monkeypatch.delenv("GEMMASPEC_NO_HUGE_PAGES")
    ids = torch.randint(4, 96, (12,), generator=torch.Generator().manual_seed(0))

    def decode() -> list[torch.Tensor]:
        cache = model.new_cache(32)
        with torch.inference_mode():
            out = [model.logits(model(ids[:8], cache))]
            out += [model.logits(model(ids[i:i + 1], cache)) for i in range(8, 12)]
        return out

    before = decode()  # (builds the kernels' argument caches on the old pointers)
    tensors = weight_tensors(model)
    values = [t.clone() for t in tensors]
    if not hold_weights_in_huge_pages(model):
        pytest.skip("no huge-page request on this platform")
    assert all(a is b for a, b in zip(weight_tensors(model), tensors))  # the same objects, in place
    assert all(torch.equal(t, v) and t.data_ptr() % 64 == 0 for t, v in zip(tensors, values))
    start = min(t.data_ptr() for t in tensors)
    assert start % (2 << 20) == 0  # one mapping from a 2 MB boundary
    if weights == "float":
        assert model.lm_head.weight is model.embed_tokens  # the tie holds
    for a, b in zip(before, decode()):
        assert torch.equal(a, b)
