"""Linear and embedding layers whose quantized forms pick the fastest kernel for the device and the batch.

The parameters (and so the checkpoint tensor names and shapes) are exactly those of mlx.nn's layers; only
`__call__` differs. On MLX's CPU backend `quantized_matmul` is a single-threaded reference loop, while
float32 matmul goes to BLAS (multi-threaded OpenBLAS when preloaded, see qwen3_mlx/blas.py). So on CPU:
- many rows (prefill): dequantize the weight once and use the BLAS matmul;
- one row (decode): keep the quantized kernel (it reads 4-8x fewer bytes) but split the output rows across
  two CPU streams, which MLX runs on two threads.
On a GPU the quantized kernels are the fast path and are used as they are.
"""

from __future__ import annotations

import os
import threading

import mlx.core as mx
import mlx.nn as nn

# Rows of input from which dequantize + BLAS beats the quantized kernel on CPU (measured: see the README).
DEQUANT_MIN_ROWS = 8
# Split single-row quantized matmuls across this many CPU streams (threads); 1 disables the split.
SPLIT_STREAMS = max(1, min(int(os.environ.get("QWEN3_MLX_CPU_STREAMS", min(os.cpu_count() or 1, 2))), 8))
# Below this many output rows a split costs more in synchronisation than it saves.
SPLIT_MIN_OUT = 1024
# Largest float copy (elements) the dequantize route makes of one weight at a time.
DEQUANT_BLOCK = 1 << 18  # 1 MB float blocks: peak memory at parity with the quantized kernel (see README)
# The same bound for blocks of MoE experts (switch.py). Kept at the size it was measured with: a block of
# several experts per gather keeps long prefills fast, and one expert alone already exceeds DEQUANT_BLOCK.
DEQUANT_EXPERT_BLOCK = 1 << 24
# Dequantize expert stacks for sorted (prefill) MoE matmuls on CPU, from this many rows per expert on.
DEQUANT_EXPERTS = True
DEQUANT_MIN_ROWS_PER_EXPERT = 32

_local = threading.local()  # MLX streams belong to the thread that made them


def _split_streams() -> list:
    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = [mx.new_stream(mx.cpu) for _ in range(SPLIT_STREAMS)]
    return streams


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def cpu_split_streams() -> list:
    """The CPU streams a single-token step may spread independent work over ([] off CPU or when disabled)."""
    if SPLIT_STREAMS < 2 or not _on_cpu():
        return []
    return _split_streams()


def quantized_linear(x: mx.array, weight, scales, biases, group_size: int, bits: int, mode: str) -> mx.array:
    """x [..., in] @ dequantize(weight [out, in/pack])^T -> [..., out], by the fastest route here."""
    if not (_on_cpu() and mode == "affine"):
        return mx.quantized_matmul(
            x, weight, scales=scales, biases=biases, transpose=True, group_size=group_size, bits=bits, mode=mode
        )
    rows = x.size // x.shape[-1]
    dequant = rows >= DEQUANT_MIN_ROWS

    def part(lo: int, hi: int, stream, after: list):
        w, s, b = weight[lo:hi], scales[lo:hi], None if biases is None else biases[lo:hi]
        if dequant:
            # The float copy waits for this layer's input and for the previous block on its stream: without
            # that the scheduler may dequantize many blocks (of every layer) ahead and hold them all.
            w = mx.depends(w, [x, *after])
            wf = mx.dequantize(w, s, b, group_size, bits, mode=mode, stream=stream)  # [hi-lo, in] float
            return mx.matmul(x, wf.T, stream=stream)
        return mx.quantized_matmul(
            x, w, scales=s, biases=b, transpose=True, group_size=group_size, bits=bits, mode=mode, stream=stream
        )

    out = weight.shape[0]
    in_dims = x.shape[-1]
    streams = cpu_split_streams() or [mx.default_stream(mx.cpu)]
    # Row blocks of the weight are contiguous views. Blocks alternate over the streams (threads); when
    # dequantizing, blocks are also small enough that the float copy of a big matrix (the vocabulary
    # projection) never exists whole.
    blocks = len(streams) if out >= SPLIT_MIN_OUT else 1
    if dequant:
        blocks = max(blocks, -(-out * in_dims // DEQUANT_BLOCK))
    if blocks == 1:
        return part(0, out, streams[0], [])
    step = -(-out // blocks)
    ys: list[mx.array] = []
    for i, lo in enumerate(range(0, out, step)):
        prev = ys[i - len(streams)] if i >= len(streams) else None
        ys.append(part(lo, min(lo + step, out), streams[i % len(streams)], [prev] if prev is not None else []))
    return mx.concatenate(ys, axis=-1)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_linear(
            x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits, self.mode
        )
        if "bias" in self:
            y = y + self["bias"]
        return y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_linear(
            x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits, self.mode
        )


class Linear(nn.Linear):
    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class Embedding(nn.Embedding):
    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            raise ValueError("Quantized input is not supported.")
        return QuantizedEmbedding.from_embedding(self, group_size, bits, mode)


def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


_swiglu_compiled = mx.compile(_swiglu, shapeless=True)
_swiglu_impl = None


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up as one fused kernel when MLX can compile (on CPU that needs a C++ compiler at run
    time; without one the plain three-op version is used)."""
    global _swiglu_impl
    if _swiglu_impl is None:
        try:
            probe = mx.ones((2,))
            mx.eval(_swiglu_compiled(probe, probe))
            _swiglu_impl = _swiglu_compiled
        except Exception:  # no compiler, or compilation disabled
            _swiglu_impl = _swiglu
    return _swiglu_impl(gate, up)
