"""Pipeline parallelism: each rank holds a contiguous block of decoder layers and the caches of its layers.

Rank 0 also holds the embedding, the final norm and the head: the ring backend only talks to neighbours, and
the last rank's neighbour is rank 0, so a token's activations go round the ring once (n hops) and come back to
where the head is. That ships [B, L, hidden] instead of [B, L, vocab] logits on the last hop, and a model with
tied embeddings keeps a single copy of them. Rank 0 samples; the others only ever need activations.

A prefill chunk is sent on without waiting for its result (none is wanted), so while rank 1 runs chunk k,
rank 0 already runs chunk k + 1.
"""

from __future__ import annotations

import re
import sys

import mlx.core as mx
import mlx.nn as nn

from ..models.base import attention_mask
from ..models.cache import make_cache
from .group import Watchdog
from .protocol import FORWARD, SIZE, STOP, Caches, Header, LeadModel, serve_forwards, states

# A decoder layer's tensor: ours (after sanitize), or on disk in a Qwen3.5 VL checkpoint or its mlx-lm export
_LAYER = re.compile(r"^(?:language_model\.)?model\.(?:language_model\.)?layers\.(\d+)\.(.+)$")


def shard(start: int, end: int, first: bool):
    """A `load_model(shard=...)` for layers [start, end) (and, on rank 0, embedding, final norm and head)."""

    def narrow(model: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        inner = model.model
        inner.layers = inner.layers[start:end]
        if not first:
            del inner.embed_tokens, inner.norm
            if "lm_head" in model:
                del model.lm_head
        keep = {}
        for name, w in weights.items():
            m = _LAYER.match(name)
            if m is None:
                if first:
                    keep[name] = w
            elif start <= int(m[1]) < end:
                keep[f"model.layers.{int(m[1]) - start}.{m[2]}"] = w
        return keep

    return narrow


class PipelineModel(LeadModel):
    """Rank 0's model: runs its layers and the other ranks'; they mirror each cache rank 0 uses (protocol)."""

    def __init__(self, model: nn.Module, group, watchdog: Watchdog, layers: list[tuple[int, int]]):
        super().__init__(model, group, watchdog)
        self.rank_layers = layers  # (start, end) per rank

    def _run(self, inputs: mx.array, cache, want: bool):
        cache = cache if cache is not None else make_cache(self)
        h = self.model.embed_tokens(inputs)  # [B, L] -> [B, L, hidden]
        header = self._rows.header(inputs, cache, h.dtype, want)
        mask = attention_mask(h.shape[1], cache[0])
        for layer, c in zip(self.model.layers, cache):
            h = layer(h, mask, c)
        g = self._group
        # One eval per message: MLX may run independent sends in any order, and the header must go first.
        self._wait([mx.distributed.send(header.encode(), 1, group=g)], "sending a forward")
        self._wait([mx.distributed.send(h, 1, group=g)] + states(cache))
        if not want:
            return None
        back = mx.distributed.recv_like(h, g.size() - 1, group=g)
        self._wait([back], "waiting for the last rank")
        return back

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """Logits [B, L, vocab] for token ids [B, L], through every rank's layers."""
        return self._logits(self.model.norm(self._run(inputs, cache, want=True)))

    def fill(self, inputs: mx.array, cache) -> None:
        """Append token ids to the caches of every rank, without waiting for the last rank."""
        self._run(inputs, cache, want=False)

    def _send_stop(self) -> None:
        mx.eval(mx.distributed.send(Header(STOP).encode(), 1, group=self._group))


def follow(stage: nn.Module, group, layers: tuple[int, int]) -> None:
    """Rank r > 0: receive activations from rank r - 1, run this rank's layers, pass them on to rank r + 1
    (the last rank: back to rank 0, when they are wanted), until rank 0 says stop."""
    rank, size = group.rank(), group.size()
    hidden = stage.args.hidden_size
    caches = Caches(stage)
    nxt = (rank + 1) % size

    def step() -> bool:
        raw = mx.distributed.recv((SIZE,), mx.int32, rank - 1, group=group)
        mx.eval(raw)
        h = Header.decode(raw)
        if h.command == STOP:
            if nxt != 0:
                mx.eval(mx.distributed.send(raw, nxt, group=group))
            return False
        if h.command != FORWARD:
            raise RuntimeError(f"rank {rank}: unknown command {h.command} from rank {rank - 1}")
        x = mx.distributed.recv((h.batch, h.length, hidden), h.dtype, rank - 1, group=group)
        cache = caches.for_forward(h)
        mask = attention_mask(h.length, cache[0])
        for layer, c in zip(stage.model.layers, cache):
            x = layer(x, mask, c)
        if nxt != 0:
            mx.eval(mx.distributed.send(raw, nxt, group=group))
            out = [mx.distributed.send(x, nxt, group=group)]
        else:
            out = [mx.distributed.send(x, 0, group=group)] if h.want else []
        mx.eval(out + states(cache))
        return True

    serve_forwards(rank, step)
    start, end = layers
    sys.stderr.write(
        f"rank {rank}: layers {start}-{end - 1} | peak memory {mx.get_peak_memory() / 1e9:.2f} GB\n"
    )
