"""`qwen3-mlx serve --draft-model (PATH | mtp)`: speculative decoding in the server (a real subprocess, driven by the
official `openai` client), against `qwen3_mlx.generate.generate` without a draft, in this process."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request

import numpy as np
import openai
import pytest
from helpers import REAL_VOCAB
from test_mtp import save_with_mtp
from test_server import serving

from qwen3_mlx.generate import generate
from qwen3_mlx.loader import load

NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def save_noisy_copy(src, dst, scale: float = 0.005):
    """`src`'s weights plus a little noise: a draft of the same vocabulary and tokenizer that agrees with the target
    on some greedy tokens and not on others (~30% of drafts kept at this scale), so both sides of a round run."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    rng = np.random.RandomState(1)
    tensors = load_file(src / "model.safetensors")
    save_file({k: v + (scale * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in tensors.items()},
              dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def path_server(tiny_checkpoint, tmp_path_factory):
    draft = save_noisy_copy(tiny_checkpoint, tmp_path_factory.mktemp("draft"))
    yield from serving(tiny_checkpoint, "--draft-model", draft, "--num-draft", "3")


@pytest.fixture(scope="module")
def mtp_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("mtp-serve")
    save_with_mtp(path, tokenizer=True, vocab_size=REAL_VOCAB)
    yield from serving(path, "--draft-model", "mtp", "--num-draft", "2")


@pytest.fixture(scope="module", params=["path", "mtp"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


_loaded = {}


def plain(server, prompt, **opts):
    """`generate` of the served checkpoint without a draft (greedy)."""
    if server.model not in _loaded:
        _loaded[server.model] = load(server.model)
    return generate(*_loaded[server.model], prompt, temperature=0, **opts)


def chat(server, text, max_tokens=24, stream=False):
    """A greedy chat completion's answer (thinking off), whole or streamed, and its usage (whole only)."""
    kw = {"model": server.model, "messages": [{"role": "user", "content": text}], "temperature": 0,
          "max_tokens": max_tokens, "extra_body": NO_THINK}
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in server.client().chat.completions.create(
            stream=True, **kw) if c.choices), None
    r = server.client().chat.completions.create(**kw)
    return r.choices[0].message.content, r.usage


def test_greedy_through_every_api_equals_plain_generate(server):
    msgs = [{"role": "user", "content": "Tell me a story about cats"}]
    ref = plain(server, msgs, max_tokens=24, enable_thinking=False)
    answer, usage = chat(server, "Tell me a story about cats")
    assert answer == ref.answer and usage.completion_tokens == len(ref.tokens)
    assert chat(server, "Tell me a story about cats", stream=True)[0] == ref.answer  # its prefix cached, or not
    # Completions: token ids in, the same tokens out.
    ids = [9707, 1052, 11, 3291, 752, 264, 3364, 911, 19423]
    ref_ids = plain(server, ids, max_tokens=20)
    r = server.client().completions.create(model=server.model, prompt=ids, max_tokens=20, temperature=0)
    assert r.choices[0].text == ref_ids.text and r.usage.completion_tokens == len(ref_ids.tokens)
    # Responses and Anthropic Messages share the engine (thinking off in both).
    resp = server.client().responses.create(model=server.model, input="Tell me a story about cats",
                                            reasoning={"effort": "none"}, max_output_tokens=24, temperature=0)
    assert resp.output_text == ref.answer
    status, body = server.post("/v1/messages", {"model": server.model, "max_tokens": 24, "temperature": 0,
                                                "messages": msgs})
    assert status == 200 and body["content"][0]["text"] == ref.answer
    with urllib.request.urlopen(server.base + "/health", timeout=30) as h:
        stats = json.loads(h.read())
    assert stats["max_concurrency"] == 1 and stats["draft_model"] and stats["draft_tokens"] > 0


def test_the_prefix_cache_holds_both_caches(path_server):
    """A repeated prompt reuses the target's and the draft's caches together and answers the same."""
    first, _ = chat(path_server, "Name three primes", max_tokens=16)
    again, usage = chat(path_server, "Name three primes", max_tokens=16)
    assert again == first and usage.prompt_tokens_details.cached_tokens > 0


def test_a_prefix_cache_hit_survives_a_long_mtp_answer(mtp_server):
    """Each verification forward saves recurrent states (and the head's anchors); a long answer must not push
    out the prompt's own, or the repeated prompt reuses nothing."""
    first, usage = chat(mtp_server, "Write a long poem about the sea", max_tokens=64)
    again, usage2 = chat(mtp_server, "Write a long poem about the sea", max_tokens=64)
    assert again == first and usage.completion_tokens == 64
    assert usage2.prompt_tokens_details.cached_tokens >= usage2.prompt_tokens - 2


def test_options_speculation_refuses_are_a_400(path_server):
    client = path_server.client()
    kw = {"model": path_server.model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    for bad, why in (({"presence_penalty": 1.0}, "penalties"), ({"logprobs": True}, "logprobs"),
                     ({"response_format": {"type": "json_object"}}, "response_format"), ({"tools": tools}, "tools")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**kw, **bad)
        assert "draft model" in e.value.body["message"] and why in e.value.body["message"]
    status, body = path_server.post("/v1/messages", {"model": path_server.model, "max_tokens": 4, "messages": kw[
        "messages"], "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]})
    assert status == 400 and body["type"] == "error" and "draft model" in body["error"]["message"]


def test_two_concurrent_requests_both_complete_correctly(path_server):
    texts = ["Why is the sky blue?", "Write a haiku about rain"]
    refs = [plain(path_server, [{"role": "user", "content": t}], max_tokens=20, enable_thinking=False).answer
            for t in texts]
    got = [None, None]

    def run(i):
        got[i] = chat(path_server, texts[i], max_tokens=20, stream=i == 1)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == refs


def test_a_seeded_sampled_request_equals_generate_with_the_same_draft(path_server, tiny_checkpoint):
    """Sampling goes through the rejection scheme of `generate`: same seed, same draws, same tokens (a prompt
    whose first token no other test sends, so it prefills from scratch as `generate` does)."""
    draft = load(path_server.proc.args[path_server.proc.args.index("--draft-model") + 1])[0]
    ids = [1234, 264, 3364, 911, 19423, 13]
    opts = {"temperature": 0.8, "top_p": 0.95, "seed": 7, "max_tokens": 16}
    ref = generate(*load(tiny_checkpoint), ids, draft_model=draft, num_draft=3, top_k=20, **opts)
    r = path_server.client().completions.create(model=path_server.model, prompt=ids, extra_body={"top_k": 20},
                                                **opts)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.tokens)
