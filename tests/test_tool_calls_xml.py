"""The Qwen3.5 / 3.6 XML tool-call form, parsed into typed arguments (and the older JSON form beside it)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3_mlx.server.protocol import chat_message
from qwen3_mlx.tools import parse_tool_calls

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "temp": {"type": "number"},
    "opts": {"type": "object"}, "tags": {"type": "array"}, "metric": {"type": "boolean"},
    "code": {"type": "string"}}}}}]


def render(name: str, arguments: dict) -> str:
    """What Qwen3.5's chat template writes for a call: strings as they are, everything else as JSON."""
    params = "".join(
        f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n" for k, v in arguments.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def test_hand_written_call_is_typed_by_the_schema():
    text = ("Let me look that up.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n<parameter=temp>\n21.5\n</parameter>\n<parameter=opts>\n"
            '{"unit": "C", "hourly": false}\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=code>\n'
            "007\n</parameter>\n</function>\n</tool_call>")
    (call,) = parse_tool_calls(text, TOOLS)
    assert call.ok and call.name == "get_weather"
    assert call.arguments == {"city": "Paris", "days": 3, "temp": 21.5, "opts": {"unit": "C", "hourly": False},
                              "metric": True, "code": "007"}  # a string stays a string, leading zeros and all
    message, has_calls = chat_message("", text, TOOLS)
    assert has_calls and message["content"] == "Let me look that up."
    assert json.loads(message["tool_calls"][0]["function"]["arguments"])["days"] == 3


def test_tolerated_forms():
    # no <tool_call> wrapper; no schema (values stay text); a multi-line value; two calls; the older JSON form
    (bare,) = parse_tool_calls("<function=f>\n<parameter=x>\n5\n</parameter>\n</function>")
    assert bare.ok and bare.arguments == {"x": "5"}
    (multi,) = parse_tool_calls("<tool_call>\n<function=w>\n<parameter=body>\nline 1\nline 2\n</parameter>\n"
                                "</function>\n</tool_call>")
    assert multi.arguments == {"body": "line 1\nline 2"}
    two = parse_tool_calls(render("a", {"city": "x"}) + "\n" + render("b", {"city": "y"}), TOOLS)
    assert [c.name for c in two] == ["a", "b"]
    (old,) = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    assert old.ok and old.arguments == {"x": 1}
    (cut,) = parse_tool_calls("<tool_call>\n<function=f>\n<parameter=x>\n5")
    assert not cut.ok and "unterminated" in cut.error
    # a value that does not parse as its declared type is kept as text rather than dropped
    (odd,) = parse_tool_calls(render("get_weather", {"days": "three"}), TOOLS)
    assert odd.arguments == {"days": "three"}


values = {
    "city": st.text(st.characters(blacklist_characters="<\x00", blacklist_categories=("Cs",)), min_size=1).filter(
        lambda s: s == s.strip() and s.strip()),
    "days": st.integers(-10**6, 10**6),
    "temp": st.floats(allow_nan=False, allow_infinity=False, width=32),
    "opts": st.dictionaries(st.text(min_size=1, max_size=5), st.integers() | st.booleans(), max_size=3),
    "tags": st.lists(st.text(max_size=5), max_size=3),
    "metric": st.booleans(),
}


@settings(max_examples=60, deadline=None)
@given(st.fixed_dictionaries({}, optional=values))
def test_generated_calls_round_trip(arguments):
    (call,) = parse_tool_calls("Sure.\n" + render("get_weather", arguments), TOOLS)
    assert call.ok and call.arguments == arguments


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab<>=fnuctio \n", max_size=30), st.sampled_from(["", "<tool_call>\n", "<function=f>\n"]),
       st.lists(st.integers(1, 7), max_size=20))
def test_streamed_tool_call_start_equals_the_whole_text_split(before, marker, cuts):
    """The server's streaming split (text shown as it comes, the answer from the first tool-call marker on held
    for parsing) against the same split of the whole answer, however the text arrives in pieces."""
    from qwen3_mlx.server.protocol import TOOL_MARKERS, ToolStart

    answer = before + marker + ("<parameter=x>\n5\n</parameter>\n</function>" if marker else "")
    pieces, i = [], 0
    for n in cuts:
        pieces.append(answer[i : i + n])
        i += n
    pieces.append(answer[i:])
    starts, shown, call = ToolStart(), "", None
    for p in pieces:
        if call is not None:
            call += p
            continue
        text, call = starts.feed(p)
        shown += text
    if call is None:
        shown += starts.flush()
    at = min((j for j in (answer.find(m) for m in TOOL_MARKERS) if j >= 0), default=-1)
    assert (shown, call) == ((answer[:at], answer[at:]) if at >= 0 else (answer, None))


def test_a_number_beyond_float_range_is_clamped_to_the_largest_float():
    """1E400 is valid JSON (and the grammar cannot bound exponents) but no float: read as inf it would be written
    back as Infinity, which is not JSON. It becomes the largest finite float, in either form."""
    import sys

    (call,) = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": 1E400, "y": -2e999}}\n</tool_call>')
    assert call.ok and call.arguments == {"x": sys.float_info.max, "y": -sys.float_info.max}
    (xml,) = parse_tool_calls(render("get_weather", {"temp": "1E400"}), TOOLS)
    assert xml.arguments == {"temp": sys.float_info.max}
    message, has_calls = chat_message("", '<tool_call>\n{"name": "f", "arguments": {"x": 1E400}}\n</tool_call>')
    assert has_calls and json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"x": sys.float_info.max}
    json.dumps(message, allow_nan=False)  # what a JSON response body allows
