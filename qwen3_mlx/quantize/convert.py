"""Bounded-memory export: HF safetensors (bf16/fp16/fp32) -> quantized MLX shards loadable by MLX Swift and mlx-lm.

Every output tensor is planned before anything is written (names, shapes, shard layout, from a lazily built
model), then produced a row block at a time: read rows from the source, cast, quantize, evaluate, write the
bytes at their place in the shard. MoE experts are stacked on disk: expert e's rows go to slice e of the
stacked tensor, wherever its source shard is. Resident memory stays at a few row blocks whatever the size
of the model (mlx-lm's converter holds the whole quantized model instead).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import ModelLoadError
from ..loader import WEIGHT_INDEX, load_config, resolve_model_path, weight_files
from ..models import build_model, get_architecture
from ..models.base import rope_settings
from .core import float_note, quantize_model
from .recipes import QuantizeError, QuantSpec
from .safetensors_io import FLOAT_SOURCE_DTYPES, OutTensor, Reader, ShardWriter, TensorInfo, parse_size, scan

CHUNK_BYTES = 64 << 20  # float32 bytes of source rows processed at once
SHARD_METADATA = {"format": "mlx"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
DTYPE_NAMES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
_ST_TO_NAME = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_EXPERTS = re.compile(r"^(.*\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)$")
# Qwen3's thinking-mode sampling defaults (model card), for sources without generation_config.json.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}

Progress = Callable[[int, int], None]  # (source bytes done, source bytes total)


@dataclass
class Unit:
    """One output module: its tensors and the source tensor(s) they come from."""

    path: str
    sources: list[TensorInfo]  # one per expert for stacked switch layers, else one
    outputs: list[OutTensor]
    bits: int = 0  # 0: copied (cast) without quantization
    group_size: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass
class Plan:
    """Everything an export will write, known before any byte is written."""

    source: Path
    config: dict[str, Any]
    spec: QuantSpec
    dtype: mx.Dtype
    quantization: dict[str, Any]
    units: list[Unit]
    shards: list[list[Unit]] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)  # left in float: the group size divides no input width

    @property
    def source_bytes(self) -> int:
        return sum(s.nbytes for u in self.units for s in u.sources)

    @property
    def weight_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    @property
    def largest_tensor_bytes(self) -> int:
        return max(t.nbytes for u in self.units for t in u.outputs)


@dataclass
class ConvertResult:
    out: Path
    plan: Plan
    shard_files: list[Path]
    bytes_written: int
    seconds: float


def _layer_key(path: str) -> tuple:
    """Natural model order: embedding, layers by index, final norm, lm_head."""
    m = re.match(r"^model\.layers\.(\d+)\.", path)
    if m:
        return (1, int(m.group(1)), path)
    if path.startswith("model.embed_tokens"):
        return (0, 0, path)
    return (2, 0 if path.startswith("model.") else 1, path)


def export_config(config: dict[str, Any], quantization: dict[str, Any], dtype: mx.Dtype) -> dict[str, Any]:
    """config.json for an export: flat classic keys (what MLX Swift decodes) plus the quantization dicts.

    transformers 5 nests rope settings under `rope_parameters` and writes `num_local_experts`; Swift reads
    neither, and defaults missing `tie_word_embeddings` / `norm_topk_prob` to false, so all are written out.
    """
    arch = get_architecture(config.get("model_type"))
    args = arch.ModelArgs.from_dict(config)
    out = {k: v for k, v in config.items() if k not in ("rope_parameters", "num_local_experts", "quantization",
                                                         "quantization_config", "dtype", "torch_dtype")}
    theta, scaling = rope_settings(args)
    if scaling is not None:
        # Swift decodes rope_scaling as [String: String|Number]: drop nulls and booleans.
        scaling = {k: v for k, v in scaling.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    out.update(
        model_type=args.model_type,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.rms_norm_eps,
        vocab_size=args.vocab_size,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(args.tie_word_embeddings),
        attention_bias=bool(args.attention_bias),
    )
    if args.model_type == "qwen3_moe":
        out.update(
            num_experts=args.num_experts,
            num_experts_per_tok=args.num_experts_per_tok,
            moe_intermediate_size=args.moe_intermediate_size,
            decoder_sparse_step=args.decoder_sparse_step,
            mlp_only_layers=list(args.mlp_only_layers),
            norm_topk_prob=bool(args.norm_topk_prob),
        )
    out["torch_dtype"] = {v: k for k, v in DTYPE_NAMES.items()}[dtype]
    out["quantization"] = quantization
    out["quantization_config"] = dict(quantization)
    return dict(sorted(out.items()))


def plan_model(config: dict[str, Any], spec: QuantSpec, dtype: mx.Dtype, ungrouped: list[str] | None = None):
    """Output tensors of a model of this config under `spec`, from a lazily built model (nothing evaluated);
    `ungrouped` as `quantize_model`'s.

    Returns (quantization dict, {module path: (module, {param: OutTensor})}, {float param name: shape}).
    """
    model = build_model(config)
    float_shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    quantization = quantize_model(model, spec=spec, ungrouped=ungrouped)
    modules: dict[str, tuple[nn.Module, dict[str, OutTensor]]] = {}
    by_path = dict(model.named_modules())
    for name, p in tree_flatten(model.parameters()):
        path, param = name.rsplit(".", 1)
        out_dtype = mx.uint32 if p.dtype == mx.uint32 else dtype
        modules.setdefault(path, (by_path[path], {}))[1][param] = OutTensor(name, out_dtype, tuple(p.shape))
    return quantization, modules, float_shapes


def plan_export(
    src: str | os.PathLike,
    spec: QuantSpec,
    dtype: str | mx.Dtype | None = None,
    max_shard_size: str | int = "5GB",
) -> Plan:
    """Validate the source and lay out the export. Raises before anything is written."""
    source = resolve_model_path(src)
    config = load_config(source)
    get_architecture(config.get("model_type"))  # unknown model_type: clear error
    if config.get("model_type") not in ("qwen3", "qwen3_moe"):
        raise QuantizeError(f"the streaming exporter covers qwen3 and qwen3_moe; {config['model_type']} is "
                            "exported by qwen3_mlx.quantize.hybrid.export_hybrid (what `qwen3-mlx quantize` runs)")
    if config.get("quantization") or config.get("quantization_config"):
        raise QuantizeError(f"{source} is already quantized; quantize from the original bf16/fp16/fp32 weights")
    infos = scan(weight_files(source))
    float_dtypes = {i.dtype for i in infos.values()}
    bad = float_dtypes - set(FLOAT_SOURCE_DTYPES)
    if bad:
        name = next(i.name for i in infos.values() if i.dtype in bad)
        raise QuantizeError(f"tensor {name} has dtype {sorted(bad)[0]}; sources must be bf16, fp16 or fp32")
    if dtype is None:
        counts: dict[str, int] = {}
        for i in infos.values():
            counts[i.dtype] = counts.get(i.dtype, 0) + i.nbytes
        dtype = _ST_TO_NAME[max(counts, key=counts.get)]
    dtype = resolve_dtype(dtype)

    float_layers: list[str] = []
    quantization, modules, float_shapes = plan_model(config, spec, dtype, float_layers)
    tied = bool(config.get("tie_word_embeddings", False))
    used: set[str] = set()
    units = []
    for path, (module, params) in sorted(modules.items(), key=lambda kv: _layer_key(kv[0])):
        sources = _source_tensors(path, float_shapes, infos)
        used |= {i.name for i in sources}
        extra_params = set(params) - {"weight", "scales", "biases"}
        if extra_params:
            raise QuantizeError(f"{path} has parameters {sorted(extra_params)} this exporter does not handle")
        order = [params[k] for k in ("weight", "scales", "biases") if k in params]
        quantized = "scales" in params
        units.append(Unit(path, sources, order, bits=getattr(module, "bits", 0) if quantized else 0,
                          group_size=getattr(module, "group_size", 0) if quantized else 0))
    ignorable = {"lm_head.weight"} if tied else set()
    extra = sorted(n for n in set(infos) - used - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ModelLoadError(f"unexpected tensor {extra[0]} in the source checkpoint{more}")
    plan = Plan(source, config, spec, dtype, quantization, units, float_layers=float_layers)
    plan.shards = _split(units, parse_size(max_shard_size))
    return plan


def _source_tensors(path: str, float_shapes: dict, infos: dict[str, TensorInfo]) -> list[TensorInfo]:
    """The source tensors of the module at `path`: one per expert for a stacked switch layer, else one."""
    m = _EXPERTS.match(path)
    want = float_shapes[f"{path}.weight"]
    if m:
        names, want = [f"{m.group(1)}.experts.{e}.{m.group(2)}.weight" for e in range(want[0])], want[1:]
    else:
        names = [f"{path}.weight"]
    for n in names:
        if n not in infos:
            raise ModelLoadError(f"missing tensor {n} in the source checkpoint")
        if infos[n].shape != tuple(want):
            raise ModelLoadError(f"tensor {n} has shape {infos[n].shape}, expected {tuple(want)} from config.json")
    return [infos[n] for n in names]


def resolve_dtype(dtype: str | mx.Dtype) -> mx.Dtype:
    """`--dtype` by name ("bfloat16", "float16", "float32") or as an MLX dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise QuantizeError(f"unsupported dtype {dtype!r} (use bfloat16, float16 or float32)")
        return DTYPE_NAMES[dtype]
    return dtype


