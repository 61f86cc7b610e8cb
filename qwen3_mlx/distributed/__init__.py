"""Running one model across several machines on MLX's distributed layer (`mlx.launch`: ring, JACCL, MPI).

Every rank runs the same command. `load` returns the model on rank 0, which owns the terminal or the socket
and runs the front end unchanged; on the other ranks it serves forwards until rank 0 stops, then exits.

- `parallel="pipeline"`: contiguous blocks of layers per rank, split by each host's memory (`fit.split_layers`),
  each rank reading only its own tensors (`pipeline`).
- `parallel="tensor"`: for MoE models, every rank holds attention and router, and a slice of every expert
  along the intermediate dimension; the expert outputs are summed across ranks (`tensor`).
"""

from __future__ import annotations

import atexit
import os

import mlx.core as mx

from .group import DistributedError, Watchdog, check_same, fingerprint, init, launched, lost

PARALLEL = ("pipeline", "tensor")
SPLIT_CONTEXT = 4096  # KV cache positions the memory split reserves per layer (the planner's default)


def _memory_bytes() -> float:
    """What one process here may use: 75% of RAM (the planner's rule for a Mac's GPU-wired memory)."""
    try:
        return 0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16e9


def _files_identity(model_path) -> list:
    from ..loader import read_safetensors_header, weight_files

    out = [(model_path / "config.json").read_text()]
    for f in weight_files(model_path):
        header = read_safetensors_header(f)
        out.append((f.name, f.stat().st_size, sorted((k, v.get("shape")) for k, v in header.items()
                                                      if k != "__metadata__")))
    return out


def layer_file_bytes(model_path, n_layers: int) -> tuple[list[int], int]:
    """Bytes on disk per decoder layer, and of everything else (embedding, norm, head), from the headers."""
    from ..loader import read_safetensors_header, weight_files
    from .pipeline import _LAYER

    layers, other = [0] * n_layers, 0
    for f in weight_files(model_path):
        for name, v in read_safetensors_header(f).items():
            if name == "__metadata__":
                continue
            n = int(v["data_offsets"][1]) - int(v["data_offsets"][0])
            m = _LAYER.match(name)
            if m and int(m[1]) < n_layers:
                layers[int(m[1])] += n
            else:
                other += n
    return layers, other


def split_by_memory(model_path, config, capacities: list[float]) -> list[int]:
    """Layers per rank from the bytes on disk and what each layer caches (keys and values of SPLIT_CONTEXT
    positions, or a linear layer's fixed state): the split `qwen3-mlx fit --hosts` predicts for the same model
    (both use `fit.split_layers`)."""
    from ..fit import kv_bytes_per_token, layer_kinds, split_layers, state_bytes_per_layer

    kinds = layer_kinds(config)
    layers, other = layer_file_bytes(model_path, len(kinds))
    kv = kv_bytes_per_token(config, 2) // kinds.count("full_attention") * SPLIT_CONTEXT
    state = state_bytes_per_layer(config, 2)
    return split_layers([b + (state if k == "linear_attention" else kv) for b, k in zip(layers, kinds)], capacities,
                        other)


def pipeline_split(group, model_path, config, split: list[int] | None) -> list[tuple[int, int]]:
    """(start, end) layers per rank: `split` (layers per rank) as given, else by each rank's memory."""
    from ..fit import layer_kinds

    n, L = group.size(), len(layer_kinds(config))  # layer_kinds reads a Qwen3.5 VL config's text part
    if split is not None:
        if len(split) != n or sum(split) != L or min(split) < 1:
            raise DistributedError(
                f"--split {','.join(map(str, split))} must give each of the {n} ranks at least one layer and "
                f"add up to the model's {L} layers"
            )
        counts = split
    else:
        memory = mx.distributed.all_gather(mx.array([_memory_bytes() / 1e6], dtype=mx.float32), group=group)
        counts = split_by_memory(model_path, config, [m * 1e6 for m in memory.tolist()])
    counts = _lead_holds_attention(config, list(counts), given=split is not None)
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


def _lead_holds_attention(config, counts: list[int], given: bool) -> list[int]:
    """A hybrid's rank 0 must hold an attention layer: the other ranks learn from its KV caches whether to
    quantize theirs (--kv-bits). The memory split moves layers to rank 0 until it does; a given one is refused."""
    from ..fit import layer_kinds

    kinds = layer_kinds(config)
    first = kinds.index("full_attention") if "full_attention" in kinds else 0
    need = first + 1 - counts[0]
    if need <= 0:
        return counts
    if given:
        raise DistributedError(f"--split must give rank 0 at least {first + 1} layers: it has to hold an attention "
                               f"layer of this hybrid model (the first is layer {first})")
    for r in range(1, len(counts)):
        take = min(need, counts[r] - 1)
        counts[r] -= take
        counts[0] += take
        need -= take
    if need > 0:
        raise DistributedError(f"{len(counts)} ranks are too many for this model's {len(kinds)} layers")
    return counts


def load(path_or_repo, *, parallel: str = "pipeline", split: list[int] | None = None):
    """Under `mlx.launch`: `(model, tokenizer)` on rank 0; on the other ranks, serve forwards until rank 0
    stops, then exit the process. Raises DistributedError for options or files that differ between ranks."""
    from ..loader import load_config, load_model, resolve_model_path
    from ..tokenizer import load_tokenizer

    if parallel not in PARALLEL:
        raise DistributedError(f"--parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    group = init()
    rank = group.rank()
    model_path = resolve_model_path(path_or_repo)
    config = load_config(model_path)
    try:
        if parallel == "pipeline":
            from . import pipeline

            ranges = pipeline_split(group, model_path, config, split)
            check_same(group, fingerprint(_files_identity(model_path), parallel, ranges),
                       "model files, --parallel or the layer split")
            start, end = ranges[rank]
            model, _ = load_model(model_path, shard=pipeline.shard(start, end, first=rank == 0))
            if rank != 0:
                pipeline.follow(model, group, (start, end))
                raise SystemExit(0)
            llm = pipeline.PipelineModel(model, group, Watchdog(0), ranges)
        else:
            from . import tensor

            if split is not None:
                raise DistributedError("--split is for --parallel pipeline")
            check_same(group, fingerprint(_files_identity(model_path), parallel), "model files or --parallel")
            model, _ = load_model(model_path, shard=tensor.shard(group))
            if rank != 0:
                tensor.follow(model, group)
                raise SystemExit(0)
            llm = tensor.TensorParallelModel(model, group, Watchdog(0))
    except RuntimeError as e:
        raise lost(e, rank) or e
    llm.model_path = model_path
    llm.ranks = group.size()
    atexit.register(llm.stop)
    return llm, load_tokenizer(model_path)


__all__ = ["DistributedError", "PARALLEL", "launched", "load", "layer_file_bytes", "pipeline_split"]
