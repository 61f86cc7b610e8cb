"""Stacked-expert layers for mixture-of-experts: one [E, out, in] weight per projection, gathered per token."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .. import kernels


class SwitchLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1.0 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., in] (one row per pair, or per token shared by its k experts), indices [..., k] -> [..., k, out]."""
        return kernels.gather_mm(x, self.weight, indices)

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

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """As SwitchLinear, on the quantized expert stack."""
        return kernels.gather_qmm(
            x, self.weight, self.scales, self.get("biases"), indices, group_size=self.group_size, bits=self.bits,
            mode=self.mode,
        )


class SwitchGLU(nn.Module):
    """SwiGLU run for the k experts chosen per token."""

    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., D], indices [..., k] -> [..., k, D]."""
        h = kernels.swiglu(self.gate_proj(x, indices), self.up_proj(x, indices))  # [..., k, hidden]
        return self.down_proj(h, indices)
