"""Benchmark harness: timed generations, alternated A/B trials, medians with min and max.

Both sides are timed the same way, from outside their generators: time to first token is the wall time from
the call to the first yielded token (prefill plus one step), prefill tokens/s is prompt tokens / that time,
decode tokens/s is (generated - 1) / (time from first to last token). Peak memory is this model's weights plus
what the run allocated on top of what was live before it (so two models in one process do not count twice).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..fit import kv_bytes_per_token
from ..options import GenerationOptions
from .models import decode_read_bytes, weight_bytes

FIGURES = ("prefill_tps", "decode_tps", "ttft_s", "peak_memory_gb", "bandwidth_gbs")
# Higher is better for these; for the others (time, memory) lower is better.
HIGHER_IS_BETTER = {"prefill_tps": True, "decode_tps": True, "ttft_s": False, "peak_memory_gb": False, "bandwidth_gbs": True}

TokenSource = Callable[[list[int], int], Iterable[int]]


@dataclass
class Trial:
    prefill_tps: float
    decode_tps: float
    ttft_s: float
    peak_memory_gb: float
    bandwidth_gbs: float


@dataclass
class Stat:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class Runner:
    """One side of a comparison: a name, a token source, and what a decoded token reads."""

    name: str
    tokens: TokenSource
    weight_bytes: int
    decode_read_bytes: int
    kv_bytes_per_token: int
    trials: list[Trial] = field(default_factory=list)

    def summary(self) -> dict[str, dict]:
        return {f: asdict(Stat.of([getattr(t, f) for t in self.trials])) for f in FIGURES}


def make_runner(name: str, model: nn.Module, config: dict, tokens: TokenSource, kv_bits: int | None = None,
                kv_group_size: int = 64) -> Runner:
    return Runner(name, tokens, weight_bytes(model), decode_read_bytes(model, config),
                  kv_bytes_per_token(config, 4, kv_bits, kv_group_size))


def random_prompt(length: int, vocab_size: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab_size, size=length).tolist()


def time_trial(runner: Runner, prompt: list[int], max_tokens: int) -> Trial:
    """Run one generation of exactly `max_tokens` tokens and measure it."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    stamps = []
    start = time.perf_counter()
    for _ in runner.tokens(prompt, max_tokens):
        stamps.append(time.perf_counter())
    peak = mx.get_peak_memory()
    if len(stamps) != max_tokens:
        raise RuntimeError(f"{runner.name} generated {len(stamps)} tokens, expected {max_tokens}")
    ttft = stamps[0] - start
    decode_time = stamps[-1] - stamps[0]
    decode_tps = (max_tokens - 1) / decode_time if max_tokens > 1 and decode_time > 0 else float("nan")
    # Mean context while decoding: the prompt plus half the generated tokens.
    read = runner.decode_read_bytes + runner.kv_bytes_per_token * (len(prompt) + max_tokens / 2)
    return Trial(
        prefill_tps=len(prompt) / ttft,
        decode_tps=decode_tps,
        ttft_s=ttft,
        peak_memory_gb=(runner.weight_bytes + max(peak - base, 0)) / 1e9,
        bandwidth_gbs=read * decode_tps / 1e9,
    )


def run_alternated(
    runners: list[Runner],
    prompt_tokens: int,
    gen_tokens: int,
    trials: int,
    vocab_size: int,
    seed: int = 0,
    on_trial: Callable[[Runner, int, Trial], None] | None = None,
) -> None:
    """One warm-up each, then `trials` rounds of A B A B... on the same prompt; trials land in each runner."""
    prompt = random_prompt(prompt_tokens, vocab_size, seed)
    for r in runners:
        for _ in r.tokens(prompt[: min(len(prompt), 32)], min(gen_tokens, 4)):
            pass
        r.trials.clear()
    for i in range(trials):
        order = runners if i % 2 == 0 else runners[::-1]  # alternate who goes first, too
        for r in order:
            t = time_trial(r, prompt, gen_tokens)
            r.trials.append(t)
            if on_trial:
                on_trial(r, i, t)


def ratio_row(ours: dict, theirs: dict) -> dict[str, float]:
    """ours / theirs per figure, on the medians."""
    return {f: ours[f]["median"] / theirs[f]["median"] if theirs[f]["median"] else float("nan") for f in FIGURES}


# ---- our side --------------------------------------------------------------------------------------------


def our_tokens(model: nn.Module, options: GenerationOptions, stats: dict | None = None) -> TokenSource:
    """Token source of our side: the shared generator (stream_generate) with `options` (its KV cache, prefill
    step and draft), greedy, eos ignored; with a draft, each run adds its proposed / accepted counts to `stats`."""
    from ..generate import stream_generate

    def run(prompt, n):
        last = None
        for last in stream_generate(model, None, prompt, options, max_tokens=n, temperature=0.0, ignore_eos=True):
            yield last.token
        if stats is not None and last is not None:
            stats["proposed"] += last.draft_tokens
            stats["accepted"] += last.accepted_tokens

    return run
