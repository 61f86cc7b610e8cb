"""The integer (VNNI) kernels against a numpy computation of the same arithmetic (kernels/src/int8.h), bit for bit.

The reference is written from int8.h's description, not from the kernel: activations quantized per group,
exact integer lane sums, each lane's float products and sums rounded one by one, the halving sum of the
lanes, then the bias part. Each table this CPU has runs in its own process (QWEN3_MLX_ISA picks it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3_mlx import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the compiled extension is not built")
F32 = np.float32
LANES = {"avx512-vnni": 16, "avx-vnni": 8}
DECODE_ROWS = kernels.DECODE_ROWS  # up to this many positions of a sequence: the decode arithmetic


def codes_of(w: mx.array, bits: int) -> np.ndarray:
    """MLX's packed words -> the unsigned codes [N, K] (value j of a word at bits [bits*j, bits*j + bits))."""
    b = np.array(w).view(np.uint8).reshape(w.shape[0], -1)
    if bits == 8:
        return b.astype(np.int64)
    return np.stack([b & 15, b >> 4], -1).reshape(w.shape[0], -1).astype(np.int64)


def quantize_rows(x: np.ndarray, gs: int):
    """Codes [M, G, gs], group scales d and d * sum(codes) xs [M, G]."""
    M, K = x.shape
    xg = x.astype(F32).reshape(M, K // gs, gs)
    amax = np.abs(xg).max(-1)
    inv = np.where(amax > 0, F32(127) / np.where(amax > 0, amax, F32(1)), F32(0)).astype(F32)
    c = np.clip(np.rint(xg * inv[..., None]), -127, 127).astype(np.int64)
    d = (amax / F32(127)).astype(F32)
    return c, d, (d * c.sum(-1).astype(F32)).astype(F32)


def bias_part(biases, xs: np.ndarray, N: int) -> np.ndarray | None:
    if biases is None:
        return None
    b = biases.astype(F32)
    yb = np.zeros((xs.shape[0], N), F32)
    for g in range(xs.shape[1]):
        yb = yb + b[None, :, g] * xs[:, g, None]
    return yb


def reference(x, q, scales, biases, gs: int, bits: int, lanes: int, decode: bool) -> np.ndarray:
    """int8.h's decode arithmetic (lanes) when `decode`, else its prefill arithmetic (whole groups)."""
    M, K = x.shape
    N, G = q.shape[0], K // gs
    c, d, xs = quantize_rows(x, gs)
    yb = bias_part(biases, xs, N)
    if not decode:
        isum = np.einsum("mgk,ngk->mng", c, q.reshape(N, G, gs))
        cs = scales.astype(F32)[None] * d[:, None]  # [M, N, G]
        y = np.zeros((M, N), F32)
        for g in range(G):
            y = y + isum[:, :, g].astype(F32) * cs[:, :, g]
        return y if yb is None else y + yb
    vl = 32 // bits  # values a lane
    C = lanes * vl  # values a chunk
    Kp = -(-K // C) * C
    nl = Kp // vl
    cz = np.zeros((M, Kp), np.int64)
    cz[:, :K] = c.reshape(M, K)
    qz = np.zeros((N, Kp), np.int64)
    qz[:, :K] = q
    isum = np.einsum("mlv,nlv->mnl", cz.reshape(M, nl, vl), qz.reshape(N, nl, vl))
    assert np.abs(isum).max(initial=0) < 2**24
    first = np.arange(nl) * vl
    valid = first < K
    group = np.minimum(first // gs, G - 1)
    s = scales.astype(F32)
    s_l = np.where(valid[None], s[:, group], F32(0)).astype(F32)  # [N, nl]
    d_l = np.where(valid[None], d[:, group], F32(0)).astype(F32)  # [M, nl]
    t = isum.astype(F32) * (s_l[None] * d_l[:, None])  # [M, N, nl], each product rounded
    t = t.reshape(M, N, nl // lanes, lanes)
    acc = np.zeros((M, N, lanes), F32)
    for j in range(t.shape[2]):
        acc = acc + t[:, :, j]
    w = lanes
    while w > 1:
        acc = acc[..., : w // 2] + acc[..., w // 2 : w]
        w //= 2
    y = acc[..., 0]
    return y if yb is None else y + yb


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def check_one(rows, n, k_groups, bits, gs, sdtype, biased, seed) -> None:
    K = k_groups * gs
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    w = mx.random.normal((n, K), key=k1) * 0.05
    wq, s, b = mx.quantize(w, gs, bits)
    s, b = s.astype(sdtype), b.astype(sdtype)
    # activations with an outlier column, as real hidden states have
    x = mx.random.normal((rows, K), key=k2)
    x = x * mx.where(mx.arange(K) == 3, 40.0, 1.0)
    y = kernels._ext.quantized_matmul(x, wq, s, b if biased else None, gs, bits)
    ref = reference(_np(x), codes_of(wq, bits), _np(s), _np(b) if biased else None, gs, bits,
                    LANES[kernels._ext.int8()], decode=rows <= DECODE_ROWS)
    assert np.array_equal(_np(y), ref), f"max diff {np.abs(_np(y) - ref).max()}"


@pytest.fixture
def int8_on():
    if not kernels.set_int8(2):  # prefill and decode
        kernels.set_int8(0)
        pytest.skip("this CPU has no VNNI")
    yield kernels._ext.int8()
    kernels.set_int8(0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 7, 64, 130])
def test_quantized_matmul_equals_the_reference(int8_on, bits, gs, rows):
    check_one(rows, 37, 5, bits, gs, mx.bfloat16, True, seed=rows * 7 + gs + bits)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rows=st.sampled_from([1, 2, 3, 7, 9, 64, 130]), n=st.integers(1, 70), k_groups=st.integers(1, 9),
       bits=st.sampled_from([4, 8]), gs=st.sampled_from([32, 64, 128]),
       sdtype=st.sampled_from([mx.float32, mx.bfloat16, mx.float16]), biased=st.booleans(),
       seed=st.integers(0, 2**16))
def test_odd_shapes_equal_the_reference(int8_on, rows, n, k_groups, bits, gs, sdtype, biased, seed):
    check_one(rows, n, k_groups, bits, gs, sdtype, biased, seed)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("T", [2, 9])
def test_expert_gathers_equal_the_reference_row_by_row(int8_on, bits, T):
    gs, E, N, K, top = 64, 6, 40, 192, 3
    w = mx.random.normal((E, N, K), key=mx.random.key(1)) * 0.05
    wq, s, b = mx.quantize(w, gs, bits)
    x = mx.random.normal((T, K), key=mx.random.key(2))
    idx = mx.random.randint(0, E, (T, top), key=mx.random.key(3)).astype(mx.int32)
    # x [T, K]: shared by a token's k pairs; T positions of one sequence choose the arithmetic
    y = _np(kernels._ext.gather_qmm(x, wq, s, b, idx, gs, bits))
    xn, ids = _np(x), np.array(idx)
    for t in range(T):
        for j in range(top):
            e = int(ids[t, j])
            ref = reference(xn[t : t + 1], codes_of(wq[e], bits), _np(s[e]), _np(b[e]), gs, bits,
                            LANES[kernels._ext.int8()], decode=T <= DECODE_ROWS)
            assert np.array_equal(y[t, j], ref[0])


def test_default_mode_is_prefill_only(int8_on):
    wq, s, b = mx.quantize(mx.random.normal((16, 128), key=mx.random.key(0)) * 0.05, 64, 4)
    x = mx.random.normal((12, 128), key=mx.random.key(1))
    both = [_np(kernels._ext.quantized_matmul(x[:n], wq, s, b, 64, 4)) for n in (1, 12)]
    kernels.set_int8(1)
    prefill_only = [_np(kernels._ext.quantized_matmul(x[:n], wq, s, b, 64, 4)) for n in (1, 12)]
    kernels.set_int8(0)
    flt = [_np(kernels._ext.quantized_matmul(x[:n], wq, s, b, 64, 4)) for n in (1, 12)]
    assert np.array_equal(prefill_only[0], flt[0]) and not np.array_equal(prefill_only[0], both[0])
    assert np.array_equal(prefill_only[1], both[1]) and not np.array_equal(prefill_only[1], flt[1])


def test_switch_gives_the_float_path_back(int8_on):
    wq, s, b = mx.quantize(mx.random.normal((16, 128), key=mx.random.key(0)) * 0.05, 64, 4)
    x = mx.random.normal((3, 128), key=mx.random.key(1))
    on = _np(kernels._ext.quantized_matmul(x, wq, s, b, 64, 4))
    kernels.set_int8(0)
    assert kernels._ext.int8() is None
    off = _np(kernels._ext.quantized_matmul(x, wq, s, b, 64, 4))
    mlx_ref = _np(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4))
    assert np.abs(off - mlx_ref).max() < 1e-5 * np.abs(mlx_ref).max()
    assert not np.array_equal(on, off)  # the integer path was really on
    assert np.abs(on - mlx_ref).max() < 0.05 * np.abs(mlx_ref).max()


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from qwen3_mlx import kernels
import mlx.core as mx
import test_int8 as t
assert kernels._ext.int8() == {table!r}, kernels._ext.int8()
for bits in (4, 8):
    for gs in (32, 64, 128):
        for rows in (1, 2, 7, 130):
            t.check_one(rows, 21, 3, bits, gs, mx.float16, rows % 2 == 1, seed=rows + gs)
print("ok")
"""


@pytest.mark.parametrize("isa,table", [("avx512", "avx512-vnni"), ("avx2", "avx-vnni")])
def test_each_integer_table(isa, table):
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    need = {"avx512-vnni": " avx512_vnni", "avx-vnni": " avx_vnni"}[table]
    if need not in flags:
        pytest.skip(f"this CPU has no {table}")
    env = dict(os.environ, QWEN3_MLX_ISA=isa, QWEN3_MLX_INT8="all")
    code = CHILD.format(tests=os.path.dirname(__file__), table=table)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
