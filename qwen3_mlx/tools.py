"""Tool calls in Qwen3 answers (Hermes style): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`."""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(</function>|$)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)


@dataclass
class ToolCall:
    """One parsed `<tool_call>` block. When the block cannot be used, `error` says why and `raw` keeps the text."""

    name: str | None
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_message_call(self) -> dict:
        """The form chat templates take in an assistant message's `tool_calls`."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tool_calls(text: str, tools: list[dict] | None = None) -> list[ToolCall]:
    """Every tool call in `text`, in order, in either form (module docstring). `tools`: the request's tool
    definitions (OpenAI form), whose parameter schemas type the XML form's values. Malformed blocks (bad JSON, no
    name, unclosed) are returned with `error` set rather than raising: model output is not trusted."""
    return [call for _, call in _calls(text, tools)]


def split_tool_calls(text: str, tools: list[dict] | None = None) -> tuple[str, list[ToolCall]]:
    """`text` without its usable tool-call blocks, and every call in it as `parse_tool_calls` gives them. Blocks
    that cannot be used stay in the text: a conversation shows what the model wrote."""
    calls = _calls(text, tools)
    if not calls:
        return text, []
    kept, start = [], 0
    for block, call in calls:
        if call.ok:
            kept.append(text[start:block.start()])
            start = block.end()
    kept.append(text[start:])
    return "".join(kept).strip(), [call for _, call in calls]


def _calls(text: str, tools: list[dict] | None) -> list[tuple[re.Match, ToolCall]]:
    """Each call's block (its match in `text`) and the call parsed from it."""
    blocks = [(m, m.group(1).strip(), bool(m.group(2))) for m in _BLOCK.finditer(text)]
    if not blocks and "<function=" in text:  # the XML form without its <tool_call> wrapper
        blocks = [(m, m.group(0), True) for m in _FUNCTION.finditer(text)]
    calls = []
    for block, raw, closed in blocks:
        if raw.startswith("<function="):
            call = _xml_call(raw, closed, _schemas(tools))
        elif not closed:
            call = ToolCall(None, raw=raw, error="unterminated <tool_call> block (no </tool_call>)")
        else:
            call = _json_call(raw)
        calls.append((block, call))
    return calls


def _finite(text: str) -> float:
    """A JSON number as a float, clamped to the largest finite one: 1E400 is valid JSON (the grammar cannot bound
    exponents), but as inf it would be written back as Infinity, which is not JSON."""
    value = float(text)
    return math.copysign(sys.float_info.max, value) if math.isinf(value) else value


def _json_call(raw: str) -> ToolCall:
    try:
        data = json.loads(raw, parse_float=_finite)
    except json.JSONDecodeError as e:
        return ToolCall(None, raw=raw, error=f"malformed JSON: {e}")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCall(None, raw=raw, error='expected a JSON object with a string "name"')
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some models double-encode the arguments
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(data["name"], raw=raw, error='"arguments" is not a JSON object')
    return ToolCall(data["name"], arguments, raw=raw)


def _schemas(tools: list[dict] | None) -> dict[str, dict]:
    """Tool name -> its parameters' `properties` schemas."""
    out = {}
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters") or {}
            out[fn["name"]] = params.get("properties") or {} if isinstance(params, dict) else {}
    return out


def _xml_call(raw: str, closed: bool, schemas: dict[str, dict]) -> ToolCall:
    m = _FUNCTION.match(raw)
    if m is None:
        return ToolCall(None, raw=raw, error="expected <function=NAME>")
    name = m.group(1).strip()
    if not (closed and m.group(3)):
        return ToolCall(name, raw=raw, error="unterminated <function=...> block (no </function>)")
    props = schemas.get(name, {})
    arguments = {}
    for p in _PARAMETER.finditer(m.group(2)):
        key, value = p.group(1).strip(), p.group(2)
        # The template writes "<parameter=k>\nvalue\n</parameter>": one newline each side is layout.
        value = value.removeprefix("\n").removesuffix("\n")
        arguments[key] = coerce(value, props.get(key))
    return ToolCall(name, arguments, raw=raw)


def coerce(value: str, schema: dict | None) -> Any:
    """An XML parameter's text as the JSON type its schema declares (the text itself when it does not parse
    as that type, or without a schema)."""
    kinds = (schema or {}).get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    text = value.strip()
    for kind in kinds:
        if kind in ("integer", "number"):
            try:
                return int(text)
            except ValueError:
                pass
            try:
                number = _finite(text)
            except ValueError:
                continue
            if kind == "number":
                return number
            if number.is_integer():
                return int(number)
            continue
        if kind == "boolean" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if kind == "null" and text.lower() in ("null", "none"):
            return None
        if kind in ("object", "array"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict if kind == "object" else list):
                return parsed
    return value