def _split(units: list[Unit], max_bytes: int) -> list[list[Unit]]:
    """Greedy shards in model order; a module's tensors stay together."""
    shards: list[list[Unit]] = [[]]
    size = 0
    for u in units:
        if shards[-1] and size + u.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(u)
        size += u.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_unit(unit: Unit, reader: Reader, writer: ShardWriter, dtype: mx.Dtype, progress: Callable[[int], None]):
    """Produce `unit`'s tensors a row block at a time; expert e lands in slice e of the stacked tensors."""
    for e, src in enumerate(unit.sources):
        rows, cols = src.shape[0], (src.shape[1] if len(src.shape) > 1 else 1)
        step = max(1, CHUNK_BYTES // (4 * cols))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            x = reader.rows(src, r0, r1).astype(dtype)
            pieces = list(mx.quantize(x, unit.group_size, unit.bits)) if unit.bits else [x]
            mx.eval(pieces)
            for out, piece in zip(unit.outputs, pieces):
                # Bytes per source row of this output tensor; expert slices follow each other.
                row_bytes = piece.nbytes // (r1 - r0)
                writer.write(out.name, (e * rows + r0) * row_bytes, piece)
            progress((r1 - r0) * src.row_bytes)
            del x, pieces


def _copy_support_files(source: Path, tmp: Path) -> list[str]:
    """Tokenizer, chat template and generation config; returns warnings for anything missing."""
    warnings = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, tmp / name)
    if not (tmp / "tokenizer.json").is_file():
        warnings.append("the source has no tokenizer.json; the export has none either")
    tc_file = tmp / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text()) if tc_file.is_file() else {}
    template = tc.get("chat_template")
    jinja = source / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text()
    if isinstance(template, str) and template:
        tc["chat_template"] = template  # MLX Swift reads it inline
        tc_file.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
        (tmp / "chat_template.jinja").write_text(template)
    elif tc_file.is_file() or (tmp / "tokenizer.json").is_file():
        warnings.append("the source has no chat template; the export has none either")
    gen = source / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, tmp / "generation_config.json")
    else:
        # <|im_end|> ends a chat turn, <|endoftext|> a document (Qwen3's own generation_config.json).
        (tmp / "generation_config.json").write_text(
            json.dumps({**GENERATION_DEFAULTS, "eos_token_id": [151645, 151643], "pad_token_id": 151643}, indent=2)
            + "\n"
        )
    return warnings


