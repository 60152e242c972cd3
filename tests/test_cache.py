"""KV cache rings: every slot holds the K/V of the position it claims, across wrap-arounds and rollbacks."""

from __future__ import annotations

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
