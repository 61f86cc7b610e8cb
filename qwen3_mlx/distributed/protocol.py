"""What rank 0 tells the other ranks before each forward: one fixed-size int32 header.

Rank 0 owns the caches as the front ends see them (a list of per-layer caches per sequence); every other rank
keeps its own layers' caches of the same sequences, keyed by the layer cache's `uid`, and mirrors what rank 0
did to them: a lower offset is a trim (chat reuse, speculative rollback), quantized bits are a conversion,
a released uid frees the cache.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..models.cache import (KVCache, QuantizedKVCache, RecurrentCache, batch_cache, make_cache, quantize_cache,
                           truncate_cache)
from .group import DistributedError, Watchdog, lost

MAX_ROWS = 64  # sequences in one forward (the server's batch)
MAX_RELEASE = 64
FORWARD, STOP = 1, 2
_DTYPES = [mx.float32, mx.bfloat16, mx.float16]
_FIXED = 8
SIZE = _FIXED + 3 * MAX_ROWS + MAX_RELEASE


@dataclass
class Header:
    command: int
    batch: int = 0
    length: int = 0
    dtype: mx.Dtype = mx.float32
    want: bool = False  # the last stage returns its hidden states (logits wanted)
    batched: bool = False  # the rows come as BatchKVCache views (the server), not one cache list
    uids: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    kv: list[int] = field(default_factory=list)  # per row: bits << 8 | group size, 0 for a float cache
    release: list[int] = field(default_factory=list)

    def encode(self) -> mx.array:
        if self.batch > MAX_ROWS:
            raise DistributedError(f"a forward of {self.batch} sequences; at most {MAX_ROWS} run across ranks")
        v = [0] * SIZE
        v[:_FIXED] = [self.command, self.batch, self.length, _DTYPES.index(self.dtype), int(self.want),
                      len(self.release), int(self.batched), 0]
        for i, (u, o, k) in enumerate(zip(self.uids, self.offsets, self.kv)):
            v[_FIXED + i], v[_FIXED + MAX_ROWS + i], v[_FIXED + 2 * MAX_ROWS + i] = u, o, k
        v[_FIXED + 3 * MAX_ROWS : _FIXED + 3 * MAX_ROWS + len(self.release)] = self.release
        return mx.array(v, dtype=mx.int32)

    @classmethod
    def decode(cls, a: mx.array) -> "Header":
        v = a.tolist()
        command, batch, length, dtype, want, n_release, batched = v[:7]
        rows = lambda k: v[_FIXED + k * MAX_ROWS : _FIXED + k * MAX_ROWS + batch]  # noqa: E731
        release = v[_FIXED + 3 * MAX_ROWS : _FIXED + 3 * MAX_ROWS + n_release]
        return cls(command, batch, length, _DTYPES[dtype], bool(want), bool(batched), rows(0), rows(1), rows(2), release)


class Rows:
    """Rank 0's side: the header rows of the caches a forward gets, and the uids whose caches died since."""

    def __init__(self):
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._dead: list[int] = []

    def _track(self, c) -> None:
        if self._live.get(c.uid) is not c:  # new, or converted to quantized (same uid, new object)
            self._live[c.uid] = c
            weakref.finalize(c, self._dead.append, c.uid)

    def header(self, inputs: mx.array, cache, dtype, want: bool) -> Header:
        """`cache`: rank 0's list of per-layer caches, or of BatchKVCache (one sequence per row)."""
        first = cache[0]
        layer = getattr(first, "caches", [first])  # one layer's cache of every row
        for c in layer:
            self._track(c)
        # A uid is released once no object holds it (a float cache replaced by its quantized copy keeps it).
        release, self._dead = [u for u in self._dead if u not in self._live][:MAX_RELEASE], []
        # A hybrid's KV quantization shows on its attention layers (a recurrent state stays float).
        attn = next((l for l in cache if not isinstance(getattr(l, "caches", [l])[0], RecurrentCache)), first)
        kv = [c.bits << 8 | c.group_size if isinstance(c, QuantizedKVCache) else 0 for c in getattr(attn, "caches", [attn])]
        B, L = inputs.shape
        return Header(FORWARD, B, L, dtype, want, hasattr(first, "caches"), [c.uid for c in layer],
                      [c.offset for c in layer], kv, release)


def states(cache) -> list:
    """The arrays of a forward's caches (one sequence's list, or BatchKVCache rows), to evaluate them."""
    return [c.state for layer in cache for c in getattr(layer, "caches", [layer])]


class Caches:
    """A following rank's side: its layers' caches of the sequences rank 0 runs."""

    def __init__(self, stage):
        self.stage = stage
        self.by_uid: dict[int, list] = {}

    def for_forward(self, h: Header) -> list:
        for u in h.release:
            self.by_uid.pop(u, None)
        rows = []
        for u, offset, kv in zip(h.uids, h.offsets, h.kv):
            c = self.by_uid.setdefault(u, make_cache(self.stage))
            if truncate_cache(c, offset) != offset:
                raise DistributedError(f"a cache out of step with rank 0 (holds {c[0].offset} of {offset} positions)")
            if kv:  # converts the float attention layers, once
                quantize_cache(c, bits=kv >> 8, group_size=kv & 0xFF)
            rows.append(c)
        return batch_cache(rows) if h.batched else rows[0]


class LeadModel(nn.Module):
    """Rank 0's model, which the front ends call like a `Model` (`__call__`, `fill`, `layers`, `args`): the
    shared part of the pipeline and tensor-parallel ones. Its cache is the cache of its own layers."""

    def __init__(self, model: nn.Module, group, watchdog: Watchdog):
        super().__init__()
        self.args, self.model_type = model.args, model.model_type
        self.model = model.model
        if "lm_head" in model:
            self.lm_head = model.lm_head
        self._group, self._watchdog = group, watchdog
        self._rows = Rows()
        self._stopped = False
        self._own_cache = getattr(model, "make_cache", None)  # a hybrid's mix of KV and recurrent caches

    def make_cache(self) -> list:
        """Caches for rank 0's layers (each other rank makes its own alike)."""
        return self._own_cache() if self._own_cache is not None else [KVCache() for _ in self.layers]

    @property
    def layers(self):
        return self.model.layers

    def _wait(self, arrays, what: str = "running a forward") -> None:
        """Evaluate `arrays`, bounded by the watchdog; a lost peer becomes a DistributedError."""
        self._watchdog.arm(what)
        try:
            mx.eval(arrays)
        except RuntimeError as e:
            err = lost(e, 0)
            if err is not None:
                self._stopped = True  # nobody left to tell: a send to a lost peer never completes
            raise err or e
        finally:
            self._watchdog.disarm()

    def _logits(self, h: mx.array) -> mx.array:
        """The head over final (normed) hidden states."""
        if "lm_head" in self:
            return self.lm_head(h)
        return self.model.embed_tokens.as_linear(h)

    def _send_stop(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Tell the other ranks to exit (once; at exit of the front end)."""
        if self._stopped:
            return
        self._stopped = True
        self._watchdog.arm("telling the other ranks to stop")  # a peer that hangs must not hold our exit
        try:
            self._send_stop()
        except RuntimeError:
            pass  # already gone
        finally:
            self._watchdog.disarm()


def serve_forwards(rank: int, step) -> None:
    """A following rank's loop: `step()` until it returns False (rank 0 said stop). A lost peer is one line on
    stderr and exit code 1."""
    try:
        while step():
            pass
    except RuntimeError as e:
        err = lost(e, rank)
        if err is None:
            raise
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(1) from None
