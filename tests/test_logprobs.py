"""Log probabilities (issue 23): each sampled token's logprob and its top alternatives are log_softmax of the
model's raw logits (before penalties, filters and grammar masks), checked against transformers' logits on the
same token ids (float32, within 1e-4); and the server's OpenAI shapes for chat and completions, whole and streamed,
token-id prompts and echo."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from helpers import REAL_VOCAB, dense_config, reference_logits, save_checkpoint

from qwen3_mlx.generate import BUDGET_STOP_TEXT, generate, stream_generate
from qwen3_mlx.loader import load

TOL = 1e-4
HI = [{"role": "user", "content": "Tell me a story."}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float32 random Qwen3 with the real vocabulary: the MLX model and transformers' (the reference)."""
    path = tmp_path_factory.mktemp("tiny-logprobs")
    torch_model = save_checkpoint(path, dense_config(vocab_size=REAL_VOCAB), tokenizer=True, seed=3)
    model, tokenizer = load(path)
    return SimpleNamespace(path=path, torch=torch_model, model=model, tok=tokenizer)


def reference_logprobs(tiny, prompt_ids: list[int], generated: list[int]) -> np.ndarray:
    """log_softmax (float64) of transformers' logits at each generated token's position: [len(generated), vocab]."""
    ids = np.array([prompt_ids + generated[:-1]])
    logits = reference_logits(tiny.torch, ids)[0, len(prompt_ids) - 1:].astype(np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def top_k(row: np.ndarray, k: int) -> list[tuple[int, float]]:
    ids = np.argsort(-row, kind="stable")[:k]
    return [(int(i), float(row[i])) for i in ids]


def check_against_reference(tiny, prompt_ids, result, k: int, sampled_mask=None) -> np.ndarray:
    """Every scored token of `result` against the reference; returns the reference rows."""
    ref = reference_logprobs(tiny, prompt_ids, result.tokens)
    assert len(result.logprobs) == len(result.tokens)
    for i, (token, lp) in enumerate(zip(result.tokens, result.logprobs)):
        if sampled_mask is not None and not sampled_mask[i]:
            assert lp is None  # a forced token has no distribution of its own
            continue
        assert lp is not None
        assert abs(lp.logprob - ref[i, token]) < TOL, (i, lp.logprob, ref[i, token])
        want = top_k(ref[i], k)
        assert [t for t, _ in lp.top] == [t for t, _ in want], i
        assert np.allclose([v for _, v in lp.top], [v for _, v in want], atol=TOL, rtol=0)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    return ref


def test_greedy_logprobs_equal_transformers_log_softmax(tiny):
    prompt = "Once upon a time, in a land far away"
    ids = tiny.tok.encode(prompt)
    r = generate(tiny.model, tiny.tok, prompt, logprobs=5, temperature=0, max_tokens=12)
    assert len(r.tokens) == 12
    ref = check_against_reference(tiny, ids, r, 5)
    for i, (token, lp) in enumerate(zip(r.tokens, r.logprobs)):
        assert lp.top[0][0] == token == int(np.argmax(ref[i]))  # greedy: the top-1 entry
        assert lp.top[0][1] == lp.logprob
    # a distribution, not scores: the reference's probabilities sum to 1, and the top-5 cover part of it
    assert np.allclose(np.exp(ref).sum(-1), 1.0) and all(sum(np.exp(v) for _, v in lp.top) < 1 for lp in r.logprobs)


def test_sampled_with_filters_reports_the_unfiltered_distribution(tiny):
    """temperature, top_k and top_p shape the draw, not the reported numbers; the drawn token is one top_k kept."""
    prompt = "The weather today is"
    ids = tiny.tok.encode(prompt)
    r = generate(tiny.model, tiny.tok, prompt, logprobs=4, temperature=1.5, top_k=3, top_p=0.9, seed=11,
                 max_tokens=12)
    ref = check_against_reference(tiny, ids, r, 4)
    ranks = [int((ref[i] > ref[i, t]).sum()) for i, t in enumerate(r.tokens)]
    assert max(ranks) < 3 and any(ranks)  # within top_k, and not plain greedy
    # a temperature-scaled or renormalised distribution would differ from the raw one by far more than TOL
    kept = [np.logaddexp.reduce(np.sort(ref[i])[-3:]) for i in range(len(r.tokens))]
    assert max(abs(k) for k in kept) > 0.01


def test_penalties_and_grammar_masks_do_not_change_logprobs(tiny):
    """A repetition penalty changes the greedy path, not what is reported; a JSON grammar masks most of the
    vocabulary, and the top alternatives may be tokens it forbade."""
    prompt = "Once upon a time"  # this model's greedy path repeats itself within 20 tokens
    ids = tiny.tok.encode(prompt)
    plain = generate(tiny.model, tiny.tok, prompt, logprobs=3, temperature=0, max_tokens=20)
    r = generate(tiny.model, tiny.tok, prompt, logprobs=3, temperature=0, max_tokens=20, repetition_penalty=2.0)
    assert r.tokens != plain.tokens
    ref = check_against_reference(tiny, ids, r, 3)
    assert any(int(np.argmax(ref[i])) != t for i, t in enumerate(r.tokens))  # the penalty moved a choice
    msgs = [{"role": "user", "content": "JSON please"}]
    ids = tiny.tok.encode(tiny.tok.apply_chat_template(msgs, enable_thinking=False))
    j = generate(tiny.model, tiny.tok, msgs, logprobs=3, temperature=0, max_tokens=10, enable_thinking=False,
                 response_format={"type": "json_object"})
    assert j.answer.startswith("{")
    ref = check_against_reference(tiny, ids, j, 3)
    assert any(lp.top[0][0] != t for lp, t in zip(j.logprobs, j.tokens))  # the grammar overrode the favourite


def test_logprobs_zero_and_forced_tokens(tiny):
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    ids = tiny.tok.encode(prompt)
    budget = 3
    responses = list(stream_generate(tiny.model, tiny.tok, prompt, logprobs=0, temperature=0, thinking_budget=budget,
                                     max_tokens=budget + 40))
    r = SimpleNamespace(tokens=[x.token for x in responses], logprobs=[x.logprobs for x in responses])
    # the budget's stop text is forced: only the tokens the model chose are scored
    forced = len(tiny.tok.encode(BUDGET_STOP_TEXT))
    assert r.tokens[budget:budget + forced] == tiny.tok.encode(BUDGET_STOP_TEXT)
    sampled = [i < budget or i >= budget + forced for i in range(len(r.tokens))]
    assert sum(not s for s in sampled) > 10 and sampled.count(True) > budget
    check_against_reference(tiny, ids, r, 0, sampled)
    assert all(lp.top == [] for lp in r.logprobs if lp is not None)
    assert generate(tiny.model, tiny.tok, "Hi", temperature=0, max_tokens=3).logprobs == []


def test_token_bytes_equal_transformers_pieces_through_the_byte_table(tiny):
    """token_bytes (the logprobs' `bytes`) of every id against transformers: its tokenizer's piece mapped back
    through GPT-2's byte table (transformers' own bytes_to_unicode); an added token is its text."""
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hf = AutoTokenizer.from_pretrained(str(tiny.path))
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    added = {i: t.content for i, t in hf.added_tokens_decoder.items()}
    pieces = hf.convert_ids_to_tokens(list(range(len(hf))))
    assert len(pieces) == tiny.tok.vocab_size and len(added) > 20
    for i, piece in enumerate(pieces):
        want = added[i].encode() if i in added else bytes(to_byte[c] for c in piece)
        assert tiny.tok.token_bytes(i) == want, (i, piece)


# ---------------------------------------------------------------------------------------------------------------
# The server, through the official openai client.

import openai


@pytest.fixture(scope="module")
def server(tiny):
    import fastapi  # noqa: F401 - in the test extra: a missing one fails here (test_server would skip)
    from test_server import Server

    s = Server(tiny.path, "--max-concurrency", "1")
    yield s
    s.close()


def entries(choice_logprobs) -> list[dict]:
    return [e.model_dump() for e in (choice_logprobs.content if choice_logprobs else [])]


@pytest.mark.parametrize("top", [3, 0])
def test_chat_logprobs_whole_and_streamed(server, tiny, top):
    client = server.client()
    base = {"model": tiny.path.name, "messages": HI, "max_tokens": 10, "temperature": 0, "logprobs": True,
            "top_logprobs": top, "extra_body": NO_THINK}
    whole = client.chat.completions.create(**base).choices[0]
    got = entries(whole.logprobs)
    assert len(got) == 10
    ref = generate(tiny.model, tiny.tok, HI, logprobs=top, temperature=0, max_tokens=10, enable_thinking=False)
    assert whole.message.content == ref.answer and len(ref.tokens) == len(got)
    for e, token, lp in zip(got, ref.tokens, ref.logprobs):
        assert len(lp.top) == top
        assert set(e) >= {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(e["bytes"]) == tiny.tok.token_bytes(token)
        assert abs(e["logprob"] - lp.logprob) < TOL
        assert len(e["top_logprobs"]) == top
        for alt, (alt_id, alt_lp) in zip(e["top_logprobs"], lp.top):
            assert bytes(alt["bytes"]) == tiny.tok.token_bytes(alt_id) and abs(alt["logprob"] - alt_lp) < TOL
        if all(b < 128 for b in e["bytes"]):
            assert bytes(e["bytes"]).decode() == e["token"]
    assert b"".join(bytes(e["bytes"]) for e in got).decode("utf-8", "replace") == ref.text
    streamed = []
    for ev in client.chat.completions.create(**base, stream=True):
        for choice in ev.choices:
            streamed.extend(entries(choice.logprobs))
    assert [(e["token"], e["bytes"]) for e in streamed] == [(e["token"], e["bytes"]) for e in got]
    assert np.allclose([e["logprob"] for e in streamed], [e["logprob"] for e in got], atol=TOL, rtol=0)
    assert [[a["bytes"] for a in e["top_logprobs"]] for e in streamed] == \
        [[a["bytes"] for a in e["top_logprobs"]] for e in got]


def test_chat_without_logprobs_has_none(server, tiny):
    r = server.client().chat.completions.create(model=tiny.path.name, messages=HI, max_tokens=3, temperature=0,
                                                extra_body=NO_THINK)
    assert r.choices[0].logprobs is None


def test_completions_logprobs_shape(server, tiny):
    client = server.client()
    prompt = "Once upon a time"
    c = client.completions.create(model=tiny.path.name, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    choice, n = c.choices[0], c.usage.completion_tokens
    lp = choice.logprobs
    assert n == 8 and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    ref = generate(tiny.model, tiny.tok, prompt, logprobs=2, temperature=0, max_tokens=8)
    assert choice.text == ref.text
    assert lp.tokens == [tiny.tok.token_bytes(t).decode("utf-8", "replace") for t in ref.tokens]
    assert np.allclose(lp.token_logprobs, [x.logprob for x in ref.logprobs], atol=TOL, rtol=0)
    for alts, token_lp, x in zip(lp.top_logprobs, lp.token_logprobs, ref.logprobs):
        assert 1 <= len(alts) <= 2 and abs(max(alts.values()) - token_lp) < TOL  # greedy: the top entry
        assert np.allclose(sorted(alts.values(), reverse=True), [v for _, v in x.top][:len(alts)], atol=TOL)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]


def test_streamed_completions_logprobs_equal_whole(server, tiny):
    client = server.client()
    common = {"model": tiny.path.name, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = client.completions.create(**common).choices[0].logprobs
    tokens, token_logprobs, offsets = [], [], []
    for ev in client.completions.create(**common, stream=True):
        for choice in ev.choices:
            if choice.logprobs:
                tokens += choice.logprobs.tokens
                token_logprobs += choice.logprobs.token_logprobs
                offsets += choice.logprobs.text_offset
    assert tokens == whole.tokens
    assert np.allclose(token_logprobs, whole.token_logprobs, atol=TOL, rtol=0)
    assert offsets == whole.text_offset


def test_completions_token_id_prompt_equals_text_prompt(server, tiny):
    client = server.client()
    prompt = "The quick brown fox"
    ids = tiny.tok.encode(prompt)
    by_text = client.completions.create(model=tiny.path.name, prompt=prompt, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=tiny.path.name, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    with_lp = client.completions.create(model=tiny.path.name, prompt=ids, max_tokens=8, temperature=0, logprobs=1)
    assert with_lp.choices[0].text == by_text.choices[0].text


def test_completions_echo(server, tiny):
    client = server.client()
    prompt = "Once upon a time"
    plain = client.completions.create(model=tiny.path.name, prompt=prompt, max_tokens=6, temperature=0)
    echoed = client.completions.create(model=tiny.path.name, prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens
    streamed = "".join(ev.choices[0].text for ev in client.completions.create(
        model=tiny.path.name, prompt=prompt, max_tokens=6, temperature=0, echo=True, stream=True) if ev.choices)
    assert streamed == echoed.choices[0].text
    ids = tiny.tok.encode(prompt)
    by_ids = client.completions.create(model=tiny.path.name, prompt=ids, max_tokens=6, temperature=0, echo=True)
    assert by_ids.choices[0].text == echoed.choices[0].text  # the ids' text
    status, body = server.post("/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "echo" and "logprobs" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=tiny.path.name, prompt=prompt, max_tokens=2, echo=True, logprobs=0)
