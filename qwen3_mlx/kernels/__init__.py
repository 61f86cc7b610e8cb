"""The one seam between the model and the CPU kernels.

On the CPU, our compiled MLX primitives (`_ext`, built from `src/` by `pip install`) run the quantized,
float and expert matmuls multi-threaded at memory speed (MLX's own CPU kernels for these are
single-threaded reference loops), attention, SwiGLU, MoE routing, RMSNorm and RoPE (which MLX's CPU
backend composes from many small ops, each a graph node per call), attention on a quantized KV cache, and
a batch of sequences each in its own cache (ragged decode attention, in-place KV append). Everywhere else
(Metal, CUDA), and for formats ours do not cover, MLX's own ops run. Both compute the same values to float32
rounding.

Ours choose their code path from one sequence's positions, never from the batch: a sequence computes bit
for bit the same alone, batched with others (the server), or as a few positions at once (a speculative
draft's verification). One exception: float32 prefill GEMMs run OpenBLAS, whose AVX-512 kernels (chosen
on AVX-512 CPUs unless OPENBLAS_CORETYPE says otherwise) keep this, and whose AVX2 kernels round a row by
its position in the call: with those, a float32 model's prefill pieces may differ in the last bits.

Quantized prefill matmuls on x86 CPUs with VNNI (AVX512-VNNI, AVX-VNNI) quantize their activations to int8 per
group and multiply with integer dot products (kernels/src/int8.h; benchmarks/int8_accuracy.py measures what
that costs); `QWEN3_MLX_INT8=0` (or `set_int8(0)`) keeps the exact float path, which the test suite checks
against transformers, and `QWEN3_MLX_INT8=all` (`set_int8(2)`) uses them for decode too.

A decoded position of one sequence runs its decoder layers as one node (`DecoderPlan`: the same pieces
back to back in one primitive, bit for bit what the unfused layer gives); `QWEN3_MLX_FUSED=0` (or
`set_fused(False)`) runs the layers op by op.

`QWEN3_MLX_KERNELS=0` (or `set_enabled(False)`) turns ours off, for comparisons; `QWEN3_MLX_THREADS`
sets their thread count (default: the usable cores). If the extension was not built or does not
import, the package still works on MLX's kernels and says why once on stderr.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import mlx.core as mx
import numpy as np



def _prefer_avx512_blas() -> None:
    # OpenBLAS 0.3.34 runs its AVX2 (Haswell) kernels on AMD Zen 4, which has AVX-512. Its SkylakeX kernels are
    # 1.7x faster there (float32 GEMM 192 -> 331 GFLOP/s, 512 x 1024 x 3072, measured) and, as on Intel, give
    # a row the same bits whatever rows surround it, which batch invariance needs (the Haswell ones do not).
    # The choice is read when the library loads, with the extension, so it is made here.
    if "OPENBLAS_CORETYPE" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"


_prefer_avx512_blas()
try:
    from . import _ext
except ImportError as e:  # no compiler at install time, another platform, a mismatched MLX
    _ext = None
    _IMPORT_ERROR = str(e) or type(e).__name__
else:
    _IMPORT_ERROR = None

_enabled = os.environ.get("QWEN3_MLX_KERNELS", "1") != "0"
# Whole decoder layers for one decoded position, the weights held (models/fused.py builds them; callers check
# `fused()` first): plan(x, [k_0, v_0, ...], offset) -> [hidden, k_0, v_0, ...].
DecoderPlan = getattr(_ext, "DecoderPlan", None)
_fused = os.environ.get("QWEN3_MLX_FUSED", "1") != "0"
_warned = False

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
# Up to this many positions of one sequence, the matmuls run their decode kernel (QWEN3_MLX_GEMV_MAX_ROWS in
# the extension) and causal attention runs row by row as decode steps: a forward of a few positions gives each
# exactly what decoding them one at a time gives.
DECODE_ROWS = 8
# Below this many (token, expert) pairs MLX's gather kernels run unsorted; decode never sorts.
SORT_THRESHOLD = 64


def set_enabled(flag: bool) -> None:
    """Use our kernels on the CPU (True, the default) or MLX's own everywhere (False)."""
    global _enabled
    _enabled = bool(flag)


