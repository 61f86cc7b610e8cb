"""Fused decode layers (kernels.decoder_layers, models/fused.py) against the same model run op by op.

The fused primitive runs the unfused primitives' own serial pieces and product kernels, so every decoded
position must give the same logits bit for bit (the issue asks 1e-5 relative; equality is what the design
promises, and anything less would be a different computation), with the same cache contents after."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen3_mlx import kernels
from qwen3_mlx.models import fused, make_cache

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the compiled extension is not built")


@pytest.fixture
def fused_calls(monkeypatch):
    """The `mlp` flag of every fused node the code under test built (so a test cannot pass on the unfused path)."""
    calls = []
    real = kernels.DecoderPlan

    class Counting:
        def __init__(self, *args, **kw):
            self.plan, self.mlp = real(*args, **kw), kw["mlp"]

        def __call__(self, *args, **kw):
            calls.append(self.mlp)
            return self.plan(*args, **kw)

    monkeypatch.setattr(kernels, "DecoderPlan", Counting)
    return calls


def decode_run(model, ids, steps: int, on: bool):
    """Prefill ids, then `steps` greedy decode steps: (per-step logits, tokens, cache contents)."""
    kernels.set_fused(on)
    try:
        cache = make_cache(model)
        model(ids, cache)
        y = ids[:, -1:]
        logits, tokens = [], []
        for _ in range(steps):
            lg = model(y, cache)[:, -1]
            y = mx.argmax(lg, axis=-1)[:, None]
            logits.append(lg)
            tokens.append(y)
        mx.eval(logits, tokens, [c.state for c in cache])
        return (np.stack([np.array(a) for a in logits]), [int(t.item()) for t in tokens],
                [tuple(np.array(a) for a in c.state) for c in cache])
    finally:
        kernels.set_fused(True)


def assert_same_decode(model, ids, steps, fused_calls, expect_mlp: bool):
    on = decode_run(model, ids, steps, True)
    assert fused_calls and all(m == expect_mlp for m in fused_calls)
    n = len(fused_calls)
    off = decode_run(model, ids, steps, False)
    assert len(fused_calls) == n  # the unfused run built none
    np.testing.assert_array_equal(on[0], off[0])
    assert on[1] == off[1]
    for a, b in zip(on[2], off[2]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def bench_model(bits, group_size=64, seed=0, **overrides):
    from helpers import dense_config

    from qwen3_mlx.bench.models import random_bench_model

    cfg = dict(dense_config(), model_type="qwen3", tie_word_embeddings=True, **overrides)
    return random_bench_model(cfg, bits, group_size, seed=seed)


IDS = mx.array(np.random.default_rng(5).integers(0, 1000, size=(1, 21)))


@pytest.mark.parametrize(
    "bits,group_size,overrides",
    [
        (4, 64, {}),
        (8, 32, {}),
        (4, 128, dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=1, intermediate_size=256)),
        (None, 64, {}),  # float32 weights
        (4, 64, dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024})),
        (4, 64, dict(num_attention_heads=4, num_key_value_heads=4)),
    ],
    ids=["q4", "q8-g32", "q4-g128-rep8", "float32", "yarn", "mha"],
)
def test_fused_decode_equals_unfused(bits, group_size, overrides, fused_calls):
    model = bench_model(bits, group_size, **overrides)
    assert_same_decode(model, IDS, 6, fused_calls, expect_mlp=True)


def test_fused_decode_with_integer_decode_products(fused_calls):
    # QWEN3_MLX_INT8=all: the fused layers prepare their activations exactly as the product primitive does.
    if not kernels.set_int8(2):
        kernels.set_int8(0)
        pytest.skip("no VNNI on this CPU")
    try:
        assert_same_decode(bench_model(4), IDS, 4, fused_calls, expect_mlp=True)
    finally:
        kernels.set_int8(0)


def test_fused_decode_across_cache_growth_and_split_attention(fused_calls):
    # The cache grows in steps of 256 rows (a new buffer mid-decode); from 1024 keys decode attention splits
    # the keys over the threads (two kv heads here) and merges the parts.
    model = bench_model(4)
    ids = mx.array(np.random.default_rng(6).integers(0, 1000, size=(1, 1020)))
    assert_same_decode(model, ids, 8, fused_calls, expect_mlp=True)
    ids = mx.array(np.random.default_rng(7).integers(0, 1000, size=(1, 254)))
    assert_same_decode(model, ids, 4, fused_calls, expect_mlp=True)


def test_mixture_of_experts_layers_fuse_their_attention_half(fused_calls):
    from helpers import moe_config

    from qwen3_mlx.bench.models import random_bench_model

    cfg = dict(moe_config(moe_intermediate_size=64), model_type="qwen3_moe", tie_word_embeddings=True)
    model = random_bench_model(cfg, 4, 64)
    assert_same_decode(model, IDS, 4, fused_calls, expect_mlp=False)


def test_bfloat16_checkpoint_through_the_loader(tmp_path, fused_calls):
    # A bf16 checkpoint keeps bf16 matmul weights on the CPU (widened in registers) and float32 norms; quantized,
    # its scales are bf16 and the embedding's rows come out float32 on our kernels.
    from helpers import dense_config, save_checkpoint

    from qwen3_mlx.loader import load
    from qwen3_mlx.quantize import quantize_model

    save_checkpoint(tmp_path, dense_config(), torch_dtype="bfloat16", tokenizer=True)
    model, _ = load(tmp_path)
    assert model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    assert_same_decode(model, IDS, 4, fused_calls, expect_mlp=True)
    quantize_model(model, bits=4, group_size=64)
    assert model.model.embed_tokens(IDS).dtype == mx.float32
    assert_same_decode(model, IDS, 4, fused_calls, expect_mlp=True)


def test_greedy_generation_is_the_same_fused_or_not(tiny_checkpoint, fused_calls):
    import torch
    from transformers import AutoModelForCausalLM

    from qwen3_mlx.generate import generate
    from qwen3_mlx.loader import load

    model, tokenizer = load(tiny_checkpoint)
    ids = tokenizer.encode("The capital of France is")
    texts = {}
    for on in (True, False):
        kernels.set_fused(on)
        try:
            texts[on] = generate(model, tokenizer, ids, max_tokens=24, temperature=0.0, ignore_eos=True).tokens
        finally:
            kernels.set_fused(True)
    assert fused_calls
    assert len(texts[True]) == 24 and texts[True] == texts[False]
    # and both are transformers' own greedy continuation (the independent reference)
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
    assert texts[True] == out[0, len(ids):].tolist()


def test_paths_the_fused_layers_leave_to_the_ops(fused_calls):
    from qwen3_mlx.models.cache import QuantizedKVCache

    model = bench_model(4, head_dim=32)
    # a prompt (many positions), a batch of two sequences, a quantized KV cache: op by op
    model(IDS, make_cache(model))
    model(mx.concatenate([IDS[:, :1], IDS[:, 1:2]]), make_cache(model))
    cache = [QuantizedKVCache(8, 32) for _ in model.layers]
    model(IDS, cache)
    model(IDS[:, :1], cache)
    model(IDS[:, :1])  # one position without a cache (an embedding of a one-token text)
    assert fused_calls == []
    # our kernels off (MLX's own ops everywhere)
    kernels.set_enabled(False)
    try:
        cache = make_cache(model)
        model(IDS, cache)
        assert fused.decode(model.model, model.layers, model.model.embed_tokens(IDS[:, :1]), cache) is None
    finally:
        kernels.set_enabled(True)
    assert fused_calls == []


def test_a_plan_follows_weight_changes(fused_calls):
    # The plan holds the weights it was built from; a model updated or quantized after a decode must not decode
    # with the old ones.
    from qwen3_mlx.quantize import quantize_model

    model, other = bench_model(None), bench_model(None, seed=1)
    first = decode_run(model, IDS, 2, True)
    model.update(other.parameters())
    got = decode_run(model, IDS, 3, True)
    assert not np.array_equal(first[0], got[0][:2])
    np.testing.assert_array_equal(got[0], decode_run(other, IDS, 3, False)[0])
    for m in (model, other):
        quantize_model(m, bits=4, group_size=64)
    np.testing.assert_array_equal(decode_run(model, IDS, 3, True)[0], decode_run(other, IDS, 3, False)[0])
    assert len(fused_calls) == 2 + 3 + 3  # one node a step: the two layers run as one


def test_decoder_plan_refuses_bad_arguments():
    model = bench_model(4)
    layer = model.layers[0]
    attn = layer.self_attn
    inv = attn.rope._inv_freq
    norms = [layer.input_layernorm.weight, attn.q_norm.weight, attn.k_norm.weight]
    q, k = attn.q_proj, attn.k_proj
    args = dict(heads=4, kv_heads=2, eps=1e-6, scale=0.25, mscale=1.0, mlp=False)
    with pytest.raises(ValueError, match="projs must hold"):
        kernels.DecoderPlan(inv, norms, [4, 64, 1], **args)
    with pytest.raises(ValueError, match=r"projection 1 is \[64, 64\], expected \[32, 64\]"):
        kernels.DecoderPlan(inv, norms + [q.weight, q.scales, q.biases] * 4, [4, 64, 1] * 4, **args)
    arrays = norms + [q.weight, q.scales, q.biases] + [k.weight, k.scales, k.biases] * 2
    arrays += [attn.o_proj.weight, attn.o_proj.scales, attn.o_proj.biases]
    with pytest.raises(ValueError, match="more arrays"):
        kernels.DecoderPlan(inv, arrays + [q.weight], [4, 64, 1] * 4, **args)
    with pytest.raises(ValueError, match="multiple"):
        kernels.DecoderPlan(inv, arrays, [4, 64, 1] * 4, **dict(args, kv_heads=3))
    plan = kernels.DecoderPlan(inv, arrays, [4, 64, 1] * 4, **args)
    x, kb, vb = mx.zeros((1, 1, 64)), mx.zeros((1, 2, 8, 16)), mx.zeros((1, 2, 8, 16))
    with pytest.raises(ValueError, match="position 8 does not fit a key buffer of 8"):
        plan(x, [kb, vb], 8)
    with pytest.raises(ValueError, match="key buffer must be float32"):
        plan(x, [kb[:, :1], vb], 0)
    with pytest.raises(ValueError, match=r"one key and one value buffer per layer \(2\)"):
        plan(x, [kb], 0)
    with pytest.raises(ValueError, match="one float32 position"):
        plan(mx.zeros((1, 2, 64)), [kb, vb], 0)
    with pytest.raises(ValueError, match="its own array"):
        plan(x, [kb, kb], 0)
    out = plan(x, [kb, vb], 3)
    mx.eval(out)
    assert out[0].shape == (1, 1, 64) and out[1].shape == kb.shape


def test_models_the_plan_refuses_decode_op_by_op(fused_calls):
    # float16 norms (a model loaded with dtype=float16), more than 16 query heads per kv head, layers of
    # different MLP widths: no fused node, the same logits as op by op.
    f16 = bench_model(4)
    for layer in f16.layers:
        layer.input_layernorm.weight = layer.input_layernorm.weight.astype(mx.float16)
    wide = bench_model(4, num_attention_heads=36, num_key_value_heads=2)  # 18 per kv head
    mixed = bench_model(4)
    mixed.layers[1].mlp = bench_model(4, intermediate_size=256).layers[1].mlp
    for model in (f16, wide, mixed):
        on = decode_run(model, IDS, 2, True)
        np.testing.assert_array_equal(on[0], decode_run(model, IDS, 2, False)[0])
    assert fused_calls == []


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (4, 128)])
@pytest.mark.parametrize("sdtype", [mx.float32, mx.bfloat16, mx.float16])
def test_quantized_embedding_equals_mlx(bits, group_size, sdtype):
    table = mx.random.normal((300, 256), key=mx.random.key(bits + group_size)) * 0.5
    w, scales, biases = mx.quantize(table, group_size, bits)
    scales, biases = scales.astype(sdtype), biases.astype(sdtype)
    ids = mx.array([[0, 299, 17], [5, 5, -1]])
    ours = kernels._ext.quantized_embedding(ids, w, scales, biases, group_size, bits)
    ref = mx.dequantize(w[ids], scales[ids], biases[ids], group_size=group_size, bits=bits)
    assert ours.dtype == mx.float32 and ours.shape == (2, 3, 256)
    np.testing.assert_array_equal(np.array(ours), np.array(ref.astype(mx.float32)))
    # strided ids, other integer types, ids outside the table (zeros)
    for i in (ids.T, ids.astype(mx.uint32) % 300, ids.astype(mx.int64)):
        ref = mx.dequantize(w[i], scales[i], biases[i], group_size=group_size, bits=bits)
        np.testing.assert_array_equal(np.array(kernels._ext.quantized_embedding(i, w, scales, biases, group_size, bits)),
                                      np.array(ref.astype(mx.float32)))
    out = kernels._ext.quantized_embedding(mx.array([300, -301]), w, scales, biases, group_size, bits)
    assert not np.array(out).any()
    with pytest.raises(ValueError, match="token ids must be"):
        kernels._ext.quantized_embedding(ids.astype(mx.float32), w, scales, biases, group_size, bits)
