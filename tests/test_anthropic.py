"""Anthropic's Messages API on `qwen3-mlx serve`, driven by the official `anthropic` SDK."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest
import test_server
from test_server import KEY

# test_server's module fixtures (a server per module).
api_server, thinker_server = test_server.api_server, test_server.thinker_server


TOOLS = [{"name": "get_weather", "description": "Weather for a city.", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 3}},
    "required": ["city", "days"], "additionalProperties": False}}]
HI = [{"role": "user", "content": "Hi"}]
GREEDY = {"temperature": 0}  # the SDK no longer has sampling parameters; the server still takes them


def client(server, key=KEY):
    return anthropic.Anthropic(base_url=server.base, api_key=key, max_retries=0, timeout=120)


def test_plain_and_streamed_answers_are_generates(api_server, tiny_checkpoint):
    """A greedy message is what `generate` gives for the same conversation (thinking off: Anthropic's default),
    whole and streamed alike, with Anthropic's event order."""
    from qwen3_mlx.generate import generate
    from qwen3_mlx.loader import load

    model, tokenizer = load(tiny_checkpoint)
    system = "You are terse."
    ref = generate(model, tokenizer, [{"role": "system", "content": system}, *HI], max_tokens=12, temperature=0,
                   enable_thinking=False)
    c = client(api_server)
    m = c.messages.create(model=tiny_checkpoint.name, max_tokens=12, extra_body=GREEDY, system=system, messages=HI)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == ref.answer
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 12
    assert m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) == ref.prompt_tokens
    kinds = []
    with c.messages.stream(model=tiny_checkpoint.name, max_tokens=12, extra_body=GREEDY, system=system,
                           messages=HI) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_message()
    assert final.content[0].text == ref.answer and final.stop_reason == "max_tokens"
    raw = [k for k in kinds if k not in ("text",)]  # the SDK adds its own "text" events
    assert raw[0] == "message_start" and raw[-1] == "message_stop"
    assert raw.index("content_block_start") < raw.index("content_block_delta") < raw.index("content_block_stop")
    assert raw.index("content_block_stop") < raw.index("message_delta")
    # a stop sequence cuts the text and says which one
    stop = ref.answer[2:5]
    m = c.messages.create(model=tiny_checkpoint.name, max_tokens=12, extra_body=GREEDY, system=system, messages=HI,
                          stop_sequences=["\x00never", stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == ref.answer[: ref.answer.index(stop)]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_any_gives_a_tool_use_block_whose_input_validates(api_server, tiny_checkpoint, stream):
    """A random-weight model with tool_choice any: the answer is a tool_use block of a declared tool whose input
    validates against its input_schema, every seed (the grammar, not luck)."""
    c = client(api_server)
    for seed in range(3):
        args = {"model": tiny_checkpoint.name, "max_tokens": 120,
                "messages": [{"role": "user", "content": f"Weather {seed}?"}], "tools": TOOLS,
                "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
                "extra_body": {"temperature": 1, "seed": seed}}
        if stream:
            with c.messages.stream(**args) as s:
                m = s.get_final_message()
        else:
            m = c.messages.create(**args)
        uses = [b for b in m.content if b.type == "tool_use"]
        assert m.stop_reason == "tool_use" and len(uses) == 1, m
        assert uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
        jsonschema.validate(uses[0].input, TOOLS[0]["input_schema"])


def test_a_tool_result_goes_back_into_the_prompt(api_server, tiny_checkpoint):
    """tool_use in the assistant turn and tool_result in the next user turn reach the template (count_tokens
    grows by the result's tokens), and tool_choice none answers in text."""
    c = client(api_server)
    turn = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Paris", "days": 1}}]}]
    short = c.messages.count_tokens(model=tiny_checkpoint.name, tools=TOOLS, messages=turn + [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}])
    long = c.messages.count_tokens(model=tiny_checkpoint.name, tools=TOOLS, messages=turn + [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "sunny and warm, light wind from the west"}]}])
    assert 0 < short.input_tokens < long.input_tokens
    m = c.messages.create(model=tiny_checkpoint.name, max_tokens=20, tools=TOOLS, tool_choice={"type": "none"},
                          messages=turn + [{"role": "user", "content": [
                              {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}])
    assert m.stop_reason in ("end_turn", "max_tokens") and m.content and all(b.type == "text" for b in m.content)


def test_thinking_blocks_and_the_budget(thinker_server):
    """thinking enabled: a thinking block, then the text; budget_tokens 0 cuts the reasoning at once; absent
    thinking means none (Anthropic's default)."""
    c = client(thinker_server)
    m = c.messages.create(model=thinker_server.name, max_tokens=60, messages=HI,
                          thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "Let" and m.content[1].text == "ok" and m.stop_reason == "end_turn"
    with c.messages.stream(model=thinker_server.name, max_tokens=60, messages=HI,
                           thinking={"type": "enabled", "budget_tokens": 1024}) as s:
        streamed = s.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in streamed.content] == [
        ("thinking", "Let"), ("text", "ok")]
    cut = c.messages.create(model=thinker_server.name, max_tokens=80, messages=HI,
                            thinking={"type": "enabled", "budget_tokens": 0})
    assert "Let" not in cut.content[0].thinking and "limited time" in cut.content[0].thinking
    # Off: the template closes an empty think block, after which this model can only end its turn.
    off = c.messages.create(model=thinker_server.name, max_tokens=60, messages=HI)
    assert off.content == [] and off.usage.output_tokens == 1 and off.stop_reason == "end_turn"


def test_errors_are_anthropic_shaped(thinker_server):
    with pytest.raises(anthropic.AuthenticationError):
        client(thinker_server, key="wrong").messages.create(model=thinker_server.name, max_tokens=5, messages=HI)
    with pytest.raises(anthropic.NotFoundError):
        client(thinker_server).messages.create(model="claude-opus-9", max_tokens=5, messages=HI)
    base = {"model": thinker_server.name, "max_tokens": 5, "messages": HI}
    cases = [({"model": thinker_server.name, "messages": HI}, "max_tokens: field required"),
             ({**base, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'image'"),
             ({**base, "tool_choice": {"type": "tool", "name": "nope"}, "tools": TOOLS}, "'nope'"),
             ({**base, "tool_choice": {"type": ["any"]}}, "tool_choice: type must be"),  # was a 500
             ({**base, "tools": TOOLS, "tool_choice": {"type": "any", "disable_parallel_tool_use": "yes"}},
              "'disable_parallel_tool_use' must be bool"),
             ({**base, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
              "needs a string 'text'"),
             # a final assistant turn would be closed by the template, not continued: refused
             ({**base, "messages": [*HI, {"role": "assistant", "content": "The answer is"}]}, "prefill"),
             # not implemented: refused, not ignored
             ({**base, "mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}, "'mcp_servers' is not"),
             ({**base, "speed": "fast"}, "'speed' is not supported"),
             ({**base, "thinking": {"type": "adaptive", "display": "omitted"}}, "'thinking.display' is not"),
             ({**base, "tools": [{**TOOLS[0], "defer_loading": True}]}, "'tools[0].defer_loading' is not"),
             ({**base, "frobnicate": 1}, "Unknown parameter: 'frobnicate'"),
             ({**base, "output_config": {"format": {"type": "json_schema", "schema": {}}, "verbose": True}},
              "Unknown parameter: 'output_config.verbose'")]
    for body, why in cases:
        got, answer = thinker_server.post("/v1/messages", body, key=None, headers={"x-api-key": KEY})  # Anthropic's
        assert got == 400 and answer["type"] == "error", answer
        assert set(answer["error"]) == {"type", "message"} and answer["error"]["type"] == "invalid_request_error"
        assert why in answer["error"]["message"] and "Traceback" not in answer["error"]["message"], (why, answer)
    # count_tokens takes the fields that shape the prompt only
    got, answer = thinker_server.post("/v1/messages/count_tokens", base, key=None, headers={"x-api-key": KEY})
    assert got == 400 and answer["error"]["message"] == "Unknown parameter: 'max_tokens'.", answer
    assert "Traceback" not in "".join(thinker_server.stderr)  # refused, not crashed


def test_system_messages_and_a_tool_named_like_a_choice(api_server, tiny_checkpoint):
    """A system message in `messages` is the template's system turn (first, it is the `system` field's); a tool
    may be named "none": tool_choice names it, and it is called."""
    c = client(api_server)
    count = c.messages.count_tokens(model=tiny_checkpoint.name, system="Be terse.", messages=HI).input_tokens
    assert c.messages.count_tokens(model=tiny_checkpoint.name, messages=[
        {"role": "system", "content": "Be terse."}, *HI]).input_tokens == count
    assert c.messages.count_tokens(model=tiny_checkpoint.name, messages=HI).input_tokens < count
    tools = [{**TOOLS[0], "name": "none", "strict": True, "cache_control": {"type": "ephemeral"}}]
    m = c.messages.create(model=tiny_checkpoint.name, max_tokens=120, messages=HI, tools=tools,
                          tool_choice={"type": "tool", "name": "none"}, metadata={"user_id": "u1"},
                          service_tier="standard_only", extra_body={"temperature": 1, "seed": 0})
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and [u.name for u in uses] == ["none"], m
    jsonschema.validate(uses[0].input, TOOLS[0]["input_schema"])


USE = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": 1}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}


def _after_use(*blocks) -> list[dict]:
    """A conversation whose last user turn holds `blocks`, after an assistant turn that called get_weather."""
    return [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": [USE]},
            {"role": "user", "content": list(blocks)}]


def test_messages_and_blocks_take_only_their_own_fields(thinker_server):
    """Each message, each content block (text, tool_use, tool_result and its content, thinking,
    redacted_thinking) and each system block takes the fields the Messages API defines for it. An unknown field, or
    one this server cannot honour (citations, a caller other than the model, a toolset), is a 400 in Anthropic's
    shape naming it, through the SDK as on the wire and on count_tokens too: never accepted and dropped."""
    c = client(thinker_server)
    text = {"type": "text", "text": "Hi"}
    unknown = [  # (messages, system, the field's path)
        ([{**HI[0], "name": "bob"}], None, "messages[0].name"),
        ([{"role": "user", "content": [{**text, "lang": "fr"}]}], None, "messages[0].content[0].lang"),
        (HI, [{"type": "text", "text": "Be terse.", "priority": "high"}], "system[0].priority"),
        ([{"role": "system", "content": [{**text, "x": 1}]}, *HI], None, "messages[0].content[0].x"),
        ([*HI, {"role": "assistant", "content": [{**USE, "parallel": True}]}, *HI], None,
         "messages[1].content[0].parallel"),
        (_after_use({**RESULT, "tool_name": "get_weather"}), None, "messages[2].content[0].tool_name"),
        (_after_use({**RESULT, "content": [{"type": "text", "text": "sunny", "unit": "C"}]}), None,
         "messages[2].content[0].content[0].unit"),
        ([*HI, {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "", "x": 1},
                                                 text]}, *HI], None, "messages[1].content[0].x"),
        ([*HI, {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "…", "x": 1}, text]}, *HI],
         None, "messages[1].content[0].x"),
        # the API defines no cache_control on thinking blocks
        ([*HI, {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "",
                                                  "cache_control": {"type": "ephemeral"}}, text]}, *HI], None,
         "messages[1].content[0].cache_control"),
        ([{"role": "user", "content": [{**text, "cache_control": {"type": "ephemeral", "scope": "global"}}]}], None,
         "messages[0].content[0].cache_control.scope"),
    ]
    cases = [(m, s, f"Unknown parameter: '{path}'.") for m, s, path in unknown]
    citation = {"type": "char_location", "cited_text": "Hi", "document_index": 0, "start_char_index": 0,
                "end_char_index": 2}
    cases += [
        ([{"role": "user", "content": [{**text, "citations": [citation]}]}], None,
         f"'messages[0].content[0].citations' is not supported by this server (got {json.dumps([citation])})"),
        ([*HI, {"role": "assistant", "content": [{**USE, "caller": {"type": "code_execution_20250825",
                                                                     "tool_id": "srvtoolu_1"}}]}, *HI], None,
         ("'messages[1].content[0].caller' is not supported by this server (got "
          '{"type": "code_execution_20250825", "tool_id": "srvtoolu_1"})')),
        (_after_use({**RESULT, "toolset_name": "browser"}), None,
         "'messages[2].content[0].toolset_name' is not supported by this server (got \"browser\")"),
        ([{"role": "user", "content": [{**text, "cache_control": {"type": "persistent"}}]}], None,
         "messages[0].content[0].cache_control: must be {type: ephemeral, ttl: 5m or 1h}"),
    ]
    for messages, system, why in cases:
        extra = {"system": system} if system else {}
        with pytest.raises(anthropic.BadRequestError) as e:
            c.messages.create(model=thinker_server.name, max_tokens=5, messages=messages, **extra)
        assert e.value.status_code == 400 and e.value.body == {
            "type": "error", "error": {"type": "invalid_request_error", "message": why}}, (why, e.value.body)
        for path in ("/v1/messages", "/v1/messages/count_tokens"):  # on the wire, both routes
            body = {"model": thinker_server.name, "messages": messages, **extra}
            got, answer = thinker_server.post(path, {**body, "max_tokens": 5} if path == "/v1/messages" else body,
                                              key=None, headers={"x-api-key": KEY})
            assert (got, answer) == (400, {"type": "error", "error": {"type": "invalid_request_error",
                                                                      "message": why}}), (path, why, answer)
    assert "Traceback" not in "".join(thinker_server.stderr)


def test_cache_control_and_fields_meaning_nothing_here_are_accepted(api_server, tiny_checkpoint):
    """cache_control on system, text, tool_use and tool_result blocks, on a tool and on the request, citations
    null, the model as a tool_use's caller: accepted, and the prompt and the greedy answer are those of the same
    request without them. A message read back from the server goes into the next request as the SDK sends it."""
    c = client(api_server)
    cache = {"type": "ephemeral", "ttl": "1h"}
    plain = {"model": tiny_checkpoint.name, "tools": TOOLS, "system": [{"type": "text", "text": "Be terse."}],
             "messages": [*_after_use(RESULT, {"type": "text", "text": "And Oslo?"})]}
    marked = {"model": tiny_checkpoint.name, "tools": [{**TOOLS[0], "cache_control": cache}],
              "system": [{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
              "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?",
                                                         "cache_control": cache, "citations": None}]},
                           {"role": "assistant", "content": [{**USE, "cache_control": cache,
                                                              "caller": {"type": "direct"}}]},
                           {"role": "user", "content": [{**RESULT, "cache_control": cache, "is_error": False},
                                                        {"type": "text", "text": "And Oslo?"}]}],
              "extra_body": {"cache_control": {"type": "ephemeral"}}}
    assert c.messages.count_tokens(**marked).input_tokens == c.messages.count_tokens(**plain).input_tokens
    want = c.messages.create(**plain, max_tokens=8, tool_choice={"type": "none"}, extra_body=GREEDY)
    got = c.messages.create(**{**marked, "extra_body": {**marked["extra_body"], **GREEDY}}, max_tokens=8,
                            tool_choice={"type": "none"})
    assert [b.type for b in got.content] == ["text"] and got.content == want.content
    # the answer, as the SDK read it, sent back as the assistant's turn
    again = c.messages.count_tokens(**{**plain, "messages": [
        *plain["messages"], {"role": "assistant", "content": got.content}, {"role": "user", "content": "Thanks."}]})
    assert again.input_tokens > c.messages.count_tokens(**plain).input_tokens


def test_a_thinking_answer_goes_back_as_it_came(thinker_server):
    """thinking and text blocks read back from the server (signature "") are taken in the next turn."""
    c = client(thinker_server)
    m = c.messages.create(model=thinker_server.name, max_tokens=60, messages=HI,
                          thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in m.content] == ["thinking", "text"]
    follow = c.messages.create(model=thinker_server.name, max_tokens=60, thinking={"type": "enabled",
                                                                                   "budget_tokens": 1024},
                               messages=[*HI, {"role": "assistant", "content": m.content}, *HI])
    assert [b.type for b in follow.content] == ["thinking", "text"]