def set_fused(flag: bool) -> None:
    """Run a decoded position's decoder layers as one node each (True, the default) or op by op (False)."""
    global _fused
    _fused = bool(flag)


def fused() -> bool:
    """Whether decoder layers issued now may run fused (`decoder_layers`): our kernels active and fusion on."""
    return _fused and active() and DecoderPlan is not None


def set_int8(mode: int) -> bool:
    """Integer dot products for quantized matmuls: 0 never (the float path), 1 prefill (the default where the CPU
    has VNNI), 2 prefill and decode; for the calls evaluated after. Returns whether this CPU has them."""
    return bool(_ext and _ext.set_int8(int(mode)))


def available() -> bool:
    """Whether the compiled extension imported."""
    return _ext is not None


def active() -> bool:
    """Whether matmuls issued now run on our kernels: built, enabled, and the default device is the CPU."""
    if not _enabled or mx.default_device() != mx.cpu:
        return False
    if _ext is None:
        _warn_missing()
        return False
    return True


def describe() -> dict:
    """Which kernels run here, for benchmark tables and JSON."""
    if active():
        return {"kernels": "qwen3-mlx", "isa": _ext.isa(), "int8": _ext.int8(), "threads": _ext.threads()}
    reason = "disabled" if not _enabled else ("not on the CPU" if _ext is not None else _IMPORT_ERROR)
    return {"kernels": "mlx", "isa": None, "threads": None, "reason": reason}


def _warn_missing() -> None:
    global _warned
    if not _warned:
        _warned = True
        print(
            f"qwen3-mlx: CPU kernels unavailable ({_IMPORT_ERROR}); using MLX's own CPU kernels, which are "
            "single-threaded and many times slower. Reinstall with a C++ compiler present to build them.",
            file=sys.stderr,
        )


def _ours_quantized(mode: str, bits: int, group_size: int, biases) -> bool:
    # Without biases MLX refuses affine quantization; so do we (by leaving the call to MLX).
    return mode == "affine" and biases is not None and bits in BITS and group_size in GROUP_SIZES and active()


def quantized_matmul(x, w, scales, biases, *, group_size: int, bits: int, mode: str = "affine") -> mx.array:
    """x [..., K] @ dequantize(w [N, K*bits/32], scales, biases)^T -> [..., N] (MLX affine layout)."""
    if _ours_quantized(mode, bits, group_size, biases):
        return _ext.quantized_matmul(x, w, scales, biases, group_size, bits)
    return mx.quantized_matmul(
        x, w, scales=scales, biases=biases, transpose=True, group_size=group_size, bits=bits, mode=mode
    )


def causal_conv(x: mx.array, w: mx.array, state: mx.array | None) -> tuple[mx.array, mx.array]:
    """The Gated DeltaNet's causal depthwise conv and its SiLU: x [B, L, C] after `state` [B, K - 1, C] (the
    previous inputs, None for zeros), w [C, K, 1] -> (silu(conv) [B, L, C], new state [B, K - 1, C]).

    Ours on the CPU in float32 (one node; MLX's composition is ~4K + 4), else MLX ops."""
    if active() and x.dtype == mx.float32 and w.dtype in (mx.float32, mx.bfloat16) and \
            (state is None or state.dtype == mx.float32):
        y, new_state = _ext.causal_conv(x, w, state)
        return y, new_state
    B, L, C = x.shape
    K = w.shape[1]
    past = state if state is not None else mx.zeros((B, K - 1, C), x.dtype)
    xs = mx.concatenate([past, x], axis=1)  # [B, K - 1 + L, C]
    taps = w[:, :, 0] if w.ndim == 3 else w  # [C, K]
    out = sum(xs[:, i : i + L] * taps[:, i] for i in range(K))
    return out * mx.sigmoid(out), xs[:, -(K - 1):] if K > 1 else xs[:, :0]


def quantized_embedding(ids, w, scales, biases, *, group_size: int, bits: int, mode: str = "affine") -> mx.array:
    """Rows of a quantized table for token ids, dequantized: ours on the CPU (one node, float32, MLX's values),
    else MLX's gather and dequantize (in the scales' dtype)."""
    if _ours_quantized(mode, bits, group_size, biases):
        return _ext.quantized_embedding(ids, w, scales, biases, group_size, bits)
    return mx.dequantize(w[ids], scales[ids], None if biases is None else biases[ids], group_size=group_size,
                         bits=bits, mode=mode)


