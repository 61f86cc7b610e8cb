"""Generation: greedy parity with transformers, the thinking budget, streaming, penalties, caches, tool calls."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from helpers import REAL_VOCAB, dense_config, save_checkpoint

from qwen3_mlx.generate import BUDGET_STOP_TEXT, generate, stream_generate
from qwen3_mlx.loader import load
from qwen3_mlx.models.cache import make_cache
from qwen3_mlx.tokenizer import Tokenizer
from qwen3_mlx.tools import parse_tool_calls

THINK, END_THINK, IM_END = 151667, 151668, 151645


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gen")
    torch_model = save_checkpoint(path, dense_config(vocab_size=REAL_VOCAB), tokenizer=True)
    model, tokenizer = load(path)
    return SimpleNamespace(path=path, torch=torch_model, model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer(tokenizer_dir)


class ScriptedModel:
    """Stands in for a model: logits favour whatever `rule(tokens fed so far)` says, by a wide margin."""

    def __init__(self, rule, vocab=REAL_VOCAB):
        self.args = SimpleNamespace(vocab_size=vocab)
        self.layers = [None]
        self.rule = rule
        self.fed: list[int] = []

    def __call__(self, inputs, cache=None):
        L = inputs.shape[1]
        self.fed.extend(inputs.reshape(-1).tolist())
        logits = np.zeros((1, L, self.args.vocab_size), np.float32)
        logits[0, -1, self.rule(self.fed)] = 50.0
        return mx.array(logits)

    def fill(self, inputs, cache):
        self(inputs, cache)


def test_greedy_matches_transformers(tiny):
    import torch

    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    ids = tiny.tokenizer.encode(tiny.tokenizer.apply_chat_template(messages))
    with torch.no_grad():
        ref = tiny.torch.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long)
        )[0, len(ids) :].tolist()
    result = generate(tiny.model, tiny.tokenizer, messages, max_tokens=32, temperature=0.0)
    assert result.tokens == ref
    assert len(ref) == 32  # random weights never picked eos, so this compared all 32 steps


def test_greedy_repetition_penalty_matches_transformers(tiny):
    import torch

    ids = tiny.tokenizer.encode("the the the cat sat on the mat the cat")
    with torch.no_grad():
        ref = tiny.torch.generate(
            torch.tensor([ids]),
            max_new_tokens=16,
            do_sample=False,
            repetition_penalty=1.8,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )[0, len(ids) :].tolist()
    result = generate(tiny.model, tiny.tokenizer, ids, max_tokens=16, temperature=0.0, repetition_penalty=1.8)
    assert result.tokens == ref and len(ref) == 16
    # the penalty changed the greedy path, so this compared penalised steps, not plain argmax
    assert generate(tiny.model, tiny.tokenizer, ids, max_tokens=16, temperature=0.0).tokens != ref


def test_greedy_small_prefill_chunks_same_tokens(tiny):
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    a = generate(tiny.model, tiny.tokenizer, prompt, max_tokens=12, temperature=0)
    b = generate(tiny.model, tiny.tokenizer, prompt, max_tokens=12, temperature=0, prefill_step_size=5)
    assert a.tokens == b.tokens


def test_stream_text_equals_decode_and_stats(tiny):
    responses = list(stream_generate(tiny.model, tiny.tokenizer, "Hello", max_tokens=40, seed=7))
    tokens = [r.token for r in responses]
    assert "".join(r.text for r in responses) == tiny.tokenizer.decode(tokens)
    assert [r.generation_tokens for r in responses] == list(range(1, 41))
    assert all(r.finish_reason is None for r in responses[:-1]) and responses[-1].finish_reason == "length"
    last = responses[-1]
    assert last.prompt_tokens == 1 and last.prompt_tps > 0 and last.generation_tps > 0
    assert last.time_to_first_token > 0 and last.peak_memory > 0


def test_seeded_runs_reproduce(tiny):
    a = generate(tiny.model, tiny.tokenizer, "Once upon a time", max_tokens=16, seed=3)
    b = generate(tiny.model, tiny.tokenizer, "Once upon a time", max_tokens=16, seed=3)
    c = generate(tiny.model, tiny.tokenizer, "Once upon a time", max_tokens=16, seed=4)
    assert a.tokens == b.tokens != c.tokens


def test_token_ids_without_tokenizer(tiny):
    r = generate(tiny.model, None, [1, 2, 3], max_tokens=5, temperature=0)
    ref = generate(tiny.model, tiny.tokenizer, [1, 2, 3], max_tokens=5, temperature=0)
    assert r.tokens == ref.tokens and r.text == "" and r.finish_reason == "length"


def test_prompt_cache_continues(tiny):
    """Generating with a caller-kept cache (prompt split in two calls) gives the same tokens as one call."""
    ids = tiny.tokenizer.encode("Counting: one two three four five six")
    full = generate(tiny.model, None, ids, max_tokens=8, temperature=0)
    cache = make_cache(tiny.model)
    tiny.model(mx.array(ids[:5])[None], cache)
    part = generate(tiny.model, None, ids[5:], max_tokens=8, temperature=0, prompt_cache=cache)
    assert part.tokens == full.tokens
    assert cache[0].offset == len(ids) + 8 - 1  # the last sampled token is never fed back


def budget_rule(tok):
    hmm = tok.encode(" hmm")[0]

    def rule(fed):
        if END_THINK in fed:
            return IM_END
        if THINK in fed:
            return hmm
        return THINK

    return rule, hmm


@pytest.mark.parametrize("budget", [1, 5, 17])
def test_thinking_budget_exact(tok, budget):
    rule, hmm = budget_rule(tok)
    model = ScriptedModel(rule)
    messages = [{"role": "user", "content": "Think hard."}]
    responses = list(stream_generate(model, tok, messages, thinking_budget=budget, max_tokens=200, seed=0))
    tokens = [r.token for r in responses]
    stop = tok.encode(BUDGET_STOP_TEXT)
    # exactly `budget` sampled reasoning tokens (<think> included), then Qwen's stop text, then the answer
    assert tokens == [THINK] + [hmm] * (budget - 1) + stop + [IM_END]
    cut = stop.index(END_THINK)
    assert [r.segment for r in responses] == ["reasoning"] * (budget + cut + 1) + ["answer"] * (len(stop) - cut - 1 + 1)
    assert responses[-1].finish_reason == "stop"
    result = generate(ScriptedModel(rule), tok, messages, thinking_budget=budget, max_tokens=200)
    assert result.reasoning.endswith("I have to give the solution based on the thinking directly now.")
    assert result.answer == ".\n\n"


def test_no_budget_keeps_thinking(tok):
    rule, hmm = budget_rule(tok)
    responses = list(stream_generate(ScriptedModel(rule), tok, [{"role": "user", "content": "x"}], max_tokens=30))
    assert [r.token for r in responses] == [THINK] + [hmm] * 29
    assert {r.segment for r in responses} == {"reasoning"} and responses[-1].finish_reason == "length"


def test_budget_zero_with_open_think_in_prompt(tok):
    rule, _ = budget_rule(tok)
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    result = generate(ScriptedModel(rule), tok, prompt, thinking_budget=0, max_tokens=100)
    assert result.tokens == tok.encode(BUDGET_STOP_TEXT) + [IM_END]


def test_thinking_off_is_all_answer(tok):
    # Without the hard switch the scripted model would open <think>; with it the template closed the block.
    def rule(fed):
        return tok.encode("ok")[0] if fed.count(END_THINK) else THINK

    responses = list(stream_generate(ScriptedModel(rule), tok, [{"role": "user", "content": "x"}], enable_thinking=False, max_tokens=3))
    assert [r.segment for r in responses] == ["answer"] * 3
    assert "".join(r.text for r in responses) == "okokok"


def test_presence_penalty_counts_every_generated_token(tok):
    """Logits rank five tokens 5 > 4 > 3 > 2 > 1; a penalty of 10 puts every used token below every unused one,
    so each is used once before the first comes back (a short window would bring it back sooner)."""
    five = [tok.encode(w)[0] for w in ("a", "b", "c", "d", "e")]

    class Ranked(ScriptedModel):
        def __call__(self, inputs, cache=None):
            logits = np.full((1, inputs.shape[1], self.args.vocab_size), -100.0, np.float32)
            logits[0, -1, five] = [5.0, 4.0, 3.0, 2.0, 1.0]
            return mx.array(logits)

    r = generate(Ranked(None), tok, "x", temperature=0, max_tokens=7, presence_penalty=10.0, enable_thinking=False)
    assert r.tokens == five + [five[0], five[0]]  # once per token: a stays on top among the penalised
    no_penalty = generate(Ranked(None), tok, "x", temperature=0, max_tokens=4, enable_thinking=False)
    assert no_penalty.tokens == [five[0]] * 4


def test_eos_stops_and_is_not_text(tok):
    def rule(fed):
        return IM_END if fed.count(tok.encode("!")[0]) >= 3 else tok.encode("!")[0]

    responses = list(stream_generate(ScriptedModel(rule), tok, "x", max_tokens=50, enable_thinking=False))
    assert [r.token for r in responses][-1] == IM_END and responses[-1].finish_reason == "stop"
    assert "".join(r.text for r in responses) == "!!!"
    ignored = list(stream_generate(ScriptedModel(rule), tok, "x", max_tokens=6, ignore_eos=True))
    assert len(ignored) == 6 and ignored[-1].finish_reason == "length"


def test_tool_calls_parsed_from_answer(tok):
    answer = (
        "<think>\nneed weather\n</think>\n\nChecking.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Sofia"}}\n</tool_call>\n'
        "<tool_call>\n{\"name\": \"broken\", \"arguments\": {\"city\": }\n</tool_call>"
    )
    ids = tok.encode(answer) + [IM_END]

    def rule(fed):
        return ids[len(fed) - 1] if len(fed) - 1 < len(ids) else IM_END

    result = generate(ScriptedModel(rule), tok, "x", max_tokens=200)
    assert result.reasoning == "need weather"
    assert result.answer.startswith("Checking.")
    good, bad = result.tool_calls
    assert (good.name, good.arguments, good.ok) == ("get_weather", {"city": "Sofia"}, True)
    assert bad.name is None and not bad.ok and "malformed JSON" in bad.error


def test_parse_tool_calls_edge_cases():
    assert parse_tool_calls("no calls here") == []
    (call,) = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert call.arguments == {"x": 1}
    (unclosed,) = parse_tool_calls('<tool_call>\n{"name": "f"')
    assert "unterminated" in unclosed.error
    (noname,) = parse_tool_calls("<tool_call>[1, 2]</tool_call>")
    assert "name" in noname.error
    (badargs,) = parse_tool_calls('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')
    assert badargs.name == "f" and not badargs.ok


class ScriptedConstraint:
    """Allows exactly one token at a time, the next of `target`; records what it was advanced with."""

    def __init__(self, target, vocab=REAL_VOCAB):
        self.target, self.vocab, self.seen = target, vocab, []

    def mask(self):
        m = np.full((self.vocab,), -np.inf, np.float32)
        m[self.target[len(self.seen)]] = 0.0
        return mx.array(m)

    def advance(self, token):
        self.seen.append(token)


def test_constraint_masks_the_answer_not_the_reasoning(tok):
    """The model may still open <think> as its first token and reason freely; only the answer is masked."""
    hmm = tok.encode(" hmm")[0]

    def rule(fed):  # think " hmm hmm", close, then the model would end at once
        tail = fed[len(fed) - fed[::-1].index(THINK) :] if THINK in fed else None
        if tail is None:
            return THINK
        if END_THINK in tail:
            return IM_END
        return hmm if tail.count(hmm) < 2 else END_THINK

    target = tok.encode("\n\nok!") + [IM_END]
    constraint = ScriptedConstraint(target)
    responses = list(stream_generate(ScriptedModel(rule), tok, [{"role": "user", "content": "x"}], max_tokens=40,
                                     constraint=constraint))
    tokens = [r.token for r in responses]
    assert tokens == [THINK, hmm, hmm, END_THINK] + target  # reasoning as the model wanted, the answer as forced
    assert constraint.seen == target and responses[-1].finish_reason == "stop"


def test_thinking_budget_and_constraint_together(tok):
    """The budget cuts the reasoning with Qwen's stop text up to </think>; what follows is the constraint's."""
    hmm = tok.encode(" hmm")[0]
    target = tok.encode("ok!") + [IM_END]
    constraint = ScriptedConstraint(target)
    tokens = [r.token for r in stream_generate(ScriptedModel(lambda fed: hmm if THINK in fed else THINK), tok,
                                               [{"role": "user", "content": "x"}], max_tokens=80,
                                               constraint=constraint, thinking_budget=3)]
    stop = tok.encode(BUDGET_STOP_TEXT[: BUDGET_STOP_TEXT.index("</think>") + len("</think>")])
    assert stop[-1] == END_THINK
    assert tokens == [THINK, hmm, hmm] + stop + target and constraint.seen == target


@pytest.mark.parametrize("n", [0, 1, 8, 63, 64, 130, 511, 512, 513, 600, 1100, 1535])
@pytest.mark.parametrize("piece", [None, 64, 100, 128, 512])
def test_prefill_plan_covers_the_prompt_in_pieces_that_keep_their_chunks_kernels(n, piece):
    from qwen3_mlx.generate import SAME_KERNEL_ROWS, prefill_plan

    plain = prefill_plan(n, 512)
    assert plain == [(a, min(n, a + 512)) for a in range(0, n, 512)]
    ranges = prefill_plan(n, 512, piece)
    assert [i for a, b in ranges for i in range(a, b)] == list(range(n))  # every token once, in order
    for a, b in ranges:
        chunk = next((c0, c1) for c0, c1 in plain if c0 <= a < c1)
        assert b <= chunk[1]  # a piece never spans two chunks
        if b - a != chunk[1] - chunk[0]:  # a cut chunk: no piece below the size where kernels change
            assert b - a >= SAME_KERNEL_ROWS and (piece is None or b - a < piece + SAME_KERNEL_ROWS)
