"""Pieces shared by the Qwen3 model files: config dataclass base, RoPE (default and YaRN), attention mask."""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..errors import ModelLoadError

# transformers 5 writes some keys under new names; real Qwen3 checkpoints use the old ones.
_KEY_ALIASES = {"num_local_experts": "num_experts"}


@dataclasses.dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls, params: dict[str, Any]):
        """Build from a config.json dict: keys verbatim, unknown keys ignored."""
        names = inspect.signature(cls).parameters
        kwargs = {}
        for key, value in params.items():
            key = _KEY_ALIASES.get(key, key) if key not in names else key
            if key in names and key not in kwargs:
                kwargs[key] = value
        required = [n for n, p in names.items() if p.default is inspect.Parameter.empty and n not in kwargs]
        if required:
            raise ModelLoadError(f"config.json lacks {', '.join(repr(n) for n in required)}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rope_settings(args) -> tuple[float, dict | None]:
    """Return (rope_theta, scaling dict or None) from either config spelling.

    Older configs: flat `rope_theta` plus `rope_scaling` ({"type"|"rope_type": ...}).
    transformers >= 5: nested `rope_parameters` holding `rope_theta` and `rope_type`.
    """
    params = getattr(args, "rope_parameters", None) or {}
    scaling = getattr(args, "rope_scaling", None) or {}
    theta = params.get("rope_theta", args.rope_theta)
    # An explicit rope_scaling wins over nested parameters: it is what users add to enable YaRN
    # (Qwen's instructions), also to configs that transformers 5 saved with rope_parameters.
    source = scaling or params
    rope_type = source.get("rope_type") or source.get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    return float(theta), {**params, **scaling, "rope_type": rope_type}


def yarn_inv_freq(
    dims: int, base: float, scaling: dict, max_position_embeddings: int
) -> tuple[mx.array, float]:
    """YaRN inverse frequencies and attention factor, following the paper (arXiv 2309.00071).

    Low-frequency dimensions (long wavelengths) are interpolated by `factor`, high-frequency ones kept,
    with a linear ramp in between; q and k are both scaled by the attention factor.
    """
    factor = scaling.get("factor")
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if factor is None:
        factor = max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        if mscale and mscale_all:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation_weight) + inv_extra * extrapolation_weight
    return inv_freq, float(attention_factor)


class RoPE(nn.Module):
    """Rotary embedding over the whole head (non-interleaved halves, like HF), optionally YaRN-scaled."""

    def __init__(self, dims: int, base: float, scaling: dict | None, max_position_embeddings: int):
        super().__init__()
        self.base = base
        self.mscale = 1.0
        self._freqs = None
        if scaling is not None:
            rope_type = scaling["rope_type"]
            if rope_type != "yarn":
                raise ModelLoadError(f"unsupported rope_scaling type {rope_type!r} (supported: default, yarn)")
            inv_freq, self.mscale = yarn_inv_freq(dims, base, scaling, max_position_embeddings)
            # mx.fast.rope takes wavelengths (1 / inv_freq), not inverse frequencies.
            self._freqs = 1.0 / inv_freq
            self.base = None
        self._inv_freq = kernels.rope_inv_freq(dims, base=self.base, freqs=self._freqs)

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return kernels.rope(x, offset=offset, inv_freq=self._inv_freq, base=self.base, freqs=self._freqs,
                            mscale=self.mscale)


def make_rope(args) -> RoPE:
    theta, scaling = rope_settings(args)
    return RoPE(args.head_dim, theta, scaling, args.max_position_embeddings)


def attention_mask(seq_len: int, cache=None):
    """Causal mask for a chunk of `seq_len` queries; MLX aligns "causal" to the cache's end. A batch of
    sequences at different lengths (cache offsets a list, decode): each row's key count after the step."""
    if isinstance(getattr(cache, "offset", None), list):
        return [o + seq_len for o in cache.offset]
    return "causal" if seq_len > 1 else None
