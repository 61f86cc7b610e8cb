"""OpenAI's request and response shapes: validation of request bodies into `stream_generate` options, and the
response objects (whole and streamed). Pure functions, no MLX, no HTTP."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import Qwen3MLXError
from ..generate import TEMPLATE_ARGUMENTS, refuse_media, tidy_segments
from ..options import GenerationOptions
from ..tools import parse_tool_calls

ROLES = ("system", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _get(body: dict, name: str, kinds: tuple, default: Any = None, *, low: float | None = None,
         high: float | None = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python: refuse it where a number is asked for.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"'{name}' must be {names}, got {type(value).__name__}", param=name)
    if low is not None and value < low:
        raise ApiError(400, f"'{name}' must be at least {low}, got {value}", param=name)
    if high is not None and value > high:
        raise ApiError(400, f"'{name}' must be at most {high}, got {value}", param=name)
    return value


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        try:
            refuse_media(content, where)
        except Qwen3MLXError as e:
            raise ApiError(400, str(e), param="messages") from None
        parts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"{where}: only text content parts are supported", param="messages")
            at = f"{where}.content[{i}]"
            check_fields(part, frozenset({"type", "text", "prompt_cache_breakpoint"}), where=at)
            _cache_breakpoint(part.get("prompt_cache_breakpoint"), f"{at}.prompt_cache_breakpoint")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", param="messages")


def _cache_breakpoint(breakpoint: Any, where: str) -> None:
    """A text part's `prompt_cache_breakpoint` ({mode: explicit, ttl}): checked, then ignored on purpose (the prefix
    cache keeps every prompt it can without being asked, and a breakpoint changes no answer)."""
    if breakpoint is None:
        return
    if isinstance(breakpoint, dict):
        check_fields(breakpoint, frozenset({"mode", "ttl"}), where=where)
    if not (isinstance(breakpoint, dict) and breakpoint.get("mode") == "explicit"
            and breakpoint.get("ttl") in (None, "30m", "12h")):
        raise ApiError(400, f"'{where}' must be {{mode: explicit, ttl: 30m or 12h}}", param="messages")


# Each role's message fields (OpenAI's ChatCompletion*MessageParam; reasoning_content is the extension the
# template reads), and those refused unless absent or at a value meaning "not used": an assistant's earlier audio
# answer, its deprecated function_call and its refusal text would be dropped, changing the conversation.
_MESSAGE_FIELDS = {"system": frozenset({"role", "content"}), "user": frozenset({"role", "content"}),
                   "assistant": frozenset({"role", "content", "tool_calls", "reasoning_content"}),
                   "tool": frozenset({"role", "content", "tool_call_id"})}
_MESSAGE_UNSUPPORTED = {"assistant": {"audio": (None,), "function_call": (None,), "refusal": (None, "")}}
# `name` (system/user/assistant) is refused if set: Qwen's template has no place for it (dropped, speakers merge).
_NAMED_ROLES = ("system", "user", "assistant")


def _tool_call(call: Any, where: str) -> dict:
    """An assistant message's tool call {id, type: function, function: {name, arguments}} as the template's."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or call.get("type", "function") != "function":
        raise ApiError(400, f"{where}: each tool call needs type function and a function with a name",
                       param="messages")
    check_fields(call, frozenset({"id", "type", "function"}), where=where)
    check_fields(fn, frozenset({"name", "arguments"}), where=f"{where}.function")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise ApiError(400, f"{where}: tool call arguments are not JSON", param="messages") from None
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