def _refuse_overlap(source: Path, out: Path) -> None:
    """OUT must be apart from the source: --force renames and deletes OUT, which would take a source inside it."""
    src_r, out_r = source.resolve(), out.resolve()
    if src_r == out_r:
        raise QuantizeError(f"the output folder {out} is the source folder")
    if out_r in src_r.parents:
        raise QuantizeError(f"the source {source} is inside the output folder {out}; choose an output folder beside it")
    if src_r in out_r.parents:
        raise QuantizeError(f"the output folder {out} is inside the source {source}; choose a folder outside it")


def write_folder(source: Path, out: Path, shards: list[list[Unit]], write_unit: Callable[[Unit, ShardWriter], None],
                 config: dict[str, Any], log: Callable[[str], None] | None) -> list[Path]:
    """Write an export's shards (each unit's tensors by `write_unit`), index, config.json and the source's support
    files into a hidden folder beside `out`, then swap it in (an existing `out` goes only once the new one is
    complete; an interrupted run leaves nothing at `out`). Returns the shard files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    old_limit = mx.set_cache_limit(CHUNK_BYTES * 4)  # freed row blocks must not pile up in MLX's cache
    try:
        weight_map: dict[str, str] = {}
        files = []
        for i, units in enumerate(shards):
            name = shard_name(i, len(shards))
            with ShardWriter(tmp / name, [t for u in units for t in u.outputs], SHARD_METADATA) as writer:
                for u in units:
                    write_unit(u, writer)
                    for t in u.outputs:
                        weight_map[t.name] = name
            files.append(out / name)
        total = sum(u.nbytes for units in shards for u in units)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / WEIGHT_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for w in _copy_support_files(source, tmp):
            if log:
                log(f"warning: {w}")
        if out.exists():  # --force: swap in the finished folder, then drop the old one
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        mx.set_cache_limit(old_limit)
        mx.clear_cache()
    return files


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    spec: QuantSpec | None = None,
    *,
    dtype: str | mx.Dtype | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Quantize the HF checkpoint `src` into the MLX folder `out`, in bounded memory.

    The folder is written beside `out` under a hidden temporary name and renamed when complete, so an
    interrupted run never leaves anything at `out`. An existing `out` is refused unless `force`.
    """
    t0 = time.perf_counter()
    spec = spec or QuantSpec()
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise QuantizeError(f"{out} already exists (use --force to replace it)")
    plan = plan_export(src, spec, dtype=dtype, max_shard_size=max_shard_size)
    _refuse_overlap(plan.source, out)
    if log and plan.float_layers:
        log(float_note(plan.float_layers, spec.group_size))
    total, done = plan.source_bytes, 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    with Reader() as reader:
        files = write_folder(plan.source, out, plan.shards, lambda u, w: _write_unit(u, reader, w, plan.dtype, advance),
                             export_config(plan.config, plan.quantization, plan.dtype), log)
    size = sum(f.stat().st_size for f in files)
    return ConvertResult(out, plan, files, size, time.perf_counter() - t0)
