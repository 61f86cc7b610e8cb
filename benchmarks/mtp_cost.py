"""The cost of one MTP draft step against one target decode step (random weights, CPU).

A draft step is what `MtpDrafter.propose` does per drafted token after the first: the head on its own output
(embedding, two norms, fc, one full-attention block with its cache) and the target's lm_head, then the argmax.
A decode step is the target's forward of one token and its argmax. Both at the same depth (`--context`
positions cached), timed alternately, median of `--steps`.

    python benchmarks/mtp_cost.py [--shape tiny|tiny-qwen4|qwen3.5-0.8b|CONFIG.json] [--bits 4] [--context 256]
                                  [--steps 60]

qwen4_exp's head (`tiny-qwen4`, or a config.json of that model type) drafts on the target's streams and mixes its
own before the lm_head.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from qwen3_mlx.models.mtp import MtpDrafter
from qwen3_mlx.models.registry import SHAPES, random_model

TINY = {"model_type": "qwen3_5_text", "vocab_size": 500, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "tie_word_embeddings": False}
TINY_QWEN4 = {**TINY, "model_type": "qwen4_exp_text", "num_experts": 8, "num_experts_per_tok": 2,
              "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "hc_count": 2, "hc_lowrank": 16,
              "ple_layer_ids": [1], "ple_embed_dim": 32, "ngram_size": 3, "heads_per_ngram": 2,
              "ngram_vocab_size_base": 300, "make_ngram_vocab_size_divisible_by": 8, "indexer_n_heads": 8,
              "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8, "indexer_compress_ratio": 4,
              "eos_token_id": 2}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--bits", type=int, default=None, help="quantize the target and the head")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    if a.shape.endswith(".json"):
        config = json.loads(Path(a.shape).read_text())
    else:
        config = {"tiny": TINY, "tiny-qwen4": TINY_QWEN4}.get(a.shape) or SHAPES[a.shape]
    target = random_model(config, seed=0, bits=a.bits, group_size=64)
    mx.random.seed(1)
    head = getattr(target, "mtp_drafter_class", MtpDrafter)(target, target.mtp_layer())
    if a.bits:
        nn.quantize(head, group_size=64, bits=a.bits)
    mx.eval(head.parameters())

    ids = mx.random.randint(0, config["vocab_size"], (1, a.context))
    cache = target.make_cache()
    hidden = target.hidden_states(ids, cache)
    dcache = head.make_cache()
    head.fill(dcache, ids[0].tolist(), hidden)
    mx.eval([c.state for c in cache], [c.state for c in dcache])
    kv, h = dcache[0].kv, hidden[:, -1:]
    token = mx.array([[1]])

    def decode():
        nonlocal token
        token = mx.argmax(target(token, cache)[:, -1, :], axis=-1)[None]
        mx.eval(token)

    def draft():
        nonlocal h
        h = head(token, h, kv)
        mx.eval(mx.argmax(head.logits(h)[:, -1, :], axis=-1))

    times = {"decode": [], "draft": []}
    for _ in range(5):
        decode(), draft()
    for _ in range(a.steps):
        for name, fn in (("decode", decode), ("draft", draft)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    mb = {"target": sum(p.nbytes for _, p in tree_flatten(target.parameters())) / 1e6,
          "head": sum(p.nbytes for _, p in tree_flatten(head.parameters())) / 1e6}
    print(f"{a.shape} bits={a.bits} context={a.context}: decode step {ms['decode']:.2f} ms, draft step "
          f"{ms['draft']:.2f} ms ({ms['draft'] / ms['decode']:.2f}x); weights: target {mb['target']:.1f} MB, head "
          f"{mb['head']:.1f} MB (+ the target's lm_head it shares)")


if __name__ == "__main__":
    main()
