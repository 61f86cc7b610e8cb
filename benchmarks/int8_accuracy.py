"""What the integer kernels cost in accuracy: next-token distributions with int8 activations against the float path.

    python benchmarks/int8_accuracy.py [--shape qwen3-0.6b] [--tokens 1024] [--bits 4 8]

For each weight width, one model with random weights (the registry shape, quantized in memory, group size 64)
reads one prompt of random token ids twice: with the integer kernels (activations quantized to int8 per group,
QWEN3_MLX_INT8's path) and with the float path (QWEN3_MLX_INT8=0, the same quantized weights). Printed per
width: the KL divergence KL(float || int8) of the next-token distribution at every position (mean, 99th
percentile, max), how often the two agree on the most likely token, and the same KL for the float path against
float32 weights (the cost of the weight quantization itself, for scale). Random weights have no trained
outlier channels, so these figures are a floor, not a promise for a trained checkpoint.
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
import numpy as np

from qwen3_mlx import kernels
from qwen3_mlx.bench.machine import cpu_info, describe
from qwen3_mlx.models.registry import random_model


def log_probs(model, tokens: list[int]) -> np.ndarray:
    logits = model(mx.array([tokens]))[0].astype(mx.float32)
    out = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(out)
    return np.array(out)


def kl(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """KL(p || q) at each position, in nats."""
    return (np.exp(p_log) * (p_log - q_log)).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if not kernels.set_int8(2):
        raise SystemExit("this CPU (or build) has no integer kernels")
    table = kernels._ext.int8()
    prompt = np.random.default_rng(args.seed).integers(0, 151936, args.tokens).tolist()
    kernels.set_int8(0)
    reference = log_probs(random_model(args.shape, dtype=mx.float32, seed=args.seed), prompt)
    rows = []
    for bits in args.bits:
        model = random_model(args.shape, dtype=mx.float32, seed=args.seed, bits=bits, group_size=64)
        kernels.set_int8(0)
        flt = log_probs(model, prompt)
        kernels.set_int8(2)
        i8 = log_probs(model, prompt)
        d, w = kl(flt, i8), kl(reference, flt)
        rows.append({"bits": bits, "kl_mean": float(d.mean()), "kl_p99": float(np.percentile(d, 99)),
                     "kl_max": float(d.max()), "top1_agree": float((flt.argmax(-1) == i8.argmax(-1)).mean()),
                     "weight_quant_kl_mean": float(w.mean())})
        del model
    cpu = cpu_info()
    print(f"{args.shape}, random weights, {args.tokens}-token prompt, integer kernels {table}; {describe(cpu)}\n")
    print("| weights | KL(float path \u2016 int8) mean / p99 / max (nats) | same top token | "
          "KL(float32 weights \u2016 quantized, float path) mean |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['bits']}-bit g64 | {r['kl_mean']:.2e} / {r['kl_p99']:.2e} / {r['kl_max']:.2e} | "
              f"{100 * r['top1_agree']:.1f}% | {r['weight_quant_kl_mean']:.2e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "tokens": args.tokens, "table": table, "cpu": cpu, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