def parse_messages(raw: Any) -> list[dict]:
    """OpenAI chat messages -> the chat template's messages (tool calls' arguments as the client sent them). Each
    message's fields are checked against its role's: none is accepted and dropped."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})",
                           param="messages")
        named = role in _NAMED_ROLES and m.get("name") not in (None, "")
        if named:
            raise ApiError(400, f"'{where}.name' is not supported by this server: the model's chat template has no "
                                f"place for a participant's name (got {json.dumps(m['name'])})", param="messages")
        known = _MESSAGE_FIELDS[role] | ({"name"} if role in _NAMED_ROLES else set())
        check_fields(m, known, _MESSAGE_UNSUPPORTED.get(role), where=where)
        msg = {"role": role, "content": _text(m.get("content"), where)}
        if role == "assistant" and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise ApiError(400, f"{where}: tool_calls must be a list", param="messages")
            msg["tool_calls"] = [_tool_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(calls)]
        if role == "tool" and m.get("tool_call_id") is not None:
            msg["tool_call_id"] = m["tool_call_id"]
        if role == "assistant" and m.get("reasoning_content") is not None:
            if not isinstance(m["reasoning_content"], str):
                raise ApiError(400, f"{where}: reasoning_content must be a string", param="messages")
            msg["reasoning_content"] = m["reasoning_content"]
        messages.append(msg)
    return messages


@dataclass
class Request:
    """A validated request: the prompt (messages or text), its generation options, and how to answer."""

    chat: bool
    prompt: Any  # messages (chat) or text (completions)
    options: GenerationOptions  # max_tokens not final: see `max_tokens`
    max_tokens: int | None  # asked for; None: as many as the context and the server's limit allow
    stream: bool
    include_usage: bool
    stop: list[str]
    echo: bool = False  # completions: the answer starts with the prompt
    max_tokens_param: str = "max_tokens"  # the body's name for max_tokens, for errors


# Sampling fields of a request body: (kinds, low, high), validated as OpenAI's API does.
_NUMBERS = {"temperature": ((int, float), 0, 2), "top_p": ((int, float), 0, 1), "min_p": ((int, float), 0, 1),
            "presence_penalty": ((int, float), -2, 2), "repetition_penalty": ((int, float), 0, None),
            "top_k": ((int,), 0, None), "thinking_budget": ((int,), 0, None)}


# Fields of OpenAI's API this server does not implement yet: answered with a 400 when set to anything but their
# default, never accepted and ignored (a client asking for them must not get an answer without them).
_UNSUPPORTED = {"frequency_penalty": (None, 0), "logit_bias": (None,), "best_of": (None, 1), "suffix": (None, "")}
_CHAT_UNSUPPORTED = {**_UNSUPPORTED, "store": (None, False), "modalities": (None, ["text"]), "audio": (None,),
                     "prediction": (None,), "web_search_options": (None,), "service_tier": (None, "auto", "default"),
                     "verbosity": (None, "medium"), "prompt_cache_retention": (None, "in_memory"),
                     "functions": (None,), "function_call": (None,)}
# The fields each route implements; any other is refused (check_fields).
_COMMON_FIELDS = frozenset({"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                            "repetition_penalty", "seed", "stop", "stream", "stream_options", "n", "response_format",
                            "logprobs", "user"})
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "tools", "tool_choice", "parallel_tool_calls",
                                 "top_logprobs", "reasoning_effort", "chat_template_kwargs", "thinking_budget",
                                 "safety_identifier", "prompt_cache_key", "metadata"}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo"}


def _field(where: str | None, name: str) -> tuple[str, str]:
    """A field's name as messages show it (`where.name`) and the top-level field an error's `param` names."""
    shown = f"{where}.{name}" if where else name
    return shown, shown.split(".")[0].split("[")[0]


def refuse_unsupported(body: dict, fields: dict = _UNSUPPORTED, where: str | None = None) -> None:
    """400 for a field of `fields` (name -> the values that mean "not used") set to anything else (`where`: the
    path of `body` in the request, for a nested object)."""
    for name, defaults in fields.items():
        value = body.get(name)
        # bool is an int in Python: True must not pass for best_of 1, nor 0 for logprobs false's 0.
        if value != {} and not any(value == d and isinstance(value, bool) == isinstance(d, bool) for d in defaults):
            shown, param = _field(where, name)
            raise ApiError(400, f"'{shown}' is not supported by this server (got {json.dumps(value)})", param=param)


def check_fields(body: dict, known: frozenset, unsupported: dict | None = None, where: str | None = None) -> None:
    """Every field of `body` is implemented (`known`) or refused: one of `unsupported` set to anything but a value
    meaning "not used" is a 400 (`refuse_unsupported`), and so is a field of neither (OpenAI's and Anthropic's APIs
    refuse unknown fields too). Never accepted and ignored."""
    unknown = sorted(set(body) - known - set(unsupported or ()))
    if unknown:
        shown, param = _field(where, unknown[0])
        raise ApiError(400, f"Unknown parameter: '{shown}'.", param=param, code="unknown_parameter")
    refuse_unsupported(body, unsupported or {}, where)


def check_identity(body: dict) -> None:
    """`metadata` (at most 16 string values) and the fields naming who asks or hinting at caching (`user`,
    `safety_identifier`, `prompt_cache_key`): checked, with nothing more to do (no accounting here; the prefix
    cache keeps every prompt it can, keyed by its tokens)."""
    metadata = _get(body, "metadata", (dict,), {})
    if len(metadata) > 16 or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ApiError(400, "'metadata' must map at most 16 keys to strings", param="metadata")
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        _get(body, name, (str,))


def _prompt(body: dict, chat: bool) -> Any:
    """Chat messages; or a completion prompt: text, or token ids (evaluation harnesses send those), each also as
    a batch of one."""
    if chat:
        return parse_messages(body.get("messages"))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
                       param="prompt")
    return prompt


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token the request wants (None: no logprobs). Chat: `logprobs` true with
    `top_logprobs` 0..20; completions: `logprobs` 0..20."""
    if not chat:
        return _get(body, "logprobs", (int,), low=0, high=20)
    top = _get(body, "top_logprobs", (int,), low=0, high=20)
    if not _get(body, "logprobs", (bool,), False):
        if top is not None:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return None
    return top or 0


