"""Key/value cache for incremental decoding."""

from __future__ import annotations

import mlx.core as mx

from .. import kernels


class KVCache:
    """Per-layer keys and values, preallocated in steps so decoding does not reallocate every token.

    Shapes: keys/values [B, n_kv_heads, capacity, head_dim]; `offset` is how many positions are filled.
    """

    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def reserve(self, keys: mx.array, values: mx.array, batch: int | None = None) -> None:
        """Make room for `keys`/`values` [B, H, n, D] (of `batch` rows when given) after `offset`, growing in
        steps of `step` positions."""
        prev, n = self.offset, keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            B, H, _, Dk = keys.shape
            B = B if batch is None else batch
            Dv = values.shape[3]
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, Dk), keys.dtype)
            new_v = mx.zeros((B, H, grow, Dv), values.dtype)
            if self.keys is not None:
                # Drop unused capacity before concatenating so the buffer stays contiguous.
                new_k = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                new_v = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
            self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append [B, H, L, D] keys/values at `offset`; return everything cached so far."""
        prev, n = self.offset, keys.shape[2]
        self.reserve(keys, values)
        self.offset += n
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class BatchKVCache:
    """One layer's view of several sequences' own KVCache (each [1, H, capacity, D], at its own length) as
    one batch for a decode step. The sequences keep their caches: one joins or leaves a batch without
    copying anyone's keys, and each computes exactly what it would alone (the kernels pick per sequence)."""

    def __init__(self, caches: list[KVCache]):
        self.caches = caches

    @property
    def offset(self) -> list[int]:
        return [c.offset for c in self.caches]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[list, list]:
        """Append row b of keys/values [B, H, L, D] to sequence b; return the sequences' buffers (their
        lengths are `offset`, to pass as the attention mask)."""
        n = keys.shape[2]
        for c in self.caches:
            c.reserve(keys, values, batch=1)
        new_k, new_v = kernels.kv_append(keys, values, [c.keys for c in self.caches], [c.values for c in self.caches],
                                         [c.offset for c in self.caches])
        for c, k, v in zip(self.caches, new_k, new_v):
            c.keys, c.values = k, v
            c.offset += n
        return new_k, new_v


def batch_cache(caches: list[list[KVCache]]) -> list[BatchKVCache]:
    """Per-layer batch views over the caches of several sequences (each a list of per-layer KVCache)."""
    return [BatchKVCache(list(layer)) for layer in zip(*caches)]


def make_cache(model) -> list[KVCache]:
    """One KVCache per decoder layer of `model`."""
    return [KVCache() for _ in model.layers]


def truncate_cache(cache: list[KVCache], length: int) -> int:
    """Keep at most the first `length` positions in every layer; returns the length all layers now share.

    Absolute, not relative: after an interrupted forward pass (Ctrl-C while the graph was being built) early
    layers may hold a position the later ones lack, and the layers must agree again before the next step.
    """
    if not cache:
        return 0
    length = min(length, *(c.offset for c in cache))
    for c in cache:
        c.offset = length
    return length
