"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) over the same engine.

A body becomes the chat request the completions route would make (messages for the model's template, options,
stop strings), so batching, the prefix cache and the grammars work the same; the job's tokens become
Anthropic's message (thinking, text and tool_use blocks) or its event stream. Errors are Anthropic's shape
(errors.py picks it by the route).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from ..options import GenerationOptions
from .protocol import (
    ApiError,
    Request,
    _get,
    chat_message,
    check_fields,
    check_model,
    openai_tool_calls,
    seed_of,
    strip_tool_blocks,
)
from .streaming import Reply

# finish_reason -> Anthropic's stop_reason
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def _blocks(content: Any, where: str) -> list[dict]:
    """A message's content (`where`: its path, e.g. `messages[0].content`) as a list of blocks."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise ApiError(400, f"{where}: content must be a string or a list of content blocks", param=_param(where))
    return content


def _param(where: str) -> str:
    """The top-level field a nested path (`messages[0].content[1]`) is in."""
    return where.split(".")[0].split("[")[0]


def _cache_control(cache: Any, where: str) -> None:
    """A cache breakpoint ({type: ephemeral, ttl}): checked, then ignored on purpose (the prefix cache keeps every
    prompt it can without being asked, and a breakpoint changes no answer)."""
    if cache is None:
        return
    if not isinstance(cache, dict):
        raise ApiError(400, f"{where}: must be {{type: ephemeral, ttl: 5m or 1h}}", param=_param(where))
    check_fields(cache, frozenset({"type", "ttl"}), where=where)
    if cache.get("type") != "ephemeral" or cache.get("ttl") not in (None, "5m", "1h"):
        raise ApiError(400, f"{where}: must be {{type: ephemeral, ttl: 5m or 1h}}", param=_param(where))


# The fields of each content block type taken (anthropic.types.*BlockParam), and those refused unless absent or
# at a value meaning what this server does anyway. Every other field is refused, never dropped.
# - cache_control: accepted and ignored (see _cache_control).
# - text.citations: they point into document or search-result blocks, which are refused here: only none is taken.
# - tool_use.caller: who called the tool; only the model itself ({type: direct}) is what this server does.
# - toolset_name: tools of a toolset, which are refused here (custom tools only).
# - thinking.signature: taken and not checked (this server signs nothing; its own signatures are "").
# - redacted_thinking.data: Claude's encrypted reasoning, which no other model can read: the block is dropped,
#   as the template drops earlier turns' reasoning anyway.
_BLOCKS: dict[str, tuple[frozenset, dict]] = {
    "text": (frozenset({"type", "text", "cache_control"}), {"citations": (None, [])}),
    "tool_use": (frozenset({"type", "id", "name", "input", "cache_control"}),
                 {"caller": (None, {"type": "direct"}), "toolset_name": (None,)}),
    "tool_result": (frozenset({"type", "tool_use_id", "content", "is_error", "cache_control"}),
                    {"toolset_name": (None,)}),
    "thinking": (frozenset({"type", "thinking", "signature"}), {}),
    "redacted_thinking": (frozenset({"type", "data"}), {}),
}


def _check_block(block: dict, where: str) -> str:
    """A block's type, once every field of the block is checked (`where`: the block's path)."""
    kind = block.get("type")
    fields, unsupported = _BLOCKS[kind]
    check_fields(block, fields, unsupported, where=where)
    _cache_control(block.get("cache_control"), f"{where}.cache_control")
    return kind


def _string(block: dict, key: str, where: str) -> str:
    if not isinstance(block.get(key), str):
        raise ApiError(400, f"{where}: a {block.get('type')} block needs a string '{key}'", param=_param(where))
    return block[key]


def _text_of(content: Any, where: str) -> str:
    """Text blocks only (`system`, a system message, a tool_result's content)."""
    parts = []
    for i, block in enumerate(_blocks(content, where)):
        if block.get("type") != "text":
            raise ApiError(400, f"{where}[{i}]: only text blocks are supported here (got {block.get('type')!r})",
                           param=_param(where))
        _check_block(block, f"{where}[{i}]")
        parts.append(_string(block, "text", f"{where}[{i}]"))
    return "".join(parts)


def _user_turn(content: Any, where: str) -> list[dict]:
    """A user message: its tool_result blocks become `tool` messages (in order), its text one user message."""
    out, text = [], []
    for i, block in enumerate(_blocks(content, where)):
        kind, at = block.get("type"), f"{where}[{i}]"
        if kind not in ("text", "tool_result"):
            raise ApiError(400, f"{at}: {kind!r} content blocks are not supported (text and tool_result are)",
                           param=_param(where))
        _check_block(block, at)
        if kind == "text":
            text.append(_string(block, "text", at))
        else:
            result = block.get("content", "")
            body = result if isinstance(result, str) else _text_of(result, f"{at}.content")
            if _get(block, "is_error", (bool,), False):
                body = f"Error: {body}"
            out.append({"role": "tool", "content": body, "tool_call_id": _string(block, "tool_use_id", at)})
    if text:
        out.append({"role": "user", "content": "".join(text)})
    return out


def _assistant_turn(content: Any, where: str) -> dict:
    """An assistant message: text, thinking (the template's reasoning_content) and tool_use blocks."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for i, block in enumerate(_blocks(content, where)):
        kind, at = block.get("type"), f"{where}[{i}]"
        if kind not in ("text", "thinking", "redacted_thinking", "tool_use"):
            raise ApiError(400, f"{at}: {kind!r} content blocks are not supported", param=_param(where))
        _check_block(block, at)
        if kind == "text":
            message["content"] += _string(block, "text", at)
        elif kind == "thinking":
            message["reasoning_content"] = _string(block, "thinking", at)
        elif kind == "tool_use":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                raise ApiError(400, f"{at}: a tool_use block needs a name and an input object", param=_param(where))
            message.setdefault("tool_calls", []).append(
                {"type": "function", "function": {"name": block["name"], "arguments": block.get("input", {})}})
    return message


def parse_messages(body: dict) -> list[dict]:
    """`system` and `messages` -> the chat template's messages. Every message and block is checked field by
    field: a field the API defines that this server does not honour is refused, as is an unknown one."""
    out = []
    system = body.get("system")
    if system:
        out.append({"role": "system", "content": _text_of(system, "system")})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant", "system"):
            raise ApiError(400, f"{where}: role must be 'user', 'assistant' or 'system', got {role!r}",
                           param="messages")
        check_fields(m, frozenset({"role", "content"}), where=where)
        content = f"{where}.content"
        if role == "user":
            out.extend(_user_turn(m.get("content"), content))
        elif role == "assistant":
            out.append(_assistant_turn(m.get("content"), content))
        else:
            out.append({"role": "system", "content": _text_of(m.get("content"), content)})
    if messages[-1].get("role") == "assistant":
        # Prefill (the answer continuing a final assistant turn) would need the template to leave that turn open;
        # rendered as it is, the turn would be closed and a new answer begun: refused, as Anthropic does for
        # models without prefill.
        raise ApiError(400, "This model does not support assistant message prefill. The conversation must end "
                            "with a user message.", param="messages")
    return out


# A custom tool's fields: `strict` is what the tool grammar always does; `cache_control` and
# `eager_input_streaming` change nothing here (the prefix cache is automatic; a call's input is sent once whole).
_TOOL_FIELDS = frozenset({"type", "name", "description", "input_schema", "strict", "cache_control",
                          "eager_input_streaming"})
_TOOL_UNSUPPORTED = {"defer_loading": (None, False), "allowed_callers": (None, ["direct"]), "input_examples": (None,)}


def _tools(body: dict) -> list | None:
    """Anthropic custom tools -> OpenAI function tools."""
    functions = []
    for i, t in enumerate(_get(body, "tools", (list,)) or []):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or t.get("type") not in (None, "custom"):
            raise ApiError(400, f"tools[{i}]: only custom tools {{name, description, input_schema}} are supported",
                           param="tools")
        check_fields(t, _TOOL_FIELDS, _TOOL_UNSUPPORTED, where=f"tools[{i}]")
        _cache_control(t.get("cache_control"), f"tools[{i}].cache_control")
        schema = _get(t, "input_schema", (dict,), {"type": "object", "properties": {}})
        functions.append({"type": "function", "function": {
            "name": t["name"], "description": _get(t, "description", (str,), ""), "parameters": schema}})
    return functions or None


_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none", "tool": None}


def _tool_choice(body: dict) -> tuple[str | dict, bool]:
    """`tool_choice` -> (the options' tool_choice, parallel calls allowed)."""
    choice = _get(body, "tool_choice", (dict,), {"type": "auto"})
    kind = choice.get("type")
    if not isinstance(kind, str) or kind not in _TOOL_CHOICES:
        raise ApiError(400, f"tool_choice: type must be auto, any, tool or none, got {json.dumps(kind)}",
                       param="tool_choice")
    check_fields(choice, frozenset({"type", "disable_parallel_tool_use"} | ({"name"} if kind == "tool" else set())),
                 where="tool_choice")
    mapped = _TOOL_CHOICES[kind]
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise ApiError(400, "tool_choice: type 'tool' needs a name", param="tool_choice")
        mapped = {"type": "function", "function": {"name": choice["name"]}}  # a tool may be named "none"
    return mapped, not _get(choice, "disable_parallel_tool_use", (bool,), False)


def _thinking(body: dict) -> tuple[bool, int | None]:
    """`thinking` -> (enable_thinking, thinking_budget). Absent means off, as in Anthropic's API. The thinking
    returned is the model's whole reasoning (what `display: summarized` shows at most); `omitted` is refused."""
    thinking = _get(body, "thinking", (dict,), {"type": "disabled"})
    kind = thinking.get("type")
    fields = {"enabled": {"type", "budget_tokens"}, "adaptive": {"type"}, "disabled": {"type"}}.get(kind)
    if fields is None:
        raise ApiError(400, f"thinking: type must be enabled, disabled or adaptive, got {json.dumps(kind)}",
                       param="thinking")
    check_fields(thinking, frozenset(fields), {} if kind == "disabled" else {"display": (None, "summarized")},
                 where="thinking")
    if kind == "disabled":
        return False, None
    return True, _get(thinking, "budget_tokens", (int,), low=0) if kind == "enabled" else None


def _output_config(body: dict) -> dict:
    """`output_config` -> options: `format` (a JSON schema the answer is held to), `effort` (the template's
    reasoning_effort, refused by templates that do not read it)."""
    output = _get(body, "output_config", (dict,), {})
    check_fields(output, frozenset({"format", "effort"}), where="output_config")
    changes: dict[str, Any] = {}
    fmt = output.get("format")
    if fmt is not None:
        if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict)):
            raise ApiError(400, "output_config.format: must be {type: json_schema, schema: {...}}",
                           param="output_config")
        check_fields(fmt, frozenset({"type", "schema"}), where="output_config.format")
        changes["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt["schema"]}}
    effort = _get(output, "effort", (str,))
    if effort is not None:
        changes["reasoning_effort"] = effort
    return changes


def _identity(body: dict) -> None:
    """`metadata` ({user_id}), `cache_control` and the ids naming who asks: checked, and nothing more to do (no
    accounting here; the prefix cache keeps every prompt it can without being asked)."""
    metadata = _get(body, "metadata", (dict,), {})
    check_fields(metadata, frozenset({"user_id"}), where="metadata")
    _get(metadata, "user_id", (str,))
    _cache_control(body.get("cache_control"), "cache_control")
    for name in ("user_profile_id", "workspace_id"):
        _get(body, name, (str,))


# The Messages API's fields: the implemented ones (seed, temperature, top_p and top_k: sampling the API had or
# that OpenAI's has), and those refused unless absent or at a value meaning what this server does anyway.
_COUNT_FIELDS = frozenset({"model", "messages", "system", "thinking", "tool_choice", "tools", "output_config",
                           "cache_control", "user_profile_id", "workspace_id"})
_FIELDS = _COUNT_FIELDS | {"max_tokens", "stop_sequences", "stream", "temperature", "top_p", "top_k", "seed",
                           "metadata"}
_UNSUPPORTED = {"container": (None,), "mcp_servers": (None,), "context_management": (None,),
                "inference_geo": (None,), "diagnostics": (None,), "speed": (None, "standard"),
                "service_tier": (None, "auto", "standard_only")}
_COUNT_UNSUPPORTED = {k: _UNSUPPORTED[k] for k in ("mcp_servers", "context_management", "speed")}


def parse_request(body: Any, *, model_ids: tuple[str, ...], max_tokens_limit: int, base: GenerationOptions,
                  count_only: bool = False) -> Request:
    """A /v1/messages body as the engine's chat request (`count_only`: /v1/messages/count_tokens, no
    max_tokens)."""
    check_model(body, model_ids, required=True)
    if count_only:
        check_fields(body, _COUNT_FIELDS, _COUNT_UNSUPPORTED)
    else:
        check_fields(body, _FIELDS, _UNSUPPORTED)
    messages = parse_messages(body)
    max_tokens = None
    if not count_only:
        max_tokens = _get(body, "max_tokens", (int,), low=1)
        if max_tokens is None:
            raise ApiError(400, "max_tokens: field required", param="max_tokens")
        if max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens: {max_tokens} exceeds this server's limit of {max_tokens_limit}",
                           param="max_tokens")
    stop = _get(body, "stop_sequences", (list,), [])
    if not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop_sequences: must be a list of non-empty strings", param="stop_sequences")
    _identity(body)
    choice, parallel = _tool_choice(body)
    enable_thinking, budget = _thinking(body)
    changes = {name: _get(body, name, kinds, low=low, high=high) for name, kinds, low, high in (
        ("temperature", (int, float), 0, 1), ("top_p", (int, float), 0, 1), ("top_k", (int,), 0, None))}
    changes = {k: (float(v) if k != "top_k" else v) for k, v in changes.items() if v is not None}
    changes.update(seed_of(body))
    changes.update(_output_config(body))
    options = base.replace(enable_thinking=enable_thinking, thinking_budget=budget, tools=_tools(body),
                           tool_choice=choice, parallel_tool_calls=parallel, **changes)
    return Request(True, messages, options, max_tokens, _get(body, "stream", (bool,), False), False, stop)


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def _tool_uses(calls: list[dict]) -> list[dict]:
    """OpenAI tool calls (`openai_tool_calls`) as tool_use blocks."""
    return [{"type": "tool_use", "id": "toolu_" + c["id"][len("call_"):], "name": c["function"]["name"],
             "input": json.loads(c["function"]["arguments"])} for c in calls]


