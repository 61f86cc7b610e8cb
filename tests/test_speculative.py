"""Speculative decoding: greedy output identical to plain decoding, sampling that follows the target's
distribution (chi-square), cache reuse in a chat, and the refusals."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from qwen3_mlx.errors import Qwen3MLXError
from qwen3_mlx.generate import generate, stream_generate
from qwen3_mlx.speculative import accept_drafts


def pair(moe: bool, vocab: int = 1000, scale: float = 8.0):
    """A target with peaked logits (lm_head scaled) and its own 4-bit quantization as the draft."""
    from qwen3_mlx.models import qwen3, qwen3_moe

    cfg = dict(model_type="qwen3_moe" if moe else "qwen3", hidden_size=128, num_hidden_layers=2,
               intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=vocab)
    if moe:
        cfg.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)
    module = qwen3_moe if moe else qwen3
    mx.random.seed(0)
    target = module.Model(module.ModelArgs.from_dict(cfg))
    target.lm_head.weight = target.lm_head.weight * scale
    mx.eval(target.parameters())
    draft = module.Model(module.ModelArgs.from_dict(cfg))
    draft.update(target.parameters())
    nn.quantize(draft, group_size=32, bits=4)
    mx.eval(draft.parameters())
    return target, draft


@pytest.mark.parametrize("moe", [False, True])
def test_greedy_speculation_gives_exactly_plain_greedy(moe):
    target, draft = pair(moe)
    prompt = [int(t) for t in np.random.RandomState(0).randint(0, 1000, size=40)]
    plain = generate(target, None, prompt, max_tokens=50, temperature=0, ignore_eos=True).tokens
    kept = 0
    for k in (1, 3, 6):
        last = None
        tokens = []
        for last in stream_generate(target, None, prompt, max_tokens=50, temperature=0, ignore_eos=True,
                                    draft_model=draft, num_draft=k):
            tokens.append(last.token)
        assert tokens == plain, f"num_draft={k}"
        assert last.draft_tokens > 0
        kept += last.accepted_tokens
    assert kept > 0  # the draft's proposals are used, not only counted


def test_greedy_speculation_with_a_thinking_budget(tiny_checkpoint):
    """The budget's stop text cuts a round short and is fed as plain decoding feeds it: same tokens."""
    from qwen3_mlx.loader import load

    model, tokenizer = load(tiny_checkpoint)
    prompt = "<|im_start|>user\nThink.<|im_end|>\n<|im_start|>assistant\n<think>\n"  # reasoning already open
    for budget in (0, 3, 7):
        opts = dict(max_tokens=45, temperature=0, thinking_budget=budget)
        plain = generate(model, tokenizer, prompt, **opts)
        spec = generate(model, tokenizer, prompt, draft_model=model, num_draft=4, **opts)
        assert spec.tokens == plain.tokens, f"budget {budget}"
        assert "Considering the limited time" in spec.reasoning or budget == 0


def test_rejection_scheme_keeps_the_target_distribution():
    """accept_drafts with drafts drawn from q: the first token it emits follows p[0] (chi-square, 30000 draws),
    whatever q is, and so does the token after a kept draft (the scheme's whole point)."""
    rng = np.random.default_rng(0)
    V, k, n = 6, 2, 30000
    p = rng.dirichlet(np.ones(V), size=k + 1)
    q = rng.dirichlet(np.ones(V) * 0.5, size=k)
    counts = np.zeros(V)
    second = np.zeros((V, V))
    for _ in range(n):
        d0 = int(rng.choice(V, p=q[0]))
        d1 = int(rng.choice(V, p=q[1]))  # (the draft's second step; its q does not depend on d0 here)
        out = accept_drafts(p, q, [d0, d1], rng.random(k + 1))
        counts[out[0]] += 1
        if len(out) > 1:
            second[out[0], out[1]] += 1
    expected = p[0] * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # df = 5, p = 0.001
    # Given the first token, the second follows p[1] (p here does not depend on the prefix).
    row = second.sum(axis=0)
    expected = p[1] * row.sum()
    assert float(((row - expected) ** 2 / expected).sum()) < 20.5


@pytest.mark.slow  # the chi-square test of accept_drafts above checks the same scheme, in under a second
def test_sampled_speculation_matches_plain_sampling_end_to_end():
    """A 12-token vocabulary: the second generated token's frequencies over 1500 seeds, speculative against
    plain sampling (two-sample chi-square, df 11, p = 0.001)."""
    target, draft = pair(False, vocab=12, scale=1.0)
    prompt = [1, 2, 3, 4]
    n = 1500

    def second(**kw):
        c = np.zeros(12)
        for seed in range(n):
            c[generate(target, None, prompt, max_tokens=2, temperature=1.0, top_k=0, top_p=1.0, seed=seed,
                       ignore_eos=True, **kw).tokens[1]] += 1
        return c

    a, b = second(), second(draft_model=draft, num_draft=2)
    keep = (a + b) > 0
    chi2 = float(((a[keep] - b[keep]) ** 2 / (a[keep] + b[keep])).sum())
    assert chi2 < 31.3


def test_chat_with_a_draft_reuses_both_caches_and_answers_as_without(tiny_checkpoint):
    from qwen3_mlx.chat import ChatSession
    from qwen3_mlx.loader import load

    model, tokenizer = load(tiny_checkpoint)
    replies = {}
    for draft in (None, model):
        opts = {} if draft is None else {"draft_model": draft, "num_draft": 3}
        session = ChatSession(model, tokenizer, enable_thinking=False, max_tokens=8, temperature=0, **opts)
        replies[draft is None] = ["".join(r.text for r in session.send(t)) for t in ("Hi", "More")]
        assert session.history[1].reused_tokens > 0
    assert replies[True] == replies[False]


def test_refusals():
    target, draft = pair(False)
    other, _ = pair(False, vocab=500)
    with pytest.raises(Qwen3MLXError, match="vocabulary"):
        generate(target, None, [1, 2, 3], max_tokens=3, draft_model=other)
    with pytest.raises(Qwen3MLXError, match="penalties"):
        generate(target, None, [1, 2, 3], max_tokens=3, draft_model=draft, presence_penalty=1.0)
    with pytest.raises(Qwen3MLXError, match="num_draft"):
        generate(target, None, [1, 2, 3], max_tokens=3, draft_model=draft, num_draft=0)


def test_greedy_speculation_after_a_cached_prefix_equals_plain():
    """Starting from a prompt cache (a chat's earlier turns) with the draft's cache holding the same prefix."""
    from qwen3_mlx.models.cache import make_cache

    target, draft = pair(False)
    ids = [int(t) for t in np.random.RandomState(2).randint(0, 1000, size=60)]

    def prefilled(model, n):
        cache = make_cache(model)
        model(mx.array(ids[:n])[None], cache)
        mx.eval([c.state for c in cache])
        return cache

    plain = generate(target, None, ids[25:], prompt_cache=prefilled(target, 25), max_tokens=30, temperature=0,
                     ignore_eos=True).tokens
    spec = generate(target, None, ids[25:], prompt_cache=prefilled(target, 25), draft_cache=prefilled(draft, 25),
                    draft_model=draft, num_draft=3, max_tokens=30, temperature=0, ignore_eos=True).tokens
    assert spec == plain
    with pytest.raises(Qwen3MLXError, match="draft's cache must hold"):
        generate(target, None, ids[25:], prompt_cache=prefilled(target, 25), draft_cache=make_cache(draft),
                 draft_model=draft, max_tokens=3)
