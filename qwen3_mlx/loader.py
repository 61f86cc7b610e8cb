"""Loading Qwen3 checkpoints: HF folders or repo ids, bf16/fp16/fp32 safetensors, and our quantized MLX exports."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import ModelLoadError
from .models import build_model

WEIGHT_INDEX = "model.safetensors.index.json"
# Files a model needs; everything else in a hub repo (README, original/ weights, ...) is skipped.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]
_FLOAT_DTYPES = {mx.float32, mx.float16, mx.bfloat16}


def default_dtype() -> mx.Dtype:
    """float32 on MLX's CPU backend (half precision is emulated there, 30x slower); bfloat16 on a GPU."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def cpu_bf16_weights(model: nn.Module) -> set[str]:
    """Float matmul weights a bfloat16 checkpoint keeps in bfloat16 on the CPU.

    Our CPU kernels widen bfloat16 weights to float32 in registers, so Linear and Embedding weights need
    not be upcast: half the memory and half the bytes per decoded token, computed in float32 all the same
    (measured on the Qwen3-0.6B shape: decode 135 -> 81 ms a token, prefill 1.7 -> 1.2 s for 128 tokens).
    MoE expert stacks too (our expert gather widens them the same way). Everything else (norms) becomes
    float32. Empty where the kernels do not run.
    """
    from . import kernels
    from .models.layers import Embedding, Linear
    from .models.switch import SwitchLinear

    if not kernels.active():
        return set()
    return {f"{name}.weight" for name, m in model.named_modules() if type(m) in (Linear, Embedding, SwitchLinear)}


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/"))


def resolve_model_path(path_or_repo: str | os.PathLike) -> Path:
    """A local model folder, or a Hugging Face repo id resolved through huggingface_hub's cache."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; expected a model folder with config.json")
        return path
    name = str(path_or_repo)
    if not _looks_like_repo_id(name):
        raise ModelLoadError(f"no such model folder: {path}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise ModelLoadError(
            f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "download it on a connected machine or pass a local folder"
        )
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelLoadError(f"cannot download {name}: {e.__class__.__name__} (check the repo id and access)") from None
    except Exception as e:  # network failures come in many types (OSError, httpx, requests)
        raise ModelLoadError(
            f"{name} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({e.__class__.__name__}); download it on a connected machine or pass a local folder"
        ) from None


def load_config(model_path: Path) -> dict[str, Any]:
    """config.json as a dict (quantization settings included)."""
    file = model_path / "config.json"
    if not file.is_file():
        raise ModelLoadError(f"{model_path} has no config.json")
    return read_config_file(file)


def read_config_file(file: Path) -> dict[str, Any]:
    """A config.json file as a dict, with one clear error for invalid JSON."""
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{file} does not hold a JSON object")
    return config


def weight_files(model_path: Path) -> list[Path]:
    """The safetensors files of a model folder, from the shard index when there is one."""
    index = model_path / WEIGHT_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelLoadError(f"{index} is not a valid shard index (no 'weight_map')") from None
        files = [model_path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"missing shard {f.name} (listed in {WEIGHT_INDEX})")
        return files
    single = model_path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {model_path}")
    return files


def read_safetensors_header(file: Path) -> dict[str, Any]:
    """Parse and validate a safetensors header without reading the data; catches truncated or foreign files."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{file.name} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise ModelLoadError(f"{file.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{file.name} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file.name} is not a safetensors file")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        raise ModelLoadError(f"{file.name} is not a safetensors file (malformed header)") from None
    if 8 + n + end > size:
        raise ModelLoadError(
            f"{file.name} is truncated: its header describes {8 + n + end:,} bytes but the file has {size:,}"
        )
    return header


def load_weights(model_path: Path) -> dict[str, mx.array]:
    """All tensors of a folder, lazily (nothing is read until evaluated)."""
    weights: dict[str, mx.array] = {}
    for f in weight_files(model_path):
        read_safetensors_header(f)
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise ModelLoadError(f"cannot read {f.name}: {e}") from None
    return weights


