"""The reference: the same weights in mlx-lm's own qwen3 / qwen3_moe models, generated with mlx-lm's own loop.

mlx-lm is an optional (test-only) dependency, imported lazily.
"""

from __future__ import annotations

from importlib import import_module
from types import SimpleNamespace
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .models import BenchError


def _import_mlx_lm() -> SimpleNamespace:
    # `mlx_lm.generate` is shadowed by the function of that name in mlx_lm/__init__: import modules by path.
    try:
        mods = {name: import_module(f"mlx_lm.{name}") for name in ("generate", "sample_utils")}
        mods["qwen3"] = import_module("mlx_lm.models.qwen3")
        mods["qwen3_moe"] = import_module("mlx_lm.models.qwen3_moe")
        for name in ("qwen3_5", "qwen3_5_moe", "qwen3_next"):
            mods[name] = import_module(f"mlx_lm.models.{name}")
    except ImportError as e:
        raise BenchError(f"--vs mlx-lm needs the mlx-lm package (pip install mlx-lm): {e}") from None
    return SimpleNamespace(**mods)


def mlx_lm_twin(model: nn.Module) -> nn.Module:
    """mlx-lm's model for `model`'s config holding the very same parameter arrays (shared, not copied).

    Quantized layers are converted the way the model describes (`model.quantization`), so both run the
    same kernels on the same packed weights.
    """
    mlx_lm = _import_mlx_lm()
    from ..loader import quantization_predicate

    args = model.args.to_dict()
    params = dict(tree_flatten(model.parameters()))
    if args["model_type"] in ("qwen3", "qwen3_moe"):
        arch = getattr(mlx_lm, args["model_type"])
        if args.get("attention_bias"):
            raise BenchError("mlx-lm's qwen3 model has no attention bias; cannot compare this config")
    else:  # the hybrids, in the layout our exports write for mlx-lm (its qwen3_5 models read the VL one)
        from ..quantize.hybrid import MLX_LM_MODULE, mlx_lm_layout, mlx_lm_name

        arch = getattr(mlx_lm, MLX_LM_MODULE[args["model_type"]])
        args, vl = mlx_lm_layout(args, {})
        params = {mlx_lm_name(k, vl): v for k, v in params.items()}
    twin = arch.Model(arch.ModelArgs.from_dict(args))
    quantization = getattr(model, "quantization", None)
    if quantization and "bits" in quantization:
        nn.quantize(
            twin,
            group_size=quantization.get("group_size", 64),
            bits=quantization["bits"],
            mode=quantization.get("mode", "affine"),
            class_predicate=quantization_predicate(quantization, params),
        )
    twin.load_weights(list(params.items()), strict=True)
    twin.eval()
    return twin


def mlx_lm_tokens(model: nn.Module, prompt: list[int], max_tokens: int, prefill_step_size: int,
                  kv_bits: int | None = None, kv_group_size: int = 64) -> Iterator[int]:
    """Greedy tokens from mlx-lm's generate_step (the loop under its stream_generate), eos ignored; with
    `kv_bits`, its own quantized KV cache from the first token."""
    mlx_lm = _import_mlx_lm()
    kv = {} if kv_bits is None else {"kv_bits": kv_bits, "kv_group_size": kv_group_size, "quantized_kv_start": 0}
    for token, _ in mlx_lm.generate.generate_step(
        mx.array(prompt),
        model,
        max_tokens=max_tokens,
        sampler=mlx_lm.sample_utils.make_sampler(0.0),
        prefill_step_size=prefill_step_size,
        **kv,
    ):
        yield token
