"""Our CPU kernels (qwen3_mlx/kernels) against MLX's own ops on the same inputs, and the models with them on/off."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3_mlx import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the compiled extension is not built")
ext = kernels._ext

ROWS = [1, 2, 3, 7, 64, 130]
SCALE_DTYPES = [mx.float32, mx.bfloat16, mx.float16]
RTOL = 1e-5  # the bound on layer outputs, relative to the output's scale


def rel_err(ours: mx.array, ref: mx.array) -> float:
    a, b = np.array(ours.astype(mx.float32)), np.array(ref.astype(mx.float32))
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def dot_err(ours: mx.array, ref: mx.array, x: mx.array, w: mx.array) -> float:
    """Error relative to sum |x| |w| of each output: the scale float32 rounding of a dot product works at
    (a single output whose terms cancel makes the plain relative error meaningless)."""
    a, b = np.array(ours.astype(mx.float32)), np.array(ref.astype(mx.float32))
    assert a.shape == b.shape
    bound = np.abs(np.array(x.astype(mx.float32))) @ np.abs(np.array(w.astype(mx.float32))).T
    return float((np.abs(a - b) / np.maximum(bound, 1e-30)).max())


def quantized(shape, bits, gs, sdtype, seed):
    w = mx.random.normal(shape, key=mx.random.key(seed)) * 0.05
    wq, s, b = mx.quantize(w, gs, bits)
    return wq, s.astype(sdtype), b.astype(sdtype)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.sampled_from(ROWS),
    n=st.integers(1, 300),
    groups=st.integers(1, 4),
    bits=st.sampled_from([4, 8]),
    gs=st.sampled_from([32, 64, 128]),
    sdtype=st.sampled_from(SCALE_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_quantized_matmul_equals_mlx(rows, n, groups, bits, gs, sdtype, seed):
    k = groups * gs
    wq, s, b = quantized((n, k), bits, gs, sdtype, seed)
    x = mx.random.normal((rows, k), key=mx.random.key(seed + 1)).astype(sdtype)
    ref = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits)
    ours = ext.quantized_matmul(x, wq, s, b, gs, bits)
    assert ours.dtype == ref.dtype
    # MLX computes in the activations' dtype; compare in float32 where the kernels' bound applies.
    w = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), gs, bits)
    if sdtype == mx.float32:
        assert dot_err(ours, ref, x, w) <= RTOL
    else:
        x32 = x.astype(mx.float32)
        ref32 = mx.quantized_matmul(
            x32, wq, s.astype(mx.float32), b.astype(mx.float32), transpose=True, group_size=gs, bits=bits
        )
        assert dot_err(ext.quantized_matmul(x32, wq, s, b, gs, bits), ref32, x32, w) <= RTOL


def test_quantized_matmul_batched_shapes_and_no_biases():
    wq, s, b = quantized((96, 256), 4, 64, mx.float32, 0)
    x = mx.random.normal((2, 5, 256), key=mx.random.key(1))
    ref = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
    assert rel_err(ext.quantized_matmul(x, wq, s, b, 64, 4), ref) <= RTOL
    zeros = mx.zeros_like(b)
    ref0 = mx.quantized_matmul(x, wq, s, zeros, transpose=True, group_size=64, bits=4)
    assert rel_err(ext.quantized_matmul(x, wq, s, None, 64, 4), ref0) <= RTOL
    # the seam leaves a bias-less affine call to MLX, which refuses it, kernels on or off
    with pytest.raises(ValueError, match="[Bb]iases"):
        kernels.quantized_matmul(x, wq, s, None, group_size=64, bits=4)


def test_output_dtypes_follow_mlx_promotion():
    wq, s, b = quantized((16, 64), 4, 32, mx.float32, 1)
    xb = mx.ones((2, 64), dtype=mx.bfloat16)
    ref = mx.quantized_matmul(xb, wq, s, b, transpose=True, group_size=32, bits=4)
    assert ext.quantized_matmul(xb, wq, s, b, 32, 4).dtype == ref.dtype == mx.float32
    w = mx.ones((3, 64))
    assert kernels.linear(xb, w).dtype == (xb @ w.T).dtype == mx.float32
    assert kernels.linear(xb, w.astype(mx.bfloat16)).dtype == mx.bfloat16


def test_empty_shapes_give_mlx_results():
    x, w = mx.ones((2, 4)), mx.ones((0, 4))
    assert ext.matmul(x, w).shape == (2, 0)
    assert np.array_equal(np.array(ext.matmul(mx.ones((2, 0)), mx.ones((3, 0)))), np.zeros((2, 3)))
    assert ext.matmul(mx.ones((0, 4)), mx.ones((3, 4))).shape == (0, 3)
    with pytest.raises(ValueError, match="unknown attention mask"):
        kernels.attention(mx.ones((1, 2, 1, 8)), mx.ones((1, 1, 3, 8)), mx.ones((1, 1, 3, 8)), scale=1.0, mask="nope")


def test_outputs_join_the_lazy_graph_and_take_views():
    """An mx.array goes in and out (the nanobind pin is right) and composes with MLX ops, views included."""
    wq, s, b = quantized((64, 128), 8, 32, mx.float32, 2)
    x = mx.random.normal((8, 256), key=mx.random.key(3))[:, ::2]  # a strided view
    y = ext.quantized_matmul(x, wq, s, b, 32, 8) + 1
    ref = mx.quantized_matmul(mx.array(np.array(x)), wq, s, b, transpose=True, group_size=32, bits=8) + 1
    assert rel_err(y, ref) <= RTOL
    assert rel_err(mx.compile(lambda v: ext.quantized_matmul(v, wq, s, b, 32, 8) * 2)(x), ref * 2 - 2) <= RTOL
    # evaluated weights that are strided views (every other row) are copied, not read as if contiguous
    w2, s2, b2 = wq[::2], s[::2], b[::2]
    mx.eval(w2, s2, b2)
    ref2 = mx.quantized_matmul(x, mx.array(np.array(w2)), mx.array(np.array(s2)), mx.array(np.array(b2)),
                               transpose=True, group_size=32, bits=8)
    assert rel_err(ext.quantized_matmul(x, w2, s2, b2, 32, 8), ref2) <= RTOL
    wf = mx.random.normal((128, 40), key=mx.random.key(8))
    mx.eval(wf)
    assert rel_err(ext.matmul(x, wf.T), x @ wf) <= RTOL  # a transposed float weight


def test_bad_arguments_raise_clear_errors():
    wq, s, b = quantized((16, 64), 4, 32, mx.float32, 4)
    x = mx.zeros((1, 64))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        ext.quantized_matmul(x, wq, s, b, 32, 3)
    with pytest.raises(ValueError, match="does not match input dims"):
        ext.quantized_matmul(mx.zeros((1, 128)), wq, s, b, 32, 4)
    with pytest.raises(ValueError, match="scales"):
        ext.quantized_matmul(x, wq, s[:, :1], b, 32, 4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.sampled_from([1, 2, 3, 7, 40]),
    experts=st.integers(1, 9),
    top_k=st.integers(1, 4),
    n=st.integers(1, 100),
    bits=st.sampled_from([4, 8]),
    gs=st.sampled_from([32, 64]),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gather_qmm_equals_mlx(tokens, experts, top_k, n, bits, gs, shared, seed):
    k = 2 * gs
    wq, s, b = quantized((experts, n, k), bits, gs, mx.float32, seed)
    rng = np.random.default_rng(seed)
    idx = mx.array(rng.integers(0, experts, size=(tokens, top_k)), dtype=mx.uint32)  # unsorted, repeats
    x = mx.random.normal((tokens, k) if shared else (tokens, top_k, k), key=mx.random.key(seed + 1))
    rows = mx.expand_dims(x, (-2, -3)) if shared else mx.expand_dims(x, -2)
    ref = mx.gather_qmm(rows, wq, s, b, rhs_indices=idx, transpose=True, group_size=gs, bits=bits).squeeze(-2)
    ours = ext.gather_qmm(x, wq, s, b, idx, gs, bits)
    assert ours.shape == (tokens, top_k, n)
    w = mx.dequantize(wq, s, b, gs, bits)  # [E, n, k]
    xs = mx.broadcast_to(mx.expand_dims(x, -2), (tokens, top_k, k)) if shared else x
    bound = np.einsum("tjk,tjnk->tjn", np.abs(np.array(xs)), np.abs(np.array(w))[np.array(idx)])
    assert float((np.abs(np.array(ours) - np.array(ref)) / np.maximum(bound, 1e-30)).max()) <= RTOL


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("tokens,experts,top_k,n,k,shared", [(1, 8, 2, 64, 32, True), (30, 16, 4, 96, 64, True),
                                                            (5, 4, 2, 7, 13, False), (70, 8, 8, 33, 48, True)])
def test_float_gather_mm_equals_mlx(tokens, experts, top_k, n, k, shared, bf16):
    w = mx.random.normal((experts, n, k), key=mx.random.key(n))
    w = w.astype(mx.bfloat16) if bf16 else w
    x = mx.random.normal((tokens, k) if shared else (tokens, top_k, k), key=mx.random.key(k))
    idx = mx.array(np.random.default_rng(tokens).integers(0, experts, size=(tokens, top_k)), dtype=mx.uint32)
    rows = mx.expand_dims(x, (-2, -3)) if shared else mx.expand_dims(x, -2)
    ref = mx.gather_mm(rows, w.astype(mx.float32).swapaxes(-1, -2), rhs_indices=idx).squeeze(-2)
    assert rel_err(ext.gather_mm(x, w, idx), ref) <= RTOL


def test_gather_qmm_out_of_range_expert_gives_zeros():
    wq, s, b = quantized((3, 8, 64), 4, 32, mx.float32, 5)
    idx = mx.array([[0, 7], [2, -1]], dtype=mx.int32)
    y = np.array(ext.gather_qmm(mx.ones((2, 64)), wq, s, b, idx, 32, 4))
    assert np.all(y[0, 1] == 0) and np.all(y[1, 1] == 0) and np.any(y[0, 0] != 0)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.sampled_from(ROWS), n=st.integers(1, 200), k=st.integers(1, 300),
    bf16=st.booleans(), seed=st.integers(0, 2**16),
)
def test_float_matmul_equals_mlx(rows, n, k, bf16, seed):
    w = mx.random.normal((n, k), key=mx.random.key(seed))
    w = w.astype(mx.bfloat16) if bf16 else w
    x = mx.random.normal((rows, k), key=mx.random.key(seed + 1))
    ref = x @ w.astype(mx.float32).T
    assert dot_err(ext.matmul(x, w), ref, x, w) <= RTOL


# ---- every instruction set and thread count gives MLX's values -------------------------------------------

CHECK = textwrap.dedent(
    """
    import mlx.core as mx, numpy as np
    from qwen3_mlx import kernels
    ext = kernels._ext
    worst = 0.0
    for i, (m, n, k, bits, gs) in enumerate([(1, 37, 128, 4, 32), (7, 300, 256, 8, 64), (130, 65, 256, 4, 128),
                                              (3, 151, 384, 4, 64), (64, 9, 64, 8, 32)]):
        w = mx.random.normal((n, k), key=mx.random.key(i)) * 0.05
        wq, s, b = mx.quantize(w, gs, bits)
        x = mx.random.normal((m, k), key=mx.random.key(i + 100))
        ref = np.array(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits))
        out = np.array(ext.quantized_matmul(x, wq, s, b, gs, bits))
        worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
        e = mx.array(np.random.default_rng(i).integers(0, 4, size=(m, 2)), dtype=mx.uint32)
        wq3, s3, b3 = mx.quantize(mx.random.normal((4, n, k), key=mx.random.key(i)) * 0.05, gs, bits)
        ref = np.array(mx.gather_qmm(mx.expand_dims(x, (-2, -3)), wq3, s3, b3, rhs_indices=e, transpose=True,
                                     group_size=gs, bits=bits).squeeze(-2))
        out = np.array(ext.gather_qmm(x, wq3, s3, b3, e, gs, bits))
        worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
        wf = mx.random.normal((n, k + 3), key=mx.random.key(i))
        xf = mx.random.normal((m + 64, k + 3), key=mx.random.key(i + 7))  # 64+ rows: the BLAS path when on
        worst = max(worst, float(np.abs(np.array(ext.matmul(xf, wf) - xf @ wf.T)).max() / np.abs(np.array(xf @ wf.T)).max()))
    for i, (h, hkv, l, s_, d) in enumerate([(4, 2, 7, 7, 16), (8, 1, 70, 133, 128), (2, 2, 3, 65, 64)]):
        q = mx.random.normal((1, h, l, d), key=mx.random.key(i))
        k = mx.random.normal((1, hkv, s_, d), key=mx.random.key(i + 1))
        v = mx.random.normal((1, hkv, s_, d), key=mx.random.key(i + 2))
        ref = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask="causal"))
        out = np.array(ext.attention(q, k, v, d**-0.5, True))
        worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
    print(ext.isa(), ext.threads(), worst)
    """
)


@pytest.mark.parametrize(
    "isa,threads,blas", [("avx512", 2, "1"), ("avx512", 2, "0"), ("avx2", 2, "0"), ("generic", 2, "0"), ("avx512", 1, "1"),
                         ("avx512", 3, "1")]
)
def test_each_instruction_set_and_thread_count(isa, threads, blas):
    """Each kernel table and thread count, with float32 GEMMs of 64+ rows on OpenBLAS (blas "1") or on ours."""
    env = dict(os.environ, QWEN3_MLX_ISA=isa, QWEN3_MLX_THREADS=str(threads), QWEN3_MLX_BLAS=blas)
    r = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got_isa, got_threads, worst = r.stdout.split()
    if got_isa != isa:
        pytest.skip(f"this CPU has no {isa} (ran {got_isa})")
    assert int(got_threads) == threads
    assert float(worst) <= RTOL


# ---- models: kernels on and off give the same logits -------------------------------------------------------


@pytest.mark.parametrize("moe", [False, True])
def test_quantized_model_logits_with_kernels_on_and_off(moe):
    from helpers import dense_config, moe_config

    from qwen3_mlx.bench.models import random_bench_model
    from qwen3_mlx.models import make_cache

    cfg = moe_config(moe_intermediate_size=64, num_experts=8, num_experts_per_tok=4) if moe else dense_config()
    cfg = dict(cfg, model_type="qwen3_moe" if moe else "qwen3", tie_word_embeddings=True)
    model = random_bench_model(cfg, 4, 64)
    ids = mx.array(np.random.default_rng(3).integers(0, 1000, size=(1, 30)))

    def run():
        cache = make_cache(model)
        prefill = model(ids[:, :24], cache)  # 24 x 4 = 96 (token, expert) pairs: MLX's sorted path when off
        steps = [model(ids[:, i : i + 1], cache)[:, -1] for i in range(24, 30)]
        return prefill, mx.stack(steps, axis=1)

    on = run()
    kernels.set_enabled(False)
    try:
        off = run()
    finally:
        kernels.set_enabled(True)
    for a, b in zip(on, off):
        assert rel_err(a, b) <= RTOL
    assert rel_err(on[1], model(ids)[:, 24:]) <= 1e-4  # cached decode = full forward


@pytest.mark.parametrize("moe", [False, True])
def test_float_model_logits_with_kernels_on_and_off(moe):
    from helpers import dense_config, moe_config

    from qwen3_mlx.bench.models import random_bench_model

    cfg = dict(moe_config(), model_type="qwen3_moe") if moe else dict(dense_config(), model_type="qwen3")
    model = random_bench_model(dict(cfg, tie_word_embeddings=True), None, 64)
    ids = mx.array(np.random.default_rng(4).integers(0, 1000, size=(2, 17)))
    on = model(ids)
    kernels.set_enabled(False)
    try:
        off = model(ids)
    finally:
        kernels.set_enabled(True)
    assert rel_err(on, off) <= RTOL


# ---- without the extension the package still runs, and says so once --------------------------------------

BLOCKED = textwrap.dedent(
    """
    import sys
    sys.modules["qwen3_mlx.kernels._ext"] = None  # as if it had not been built
    import mlx.core as mx
    from qwen3_mlx import kernels
    from qwen3_mlx.bench.models import random_bench_model
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, model_type="qwen3", tie_word_embeddings=True)
    model = random_bench_model(cfg, 4, 64)
    a = model(mx.array([[1, 2, 3]]))
    b = model(mx.array([[1, 2, 3]]))
    print(kernels.describe()["kernels"], float(mx.abs(a - b).max()), a.shape)
    """
)


def test_package_runs_without_the_extension():
    r = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "mlx"
    assert r.stderr.count("CPU kernels unavailable") == 1, r.stderr


@pytest.mark.parametrize(
    "L,S,heads,kv_heads", [(1, 1, 4, 2), (1, 37, 8, 2), (1, 300, 16, 1), (2, 2, 4, 2), (3, 37, 8, 2), (13, 13, 4, 4), (5, 40, 6, 3)]
)
@pytest.mark.parametrize("mask", [None, "causal", "array"])
def test_attention_equals_mlx_sdpa(L, S, heads, kv_heads, mask):
    q = mx.random.normal((2, heads, L, 32), key=mx.random.key(L))
    k = mx.random.normal((2, kv_heads, S, 32), key=mx.random.key(S))
    v = mx.random.normal((2, kv_heads, S, 32), key=mx.random.key(S + 1))
    if mask == "array":
        mask = mx.random.normal((L, S), key=mx.random.key(9))
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=32**-0.5, mask=mask)
    assert rel_err(kernels.attention(q, k, v, scale=32**-0.5, mask=mask), ref) <= RTOL


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kv_heads=st.sampled_from([1, 2, 8]),
    rep=st.sampled_from([1, 2, 4, 8]),
    d=st.sampled_from([64, 128]),
    length=st.sampled_from([1, 2, 7, 64, 130]),
    cached=st.sampled_from([0, 1, 63, 64, 65, 300, 471]),
    causal=st.booleans(),
    in_cache=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_prefill_attention_equals_mlx_sdpa(kv_heads, rep, d, length, cached, causal, in_cache, seed):
    """Every GQA ratio Qwen3 uses, both head sizes, odd key counts and cache offsets; K and V either fresh or a
    slice of a larger cache buffer (read in place by their strides)."""
    S = length + cached
    q = mx.random.normal((1, kv_heads * rep, length, d), key=mx.random.key(seed))
    if in_cache:
        buf = mx.random.normal((2, 1, kv_heads, S + 40, d), key=mx.random.key(seed + 1))
        k, v = buf[0, :, :, :S], buf[1, :, :, :S]
    else:
        k = mx.random.normal((1, kv_heads, S, d), key=mx.random.key(seed + 1))
        v = mx.random.normal((1, kv_heads, S, d), key=mx.random.key(seed + 2))
    mask = "causal" if causal else None
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask=mask)
    ours = ext.attention(q, k, v, d**-0.5, causal)
    assert rel_err(ours, ref) <= RTOL


def test_prefill_attention_reads_strided_queries_and_refuses_bad_shapes():
    q = mx.random.normal((1, 9, 4, 16), key=mx.random.key(1)).swapaxes(1, 2)  # [1, 4, 9, 16], strided
    k = mx.random.normal((1, 2, 12, 16), key=mx.random.key(2))
    ref = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.25, mask="causal")
    assert rel_err(ext.attention(q, k, k, 0.25, True), ref) <= RTOL
    with pytest.raises(ValueError, match="at least as many keys"):
        ext.attention(mx.zeros((1, 2, 5, 8)), mx.zeros((1, 2, 4, 8)), mx.zeros((1, 2, 4, 8)), 1.0, True)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ext.attention(mx.zeros((1, 3, 5, 8)), mx.zeros((1, 2, 5, 8)), mx.zeros((1, 2, 5, 8)), 1.0, False)


@pytest.mark.parametrize("batch,heads,kv_heads,S", [(1, 8, 1, 1024), (1, 16, 2, 2500), (2, 4, 1, 1537), (1, 4, 1, 1023)])
def test_decode_attention_split_over_long_caches(batch, heads, kv_heads, S):
    """Fewer kv heads than threads x 2: the keys are cut into ranges merged afterwards (split-K), read in place."""
    q = mx.random.normal((batch, heads, 1, 64), key=mx.random.key(S))
    buf = mx.random.normal((batch, kv_heads, S + 64, 64), key=mx.random.key(S + 1)) * 2
    k, v = buf[:, :, :S], buf[:, :, 5 : S + 5]
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125)
    assert rel_err(ext.decode_attention(q, k, v, 0.125), ref) <= RTOL


def test_decode_attention_reads_a_cache_slice_in_place():
    """The KV cache hands attention a slice of a larger buffer (and may be strided): same values as SDPA."""
    buf = mx.random.normal((2, 4, 64, 32), key=mx.random.key(0))
    vbuf = mx.random.normal((2, 4, 64, 32), key=mx.random.key(1))
    mx.eval(buf, vbuf)
    tbuf = mx.random.normal((2, 4, 32, 64), key=mx.random.key(3))  # transposed: the head dim is strided
    mx.eval(tbuf)
    q = mx.random.normal((2, 8, 1, 32), key=mx.random.key(2))
    for k, v in ((buf[:, :, :23], vbuf[:, :, :23]), (buf[:, :, ::2], vbuf[:, :, 1::2]),
                 (tbuf.swapaxes(-1, -2), vbuf)):
        ref = mx.fast.scaled_dot_product_attention(q, mx.array(np.array(k)), mx.array(np.array(v)), scale=0.3)
        assert rel_err(ext.decode_attention(q, k, v, 0.3), ref) <= RTOL


def test_batched_matmul_broadcasts_grouped_weights():
    x = mx.random.normal((2, 6, 5, 48), key=mx.random.key(0))
    w = mx.random.normal((2, 3, 7, 48), key=mx.random.key(1))
    ref = x @ mx.repeat(w, 2, axis=1).swapaxes(-1, -2)
    assert rel_err(ext.matmul(x, w), ref) <= RTOL
    with pytest.raises(ValueError, match="does not divide"):
        ext.matmul(x, mx.zeros((2, 4, 7, 48)))


def test_strided_activations_and_indices_are_read_by_their_strides():
    """Activations and expert ids reach the kernels as views (transposes, slices): read by their strides."""
    wq, s, b = quantized((40, 128), 4, 64, mx.float32, 11)
    xt = mx.random.normal((128, 6), key=mx.random.key(12)).T  # [6, 128], column-major
    ref = mx.quantized_matmul(mx.array(np.array(xt)), wq, s, b, transpose=True, group_size=64, bits=4)
    assert rel_err(ext.quantized_matmul(xt, wq, s, b, 64, 4), ref) <= RTOL
    we, se, be = quantized((5, 40, 128), 8, 64, mx.float32, 13)
    idx = mx.array(np.random.default_rng(0).integers(0, 5, size=(6, 7)), dtype=mx.uint32)[:, 1:6:2]  # strided
    rows = mx.expand_dims(mx.array(np.array(xt)), (-2, -3))
    ref = mx.gather_qmm(rows, we, se, be, rhs_indices=mx.array(np.array(idx)), transpose=True, group_size=64,
                        bits=8).squeeze(-2)
    assert rel_err(ext.gather_qmm(xt, we, se, be, idx, 64, 8), ref) <= RTOL
    wf = mx.random.normal((9, 128), key=mx.random.key(14))
    assert rel_err(ext.matmul(xt, wf), mx.array(np.array(xt)) @ wf.T) <= RTOL
    q = mx.random.normal((2, 1, 4, 32), key=mx.random.key(15)).swapaxes(1, 2)  # [2, 4, 1, 32] strided
    k = mx.random.normal((2, 2, 9, 32), key=mx.random.key(16))
    ref = mx.fast.scaled_dot_product_attention(mx.array(np.array(q)), k, k, scale=0.2)
    assert rel_err(ext.decode_attention(q, k, k, 0.2), ref) <= RTOL


@pytest.mark.parametrize("shape", [(1, 1, 7), (1, 3, 3072), (2, 130, 200)])
def test_swiglu_equals_mlx(shape):
    g = mx.random.normal(shape, key=mx.random.key(1)) * 6  # well into both tails of the sigmoid
    u = mx.random.normal(shape, key=mx.random.key(2))
    ref = g * mx.sigmoid(g) * u
    ours = ext.swiglu(g, u)
    assert float(mx.abs(ours - ref).max()) <= 1e-6 * float(mx.abs(ref).max()) + 1e-7
    assert rel_err(ext.swiglu(g.swapaxes(0, 1), u.swapaxes(0, 1)), ref.swapaxes(0, 1)) <= 1e-6


def test_float_matmul_reads_batched_weights_by_their_strides():
    """Prefill attention hands the keys over as a slice of the cache buffer: read in place, any batch strides."""
    buf = mx.random.normal((2, 3, 50, 16), key=mx.random.key(20))
    x = mx.random.normal((2, 6, 4, 16), key=mx.random.key(21))
    tbuf = mx.random.normal((2, 3, 16, 40), key=mx.random.key(22))
    mx.eval(buf, tbuf)
    for w in (buf[:, :, :37], buf[:, :, 5:40:2], tbuf.swapaxes(-1, -2)):
        wc = mx.array(np.array(w))
        ref = x @ mx.repeat(wc, 2, axis=1).swapaxes(-1, -2)
        assert rel_err(ext.matmul(x, w), ref) <= RTOL


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("experts,k,lead", [(8, 2, (1, 1)), (64, 8, (2, 33)), (128, 8, (3,)), (5, 5, (4, 1))])
def test_route_equals_mlx_ops(experts, k, lead, norm):
    logits = mx.random.normal((*lead, experts), key=mx.random.key(experts + k)) * 3
    inds, scores = ext.route(logits, k, norm)
    probs = mx.softmax(logits, axis=-1)
    ref = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
    ref_scores = mx.take_along_axis(probs, ref, axis=-1)
    if norm:
        ref_scores = ref_scores / ref_scores.sum(axis=-1, keepdims=True)
    # the same experts (ours in descending order, argpartition's in its own) with the same probabilities
    a, b = np.array(inds), np.array(ref)
    np.testing.assert_array_equal(np.sort(a, axis=-1), np.sort(b, axis=-1))
    assert np.all(np.diff(np.take_along_axis(np.array(probs), a.astype(np.int64), -1), axis=-1) <= 0)
    order_a, order_b = np.argsort(a, axis=-1), np.argsort(b, axis=-1)
    np.testing.assert_allclose(np.take_along_axis(np.array(scores), order_a, -1),
                               np.take_along_axis(np.array(ref_scores), order_b, -1), rtol=1e-6, atol=1e-7)


# ---- RMSNorm and RoPE: MLX composes them from many small ops on the CPU --------------------------------


@settings(max_examples=40, deadline=None)
@given(
    lead=st.sampled_from([(1,), (1, 1), (3,), (2, 7), (130,), (1, 16)]),
    d=st.sampled_from([1, 7, 16, 64, 128, 1000, 1024]),
    bf16=st.booleans(),
    strided=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_rms_norm_equals_mlx(lead, d, bf16, strided, seed):
    x = mx.random.normal((*lead, d), key=mx.random.key(seed)) * 3
    w = mx.random.normal((d,), key=mx.random.key(seed + 1))
    if bf16:
        w = w.astype(mx.bfloat16)
    if strided and len(lead) == 2:
        x = x.swapaxes(0, 1)  # rows read through strides (copied in the kernel)
    ref = mx.fast.rms_norm(x, w, 1e-6)  # MLX's own composition on the CPU
    assert rel_err(ext.rms_norm(x, w, 1e-6), ref) <= RTOL


def test_rms_norm_over_a_donated_input_and_lazy_inputs():
    x = mx.random.normal((5, 64), key=mx.random.key(3))
    w = mx.random.normal((64,), key=mx.random.key(4))
    ref = mx.fast.rms_norm(x * 2, w * 1, 1e-5)
    assert rel_err(ext.rms_norm(x * 2, w * 1, 1e-5), ref) <= RTOL  # x * 2 is written over; w is lazy
    assert ext.rms_norm(mx.zeros((0, 64)), w, 1e-5).shape == (0, 64)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.sampled_from([1, 2, 8, 16]),
    length=st.sampled_from([1, 2, 7, 64, 130]),
    d=st.sampled_from([2, 16, 64, 128]),
    offset=st.sampled_from([0, 1, 17, 511, 4000]),
    yarn=st.booleans(),
    transposed=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_rope_equals_mlx(b, h, length, d, offset, yarn, transposed, seed):
    shape = (b, length, h, d) if transposed else (b, h, length, d)
    x = mx.random.normal(shape, key=mx.random.key(seed))
    if transposed:
        x = x.swapaxes(1, 2)  # [B, L, H, D] -> [B, H, L, D], as the model hands the projections over
    if yarn:  # wavelengths and an input scale, as YaRN gives them
        freqs = 1e4 ** (mx.arange(0, d, 2, dtype=mx.float32) / d) * mx.linspace(1, 4, d // 2)
        ours = kernels.rope(x, offset=offset, freqs=freqs, mscale=1.13, inv_freq=kernels.rope_inv_freq(d, freqs=freqs))
        ref = mx.fast.rope(x * 1.13, d, traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)
    else:
        ours = kernels.rope(x, offset=offset, base=1e6, inv_freq=kernels.rope_inv_freq(d, base=1e6))
        ref = mx.fast.rope(x, d, traditional=False, base=1e6, scale=1.0, offset=offset)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= RTOL


def test_rope_and_rms_norm_refuse_bad_shapes():
    with pytest.raises(ValueError, match="head_dim must be even"):
        ext.rope(mx.zeros((1, 1, 1, 3)), mx.zeros((1,)), 0, 1.0)
    with pytest.raises(ValueError, match="inv_freq"):
        ext.rope(mx.zeros((1, 1, 1, 4)), mx.zeros((3,)), 0, 1.0)
    with pytest.raises(ValueError, match="does not match"):
        ext.rms_norm(mx.zeros((2, 8)), mx.zeros((7,)), 1e-6)


# ---- batches of sequences: each row bit-identical to its sequence alone (what the server's batching relies on) ----


def same_bits(a: mx.array, b: mx.array) -> bool:
    return np.array_equal(np.array(a), np.array(b))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(2, 20), kind=st.sampled_from(["q4", "q8", "f32", "bf16"]), seed=st.integers(0, 2**16))
def test_a_batch_of_decode_rows_computes_each_row_as_alone(batch, kind, seed):
    """x [B, 1, K] (B sequences, one token each) gives row b exactly as x[b:b+1]: the kernel is picked by a
    sequence's positions, not by the batch (B > 8 would otherwise switch to the blocked kernel)."""
    n, k = 200, 256
    x = mx.random.normal((batch, 1, k), key=mx.random.key(seed))
    if kind in ("q4", "q8"):
        wq, s, b = quantized((n, k), int(kind[1]), 64, mx.float32, seed + 1)
        f = lambda v: ext.quantized_matmul(v, wq, s, b, 64, int(kind[1]))  # noqa: E731
    else:
        w = mx.random.normal((n, k), key=mx.random.key(seed + 1)).astype(mx.float32 if kind == "f32" else mx.bfloat16)
        f = lambda v: ext.matmul(v, w)  # noqa: E731
    y = f(x)
    assert all(same_bits(y[i], f(x[i : i + 1])[0]) for i in range(batch))
    ref = x.reshape(batch, k) @ (mx.dequantize(wq, s, b, 64, int(kind[1])) if kind[0] == "q" else w.astype(mx.float32)).T
    assert rel_err(y.reshape(batch, n), ref) <= 1e-4


