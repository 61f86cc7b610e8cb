"""Model architectures, one module per Hugging Face `model_type`."""

from __future__ import annotations

from types import ModuleType

from ..errors import ModelLoadError
from . import qwen3, qwen3_5, qwen3_5_moe, qwen3_moe, qwen3_next, qwen4_exp
from .cache import KVCache, make_cache, truncate_cache

MODEL_TYPES: dict[str, ModuleType] = {
    "qwen3": qwen3, "qwen3_moe": qwen3_moe, "qwen3_5": qwen3_5, "qwen3_5_text": qwen3_5,
    "qwen3_5_moe": qwen3_5_moe, "qwen3_5_moe_text": qwen3_5_moe, "qwen3_next": qwen3_next,
    "qwen4_exp": qwen4_exp, "qwen4_exp_text": qwen4_exp,
}


def get_architecture(model_type: str | None) -> ModuleType:
    """The module (with `ModelArgs` and `Model`) implementing `model_type`."""
    if not model_type:
        raise ModelLoadError("config.json has no 'model_type' (expected one of: qwen3, qwen3_moe, qwen3_5, qwen3_5_moe, qwen3_next, qwen4_exp)")
    try:
        return MODEL_TYPES[model_type]
    except KeyError:
        raise ModelLoadError(
            f"unsupported model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})"
        ) from None


def build_model(config: dict):
    """Instantiate an (uninitialised-weights) model from a config.json dict."""
    arch = get_architecture(config.get("model_type"))
    return arch.Model(arch.ModelArgs.from_dict(config))


__all__ = ["MODEL_TYPES", "KVCache", "build_model", "get_architecture", "make_cache", "truncate_cache"]
