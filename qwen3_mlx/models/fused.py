"""A decoded position through whole decoder layers as single nodes (kernels.DecoderPlan) instead of ~22 graph
nodes a layer: at decode, scheduling those nodes cost more than a small model's weight reads.

Applies to one sequence (batch 1, one position) on our CPU kernels, float32 activations and float32 KVCaches,
layers of qwen3.Attention whose projections our kernels take (MLX affine 4/8-bit or float32/bfloat16, no bias).
A run of layers with qwen3.MLP is one node; a mixture-of-experts layer is a node for its attention half, then its
MLP op by op. Anything else returns None and the caller runs the layers op by op.

The plan (the weights, checked once) is kept on the model and rebuilt when any layer's modules or arrays change
(a quantization, `update`, `load_weights`): every call compares them by identity, which the plan's references keep
valid. An array changed in place (`w[...] = v` on a model's own weight) keeps its identity and is not seen: replace
arrays instead, as MLX's own module methods do.
"""

from __future__ import annotations

import operator

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from .cache import KVCache

FLOAT_WEIGHTS = (mx.float32, mx.bfloat16)


def _identity(layers: list) -> list:
    """Everything a plan depends on, compared by identity: each layer's modules and their arrays."""
    out = []
    for layer in layers:
        a, m = layer["self_attn"], layer["mlp"]
        out += (a, m, layer["input_layernorm"], layer["post_attention_layernorm"], a["q_norm"], a["k_norm"])
        for mod in (out[-4], out[-3], out[-2], out[-1]):
            out += mod.values()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            p = a[name]
            out.append(p)
            out += p.values()
        for name in ("gate_proj", "up_proj", "down_proj"):
            p = m.get(name)
            if p is not None:
                out.append(p)
                out += p.values()
    return out


def _projection(linear: nn.Module, arrays: list, projs: list) -> bool:
    if "bias" in linear:
        return False
    if isinstance(linear, nn.QuantizedLinear):
        biases = linear.get("biases")
        if (linear.mode != "affine" or biases is None or linear.bits not in kernels.BITS
                or linear.group_size not in kernels.GROUP_SIZES):
            return False
        arrays += (linear["weight"], linear["scales"], biases)
        projs += (linear.bits, linear.group_size, 1)
        return True
    if isinstance(linear, nn.Linear) and linear["weight"].dtype in FLOAT_WEIGHTS:
        arrays.append(linear["weight"])
        projs += (0, 0, 0)
        return True
    return False


