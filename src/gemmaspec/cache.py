"""Preallocated KV cache with O(1) rollback.

One buffer pair per cache-owning layer, allocated once per request:
- full-attention layers hold every position up to `capacity`;
- sliding-window layers hold a ring of `window + spec_margin` slots, so memory stays bounded by the window
  while the last `spec_margin` positions can still be rolled back (a rejected draft) without losing keys
  that later queries need. The ring's size does not depend on `capacity`: attention sums over its slots in
  slot order, so a ring sized by the request (prompt + max_new_tokens + the draft length) would give a plain
  and a speculative run of the same prompt slightly different numbers (in bfloat16, different tokens).

Rollback is a change of `length`; stale entries beyond it are masked out by position and overwritten by
the next write. Attention masks are computed once per forward and shared by all layers of a kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import PromptTooLongError


@dataclass(frozen=True)
class CacheLayerSpec:
    n_kv_heads: int
    k_dim: int
    v_dim: int
    window: int | None  # None: full attention


@dataclass
class AttentionView:
    """What one layer attends to in the current forward: keys, values and a boolean mask [T, S] (None = all)."""

    keys: torch.Tensor  # [n_kv, S, k_dim]
    values: torch.Tensor  # [n_kv, S, v_dim]
    mask: torch.Tensor | None


class KVCache:
    def __init__(
        self,
        specs: list[CacheLayerSpec],
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        spec_margin: int = 64,
    ):
        self.specs = specs
        self.capacity = capacity
        self.spec_margin = spec_margin
        self.length = 0
        self.device = torch.device(device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.ring_size: int | None = None
        shapes = []
        for spec in specs:
            size = capacity if spec.window is None else spec.window + spec_margin
            if spec.window is not None:
                self.ring_size = size
            shapes += [(spec.n_kv_heads, size, spec.k_dim), (spec.n_kv_heads, size, spec.v_dim)]
        buffers = _kv_buffers(shapes, dtype, self.device)
        self.keys, self.values = buffers[0::2], buffers[1::2]
        self._windows = {spec.window for spec in specs if spec.window is not None}  # (kernel_views: one at most)
        # Position held by each ring slot (-1 = empty); all sliding layers share one ring geometry.
        self.slot_pos = torch.full((self.ring_size or 1,), -1, dtype=torch.long, device=device)
        # the same memory as numpy: a decode step's few slot writes without a tensor op each (end())
        self._slot_pos_np = self.slot_pos.numpy() if self.slot_pos.is_cpu else None
        self._step: _Step | None = None
        self._view_buffers: tuple | None = None  # kernel_views' slots and masks, reused from step to step

    # ---- per forward -------------------------------------------------------------------------
    def begin(self, n_new: int, positions: bool = True) -> torch.Tensor | None:
        """Start a forward over n_new tokens at positions [length, length + n_new); returns the positions (None
        with positions=False: a forward that takes kernel_views needs no tensor of them)."""
        start = self.length
        if start + n_new > self.capacity:
            raise PromptTooLongError(
                f"sequence of {start + n_new} tokens exceeds the cache capacity of {self.capacity} tokens"
            )
        self._step = _Step(self, start, n_new)
        return self._step.positions if positions else None

    def end(self) -> None:
        step = self._step
        self.length = step.start + step.n_new
        if self.ring_size is not None:
            if self._slot_pos_np is not None and step.n_new <= 64:  # a decode / verification step: no tensor ops
                for p in range(max(step.start, self.length - self.ring_size), self.length):
                    self._slot_pos_np[p % self.ring_size] = p
            else:
                slots, pos = step.ring_slots()
                self.slot_pos[slots] = pos
        self._step = None

    def end_decoded(self, n: int) -> None:
        """End a begin(1) whose C call decoded n tokens from there on its own (block.c gs_gemma3_decode: it wrote
        their K/V, and their ring slots into slot_pos)."""
        self.length = self._step.start + n
        self._step = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> AttentionView:
        """Store this forward's k/v [n_kv, T, d] for `layer` and return what the layer attends to."""
        step = self._step
        window = self.specs[layer].window
        kbuf, vbuf = self.keys[layer], self.values[layer]
        if window is None:
            end = step.start + step.n_new
            kbuf[:, step.start : end] = k
            vbuf[:, step.start : end] = v
            return AttentionView(kbuf[:, :end], vbuf[:, :end], step.full_mask())
        if self._fits_ring(step, window):
            self._write_ring(kbuf, vbuf, k, v, step)
            return AttentionView(kbuf, vbuf, step.ring_mask(window))
        # Long forward (prefill): attend to the old keys still in the window (in position order, none for a first
        # prefill) plus the new tokens, then keep the newest in the ring.
        old_pos, mask = step.concat_view(window)
        slots = old_pos % self.ring_size
        keys = torch.cat([kbuf[:, slots], k], dim=1)
        values = torch.cat([vbuf[:, slots], v], dim=1)
        self._write_ring(kbuf, vbuf, k, v, step)
        return AttentionView(keys, values, mask)

    def block_target(self, layer: int):
        """For a kernel that writes this forward's K/V itself (kernels/block.c): (keys, values, slots int64 [T],
        S, mask [T, S] or None) with the same slots and mask as `update`; None where the forward is too long for
        it (a prefill longer than the ring's spare slots)."""
        step = self._step
        window = self.specs[layer].window
        if window is None:
            return self.keys[layer], self.values[layer], step.positions, step.start + step.n_new, step.full_mask()
        if not self._fits_ring(step, window):
            return None
        return self.keys[layer], self.values[layer], step.ring_slots()[0], self.ring_size, step.ring_mask(window)

    def kernel_views(self, fast) -> tuple | None:
        """block_target's slots and masks for both layer kinds in one C call (`fast`: the loaded kernels,
        ops.c gso_step_views) into buffers the cache keeps: ~15 small tensor ops cost a decode step ~0.3 ms with
        the caches cold. Per kind (sliding, full): (slots in the cache buffer, slots pointer, S, mask pointer or
        None), the same values as block_target; None where it would give None (or the sliding layers' windows
        differ). The pointers are valid until the next forward."""
        step = self._step
        if len(self._windows) > 1 or not self.keys[0].is_cpu:
            return None
        window = next(iter(self._windows), None)
        if window is not None and not self._fits_ring(step, window):
            return None
        T, S_full = step.n_new, step.start + step.n_new
        ring = self.ring_size if window is not None else 0
        held = self._view_buffers
        if (held is None or held[0].numel() < 2 * T or held[1].numel() < T * ring
                or (T > 1 and held[2].numel() < T * S_full)):  # (a single query needs no full mask)
            held = self._view_buffers = (
                torch.empty(2 * max(T, 8), dtype=torch.int64),
                torch.empty(max(T, 8) * ring, dtype=torch.bool),
                # a verification's full mask [T, S]: room for the whole cache, allocated once
                torch.empty(max(T, 8) * self.capacity if T > 1 else 0, dtype=torch.bool),
            )
        slots, mask_r, mask_f = held
        s_ptr = slots.data_ptr()
        r_ptr, f_ptr = (mask_r.data_ptr() if ring else None), (mask_f.data_ptr() if T > 1 else None)
        fast.step_views(self.slot_pos if ring else None, ring, window or 0, step.start, T, s_ptr, r_ptr, s_ptr + 8 * T,
                        f_ptr)
        ring_view = (self.ring_size, s_ptr, self.ring_size, r_ptr) if ring else None
        return ring_view, (self.capacity, s_ptr + 8 * T, S_full, f_ptr)

    def _fits_ring(self, step, window: int) -> bool:
        """Whether this forward's K/V can go into the ring before attention: the slots it overwrites are then older
        than every query's window (a decode or verification step; a long prefill attends old keys + new)."""
        return step.n_new <= self.ring_size - window

    @staticmethod
    def _write_ring(kbuf, vbuf, k, v, step) -> None:
        slots, _ = step.ring_slots()
        n = len(slots)
        first = step.first_slot()
        if first is not None:  # the usual case (no wrap-around): a plain slice copy, no index_put
            kbuf[:, first : first + n] = k[:, -n:]
            vbuf[:, first : first + n] = v[:, -n:]
        else:
            kbuf[:, slots] = k[:, -n:]
            vbuf[:, slots] = v[:, -n:]

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached keys, values and the position of each slot (read-only use, e.g. by the MTP drafter)."""
        if self.specs[layer].window is None:
            n = self.length
            return self.keys[layer][:, :n], self.values[layer][:, :n], torch.arange(n, device=self.device)
        pos = self.slot_pos.clone()
        pos[pos >= self.length] = -1
        return self.keys[layer], self.values[layer], pos

    # ---- between forwards ------------------------------------------------------------------------
    def rollback(self, length: int) -> None:
        """Forget every position >= length. O(1): entries stay in place and are masked/overwritten later."""
        if length > self.length or length < 0:
            raise ValueError(f"cannot roll back to {length} from {self.length}")
        wraps = self.ring_size is not None and self.ring_size < self.capacity
        if wraps and self.length - length > self.spec_margin:
            raise ValueError(f"rollback of {self.length - length} exceeds the sliding margin {self.spec_margin}")
        self.length = length


def _kv_buffers(shapes: list[tuple], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Zeroed K/V buffers; on the CPU carved from one mapping in 2 MB pages (gemmaspec.hugepages): attention reads
    them every step, cold, like the weights (same process, default model in int4: attention 2-3% faster)."""
    if device.type == "cpu":
        from .hugepages import huge_tensors

        carved = huge_tensors(shapes, [dtype] * len(shapes))
        if carved is not None:
            return carved
    return [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]


