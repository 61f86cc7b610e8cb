"""The quantized KV cache: attention read from quantized rows against MLX's attention on the dequantized
cache, the cache's layout against mx.quantize, and generation, chat reuse and the planner with it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3_mlx import kernels
from qwen3_mlx.models.cache import KVCache, QuantizedKVCache, make_cache

needs_ext = pytest.mark.skipif(not kernels.available(), reason="the compiled extension is not built")


def rel_err(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a), np.array(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def quantized_pair(shape, bits, gs, seed, capacity_extra):
    """A key (or value) buffer with spare capacity, quantized as the cache stores it; and its dequantized float
    rows (what the quantized attention must equal)."""
    B, H, S, D = shape
    x = mx.random.normal((B, H, S + capacity_extra, D), key=mx.random.key(seed))
    q = mx.quantize(x, group_size=gs, bits=bits)
    return tuple(a[:, :, :S] for a in q), mx.dequantize(*q, group_size=gs, bits=bits)[:, :, :S]


@needs_ext
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kv_heads=st.sampled_from([1, 2, 8]),
    rep=st.sampled_from([1, 2, 4, 16]),
    d=st.sampled_from([64, 128]),
    length=st.sampled_from([1, 3, 70]),
    cached=st.sampled_from([0, 1, 63, 200, 1100]),
    bits=st.sampled_from([4, 8]),
    gs=st.sampled_from([32, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_quantized_attention_equals_mlx_on_the_dequantized_cache(kv_heads, rep, d, length, cached, bits, gs, seed):
    """Decode (one query row, split over long caches) and prefill (causal, the flash kernel expanding each key
    block), reading a slice of a larger quantized buffer: equal to MLX's attention on the dequantized keys and
    values to float32 rounding, and to MLX's quantized-matmul form (our seam with the kernels off)."""
    if d % gs:
        return
    S = cached + length
    q = mx.random.normal((1, kv_heads * rep, length, d), key=mx.random.key(seed))
    kq, kf = quantized_pair((1, kv_heads, S, d), bits, gs, seed + 1, 17)
    vq, vf = quantized_pair((1, kv_heads, S, d), bits, gs, seed + 2, 17)
    mask = "causal" if length > 1 else None
    ref = mx.fast.scaled_dot_product_attention(q, kf, vf, scale=d**-0.5, mask=mask)
    assert rel_err(kernels.attention(q, kq, vq, scale=d**-0.5, mask=mask), ref) <= 1e-5
    kernels.set_enabled(False)
    try:
        assert rel_err(kernels.attention(q, kq, vq, scale=d**-0.5, mask=mask), ref) <= 1e-4
    finally:
        kernels.set_enabled(True)


@needs_ext
def test_quantized_attention_refuses_bad_layouts():
    q = mx.zeros((1, 2, 1, 64))
    k = mx.quantize(mx.zeros((1, 1, 4, 64)), group_size=64, bits=4)
    with pytest.raises(ValueError, match="words"):
        kernels._ext.quantized_attention(q, list(k), list(k), 1.0, False, 64, 8)  # 4-bit rows read as 8-bit
    k2 = mx.quantize(mx.zeros((1, 2, 4, 64)), group_size=64, bits=4)
    with pytest.raises(ValueError, match="multiple"):
        kernels._ext.quantized_attention(mx.zeros((1, 3, 1, 64)), list(k2), list(k2), 1.0, False, 64, 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_cache_holds_what_mx_quantize_gives_and_grows(bits):
    """Appending in pieces (a prefill chunk, then decode steps, across a capacity step) stores exactly
    mx.quantize of all the rows, in its layout (mlx-lm's), at the bytes per position the planner counts."""
    from qwen3_mlx.fit import kv_bytes_per_token

    x = mx.random.normal((1, 2, 300, 64), key=mx.random.key(0))
    cache = QuantizedKVCache(bits, 32)
    cache.update_and_fetch(x[:, :, :250], x[:, :, :250])
    for i in range(250, 300):
        keys, values = cache.update_and_fetch(x[:, :, i : i + 1], x[:, :, i : i + 1])
    for got, want in zip(keys, mx.quantize(x, group_size=32, bits=bits)):
        assert np.array_equal(np.array(got), np.array(want))
    assert cache.offset == 300 and cache.keys[0].shape[2] == 512  # two steps of 256
    cfg = dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256, num_hidden_layers=1,
               intermediate_size=512, vocab_size=1000)
    assert cache.nbytes == kv_bytes_per_token(cfg, 4, bits, 32) * 512
    with pytest.raises(ValueError, match="divide head_dim"):
        QuantizedKVCache(8, 128).update_and_fetch(x, x)


@pytest.fixture(scope="module")
def small_model():
    from qwen3_mlx.models import qwen3

    cfg = dict(model_type="qwen3", hidden_size=256, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, vocab_size=1000)
    mx.random.seed(0)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    return model


