"""Linear, embedding and norm layers that compute through the kernel seam (qwen3_mlx/kernels).

The parameters (and so the checkpoint tensor names and shapes) are exactly those of mlx.nn's layers; only
the computation differs: on the CPU it runs our kernels, elsewhere MLX's own.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import kernels


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = kernels.quantized_matmul(
            x, self["weight"], self["scales"], self.get("biases"), group_size=self.group_size, bits=self.bits,
            mode=self.mode,
        )
        return y + self["bias"] if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def __call__(self, x: mx.array) -> mx.array:
        # On our CPU kernels the rows come out float32, as the model computes (in the scales' dtype, bfloat16
        # in most checkpoints, every norm, RoPE and attention of a decode step fell back to MLX's emulated
        # bfloat16 compositions, and every product gained two casts).
        return kernels.quantized_embedding(
            x, self["weight"], self["scales"], self.get("biases"), group_size=self.group_size, bits=self.bits,
            mode=self.mode,
        )

    def as_linear(self, x: mx.array) -> mx.array:
        return kernels.quantized_matmul(
            x, self["weight"], self["scales"], self.get("biases"), group_size=self.group_size, bits=self.bits,
            mode=self.mode,
        )


class Linear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        y = kernels.linear(x, self["weight"])
        return y + self["bias"] if "bias" in self else y

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class Embedding(nn.Embedding):
    def __call__(self, x: mx.array) -> mx.array:
        y = super().__call__(x)
        # A bfloat16 table kept for the CPU kernels (loader.cpu_bf16_weights): the model computes in float32.
        return y.astype(mx.float32) if y.dtype == mx.bfloat16 and kernels.active() else y

    def as_linear(self, x: mx.array) -> mx.array:
        return kernels.linear(x, self.weight)

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            raise ValueError("Quantized input is not supported.")
        return QuantizedEmbedding.from_embedding(self, group_size, bits, mode)



class RMSNorm(nn.RMSNorm):
    def __call__(self, x: mx.array) -> mx.array:
        return kernels.rms_norm(x, self["weight"], eps=self.eps)
