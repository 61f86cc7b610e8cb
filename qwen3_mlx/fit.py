"""Fit planner: memory and decode-speed bound of a Qwen3 model at a precision, on a device.

Pure arithmetic on config.json dicts (the eight shapes live in `models.registry.SHAPES`); the layer-by-layer
bits come from the same `QuantSpec.layer` the exporter uses, and tests check the byte counts against real
exports and `mx.get_peak_memory()`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import Qwen3MLXError
from .quantize.recipes import FIT_CANDIDATES, QuantSpec

GB = 1e9
KV_STEP = 256  # KVCache grows in steps of this many positions
# Memory an app uses besides weights, cache and activations (runtime, Metal/driver context, tokenizer).
RUNTIME_BYTES = int(0.4 * GB)


@dataclass(frozen=True)
class Device:
    """A target device: memory one app may use, and memory bandwidth (bounds decode speed)."""

    key: str
    name: str
    memory_gb: float  # installed
    usable_gb: float  # what one app can allocate
    bandwidth_gbs: float
    note: str = ""

    @property
    def usable_bytes(self) -> int:
        return int(self.usable_gb * GB)


# Figures from /work/shared/docs/qwen3-reference.md. Macs: GPU can wire ~75% of RAM by default.
DEVICES: dict[str, Device] = {
    d.key: d
    for d in (
        Device("iphone-15-pro", "iPhone 15 Pro (A17 Pro)", 8, 6.0, 51,
               "~6 GB with the increased-memory-limit entitlement, ~3 GB without"),
        Device("iphone-16-pro", "iPhone 16 Pro (A18 Pro)", 8, 6.0, 60,
               "~6 GB with the increased-memory-limit entitlement"),
        Device("android-16gb", "Android, Snapdragon 8 Elite, 16 GB", 16, 10.0, 85,
               "OS and other apps keep ~6 GB"),
        Device("m4-pro-48gb", "Mac M4 Pro 48 GB", 48, 36.0, 273, "75% of RAM wired for the GPU"),
        Device("m4-max-128gb", "Mac M4 Max 128 GB", 128, 96.0, 546, "75% of RAM wired for the GPU"),
        Device("m2-ultra-192gb", "Mac M2 Ultra 192 GB", 192, 144.0, 800, "75% of RAM wired for the GPU"),
        Device("m3-ultra-512gb", "Mac M3 Ultra 512 GB", 512, 384.0, 819, "75% of RAM wired for the GPU"),
    )
}


def get_device(key: str) -> Device:
    k = key.lower()
    if k not in DEVICES:
        raise Qwen3MLXError(f"unknown device {key!r} (known: {', '.join(DEVICES)})")
    return DEVICES[k]


@dataclass(frozen=True)
class Tensor:
    """A weight-bearing module: [experts?, out, in]; `quantizable` false for norms (1-D)."""

    path: str
    shape: tuple[int, ...]
    quantizable: bool = True


def _cfg(config: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(config, str):
        from .models.registry import shape_config

        return shape_config(config)
    return config


def model_tensors(config: dict[str, Any]) -> list[Tensor]:
    """Every module with weights, as MLX lays them out (experts stacked), from config keys alone."""
    c = _cfg(config)
    D, V = c["hidden_size"], c["vocab_size"]
    H, KV = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    hd = c.get("head_dim") or D // H
    E = c.get("num_experts", c.get("num_local_experts", 0)) or 0
    step = c.get("decoder_sparse_step", 1) or 1
    mlp_only = set(c.get("mlp_only_layers") or [])
    out = [Tensor("model.embed_tokens", (V, D))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [
            Tensor(f"{p}.self_attn.q_proj", (H * hd, D)),
            Tensor(f"{p}.self_attn.k_proj", (KV * hd, D)),
            Tensor(f"{p}.self_attn.v_proj", (KV * hd, D)),
            Tensor(f"{p}.self_attn.o_proj", (D, H * hd)),
            Tensor(f"{p}.self_attn.q_norm", (hd,), False),
            Tensor(f"{p}.self_attn.k_norm", (hd,), False),
            Tensor(f"{p}.input_layernorm", (D,), False),
            Tensor(f"{p}.post_attention_layernorm", (D,), False),
        ]
        if E > 0 and i not in mlp_only and (i + 1) % step == 0:
            I = c["moe_intermediate_size"]
            out += [
                Tensor(f"{p}.mlp.gate", (E, D)),
                Tensor(f"{p}.mlp.switch_mlp.gate_proj", (E, I, D)),
                Tensor(f"{p}.mlp.switch_mlp.up_proj", (E, I, D)),
                Tensor(f"{p}.mlp.switch_mlp.down_proj", (E, D, I)),
            ]
        else:
            I = c["intermediate_size"]
            out += [
                Tensor(f"{p}.mlp.gate_proj", (I, D)),
                Tensor(f"{p}.mlp.up_proj", (I, D)),
                Tensor(f"{p}.mlp.down_proj", (D, I)),
            ]
    out.append(Tensor("model.norm", (D,), False))
    if not c.get("tie_word_embeddings", False):
        out.append(Tensor("lm_head", (V, D)))
    return out


def tensor_bytes(t: Tensor, bits: int, group_size: int, dtype_bytes: int) -> int:
    """Bytes of one module's tensors: packed uint32 weight + scales + biases, or plain weight."""
    n = math.prod(t.shape)
    if not t.quantizable or bits == 0:
        return n * dtype_bytes
    rows, cols = n // t.shape[-1], t.shape[-1]
    return rows * (cols * bits // 32) * 4 + 2 * rows * (cols // group_size) * dtype_bytes


def kv_bytes_per_token(config: dict[str, Any], dtype_bytes: int = 2, kv_bits: int | None = None,
                       kv_group_size: int = 64) -> int:
    """Bytes of keys and values one position occupies across all layers (quantized to `kv_bits`: packed
    values plus a scale and a bias of `dtype_bytes` per group of `kv_group_size`)."""
    c = _cfg(config)
    H = c["num_attention_heads"]
    KV = c.get("num_key_value_heads") or H
    hd = c.get("head_dim") or c["hidden_size"] // H
    row = hd * dtype_bytes if kv_bits is None else hd * kv_bits // 8 + 2 * (hd // kv_group_size) * dtype_bytes
    return 2 * c["num_hidden_layers"] * KV * row


def _header_bytes(path: str, quantized: bool) -> int:
    # safetensors JSON entry per tensor: name + dtype/shape/offsets (~70 bytes); measured on real exports.
    names = [f"{path}.weight"] + ([f"{path}.scales", f"{path}.biases"] if quantized else [])
    return sum(len(n) + 70 for n in names)


@dataclass(frozen=True)
class Fit:
    """Predicted memory of one model at one precision and context (bytes), and its decode bound."""

    model: str
    spec: QuantSpec
    context: int
    weight_bytes: int  # the exported safetensors (and resident weights)
    kv_bytes: int  # KV cache at `context` (allocated in steps of 256 positions)
    activation_bytes: int  # transient tensors of one prefill chunk
    runtime_bytes: int  # app/runtime memory outside MLX's allocator
    active_bytes: int  # bytes read per decoded token (weights touched + KV)

    @property
    def overhead(self) -> int:
        return self.activation_bytes + self.runtime_bytes

    @property
    def peak_mlx_bytes(self) -> int:
        """What `mx.get_peak_memory()` should report during generation."""
        return self.weight_bytes + self.kv_bytes + self.activation_bytes

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.overhead

    def fits(self, device: Device | str) -> bool:
        device = get_device(device) if isinstance(device, str) else device
        return self.total <= device.usable_bytes

    def tokens_per_s(self, device: Device | str) -> float:
        """Decode upper bound: bandwidth / bytes read per token."""
        device = get_device(device) if isinstance(device, str) else device
        return device.bandwidth_gbs * GB / self.active_bytes


def predict(
    config: dict[str, Any] | str,
    bits: int = 4,
    group_size: int = 64,
    context: int = 4096,
    *,
    recipe: str = "uniform",
    spec: QuantSpec | None = None,
    dtype_bytes: int = 2,
    prefill_step: int = 512,
    runtime_bytes: int = RUNTIME_BYTES,
    fused_attention: bool = True,
    name: str | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
) -> Fit:
    """Memory prediction for `config` (a config dict or registry name) at `bits`/`group_size` or a `spec`.

    `dtype_bytes` is the size of scales, unquantized tensors, KV cache and activations (2 for bf16 on Apple
    GPUs, 4 for float32 on MLX's CPU backend). `bits=16` (or 0) means unquantized. `fused_attention`: the
    attention kernel never materialises the [heads, chunk, context] score matrix (MLX's Metal kernels and
    our CPU kernels; false for MLX's own CPU attention, which holds it in float32). `kv_bits`: a quantized KV
    cache (4 or 8 bits, groups of `kv_group_size`).
    """
    c = _cfg(config)
    name = name or (config if isinstance(config, str) else c.get("_name_or_path") or c.get("model_type"))
    unquantized = spec is None and bits in (0, 16)
    spec = spec or QuantSpec(bits=4 if unquantized else bits, group_size=group_size, recipe=recipe)
    tensors = model_tensors(c)
    L = c["num_hidden_layers"]
    tied = bool(c.get("tie_word_embeddings", False))
    E = c.get("num_experts", c.get("num_local_experts", 0)) or 0
    k = c.get("num_experts_per_tok", 0)
    weight = active = 0
    for t in tensors:
        b = 0 if (unquantized or not t.quantizable) else spec.layer_bits(t.path, L, tied)
        n = tensor_bytes(t, b, spec.group_size, dtype_bytes)
        weight += n + _header_bytes(t.path, b > 0)
        if t.path == "model.embed_tokens" and not tied:
            continue  # one row per token; lm_head is read in full instead
        active += n * k // E if ".switch_mlp." in t.path else n
    weight += 8 + 8  # per-shard length prefix and metadata, one shard
    D, H = c["hidden_size"], c["num_attention_heads"]
    KV = c.get("num_key_value_heads") or H
    hd = c.get("head_dim") or D // H
    positions = math.ceil(context / KV_STEP) * KV_STEP
    kv_row = kv_bytes_per_token(c, dtype_bytes, kv_bits, kv_group_size) // (2 * L * KV)  # one head, one position
    kv = 2 * L * KV * kv_row * positions
    chunk = min(prefill_step, context)
    # Largest score matrix of the chunked prefill: chunk length x keys cached so far, over all chunks.
    score_cells = max(
        min(prefill_step, context - s) * min(s + prefill_step, context) for s in range(0, context, prefill_step)
    )
    inter = c["moe_intermediate_size"] * k if E else c["intermediate_size"]
    # One layer's transients at a time (the kernels let MLX run only a few nodes ahead on large outputs):
    # the residual stream, plus the larger of the attention half and the MLP half, or the last logits.
    attention_half = (
        (0 if fused_attention else H * score_cells * 4)  # attention scores (float32 softmax)
        + chunk * D * dtype_bytes  # the norm's output
        # q and k twice (the projection, then normed and rotated), v, and the attention output
        + chunk * (3 * H + 3 * KV) * hd * dtype_bytes
        + 2 * KV * kv_row * (positions + KV_STEP)  # one layer's cache while it grows (old + new)
    )
    mlp_half = chunk * D * dtype_bytes + 2 * chunk * inter * dtype_bytes  # norm, gate and up (silu*up reuses gate)
    logits = c["vocab_size"] * 4 * 2  # last-position logits in float32 for sampling
    activation = chunk * D * dtype_bytes + max(attention_half, mlp_half, logits)
    return Fit(str(name), spec, context, weight, kv, activation, runtime_bytes, active + kv)


def choose(
    config: dict[str, Any] | str, device: Device | str, context: int = 4096, group_size: int = 64, **kw
) -> Fit:
    """The best-quality candidate (8-bit, 6-bit, mixed_4_6, 4-bit, ... 2-bit) that fits `device` at `context`.

    Raises Qwen3MLXError saying what the smallest candidate needs when nothing fits.
    """
    device = get_device(device) if isinstance(device, str) else device
    candidates = [dataclasses.replace(s, group_size=group_size) for s in FIT_CANDIDATES]
    fits = [predict(config, spec=s, context=context, **kw) for s in candidates]
    for f in fits:
        if f.fits(device):
            return f
    smallest = min(fits, key=lambda f: f.total)
    raise Qwen3MLXError(
        f"nothing fits {device.name} ({device.usable_gb:g} GB usable) at context {context}: the smallest "
        f"option, {smallest.spec.label}, needs {smallest.total / GB:.2f} GB (weights {smallest.weight_bytes / GB:.2f}"
        f" + KV cache {smallest.kv_bytes / GB:.2f} + overhead {smallest.overhead / GB:.2f}); "
        "try a shorter context or a smaller model"
    )


def model_label(name: str) -> str:
    from .models.registry import HF_REPOS

    return HF_REPOS.get(name.lower(), name).split("/")[-1]
