"""What a quantized KV cache costs in accuracy and saves in memory: KL(float cache || quantized cache) of the
next-token distributions at the last positions of a long prompt, and the cache's bytes.

    python benchmarks/kv_quant.py [--shape qwen3-0.6b] [--bits 4] [--contexts 1024,8192] [--last 16]

The model is random weights of --shape (quantized to --bits, float32 compute). For each context length, the
same random prompt is prefilled with a float cache and with 8- and 4-bit caches (groups of 64). The last
`--last` positions are then run as one chunk; their logits give the KL divergence (mean and max over
positions) and whether the top token agrees with the float cache's.
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np

from qwen3_mlx.models.cache import make_cache
from qwen3_mlx.models.registry import random_model, shape_config


def last_logits(model, prompt: list[int], last: int, kv_bits: int | None) -> tuple[mx.array, int]:
    cache = make_cache(model, kv_bits=kv_bits)
    head = prompt[:-last]
    for i in range(0, len(head), 512):
        model(mx.array(head[i : i + 512])[None], cache)
        mx.eval([c.state for c in cache])
    logits = model(mx.array(prompt[-last:])[None], cache)[0].astype(mx.float32)  # [last, vocab]
    mx.eval(logits)
    return logits, sum(c.nbytes for c in cache)


def kl(p: mx.array, q: mx.array) -> mx.array:
    lp = p - mx.logsumexp(p, axis=-1, keepdims=True)
    lq = q - mx.logsumexp(q, axis=-1, keepdims=True)
    return (mx.exp(lp) * (lp - lq)).sum(axis=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--bits", type=int, default=4, help="weight bits (4 or 8)")
    ap.add_argument("--contexts", default="1024,8192")
    ap.add_argument("--last", type=int, default=16)
    args = ap.parse_args()
    config = shape_config(args.shape)
    model = random_model(config, mx.float32, bits=args.bits)
    rows = []
    for n in (int(x) for x in args.contexts.split(",")):
        prompt = np.random.default_rng(n).integers(0, config["vocab_size"], n).tolist()
        ref, ref_bytes = last_logits(model, prompt, args.last, None)
        for kv_bits in (8, 4):
            got, nbytes = last_logits(model, prompt, args.last, kv_bits)
            d = kl(ref, got)
            agree = float((mx.argmax(ref, -1) == mx.argmax(got, -1)).astype(mx.float32).mean())
            rows.append((n, kv_bits, float(d.mean()), float(d.max()), agree, ref_bytes, nbytes))
            print(rows[-1], flush=True)
    print(f"\n{args.shape} random weights ({args.bits}-bit), last {args.last} positions, KV groups of 64\n")
    print("| context | KV cache | KL mean | KL max | top-1 agrees | float cache MB | quantized MB | saved |")
    print("|---|---|---|---|---|---|---|---|")
    for n, b, mean, mx_, agree, fb, qb in rows:
        print(f"| {n} | {b}-bit | {mean:.2e} | {mx_:.2e} | {agree:.0%} | {fb / 1e6:.0f} | {qb / 1e6:.0f} | "
              f"{1 - qb / fb:.0%} |")


if __name__ == "__main__":
    main()
