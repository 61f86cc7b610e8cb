"""OpenAI's Responses API (`/v1/responses`, `GET /v1/responses/{id}`) over the same engine.

A body becomes the chat request the completions route would make: `instructions` and `input` (a string, or
items: messages, `function_call`, `function_call_output`, `reasoning`) become the template's messages, after
the conversation of `previous_response_id` when given. The answer is a response object whose output items are
a `reasoning` item (the thinking), a `message` and `function_call`s, or the documented event stream. Stored
responses (`store`, true by default as in OpenAI's API) live in a bounded in-memory store, least recently used
leaving first.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..options import GenerationOptions
from .protocol import (
    ApiError,
    Request,
    _get,
    chat_message,
    check_fields,
    check_identity,
    check_model,
    openai_tool_calls,
    seed_of,
    strip_tool_blocks,
)
from .streaming import Reply, sse


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


@dataclass
class Stored:
    response: dict  # the response object, as GET answers it
    messages: list[dict]  # the conversation it ends (instructions excluded), for previous_response_id


class ResponseStore:
    """Stored responses by id, at most `size` (the least recently used leave first)."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[str, Stored] = OrderedDict()

    def get(self, rid: str, param: str | None = "previous_response_id") -> Stored:
        if rid not in self.items:
            why = (f"not stored, or no longer: the store keeps the last {self.size}" if self.size > 0 else
                   "this server stores no responses: serve --responses-store 0")
            raise ApiError(404, f"response {rid!r} not found ({why})", param=param, type="not_found_error")
        self.items.move_to_end(rid)
        return self.items[rid]

    def put(self, rid: str, stored: Stored) -> None:
        if self.size <= 0:
            return
        self.items[rid] = stored
        while len(self.items) > self.size:
            self.items.popitem(last=False)


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: content must be a string or a list of parts", param="input")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}: only text parts are supported (got {kind!r})", param="input")
        parts.append(part["text"])
    return "".join(parts)


