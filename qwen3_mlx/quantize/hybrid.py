"""Quantized MLX exports of the hybrid models (Qwen3-Next, Qwen3.5 / 3.6) in the layout mlx-lm 0.32 loads.

Like `convert`, the export is planned from a lazily built model and written module by module into shards, so
memory stays bounded: here by the largest source tensor (a layer's stacked experts of one projection, or the
embedding), because the model's own `sanitize` (renames, conv transposes, folded norms, stacked experts) runs
on lazily loaded tensors and each is read whole once. Kept in float, as mlx-lm keeps them: the causal conv
weights, `A_log` (float32), `dt_bias` and the norms (zero-centred ones with their 1 folded in). MoE routers and
shared-expert gates are 8-bit (`QuantSpec.router_bits`), mlx-lm's choice. Qwen3.5 / 3.6 exports use
mlx-lm's vision-language layout (`model_type` qwen3_5 / qwen3_5_moe with `text_config`, tensors under
`language_model.`), the one its `qwen3_5` models read; Qwen3-Next keeps its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..loader import check_weights, load_config, load_weights, resolve_model_path, weight_files
from ..models import build_model
from .core import float_note, quantize_model
from .convert import CHUNK_BYTES, Unit, _layer_key, _refuse_overlap, _split, resolve_dtype, write_folder
from .recipes import QuantizeError, QuantSpec
from .safetensors_io import OutTensor, ShardWriter, parse_size, scan

# model_type -> the mlx-lm module that runs it (None: none does; the export keeps the source's text layout)
MLX_LM_MODULE = {"qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5", "qwen3_5_moe": "qwen3_5_moe",
                 "qwen3_5_moe_text": "qwen3_5_moe", "qwen3_next": "qwen3_next", "qwen4_exp": None,
                 "qwen4_exp_text": None}
HYBRID_TYPES = tuple(MLX_LM_MODULE)


def export_hybrid(src: str | os.PathLike, out: str | os.PathLike, spec: QuantSpec | None = None, *,
                  dtype: str | mx.Dtype | None = None, force: bool = False, log=None, progress=None,
                  max_shard_size: str | int = "5GB", allow_incompatible: bool = False) -> Path:
    """Quantize the hybrid checkpoint `src` (HF or VL layout) into the MLX folder `out`, in bounded memory;
    returns `out`. `dtype`: of scales and float tensors (default: the source's). `progress(done, total)` gets
    output bytes written. `allow_incompatible`: write a model mlx-lm and MLX Swift would mis-build
    (`loader_compatibility`), marked as qwen3-mlx's only."""
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
    model = build_model(config)  # lazy: the plan of every output tensor, nothing materialised
    marker = loader_compatibility(config, allow_incompatible) if MLX_LM_MODULE[config["model_type"]] else \
        {"qwen3_mlx_only": f"mlx-lm and MLX Swift do not implement {config['model_type']}"}
    # Every source tensor as ours (sanitize's renames, conv transposes, folded norms, stacked experts): still
    # lazy, each read from disk only when its turn comes.
    lazy, tables = load_weights(source), []
    if hasattr(model, "rows_on_disk"):
        # qwen4_exp's n-gram tables: copied part by part in the source's float dtype (read a few rows a token,
        # from disk at run time, so their size costs disk, not memory; the hash constants are copied as they are)
        kept = model.rows_on_disk(lazy, scan(weight_files(source)), mx.float32)
        tables = [k for k in lazy if k not in kept]
        lazy = kept
    # No other name may hold the source dict: `_write_module` frees each tensor by popping it from `lazy`.
    lazy = model.sanitize(lazy)
    check_weights(model, lazy)
    dtype = resolve_dtype(dtype) if dtype is not None else _source_dtype(lazy)
    vl = mlx_lm_layout(config, {})[1]
    ungrouped: list[str] = []
    # routers and shared-expert gates at 8 bits, as mlx-lm keeps them
    quantization = {k if k in ("group_size", "bits", "mode") else mlx_lm_name(k, vl): v
                    for k, v in quantize_model(model, spec=spec, ungrouped=ungrouped).items()}
    if log and ungrouped:
        log(float_note([mlx_lm_name(p, vl) for p in ungrouped], spec.group_size))
    if log and marker:
        log(f"warning: {out.name} loads in qwen3-mlx only: {marker['qwen3_mlx_only']}")
    ordered = _units(model, dtype, vl) + _table_units(tables, source, lazy)
    total, done = sum(u.nbytes for u in ordered), 0

    def write(unit: Unit, writer: ShardWriter) -> None:
        nonlocal done
        _write_module(unit, lazy, writer)
        done += unit.nbytes
        if progress:
            progress(done, total)

    write_folder(source, out, _split(ordered, parse_size(max_shard_size)), write,
                 {**mlx_lm_layout(config, quantization)[0], **marker}, log)
    return out


def _units(model: nn.Module, dtype: mx.Dtype, vl: bool) -> list[Unit]:
    """The quantized model's modules as output units in model order, tensors under mlx-lm's names."""
    modules = dict(model.named_modules())
    units: dict[str, Unit] = {}
    for name, p in tree_flatten(model.parameters()):
        path, param = name.rsplit(".", 1)
        # scales, biases, norms, conv and dt_bias in the source's dtype; A_log float32 (mlx-lm keeps it so)
        out_dtype = p.dtype if p.dtype in (mx.uint32, mx.int64) else mx.float32 if param == "A_log" else dtype
        unit = units.setdefault(path, Unit(path, [], [], getattr(modules[path], "bits", 0),
                                           getattr(modules[path], "group_size", 0)))
        unit.outputs.append(OutTensor(mlx_lm_name(name, vl), out_dtype, tuple(p.shape)))
    return [units[k] for k in sorted(units, key=_layer_key)]


def _table_units(keys: list[str], source: Path, lazy: dict[str, mx.array]) -> list[Unit]:
    """One unit per part of the n-gram tables (`keys`: the source's names), under our text layout's names, in
    the source's dtype; each part is read whole when written (HF splits a table in 512)."""
    if not keys:
        return []
    weights = load_weights(source)
    units = []
    for key in keys:
        name = "model." + key[key.index("layers.") :]
        lazy[name] = weights[key]
        dtype = weights[key].dtype
        units.append(Unit(name.rsplit(".", 1)[0], [], [OutTensor(name, dtype, tuple(weights[key].shape))], 0, 0))
    return units


def attention_interval(layer_types: list[str]) -> int | None:
    """The `full_attention_interval` n that gives `layer_types` (layer i full attention exactly when (i + 1) % n
    is 0), or None when no n does."""
    for n in range(1, len(layer_types) + 1):
        if all((t == "full_attention") == ((i + 1) % n == 0) for i, t in enumerate(layer_types)):
            return n
    return None


def loader_compatibility(config: dict, allow_incompatible: bool) -> dict:
    """What an export of `config` adds to its config.json for the loaders it cannot serve. mlx-lm and MLX Swift
    build the layer kinds from `full_attention_interval` alone, ignoring `layer_types`; `mlx_lm_layout` writes the
    interval that gives them. When none does, a QuantizeError, unless `allow_incompatible`: then a marker."""
    kinds = (config.get("text_config") or config).get("layer_types")
    if not kinds or attention_interval(kinds) is not None:
        return {}
    full = [i for i, t in enumerate(kinds) if t == "full_attention"]
    why = (f"its layer_types (full attention at layers {full} of {len(kinds)}) follow no full_attention_interval, "
           "from which mlx-lm and MLX Swift build the layer kinds: both would mis-build it")
    if not allow_incompatible:
        raise QuantizeError(f"cannot export a model mlx-lm and MLX Swift load: {why}; --allow-incompatible writes "
                            "it anyway, for qwen3-mlx only")
    return {"qwen3_mlx_only": why}


def _write_module(unit: Unit, lazy: dict[str, mx.array], writer: ShardWriter) -> None:
    """One module's output tensors. A quantized module's source weight is read once (then dropped from `lazy`)
    and quantized a row block at a time, stacked experts as rows of one matrix; anything else is cast."""
    outs = {t.name.rsplit(".", 1)[1]: t for t in unit.outputs}  # `t.name` is mlx-lm's; `lazy` has ours
    for param, t in outs.items():
        if param not in ("weight", "scales", "biases") or not unit.bits:
            x = lazy.pop(f"{unit.path}.{param}").astype(t.dtype)
            mx.eval(x)
            writer.write(t.name, 0, x)
    if not unit.bits:
        return
    w = lazy.pop(f"{unit.path}.weight")
    mx.eval(w)  # the source tensor in its own dtype: the largest one bounds the export's memory
    rows = w.reshape(-1, w.shape[-1])  # [experts * out, in]: quantization groups run along the last axis
    step = max(1, CHUNK_BYTES // (4 * rows.shape[-1]))
    for r0 in range(0, rows.shape[0], step):
        x = rows[r0 : r0 + step].astype(mx.float32)
        q, scales, biases = mx.quantize(x, unit.group_size, unit.bits)
        pieces = {"weight": q, "scales": scales.astype(outs["scales"].dtype), "biases": biases.astype(outs["biases"].dtype)}
        mx.eval(list(pieces.values()))
        for param, piece in pieces.items():
            writer.write(outs[param].name, r0 * (piece.nbytes // x.shape[0]), piece)


def _source_dtype(weights: dict[str, mx.array]) -> mx.Dtype:
    """The floating dtype holding most of the source's bytes (what scales and float tensors are written in)."""
    counts: dict = {}
    for w in weights.values():
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
    if text.get("layer_types") and (n := attention_interval(text["layer_types"])):
        text["full_attention_interval"] = n  # mlx-lm and MLX Swift build the layer kinds from it alone
    # Swift reads it from the text config, and takes a missing one as false
    text["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    rope = text.get("rope_parameters") or {}
    for key in ("rope_theta", "partial_rotary_factor"):  # transformers 5 nests them; mlx-lm reads them flat
        if key not in text and key in rope:
            text[key] = rope[key]
    quant = {"quantization": quantization, "quantization_config": dict(quantization)} if quantization else {}
    module = MLX_LM_MODULE[config["model_type"]]
    if module in ("qwen3_next", None):
        return {**text, **quant}, False
    top = {k: v for k, v in config.items()
           if "text_config" in config and k not in ("text_config", "vision_config", "quantization", "quantization_config")}
    text["model_type"] = module + "_text"
    return {**top, "model_type": module, "text_config": text, "tie_word_embeddings": text["tie_word_embeddings"],
            **quant}, True
