"""In-memory affine quantization of a loaded model, producing the same `quantization` dict an export carries."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

# The MoE router picks experts; 4-bit rounding there changes which experts run, so it gets 8 bits.
ROUTER_BITS = 8


def _is_router(path: str) -> bool:
    return path.endswith("mlp.gate")


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64, mode: str = "affine") -> dict[str, Any]:
    """Quantize `model` in place; return the config.json `quantization` dict describing it."""
    quantization: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": mode}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        if _is_router(path) and bits < ROUTER_BITS:
            override = {"group_size": group_size, "bits": ROUTER_BITS}
            quantization[path] = override
            return {**override, "mode": mode}
        return True

    nn.quantize(model, group_size=group_size, bits=bits, mode=mode, class_predicate=predicate)
    return quantization
