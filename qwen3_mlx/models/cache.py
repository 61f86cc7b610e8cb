"""Key/value cache for incremental decoding."""

from __future__ import annotations

import itertools

import mlx.core as mx

from .. import kernels
from ..errors import Qwen3MLXError
from ..kernels import QuantizedKV, RaggedKV

# A layer cache's identity, kept when it is converted to quantized: how another process mirrors it (pipeline).
_uids = itertools.count(1)


class KVCache:
    """Per-layer keys and values, preallocated in steps so decoding does not reallocate every token.

    Shapes: keys/values [B, n_kv_heads, capacity, head_dim]; `offset` is how many positions are filled.
    """

    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.uid = next(_uids)

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


class IndexedKVCache(KVCache):
    """A KVCache plus the QSA indexer's raw keys (`index` [B, capacity, D], one per position: qwen4_exp's
    attention layers). The indexer appends its chunk before the attention's `update_and_fetch` moves `offset`."""

    def __init__(self):
        super().__init__()
        self.index: mx.array | None = None
        self.blocks: mx.array | None = None  # the indexer's keys of finished blocks [B, capacity, D]
        self.n_blocks = 0

    def block_keys(self, n: int, valid: int, make) -> mx.array:
        """The first `n` block keys: the held ones, at most `valid` (a cache cut back holds fewer), then
        `make(lo, n)` [B, n - lo, D] for the rest."""
        lo = min(self.n_blocks, valid, n)
        if lo < n:
            new = make(lo, n)
            if self.blocks is None or n > self.blocks.shape[1]:
                grow = -(-n // 64) * 64  # in steps of 64 blocks (`fit` counts them so)
                fresh = mx.zeros((new.shape[0], grow, new.shape[2]), new.dtype)
                self.blocks = fresh if self.blocks is None else mx.concatenate(
                    [self.blocks[:, :lo], fresh[:, lo:]], axis=1)
            self.blocks[:, lo:n] = new
        self.n_blocks = n
        return self.blocks[:, :n]

    def update_index(self, keys: mx.array) -> mx.array:
        """Write [B, L, D] index keys at `offset`; return the positions' index keys so far and these."""
        prev, n = self.offset, keys.shape[1]
        if self.index is None or prev + n > self.index.shape[1]:
            grow = ((n + self.step - 1) // self.step) * self.step
            fresh = mx.zeros((keys.shape[0], grow, keys.shape[2]), keys.dtype)
            self.index = fresh if self.index is None else mx.concatenate([self.index[:, :prev], fresh], axis=1)
        self.index[:, prev : prev + n] = keys
        return self.index[:, : prev + n]

    @property
    def state(self) -> tuple:
        return () if self.keys is None else (*super().state, self.index[:, : self.offset])

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(0 if a is None else a.nbytes for a in (self.index, self.blocks))


class QuantizedKVCache:
    """Keys and values stored quantized (MLX affine, `bits` 4 or 8, groups of `group_size` along head_dim,
    scales and biases in the keys' dtype; mlx-lm's QuantizedKVCache layout): each position of a layer costs
    2 * kv_heads * (head_dim * bits / 8 + 2 * (head_dim / group_size) * dtype bytes) instead of
    2 * kv_heads * head_dim * dtype bytes.
    Attention reads it as it is (`update_and_fetch` returns QuantizedKV views)."""

    step = 256

    def __init__(self, bits: int = 8, group_size: int = 64):
        self.bits, self.group_size = bits, group_size
        self.keys: QuantizedKV | None = None  # [B, H, capacity, ...]
        self.values: QuantizedKV | None = None
        self.offset = 0
        self.uid = next(_uids)

    @classmethod
    def from_float(cls, cache: KVCache, bits: int, group_size: int) -> "QuantizedKVCache":
        """The float cache's positions, quantized (what --quantized-kv-start does once it is reached)."""
        q = cls(bits, group_size)
        q.uid = cache.uid
        if cache.keys is not None and cache.offset:
            q.update_and_fetch(cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :])
        return q

    def _quantize(self, x: mx.array) -> tuple:
        if x.shape[-1] % self.group_size:
            raise ValueError(f"the KV cache group size {self.group_size} must divide head_dim {x.shape[-1]}")
        return mx.quantize(x, group_size=self.group_size, bits=self.bits)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[QuantizedKV, QuantizedKV]:
        """Quantize and append [B, H, L, D] keys/values at `offset`; return everything cached, quantized."""
        prev, n = self.offset, keys.shape[2]
        new_k, new_v = self._quantize(keys), self._quantize(values)
        if self.keys is None or prev + n > self.keys.words.shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step

            def grown(old, new):
                B, H = new[0].shape[:2]
                fresh = QuantizedKV._make(mx.zeros((B, H, grow, a.shape[-1]), a.dtype) for a in new)
                if old is None:
                    return fresh
                return QuantizedKV._make(mx.concatenate([o[..., :prev, :], f], axis=2) for o, f in zip(old, fresh))

            self.keys, self.values = grown(self.keys, new_k), grown(self.values, new_v)
        self.offset += n
        for buf, new in ((self.keys, new_k), (self.values, new_v)):
            for a, b in zip(buf, new):
                a[..., prev : self.offset, :] = b
        return self.state

    @property
    def state(self) -> tuple[QuantizedKV, QuantizedKV] | tuple[()]:
        if self.keys is None:
            return ()
        n = self.offset
        return tuple(QuantizedKV(w[..., :n, :], s[..., :n, :], b[..., :n, :]) for w, s, b in (self.keys, self.values))

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(a.nbytes for a in (*self.keys, *self.values))


def thin(points: dict[int, object], cap: int) -> None:
    """Drop entries of `points` (position -> saved state) until `cap` (>= 3) remain, each time the one whose
    neighbours are closest: the first and the two newest always stay. Speculative rounds save a state every few
    positions; dropping the oldest first would soon lose the prompt's end, where a prefix-cache hit or a chat's
    next turn goes back to, while dense recent ones are cheap to lose."""
    while len(points) > cap:
        pos = sorted(points)
        i = min(range(1, len(pos) - 2), key=lambda j: (pos[j + 1] - pos[j - 1], pos[j]))
        del points[pos[i]]


class RecurrentCache:
    """A linear-attention layer's state: the last kernel - 1 inputs of its causal conv (`conv` [B, K - 1, C]) and
    the gated delta rule's state (`recurrent` [B, H, Dk, Dv], float32).

    A state cannot forget tokens, so it keeps checkpoints to go back to: the state before and after every
    multi-token forward (a prompt's chunks, a turn's prefill) and before the latest single-token step, at most
    `max_checkpoints` (thinned out as `thin` says). MLX arrays are immutable, so a checkpoint holds references,
    costing the state's bytes only while nothing newer shares them. `offset` may be set to where it is, to a
    checkpoint, or to 0; `truncate_cache` goes back to the latest checkpoint at or before the length asked for."""

    max_checkpoints = 16

    def __init__(self):
        self.conv: mx.array | None = None
        self.recurrent: mx.array | None = None
        self.extra: tuple = ()  # more state of the same layer (qwen4_exp's n-gram context and PLE conv inputs)
        self._offset = 0
        self.uid = next(_uids)
        self.checkpoints: dict[int, tuple] = {}  # position -> (conv, recurrent, extra), around multi-token forwards
        self.step: tuple | None = None  # (position, conv, recurrent, extra) before the latest single-token step

    def _save(self) -> None:
        if self.recurrent is not None:
            self.checkpoints.pop(self._offset, None)
            self.checkpoints[self._offset] = (self.conv, self.recurrent, self.extra)
            thin(self.checkpoints, self.max_checkpoints)

    def update(self, conv: mx.array, recurrent: mx.array, n: int, extra: tuple | None = None) -> None:
        """The state after `n` more positions (checkpointing as the class says); `extra` None keeps it."""
        if n == 1:
            self.step = (self._offset, self.conv, self.recurrent, self.extra) if self.recurrent is not None else None
        else:
            self._save()
        self.conv, self.recurrent = conv, recurrent
        self.extra = self.extra if extra is None else tuple(extra)
        self._offset += n
        if n > 1:
            self._save()

    def _positions(self) -> list[int]:
        return [*self.checkpoints, *([self.step[0]] if self.step else [])]

    def reachable(self, length: int) -> int:
        """The largest position <= `length` this state can be put back to."""
        if length >= self._offset:
            return self._offset
        return max([p for p in self._positions() if p <= length], default=0)

    @property
    def offset(self) -> int:
        return self._offset

    @offset.setter
    def offset(self, value: int) -> None:
        if value == self._offset:
            return
        if value == 0:
            self.conv = self.recurrent = self.step = None
            self.extra, self.checkpoints = (), {}
        elif value in self.checkpoints or (self.step and self.step[0] == value):
            self.conv, self.recurrent, self.extra = self.checkpoints[value] if value in self.checkpoints \
                else self.step[1:]
            self.checkpoints = {p: c for p, c in self.checkpoints.items() if p <= value}
            self.step = self.step if self.step and self.step[0] < value else None
        else:
            raise ValueError(f"a recurrent state cannot go back from {self._offset} to {value} positions "
                             f"(checkpoints at {sorted(self._positions())})")
        self._offset = value

    @property
    def state(self) -> tuple:
        return () if self.recurrent is None else (self.conv, self.recurrent, *self.extra)

    @property
    def nbytes(self) -> int:
        """The live state and the checkpoints that do not share its arrays."""
        saved = [(c, r, *e) for c, r, e in [*self.checkpoints.values(), *([self.step[1:]] if self.step else [])]]
        arrays = {id(a): a for pair in [self.state, *saved] for a in pair}
        return sum(a.nbytes for a in arrays.values())


def quantize_cache(cache: list, *, bits: int | None, group_size: int = 64, start: int = 0) -> None:
    """Replace, in place, the float layers of `cache` by quantized ones once they hold `start` positions
    (nothing when `bits` is None). Called between forwards, so a prompt prefills in float up to there."""
    kv = [i for i, c in enumerate(cache) if not isinstance(c, RecurrentCache)]  # a hybrid's attention layers
    if bits is None or not kv or not isinstance(cache[kv[0]], KVCache) or cache[kv[0]].offset < start:
        return
    if isinstance(cache[kv[0]], IndexedKVCache):
        raise Qwen3MLXError("a quantized KV cache is not supported for qwen4_exp (QSA indexed attention) yet")
    for i in kv:
        cache[i] = QuantizedKVCache.from_float(cache[i], bits, group_size)


class BatchKVCache:
    """One layer's view of several sequences' own KVCache (each [1, H, capacity, D], at its own length) as
    one batch for a decode step. The sequences keep their caches: one joins or leaves a batch without
    copying anyone's keys, and each computes exactly what it would alone (the kernels pick per sequence)."""

    def __init__(self, caches: list[KVCache]):
        self.caches = caches

    @property
    def offset(self) -> list[int]:
        return [c.offset for c in self.caches]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[RaggedKV, RaggedKV]:
        """Append row b of keys/values [B, H, L, D] to sequence b; return the sequences' buffers (their
        lengths are `offset`, to pass as the attention mask). Float caches are written by one kernel call; a
        batch holding quantized ones appends row by row and returns each row's own (quantized) view."""
        n = keys.shape[2]
        if not all(type(c) is KVCache for c in self.caches):
            rows = [c.update_and_fetch(keys[b : b + 1], values[b : b + 1]) for b, c in enumerate(self.caches)]
            return RaggedKV(k for k, _ in rows), RaggedKV(v for _, v in rows)
        for c in self.caches:
            c.reserve(keys, values, batch=1)
        new_k, new_v = kernels.kv_append(keys, values, [c.keys for c in self.caches], [c.values for c in self.caches],
                                         [c.offset for c in self.caches])
        for c, k, v in zip(self.caches, new_k, new_v):
            c.keys, c.values = k, v
            c.offset += n
        return RaggedKV(new_k), RaggedKV(new_v)


class BatchRecurrentCache:
    """One linear-attention layer's view of several sequences' RecurrentCache as one batch for a decode step:
    their states stacked [B, ...] in, each row's new state back to its own cache."""

    def __init__(self, caches: list[RecurrentCache]):
        self.caches = caches

    @property
    def offset(self) -> list[int]:
        return [c.offset for c in self.caches]

    def _rows(self, name: str) -> mx.array | None:
        rows = [getattr(c, name) for c in self.caches]
        like = next((r for r in rows if r is not None), None)
        if like is None:
            return None
        return mx.concatenate([r if r is not None else mx.zeros_like(like) for r in rows], axis=0)

    @property
    def conv(self) -> mx.array | None:
        return self._rows("conv")

    @property
    def recurrent(self) -> mx.array | None:
        return self._rows("recurrent")

    @property
    def extra(self) -> tuple:
        """The rows' `extra` states stacked part by part; () unless every row has them."""
        rows = [c.extra for c in self.caches]
        if not all(rows):
            return ()
        return tuple(mx.concatenate(parts, axis=0) for parts in zip(*rows))

    def update(self, conv: mx.array, recurrent: mx.array, n: int, extra: tuple | None = None) -> None:
        for b, c in enumerate(self.caches):
            c.update(conv[b : b + 1], recurrent[b : b + 1], n,
                     extra=None if extra is None else tuple(e[b : b + 1] for e in extra))


def batch_cache(caches: list[list]) -> list:
    """Per-layer batch views over the caches of several sequences (each a list of per-layer caches)."""
    return [BatchRecurrentCache(list(layer)) if isinstance(layer[0], RecurrentCache) else BatchKVCache(list(layer))
            for layer in zip(*caches)]


def make_cache(model, *, kv_bits: int | None = None, kv_group_size: int = 64) -> list:
    """One KVCache per decoder layer of `model` (QuantizedKVCache with `kv_bits`); a hybrid model's own mix."""
    if hasattr(model, "make_cache"):
        cache = model.make_cache()
        quantize_cache(cache, bits=kv_bits, group_size=kv_group_size)
        return cache
    if kv_bits is not None:
        return [QuantizedKVCache(kv_bits, kv_group_size) for _ in model.layers]
    return [KVCache() for _ in model.layers]


def truncate_cache(cache: list[KVCache], length: int) -> int:
    """Keep at most the first `length` positions in every layer; returns the length all layers now share.

    Absolute, not relative: after an interrupted forward pass (Ctrl-C while the graph was being built) early
    layers may hold a position the later ones lack, and the layers must agree again before the next step.
    """
    if not cache:
        return 0
    length = min(length, *(c.offset for c in cache))
    while True:  # recurrent layers go back only to a checkpoint (all of them hold the same positions)
        reachable = min([c.reachable(length) for c in cache if isinstance(c, RecurrentCache)], default=length)
        if reachable == length:
            break
        length = reachable
    for c in cache:
        c.offset = length
    return length


def common_prefix_length(a, b) -> int:
    """How many leading tokens two token sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable_prefix(held, prompt) -> int:
    """How many of `prompt`'s first tokens a cache holding the tokens `held` can keep (the chat's turns, the
    server's prefix cache, prompt cache files): the common prefix, but never the whole prompt, since the
    generator needs a token to feed."""
    return min(common_prefix_length(held, prompt), len(prompt) - 1)
