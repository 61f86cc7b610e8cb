"""A multi-turn chat session with a KV cache that survives between turns.

The official Qwen3 template drops earlier turns' thinking from the history, so the prompt of turn N is not an
extension of what the cache holds after turn N-1 (which saw the thinking). Each turn renders the whole
conversation, keeps the longest common token prefix with the cache, trims the rest, and prefills only the
tokens that really changed: time to first token stays proportional to the new tokens, not the history.

Tool steps (`qwen3_mlx.agent` drives them): with `options.tools`, an answer's tool calls are stored in the
assistant message as `tool_calls` (the form templates render back), `add_tool_result` appends `tool` messages,
and `step()` generates the next assistant message without a new user message. The template renders a tool
result as an extension of what the cache holds, so a tool step prefills little more than the result.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import Qwen3MLXError, read_json
from .generate import GenerationResponse, prompt_tokens, stream_generate, tidy_segments
from .models.cache import make_cache, reusable_prefix, truncate_cache
from .options import GenerationOptions, as_options
from .tools import ToolCall, split_tool_calls

SAVE_FORMAT = "qwen3-mlx-chat/1"


@dataclass
class TurnStats:
    """What one turn cost: the rendered prompt, how much of it came from the cache, and timings."""

    prompt_tokens: int  # the whole rendered conversation
    reused_tokens: int  # common prefix kept from the cache
    prefill_tokens: int  # prompt_tokens - reused_tokens: what was actually computed
    generation_tokens: int = 0
    time_to_first_token: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    reasoning_tokens: int = 0
    reasoning_seconds: float = 0.0
    finish_reason: str | None = None  # "stop", "length" or "interrupted"
    tool_calls: int = 0  # tool calls in the answer (parsed or not)
    kind: str = "user"  # "user": answered a user message; "tool": a step after tool results


class ChatSession:
    """Conversation state (messages, mode, options) and the KV cache reused across turns."""

    def __init__(self, model, tokenizer, system: str | None = None, options: GenerationOptions | None = None,
                 **overrides):
        """`options` (or keyword `overrides`) apply to every turn; `/think`, `/budget` replace them."""
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.options = as_options(options, overrides).validate(getattr(model, "args", None))
        self.messages: list[dict] = []
        self.cache = make_cache(model)
        # With a draft model (speculative decoding) its cache is reused across turns too, trimmed alike.
        draft = self.options.draft_model
        self.draft_cache = make_cache(draft) if draft is not None else None
        self.cached_tokens: list[int] = []  # the token ids whose keys/values the cache holds, in order
        self.history: list[TurnStats] = []
        self.last_reasoning = ""
        self.last_tool_calls: list[ToolCall] = []  # the calls of the last answer (parsed or not)

    # conversation -------------------------------------------------------------------------------------------

    def conversation(self) -> list[dict]:
        """The messages as the template sees them (system prompt first when set)."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def reset(self) -> None:
        """Forget the conversation (the system prompt and options stay)."""
        self.messages = []
        self.last_reasoning = ""
        self.last_tool_calls = []

    def add_tool_result(self, content: str) -> None:
        """Append a tool's result (a `tool` message) for the last answer's calls, in the order of the calls."""
        self.messages.append({"role": "tool", "content": content})

    def save(self, path: str | Path) -> None:
        data = {
            "format": SAVE_FORMAT,
            "system": self.system,
            "enable_thinking": self.options.enable_thinking,
            "thinking_budget": self.options.thinking_budget,
            "messages": self.messages,
        }
        try:
            Path(path).expanduser().write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
        except OSError as e:
            raise Qwen3MLXError(f"cannot write {path}: {e.strerror or e}") from None

    def load(self, path: str | Path) -> None:
        """Replace the conversation with one saved by `save` (or a plain JSON list of messages)."""
        data = read_json(path)
        if isinstance(data, list):
            data = {"messages": data}
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool") and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise Qwen3MLXError(f"{path} does not hold a conversation (a list of {{role, content}} messages)")
        if messages and messages[0]["role"] == "system":
            self.system, messages = messages[0]["content"], messages[1:]
        elif "system" in data:
            self.system = data["system"]
        if isinstance(data.get("enable_thinking"), bool):
            self.options = self.options.replace(enable_thinking=data["enable_thinking"])
        if "thinking_budget" in data and (data["thinking_budget"] is None or isinstance(data["thinking_budget"], int)):
            self.options = self.options.replace(thinking_budget=data["thinking_budget"])
        self.messages = messages
        self.last_reasoning = ""
        self.last_tool_calls = []

    # cache reuse ----------------------------------------------------------------------------------------------

    def prepare(self, messages: list[dict], options: GenerationOptions | None = None) -> tuple[list[int], int]:
        """Render `messages` (with the generation prompt), trim the cache to the longest common prefix with it and
        return (all prompt ids, number reused). At least one token is always left to prefill."""
        ids = prompt_tokens(self.tokenizer, messages, options or self.options)
        reused = truncate_cache(self.cache, reusable_prefix(self.cached_tokens, ids))
        # The draft holds less: both start there.
        if self.draft_cache is not None and truncate_cache(self.draft_cache, reused) < reused:
            reused = truncate_cache(self.cache, self.draft_cache[0].offset)
        self.cached_tokens = ids[:reused]
        return ids, reused

    # a turn -------------------------------------------------------------------------------------------------

    def send(self, text: str, options: GenerationOptions | None = None) -> Iterator[GenerationResponse]:
        """Add a user message and stream the assistant's reply. The reply joins the conversation when the stream
        ends, is closed early (`.close()`), or is interrupted (Ctrl-C): a partial answer is kept as the turn.
        `options`: this turn's options instead of the session's (e.g. another tool_choice)."""
        return self._reply([{"role": "user", "content": text}], options, "user")

    def step(self, options: GenerationOptions | None = None) -> Iterator[GenerationResponse]:
        """Stream the next assistant message of the conversation as it stands, without a new user message: the
        step after tool results (`add_tool_result`). Like `send` otherwise."""
        return self._reply([], options, "tool")

    def _reply(self, new: list[dict], options: GenerationOptions | None, kind: str) -> Iterator[GenerationResponse]:
        options = options or self.options
        ids, reused = self.prepare(self.conversation() + new, options)  # before the generator: errors raise here
        return self._generate(new, options, kind, ids, reused)

    def _generate(self, new, options, kind, ids, reused) -> Iterator[GenerationResponse]:
        stats = TurnStats(prompt_tokens=len(ids), reused_tokens=reused, prefill_tokens=len(ids) - reused, kind=kind)
        self.messages.extend(new)
        self.history.append(stats)
        self.last_tool_calls = []
        reasoning: list[str] = []
        answer: list[str] = []
        generated: list[int] = []
        t_start = time.perf_counter()
        t_answer = None
        stats.finish_reason = "interrupted"
        if options.seed is not None:
            # Each turn its own random stream (a fixed seed per call would replay the same one every turn),
            # still reproducible for the whole conversation.
            options = options.replace(seed=options.seed + len(self.history) - 1)
        try:
            for r in stream_generate(self.model, self.tokenizer, ids[reused:], options, prompt_cache=self.cache,
                                     draft_cache=self.draft_cache):
                generated.append(r.token)
                if r.segment == "reasoning":
                    reasoning.append(r.text)
                    stats.reasoning_tokens += 1
                elif t_answer is None:
                    t_answer = time.perf_counter()
                    answer.append(r.text)
                else:
                    answer.append(r.text)
                stats.generation_tokens = r.generation_tokens
                stats.time_to_first_token = r.time_to_first_token
                stats.generation_tps = r.generation_tps
                stats.peak_memory = r.peak_memory
                if r.finish_reason:
                    stats.finish_reason = r.finish_reason
                yield r
        finally:
            if stats.reasoning_tokens:
                stats.reasoning_seconds = (t_answer or time.perf_counter()) - t_start
            # The cache holds the prompt then the generated tokens fed back so far (never the last sampled one).
            offset = self.cache[0].offset if self.cache else 0
            self.cached_tokens = (ids + generated)[:offset]
            self.last_reasoning, content = tidy_segments("".join(reasoning), "".join(answer))
            message = {"role": "assistant", "content": content}
            if options.tools:
                content, calls = split_tool_calls(content, options.tools)
                usable = [c.as_message_call() for c in calls if c.ok]
                if usable:
                    message = {"role": "assistant", "content": content, "tool_calls": usable}
                self.last_tool_calls = calls
                stats.tool_calls = len(calls)
            if self.last_reasoning:
                message["reasoning_content"] = self.last_reasoning
            self.messages.append(message)

    def stats_table(self) -> list[dict]:
        return [dict(turn=i + 1, **asdict(s)) for i, s in enumerate(self.history)]