def _layer_arrays(layer, mlp: bool) -> tuple[list, list] | None:
    attn = layer.self_attn
    arrays = [layer.input_layernorm["weight"], attn.q_norm["weight"], attn.k_norm["weight"]]
    if mlp:
        arrays.append(layer.post_attention_layernorm["weight"])
    if any(a.dtype not in FLOAT_WEIGHTS for a in arrays):  # (a float16 model: MLX's norms, op by op)
        return None
    projs = []
    names = [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if mlp:
        names += [(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(_projection(mod[n], arrays, projs) for mod, n in names):
        return None
    return arrays, projs


class Plan:
    """The fused nodes of a model's layers: runs of (DecoderPlan, first layer, number of layers, mlp fused), or
    no runs when the layers cannot be fused (kept too, so that is found out once)."""

    def __init__(self, layers: list, identity: list):
        self.identity = identity
        self.runs = []
        try:
            self._build(layers)
        except (_NotFusable, ValueError):  # ValueError: a shape the plan refuses (layers of different widths)
            self.runs = None

    def _build(self, layers: list) -> None:
        from .qwen3 import MLP, Attention

        first = layers[0].self_attn
        shape = (first.n_heads, first.n_kv_heads, first.scale, first.rope.mscale, layers[0].input_layernorm.eps)
        per_layer = []
        for layer in layers:
            a = layer.self_attn
            if type(a) is not Attention or (a.n_heads, a.n_kv_heads, a.scale, a.rope.mscale,
                                             layer.input_layernorm.eps) != shape or a.n_heads > 16 * a.n_kv_heads:
                raise _NotFusable
            mlp = type(layer.mlp) is MLP
            got = _layer_arrays(layer, mlp)
            if got is None:
                raise _NotFusable
            per_layer.append((mlp, *got))
        heads, kv_heads, scale, mscale, eps = shape
        # Consecutive dense layers run as one node (measured faster than a node per layer on the 28-layer tiny
        # shape); a mixture-of-experts layer ends its node at the attention half.
        i = 0
        while i < len(layers):
            j = i + 1
            if per_layer[i][0]:
                while j < len(layers) and per_layer[j][0]:
                    j += 1
            arrays = [a for p in per_layer[i:j] for a in p[1]]
            projs = [f for p in per_layer[i:j] for f in p[2]]
            # Every layer's RoPE comes from one config: the first one's frequencies serve all.
            plan = kernels.DecoderPlan(first.rope._inv_freq, arrays, projs, heads=heads, kv_heads=kv_heads, eps=eps,
                                       scale=scale, mscale=mscale, mlp=per_layer[i][0])
            self.runs.append((plan, i, j - i, per_layer[i][0]))
            i = j
        self.kv_heads, self.head_dim = kv_heads, first.rope._inv_freq.shape[0] * 2

    def matches(self, identity: list) -> bool:
        return len(identity) == len(self.identity) and all(map(operator.is_, identity, self.identity))


class _NotFusable(Exception):
    pass


def _plan(owner, layers: list) -> Plan | None:
    try:
        identity = _identity(layers)
    except KeyError:  # not qwen3 layers (a hybrid model's linear attention)
        return None
    plan = owner.__dict__.get("_fused_plan")
    if plan is None or not plan.matches(identity):
        plan = Plan(layers, identity)
        object.__setattr__(owner, "_fused_plan", plan)
    return plan if plan.runs is not None else None


def _buffers(cache: KVCache, kv_heads: int, head_dim: int) -> tuple[mx.array, mx.array]:
    if cache.keys is None or cache.offset + 1 > cache.keys.shape[2]:
        row = mx.zeros((1, kv_heads, 1, head_dim), mx.float32)
        cache.reserve(row, row)
        # Grown one layer at a time: queued together, every layer's new buffer and the old one it copies were alive
        # at once (the whole cache twice over, +0.55 GB at 8K tokens of the 0.6B); evaluated here, each old buffer
        # is released before the next copy. A stall once every KVCache.step tokens.
        mx.eval(cache.keys, cache.values)
    return cache.keys, cache.values


def decode(owner, layers: list, h: mx.array, cache: list) -> mx.array | None:
    """h [1, 1, hidden] (float32) through `layers` (of `owner`, which keeps the plan), appending to `cache` (one
    KVCache each): the hidden state after the last layer, or None (nothing done) where the fused path does not
    apply."""
    if not kernels.fused() or h.dtype != mx.float32 or h.shape[:2] != (1, 1) or not layers:
        return None
    if type(cache[0]) is not KVCache:  # no cache (a one-token forward), a quantized or batched one
        return None
    offset = cache[0].offset
    for c in cache:
        if type(c) is not KVCache or c.offset != offset or (c.keys is not None and c.keys.dtype != mx.float32):
            return None
    plan = _plan(owner, layers)
    if plan is None:
        return None
    for run, first, n, mlp in plan.runs:
        kv = []
        for c in cache[first : first + n]:
            kv += _buffers(c, plan.kv_heads, plan.head_dim)
        out = run(h, kv, offset)
        h = out[0]
        for i, c in enumerate(cache[first : first + n]):
            c.keys, c.values = out[1 + 2 * i], out[2 + 2 * i]
            c.offset += 1
        if not mlp:
            layer = layers[first]
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h
