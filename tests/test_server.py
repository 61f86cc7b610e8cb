"""`qwen3-mlx serve` as a real subprocess, driven by the official `openai` client (and raw HTTP for errors)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import fastapi  # noqa: F401  (the test extra has the server's dependencies: a missing one fails, not skips)
import jsonschema
import openai
import pytest
import schemathesis
import uvicorn  # noqa: F401
from helpers import save_thinker

KEY = "sk-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `qwen3-mlx serve` subprocess; always killed at the end, whatever the test did."""

    def __init__(self, model, *args):
        self.model = str(model)  # the id it serves the model as
        self.name = Path(model).name  # which addresses it too
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, NO_COLOR="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwen3_mlx", "serve", str(model), "--port", str(self.port), *map(str, args)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + "".join(self.stderr))
            if any("serving" in line for line in self.stderr):
                return
            time.sleep(0.1)
        self.close()
        raise RuntimeError("server did not start: " + "".join(self.stderr))

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path, body: bytes | dict, key=KEY, headers: dict | None = None):
        """(status, JSON body) of a POST with the key as a bearer token (and `headers`)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def announce_big_body(self, nbytes: int):
        """Headers of a request whose body would be `nbytes`: the server must refuse it before reading it."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Authorization", f"Bearer {KEY}")
        conn.putheader("Content-Length", str(nbytes))
        conn.endheaders()
        r = conn.getresponse()
        status, body = r.status, json.loads(r.read())
        conn.close()
        return status, body

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serving(model, *args):
    """A module fixture's body (`yield from serving(...)`): `model` served with the test key and `args` for the
    module's tests, closed after them."""
    server = Server(model, "--api-key", KEY, *args)
    try:
        yield server
    finally:
        server.close()


# Module fixtures test_anthropic and test_responses import too (each module starts its own server).
@pytest.fixture(scope="module")
def thinker_server(tmp_path_factory):
    """The checkpoint that thinks "Let" and answers "ok" (helpers.save_thinker)."""
    yield from serving(save_thinker(tmp_path_factory.mktemp("thinker")))


@pytest.fixture(scope="module")
def api_server(tiny_checkpoint):
    """The tiny random checkpoint, keeping 4 /v1/responses answers."""
    yield from serving(tiny_checkpoint, "--responses-store", "4")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_server(tiny):
    server = Server(tiny, "--max-concurrency", "1", "--max-queue", "0", "--max-tokens-limit", "3000")
    yield server
    server.close()