def input_messages(raw: Any) -> list[dict]:
    """`input` -> the template's messages: consecutive function_call items join one assistant message, a
    reasoning item becomes the next assistant message's reasoning_content."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'input' must be a string or a non-empty list of items", param="input")
    out: list[dict] = []
    reasoning = None
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("user", "system", "assistant"):
                raise ApiError(400, f"{where}: unknown role {item.get('role')!r}", param="input")
            out.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            if not (isinstance(item.get("name"), str) and isinstance(item.get("call_id"), str)
                    and isinstance(item.get("arguments"), str)):
                raise ApiError(400, f"{where}: a function_call needs a name, a call_id and arguments (strings)",
                               param="input")
            try:
                arguments = json.loads(item["arguments"] or "{}")
            except json.JSONDecodeError:
                arguments = None
            if not isinstance(arguments, dict):
                raise ApiError(400, f"{where}: arguments are not a JSON object", param="input")
            call = {"type": "function", "id": item["call_id"],
                    "function": {"name": item["name"], "arguments": arguments}}
            if not (out and out[-1]["role"] == "assistant"):
                out.append({"role": "assistant", "content": ""})
            out[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str):
                raise ApiError(400, f"{where}: a function_call_output needs a call_id (a string)", param="input")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, str) else _text(output, where)})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            if not (isinstance(parts, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                    for p in parts)):
                raise ApiError(400, f"{where}: a reasoning item's content or summary is a list of text parts",
                               param="input")
            reasoning = "".join(p["text"] for p in parts)
            continue
        else:
            raise ApiError(400, f"{where}: items of type {kind!r} are not supported", param="input")
        if reasoning is not None and out[-1]["role"] == "assistant":
            out[-1]["reasoning_content"], reasoning = reasoning, None
    return out


# A function tool's fields: `strict` is what the tool grammar always does.
_TOOL_FIELDS = frozenset({"type", "name", "description", "parameters", "strict"})
_TOOL_UNSUPPORTED = {"defer_loading": (None, False), "allowed_callers": (None, ["direct"]), "output_schema": (None,),
                     "async": (None, False)}


def _tools(body: dict) -> list | None:
    tools = _get(body, "tools", (list,))
    out = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("name"), str):
            raise ApiError(400, f"tools[{i}]: only function tools are supported", param="tools")
        check_fields(t, _TOOL_FIELDS, _TOOL_UNSUPPORTED, where=f"tools[{i}]")
        _get(t, "strict", (bool,))
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                     if t.get(k) is not None}})
    return out or None


def _tool_choice(body: dict) -> str | dict:
    choice = body.get("tool_choice") or "auto"
    if isinstance(choice, str) and choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        check_fields(choice, frozenset({"type", "name"}), where="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}  # a tool may be named "none"
    raise ApiError(400, "'tool_choice' must be auto, none, required or {type: function, name}", param="tool_choice")


def _format(body: dict) -> dict | None:
    """`text.format` -> the options' response_format (`strict` is what the grammar always does; `verbosity` is
    refused but at its default)."""
    text = _get(body, "text", (dict,), {})
    check_fields(text, frozenset({"format"}), {"verbosity": (None, "medium")}, where="text")
    fmt = _get(text, "format", (dict,))
    kind = fmt.get("type") if fmt else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        check_fields(fmt, frozenset({"type"}), where="text.format")
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        check_fields(fmt, frozenset({"type", "name", "schema", "description", "strict"}), where="text.format")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt["schema"]}}
    raise ApiError(400, "text.format must be text, json_object or {type: json_schema, schema}", param="text")


def _reasoning(body: dict, tokenizer, tools: list | None) -> tuple[dict, bool]:
    """`reasoning` -> (options, whether a summary is asked for). `effort`: the template's reasoning_effort when it
    reads one; otherwise Qwen3's switch: none / minimal turn thinking off, any other effort leaves it on. A
    summary (`summary`, or the older `generate_summary`) is the whole reasoning, its own most detailed one."""
    reasoning = _get(body, "reasoning", (dict,), {})
    check_fields(reasoning, frozenset({"effort", "summary", "generate_summary"}),
                 {"mode": (None, "standard"), "context": (None,)}, where="reasoning")
    summary = False
    for name in ("summary", "generate_summary"):
        if reasoning.get(name) not in (None, "auto", "concise", "detailed"):
            raise ApiError(400, f"reasoning.{name} must be auto, concise or detailed", param="reasoning")
        summary = summary or reasoning.get(name) is not None
    effort = _get(reasoning, "effort", (str,))
    if effort is None:
        return {}, summary
    if "reasoning_effort" in tokenizer.template_source(tools):
        return {"reasoning_effort": effort}, summary
    return {"enable_thinking": effort not in ("none", "minimal")}, summary


def _identity(body: dict) -> None:
    """`metadata` (echoed in the response) and the fields naming who asks (check_identity); `stream_options`."""
    check_identity(body)
    options = _get(body, "stream_options", (dict,), {})
    check_fields(options, frozenset({"include_obfuscation"}), where="stream_options")
    _get(options, "include_obfuscation", (bool,))  # the padding against length side channels: none is added


# The Responses API's fields: the implemented ones (seed: OpenAI's, from chat completions), and those refused
# unless absent or at a value meaning what this server does anyway.
_FIELDS = frozenset({"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
                     "max_output_tokens", "temperature", "top_p", "seed", "reasoning", "text", "store",
                     "previous_response_id", "stream", "stream_options", "metadata", "user", "safety_identifier",
                     "prompt_cache_key"})
_UNSUPPORTED = {"background": (None, False), "truncation": (None, "disabled"), "top_logprobs": (None, 0),
                "include": (None, []), "max_tool_calls": (None,), "conversation": (None,), "prompt": (None,),
                "background_options": (None,), "context_management": (None,), "moderation": (None,),
                "image": (None,), "access_programs": (None,), "prompt_cache_options": (None,),
                "prompt_cache_retention": (None, "in_memory"), "service_tier": (None, "auto", "default")}


@dataclass
class ResponsesRequest(Request):
    """A Request with what the response object repeats and what storing it needs."""

    echo_fields: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # the conversation before this answer (no instructions)
    store: bool = True
    summary: bool = False  # reasoning items carry the reasoning as their summary too
    max_tokens_param: str = "max_output_tokens"


def parse_request(body: Any, *, model_ids: tuple[str, ...], max_tokens_limit: int, base: GenerationOptions,
                  store: ResponseStore, tokenizer) -> ResponsesRequest:
    check_model(body, model_ids)
    check_fields(body, _FIELDS, _UNSUPPORTED)
    previous = _get(body, "previous_response_id", (str,))
    history = list(store.get(previous).messages) if previous else []
    history += input_messages(body.get("input"))
    instructions = _get(body, "instructions", (str,))
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + history
    max_tokens = _get(body, "max_output_tokens", (int,), low=1)
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise ApiError(400, f"max_output_tokens {max_tokens} exceeds this server's limit of {max_tokens_limit}",
                       param="max_output_tokens")
    _identity(body)
    changes = {k: float(v) for k, high in (("temperature", 2), ("top_p", 1))
               if (v := _get(body, k, (int, float), low=0, high=high)) is not None}
    changes.update(seed_of(body))
    tools = _tools(body)
    thinking, summary = _reasoning(body, tokenizer, tools)
    options = base.replace(tools=tools, tool_choice=_tool_choice(body), response_format=_format(body),
                           parallel_tool_calls=_get(body, "parallel_tool_calls", (bool,), True),
                           **thinking, **changes)
    kept = _get(body, "store", (bool,), True) and store.size > 0  # a server keeping none says so
    echo = {"instructions": instructions, "max_output_tokens": max_tokens, "previous_response_id": previous,
            "parallel_tool_calls": options.parallel_tool_calls, "temperature": changes.get("temperature"),
            "top_p": changes.get("top_p"), "tool_choice": body.get("tool_choice") or "auto",
            "tools": body.get("tools") or [], "reasoning": body.get("reasoning"),
            "text": body.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
            "metadata": body.get("metadata") or {}, "store": kept}
    return ResponsesRequest(True, messages, options, max_tokens, _get(body, "stream", (bool,), False), False, [],
                            echo_fields=echo, history=history, store=kept, summary=summary)


class ResponseReply(Reply):
    """The answer to one /v1/responses request, whole or as events; stored when asked."""

    def __init__(self, *args, store: ResponseStore, **kwargs):
        super().__init__(*args, **kwargs)
        self.store = store
        self.rid = _id("resp_")
        self.seq = 0  # sequence_number of the next event
        self.items: list[dict] = []  # output items so far

    def response(self, status: str) -> dict:
        used = self.last.generation_tokens if self.last else 0
        cached = self.job.cached_tokens
        body = {"id": self.rid, "object": "response", "created_at": self.created, "status": status,
                "model": self.model_id, "output": self.items, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "usage": {"input_tokens": len(self.job.prompt), "input_tokens_details": {"cached_tokens": cached},
                          "output_tokens": used, "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                          "total_tokens": len(self.job.prompt) + used},
                **self.req.echo_fields}
        return body

    def status(self) -> str:
        return "incomplete" if self.finish() == "length" else "completed"

    def output_items(self, reasoning: str, answer: str) -> list[dict]:
        message, _ = chat_message(reasoning, answer, self.req.options.tools)
        items = []
        if message.get("reasoning_content"):
            items.append(reasoning_item(message["reasoning_content"], self.req.summary))
        if message["content"]:
            items.append(message_item(message["content"]))
        items += [function_call_item(c) for c in message.get("tool_calls", [])]
        return items

    def keep(self, response: dict) -> dict:
        """Store the finished response (when asked), with the conversation it ends."""
        if self.req.store:
            said = [i for i in response["output"] if i["type"] != "reasoning"]
            turn: dict[str, Any] = {"role": "assistant", "content": "".join(
                p["text"] for i in said if i["type"] == "message" for p in i["content"])}
            thought = "".join(p["text"] for i in response["output"] if i["type"] == "reasoning" for p in i["content"])
            if thought:
                turn["reasoning_content"] = thought
            calls = [{"type": "function", "id": i["call_id"], "function": {
                "name": i["name"], "arguments": json.loads(i["arguments"])}} for i in said if i["type"] == "function_call"]
            if calls:
                turn["tool_calls"] = calls
            self.store.put(self.rid, Stored(response, self.req.history + [turn]))
        return response

    async def _collect(self) -> dict:
        self.items = self.output_items(*await self.gather())
        return self.keep(self.response(self.status()))

    # streaming ------------------------------------------------------------------------------------------------

    def ev(self, kind: str, **data) -> str:
        self.seq += 1
        return sse({"type": kind, "sequence_number": self.seq - 1, **data})

    def _opening(self) -> list[str]:
        return [self.ev("response.created", response=self.response("in_progress")),
                self.ev("response.in_progress", response=self.response("in_progress"))]

    def _failed(self, e: ApiError) -> list[str]:
        return [self.ev("response.failed", response={**self.response("failed"), "error": {
            "code": "server_error", "message": e.message}})]

    def _open(self, item: dict) -> list[str]:
        self.items.append(item)
        out = [self.ev("response.output_item.added", output_index=len(self.items) - 1, item=_started(item))]
        if item["type"] == "message":
            out.append(self.ev("response.content_part.added", item_id=item["id"], output_index=len(self.items) - 1,
                               content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return out

    def _close(self) -> list[str]:
        if not self.items or self.items[-1].get("status") == "completed":
            return []
        item, index = self.items[-1], len(self.items) - 1
        item["status"] = "completed"
        out = []
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            out.append(self.ev("response.reasoning_text.done", item_id=item["id"], output_index=index,
                               content_index=0, text=text))
            if self.req.summary:  # the summary is the whole reasoning: sent once that is known
                part = reasoning_item(text, True)["summary"][0]
                item["summary"] = [part]
                where = {"item_id": item["id"], "output_index": index, "summary_index": 0}
                out += [self.ev("response.reasoning_summary_part.added", **where, part={**part, "text": ""}),
                        self.ev("response.reasoning_summary_text.delta", **where, delta=text),
                        self.ev("response.reasoning_summary_text.done", **where, text=text),
                        self.ev("response.reasoning_summary_part.done", **where, part=part)]
        elif item["type"] == "message":
            part = item["content"][0]
            out += [self.ev("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=part["text"], logprobs=[]),
                    self.ev("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part)]
        return out + [self.ev("response.output_item.done", output_index=index, item=item)]

    def _on_token(self, r) -> list[str]:
        if r.segment == "reasoning":
            if r.token in self.markup or not r.text:
                return []
            out = [] if self.items and self.items[-1]["type"] == "reasoning" else self._close() + self._open(
                {**reasoning_item(""), "status": "in_progress"})
            self.items[-1]["content"][0]["text"] += r.text
            return out + [self.ev("response.reasoning_text.delta", item_id=self.items[-1]["id"],
                                  output_index=len(self.items) - 1, content_index=0, delta=r.text)]
        return self._message_text(self._sendable(r.text))

    def _message_text(self, text: str) -> list[str]:
        if not text:
            return []
        out = [] if self.items and self.items[-1]["type"] == "message" else self._close() + self._open(
            {**message_item(""), "status": "in_progress"})
        self.items[-1]["content"][0]["text"] += text
        return out + [self.ev("response.output_text.delta", item_id=self.items[-1]["id"],
                              output_index=len(self.items) - 1, content_index=0, delta=text, logprobs=[])]

    def _ending(self) -> list[str]:
        out = self._message_text(self.matcher.feed(self.starts.flush()) + self.matcher.flush())
        if self.tool_text is not None:
            answer = "".join(self.tool_text)
            out += self._message_text(strip_tool_blocks(answer))
            for call in openai_tool_calls(answer, self.req.options.tools):
                item = function_call_item(call)
                out += self._close() + self._open({**item, "arguments": "", "status": "in_progress"})
                self.items[-1]["arguments"] = item["arguments"]
                index = len(self.items) - 1
                out += [self.ev("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                delta=item["arguments"]),
                        self.ev("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                name=item["name"], arguments=item["arguments"])]
        out += self._close()
        status = self.status()
        final = self.keep(self.response(status))
        return out + [self.ev("response.completed" if status == "completed" else "response.incomplete",
                              response=final)]


def _started(item: dict) -> dict:
    """An item as `output_item.added` shows it: in progress, its text still empty."""
    if item["type"] == "function_call":
        return {**item, "arguments": "", "status": "in_progress"}
    return json.loads(json.dumps(item))  # a copy: later deltas must not change what was sent


def reasoning_item(text: str, summary: bool = False) -> dict:
    """A reasoning item; with `summary`, the reasoning is its own summary too."""
    parts = [{"type": "summary_text", "text": text}] if summary else []
    return {"type": "reasoning", "id": _id("rs_"), "summary": parts, "content": [{"type": "reasoning_text", "text": text}]}


def message_item(text: str) -> dict:
    return {"type": "message", "id": _id("msg_"), "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def function_call_item(call: dict) -> dict:
    return {"type": "function_call", "id": _id("fc_"), "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": "completed"}


RESPONSES_REQUEST_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "instructions": {"type": "string"},
        "tools": {"type": "array", "items": {"type": "object", "required": ["type", "name"], "properties": {
            "type": {"const": "function"}, "name": {"type": "string"}, "description": {"type": "string"},
            "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}},
        "tool_choice": {"anyOf": [{"type": "string", "enum": ["auto", "none", "required"]}, {"type": "object"}]},
        "parallel_tool_calls": {"type": "boolean"},
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "seed": {"type": "integer"},
        "reasoning": {"type": "object", "properties": {
            "effort": {"type": "string"}, "summary": {"enum": ["auto", "concise", "detailed"]}}},
        "text": {"type": "object", "properties": {"format": {"type": "object"}, "verbosity": {"const": "medium"}},
                 "additionalProperties": False},
        "store": {"type": "boolean"},
        "previous_response_id": {"type": "string"},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_obfuscation": {"type": "boolean"}},
                           "additionalProperties": False},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 16},
        "user": {"type": "string"},
        "safety_identifier": {"type": "string"},
        "prompt_cache_key": {"type": "string"},
        "prompt_cache_retention": {"const": "in_memory"},
        "service_tier": {"enum": ["auto", "default"]},
        "truncation": {"const": "disabled"},
    },
    "required": ["input"],
    "additionalProperties": False,
}