class _Step:
    """Masks of one forward, computed lazily once per attention kind."""

    def __init__(self, cache: KVCache, start: int, n_new: int):
        self.cache = cache
        self.start = start
        self.n_new = n_new
        self._positions = None
        self._masks: dict = {}
        self._slots = None

    @property
    def positions(self) -> torch.Tensor:
        if self._positions is None:
            self._positions = torch.arange(self.start, self.start + self.n_new, device=self.cache.device)
        return self._positions

    def ring_slots(self):
        if self._slots is None:
            size = self.cache.ring_size
            pos = self.positions[-size:]
            self._slots = (pos % size, pos)
        return self._slots

    def first_slot(self) -> int | None:
        """The ring slot of this forward's first kept position when its slots are consecutive (no wrap), else None."""
        size = self.cache.ring_size
        n = min(self.n_new, size)
        first = (self.start + self.n_new - n) % size
        return first if first + n <= size else None

    def full_mask(self):
        if "full" not in self._masks:
            if self.n_new == 1:
                self._masks["full"] = None
            else:
                key_pos = torch.arange(self.start + self.n_new, device=self.positions.device)
                self._masks["full"] = key_pos[None, :] <= self.positions[:, None]
        return self._masks["full"]

    def ring_mask(self, window: int):
        key = ("ring", window)
        if key not in self._masks:
            slot_pos = self.cache.slot_pos.clone()
            stale = slot_pos >= self.start  # rolled-back entries not overwritten by this write
            slot_pos[stale] = -1
            slots, pos = self.ring_slots()
            slot_pos[slots] = pos
            self._masks[key] = _window_mask(self.positions, slot_pos, window)
        return self._masks[key]

    def concat_view(self, window: int):
        """For a long forward: the positions of the cached keys its first query still sees (the ring keeps them:
        window + spec_margin slots, and a rolled-back write only overwrote older ones), and the mask over those
        keys followed by the new ones."""
        key = ("concat", window)
        if key not in self._masks:
            old_pos = torch.arange(max(0, self.start - window + 1), self.start, device=self.positions.device)
            key_pos = torch.cat([old_pos, self.positions])
            self._masks[key] = (old_pos, _window_mask(self.positions, key_pos, window))
        return self._masks[key]


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    q = q_pos[:, None]
    return (k_pos[None, :] >= 0) & (k_pos[None, :] <= q) & (k_pos[None, :] > q - window)
