"""Tensor parallelism for the MoE block: every rank holds the whole model but 1/n of every expert, cut along
the intermediate dimension (gate and up by rows, down by columns); the router is replicated, each rank runs
its slice of the chosen experts and `all_sum` adds the partial outputs. Attention and dense layers run
replicated, so only a model whose experts dominate its bytes (Qwen3 MoE) gains memory per rank.

Rank 0 broadcasts each forward's header and token ids (an all_sum with zeros from the others), then every
rank runs the same forward; rank 0 alone computes logits and samples.
"""

from __future__ import annotations

import dataclasses
import re
import sys

import mlx.core as mx
import mlx.nn as nn

from ..models import qwen3_moe
from ..models.cache import make_cache
from .group import DistributedError
from .protocol import FORWARD, SIZE, STOP, Caches, Header, LeadModel, serve_forwards, states

_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.switch_mlp\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")


class ShardedMoeBlock(qwen3_moe.SparseMoeBlock):
    """The MoE block over this rank's slice of the experts; the sum over ranks is the whole block's output."""

    def __init__(self, args, group):
        super().__init__(args)
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(super().__call__(x), group=self.group)


def shard(group):
    """A `load_model(shard=...)` keeping this rank's slice of every expert (each read and cut one at a time, so
    the full stacks never sit in memory together)."""
    rank, n = group.rank(), group.size()

    def narrow(model: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        args = model.args
        if hasattr(model, "make_cache"):  # the hybrids: recurrent layers whose state would need splitting too
            raise DistributedError(f"--parallel tensor is for qwen3_moe; run {args.model_type} with --parallel "
                                   "pipeline")
        if not getattr(args, "num_experts", 0):
            raise DistributedError(f"--parallel tensor splits MoE experts, and {args.model_type} has none: "
                                   "use --parallel pipeline")
        I = args.moe_intermediate_size
        if I % n:
            raise DistributedError(f"moe_intermediate_size {I} does not split evenly over {n} ranks")
        part = I // n
        local = dataclasses.replace(args, moe_intermediate_size=part)
        for layer in model.layers:
            if isinstance(layer.mlp, qwen3_moe.SparseMoeBlock):
                layer.mlp = ShardedMoeBlock(local, group)
        for name in list(weights):
            m = _EXPERT.match(name)
            if m is None:
                continue
            w = weights[name]
            axis = 1 if m[1] != "down_proj" else 2
            width = w.shape[axis] * part
            if width % I:
                raise DistributedError(f"{name}: its quantization groups do not split over {n} ranks")
            width //= I
            index = [slice(None)] * 3
            index[axis] = slice(rank * width, (rank + 1) * width)
            weights[name] = mx.contiguous(w[tuple(index)])
            mx.eval(weights[name])
        return weights

    return narrow


class TensorParallelModel(LeadModel):
    """Rank 0's model: every forward runs on all ranks at once."""

    def _run(self, inputs: mx.array, cache) -> mx.array:
        cache = cache if cache is not None else make_cache(self)
        header = self._rows.header(inputs, cache, mx.float32, want=False)
        g = self._group
        # One eval per collective: MLX may run independent ones in any order, and all ranks must agree on it.
        self._wait([mx.distributed.all_sum(header.encode(), group=g)])
        self._wait([mx.distributed.all_sum(inputs.astype(mx.int32), group=g)])
        h = self.model(inputs, cache)  # [B, L, hidden], normed
        # Evaluated here, every time: the last layer's all_sum must run on rank 0 when the others run it.
        self._wait([h] + states(cache))
        return h

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return self._logits(self._run(inputs, cache))

    def fill(self, inputs: mx.array, cache) -> None:
        self._run(inputs, cache)

    def _send_stop(self) -> None:
        mx.eval(mx.distributed.all_sum(Header(STOP).encode(), group=self._group))


def follow(model: nn.Module, group) -> None:
    """Rank r > 0: run each forward rank 0 broadcasts, on this rank's expert slices, until it says stop."""
    rank = group.rank()
    caches = Caches(model)

    def step() -> bool:
        raw = mx.distributed.all_sum(mx.zeros((SIZE,), mx.int32), group=group)
        mx.eval(raw)
        h = Header.decode(raw)
        if h.command == STOP:
            return False
        if h.command != FORWARD:
            raise RuntimeError(f"rank {rank}: unknown command {h.command}")
        tokens = mx.distributed.all_sum(mx.zeros((h.batch, h.length), mx.int32), group=group)
        cache = caches.for_forward(h)
        mx.eval([model.model(tokens, cache)] + states(cache))
        return True

    serve_forwards(rank, step)
    sys.stderr.write(f"rank {rank}: 1/{group.size()} of every expert | peak memory "
                     f"{mx.get_peak_memory() / 1e9:.2f} GB\n")