def quantization_predicate(quantization: dict[str, Any], weights: dict[str, mx.array]):
    """nn.quantize predicate for an MLX `quantization` dict: per-layer dicts or `false`, else the default.

    A layer is quantized only when the checkpoint holds its `.scales`, so mixed exports load as written.
    """

    def predicate(path: str, module: nn.Module):
        key = path if path in quantization else f"language_model.{path}"  # mlx-lm's vision-language exports
        if key in quantization:
            value = quantization[key]
            if isinstance(value, dict):
                return {k: v for k, v in value.items() if k in ("group_size", "bits", "mode")}
            return bool(value)
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    return predicate


def apply_quantization(model: nn.Module, quantization: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Swap the model's layers for quantized ones as the config and checkpoint describe."""
    nn.quantize(
        model,
        group_size=quantization.get("group_size", 64),
        bits=quantization.get("bits", 4),
        mode=quantization.get("mode", "affine"),
        class_predicate=quantization_predicate(quantization, weights),
    )


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Strict name and shape check with messages that name the tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"missing tensor {missing[0]} in the checkpoint{more}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ModelLoadError(f"unexpected tensor {extra[0]} in the checkpoint{more}")
    for name, param in expected.items():
        w = weights[name]
        if tuple(w.shape) != tuple(param.shape):
            raise ModelLoadError(
                f"tensor {name} has shape {tuple(w.shape)}, expected {tuple(param.shape)} from config.json"
            )
        if w.dtype not in _FLOAT_DTYPES and w.dtype != param.dtype:
            raise ModelLoadError(f"tensor {name} has unsupported dtype {w.dtype}")


def load_model(
    path_or_repo: str | os.PathLike, dtype: mx.Dtype | None = None, lazy: bool = False, shard=None
) -> tuple[nn.Module, dict[str, Any]]:
    """Model and its config from a folder or repo id. Floating tensors are cast to `dtype`
    (default: `default_dtype()`, except that on the CPU a bfloat16 checkpoint's matmul weights stay
    bfloat16, see `cpu_bf16_weights`); quantized tensors stay packed.

    `shard(model, weights)`, for a model run across machines: narrows the built model to this process's part
    and returns the (sanitized) tensors that part keeps, renamed or sliced to its parameters. Tensors it
    leaves out are never read from disk."""
    model_path = resolve_model_path(path_or_repo)
    config = load_config(model_path)
    keep_bf16 = dtype is None
    dtype = dtype or default_dtype()
    model = build_model(config)
    weights = load_weights(model_path)
    if hasattr(model, "rows_on_disk"):  # tables read by row from their files, never loaded whole (qwen4_exp)
        from .quantize.safetensors_io import scan

        weights = model.rows_on_disk(weights, scan(weight_files(model_path)), dtype)
    weights = model.sanitize(weights)
    if shard is not None:
        weights = shard(model, weights)
    quantization = config.get("quantization") or config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method")
        if method is not None or "bits" not in quantization:
            # Qwen's own -AWQ / -GPTQ / -FP8 repos: transformers formats, not MLX affine shards.
            raise ModelLoadError(
                f"{model_path.name} is quantized as {method or 'an unknown format'}, which qwen3-mlx cannot load; "
                "use the bf16 checkpoint (qwen3-mlx quantize makes MLX 4/8-bit shards from it)"
            )
        apply_quantization(model, quantization, weights)
    check_weights(model, weights)
    keep = cpu_bf16_weights(model) if keep_bf16 and dtype == mx.float32 else set()
    weights = {
        k: v if (k in keep and v.dtype == mx.bfloat16) else v.astype(dtype) if v.dtype in _FLOAT_DTYPES else v
        for k, v in weights.items()
    }
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    model.model_path = model_path
    return model, config


def load(path_or_repo: str | os.PathLike, dtype: mx.Dtype | None = None, lazy: bool = False):
    """Load a Qwen3 model and its tokenizer.

    `path_or_repo` is a local folder or a Hugging Face repo id (e.g. "Qwen/Qwen3-0.6B"), resolved through the
    huggingface_hub cache. Returns `(model, tokenizer)`.
    """
    from .tokenizer import load_tokenizer

    model, _ = load_model(path_or_repo, dtype=dtype, lazy=lazy)
    return model, load_tokenizer(model.model_path)
