"""Sampling filters on hand-written distributions, penalties, defaults and seeded reproducibility."""

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qwen3_mlx.sample import (
    NON_THINKING_DEFAULTS,
    THINKING_DEFAULTS,
    SamplingParams,
    apply_min_p,
    apply_presence_penalty,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    filter_logits,
    resolve_sampling,
    sample,
)

PROBS = [0.05, 0.4, 0.1, 0.3, 0.15]  # sorted: 1 (0.4), 3 (0.3), 4 (0.15), 2 (0.1), 0 (0.05)


def logits_of(probs):
    return mx.log(mx.array([probs], mx.float32))


def kept(logits) -> set[int]:
    return {i for i, v in enumerate(np.array(logits)[0]) if np.isfinite(v)}


def test_top_k():
    assert kept(apply_top_k(logits_of(PROBS), 1)) == {1}
    assert kept(apply_top_k(logits_of(PROBS), 3)) == {1, 3, 4}
    assert kept(apply_top_k(logits_of(PROBS), 0)) == set(range(5))
    assert kept(apply_top_k(logits_of(PROBS), 99)) == set(range(5))


@pytest.mark.parametrize(
    "p, expected",
    [(0.3, {1}), (0.39, {1}), (0.41, {1, 3}), (0.69, {1, 3}), (0.72, {1, 3, 4}), (0.94, {1, 2, 3, 4}), (0.96, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})],
)
def test_top_p(p, expected):
    assert kept(apply_top_p(logits_of(PROBS), p)) == expected


def test_top_p_zero_keeps_the_top_token():
    # An empty nucleus would make `categorical` draw uniformly from the whole vocabulary.
    assert kept(apply_top_p(logits_of(PROBS), 0.0)) == {1}
    draws = np.array(sample(mx.repeat(logits_of(PROBS), 200, axis=0), SamplingParams(1.0, top_p=0.0), mx.random.key(0)))
    assert set(draws.tolist()) == {1}


# Distinct float32 logits: with ties the set a filter keeps depends on how ties are broken, not on the rule.
LOGITS = arrays(np.float32, st.integers(2, 64), elements=st.floats(-12, 12, width=32), unique=True)


def reference_kept(warper, logits: np.ndarray) -> set[int]:
    import torch

    out = warper(torch.zeros((1, 0), dtype=torch.long), torch.tensor(logits[None]))[0].numpy()
    return {i for i, v in enumerate(out) if np.isfinite(v)}


def probs64(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits.astype(np.float64) - logits.max())
    return e / e.sum()


@settings(max_examples=150, deadline=None)
@given(logits=LOGITS, k=st.integers(1, 80))
def test_top_k_matches_transformers(logits, k):
    from transformers.generation.logits_process import TopKLogitsWarper

    assert kept(apply_top_k(mx.array(logits[None]), k)) == reference_kept(TopKLogitsWarper(k), logits)


@settings(max_examples=150, deadline=None)
@given(logits=LOGITS, p=st.floats(0.0, 1.0))
@example(logits=np.array([3.0, 1.0, -2.0, 0.5], np.float32), p=0.0)
def test_top_p_matches_transformers(logits, p):
    from transformers.generation.logits_process import TopPLogitsWarper

    # Skip draws where a token's preceding mass is within float32 rounding of p (either answer is right);
    # the first token's (0) is exempt: it is kept whatever p is.
    probs = np.sort(probs64(logits))[::-1]
    before = np.cumsum(probs) - probs
    assume(np.all(np.abs(before[1:] - p) > 1e-4))
    assert kept(apply_top_p(mx.array(logits[None]), p)) == reference_kept(TopPLogitsWarper(p), logits)


@settings(max_examples=150, deadline=None)
@given(logits=LOGITS, min_p=st.floats(0.0, 1.0))
def test_min_p_matches_transformers(logits, min_p):
    from transformers.generation.logits_process import MinPLogitsWarper

    # Skip draws with a token within rounding of the threshold (we compare in log space, transformers in probs).
    ratio = probs64(logits) / probs64(logits).max()
    assume(np.all(np.abs(ratio - min_p) > 1e-5 * max(min_p, 1e-30)) or min_p == 0)
    assert kept(apply_min_p(mx.array(logits[None]), min_p)) == reference_kept(MinPLogitsWarper(min_p), logits)


