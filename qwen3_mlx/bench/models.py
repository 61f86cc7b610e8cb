"""Models to benchmark: random weights of a registry shape or config.json, or a real checkpoint; and their sizes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import Qwen3MLXError
from ..loader import read_config_file
from ..models.registry import SHAPES, random_model, shape_config


class BenchError(Qwen3MLXError):
    """A benchmark that cannot run as asked (unknown shape, does not fit, missing optional dependency)."""


def resolve_shape(shape: str) -> tuple[str, dict]:
    """(name, config dict) for a registry shape name or a path to a config.json (or a folder holding one)."""
    path = Path(shape).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise BenchError(f"no such config file: {path}")
        config = read_config_file(path)
        if "model_type" not in config:
            raise BenchError(f"{path} is not a Qwen3 config.json (no model_type)")
        return (path.stem if path.stem != "config" else path.parent.name), config
    if shape.lower().split("/")[-1] not in SHAPES:
        raise BenchError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)}, or a path to a config.json)")
    return shape.lower().split("/")[-1], shape_config(shape)


def predicted_weight_bytes(config: dict, bits: int | None, group_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of weights a model of `config` takes in memory: the fit planner's module shapes and byte counts
    (no file headers), with the exporter's per-layer bits (the MoE router stays 8-bit)."""
    from ..fit import model_tensors, tensor_bytes
    from ..quantize.recipes import QuantSpec

    spec = QuantSpec(bits=bits, group_size=group_size) if bits else None
    layers, tied = config["num_hidden_layers"], bool(config.get("tie_word_embeddings", False))
    return sum(
        tensor_bytes(t, spec.layer_bits(t.path, layers, tied) if spec and t.quantizable else 0, group_size, dtype_bytes)
        for t in model_tensors(config)
    )


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable, else total RAM)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class FitEstimate:
    """The fit planner's prediction for a benchmark run, against the memory available here."""

    weights: int
    kv_cache: int
    overhead: int
    available: int | None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available


def estimate_fit(config: dict, bits: int | None, group_size: int, context: int, kv_bits: int | None = None,
                 kv_group_size: int = 64) -> FitEstimate:
    """Memory a run needs, from the fit planner (float32 on CPU). Building random quantized weights also
    holds one layer in float32 until it is quantized."""
    from ..fit import predict

    # random weights have no file to leave qwen4_exp's n-gram tables in: they are resident
    f = predict(config, bits=bits or 16, group_size=group_size, context=context, dtype_bytes=4, kv_bits=kv_bits,
                kv_group_size=kv_group_size, tables_resident=True)
    overhead = f.overhead
    if bits is not None:
        per_layer = predicted_weight_bytes(config, None, group_size) // max(config["num_hidden_layers"], 1)
        overhead += per_layer
    return FitEstimate(f.weight_bytes, f.kv_bytes, overhead, available_memory())


def random_bench_model(config: dict, bits: int | None, group_size: int, seed: int = 0) -> nn.Module:
    """Random-weight model of `config` (see `registry.random_model`), with the benchmark's error."""
    from ..quantize.recipes import QuantizeError

    try:
        return random_model(config, seed=seed, bits=bits, group_size=group_size)
    # quantize_model checks bits / group size / divisibility first (QuantizeError); mx.quantize's own
    # ValueError is the fallback for anything it lets through.
    except (QuantizeError, ValueError) as e:
        raise BenchError(f"cannot quantize this shape to {bits} bits, group size {group_size}: {e}") from None


def weight_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def decode_read_bytes(model: nn.Module, config: dict) -> int:
    """Bytes of weights one decoded token reads: everything but the embedding table (one row), unless the
    table doubles as the output projection; for MoE only the k active experts of each expert stack."""
    tied = config.get("tie_word_embeddings", False)
    experts = config.get("num_experts") or 0
    active = config.get("num_experts_per_tok") or 0
    total = 0.0
    for path, p in tree_flatten(model.parameters()):
        n = p.nbytes
        if path.startswith("model.embed_tokens.") and not tied:
            n = n / p.shape[0]
        elif ".switch_mlp." in path and experts:
            n = n * min(active, experts) / experts
        total += n
    return int(total)


def load_bench_model(path: str, bits: int | None, group_size: int) -> tuple[nn.Module, dict[str, Any]]:
    """A real checkpoint (folder or repo id), optionally quantized in memory."""
    from ..loader import load_model
    from ..quantize import quantize_model

    model, config = load_model(path)
    already = config.get("quantization") or config.get("quantization_config")
    if bits is not None:
        if already:
            raise BenchError(f"{path} is already quantized; drop --bits")
        model.quantization = quantize_model(model, bits=bits, group_size=group_size)
        mx.eval(model.parameters())
    elif already and "bits" in already:
        model.quantization = already
    return model, config