def kl(p_logits: mx.array, q_logits: mx.array) -> mx.array:
    lp = p_logits - mx.logsumexp(p_logits, axis=-1, keepdims=True)
    lq = q_logits - mx.logsumexp(q_logits, axis=-1, keepdims=True)
    return (mx.exp(lp) * (lp - lq)).sum(axis=-1)


@pytest.mark.parametrize("bits,bound", [(8, 1e-4), (4, 1e-2)])
def test_logits_on_a_quantized_cache_stay_close_to_the_float_cache(small_model, bits, bound):
    """KL(float cache || quantized cache) of 100 positions after a 200-token prefix (measured ~6e-6 at 8 bits,
    ~2e-3 at 4 bits on this random model): small, and not zero (the cache really is quantized)."""
    ids = mx.array(np.random.RandomState(0).randint(0, 1000, size=(1, 300)))

    def run(kv_bits):
        cache = make_cache(small_model, kv_bits=kv_bits)
        small_model(ids[:, :200], cache)
        return small_model(ids[:, 200:], cache)

    divergence = kl(run(None), run(bits))
    assert 0 < float(divergence.max()) < bound


def test_generation_quantizes_from_the_start_position(small_model):
    from qwen3_mlx.generate import stream_generate

    prompt = [int(t) for t in np.random.RandomState(1).randint(0, 1000, size=120)]
    for start, kind in ((0, QuantizedKVCache), (50, QuantizedKVCache), (1000, KVCache)):
        cache = make_cache(small_model)
        out = [r.token for r in stream_generate(small_model, None, prompt, max_tokens=5, temperature=0,
                                                prompt_cache=cache, kv_bits=8, quantized_kv_start=start)]
        assert len(out) == 5 and all(type(c) is kind for c in cache)
        assert cache[0].offset == 124
    plain = [r.token for r in stream_generate(small_model, None, prompt, max_tokens=5, temperature=0)]
    eight = [r.token for r in stream_generate(small_model, None, prompt, max_tokens=5, temperature=0, kv_bits=8)]
    assert eight[:2] == plain[:2]  # 8 bits barely moves the logits (KL ~1e-5): the argmax holds here


def test_refusals_name_the_bad_option(small_model):
    from qwen3_mlx.errors import Qwen3MLXError
    from qwen3_mlx.generate import generate

    with pytest.raises(Qwen3MLXError, match="kv_bits must be 4 or 8"):
        generate(small_model, None, [1, 2, 3], max_tokens=1, kv_bits=3)
    with pytest.raises(Qwen3MLXError, match="divide head_dim"):
        generate(small_model, None, [1, 2, 3], max_tokens=1, kv_bits=8, kv_group_size=48)
    with pytest.raises(Qwen3MLXError, match="quantized_kv_start"):
        generate(small_model, None, [1, 2, 3], max_tokens=1, kv_bits=8, quantized_kv_start=-1)


def test_the_group_size_left_open_is_picked_for_head_dim():
    """--kv-bits without --kv-group-size: 64 where it divides head_dim (mlx-lm's default), else the largest of
    128 / 64 / 32 that does; a group the user chose that does not divide it stays an error."""
    from qwen3_mlx.errors import Qwen3MLXError
    from qwen3_mlx.generate import generate
    from qwen3_mlx.models import qwen3
    from qwen3_mlx.options import GenerationOptions

    def model_with(head_dim):
        cfg = dict(model_type="qwen3", hidden_size=64, num_hidden_layers=1, intermediate_size=64,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, vocab_size=100)
        return qwen3.Model(qwen3.ModelArgs.from_dict(cfg))

    assert GenerationOptions(kv_bits=8).validate(model_with(128).args).kv_group_size == 64
    small = model_with(32)
    assert GenerationOptions(kv_bits=8).validate(small.args).kv_group_size == 32
    picked = generate(small, None, list(range(40)), max_tokens=6, temperature=0, kv_bits=8, ignore_eos=True).tokens
    chosen = generate(small, None, list(range(40)), max_tokens=6, temperature=0, kv_bits=8, kv_group_size=32,
                      ignore_eos=True).tokens
    assert picked == chosen
    cache = make_cache(small)
    generate(small, None, list(range(40)), max_tokens=2, temperature=0, kv_bits=8, prompt_cache=cache)
    keys, _ = cache[0].state  # what mx.quantize gives for groups of 32 along head_dim 32: one scale a row
    assert isinstance(cache[0], QuantizedKVCache) and keys.scales.shape[-1] == 1 and keys.words.shape[-1] == 32 * 8 // 32
    with pytest.raises(Qwen3MLXError, match="divide head_dim \\(32\\), got 64"):
        generate(small, None, [1, 2, 3], max_tokens=1, kv_bits=8, kv_group_size=64)
    with pytest.raises(Qwen3MLXError, match="no KV cache group size .* divides head_dim \\(48\\)"):
        generate(model_with(48), None, [1, 2, 3], max_tokens=1, kv_bits=8)


