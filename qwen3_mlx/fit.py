"""Fit planner: memory and decode-speed bound of a Qwen3 / Qwen3.5 model at a precision, on a device.

Arithmetic on config.json dicts (the shapes live in `models.registry.SHAPES`) over the tensors of the
architecture itself, built lazily (`model_tensors`); the layer-by-layer bits come from the same `QuantSpec.layer`
the exporter uses, and tests check the byte counts against real
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
        Device("m4-pro-64gb", "Mac mini M4 Pro 64 GB", 64, 48.0, 273, "75% of RAM wired for the GPU"),
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


def _args(config: dict[str, Any] | str):
    """The architecture's ModelArgs of `config` (defaults filled in, a vision-language config's text part)."""
    from .models import get_architecture

    c = _cfg(config)
    return get_architecture(c.get("model_type")).ModelArgs.from_dict(c)


def model_tensors(config: dict[str, Any] | str) -> list[Tensor]:
    """Every weight-bearing module as MLX lays it out (experts stacked), read off the architecture itself: the
    model is built lazily, so no weight is ever materialised. Quantizable: the modules `nn.quantize` converts."""
    import mlx.core as mx

    from .models import build_model

    c = _cfg(config)
    out = []
    for path, module in build_model(c).named_modules():
        for name, v in module.items():
            if isinstance(v, mx.array) and not name.startswith("_"):  # private arrays (RoPE's) are not weights
                quantizable = name == "weight" and hasattr(module, "to_quantized") and not getattr(module, "keep_float", 0)
                out.append(Tensor(path if name == "weight" else f"{path}.{name}", tuple(v.shape), quantizable))
    return out


def layer_kinds(config: dict[str, Any] | str) -> list[str]:
    """Per layer, "full_attention" (a KV cache that grows with the context) or "linear_attention" (a state of
    fixed size)."""
    a = _args(config)
    return list(getattr(a, "layer_types", None) or ["full_attention"] * a.num_hidden_layers)


def is_disk_table(path: str) -> bool:
    """qwen4_exp's n-gram tables: exported in float, read by row from the file at run time (never resident)."""
    return path.endswith(".ple_embedding.ngram_embedding")


def ple_state_bytes(config: dict[str, Any] | str, dtype_bytes: int = 2) -> int:
    """Bytes of all PLE layers' state (qwen4_exp): the dilated conv's last (kernel - 1) * ngram_size inputs over
    the hc streams, and the last ngram_size - 1 token ids (int64); 0 for other models."""
    a = _args(config)
    if not getattr(a, "ple_layer_ids", None):
        return 0
    span = (a.ple_conv_kernel_size - 1) * a.ngram_size
    return len(a.ple_layer_ids) * (span * a.hc_count * a.hidden_size * dtype_bytes + (a.ngram_size - 1) * 8)


def index_bytes_per_token(config: dict[str, Any] | str, dtype_bytes: int = 2) -> int:
    """Bytes of the QSA indexer's key one position adds over all attention layers (qwen4_exp; else 0)."""
    a = _args(config)
    dim = getattr(a, "indexer_head_dim", None) or 0
    return layer_kinds(config).count("full_attention") * dim * dtype_bytes


def state_bytes_per_layer(config: dict[str, Any] | str, dtype_bytes: int = 2) -> int:
    """Bytes of one linear-attention layer's state: the causal conv's last kernel - 1 inputs (`dtype_bytes`) and
    the delta rule's [heads, Dk, Dv] state (float32); 0 for a model without such layers."""
    a = _args(config)
    if not hasattr(a, "linear_num_value_heads"):
        return 0
    hv, dk, dv = a.linear_num_value_heads, a.linear_key_head_dim, a.linear_value_head_dim
    conv_dim = 2 * a.linear_num_key_heads * dk + hv * dv
    return (a.linear_conv_kernel_dim - 1) * conv_dim * dtype_bytes + hv * dk * dv * 4


