"""KV cache rings: every slot holds the K/V of the position it claims, across wrap-arounds and rollbacks."""

from __future__ import annotations

import ctypes
import random

import torch

from gemmaspec.cache import CacheLayerSpec, KVCache


def test_ring_slots_hold_their_positions_through_wraps_and_rollbacks():
    specs = [CacheLayerSpec(1, 2, 2, window=4), CacheLayerSpec(1, 2, 2, window=None)]
    cache = KVCache(specs, capacity=200, dtype=torch.float32, spec_margin=3)  # ring of 7 slots
    rng = random.Random(0)
    while cache.length < 180:
        n = rng.choice([1, 1, 2, 3, 4, 9])  # 9 > ring - window: the concat (prefill) branch
        positions = cache.begin(n)
        kv = positions.float()[None, :, None].expand(1, n, 2)  # K = V = the position number
        views = [cache.update(layer, kv, kv) for layer in range(2)]
        cache.end()
        for layer, window in ((0, 4), (1, None)):  # each query sees exactly its window, whichever branch ran
            view = views[layer]
            for t, q in enumerate(positions.tolist()):
                seen = view.keys[0, :, 0] if view.mask is None else view.keys[0, view.mask[t], 0]
                lo = 0 if window is None else max(0, q - window + 1)
                assert sorted(seen.tolist()) == list(range(lo, q + 1)), (layer, q)
        if rng.random() < 0.3:
            cache.rollback(cache.length - rng.randint(0, min(3, n)))
        keys, values, slot_pos = cache.layer_kv(0)
        live = slot_pos >= 0
        assert torch.equal(keys[0, live, 0], slot_pos[live].float())
        assert torch.equal(values[0, live, 1], slot_pos[live].float())
        window = {p for p in range(max(0, cache.length - 4), cache.length)}
        assert window <= set(slot_pos[live].tolist())  # the window is always there
        full_k, _, full_pos = cache.layer_kv(1)
        assert torch.equal(full_k[0, :, 0], full_pos.float())


def test_kernel_views_equal_block_target_through_wraps_and_rollbacks():
    """The C kernel's one-call slots and masks (cache.kernel_views, decode steps of the C block stack) are
    block_target's, step after step (end()'s slot writes are checked above: every slot holds what it claims)."""
    from gemmaspec import kernels

    fast = kernels.load()
    if fast is None:
        import pytest

        pytest.skip("no C compiler: the kernels are not built")
    specs = [CacheLayerSpec(1, 2, 2, window=4), CacheLayerSpec(1, 2, 2, window=None)]
    fast_cache = KVCache(specs, capacity=120, dtype=torch.float32, spec_margin=3)  # ring of 7 slots
    ref_cache = KVCache(specs, capacity=120, dtype=torch.float32, spec_margin=3)
    rng = random.Random(1)
    checked = 0
    while fast_cache.length < 100:
        n = rng.choice([1, 1, 1, 2, 3])  # at most ring - window: block_target's decode / verification steps
        positions = ref_cache.begin(n)
        fast_cache.begin(n, positions=False)
        (cap_r, slots_r, S_r, mask_r), (cap_f, slots_f, S_f, mask_f) = fast_cache.kernel_views(fast)
        as_tensor = lambda ptr, count, dtype: torch.frombuffer(  # noqa: E731
            (ctypes.c_byte * (count * dtype.itemsize)).from_address(ptr), dtype=dtype)
        _, _, ref_slots, ref_S, ref_mask = ref_cache.block_target(0)
        assert (cap_r, S_r) == (7, ref_S) and torch.equal(as_tensor(slots_r, n, torch.int64), ref_slots)
        assert torch.equal(as_tensor(mask_r, n * S_r, torch.bool).view(n, S_r), ref_mask)
        _, _, ref_slots, ref_S, ref_mask = ref_cache.block_target(1)
        assert (cap_f, S_f) == (120, ref_S) and torch.equal(as_tensor(slots_f, n, torch.int64), ref_slots)
        if n == 1:
            assert mask_f is None and ref_mask is None
        else:
            assert torch.equal(as_tensor(mask_f, n * S_f, torch.bool).view(n, S_f), ref_mask)
        for cache in (fast_cache, ref_cache):
            cache.end()
        checked += 1
        if rng.random() < 0.3:
            back = rng.randint(0, min(3, n))
            for cache in (fast_cache, ref_cache):
                cache.rollback(cache.length - back)
    assert checked > 50
    held = []
    for _ in range(3):  # plain decoding reuses the buffers step after step
        fast_cache.begin(1, positions=False)
        fast_cache.kernel_views(fast)
        held.append(fast_cache._view_buffers)
        fast_cache.end()
    assert held[0] is held[1] is held[2]