def linear(x: mx.array, w: mx.array) -> mx.array:
    """x [..., K] @ w [N, K]^T for float weights (float32 or bfloat16 run on ours on the CPU)."""
    if active() and w.dtype in (mx.float32, mx.bfloat16) and x.dtype in (mx.float32, mx.bfloat16):
        return _promoted(_ext.matmul(x, w), x, w)
    return x @ w.T


def _promoted(y: mx.array, x: mx.array, w: mx.array) -> mx.array:
    # Our float kernels return float32; MLX would give bfloat16 only when neither operand is float32.
    return y if mx.float32 in (x.dtype, w.dtype) else y.astype(x.dtype)


class QuantizedKV(NamedTuple):
    """Keys or values [B, Hkv, S, D] as mx.quantize lays them out (affine, groups along D)."""

    words: mx.array  # [B, Hkv, S, D * bits / 32], uint32
    scales: mx.array  # [B, Hkv, S, D / group_size]
    biases: mx.array


class RaggedKV(list):
    """A batch's keys or values as each sequence's own cache buffer: [1, Hkv, capacity, D] arrays, or
    QuantizedKV already cut to the sequence's length."""


def attention(q: mx.array, k, v, *, scale: float, mask=None) -> mx.array:
    """softmax(q k^T * scale + mask) v: q [B, H, L, D] -> [B, H, L, D].

    k and v are what a cache's `update_and_fetch` returns, and their type picks the path:
    - mx.array [B, Hkv, S, D] (KVCache, or no cache; Hkv divides H): mask None, "causal" (aligned to the end of
      the keys, as MLX's) or an additive / boolean array.
    - QuantizedKV (QuantizedKVCache; also a plain (words, scales, biases) triple): read as it is, ours
      expanding 64 keys at a time in scratch, elsewhere MLX's quantized matmuls.
    - RaggedKV (BatchKVCache: sequences at different lengths, decode, L == 1): mask is the list of each
      row's key count, and each row computes exactly what it would alone.
    On the CPU in float32 ours run, reading k and v in place: a fused kernel for a single query row
    (decode), a blocked one with an online softmax for many (prefill: no [H, L, S] score matrix, multi-threaded
    over heads and query blocks). MLX's CPU attention materialises the scores and runs both products through
    the BLAS the wheel links (a reference BLAS on Linux): 10x slower at a 512-token chunk.
    """
    if isinstance(k, RaggedKV):
        return _ragged_attention(q, k, v, scale, mask)
    if isinstance(k, (tuple, list)):  # QuantizedKV, or mx.quantize's own list
        return _quantized_attention(q, k, v, scale, mask)
    L, S = q.shape[-2], k.shape[-2]
    if not (active() and q.dtype == mx.float32 and k.dtype == mx.float32 and v.dtype == mx.float32):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"unknown attention mask {mask!r}")
    if L == 1 and (mask is None or isinstance(mask, str)) and q.shape[1] // k.shape[1] <= 16:
        # Decode: one fused kernel reading the cache in place (one causal query row sees every key).
        return _ext.decode_attention(q, k, v, scale)
    if (mask == "causal" and L <= DECODE_ROWS and q.shape[0] == 1 and S >= L
            and q.shape[1] // k.shape[1] <= 16):
        # A few causal rows (a speculative draft's verification): each row as its own decode step, so the
        # target computes every position bit for bit as when it decodes them one at a time.
        rows = _ext.ragged_decode_attention(q.transpose(2, 1, 0, 3), [k] * L, [v] * L,
                                            [S - L + 1 + i for i in range(L)], scale)  # [L, H, 1, D]
        return rows.transpose(2, 1, 0, 3)
    if mask is None or isinstance(mask, str):
        if mask == "causal" and S < L:  # queries before the first key: MLX's definition, rows of NaN
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return _ext.attention(q, k, v, scale, mask == "causal")
    # An explicit mask array: the two products on our batched matmul, MLX's softmax between them.
    scores = _ext.matmul(q, k) * scale  # [B, H, L, S]; k read in place, the product scaled in place
    scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype)) if mask.dtype == mx.bool_ else scores + mask
    probs = mx.softmax(scores, axis=-1, precise=True)
    return _ext.matmul(probs, v.swapaxes(-1, -2))  # [B, H, L, S] @ [B, Hkv, D, S]^T


