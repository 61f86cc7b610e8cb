"""In-memory affine quantization of a loaded model, producing the same `quantization` dict an export carries."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from .recipes import ROUTER_BITS, QuantizeError, QuantSpec

__all__ = ["ROUTER_BITS", "float_note", "quantize_model", "quantization_dict"]


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 64,
    mode: str = "affine",
    *,
    spec: QuantSpec | None = None,
    recipe: str = "uniform",
    embed_bits: int | None = None,
    lm_head_bits: int | None = None,
    router_bits: int = ROUTER_BITS,
    ungrouped: list[str] | None = None,
) -> dict[str, Any]:
    """Quantize `model` in place; return the config.json `quantization` dict describing it.

    Either pass a `QuantSpec` or its fields (bits, group_size, recipe, ...). Every layer that differs from the
    default is listed in the dict (MLX Swift does not infer bits from tensor shapes). A layer whose input width
    the group size does not divide is a QuantizeError, unless `ungrouped` is a list: then, as in an export, it
    stays in float (listed `false`) and its path is appended.
    """
    spec = spec or QuantSpec(bits, group_size, recipe, embed_bits, lm_head_bits, router_bits, mode)
    quantization: dict[str, Any] = spec.defaults()
    num_layers = len(model.layers)
    tied = bool(getattr(model.args, "tie_word_embeddings", False))

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or getattr(module, "keep_float", False):
            return False
        decision = spec.layer(path, num_layers, tied)
        if decision is not False and (in_dims := module.weight.shape[-1]) % spec.group_size:
            if ungrouped is None:
                raise QuantizeError(f"group size {spec.group_size} does not divide the input dimension {in_dims} of "
                                    f"{path}; choose a group size among 32, 64, 128 that divides it")
            ungrouped.append(path)
            decision = False
        if decision is not True:
            quantization[path] = decision
        return decision

    nn.quantize(model, group_size=spec.group_size, bits=spec.default_bits, mode=spec.mode, class_predicate=predicate)
    return _ordered(quantization)


def quantization_dict(model: nn.Module, spec: QuantSpec) -> dict[str, Any]:
    """The `quantization` dict an export of `model` under `spec` carries, without touching `model`."""
    quantization: dict[str, Any] = spec.defaults()
    num_layers = len(model.layers)
    tied = bool(getattr(model.args, "tie_word_embeddings", False))
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized"):
            decision = spec.layer(path, num_layers, tied, module.weight.shape[-1])
            if decision is not True:
                quantization[path] = decision
    return _ordered(quantization)


def _ordered(quantization: dict[str, Any]) -> dict[str, Any]:
    """The defaults, then the per-layer entries by path (a stable config.json)."""
    return dict(sorted(quantization.items(), key=lambda kv: (kv[0] not in ("group_size", "bits", "mode"), kv[0])))


def float_note(paths: list[str], group_size: int) -> str:
    """The line an export prints about the layers `quantize_model` left in float for want of whole groups."""
    return (f"{len(paths)} layer(s) stay in float (listed false in the quantization dict): group size {group_size} "
            f"does not divide their input width, e.g. {paths[0]}")