def state_copies(context: int, prefill_step: int = 512) -> int:
    """States a linear layer holds at once while decoding after a `context`-token prompt: the live one, the one
    before the latest step, and a checkpoint after each prefill chunk of the prompt but its last token (the
    newest 16; `RecurrentCache`)."""
    from .models.cache import RecurrentCache

    return 2 + min(RecurrentCache.max_checkpoints, math.ceil(max(context - 1, 0) / prefill_step))


def tensor_bytes(t: Tensor, bits: int, group_size: int, dtype_bytes: int) -> int:
    """Bytes of one module's tensors: packed uint32 weight + scales + biases, or plain weight."""
    n = math.prod(t.shape)
    if not t.quantizable or bits == 0:
        return n * dtype_bytes
    rows, cols = n // t.shape[-1], t.shape[-1]
    return rows * (cols * bits // 32) * 4 + 2 * rows * (cols // group_size) * dtype_bytes


def kv_bytes_per_token(config: dict[str, Any] | str, dtype_bytes: int = 2, kv_bits: int | None = None,
                       kv_group_size: int = 64) -> int:
    """Bytes of keys and values one position occupies across all attention layers (quantized to `kv_bits`:
    packed values plus a scale and a bias of `dtype_bytes` per group of `kv_group_size`), and qwen4_exp's
    indexer keys."""
    a = _args(config)
    KV, hd = a.num_key_value_heads, a.head_dim
    row = hd * dtype_bytes if kv_bits is None else hd * kv_bits // 8 + 2 * (hd // kv_group_size) * dtype_bytes
    return 2 * layer_kinds(config).count("full_attention") * KV * row + index_bytes_per_token(config, dtype_bytes)


def tensor_costs(c: dict[str, Any], spec: QuantSpec, unquantized: bool = False, dtype_bytes: int = 2):
    """(tensor, bits, bytes, bytes read per decoded token) of every weight-bearing module of config `c` under
    `spec` (every tensor in float when `unquantized`)."""
    a = _args(c)
    L, tied = a.num_hidden_layers, bool(a.tie_word_embeddings)
    E, k = getattr(a, "num_experts", 0) or 0, getattr(a, "num_experts_per_tok", 0)
    for t in model_tensors(c):
        table = is_disk_table(t.path)
        b = 0 if (unquantized or not t.quantizable or table) else spec.layer_bits(t.path, L, tied, t.shape[-1])
        n = tensor_bytes(t, b, spec.group_size, dtype_bytes)
        if table:
            read = a.ple_embed_dim * dtype_bytes  # one row per n-gram head a token
        elif t.path == "model.embed_tokens" and not tied:
            read = 0  # one row per token; lm_head is read in full instead
        else:
            read = n * k // E if ".switch_mlp." in t.path else n
        yield t, b, n, read


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
    active_bytes: int  # bytes read per decoded token (weights touched + KV + live recurrent state)
    state_bytes: int = 0  # linear-attention layers' states with their checkpoints (`state_copies`), any context
    disk_bytes: int = 0  # exported tensors read by row from their file, not resident (qwen4_exp's n-gram tables)

    @property
    def overhead(self) -> int:
        return self.activation_bytes + self.runtime_bytes

    @property
    def peak_mlx_bytes(self) -> int:
        """What `mx.get_peak_memory()` should report during generation."""
        return self.weight_bytes + self.kv_bytes + self.state_bytes + self.activation_bytes

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.state_bytes + self.overhead

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
    tables_resident: bool = False,
) -> Fit:
    """Memory prediction for `config` (a config dict or registry name) at `bits`/`group_size` or a `spec`.

    `dtype_bytes` is the size of scales, unquantized tensors, KV cache and activations (2 for bf16 on Apple
    GPUs, 4 for float32 on MLX's CPU backend). `bits=16` (or 0) means unquantized. `fused_attention`: the
    attention kernel never materialises the [heads, chunk, context] score matrix (MLX's Metal kernels and
    our CPU kernels; false for MLX's own CPU attention, which holds it in float32). `kv_bits`: a quantized KV
    cache (4 or 8 bits, groups of `kv_group_size`). qwen4_exp's n-gram tables count as `disk_bytes` (the loader
    reads them by row from the file), or as weights with `tables_resident`.
    """
    c = _cfg(config)
    a = _args(c)
    name = name or (config if isinstance(config, str) else c.get("_name_or_path") or c.get("model_type"))
    unquantized = spec is None and bits in (0, 16)
    spec = spec or QuantSpec(bits=4 if unquantized else bits, group_size=group_size, recipe=recipe)
    E, k = getattr(a, "num_experts", 0) or 0, getattr(a, "num_experts_per_tok", 0)
    weight = active = disk = 0
    for t, b, n, read in tensor_costs(c, spec, unquantized, dtype_bytes):
        if is_disk_table(t.path) and not tables_resident:
            disk += n + _header_bytes(t.path, False)
        else:
            weight += n + _header_bytes(t.path, b > 0)
        active += read
    weight += 8 + 8  # per-shard length prefix and metadata, one shard
    D, H, KV, hd = a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim
    kinds = layer_kinds(c)
    La = kinds.count("full_attention")
    positions = math.ceil(context / KV_STEP) * KV_STEP
    index = index_bytes_per_token(c, dtype_bytes)
    kv_row = (kv_bytes_per_token(c, dtype_bytes, kv_bits, kv_group_size) - index) // (2 * La * KV)  # a head, a position
    kv = (2 * La * KV * kv_row + index) * positions
    if index:  # the indexer's keys of finished blocks, kept in steps of 64 blocks
        kv += La * math.ceil(context // a.indexer_compress_ratio / 64) * 64 * a.indexer_head_dim * dtype_bytes
    live_state = state_bytes_per_layer(c, dtype_bytes) * kinds.count("linear_attention") + ple_state_bytes(c, dtype_bytes)
    state = live_state * state_copies(context, prefill_step)
    chunk = min(prefill_step, context)
    # Largest score matrix of the chunked prefill: chunk length x keys cached so far, over all chunks.
    score_cells = max(
        min(prefill_step, context - s) * min(s + prefill_step, context) for s in range(0, context, prefill_step)
    )
    inter = a.moe_intermediate_size * k if E else a.intermediate_size
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
    logits = a.vocab_size * 4 * 2  # last-position logits in float32 for sampling
    streams = getattr(a, "hc_count", 1)  # qwen4_exp's residual is hc_count streams of D
    activation = chunk * D * streams * dtype_bytes + max(attention_half, mlp_half, logits)
    # Per token the live state is read and written once, like the KV cache.
    return Fit(str(name), spec, context, weight, kv, activation, runtime_bytes, active + kv + live_state, state,
               disk)


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


def split_layers(layer_bytes: list[int], capacities: list[float], first_bytes: int = 0) -> list[int]:
    """Layers per host for a pipeline: contiguous blocks in host order, each host at least one layer, chosen so
    the fullest host (its bytes over its capacity) is as empty as possible. Host 0 also holds `first_bytes`
    (embedding, final norm and head). The planner (`plan_hosts`) and the runtime (under `mlx.launch`) both
    split with this, from predicted and from on-disk bytes."""
    n, L = len(capacities), len(layer_bytes)
    if n < 1 or L < n:
        raise Qwen3MLXError(f"cannot split {L} layers over {n} hosts (each host needs at least one layer)")

    def assign(t: float) -> list[int] | None:
        counts, i = [], 0
        for h, cap in enumerate(capacities):
            load, take = (first_bytes if h == 0 else 0), 0
            if h == n - 1:
                take, load = L - i, load + sum(layer_bytes[i:])
            else:
                while i + take < L - (n - h - 1) and (take == 0 or load + layer_bytes[i + take] <= t * cap):
                    load += layer_bytes[i + take]
                    take += 1
            if load > t * cap:
                return None
            counts.append(take)
            i += take
        return counts

    lo, hi = 0.0, max((first_bytes + sum(layer_bytes)) / min(capacities), 1e-9) * 2
    best = assign(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        got = assign(mid)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
    return best


@dataclass(frozen=True)
class HostShare:
    device: Device
    layers: tuple[int, int]  # [start, end)
    weight_bytes: int
    kv_bytes: int  # the KV caches and recurrent states of its layers
    overhead_bytes: int
    active_bytes: int  # read per decoded token

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.total <= self.device.usable_bytes


@dataclass(frozen=True)
class HostPlan:
    shares: list[HostShare]
    hop_ms: float

    @property
    def token_ms(self) -> float:
        """Per decoded token: each host reads its bytes in turn, plus one hop per host around the ring."""
        compute = sum(s.active_bytes / (s.device.bandwidth_gbs * GB) for s in self.shares) * 1e3
        return compute + len(self.shares) * self.hop_ms

    @property
    def tokens_per_s(self) -> float:
        return 1e3 / self.token_ms


# Per-hop cost of a decode step's activations (a few KB) between two Macs: the ring backend over Thunderbolt
# (TCP over the Thunderbolt bridge) is ~0.2 ms a hop; loopback on this 2-core Linux box measured 0.42 ms.
HOP_MS = 0.2


def layer_tensor_bytes(config: dict[str, Any] | str, bits: int = 4, group_size: int = 64,
                       dtype_bytes: int = 2) -> tuple[list[int], list[int], int, int]:
    """(weight bytes per layer, bytes read per token per layer, bytes outside the layers, of which read per
    token) at a uniform precision (`bits` 16 or 0: unquantized)."""
    c = _cfg(config)
    spec = QuantSpec(bits=4 if bits in (0, 16) else bits, group_size=group_size)
    L = _args(c).num_hidden_layers
    layers, active = [0] * L, [0] * L
    other = other_active = 0
    for t, _, n, read in tensor_costs(c, spec, bits in (0, 16), dtype_bytes):
        m = t.path.split(".")
        if len(m) > 2 and m[1] == "layers":
            layers[int(m[2])] += n
            active[int(m[2])] += read
        else:
            other += n
            other_active += read
    return layers, active, other, other_active


def plan_hosts(config: dict[str, Any] | str, hosts: list[Device | str], bits: int = 4, group_size: int = 64,
               context: int = 4096, *, kv_bits: int | None = None, dtype_bytes: int = 2,
               hop_ms: float = HOP_MS) -> HostPlan:
    """The pipeline split of `config` over `hosts` (in ring order; host 0 holds embedding and head) by memory,
    each host's memory, and the decode bound with the per-token hop cost."""
    devices = [get_device(h) if isinstance(h, str) else h for h in hosts]
    c = _cfg(config)
    layers, active, other, other_active = layer_tensor_bytes(c, bits, group_size, dtype_bytes)
    whole = predict(c, bits, group_size, context, dtype_bytes=dtype_bytes, kv_bits=kv_bits)
    kinds = layer_kinds(c)
    # Each layer's cache: its share of the KV cache, or its state with the checkpoints; and what a token reads.
    kv_layer = whole.kv_bytes // kinds.count("full_attention")
    state_layer = state_bytes_per_layer(c, dtype_bytes)
    cache = [kv_layer if k == "full_attention" else state_layer * state_copies(context) for k in kinds]
    cache_read = [kv_layer if k == "full_attention" else state_layer for k in kinds]
    overhead = whole.overhead
    capacities = [max(d.usable_bytes - overhead, 1) for d in devices]
    counts = split_layers([b + m for b, m in zip(layers, cache)], capacities, other)
    shares, start = [], 0
    for h, (d, n) in enumerate(zip(devices, counts)):
        end = start + n
        w = sum(layers[start:end]) + (other if h == 0 else 0)
        a = sum(active[start:end]) + (other_active if h == 0 else 0) + sum(cache_read[start:end])
        shares.append(HostShare(d, (start, end), w, sum(cache[start:end]), overhead, a))
        start = end
    return HostPlan(shares, hop_ms)