def _quantized_attention(q: mx.array, k: QuantizedKV, v: QuantizedKV, scale: float, mask) -> mx.array:
    (words, scales, _), D = k, q.shape[-1]  # unpacked, so that a plain triple reads the same
    bits, group_size = words.shape[-1] * 32 // D, D // scales.shape[-1]
    L, S = q.shape[-2], words.shape[-2]
    if (active() and q.dtype == mx.float32 and all(a.dtype == mx.float32 for a in (*k[1:], *v[1:]))
            and (mask is None or mask == "causal") and not (mask == "causal" and S < L)):
        return _ext.quantized_attention(q, list(k), list(v), scale, mask == "causal" and L > 1, group_size, bits)
    # MLX's quantized matmuls (mlx-lm's form): the scores and the weighted sum straight from the quantized
    # rows, with the query heads of each kv head grouped.
    B, H = q.shape[:2]
    Hkv = words.shape[1]
    qg = (q * scale).reshape(B, Hkv, H // Hkv, L, D)
    kq, vq = (tuple(mx.expand_dims(a, 2) for a in t) for t in (k, v))  # [B, Hkv, 1, S, n]
    scores = mx.quantized_matmul(qg, *kq, transpose=True, group_size=group_size, bits=bits)  # [B, Hkv, rep, L, S]
    if isinstance(mask, str):
        visible = mx.arange(S)[None] <= (mx.arange(L) + S - L)[:, None]  # aligned to the keys' end
        scores = mx.where(visible, scores, mx.array(-mx.inf, scores.dtype))
    elif mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    probs = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(probs, *vq, transpose=False, group_size=group_size, bits=bits)  # [B, Hkv, rep, L, D]
    return out.reshape(B, H, L, D)


def _ragged_attention(q: mx.array, keys: RaggedKV, values: RaggedKV, scale: float, lengths: list[int]) -> mx.array:
    floats = all(isinstance(a, mx.array) for a in (*keys, *values))
    if floats and active() and all(a.dtype == mx.float32 for a in (q, *keys, *values)) \
            and q.shape[1] // keys[0].shape[1] <= 16:
        return _ext.ragged_decode_attention(q, keys, values, lengths, scale)
    rows = [
        _quantized_attention(q[b : b + 1], k, v, scale, None) if isinstance(k, QuantizedKV)
        else mx.fast.scaled_dot_product_attention(q[b : b + 1], k[..., :n, :], v[..., :n, :], scale=scale)
        for b, (k, v, n) in enumerate(zip(keys, values, lengths))
    ]
    return mx.concatenate(rows, axis=0)


def kv_append(keys: mx.array, values: mx.array, kbufs: list, vbufs: list, positions: list[int]) -> tuple[list, list]:
    """Write one step's keys and values [B, Hkv, L, D] of a batch of sequences into each sequence's own
    cache buffers [1, Hkv, capacity, D] at its position -> (new key buffers, new value buffers).

    Ours on the CPU in float32: one graph node, written in place (MLX's slice updates are one node per row
    and tensor). The buffers' rows from `positions[b]` on must be unused by anyone else."""
    if active() and all(a.dtype == mx.float32 for a in (keys, values, *kbufs, *vbufs)):
        out = _ext.kv_append(keys, values, kbufs, vbufs, positions)
        return out[0::2], out[1::2]
    L = keys.shape[2]
    new_k, new_v = [], []
    for b, (kb, vb, p) in enumerate(zip(kbufs, vbufs, positions)):
        kb[..., p : p + L, :] = keys[b : b + 1]
        vb[..., p : p + L, :] = values[b : b + 1]
        new_k.append(kb)
        new_v.append(vb)
    return new_k, new_v


def rms_norm(x: mx.array, weight: mx.array, *, eps: float) -> mx.array:
    """x * rsqrt(mean(x^2, -1) + eps) * weight over the last axis: ours on the CPU in float32, else
    mx.fast.rms_norm (which on the CPU MLX composes from seven ops, each a graph node per call)."""
    if active() and x.dtype == mx.float32 and weight.dtype in (mx.float32, mx.bfloat16) and x.ndim >= 1:
        return _ext.rms_norm(x, weight, eps)
    return mx.fast.rms_norm(x, weight, eps)


_L2_WEIGHTS: dict[tuple[int, float], mx.array] = {}


def l2_norm(x: mx.array, scale: float = 1.0, eps: float = 1e-6) -> mx.array:
    """x * rsqrt(sum(x^2) + eps) * scale over the last axis (the Gated DeltaNet's q and k). Ours on the CPU in
    float32 as the RMSNorm kernel (one node instead of six): rms_norm(x, w, eps / d) = x * rsqrt((sum + eps) / d)
    * w, so w = scale / sqrt(d), made once per (d, scale); else MLX ops."""
    if active() and x.dtype == mx.float32 and x.ndim >= 1:
        d = x.shape[-1]
        w = _L2_WEIGHTS.get((d, scale))
        if w is None:
            w = _L2_WEIGHTS[(d, scale)] = mx.full((d,), scale / d**0.5, mx.float32)
        return _ext.rms_norm(x, w, eps / d)
    return x * mx.rsqrt((x * x).sum(-1, keepdims=True) + eps) * scale


def rope_inv_freq(dims: int, *, base: float | None = None, freqs: mx.array | None = None) -> mx.array:
    """The inverse frequencies [dims / 2] our RoPE kernel takes, as mx.fast.rope derives them on the CPU:
    exp(-i * log(base) / (dims / 2)) in float32, or 1 / freqs (wavelengths). Computed once per model."""
    if freqs is None:
        half = dims // 2
        coef = np.float32(np.log(np.float32(base))) / np.float32(half)
        inv = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * mx.array(coef, mx.float32))
    else:
        inv = mx.reciprocal(freqs.astype(mx.float32))
    mx.eval(inv)
    return inv