@pytest.mark.parametrize("quant", [False, True])
def test_a_batch_of_decode_rows_through_the_experts_computes_each_row_as_alone(quant):
    tokens, experts, top_k, n, k = 16, 8, 2, 64, 64
    x = mx.random.normal((tokens, 1, k), key=mx.random.key(3))
    idx = mx.array(np.random.RandomState(0).randint(0, 2, size=(tokens, 1, top_k)), mx.uint32)  # crowded experts
    w = mx.random.normal((experts, n, k), key=mx.random.key(4)) * 0.05
    if quant:
        wq, s, b = mx.quantize(w, 64, 4)
        f = lambda v, i: ext.gather_qmm(v, wq, s, b, i, 64, 4)  # noqa: E731
    else:
        f = lambda v, i: ext.gather_mm(v, w, i)  # noqa: E731
    y = f(x, idx)
    assert all(same_bits(y[i], f(x[i : i + 1], idx[i : i + 1])[0]) for i in range(tokens))


def openblas_core() -> str:
    """The kernel family the scipy-openblas32 library (the one our extension links) runs on this CPU."""
    import ctypes
    import glob

    import scipy_openblas32

    lib = ctypes.CDLL(sorted(glob.glob(os.path.join(scipy_openblas32.get_lib_dir(), "*.so*")))[0])
    lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
    return lib.scipy_openblas_get_corename().decode()