def _tool_choice(body: dict) -> str | dict:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto"
    if isinstance(choice, str) and choice in ("auto", "none", "required"):
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(fn, dict)
            and isinstance(fn.get("name"), str)):
        raise ApiError(400, "'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", param="tool_choice")
    return choice


def seed_of(body: dict) -> dict:
    """{"seed": ...} from the body's `seed` (OpenAI's; an extension on the Responses and Messages routes), or {}."""
    seed = _get(body, "seed", (int,), low=-(2**63), high=2**64 - 1)
    return {} if seed is None else {"seed": seed % 2**64}  # MLX's keys are unsigned 64-bit; a negative one wraps


def _options(body: dict, base: GenerationOptions, chat: bool) -> GenerationOptions:
    """The body's generation fields over the server's own options (its KV cache settings)."""
    changes: dict[str, Any] = {}
    for name, (kinds, low, high) in _NUMBERS.items():
        value = _get(body, name, kinds, low=low, high=high)
        if value is not None:
            changes[name] = float(value) if float in kinds else value
    if changes.get("repetition_penalty") == 0:
        raise ApiError(400, "'repetition_penalty' must be above 0", param="repetition_penalty")
    changes.update(seed_of(body))
    kwargs = _get(body, "chat_template_kwargs", (dict,), {})
    enable_thinking = kwargs.get("enable_thinking", True)
    if not isinstance(enable_thinking, bool):
        raise ApiError(400, "'chat_template_kwargs.enable_thinking' must be a boolean", param="chat_template_kwargs")
    template_kwargs = {k: v for k, v in kwargs.items() if k != "enable_thinking"}
    taken = sorted(set(template_kwargs) & TEMPLATE_ARGUMENTS)
    if taken:
        raise ApiError(400, f"'chat_template_kwargs' cannot set {', '.join(taken)}", param="chat_template_kwargs")
    tools = _get(body, "tools", (list,))
    if tools is not None and not all(isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools):
        raise ApiError(400, "'tools' must be a list of {type: function, function: {...}} objects", param="tools")
    effort = _get(body, "reasoning_effort", (str,))
    if effort is not None:
        changes["reasoning_effort"] = effort
    return base.replace(enable_thinking=enable_thinking, chat_template_kwargs=template_kwargs, tools=tools or None,
                        tool_choice=_tool_choice(body), response_format=_get(body, "response_format", (dict,)),
                        parallel_tool_calls=_get(body, "parallel_tool_calls", (bool,), True),
                        logprobs=_logprobs(body, chat), **changes)