def rope(x: mx.array, *, offset, inv_freq: mx.array, base: float | None = None, freqs: mx.array | None = None,
         mscale: float = 1.0) -> mx.array:
    """Rotary embedding of whole heads, HF's half-split layout, of (x * mscale) [B, H, L, D] at positions
    offset..offset+L-1; `base` (default frequencies) or `freqs` (wavelengths, as mx.fast.rope takes them),
    and `inv_freq` = rope_inv_freq(D, base=..., freqs=...) for our kernel. `offset`: an int, or a list of
    one per batch row (sequences at different lengths).

    Ours on the CPU in float32 (one node instead of MLX's ~20-op CPU composition), else mx.fast.rope.
    """
    if active() and x.dtype == mx.float32 and x.ndim == 4 and isinstance(offset, (int, list)):
        return _ext.rope(x, inv_freq, offset, mscale)
    if isinstance(offset, list):
        return mx.concatenate(
            [rope(x[b : b + 1], offset=o, inv_freq=inv_freq, base=base, freqs=freqs, mscale=mscale)
             for b, o in enumerate(offset)], axis=0)
    if mscale != 1.0:
        x = x * mscale
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=base, scale=1.0, offset=offset, freqs=freqs)


def route(logits: mx.array, k: int, norm_topk_prob: bool) -> tuple[mx.array, mx.array]:
    """Mixture-of-experts routing in float32: softmax over logits [..., E], the k most probable experts and
    their probabilities (renormalised to sum 1 when norm_topk_prob) -> (indices [..., k], scores [..., k]).

    One kernel on the CPU (in descending order), MLX's five ops elsewhere (in argpartition's order).
    """
    logits = logits.astype(mx.float32)  # expert choice is sensitive to rounding, whatever the compute dtype
    if active():
        return tuple(_ext.route(logits, k, norm_topk_prob))
    probs = mx.softmax(logits, axis=-1)  # [..., E]
    inds = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
    scores = mx.take_along_axis(probs, inds, axis=-1)
    if norm_topk_prob:
        scores = scores / scores.sum(axis=-1, keepdims=True)
    return inds, scores


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up: ours on the CPU in float32 (MLX's compiled CPU kernel evaluates exp one element at
    a time, ~10% of a prefill), else MLX's, fused by mx.compile where it can compile."""
    if active() and gate.dtype == mx.float32 and up.dtype == mx.float32 and gate.shape == up.shape:
        return _ext.swiglu(gate, up)
    return _swiglu_mlx(gate, up)