def sse_event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class MessageReply(Reply):
    """The answer to one /v1/messages request: a message with thinking, text and tool_use blocks, or its events."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cid = message_id()
        self.blocks = 0  # content blocks opened so far in the stream
        self.open: str | None = None  # the kind of the block being streamed

    def usage(self) -> dict:
        cached = self.job.cached_tokens
        return {"input_tokens": len(self.job.prompt) - cached, "cache_read_input_tokens": cached,
                "cache_creation_input_tokens": 0,
                "output_tokens": self.last.generation_tokens if self.last else 0}

    def stop_reason(self, has_calls: bool) -> tuple[str, str | None]:
        if has_calls:
            return "tool_use", None
        if self.matcher.hit:
            return "stop_sequence", self.matcher.hit
        return STOP_REASONS.get(self.finish(), "end_turn"), None

    def message(self, content: list[dict], reason: str | None, sequence: str | None) -> dict:
        return {"id": self.cid, "type": "message", "role": "assistant", "model": self.model_id, "content": content,
                "stop_reason": reason, "stop_sequence": sequence, "usage": self.usage()}

    async def _collect(self) -> dict:
        message, _ = chat_message(*await self.gather(), self.req.options.tools)
        content = []
        if message.get("reasoning_content"):
            content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
        if message["content"]:
            content.append({"type": "text", "text": message["content"]})
        calls = _tool_uses(message.get("tool_calls", []))
        return self.message(content + calls, *self.stop_reason(bool(calls)))

    # streaming ------------------------------------------------------------------------------------------------

    def _start(self, kind: str, block: dict) -> str:
        self.open = kind
        return sse_event("content_block_start", {"index": self.blocks, "content_block": block})

    def _delta(self, delta: dict) -> str:
        return sse_event("content_block_delta", {"index": self.blocks, "delta": delta})

    def _stop(self) -> list[str]:
        if self.open is None:
            return []
        out = [self._delta({"type": "signature_delta", "signature": ""})] if self.open == "thinking" else []
        out.append(sse_event("content_block_stop", {"index": self.blocks}))
        self.open, self.blocks = None, self.blocks + 1
        return out

    def _text(self, text: str) -> list[str]:
        out = []
        if text and self.open != "text":
            out += self._stop() + [self._start("text", {"type": "text", "text": ""})]
        if text:
            out.append(self._delta({"type": "text_delta", "text": text}))
        return out

    def _opening(self) -> list[str]:
        return [sse_event("message_start", {"message": {**self.message([], None, None),
                                                        "usage": {**self.usage(), "output_tokens": 0}}})]

    def _failed(self, e: ApiError) -> list[str]:
        return [sse_event("error", {"error": {"type": anthropic_error_type(e), "message": e.message}})]

    def _on_token(self, r) -> list[str]:
        if r.segment == "reasoning":
            if r.token in self.markup or not r.text:
                return []
            out = [] if self.open == "thinking" else self._stop() + [
                self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})]
            return out + [self._delta({"type": "thinking_delta", "thinking": r.text})]
        return self._text(self._sendable(r.text))

    def _ending(self) -> list[str]:
        out = self._text("" if self.matcher.hit else self.matcher.feed(self.starts.flush()) + self.matcher.flush())
        calls = []
        if self.tool_text is not None:
            answer = "".join(self.tool_text)
            out += self._text(strip_tool_blocks(answer))
            calls = _tool_uses(openai_tool_calls(answer, self.req.options.tools))
        for call in calls:
            out += self._stop() + [self._start("tool_use", {**call, "input": {}}),
                                   self._delta({"type": "input_json_delta", "partial_json": json.dumps(call["input"])})]
        out += self._stop()
        reason, sequence = self.stop_reason(bool(calls))
        out.append(sse_event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                               "usage": {"output_tokens": self.usage()["output_tokens"]}}))
        out.append(sse_event("message_stop", {}))
        return out


# ApiError.type (OpenAI's names) -> Anthropic's error types
_ERROR_TYPES = {"server_error": "api_error", "rate_limit_error": "rate_limit_error",
                "authentication_error": "authentication_error", "not_found_error": "not_found_error"}


def anthropic_error_type(e: ApiError) -> str:
    if e.status == 413:
        return "request_too_large"
    return _ERROR_TYPES.get(e.type, "invalid_request_error")


def anthropic_error_body(e: ApiError) -> dict:
    return {"type": "error", "error": {"type": anthropic_error_type(e), "message": e.message}}


# The request bodies as JSON schemas, for the OpenAPI document (validation itself is parse_request's).
MESSAGES_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["model", "messages", "max_tokens"],
    "properties": {
        "model": {"type": "string"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "system": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"type": "string", "enum": ["user", "assistant", "system"]},
                           "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}},
            "additionalProperties": False}},
        "tools": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "description": {"type": "string"}, "input_schema": {"type": "object"},
            "strict": {"type": "boolean"}}}},
        "tool_choice": {"type": "object", "properties": {
            "type": {"type": "string", "enum": ["auto", "any", "tool", "none"]}, "name": {"type": "string"},
            "disable_parallel_tool_use": {"type": "boolean"}}},
        "thinking": {"type": "object", "properties": {
            "type": {"type": "string", "enum": ["enabled", "disabled", "adaptive"]},
            "budget_tokens": {"type": "integer", "minimum": 0}, "display": {"const": "summarized"}}},
        "stop_sequences": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "seed": {"type": "integer"},
        "stream": {"type": "boolean"},
        "output_config": {"type": "object", "properties": {
            "effort": {"type": "string"}, "format": {"type": "object", "properties": {
                "type": {"const": "json_schema"}, "schema": {"type": "object"}}}}, "additionalProperties": False},
        "metadata": {"type": "object", "properties": {"user_id": {"type": "string"}}, "additionalProperties": False},
        "cache_control": {"type": "object", "properties": {
            "type": {"const": "ephemeral"}, "ttl": {"enum": ["5m", "1h"]}}, "additionalProperties": False},
        "service_tier": {"enum": ["auto", "standard_only"]},
        "speed": {"const": "standard"},
        "user_profile_id": {"type": "string"},
        "workspace_id": {"type": "string"},
    },
    "additionalProperties": False,
}
COUNT_TOKENS_REQUEST_SCHEMA = {
    **MESSAGES_REQUEST_SCHEMA, "required": ["model", "messages"],
    "properties": {k: v for k, v in MESSAGES_REQUEST_SCHEMA["properties"].items() if k in _COUNT_FIELDS | {"speed"}},
}
