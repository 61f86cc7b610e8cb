"""A job's tokens turned into OpenAI's answer: whole (one JSON object) or streamed (server-sent events)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

from fastapi import Request as HttpRequest

from .engine import Job
from .protocol import (
    ApiError,
    Request,
    StopMatcher,
    ToolStart,
    chat_message,
    chunk,
    completion_id,
    logprobs_body,
    now,
    openai_tool_calls,
    strip_tool_blocks,
    usage,
)

DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Reply:
    """The answer to one submitted request. `markup`: token ids never streamed as text (the think tags:
    reasoning goes to reasoning_content without them). `prompt_text`: what an echoing completion starts with."""

    def __init__(self, job: Job, req: Request, model_id: str, markup: tuple = (), tokenizer=None,
                 prompt_text: str = ""):
        self.job, self.req, self.model_id, self.markup = job, req, model_id, markup
        self.tokenizer, self.prompt_text = tokenizer, prompt_text
        self.chat = req.chat
        self.scored: list = []  # (token, TokenLogprobs) of answer tokens not yet sent (all of them, when whole)
        self.text_offset = 0  # completions' logprobs: where the next reported token starts in the text
        self.cid, self.created = completion_id(req.chat), now()
        self.matcher = StopMatcher(req.stop)
        self.last = None  # the latest response: its finish reason and token count end the answer
        self.starts = ToolStart()
        self.tool_text: list[str] | None = None  # the answer from the first tool call on, parsed at the end
        self.answer_started = False
        self.reasoning_tokens = 0  # think tags included

    async def responses(self):
        while True:
            kind, value = await self.job.out.get()
            if kind == "token":
                self.last = value
                self.reasoning_tokens += value.segment == "reasoning"
                if value.logprobs is not None and (value.segment == "answer" or not self.chat):
                    self.scored.append((value.token, value.logprobs))
                yield value
            elif kind == "done":
                return
            else:
                raise value

    def finish(self) -> str:
        return "stop" if self.matcher.hit or self.last is None else self.last.finish_reason or "stop"

    def body(self, kind: str, choices: list) -> dict:
        used = usage(len(self.job.prompt), self.last.generation_tokens if self.last else 0, self.job.cached_tokens)
        return {"id": self.cid, "object": kind, "created": self.created, "model": self.model_id, "choices": choices,
                "usage": used}

    async def whole(self, request: HttpRequest) -> dict:
        """The whole answer; a client that hangs up before it is ready stops its generation within a token."""
        async def watch():
            while not self.job.cancelled.is_set():
                if await request.is_disconnected():
                    self.job.cancelled.set()
                    return
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        try:
            return await self._collect()
        finally:
            self.job.cancelled.set()
            watcher.cancel()

    async def gather(self) -> tuple[str, str]:
        """The whole generation as (reasoning, answer), the answer cut at a stop string (generation stops there).
        The reasoning keeps its think tags (chat_message drops them)."""
        reasoning, answer = [], []
        async for r in self.responses():
            if r.segment == "answer" or not self.chat:
                answer.append(self.matcher.feed(r.text))
                if self.matcher.hit:
                    self.job.cancelled.set()
                    break
            else:
                reasoning.append(r.text)
        answer.append("" if self.matcher.hit else self.matcher.flush())
        return "".join(reasoning), "".join(answer)

    async def _collect(self) -> dict:
        reasoning, answer = await self.gather()
        if not self.chat:
            choice = {"index": 0, "text": self.prompt_text + answer, "finish_reason": self.finish(),
                      "logprobs": self.take_logprobs()}
            return self.body("text_completion", [choice])
        message, has_calls = chat_message(reasoning, answer, self.req.options.tools)
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if has_calls else self.finish(),
                  "logprobs": self.take_logprobs()}
        return self.body("chat.completion", [choice])

    def take_logprobs(self) -> dict | None:
        """The logprobs of the answer tokens not sent yet, in OpenAI's shape (None when not asked for)."""
        if self.req.options.logprobs is None:
            return None
        scored, self.scored = self.scored, []
        body = logprobs_body(self.tokenizer, scored, self.chat, self.text_offset)
        if not self.chat:  # completions' text_offset counts from the start of the whole text, chunk after chunk
            self.text_offset += sum(len(t) for t in body["tokens"])
        return body

    def event(self, delta: dict, finish: str | None = None, text: str = "") -> str:
        # Each chunk carries the logprobs of the tokens received since the last one that carried text.
        lp = self.take_logprobs() if (text or delta.get("content") or finish) else None
        return sse(chunk(self.cid, self.model_id, self.created, delta, finish, chat=self.chat, text=text,
                         logprobs=lp))

    async def events(self) -> AsyncIterator[str]:
        """The answer as server-sent events: `_opening`, `_on_token`'s for each token, `_ending`; an error
        mid-generation ends the stream with `_failed`'s. Subclasses speak other APIs through these four."""
        try:
            for event in self._opening():
                yield event
            try:
                async for r in self.responses():
                    for event in self._on_token(r):
                        yield event
                    if self.matcher.hit:
                        self.job.cancelled.set()
                        break
            except ApiError as e:
                for event in self._failed(e):
                    yield event
                return
            for event in self._ending():
                yield event
        finally:
            self.job.cancelled.set()  # the client went away, or the stream ended: stop generating

    def _opening(self) -> list[str]:
        if self.chat:
            return [self.event({"role": "assistant", "content": ""})]
        return [self.event({}, text=self.prompt_text)] if self.prompt_text else []

    def _on_token(self, r) -> list[str]:
        if self.chat and r.segment == "reasoning":
            return [self.event({"reasoning_content": r.text})] if r.token not in self.markup and r.text else []
        text = self._sendable(r.text)
        return [self.event({"content": text}, text=text)] if text else []

    def _failed(self, e: ApiError) -> list[str]:
        return [sse(e.body()), DONE]

    def _sendable(self, text: str) -> str:
        """What of the answer's next text can go out now: a tool call is kept whole for the end, and a possible
        stop string held back until it is told apart."""
        if self.tool_text is not None:
            self.tool_text.append(text)
            return ""
        if self.chat:
            text, call = self.starts.feed(text)
            if call is not None:
                self.tool_text = [call]
            if not self.answer_started:
                text = text.lstrip("\n")  # the newlines that only follow </think>
                self.answer_started = bool(text)
        return self.matcher.feed(text)

    def _ending(self) -> Iterator[str]:
        tail = "" if self.matcher.hit else self.matcher.feed(self.starts.flush()) + self.matcher.flush()
        if tail:
            yield self.event({"content": tail}, text=tail)
        finish = self.finish()
        if self.tool_text is not None:
            calls = openai_tool_calls("".join(self.tool_text), self.req.options.tools)
            rest = strip_tool_blocks("".join(self.tool_text))
            if rest:
                yield self.event({"content": rest})
            if calls:
                yield self.event({"tool_calls": [dict(c, index=i) for i, c in enumerate(calls)]})
                finish = "tool_calls"
        yield self.event({}, finish)
        if self.req.include_usage:
            yield sse(self.body("chat.completion.chunk" if self.chat else "text_completion", []))
        yield DONE
