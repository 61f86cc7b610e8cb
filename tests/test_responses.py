"""OpenAI's Responses API on `qwen3-mlx serve`, driven by the official `openai` SDK."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import test_server

# test_server's module fixtures (a server per module).
api_server, thinker_server = test_server.api_server, test_server.thinker_server


TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather for a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 3}},
    "required": ["city", "days"], "additionalProperties": False}}]
NO_THINKING = {"effort": "none"}  # Qwen3's template has no reasoning_effort: none turns thinking off


def test_plain_and_streamed_answers_are_generates(api_server, tiny_checkpoint):
    from qwen3_mlx.generate import generate
    from qwen3_mlx.loader import load

    model, tokenizer = load(tiny_checkpoint)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    ref = generate(model, tokenizer, messages, max_tokens=12, temperature=0, enable_thinking=False)
    c = api_server.client()
    args = {"model": tiny_checkpoint.name, "instructions": "Be terse.", "input": "Hi", "max_output_tokens": 12,
            "temperature": 0, "reasoning": NO_THINKING}
    r = c.responses.create(**args)
    assert r.object == "response" and r.id.startswith("resp_") and r.output_text == ref.answer
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 12 and r.usage.input_tokens == ref.prompt_tokens
    events = list(c.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    order = ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
             "response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert [k for i, k in enumerate(kinds) if k in order and kinds[i - 1] != k] == order  # deltas collapsed
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ref.answer
    assert events[-1].response.output_text == ref.answer


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_gives_a_function_call_that_validates(api_server, tiny_checkpoint, stream):
    c = api_server.client()
    for seed in range(2):
        args = {"model": tiny_checkpoint.name, "input": f"Weather {seed}?", "tools": TOOLS,
                "tool_choice": "required", "parallel_tool_calls": False, "max_output_tokens": 120,
                "reasoning": NO_THINKING, "temperature": 1, "extra_body": {"seed": seed}}
        if stream:
            events = list(c.responses.create(**args, stream=True))
            r = events[-1].response
            deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        else:
            r = c.responses.create(**args)
        calls = [i for i in r.output if i.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "get_weather", r.output
        jsonschema.validate(json.loads(calls[0].arguments), TOOLS[0]["parameters"])
        if stream:
            assert deltas == calls[0].arguments


def test_previous_response_id_continues_a_stored_conversation(api_server, tiny_checkpoint):
    """The follow-up sees the first exchange (more input tokens than the new input alone), GET returns a stored
    response, an unknown or unstored id is a 404, and the store keeps only the last --responses-store."""
    c = api_server.client()
    first = c.responses.create(model=tiny_checkpoint.name, input="Weather in Paris?", tools=TOOLS,
                               tool_choice="required", parallel_tool_calls=False, temperature=0,
                               max_output_tokens=120, reasoning=NO_THINKING)
    (call,) = [i for i in first.output if i.type == "function_call"]
    follow = [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    second = c.responses.create(model=tiny_checkpoint.name, previous_response_id=first.id, input=follow,
                                tools=TOOLS, max_output_tokens=5, reasoning=NO_THINKING, temperature=0)
    alone = c.responses.create(model=tiny_checkpoint.name, input="sunny", max_output_tokens=5,
                               reasoning=NO_THINKING, temperature=0)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens > alone.usage.input_tokens
    assert c.responses.retrieve(first.id).output[0].id == first.output[0].id
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model=tiny_checkpoint.name, previous_response_id="resp_nope", input="x")
    for refused in ({"background": True}, {"truncation": "auto"}, {"top_logprobs": 3}):  # refused, not ignored
        with pytest.raises(openai.BadRequestError, match=next(iter(refused))):
            c.responses.create(model=tiny_checkpoint.name, input="x", **refused)
    unstored = c.responses.create(model=tiny_checkpoint.name, input="x", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)
    for i in range(4):  # the store holds 4: the first one leaves
        c.responses.create(model=tiny_checkpoint.name, input=f"x{i}", max_output_tokens=1)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)


def test_bad_and_unimplemented_fields_are_400s(api_server, tiny_checkpoint):
    """Every field is implemented or refused in OpenAI's error shape, never ignored, and none crashes."""
    base = {"model": tiny_checkpoint.name, "input": "x", "max_output_tokens": 2}
    call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}
    cases = [({**base, "frobnicate": 1}, "Unknown parameter: 'frobnicate'."),
             ({**base, "text": {"format": "json"}}, "'format' must be dict"),  # was a 500
             ({**base, "text": {"verbosity": "low"}}, "'text.verbosity' is not supported"),
             ({**base, "service_tier": "flex"}, "'service_tier' is not supported"),
             ({**base, "prompt_cache_retention": "24h"}, "'prompt_cache_retention' is not supported"),
             ({**base, "reasoning": {"effort": 5}}, "'effort' must be str"),
             ({**base, "reasoning": {"summary": "brief"}}, "reasoning.summary must be"),
             ({**base, "metadata": {"n": 1}}, "'metadata' must map"),
             ({**base, "tools": [{**TOOLS[0], "defer_loading": True}]}, "'tools[0].defer_loading' is not"),
             ({**base, "tools": [{**TOOLS[0], "colour": "red"}]}, "Unknown parameter: 'tools[0].colour'."),
             ({**base, "input": [{**call, "arguments": "[1]"}]}, "arguments are not a JSON object"),
             ({**base, "input": [{**call, "name": 5}]}, "needs a name, a call_id and arguments"),
             ({**base, "input": [{"type": "function_call_output", "output": "sunny"}]}, "needs a call_id"),
             ({**base, "max_output_tokens": 5000}, "plus max_output_tokens (5000) exceeds the model's context")]
    for body, why in cases:
        status, answer = api_server.post("/v1/responses", body)
        assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}, answer
        assert why in answer["error"]["message"], (why, answer)
    assert "Traceback" not in "".join(api_server.stderr)  # refused, not crashed