def check_model(body: Any, model_ids: tuple[str, ...], required: bool = False) -> None:
    """The body is a JSON object whose `model`, when given (or `required`), is the chat model: `model_ids` are its
    names, then those of every model the server holds (for the 404's message)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _get(body, "model", (str,))
    if (model is not None or required) and model not in model_ids[:2]:
        held = ", ".join(repr(m) for m in [model_ids[0], *model_ids[2:]])
        raise ApiError(404, f"model {model!r} not found for this route (this server holds {held}; "
                            f"{model_ids[0]!r} answers it)", param="model", type="not_found_error",
                       code="model_not_found")


def parse_request(body: Any, *, chat: bool, model_ids: tuple[str, ...], max_tokens_limit: int,
                  base: GenerationOptions | None = None) -> Request:
    """Validate a /v1/chat/completions (chat=True) or /v1/completions body; `base`: the server's options."""
    check_model(body, model_ids)
    if chat:
        check_fields(body, _CHAT_FIELDS, _CHAT_UNSUPPORTED)
    else:
        check_fields(body, _COMPLETION_FIELDS, _UNSUPPORTED)
    check_identity(body)
    prompt = _prompt(body, chat)
    max_tokens = _get(body, "max_completion_tokens", (int,), low=1)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", (int,), low=1)
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {max_tokens_limit}",
                       param="max_tokens")
    if _get(body, "n", (int,), 1) != 1:
        raise ApiError(400, "only n = 1 is supported", param="n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of non-empty strings", param="stop")
    options = _options(body, base or GenerationOptions(), chat)
    echo = not chat and _get(body, "echo", (bool,), False)
    if echo and options.logprobs is not None:
        raise ApiError(400, "'echo' with 'logprobs' would need the prompt's log probabilities, which this server "
                            "does not compute; ask for one or the other", param="echo")
    stream = _get(body, "stream", (bool,), False)
    stream_options = _get(body, "stream_options", (dict,), {})
    # include_obfuscation: the padding against length side channels; none is added here
    check_fields(stream_options, frozenset({"include_usage", "include_obfuscation"}), where="stream_options")
    _get(stream_options, "include_obfuscation", (bool,))
    return Request(chat, prompt, options, max_tokens, stream, _get(stream_options, "include_usage", (bool,), False),
                   stop or [], echo)


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def openai_tool_calls(answer: str, tools: list[dict] | None = None) -> list[dict]:
    """Parsed tool calls (JSON or XML form, values typed by `tools`' schemas) in OpenAI's form (arguments as a
    JSON string); malformed ones are left out."""
    return [
        {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
        for c in parse_tool_calls(answer, tools) if c.ok
    ]


TOOL_MARKERS = ("<tool_call>", "<function=")  # a tool call's start: Qwen's wrapper, or Qwen3.5's XML without it


def strip_tool_blocks(answer: str) -> str:
    """The answer text before its first tool call (`<tool_call>`, or an unwrapped `<function=`)."""
    for marker in TOOL_MARKERS:
        head, sep, _ = answer.partition(marker)
        if sep:
            return head.strip()
    return answer


def chat_message(reasoning: str, answer: str, tools: list[dict] | None = None) -> tuple[dict, bool]:
    """The assistant message for a finished chat generation, and whether it holds tool calls."""
    reasoning, answer = tidy_segments(reasoning, answer)
    calls = openai_tool_calls(answer, tools)
    message: dict[str, Any] = {"role": "assistant", "content": strip_tool_blocks(answer) if calls else answer}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message, bool(calls)


def chunk(cid: str, model: str, created: int, delta: dict | None, finish: str | None, *, chat: bool,
          text: str = "", logprobs: dict | None = None) -> dict:
    if chat:
        choice = {"index": 0, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def _token_entry(tokenizer, token: int, logprob: float) -> dict:
    raw = tokenizer.token_bytes(token)
    return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


def logprobs_body(tokenizer, tokens: list, chat: bool, offset: int = 0) -> dict:
    """OpenAI's `logprobs` of a choice for (token id, TokenLogprobs) pairs: chat's {"content": [{token, logprob,
    bytes, top_logprobs}]}, or completions' {tokens, token_logprobs, top_logprobs, text_offset} (`offset`: the
    text's position of the first token)."""
    if chat:
        content = [{**_token_entry(tokenizer, t, lp.logprob),
                    "top_logprobs": [_token_entry(tokenizer, a, v) for a, v in lp.top]} for t, lp in tokens]
        return {"content": content, "refusal": None}
    names = [tokenizer.token_bytes(t).decode("utf-8", "replace") for t, _ in tokens]
    offsets = [offset + sum(len(n) for n in names[:i]) for i in range(len(names))]
    top = [{tokenizer.token_bytes(a).decode("utf-8", "replace"): v for a, v in lp.top} for _, lp in tokens]
    return {"tokens": names, "token_logprobs": [lp.logprob for _, lp in tokens], "top_logprobs": top,
            "text_offset": offsets}


def now() -> int:
    return int(time.time())


class StopMatcher:
    """Stop strings over streamed text: `feed` returns what is safe to send (text that cannot be the start of a
    stop string), and `hit` becomes that string once one appears (the text before it is what gets sent)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.hit: str | None = None

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        found = [(i, stop) for stop in self.stops if (i := self.pending.find(stop)) >= 0]
        if found:
            cut, self.hit = min(found)
            out, self.pending = self.pending[:cut], ""
            return out
        keep = max(0, self.hold)
        out, self.pending = (self.pending[:-keep], self.pending[-keep:]) if keep else (self.pending, "")
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ToolStart:
    """Where a streamed answer's first tool call starts. `<tool_call>` is one token, but `<function=` comes in
    pieces, so a tail that may begin a marker is held back until the next text tells."""

    def __init__(self):
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(the text safe to show, and once a marker appeared, the answer from it on; else None)."""
        buf = self.pending + text
        at = min((i for i in (buf.find(m) for m in TOOL_MARKERS) if i >= 0), default=-1)
        if at >= 0:
            self.pending = ""
            return buf[:at], buf[at:]
        keep = max((k for m in TOOL_MARKERS for k in range(1, len(m)) if buf.endswith(m[:k])), default=0)
        self.pending = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# Request bodies as JSON schemas, for the OpenAPI document (validation itself is parse_request's).
_SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 0},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
    "seed": {"type": "integer"},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"},
                                                        "include_obfuscation": {"type": "boolean"}},
                       "additionalProperties": False},
    "n": {"const": 1},
    "user": {"type": "string"},
    "response_format": {"type": "object", "properties": {
        "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
        "json_schema": {"type": "object"}}},
}
CHAT_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        **_SAMPLING,
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"],
            "properties": {"role": {"type": "string", "enum": list(ROLES)},
                           "content": {"anyOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
                               "type": "object", "required": ["type", "text"],
                               "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]},
                           "tool_calls": {"type": "array"}, "tool_call_id": {"type": "string"},
                           "reasoning_content": {"type": "string"}},
            "additionalProperties": False}},
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"anyOf": [{"type": "string", "enum": ["auto", "none", "required"]}, {
            "type": "object", "required": ["type", "function"],
            "properties": {"type": {"const": "function"}, "function": {
                "type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]},
        "parallel_tool_calls": {"type": "boolean"},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "reasoning_effort": {"type": "string"},
        "safety_identifier": {"type": "string"},
        "prompt_cache_key": {"type": "string"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 16},
        "chat_template_kwargs": {"type": "object", "properties": {"enable_thinking": {"type": "boolean"}},
                                 "additionalProperties": True},
        "thinking_budget": {"type": "integer", "minimum": 0},
    },
    "additionalProperties": False,
}
COMPLETION_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["prompt"],
    "properties": {**_SAMPLING, "prompt": {"anyOf": [
        {"type": "string", "minLength": 1}, {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20}, "echo": {"type": "boolean"}},
    "additionalProperties": False,
}


def openapi_body(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