@pytest.mark.parametrize("min_p, expected", [(0.0, {0, 1, 2, 3, 4}), (0.24, {1, 3, 4, 2}), (0.26, {1, 3, 4}), (0.5, {1, 3}), (0.8, {1})])
def test_min_p(min_p, expected):
    # threshold = min_p * 0.4
    assert kept(apply_min_p(logits_of(PROBS), min_p)) == expected


def test_filters_keep_relative_probabilities():
    # top-k first, then top-p on the renormalised rest (transformers order): 0.4/0.95 + 0.3/0.95 = 0.737 < 0.75
    out = filter_logits(logits_of(PROBS), SamplingParams(temperature=1.0, top_p=0.75, top_k=4))
    probs = np.array(mx.softmax(out, axis=-1))[0]
    np.testing.assert_allclose(probs[[1, 3, 4]], np.array([0.4, 0.3, 0.15]) / 0.85, rtol=1e-5)
    assert probs[0] == probs[2] == 0


def test_temperature_sharpens():
    out = filter_logits(logits_of(PROBS), SamplingParams(temperature=0.5))
    probs = np.array(mx.softmax(out, axis=-1))[0]
    expected = np.array(PROBS) ** 2 / np.sum(np.array(PROBS) ** 2)
    np.testing.assert_allclose(probs, expected, rtol=1e-5)


def test_presence_penalty_once_per_token():
    logits = mx.array([[1.0, 2.0, 3.0]])
    seen = mx.array([[0.0, 1.0, 1.0]])
    np.testing.assert_allclose(np.array(apply_presence_penalty(logits, seen, 1.5)), [[1.0, 0.5, 1.5]])


def test_repetition_penalty_transformers_semantics():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = np.array([[2.0, -1.0, 0.5, -3.0]], np.float32)
    ours = apply_repetition_penalty(mx.array(logits), mx.array([[1.0, 1.0, 0.0, 1.0]]), 1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[0, 1, 3]]), torch.tensor(logits))
    np.testing.assert_allclose(np.array(ours), ref.numpy(), rtol=1e-6)


def test_sampling_matches_distribution():
    # 4000 draws from the filtered distribution: frequencies within a few standard errors of the target.
    params = SamplingParams(temperature=1.0, top_p=0.75, top_k=4)
    logits = mx.repeat(logits_of(PROBS), 4000, axis=0)
    draws = np.array(sample(logits, params, mx.random.key(3)))
    freq = np.bincount(draws, minlength=5) / len(draws)
    target = np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85
    assert freq[0] == freq[2] == 0
    np.testing.assert_allclose(freq, target, atol=4 * math.sqrt(0.25 / 4000))


def test_greedy_and_seeded_runs_reproduce():
    logits = mx.random.normal((8, 1000), key=mx.random.key(0))
    assert np.array_equal(np.array(sample(logits, SamplingParams(temperature=0))), np.array(mx.argmax(logits, -1)))
    params = SamplingParams(**THINKING_DEFAULTS)
    a = np.array(sample(logits, params, mx.random.key(42)))
    b = np.array(sample(logits, params, mx.random.key(42)))
    c = np.array(sample(logits, params, mx.random.key(43)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # the top-k fast path only ever picks among the 20 largest logits
    top20 = np.argsort(-np.array(logits), axis=-1)[:, :20]
    assert all(a[i] in top20[i] for i in range(8))


def test_defaults():
    assert resolve_sampling(True) == SamplingParams(**THINKING_DEFAULTS)
    assert resolve_sampling(False) == SamplingParams(**NON_THINKING_DEFAULTS)
    gen = {"temperature": 0.3, "top_k": 40, "do_sample": True}
    assert resolve_sampling(True, gen) == SamplingParams(temperature=0.3, top_p=0.95, top_k=40, min_p=0.0)
    assert resolve_sampling(False, gen) == SamplingParams(**NON_THINKING_DEFAULTS)
    explicit = resolve_sampling(True, gen, temperature=0.0, top_p=0.5, presence_penalty=1.0)
    assert (explicit.temperature, explicit.top_p, explicit.top_k, explicit.presence_penalty) == (0.0, 0.5, 40, 1.0)
