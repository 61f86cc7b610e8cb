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

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import ModelLoadError
from ..loader import WEIGHT_INDEX, load_config, load_weights, resolve_model_path
from ..models import build_model
from .convert import Unit
from .recipes import QuantizeError, QuantSpec
from .safetensors_io import OutTensor, ShardWriter, parse_size

# model_type -> the mlx-lm module that runs it
MLX_LM_MODULE = {"qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5", "qwen3_5_moe": "qwen3_5_moe",
                 "qwen3_5_moe_text": "qwen3_5_moe", "qwen3_next": "qwen3_next"}
HYBRID_TYPES = tuple(MLX_LM_MODULE)


def export_hybrid(src: str | os.PathLike, out: str | os.PathLike, spec: QuantSpec | None = None, *,
                  dtype: str | mx.Dtype | None = None, force: bool = False, log=None, progress=None,
                  max_shard_size: str | int = "5GB") -> Path:
    """Quantize the hybrid checkpoint `src` (HF or VL layout) into the MLX folder `out`, in bounded memory;
    returns `out`. `dtype`: of scales and float tensors (default: the source's). `progress(done, total)` gets
    output bytes written."""
    from .convert import (CHUNK_BYTES, DTYPE_NAMES, SHARD_METADATA, _copy_support_files, _layer_key,
                          _refuse_overlap, _split, shard_name)

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
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise QuantizeError(f"unsupported dtype {dtype!r} (use bfloat16, float16 or float32)")
        dtype = DTYPE_NAMES[dtype]
    dtype = dtype or _source_dtype(source)
    model = build_model(config)  # lazy: the plan of every output tensor, nothing materialised
    floats = dict(tree_flatten(model.parameters()))
    # Every source tensor as ours (sanitize's renames, conv transposes, folded norms, stacked experts): still
    # lazy, each read from disk only when its turn comes.
    lazy = model.sanitize(load_weights(source))
    missing, extra = sorted(set(floats) - set(lazy)), sorted(set(lazy) - set(floats))
    if missing or extra:
        raise ModelLoadError(f"{source}: " + (f"missing tensor {missing[0]}" if missing else f"unexpected tensor {extra[0]}")
                             + f" (and {len(missing) + len(extra) - 1} more)" * (len(missing) + len(extra) > 1))
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
    modules = dict(model.named_modules())
    units: dict[str, Unit] = {}
    for name, p in tree_flatten(model.parameters()):
        path, param = name.rsplit(".", 1)
        # scales, biases, norms, conv and dt_bias in the source's dtype; A_log float32 (mlx-lm keeps it so)
        out_dtype = mx.uint32 if p.dtype == mx.uint32 else mx.float32 if param == "A_log" else dtype
        unit = units.setdefault(path, Unit(path, [], [], getattr(modules[path], "bits", 0),
                                           getattr(modules[path], "group_size", 0)))
        unit.outputs.append(OutTensor(mlx_lm_name(name, vl), out_dtype, tuple(p.shape)))
    ordered = [units[k] for k in sorted(units, key=_layer_key)]
    shards = _split(ordered, parse_size(max_shard_size))
    total, done = sum(u.nbytes for u in ordered), 0
    quantization = {"group_size": spec.group_size, "bits": spec.bits, "mode": "affine",
                    **{mlx_lm_name(k, vl): v for k, v in sorted(per_layer.items())}}
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    old_limit = mx.set_cache_limit(CHUNK_BYTES * 4)  # freed blocks must not pile up in MLX's cache
    try:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = shard_name(i, len(shards))
            with ShardWriter(tmp / name, [t for u in shard for t in u.outputs], SHARD_METADATA) as writer:
                for u in shard:
                    _write_module(u, lazy, writer, vl)
                    weight_map.update((t.name, name) for t in u.outputs)
                    done += u.nbytes
                    if progress:
                        progress(done, total)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / WEIGHT_INDEX).write_text(json.dumps(index, indent=2) + "\n")
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
    finally:
        mx.set_cache_limit(old_limit)
        mx.clear_cache()
    return out


def _write_module(unit: Unit, lazy: dict[str, mx.array], writer: ShardWriter, vl: bool) -> None:
    """One module's output tensors. A quantized module's source weight is read once (then dropped from `lazy`)
    and quantized a row block at a time, stacked experts as rows of one matrix; anything else is cast."""
    from .convert import CHUNK_BYTES

    outs = {t.name.rsplit(".", 1)[1]: t for t in unit.outputs}
    ours = {param: f"{unit.path}.{param}" for param in outs}  # our names; `t.name` is mlx-lm's (`vl`)
    for param, t in outs.items():
        if param not in ("weight", "scales", "biases") or not unit.bits:
            x = lazy.pop(ours[param]).astype(t.dtype)
            mx.eval(x)
            writer.write(t.name, 0, x)
    if not unit.bits:
        return
    w = lazy.pop(ours["weight"])
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
    del w, rows


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