HI = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_models_and_health(thinker_server):
    ids = [m.id for m in thinker_server.client().models.list()]
    assert ids == [thinker_server.model]
    with urllib.request.urlopen(thinker_server.base + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_chat_splits_reasoning_from_the_answer(thinker_server):
    r = thinker_server.client().chat.completions.create(model=thinker_server.client().models.list().data[0].id,
                                                         messages=HI, max_tokens=20)
    message = r.choices[0].message
    assert message.content == "ok"
    assert message.model_extra["reasoning_content"] == "Let"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 0  # <think> Let </think> ok <|im_end|>
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_streamed_chat_has_reasoning_and_content_deltas_and_usage(thinker_server):
    stream = thinker_server.client().chat.completions.create(
        model=thinker_server.name, messages=HI, max_tokens=20, stream=True, stream_options={"include_usage": True}
    )
    reasoning, content, finish, used = [], [], None, None
    for ev in stream:
        if ev.usage is not None:
            used = ev.usage
        for choice in ev.choices:
            delta = choice.delta
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
            content.append(delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(reasoning).strip() == "Let" and "".join(content) == "ok"
    assert finish == "stop" and used.completion_tokens > 0


def test_thinking_budget_cuts_reasoning(thinker_server):
    r = thinker_server.client().chat.completions.create(
        model=thinker_server.name, messages=HI, max_tokens=80, extra_body={"thinking_budget": 1}
    )
    assert "limited time" in r.choices[0].message.model_extra["reasoning_content"]


def test_tool_messages_round_trip_into_the_template(thinker_server):
    """An assistant turn with OpenAI-style tool_calls (arguments as a JSON string) and a tool result are accepted."""
    messages = HI + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\": \"UTC\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    r = thinker_server.client().chat.completions.create(model=thinker_server.name, messages=messages, tools=tools,
                                                         max_tokens=20)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "ok"
    # the tool turn reached the template: the prompt is longer than the same chat without it
    plain = thinker_server.client().chat.completions.create(model=thinker_server.name, messages=HI, max_tokens=20)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 10


def test_greedy_equals_generate_chat_and_completions(tiny_server, tiny):
    from qwen3_mlx.generate import generate
    from qwen3_mlx.loader import load

    model, tokenizer = load(tiny)
    client = tiny_server.client()
    r = client.chat.completions.create(model=tiny.name, messages=HI, max_tokens=12, temperature=0,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    ref = generate(model, tokenizer, HI, max_tokens=12, temperature=0, enable_thinking=False)
    assert r.choices[0].message.content == ref.answer and ref.answer
    c = client.completions.create(model=tiny.name, prompt="Once upon a time", max_tokens=10, temperature=0)
    ref = generate(model, tokenizer, "Once upon a time", max_tokens=10, temperature=0)
    assert c.choices[0].text == ref.text and c.usage.completion_tokens == 10
    # stop strings cut the text before the first match
    stop = ref.text[3:6]
    c = client.completions.create(model=tiny.name, prompt="Once upon a time", max_tokens=10, temperature=0, stop=stop)
    assert c.choices[0].text == ref.text[: ref.text.index(stop)] and c.choices[0].finish_reason == "stop"


def test_errors_have_openai_shape_and_status(thinker_server):
    s = thinker_server
    cases = [
        (s.post("/v1/chat/completions", b"{not json"), 400),
        (s.post("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}), 400),
        (s.post("/v1/chat/completions", {"messages": HI, "temperature": "hot"}), 400),
        (s.post("/v1/chat/completions", {"messages": HI, "max_tokens": 0}), 400),
        (s.post("/v1/chat/completions", {"messages": HI, "seed": 2**70}), 400),  # found by schemathesis: was a 500
        (s.post("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}}), 400),
        (s.post("/v1/chat/completions", {"messages": HI, "response_format": {"type": "yaml"}}), 400),
        (s.post("/v1/chat/completions", {"messages": HI, "max_tokens": 5000}), 400),  # beyond the 4096 context
        (s.post("/v1/chat/completions", {"messages": HI, "max_tokens": 32768}), 400),  # = the server's limit, still too long
        (s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]}), 400),
        (s.post("/v1/chat/completions", {"messages": HI, "chat_template_kwargs": {"tools": []}}), 400),
        (s.post("/v1/chat/completions", {"messages": HI, "frequency_penalty": 0.5}), 400),
        (s.post("/v1/chat/completions", {"messages": HI, "logit_bias": {"1": 5}}), 400),
        (s.post("/v1/chat/completions", {"messages": HI, "tool_choice": "required"}), 400),  # no tools
        (s.post("/v1/chat/completions", {"messages": HI, "tools": TOOLS,
                                         "tool_choice": {"type": "function", "function": {"name": "nope"}}}), 400),
        (s.post("/v1/chat/completions", {"messages": HI, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}]}), 400),
        (s.post("/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 21}), 400),
        (s.post("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}), 400),  # without logprobs: true
        (s.post("/v1/chat/completions", {"messages": HI, "reasoning_effort": "low"}), 400),  # Qwen3's template: no
        (s.post("/v1/completions", {"prompt": "Hi", "echo": True, "logprobs": 1}), 400),
        (s.post("/v1/completions", {"prompt": [1, 2, 10**9]}), 400),
        (s.post("/v1/chat/completions", {"messages": HI}, key=None), 401),
        (s.post("/v1/chat/completions", {"messages": HI}, key="wrong"), 401),
        (s.post("/v1/chat/completions", {"model": "gpt-4", "messages": HI}), 404),
        (s.post("/v1/nowhere", {}), 404),
        (s.announce_big_body(9 << 20), 413),
    ]
    for (status, body), want in cases:
        assert status == want, body
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
        assert "Traceback" not in body["error"]["message"]
    messages = [body["error"]["message"] for (_, body), _ in cases]
    assert any("image_url content is not supported" in m for m in messages)
    assert sum("is not supported by this server" in m for m in messages) == 2
    assert any(m.startswith("tool 'f' cannot be enforced") and '["not"]' in m for m in messages)
    assert any("does not read reasoning_effort" in m for m in messages)
    with pytest.raises(openai.AuthenticationError):
        s.client(key="wrong").models.list()
    # every field is implemented or refused, never ignored
    for path, body, why in [
        ("/v1/chat/completions", {"messages": HI, "frobnicate": 1}, "Unknown parameter: 'frobnicate'."),
        ("/v1/chat/completions", {"messages": HI, "modalities": ["text", "audio"]}, "'modalities' is not supported"),
        ("/v1/chat/completions", {"messages": HI, "store": True}, "'store' is not supported"),
        ("/v1/chat/completions", {"messages": HI, "stream": True, "stream_options": {"include_usage": "yes"}},
         "'include_usage' must be bool"),
        ("/v1/completions", {"prompt": "Hi", "tools": TOOLS}, "Unknown parameter: 'tools'."),  # no template there
        # JSON can spell a lone surrogate, which no tokenizer can take: was a 500
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "U+D800, a lone surrogate"),
        ("/v1/completions", b'{"prompt": "a\\ud800b"}', "U+D800, a lone surrogate")]:
        status, answer = s.post(path, body)
        assert status == 400 and why in answer["error"]["message"], (why, answer)
    assert "Traceback" not in "".join(s.stderr)  # refused, not crashed


def test_chat_message_fields_are_checked_never_dropped(thinker_server):
    """Each chat message takes its role's fields (OpenAI's), each content part and tool call its own: an unknown
    one, `name` (the template has no place for it: different participants would be merged), or an assistant's
    refusal, audio or function_call is a 400 in OpenAI's shape naming the field, never accepted and dropped."""
    s = thinker_server
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    tool_turn = [*HI, {"role": "assistant", "content": None, "tool_calls": [call]}]
    named = "'messages[{}].name' is not supported by this server: the model's chat template has no place for a " \
            "participant's name (got \"{}\")"
    cases = [
        ([{**HI[0], "name": "alice"}], named.format(0, "alice")),
        ([{"role": "system", "content": "Be terse.", "name": "boss"}, *HI], named.format(0, "boss")),
        ([*HI, {"role": "assistant", "content": "Hello", "name": "bot"}, *HI], named.format(1, "bot")),
        # OpenAI defines no name on tool messages
        ([*tool_turn, {"role": "tool", "tool_call_id": "call_1", "content": "12:00", "name": "get_time"}],
         "Unknown parameter: 'messages[2].name'."),
        ([{**HI[0], "lang": "fr"}], "Unknown parameter: 'messages[0].lang'."),
        ([{**HI[0], "reasoning_content": "x"}], "Unknown parameter: 'messages[0].reasoning_content'."),
        ([{"role": "user", "content": [{"type": "text", "text": "Hi", "lang": "fr"}]}],
         "Unknown parameter: 'messages[0].content[0].lang'."),
        ([{"role": "user", "content": [{"type": "text", "text": "Hi", "prompt_cache_breakpoint": {"mode": "auto"}}]}],
         "'messages[0].content[0].prompt_cache_breakpoint' must be {mode: explicit, ttl: 30m or 12h}"),
        ([*HI, {"role": "assistant", "content": None, "tool_calls": [{**call, "index": 0}]}, *HI],
         "Unknown parameter: 'messages[1].tool_calls[0].index'."),
        ([*HI, {"role": "assistant", "content": None, "tool_calls": [
            {**call, "function": {**call["function"], "strict": True}}]}, *HI],
         "Unknown parameter: 'messages[1].tool_calls[0].function.strict'."),
        ([*HI, {"role": "assistant", "content": None, "refusal": "I cannot help with that."}, *HI],
         "'messages[1].refusal' is not supported by this server (got \"I cannot help with that.\")"),
        ([*HI, {"role": "assistant", "content": None, "function_call": {"name": "get_time", "arguments": "{}"}},
          *HI], "'messages[1].function_call' is not supported by this server"),
        ([*HI, {"role": "assistant", "audio": {"id": "audio_1"}}, *HI],
         "'messages[1].audio' is not supported by this server (got {\"id\": \"audio_1\"})"),
    ]
    for messages, why in cases:
        with pytest.raises(openai.BadRequestError) as e:
            s.client().chat.completions.create(model=s.name, messages=messages, max_tokens=5)
        error = e.value.body  # the SDK's: the body's "error" object
        assert e.value.status_code == 400 and why in error["message"], (why, error)
        assert error == {"message": error["message"], "type": "invalid_request_error", "param": "messages",
                         "code": "unknown_parameter" if why.startswith("Unknown") else None}, error
        status, answer = s.post("/v1/chat/completions", {"model": s.name, "messages": messages, "max_tokens": 5})
        assert (status, answer) == (400, {"error": error}), answer
    assert "Traceback" not in "".join(s.stderr)


def test_chat_message_fields_meaning_nothing_here_are_accepted(thinker_server):
    """An empty name, an assistant's refusal / audio / function_call at null and a text part's cache breakpoint
    are taken and change nothing in the prompt; a message read back from the server (reasoning_content and
    tool_calls included) goes into the next request as the SDK sends it."""
    s = thinker_server
    c = s.client()
    prompt = c.chat.completions.create(model=s.name, messages=[*HI, {"role": "assistant", "content": "Hello"}, *HI],
                                       max_tokens=1).usage.prompt_tokens
    same = c.chat.completions.create(model=s.name, max_tokens=1, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hi",
                                      "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "30m"}}], "name": ""},
        {"role": "assistant", "content": "Hello", "refusal": None, "audio": None, "function_call": None,
         "name": None, "tool_calls": None},
        {"role": "user", "content": [{"type": "text", "text": "Hi", "prompt_cache_breakpoint": {"mode": "explicit"}}]},
    ])
    assert same.usage.prompt_tokens == prompt
    answer = c.chat.completions.create(model=s.name, messages=HI, max_tokens=20).choices[0].message
    assert answer.content == "ok" and answer.model_extra["reasoning_content"] == "Let"
    follow = c.chat.completions.create(model=s.name, messages=[*HI, answer, *HI], max_tokens=20)
    assert follow.choices[0].message.content == "ok"
    # no arguments: the grammar can only close the call (sampled ones could run past max_tokens)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}]
    calls = c.chat.completions.create(model=s.name, messages=HI, tools=tools, tool_choice="required", max_tokens=60)
    message = calls.choices[0].message
    assert message.tool_calls and message.tool_calls[0].function.name == "get_time"
    tool = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "12:00"}
    done = c.chat.completions.create(model=s.name, messages=[*HI, message, tool], tools=tools, max_tokens=20)
    assert done.choices[0].message.content == "ok"


def test_chat_template_kwargs_reach_the_template():
    """Variables besides enable_thinking (Qwen3.6's preserve_thinking) go to the template as given."""
    from qwen3_mlx.server.protocol import parse_request

    body = {"messages": HI, "chat_template_kwargs": {"enable_thinking": False, "preserve_thinking": True, "x": [1]}}
    req = parse_request(body, chat=True, model_ids=("m",), max_tokens_limit=100)
    assert req.options.chat_template_kwargs == {"preserve_thinking": True, "x": [1]} and req.options.enable_thinking is False


def test_queue_full_is_429_and_a_dropped_stream_frees_the_engine(tiny_server, tiny):
    client = tiny_server.client()
    long = client.completions.create(model=tiny.name, prompt="Hello", max_tokens=3000, temperature=0, stream=True)
    next(iter(long))  # generating now; --max-queue 0 leaves no room behind it
    status, body = tiny_server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 429 and body["error"]["code"] == "queue_full"
    long.close()  # the client goes away mid-stream: its generation stops
    deadline = time.time() + 30
    while True:
        status, body = tiny_server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        if status == 200 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert status == 200 and body["usage"]["completion_tokens"] == 2


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["ok", "n", "tags"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_is_enforced_during_sampling(tiny_server, tiny, stream):
    """A random model's free output is not JSON; with response_format it parses and validates, every seed."""
    client = tiny_server.client()
    base = {"model": tiny.name, "messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 60,
            "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
    free = client.chat.completions.create(**base, seed=0).choices[0].message.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        if stream:
            parts = client.chat.completions.create(**base, seed=seed, response_format=fmt, stream=True)
            text = "".join(ev.choices[0].delta.content or "" for ev in parts if ev.choices)
        else:
            text = client.chat.completions.create(**base, seed=seed, response_format=fmt).choices[0].message.content
        jsonschema.validate(json.loads(text), SCHEMA)
    # "any JSON object": a random model may write one long string key until max_tokens, but it starts as one
    obj = client.chat.completions.create(**base, seed=5, response_format={"type": "json_object"}).choices[0]
    assert obj.message.content.startswith("{")
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content), dict)


def test_prefix_cache_hits_across_turns_where_the_template_drops_reasoning(thinker_server):
    client = thinker_server.client()
    first = client.chat.completions.create(model=thinker_server.name, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=20)
    again = client.chat.completions.create(model=thinker_server.name, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=20)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1  # all but the last
    assert again.choices[0].message.content == first.choices[0].message.content == "ok"
    turn2 = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "And now?"}]
    second = client.chat.completions.create(model=thinker_server.name, messages=turn2, max_tokens=20)
    # turn 1's <think>Let</think> is gone from the history: the cache still holds the prompt up to that reply
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
    assert second.choices[0].message.content == "ok"


