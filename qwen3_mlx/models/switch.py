"""Stacked-expert layers for mixture-of-experts: one [E, out, in] weight per projection, gathered per token."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from . import layers

# Below this many (token, expert) pairs sorting costs more than it saves; decode never sorts.
SORT_THRESHOLD = 64


class SwitchLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1.0 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        # x [..., 1, in] with one row per (token, expert) pair; weight^T [E, in, out]
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        E, out_dims, in_dims = self.weight.shape
        q = QuantizedSwitchLinear(in_dims, out_dims, E, group_size=group_size, bits=bits, mode=mode)
        q.weight, q.scales, q.biases = mx.quantize(self.weight, group_size, bits, mode=mode)
        return q


class QuantizedSwitchLinear(nn.Module):
    def __init__(self, input_dims, output_dims, num_experts, group_size=64, bits=4, mode="affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        # Placeholders with the exported shapes; load_weights fills them in.
        w = mx.zeros((num_experts, output_dims, input_dims), dtype=mx.float32)
        self.weight, self.scales, self.biases = mx.quantize(w, group_size, bits, mode=mode)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if sorted_indices and layers._on_cpu() and self.mode == "affine":
            # CPU prefill. Dequantizing a whole expert stack only pays off with many rows per expert
            # (measured: 63 tokens x 8 of 64 experts is slower dequantized); otherwise split the sorted rows
            # over the CPU streams, each running the quantized kernel on its contiguous share.
            if layers.DEQUANT_EXPERTS and indices.size >= layers.DEQUANT_MIN_ROWS_PER_EXPERT * self.num_experts:
                return self._dequantized_sorted(x, indices)
            streams = layers.cpu_split_streams()
            n = indices.shape[0]
            if len(streams) > 1 and n >= 2 * len(streams):
                step = -(-n // len(streams))
                parts = [
                    self._gather_qmm(x[lo : lo + step], indices[lo : lo + step], True, stream=st)
                    for lo, st in zip(range(0, n, step), streams)
                ]
                return mx.concatenate(parts, axis=0)
        return self._gather_qmm(x, indices, sorted_indices)

    def _gather_qmm(self, x: mx.array, indices: mx.array, sorted_indices: bool, stream=None) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.biases,
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
            stream=stream,
        )

    def _dequantized_sorted(self, x: mx.array, indices: mx.array) -> mx.array:
        """CPU prefill: the quantized gather kernel is a single-threaded loop, so dequantize blocks of experts
        and use float gather_mm (BLAS). Rows are sorted by expert, so each block of experts owns a contiguous
        range of rows; finding the ranges costs one small synchronisation, and keeps the float copy to one
        block per stream instead of the whole [E, out, in] stack.

        x [N, 1, in] (rows sorted by expert), indices [N] sorted -> [N, 1, out].
        """
        E, out_dims, packed = self.weight.shape
        in_dims = packed * 32 // self.bits
        per_block = max(1, layers.DEQUANT_EXPERT_BLOCK // (out_dims * in_dims))
        starts = list(range(0, E, per_block))
        if len(starts) == 1:
            bounds = [0, indices.shape[0]]
        else:
            edges = mx.array(starts[1:], dtype=indices.dtype)
            bounds = [0, *(indices[None, :] < edges[:, None]).sum(axis=1).tolist(), indices.shape[0]]
        streams = layers.cpu_split_streams() or [mx.default_stream(mx.cpu)]
        ys = []
        for b, e0 in enumerate(starts):
            lo, hi = bounds[b], bounds[b + 1]
            if hi == lo:
                continue
            n = len(ys)
            st = streams[n % len(streams)]
            e1 = min(e0 + per_block, E)
            # Dequantize when this layer runs and after this stream's previous block, not all blocks up front.
            after = [x] + ([ys[n - len(streams)]] if n >= len(streams) else [])
            w = mx.depends(self.weight[e0:e1], after)
            wf = mx.dequantize(w, self.scales[e0:e1], self.biases[e0:e1], self.group_size, self.bits, stream=st)
            ys.append(
                mx.gather_mm(
                    x[lo:hi], wf.swapaxes(-1, -2), rhs_indices=indices[lo:hi] - e0, sorted_indices=True, stream=st
                )
            )
        return mx.concatenate(ys, axis=0) if len(ys) > 1 else ys[0]


class SwitchGLU(nn.Module):
    """SwiGLU run for the k experts chosen per token."""

    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., D], indices [..., k] -> [..., k, D]."""
        k = indices.shape[-1]
        do_sort = indices.size >= SORT_THRESHOLD
        if do_sort:
            # Prefill: lay the (token, expert) pairs out grouped by expert so each expert's
            # weights are read once for a contiguous block of rows.
            flat = indices.flatten()
            order = mx.argsort(flat)
            inverse = mx.argsort(order)
            rows = x.reshape(-1, 1, x.shape[-1])[order // k]  # [N*k, 1, D]
            idx = flat[order]
        else:
            rows = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D] broadcasts against [..., k]
            idx = indices
            streams = layers.cpu_split_streams()
            if len(streams) > 1 and k >= len(streams):
                # CPU decode: each stream (thread) runs a share of the k experts.
                step = -(-k // len(streams))
                parts = []
                for i, st in zip(range(0, k, step), streams):
                    with mx.stream(st):
                        part = idx[..., i : i + step]
                        h = layers.swiglu(self.gate_proj(rows, part), self.up_proj(rows, part))
                        parts.append(self.down_proj(h, part))
                return mx.concatenate(parts, axis=-3).squeeze(-2)  # [..., k, 1, D] -> [..., k, D]
        g = self.gate_proj(rows, idx, sorted_indices=do_sort)
        u = self.up_proj(rows, idx, sorted_indices=do_sort)
        y = self.down_proj(layers.swiglu(g, u), idx, sorted_indices=do_sort)
        if do_sort:
            return y[inverse].reshape(*indices.shape, -1)  # [N*k, 1, D] -> [..., k, D]
        return y.squeeze(-2)