@pytest.mark.parametrize("piece", [64, 100, 128])
@pytest.mark.parametrize("kind", ["q4", "f32"])
def test_prefill_in_pieces_of_the_plan_computes_as_plain_chunks(piece, kind):
    """prefill_plan's pieces (never under SAME_KERNEL_ROWS tokens unless their chunk is) keep every row on
    the kernels of the plain 512-token chunks: quantized blocked kernel, float32 OpenBLAS, flash attention."""
    from qwen3_mlx.generate import prefill_plan

    if kind == "f32" and sys.platform.startswith("linux") and openblas_core() not in (
            "SkylakeX", "Cooperlake", "SapphireRapids"):
        pytest.skip(f"OpenBLAS runs its {openblas_core()} kernels here (OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}),"
                    " which round a row differently with its position in the GEMM; its AVX-512 kernels do not")

    n, k, L = 256, 256, 1100
    x = mx.random.normal((1, L, k), key=mx.random.key(5))
    if kind == "q4":
        wq, s, b = quantized((n, k), 4, 64, mx.float32, 6)
        f = lambda v: ext.quantized_matmul(v, wq, s, b, 64, 4)  # noqa: E731
    else:
        w = mx.random.normal((n, k), key=mx.random.key(6))
        f = lambda v: ext.matmul(v, w)  # noqa: E731
    plain = [f(x[:, a:e]) for a, e in prefill_plan(L, 512)]
    pieces = [f(x[:, a:e]) for a, e in prefill_plan(L, 512, piece)]
    assert same_bits(mx.concatenate(plain, axis=1), mx.concatenate(pieces, axis=1))
    q = mx.random.normal((1, 8, L, 32), key=mx.random.key(7))
    kv = mx.random.normal((1, 2, L, 32), key=mx.random.key(8))
    whole = mx.concatenate([ext.attention(q[:, :, a:e], kv[:, :, :e], kv[:, :, :e], 0.2, True)
                            for a, e in prefill_plan(L, 512)], axis=2)
    cut = mx.concatenate([ext.attention(q[:, :, a:e], kv[:, :, :e], kv[:, :, :e], 0.2, True)
                          for a, e in prefill_plan(L, 512, piece)], axis=2)
    assert same_bits(whole, cut)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 2600), min_size=1, max_size=6),
    kv_heads=st.sampled_from([1, 2, 4]),
    rep=st.sampled_from([1, 2, 8]),
    d=st.sampled_from([16, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_ragged_decode_attention_equals_each_sequence_alone_and_mlx(lengths, kv_heads, rep, d, seed):
    """Each row in its own buffer (capacity beyond its length, garbage past it) equals decode_attention on
    that sequence's slice bit for bit (split-K chosen per row) and MLX's attention to float32 rounding."""
    B, H = len(lengths), kv_heads * rep
    q = mx.random.normal((B, H, 1, d), key=mx.random.key(seed))
    keys = [mx.random.normal((1, kv_heads, n + 40, d), key=mx.random.key(seed + 1 + i)) for i, n in enumerate(lengths)]
    values = [mx.random.normal((1, kv_heads, n + 40, d), key=mx.random.key(seed + 99 + i)) for i, n in enumerate(lengths)]
    out = ext.ragged_decode_attention(q, keys, values, lengths, 0.125)
    for b, n in enumerate(lengths):
        k, v = keys[b][:, :, :n], values[b][:, :, :n]
        assert same_bits(out[b : b + 1], ext.decode_attention(q[b : b + 1], k, v, 0.125))
        ref = mx.fast.scaled_dot_product_attention(q[b : b + 1], k, v, scale=0.125)
        assert rel_err(out[b : b + 1], ref) <= RTOL
    with pytest.raises(ValueError, match="length"):
        ext.ragged_decode_attention(q, keys, values, [n + 41 for n in lengths], 0.125)


def test_kv_append_writes_each_row_at_its_position_in_place():
    hkv, d = 2, 16
    kbufs = [mx.zeros((1, hkv, c, d)) for c in (8, 300, 16)]
    vbufs = [mx.zeros((1, hkv, c, d)) for c in (8, 300, 16)]
    mx.eval(kbufs, vbufs)
    keys = mx.random.normal((3, hkv, 2, d), key=mx.random.key(1))
    values = mx.random.normal((3, 2, hkv, d), key=mx.random.key(2)).transpose(0, 2, 1, 3)  # strided, as v_proj's
    positions = [0, 250, 14]
    new_k, new_v = kernels.kv_append(keys, values, kbufs, vbufs, positions)
    mx.eval(new_k, new_v)
    for b, p in enumerate(positions):
        assert same_bits(new_k[b][:, :, p : p + 2], keys[b : b + 1])
        assert same_bits(new_v[b][:, :, p : p + 2], values[b : b + 1])
        before = np.array(new_k[b])
        before[:, :, p : p + 2] = 0
        assert not before.any()  # nothing else written
    assert np.array(kbufs[1])[:, :, 250:252].any()  # the same memory: no copy of the cache per step
    with pytest.raises(ValueError, match="do not fit"):
        ext.kv_append(keys, values, kbufs, vbufs, [7, 0, 0])


def test_rope_takes_one_offset_per_batch_row():
    x = mx.random.normal((3, 4, 2, 32), key=mx.random.key(1))
    inv = kernels.rope_inv_freq(32, base=1e6)
    offsets = [0, 17, 4000]
    out = ext.rope(x, inv, offsets, 1.0)
    for b, o in enumerate(offsets):
        assert same_bits(out[b : b + 1], ext.rope(x[b : b + 1], inv, o, 1.0))
        ref = mx.fast.rope(x[b : b + 1], 32, traditional=False, base=1e6, scale=1.0, offset=o)
        assert rel_err(out[b : b + 1], ref) <= RTOL
    with pytest.raises(ValueError, match="one per batch row"):
        ext.rope(x, inv, [1, 2], 1.0)


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("bits", [None, 4])
def test_a_batch_of_sequences_decodes_each_exactly_as_alone(moe, bits):
    """The model over BatchKVCache: each row's logits equal that sequence's solo decode bit for bit, with the
    sequences at different lengths (one past the split-K threshold), with our kernels and with MLX's."""
    import mlx.nn as nn

    from qwen3_mlx.models import qwen3, qwen3_moe
    from qwen3_mlx.models.cache import batch_cache, make_cache

    cfg = dict(model_type="qwen3_moe" if moe else "qwen3", hidden_size=128, num_hidden_layers=2,
               intermediate_size=256, num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=300)
    if moe:
        cfg.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)
    module = qwen3_moe if moe else qwen3
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    mx.eval(model.parameters())
    rs = np.random.RandomState(0)
    prompts = [[int(t) for t in rs.randint(0, 300, size=n)] for n in (3, 40, 1030)]

    def prefilled(p):
        c = make_cache(model)
        for a in range(0, len(p), 512):
            model(mx.array(p[a : a + 512])[None], c)
        mx.eval([x.state for x in c])
        return c

    for on in (True, False):
        kernels.set_enabled(on)
        try:
            solo = []
            for p in prompts:
                c = prefilled(p)
                solo.append([model(mx.array([[t]]), c)[0, -1] for t in (5, 6)])
            caches = [prefilled(p) for p in prompts]
            batched = [model(mx.array([[t]] * len(prompts)), batch_cache(caches))[:, -1] for t in (5, 6)]
            for b in range(len(prompts)):
                for step in range(2):
                    if on:
                        assert same_bits(batched[step][b], solo[b][step])
                    else:  # MLX's ops: per-row slices, equal to float32 rounding
                        assert rel_err(batched[step][b], solo[b][step]) <= 1e-4
            assert [c[0].offset for c in caches] == [len(p) + 2 for p in prompts]
        finally:
            kernels.set_enabled(True)


@pytest.mark.parametrize("b,length,c,k", [(1, 1, 40, 4), (2, 7, 33, 4), (1, 130, 300, 4), (1, 3, 16, 1), (2, 2, 8, 2)])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv_equals_mlx(b, length, c, k, with_state):
    """The Gated DeltaNet conv (and SiLU) against MLX's composition of it (kernels.causal_conv with ours off)."""
    x = mx.random.normal((length, b, c), key=mx.random.key(1)).transpose(1, 0, 2) * 3  # strided, as a split gives
    w = mx.random.normal((c, k, 1), key=mx.random.key(2))
    state = mx.random.normal((b, k - 1, c), key=mx.random.key(3)) if with_state else None
    y, new_state = ext.causal_conv(x, w, state)
    kernels.set_enabled(False)
    try:
        ref_y, ref_state = kernels.causal_conv(x, w, state)
        ref_bf16 = kernels.causal_conv(x, w.astype(mx.bfloat16), state)[0]
    finally:
        kernels.set_enabled(True)
    assert y.shape == ref_y.shape and new_state.shape == ref_state.shape == (b, k - 1, c)
    assert rel_err(y, ref_y) <= 1e-6
    np.testing.assert_array_equal(np.array(new_state), np.array(ref_state))
    assert rel_err(ext.causal_conv(x, w.astype(mx.bfloat16), state)[0], ref_bf16) <= 1e-6


def test_causal_conv_carries_its_state_across_calls():
    # A prompt in pieces (prefill chunks, then decode steps) gives what it gives in one call.
    x = mx.random.normal((1, 20, 24), key=mx.random.key(4))
    w = mx.random.normal((24, 4, 1), key=mx.random.key(5))
    whole, _ = ext.causal_conv(x, w, None)
    state, parts = None, []
    for a, z in [(0, 9), (9, 10), (10, 11), (11, 20)]:
        y, state = ext.causal_conv(x[:, a:z], w, state)
        parts.append(y)
    np.testing.assert_array_equal(np.array(mx.concatenate(parts, axis=1)), np.array(whole))
    with pytest.raises(ValueError, match="conv state must be float32"):
        ext.causal_conv(x, w, mx.zeros((1, 2, 24)))


@pytest.mark.parametrize("scale", [1.0, 128**-0.5])
def test_l2_norm_equals_the_formula_in_float64(scale):
    x = mx.random.normal((2, 5, 3, 128), key=mx.random.key(9)) * 3
    a = np.array(x).astype(np.float64)
    ref = a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6) * scale
    ours = np.array(kernels.l2_norm(x, scale))
    assert np.abs(ours - ref).max() <= 1e-6 * np.abs(ref).max()
    kernels.set_enabled(False)
    try:
        assert np.abs(np.array(kernels.l2_norm(x, scale)) - ref).max() <= 1e-6 * np.abs(ref).max()
    finally:
        kernels.set_enabled(True)
