"""Quantized MLX exports of the hybrid models (Qwen3-Next, Qwen3.5 / 3.6) in the layout mlx-lm 0.32 loads.

Unlike `convert` (which streams qwen3 / qwen3_moe tensor by tensor in bounded memory), this loads the model,
quantizes it in memory and writes it: peak memory is about the float model's. Kept in float, as mlx-lm keeps
them: the causal conv weights, `A_log` (float32), `dt_bias` and the norms (zero-centred ones with their 1
folded in). MoE routers and shared-expert gates are 8-bit (`QuantSpec.router_bits`), mlx-lm's choice. Qwen3.5 / 3.6 exports use
mlx-lm's vision-language layout (`model_type` qwen3_5 / qwen3_5_moe with `text_config`, tensors under
`language_model.`), the one its `qwen3_5` models read; Qwen3-Next keeps its own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..loader import load_config, load_model, resolve_model_path
from .recipes import QuantizeError, QuantSpec

# model_type -> the mlx-lm module that runs it
MLX_LM_MODULE = {"qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5", "qwen3_5_moe": "qwen3_5_moe",
                 "qwen3_5_moe_text": "qwen3_5_moe", "qwen3_next": "qwen3_next"}
HYBRID_TYPES = tuple(MLX_LM_MODULE)


def export_hybrid(src: str | os.PathLike, out: str | os.PathLike, spec: QuantSpec | None = None, *,
                  force: bool = False, log=None) -> Path:
    """Quantize the hybrid checkpoint `src` (HF or VL layout) into the MLX folder `out`; returns `out`."""
    from .convert import _copy_support_files, _refuse_overlap

    spec = spec or QuantSpec()
    if spec.recipe != "uniform":
        raise QuantizeError("hybrid models are exported with the uniform recipe only (for now)")
    source = resolve_model_path(src)
    config = load_config(source)
    if config.get("quantization") or config.get("quantization_config"):
        raise QuantizeError(f"{source} is already quantized; quantize from the original bf16/fp16/fp32 weights")
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise QuantizeError(f"{out} already exists (use --force to replace it)")
    _refuse_overlap(source, out)
    model, _ = load_model(source, dtype=mx.float32)
    dtype = _source_dtype(source)
    per_layer = {}
    L, tied = model.args.num_hidden_layers, bool(model.args.tie_word_embeddings)

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        q = spec.layer(path, L, tied)  # routers and shared-expert gates at 8 bits, as mlx-lm keeps them
        if isinstance(q, dict):
            per_layer[path] = {"group_size": q["group_size"], "bits": q["bits"]}
        return q

    nn.quantize(model, group_size=spec.group_size, bits=spec.bits, class_predicate=predicate)
    vl = mlx_lm_layout(config, {})[1]
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        if p.dtype != mx.uint32 and not name.endswith("A_log"):
            p = p.astype(dtype)  # scales, biases, norms, conv and dt_bias in the source's dtype; A_log float32
        weights[mlx_lm_name(name, vl)] = p
    quantization = {"group_size": spec.group_size, "bits": spec.bits, "mode": "affine",
                    **{mlx_lm_name(k, vl): v for k, v in sorted(per_layer.items())}}
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(mlx_lm_layout(config, quantization)[0], indent=2) + "\n")
        for w in _copy_support_files(source, tmp):
            if log:
                log(f"warning: {w}")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _source_dtype(source: Path) -> mx.Dtype:
    from ..loader import load_weights

    counts: dict = {}
    for w in load_weights(source).values():
        if w.dtype in (mx.float32, mx.float16, mx.bfloat16):
            counts[w.dtype] = counts.get(w.dtype, 0) + w.nbytes
    return max(counts, key=counts.get) if counts else mx.bfloat16


def mlx_lm_name(name: str, vl: bool) -> str:
    """A parameter's name in mlx-lm's layout (`vl`: under its vision-language model's `language_model.`)."""
    return f"language_model.{name}" if vl else name


def mlx_lm_layout(config: dict, quantization: dict) -> tuple[dict, bool]:
    """The config.json mlx-lm's module for this model reads, and whether its tensors sit under `language_model.`
    (qwen3_5 / qwen3_5_moe: mlx-lm runs them as vision-language models whatever the checkpoint)."""
    text = {k: v for k, v in (config.get("text_config") or config).items()
            if k not in ("quantization", "quantization_config")}
    rope = text.get("rope_parameters") or {}
    for key in ("rope_theta", "partial_rotary_factor"):  # transformers 5 nests them; mlx-lm reads them flat
        if key not in text and key in rope:
            text[key] = rope[key]
    quant = {"quantization": quantization, "quantization_config": dict(quantization)} if quantization else {}
    module = MLX_LM_MODULE[config["model_type"]]
    if module == "qwen3_next":
        return {**text, **quant}, False
    top = {k: v for k, v in config.items()
           if "text_config" in config and k not in ("text_config", "vision_config", "quantization", "quantization_config")}
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    text["model_type"] = module + "_text"
    return {**top, "model_type": module, "text_config": text, "tie_word_embeddings": bool(tied), **quant}, True


def hybrid_quality(src: str | os.PathLike, out: str | os.PathLike, max_tokens: int = 96):
    """`quality_report` for a hybrid export: both models loaded whole, next-token distributions compared."""
    import numpy as np

    from .quality import DEFAULT_TEXT, QualityReport, kl_and_top1, report_tokens

    out_cfg = load_config(Path(out))
    vocab = (out_cfg.get("text_config") or out_cfg)["vocab_size"]
    ids = mx.array(report_tokens(Path(out), vocab, DEFAULT_TEXT, max_tokens))[None]
    ref, _ = load_model(src)
    ref_logits = np.array(ref(ids)[0].astype(mx.float32))
    del ref
    q, _ = load_model(out)
    kl, top1 = kl_and_top1(ref_logits, np.array(q(ids)[0].astype(mx.float32)))
    return QualityReport(ids.shape[1], float(kl.mean()), float(kl.max()), top1)
