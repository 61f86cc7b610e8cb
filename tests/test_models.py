"""Our MLX Qwen3 / Qwen3-MoE against transformers' own implementation, on checkpoints it wrote."""

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import dense_config, moe_config, reference_logits, save_checkpoint

from qwen3_mlx import load_model
from qwen3_mlx.models import make_cache
from qwen3_mlx.quantize import quantize_model

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}

CONFIGS = {
    "dense-untied": (dense_config(), False, {}),
    "dense-tied-nonsquare-q": (
        dense_config(tie_word_embeddings=True, num_attention_heads=8, head_dim=32), False, {}
    ),
    "dense-headdim64-yarn": (dense_config(head_dim=64, rope_scaling=YARN), False, {}),
    "dense-sharded-bf16": (dense_config(num_hidden_layers=3), False, {"max_shard_size": "60KB", "torch_dtype": "bfloat16"}),
    "moe-sparse-step2-mlp-only": (
        moe_config(decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True), True, {}
    ),
    "moe-no-norm-topk-yarn": (moe_config(norm_topk_prob=False, rope_scaling=YARN), True, {}),
    "moe-sharded-tied": (
        moe_config(tie_word_embeddings=True, num_hidden_layers=2), True, {"max_shard_size": "40KB"}
    ),
}

PROMPT_LEN = 40  # long enough for YaRN's interpolated band and for the MoE's sorted-prefill path


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    cfg, moe, kwargs = CONFIGS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    torch_model = save_checkpoint(path, cfg, moe=moe, **kwargs)
    if "max_shard_size" in kwargs:  # the sharded configs really are: loading must go through the index
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    return request.param, path, torch_model


def prompt(vocab=1000, n=PROMPT_LEN, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(1, n))


def test_logits_match_transformers(checkpoint):
    name, path, torch_model = checkpoint
    if "bf16" in name:
        # Compare against the weights as stored (bf16-rounded), both computed in float32.
        torch_model = type(torch_model).from_pretrained(path, dtype="float32").eval()
    model, _ = load_model(path, dtype=mx.float32)
    ids = prompt()
    ours = np.array(model(mx.array(ids)))
    ref = reference_logits(torch_model, ids)
    diff = float(np.abs(ours - ref).max())
    print(f"PARITY {name}: max|diff| = {diff:.2e}")
    assert ours.shape == ref.shape
    assert diff <= 1e-4


def test_incremental_decode_equals_full_forward(checkpoint):
    _, path, _ = checkpoint
    model, _ = load_model(path)
    ids = mx.array(prompt(n=24))
    full = model(ids)
    cache = make_cache(model)
    steps = [model(ids[:, :16], cache)[:, -1]]
    for i in range(16, 24):
        steps.append(model(ids[:, i : i + 1], cache)[:, -1])
    inc = mx.stack(steps[1:], axis=1)
    assert cache[0].offset == 24
    np.testing.assert_allclose(np.array(inc), np.array(full[:, 16:]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array(steps[0]), np.array(full[:, 15]), atol=1e-4, rtol=0)


def test_chunked_prefill_equals_single(checkpoint):
    _, path, _ = checkpoint
    model, _ = load_model(path)
    ids = mx.array(prompt(n=PROMPT_LEN))
    single = model(ids, make_cache(model))
    cache = make_cache(model)
    chunks = [model(ids[:, i : i + 13], cache) for i in range(0, PROMPT_LEN, 13)]
    chunked = mx.concatenate(chunks, axis=1)
    np.testing.assert_allclose(np.array(chunked), np.array(single), atol=1e-4, rtol=0)


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) over positions, from logits."""
    p = p_logits - p_logits.max(-1, keepdims=True)
    q = q_logits - q_logits.max(-1, keepdims=True)
    logp = p - np.log(np.exp(p).sum(-1, keepdims=True))
    logq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    return float((np.exp(logp) * (logp - logq)).sum(-1).mean())


@pytest.mark.parametrize("bits,limit", [(8, 0.01), (4, 0.3)])
def test_quantized_model_close_to_float(checkpoint, bits, limit):
    name, path, _ = checkpoint
    ids = mx.array(prompt())
    model, _ = load_model(path)
    ref = np.array(model(ids))
    qmodel, _ = load_model(path)
    quantization = quantize_model(qmodel, bits=bits, group_size=32)
    ours = np.array(qmodel(ids))
    kl = kl_divergence(ref, ours)
    print(f"KL {name} {bits}-bit g32: {kl:.4g}")
    assert kl < limit
    # the quantized path really ran: weights are packed, and logits are not identical to float
    assert qmodel.model.layers[0].self_attn.q_proj.weight.dtype == mx.uint32
    assert np.abs(ours - ref).max() > 0
    if name.startswith("moe"):
        assert any(k.endswith("mlp.gate") for k in quantization) or bits == 8