def test_identity_fields_and_a_tool_named_like_a_choice(api_server, tiny_checkpoint):
    """metadata is echoed, the fields naming who asks are taken; a tool may be named "none": tool_choice names it
    and it is called."""
    tool = {**TOOLS[0], "name": "none", "strict": True}
    r = api_server.client().responses.create(
        model=tiny_checkpoint.name, input="Weather?", tools=[tool], tool_choice={"type": "function", "name": "none"},
        max_output_tokens=120, reasoning=NO_THINKING, temperature=1, metadata={"k": "v"}, user="u1",
        safety_identifier="s1", prompt_cache_key="p1", service_tier="auto", extra_body={"seed": 0})
    calls = [i for i in r.output if i.type == "function_call"]
    assert [c.name for c in calls] == ["none"] and r.metadata == {"k": "v"}, r.output
    jsonschema.validate(json.loads(calls[0].arguments), TOOLS[0]["parameters"])


def test_a_server_storing_nothing_says_so():
    """--responses-store 0: the response says it is not stored, and previous_response_id names why it is not found."""
    from qwen3_mlx.options import GenerationOptions
    from qwen3_mlx.server.protocol import ApiError
    from qwen3_mlx.server.responses import ResponseStore, parse_request

    store = ResponseStore(0)
    kwargs = {"model_ids": ("m", "m"), "max_tokens_limit": 8, "base": GenerationOptions(), "store": store,
              "tokenizer": None}
    assert parse_request({"input": "x"}, **kwargs).echo_fields["store"] is False
    with pytest.raises(ApiError, match="this server stores no responses") as e:
        parse_request({"input": "x", "previous_response_id": "resp_1"}, **kwargs)
    assert e.value.status == 404


def test_reasoning_items(thinker_server):
    """Thinking output is a reasoning item (whole and streamed), the answer a message."""
    c = thinker_server.client()
    r = c.responses.create(model=thinker_server.name, input="Hi", max_output_tokens=40)
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Let" and r.output_text == "ok" and r.status == "completed"
    assert r.output[0].summary == []  # none asked for
    assert r.usage.output_tokens_details.reasoning_tokens == 3  # <think>, Let, </think>
    events = list(c.responses.create(model=thinker_server.name, input="Hi", max_output_tokens=40, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Let"
    assert [i.type for i in events[-1].response.output] == ["reasoning", "message"]
    off = c.responses.create(model=thinker_server.name, input="Hi", max_output_tokens=40, reasoning={"effort": "none"})
    assert [i.type for i in off.output] == [] and off.usage.output_tokens == 1
    # A summary asked for is the whole reasoning, whole and streamed (once the reasoning is done).
    summed = c.responses.create(model=thinker_server.name, input="Hi", max_output_tokens=40,
                                reasoning={"summary": "auto"})
    assert [p.text for p in summed.output[0].summary] == ["Let"] and summed.output_text == "ok"
    events = list(c.responses.create(model=thinker_server.name, input="Hi", max_output_tokens=40, stream=True,
                                     reasoning={"summary": "concise"}))
    assert [e.text for e in events if e.type == "response.reasoning_summary_text.done"] == ["Let"]
    assert [p.text for p in events[-1].response.output[0].summary] == ["Let"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
