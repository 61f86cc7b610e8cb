"""`run_bench`: build or load the model, optionally its mlx-lm twin, run the sweep, return the JSON document."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import kernels
from ..options import GenerationOptions
from .harness import FIGURES, Runner, Trial, make_runner, our_tokens, ratio_row, run_alternated
from .machine import cpu_info
from .models import (
    BenchError,
    estimate_fit,
    load_bench_model,
    random_bench_model,
    resolve_shape,
)

SCHEMA = "qwen3-mlx-bench/1"
OURS, MLX_LM, DRAFTED = "qwen3-mlx", "mlx-lm", "qwen3-mlx + draft"


def device_bandwidth_gbs(device: str | None) -> float | None:
    """Memory bandwidth (GB/s) of a fit-planner device profile, e.g. "m4-pro-48gb"; None when not given."""
    if not device:
        return None
    from ..fit import get_device

    return get_device(device).bandwidth_gbs


def environment(device: str | None = None) -> dict:
    try:
        import importlib.metadata as md

        mlx_lm_version = md.version("mlx-lm")
    except Exception:
        mlx_lm_version = None
    return {
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm_version,
        "device": str(mx.default_device()),
        # Which matmul kernels qwen3-mlx ran: ours ("qwen3-mlx", with the instruction set and threads) or MLX's.
        "kernels": kernels.describe(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": cpu_info(),  # speeds compare within one machine only: the processor is named in every document
        "cpu_count": os.cpu_count(),
        "device_profile": device,
        "device_bandwidth_gbs": device_bandwidth_gbs(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_bench(
    model: str | None = None,
    *,
    shape: str | None = None,
    random: bool = False,
    bits: int | None = None,
    group_size: int = 64,
    prompt_tokens: int = 128,
    gen_tokens: int = 32,
    trials: int = 2,
    contexts: list[int] | None = None,
    vs: str | None = None,
    seed: int = 0,
    options: GenerationOptions | None = None,
    draft_model: str | None = None,
    device: str | None = None,
    on_trial: Callable[[str, int, int, Trial], None] | None = None,
    parallel: str | None = None,
    split: list[int] | None = None,
) -> dict:
    """Benchmark a model and return the result document (schema in the README).

    Either `model` (folder or repo id) or `shape` (registry name or config.json path, random weights).
    `contexts` sweeps prompt lengths (overrides `prompt_tokens`). `vs="mlx-lm"` adds the same weights in
    mlx-lm's models, trials alternated. `device` names a fit-planner device profile whose bandwidth the
    effective bandwidth is compared with. `options`: those of generation that apply (`kv_bits` and
    `kv_group_size`, on both sides with --vs mlx-lm; `prefill_step_size`; `num_draft`); the bench itself decodes
    greedily with eos ignored.

    `draft_model`: speculative decoding against plain decoding of the same model, trials alternated: a model
    folder or repo id, or "self-4bit" / "self-8bit" (the target's own quantization, a pair whose agreement is
    measurable on random weights: the bench decodes greedily, so what counts is whether the two agree on
    the most likely token, whatever the logits' scale).

    Under `mlx.launch`, `model` is spread over the ranks (`parallel`, `split` as in `distributed.load`): rank
    0 returns the document, the other ranks serve its forwards and exit; weight figures are rank 0's share.
    """
    options = options or GenerationOptions()
    options.validate()  # a bad value fails before the model is built; what depends on the model, after
    contexts = check_args(model, shape, random, bits, prompt_tokens, gen_tokens, trials, contexts, vs, draft_model,
                          device, parallel, split)
    net, config, name, source, ranks = bench_model(model, shape, bits, group_size, seed, max(contexts) + gen_tokens,
                                                   options.kv_bits, parallel, split)
    options = options.validate(net.args)
    kv = {} if options.kv_bits is None else {"kv_bits": options.kv_bits, "kv_group_size": options.kv_group_size}
    runners, speculative = bench_runners(net, config, shape, group_size, options, seed, kv, vs, draft_model)
    doc = header(net, config, name, source, runners, contexts, gen_tokens, trials, options.prefill_step_size, kv, vs,
                 ranks, device)
    doc["runs"] = sweep(runners, contexts, gen_tokens, trials, config["vocab_size"], seed,
                        doc["environment"]["device_bandwidth_gbs"], speculative, on_trial)
    if speculative is not None:
        doc["speculative"] = {k: v for k, v in speculative.items() if k != "stats"}
    return doc


def check_args(model, shape, random, bits, prompt_tokens, gen_tokens, trials, contexts, vs, draft_model, device,
               parallel, split) -> list[int]:
    """The prompt lengths to sweep; a BenchError now for what would fail later."""
    device_bandwidth_gbs(device)  # an unknown profile fails now, not after the run
    if (model is None) == (shape is None):
        raise BenchError("give a MODEL or --shape (with --random), not both")
    if shape is not None and not random:
        raise BenchError("--shape benchmarks random weights: add --random (or give a MODEL folder instead)")
    if vs not in (None, "mlx-lm"):
        raise BenchError(f"--vs supports only mlx-lm, not {vs!r}")
    if bits not in (None, 4, 8):
        raise BenchError(f"--bits must be 4, 8 or none, not {bits}")
    if draft_model is not None and vs is not None:
        raise BenchError("--draft-model compares with plain decoding; it cannot be combined with --vs")
    if min(prompt_tokens, gen_tokens, trials) < 1 or gen_tokens < 2:
        raise BenchError("-p and -n must be at least 1 and -g at least 2")
    contexts = sorted(set(contexts)) if contexts else [prompt_tokens]
    if min(contexts) < 1:
        raise BenchError("contexts must be positive")
    from ..distributed import launched

    if launched():
        if shape is not None or vs is not None or bits is not None or draft_model is not None:
            raise BenchError("under mlx.launch, bench a model folder as it is (no --shape, --bits, --vs or "
                             "--draft-model; make a quantized folder with qwen3-mlx quantize)")
    elif parallel is not None or split is not None:
        raise BenchError("--parallel and --split are for runs under mlx.launch")
    return contexts


def bench_model(model, shape, bits, group_size, seed, max_context, kv_bits, parallel, split):
    """(model, config with defaults filled in, name, source, ranks): across the ranks, of a random shape, or loaded."""
    from .. import distributed

    ranks = None
    if distributed.launched():
        from ..loader import load_config

        net, _ = distributed.load(model, parallel=parallel or "pipeline", split=split)
        config = load_config(net.model_path)
        if "bits" in (config.get("quantization") or {}):
            net.quantization = config["quantization"]
        name, source = str(model), str(net.model_path)
        ranks = {"parallel": parallel or "pipeline", "count": net.ranks, "layers": getattr(net, "rank_layers", None)}
    elif shape is not None:
        name, config = resolve_shape(shape)
        fit = estimate_fit(config, bits, group_size, max_context, kv_bits)
        if not fit.fits:
            gb = 1e9
            raise BenchError(
                f"{name} at {bits or 'float32'}{'-bit' if bits else ''} does not fit: the fit planner predicts ~{fit.total / gb:.1f} GB "
                f"(weights {fit.weights / gb:.1f} GB + KV cache {fit.kv_cache / gb:.2f} GB + working memory "
                f"{fit.overhead / gb:.2f} GB), {fit.available / gb:.1f} GB available"
            )
        net = random_bench_model(config, bits, group_size, seed)
        source = "random"
    else:
        net, config = load_bench_model(model, bits, group_size)
        name, source = str(model), str(getattr(net, "model_path", model))
    return net, {**config, **net.args.to_dict()}, name, source, ranks


def bench_runners(net, config, shape, group_size, options: GenerationOptions, seed, kv, vs, draft_model):
    """Ours first, then the drafted or mlx-lm's; and the speculative section (None without a draft)."""
    runners = [make_runner(OURS, net, config, our_tokens(net, options), **kv)]
    speculative = None
    if draft_model is not None:
        draft, draft_name = draft_for(draft_model, net, config, shape, group_size, seed)
        stats = {"proposed": 0, "accepted": 0}
        tokens = our_tokens(net, options.replace(draft_model=draft), stats)
        runners.append(make_runner(DRAFTED, net, config, tokens, **kv))
        speculative = {"draft": draft_name, "num_draft": options.num_draft, "stats": stats}
    if vs == "mlx-lm":
        from .mlx_lm_side import mlx_lm_tokens, mlx_lm_twin

        twin = mlx_lm_twin(net)
        runners.append(
            make_runner(MLX_LM, twin, config, lambda p, n: mlx_lm_tokens(twin, p, n, options.prefill_step_size, **kv), **kv)
        )
    return runners, speculative


def header(net, config, name, source, runners: list[Runner], contexts, gen_tokens, trials, prefill_step_size, kv, vs,
           ranks, device) -> dict:
    """The document without its runs: the model, the settings, the environment."""
    quantization = getattr(net, "quantization", None) or {}
    params = [p for _, p in tree_flatten(net.parameters())]
    return {
        "schema": SCHEMA,
        "model": {
            "name": name,
            "source": source,
            "model_type": config["model_type"],
            # float32 compute; "bfloat16" when a bf16 checkpoint's matmul weights stay bf16 (loader)
            "dtype": "bfloat16" if any(p.dtype == mx.bfloat16 for p in params) else "float32",
            "bits": quantization.get("bits"),
            "group_size": quantization.get("group_size"),
            "parameters": sum(p.size for p in params),
            "weight_bytes": runners[0].weight_bytes,
            "decode_read_bytes": runners[0].decode_read_bytes,
            "kv_bytes_per_token": runners[0].kv_bytes_per_token,
        },
        "settings": {
            "prompt_tokens": contexts if len(contexts) > 1 else contexts[0],
            "gen_tokens": gen_tokens,
            "trials": trials,
            "warmup": 1,
            "prefill_step_size": prefill_step_size,
            "kv_bits": kv.get("kv_bits"),
            "kv_group_size": kv.get("kv_group_size"),
            "sampler": "greedy, eos ignored",
            "generator": "stream_generate",
            "vs": vs,
            "alternated": len(runners) > 1,
            "ranks": ranks,
        },
        "environment": environment(device),
        "runs": [],
    }


def sweep(runners, contexts, gen_tokens, trials, vocab_size, seed, bandwidth, speculative, on_trial) -> list[dict]:
    """A run per prompt length: each side's figures with their trials, and ours against the other side."""
    runs = []
    for ctx in contexts:
        report = None if on_trial is None else (lambda r, i, t, ctx=ctx: on_trial(r.name, ctx, i, t))
        run_alternated(runners, ctx, gen_tokens, trials, vocab_size, seed, report)
        results = {}
        for r in runners:
            summary = r.summary()
            for f in FIGURES:
                summary[f]["trials"] = [getattr(t, f) for t in r.trials]
            if bandwidth:
                summary["bandwidth_share"] = summary["bandwidth_gbs"]["median"] / bandwidth
            results[r.name] = summary
        run = {"prompt_tokens": ctx, "gen_tokens": gen_tokens, "results": results}
        if speculative is not None:
            stats = speculative["stats"]
            run["ratio"] = ratio_row(results[DRAFTED], results[OURS])
            run["acceptance"] = stats["accepted"] / stats["proposed"] if stats["proposed"] else float("nan")
            stats.update(proposed=0, accepted=0)  # the drafted runner keeps adding to these; each run's own
        elif len(runners) > 1:
            run["ratio"] = ratio_row(results[OURS], results[MLX_LM])
        runs.append(run)
    return runs


def draft_for(spec: str, net, config: dict, shape: str | None, group_size: int, seed: int):
    """The draft model `spec` names, and its label."""
    if spec in ("self-4bit", "self-8bit"):
        if shape is None:
            raise BenchError("self-4bit / self-8bit drafts are for --shape ... --random targets")
        draft = random_bench_model(config, int(spec[5]), group_size, seed)  # the same weights, quantized
        return draft, spec
    from ..speculative import check_draft

    draft, _ = load_bench_model(spec, None, group_size)
    check_draft(net.args, draft.args)
    return draft, spec