def test_chat_reuses_a_quantized_cache_across_turns(tmp_path):
    """A chat with --kv-bits keeps its turn-to-turn reuse: the second turn reuses as many tokens as with a
    float cache (everything up to where the re-rendered history first differs) and prefills only the rest."""
    from helpers import REAL_VOCAB, dense_config, save_checkpoint

    from qwen3_mlx.chat import ChatSession
    from qwen3_mlx.loader import load

    save_checkpoint(tmp_path, dense_config(vocab_size=REAL_VOCAB, head_dim=64, hidden_size=128), tokenizer=True)
    model, tokenizer = load(tmp_path)
    reused = {}
    for kv in ({}, {"kv_bits": 8, "kv_group_size": 32}):
        session = ChatSession(model, tokenizer, enable_thinking=False, max_tokens=6, temperature=0, **kv)
        for text in ("Hello", "And again"):
            list(session.send(text))
        first, second = session.history
        assert all(isinstance(c, QuantizedKVCache if kv else KVCache) for c in session.cache)
        reused[bool(kv)] = second.reused_tokens
        assert second.prefill_tokens == second.prompt_tokens - second.reused_tokens
    assert reused[True] == reused[False] > 0


def test_the_server_engine_batches_quantized_caches_exactly_as_generate_alone(tmp_path):
    """`serve --kv-bits 8`: six requests batched (float until 10 positions, then quantized) give exactly what
    generate gives each alone with the same KV options."""
    import asyncio

    from helpers import REAL_VOCAB, dense_config, save_checkpoint

    from qwen3_mlx.generate import generate, prompt_tokens
    from qwen3_mlx.loader import load
    from qwen3_mlx.options import GenerationOptions
    from qwen3_mlx.server.engine import Engine, Job

    save_checkpoint(tmp_path, dense_config(vocab_size=REAL_VOCAB, head_dim=64, hidden_size=128), tokenizer=True)
    model, tokenizer = load(tmp_path)
    kv = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=10)
    prompts = [[{"role": "user", "content": f"Hello {i} " + "x" * (i * 37)}] for i in range(6)]
    options = [dict(max_tokens=12 + 3 * i, temperature=0, enable_thinking=bool(i % 2)) for i in range(6)]
    expected = [generate(model, tokenizer, p, **o, **kv).tokens for p, o in zip(prompts, options)]

    async def run():
        engine = Engine(model, tokenizer, max_concurrency=6, prompt_cache_bytes=0)
        loop = asyncio.get_running_loop()
        jobs = [Job(prompt_tokens(tokenizer, p, GenerationOptions(enable_thinking=o["enable_thinking"])), GenerationOptions(**o, **kv), loop)
                for p, o in zip(prompts, options)]
        for j in jobs:
            engine.submit(j)

        async def tokens(job):
            out = []
            while True:
                kind, value = await job.out.get()
                if kind == "done":
                    return out
                assert kind == "token", value
                out.append(value.token)

        try:
            return await asyncio.gather(*map(tokens, jobs)), engine.peak_batch
        finally:
            engine.close()

    got, peak = asyncio.run(run())
    assert got == expected and peak >= 2


@pytest.mark.parametrize("kv_bits", [pytest.param(None, marks=pytest.mark.slow), 8])  # the float cache: slow set
def test_a_32k_prompt_with_yarn_matches_transformers_at_the_last_positions(tmp_path, kv_bits):
    """Long context: a tiny model with YaRN (factor 4, max_position_embeddings 131072) prefilled with 32768
    tokens in 512-token chunks (memory bounded by the chunk); the last 8 positions' logits equal transformers'
    (sdpa attention over the whole prompt) to float32 rounding, and stay close with an 8-bit cache."""
    import torch
    from helpers import dense_config, save_checkpoint

    from qwen3_mlx.loader import load_model

    n = 32768
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    torch_model = save_checkpoint(tmp_path, dense_config(head_dim=32, max_position_embeddings=131072,
                                                         rope_scaling=yarn))
    ids = np.random.default_rng(0).integers(0, 1000, size=n)
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)[None], logits_to_keep=8).logits[0].float().numpy()  # [8, vocab]
    model, _ = load_model(tmp_path, dtype=mx.float32)
    cache = make_cache(model, kv_bits=kv_bits, kv_group_size=32)
    mx.reset_peak_memory()
    for i in range(0, n - 8, 512):
        model(mx.array(ids[i : min(i + 512, n - 8)])[None], cache)
        mx.eval([c.state for c in cache])
    ours = np.array(model(mx.array(ids[n - 8 :])[None], cache)[0])
    diff = float(np.abs(ours - ref).max())
    print(f"32K PARITY kv_bits={kv_bits}: max|diff| = {diff:.2e}, peak {mx.get_peak_memory() / 1e6:.0f} MB")
    assert diff <= (1e-4 if kv_bits is None else 5e-2) * max(1.0, float(np.abs(ref).max()))
