"""Tool calls in Qwen3 answers (Hermes style): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


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


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>` block in `text`, in order. Malformed blocks (bad JSON, no name, unclosed) are returned
    with `error` set rather than raising: model output is not trusted to be well-formed."""
    calls = []
    for match in _BLOCK.finditer(text):
        raw, closed = match.group(1).strip(), bool(match.group(2))
        if not closed:
            calls.append(ToolCall(None, raw=raw, error="unterminated <tool_call> block (no </tool_call>)"))
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            calls.append(ToolCall(None, raw=raw, error=f"malformed JSON: {e}"))
            continue
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            calls.append(ToolCall(None, raw=raw, error='expected a JSON object with a string "name"'))
            continue
        arguments = data.get("arguments", {})
        if isinstance(arguments, str):  # some models double-encode the arguments
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            calls.append(ToolCall(data["name"], raw=raw, error='"arguments" is not a JSON object'))
            continue
        calls.append(ToolCall(data["name"], arguments, raw=raw))
    return calls