def _swiglu_plain(gate: mx.array, up: mx.array) -> mx.array:
    return gate * mx.sigmoid(gate) * up


_swiglu_compiled = mx.compile(_swiglu_plain, shapeless=True)
_swiglu_impl = None


def _swiglu_mlx(gate: mx.array, up: mx.array) -> mx.array:
    # On CPU, mx.compile needs a C++ compiler at run time; without one the three plain ops run.
    global _swiglu_impl
    if _swiglu_impl is None:
        try:
            probe = mx.ones((2,))
            mx.eval(_swiglu_compiled(probe, probe))
            _swiglu_impl = _swiglu_compiled
        except Exception:  # no compiler, or compilation disabled
            _swiglu_impl = _swiglu_plain
    return _swiglu_impl(gate, up)


def gather_qmm(x, w, scales, biases, indices, *, group_size: int, bits: int, mode: str = "affine") -> mx.array:
    """Expert matmuls: out[..., j, :] = x_row @ dequantize(w[indices[..., j]])^T -> indices.shape + [N].

    w [E, N, K*bits/32]; x [..., K] holds one row per (token, expert) pair (x.shape[:-1] ==
    indices.shape) or one row per token shared by its k experts (x.shape[:-1] == indices.shape[:-1]).
    """
    if _ours_quantized(mode, bits, group_size, biases):
        return _ext.gather_qmm(x, w, scales, biases, indices, group_size, bits)

    def run(rows, idx, sorted_indices):
        return mx.gather_qmm(
            rows, w, scales, biases, rhs_indices=idx, transpose=True, group_size=group_size, bits=bits,
            mode=mode, sorted_indices=sorted_indices,
        )

    return _gather_mlx(x, indices, run)


def gather_mm(x: mx.array, w: mx.array, indices: mx.array) -> mx.array:
    """The float form of gather_qmm: w [E, N, K] -> indices.shape + [N]. Ours on the CPU for float32 and
    bfloat16 stacks (bfloat16 widened in registers), MLX's gather_mm elsewhere."""
    if active() and w.dtype in (mx.float32, mx.bfloat16) and x.dtype in (mx.float32, mx.bfloat16):
        return _promoted(_ext.gather_mm(x, w, indices), x, w)
    return _gather_mlx(
        x, indices, lambda rows, idx, s: mx.gather_mm(rows, w.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=s)
    )


def _gather_mlx(x: mx.array, indices: mx.array, run) -> mx.array:
    per_pair = tuple(x.shape[:-1]) == tuple(indices.shape)
    if indices.size >= SORT_THRESHOLD:
        # Prefill: lay the pairs out grouped by expert so MLX reads each expert's weights once.
        k = 1 if per_pair else indices.shape[-1]
        flat = indices.flatten()
        order = mx.argsort(flat)
        inverse = mx.argsort(order)
        rows = x.reshape(-1, 1, x.shape[-1])[order // k]  # [P, 1, K]
        return run(rows, flat[order], True)[inverse].reshape(*indices.shape, -1)
    rows = mx.expand_dims(x, -2) if per_pair else mx.expand_dims(x, (-2, -3))  # [..., k|1, 1, K]
    return run(rows, indices, False).squeeze(-2)


def gated_delta(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array):
    """The gated delta rule (Gated DeltaNet) over q, k [B, H, L, Dk] (q L2-normed and scaled by Dk^-0.5, k
    normed), v [B, H, L, Dv], log decays g and betas [B, H, L], from state [B, H, Dk, Dv]: (out [B, H, L, Dv],
    new state), float32.

    Ours on the CPU (the recurrence per head on the pool, the state in cache); else MLX ops, chunked for a
    prompt (`delta_rule.gated_delta_chunked`) and one step for decode."""
    from .delta_rule import gated_delta_chunked, gated_delta_step

    q, k, v, g, beta, state = (a.astype(mx.float32) for a in (q, k, v, g, beta, state))
    if active():
        out, new_state = _ext.gated_delta(q, k, v, g, beta, state)
        return out, new_state
    if q.shape[2] == 1:  # one position of each: [B, H, 1, ...] -> [B, H, ...]
        o, new_state = gated_delta_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0], state)
        return o[:, :, None], new_state
    return gated_delta_chunked(q, k, v, g, beta, state)
