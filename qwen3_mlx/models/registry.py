"""The Qwen3 models (2504 release) and the hybrid Qwen3.5 / Qwen3-Next ones as config.json dicts, and
random-weight models of any shape."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from ..errors import Qwen3MLXError
from . import build_model

_COMMON = dict(
    head_dim=128,
    rope_theta=1000000.0,
    max_position_embeddings=40960,
    vocab_size=151936,
    rms_norm_eps=1e-6,
    attention_bias=False,
    rope_scaling=None,
)


def _dense(layers, hidden, heads, kv_heads, inter, tied):
    return dict(
        _COMMON,
        model_type="qwen3",
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        tie_word_embeddings=tied,
    )


def _moe(layers, hidden, heads, kv_heads, inter, experts, active, moe_inter):
    return dict(
        _dense(layers, hidden, heads, kv_heads, inter, False),
        model_type="qwen3_moe",
        num_experts=experts,
        num_experts_per_tok=active,
        moe_intermediate_size=moe_inter,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
    )


def _hybrid(model_type, layers, hidden, heads, kv_heads, inter, tied, vocab=248320, v_heads=32, **moe):
    """A Qwen3.5 / Qwen3-Next text config: every 4th layer gated full attention (256-dim heads, a quarter of each
    rotated), the others Gated DeltaNet with 16 key heads and `v_heads` value heads of 128."""
    return dict(
        model_type=model_type, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=256, intermediate_size=inter, tie_word_embeddings=tied,
        vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=262144, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        full_attention_interval=4, linear_conv_kernel_dim=4, linear_num_key_heads=16, linear_num_value_heads=v_heads,
        linear_key_head_dim=128, linear_value_head_dim=128, **moe,
    )


def _hybrid_moe(model_type, layers, hidden, heads, kv_heads, experts, active, moe_inter, vocab=248320):
    return _hybrid(model_type, layers, hidden, heads, kv_heads, 0, False, vocab, num_experts=experts,
                   num_experts_per_tok=active, moe_intermediate_size=moe_inter,
                   shared_expert_intermediate_size=moe_inter, norm_topk_prob=True)


SHAPES: dict[str, dict] = {
    "qwen3-0.6b": _dense(28, 1024, 16, 8, 3072, True),
    "qwen3-1.7b": _dense(28, 2048, 16, 8, 6144, True),
    "qwen3-4b": _dense(36, 2560, 32, 8, 9728, True),
    "qwen3-8b": _dense(36, 4096, 32, 8, 12288, False),
    "qwen3-14b": _dense(40, 5120, 40, 8, 17408, False),
    "qwen3-32b": _dense(64, 5120, 64, 8, 25600, False),
    "qwen3-30b-a3b": _moe(48, 2048, 32, 4, 6144, 128, 8, 768),
    "qwen3-235b-a22b": _moe(94, 4096, 64, 4, 12288, 128, 8, 1536),
    # The hybrid generation's text models, from their published configs (layers, widths, heads, experts); the
    # 4B's value-head count and tied embeddings from configs quoted in public code, not read off the hub here.
    "qwen3.5-0.8b": _hybrid("qwen3_5_text", 24, 1024, 8, 2, 3584, True, v_heads=16),
    "qwen3.5-4b": _hybrid("qwen3_5_text", 32, 2560, 16, 4, 9216, True),
    "qwen3.5-35b-a3b": _hybrid_moe("qwen3_5_moe_text", 40, 2048, 16, 2, 256, 8, 512),
    "qwen3-next-80b-a3b": {**_hybrid_moe("qwen3_next", 48, 2048, 16, 2, 512, 10, 512, vocab=151936),
                           "decoder_sparse_step": 1, "mlp_only_layers": []},
    # Qwen3.8-Flash-Next: 48 layers, hidden 2560, 512 experts top-10 as published. The GGUF header llama.cpp's
    # converter writes for it (as public code checks it) gives the rest: 24 query heads, experts and shared expert
    # 640 wide, 4 streams of rank 320, a 4-head x 128 indexer with a 2048-token budget, PLE on the second layer
    # (one-based 2) with 3-grams x 8 heads of 160 (PLE width = hidden) from 20M-row primes: ~51B table parameters.
    # The indexer's block size is our assumption; the EOS that resets the n-grams is the Qwen3.5 vocabulary's
    # <|endoftext|>, as Qwen3.5's configs give it.
    "qwen3.8-flash-next": {**_hybrid_moe("qwen4_exp_text", 48, 2560, 24, 2, 512, 10, 640),
                           "eos_token_id": 248044, "hc_count": 4, "hc_lowrank": 320, "ple_layer_ids": [2],
                           "ngram_size": 3, "heads_per_ngram": 8, "ngram_vocab_size_base": 20_000_000,
                           "indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 128,
                           "indexer_budget": 2048, "indexer_compress_ratio": 4, "output_gate_type": "sigmoid"},
}

# Hugging Face repo of each shape, for messages and defaults.
HF_REPOS = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-14b": "Qwen/Qwen3-14B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
    "qwen3.5-0.8b": "Qwen/Qwen3.5-0.8B",
    "qwen3.5-4b": "Qwen/Qwen3.5-4B",
    "qwen3.5-35b-a3b": "Qwen/Qwen3.5-35B-A3B",
    "qwen3-next-80b-a3b": "Qwen/Qwen3-Next-80B-A3B-Instruct",
    "qwen3.8-flash-next": "Qwen/Qwen3.8-Flash-Next",
}


def shape_config(name: str, **overrides) -> dict:
    """config.json dict of a registry shape (case-insensitive, "Qwen/Qwen3-8B" accepted), with overrides."""
    key = name.lower().split("/")[-1]
    if key not in SHAPES:
        raise Qwen3MLXError(f"unknown model shape {name!r} (known: {', '.join(SHAPES)})")
    return {**SHAPES[key], **overrides}


def random_model(
    config: dict | str,
    dtype: mx.Dtype | None = None,
    seed: int = 0,
    bits: int | None = None,
    group_size: int = 64,
) -> nn.Module:
    """A model of the given shape with random weights, evaluated; quantized in memory when `bits` is given.

    nn's default init (uniform +-1/sqrt(fan_in), norms at 1) keeps activations bounded. Weights are made and
    (optionally) quantized layer by layer, so a float copy of the whole model never exists.
    """
    from ..loader import default_dtype

    if isinstance(config, str):
        config = shape_config(config)
    dtype = dtype or default_dtype()
    mx.random.seed(seed)
    model = build_model(config)  # lazy: nothing is materialised yet
    if dtype != mx.float32:
        model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    if bits is not None:
        from ..quantize import quantize_model

        model.quantization = quantize_model(model, bits=bits, group_size=group_size)
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    model.eval()
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.size for _, p in tree_flatten(model.parameters()))