def test_concurrent_clients_get_their_solo_answers(tiny, monkeypatch):
    """A small run of benchmarks/serve_load.py: 8 clients x 2 requests, streamed and not, one hanging up."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("serve_load", Path(__file__).parents[1] / "benchmarks" / "serve_load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    # No prefix reuse here: a reused prefix is prefilled in other chunk sizes, which may round differently.
    server = Server(tiny, "--prompt-cache-bytes", "0")
    try:
        r = load.run_load(server.base, tiny.name, clients=8, per_client=2)
    finally:
        server.close()
    assert r["failures"] == [] and r["completed"] + r["dropped"] == 16 and r["dropped"] == 2
    assert r["alive_after"]


@pytest.fixture(scope="module")
def fuzz_server(tiny):
    server = Server(tiny, "--max-tokens-limit", "8", "--max-queue", "64")
    yield server
    server.close()


def test_openapi_document_fuzzed_with_schemathesis_gives_no_server_errors(fuzz_server):
    """schemathesis generates requests from the server's own OpenAPI document (valid and invalid ones):
    none may be answered with a 5xx."""
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(fuzz_server.base + "/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            response = case.call(timeout=60)
            if response.status_code >= 500:
                failures.append((case.path, case.body, response.status_code, response.text[:200]))

        fuzz()
    assert failures == []


def test_a_batch_of_16_gives_each_request_its_solo_generate_output(tiny):
    """16 clients at once, one forward per step over all of them: greedy chat and completions (thinking on and
    off, a thinking budget, an enforced JSON schema, both) each give exactly what `generate` gives alone, and a
    seeded sampled request draws what it draws alone."""
    from qwen3_mlx.generate import generate
    from qwen3_mlx.loader import load

    model, tokenizer = load(tiny)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    requests = []
    for i in range(16):
        think = i % 3 == 0
        req = {"messages": [{"role": "user", "content": f"Question {i}: " + "why " * (i * 7)}],
               "max_tokens": 20 + 5 * (i % 4), "temperature": 0, "think": think}
        if i == 3:
            req["thinking_budget"] = 5
        if i == 5:
            req.update(temperature=0.9, seed=1234)
        if i == 7:
            req.update(think=False, response_format=fmt, max_tokens=60)
        if i == 9:
            req = {"prompt": "Once upon a time " * (i + 1), "max_tokens": 25, "temperature": 0}
        if i == 11:  # a thinking budget and a schema together
            req.update(think=True, thinking_budget=4, response_format=fmt, max_tokens=90)
        requests.append(req)

    def reference(req) -> str:
        opts = {"max_tokens": req["max_tokens"], "temperature": req["temperature"], "seed": req.get("seed")}
        if "prompt" in req:
            return generate(model, tokenizer, req["prompt"], **opts).text
        opts.update(enable_thinking=req["think"], thinking_budget=req.get("thinking_budget"))
        opts["response_format"] = req.get("response_format")
        r = generate(model, tokenizer, req["messages"], **opts)
        return r.reasoning + "|" + r.answer

    expected = [reference(r) for r in requests]
    server = Server(tiny, "--max-concurrency", "16", "--prompt-cache-bytes", "0")
    barrier = threading.Barrier(16)

    def ask(req) -> str:
        client = server.client()
        barrier.wait()
        common = {"model": tiny.name, "max_tokens": req["max_tokens"], "temperature": req["temperature"],
                  "seed": req.get("seed")}
        if "prompt" in req:
            return client.completions.create(prompt=req["prompt"], **common).choices[0].text
        extra = {"chat_template_kwargs": {"enable_thinking": req["think"]}}
        if "thinking_budget" in req:
            extra["thinking_budget"] = req["thinking_budget"]
        more = {"response_format": req["response_format"]} if "response_format" in req else {}
        m = client.chat.completions.create(messages=req["messages"], extra_body=extra, **common, **more).choices[0].message
        return (m.model_extra.get("reasoning_content") or "") + "|" + (m.content or "")

    try:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(ask, requests))
        with urllib.request.urlopen(server.base + "/health", timeout=10) as r:
            health = json.loads(r.read())
    finally:
        server.close()
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"request {i}: {requests[i]}"
    json.loads(got[7].split("|", 1)[1])  # the schema held in the batch too
    assert health["peak_batch"] >= 8 and health["running"] == 0
