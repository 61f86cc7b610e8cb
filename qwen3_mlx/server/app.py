"""The HTTP side of `qwen3-mlx serve`: OpenAI-compatible routes over the engine (FastAPI).

Handlers validate and tokenize, hand token ids to the engine thread and relay what it yields; they never
touch MLX arrays. Every error is answered in OpenAI's shape, and none carries a stack trace.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Qwen3MLXError
from ..generate import prompt_tokens
from .engine import Engine, Job, QueueFull
from .grammar import GrammarConstraint, grammar_for
from .protocol import (
    CHAT_REQUEST_SCHEMA,
    COMPLETION_REQUEST_SCHEMA,
    ApiError,
    StopMatcher,
    chat_message,
    chunk,
    completion_id,
    now,
    openapi_body,
    openai_tool_calls,
    parse_request,
    strip_tool_blocks,
    ToolStart,
    usage,
)


def _error(status: int, message: str, type: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(ApiError(status, message, type=type, code=code).body(), status_code=status)


def create_app(model, tokenizer, *, model_id: str, api_key: str | None = None, max_queue: int = 64,
               max_concurrency: int = 8, max_tokens_limit: int = 32768, max_body_bytes: int = 8 << 20,
               prompt_cache_bytes: int = 1 << 30, kv_options: dict | None = None) -> FastAPI:
    """The FastAPI app serving `model` as `model_id` (the engine thread starts here). `kv_options`: the KV cache
    of every request (kv_bits, kv_group_size, quantized_kv_start, as stream_generate takes them)."""
    engine = Engine(model, tokenizer, max_queue=max_queue, max_concurrency=max_concurrency,
                    prompt_cache_bytes=prompt_cache_bytes, kv_options=kv_options)
    context = int(getattr(getattr(model, "args", None), "max_position_embeddings", 0) or 40960)
    model_ids = (model_id, Path(model_id).name)
    created = now()
    app = FastAPI(title="qwen3-mlx", version="0.1.0", description="OpenAI-compatible Qwen3 server on MLX")
    app.state.engine = engine

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return _error(413, f"request body of {length} bytes exceeds the limit of {max_body_bytes}")
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                              type="authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        return _error(400, f"invalid request: {e.errors()[0].get('msg', 'bad input') if e.errors() else 'bad input'}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, str(e.detail), type=kind)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        return _error(500, "internal server error", type="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "qwen3-mlx"}]}

    async def body_of(request: HttpRequest):
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise ApiError(413, f"request body exceeds the limit of {max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    async def run(request: HttpRequest, chat: bool):
        req = parse_request(await body_of(request), chat=chat, model_ids=model_ids, max_tokens_limit=max_tokens_limit)
        try:
            ids = prompt_tokens(tokenizer, req.prompt, enable_thinking=req.enable_thinking, tools=req.tools,
                                chat_template_kwargs=req.template_kwargs)
        except Qwen3MLXError as e:
            raise ApiError(400, str(e)) from None
        if not ids:
            raise ApiError(400, "the prompt is empty")
        room = context - len(ids)
        asked = req.options["max_tokens"]  # None: as many as the context and the server's limit allow
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({asked or 1}) exceeds the model's "
                                f"context of {context} tokens", param="max_tokens", code="context_length_exceeded")
        options = dict(req.options, max_tokens=min(asked or max_tokens_limit, room), enable_thinking=req.enable_thinking)
        grammar = grammar_for(req.response_format)
        if grammar is not None:
            options["constraint"] = GrammarConstraint(tokenizer, grammar, model.args.vocab_size)
        job = Job(ids, options, asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="queue_full") from None
        cid, stamp = completion_id(chat), now()
        if req.stream:
            return StreamingResponse(stream(job, req, cid, stamp, chat), media_type="text/event-stream")
        async def watch():
            # A client that hangs up before the whole answer is ready stops its generation within a token.
            while not job.cancelled.is_set():
                if await request.is_disconnected():
                    job.cancelled.set()
                    return
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        try:
            return await whole(job, req, cid, stamp, chat)
        finally:
            job.cancelled.set()
            watcher.cancel()

    async def events(job: Job):
        while True:
            kind, value = await job.out.get()
            if kind == "token":
                yield value
            elif kind == "done":
                return
            else:
                raise value

    def finish_of(matcher: StopMatcher, last) -> str:
        return "stop" if matcher.hit or last is None else last.finish_reason or "stop"

    def usage_of(job: Job, last) -> dict:
        return usage(len(job.prompt), last.generation_tokens if last else 0, job.cached_tokens)

    def visible(response) -> bool:
        # The think tags are markup, not text: reasoning goes to reasoning_content without them.
        return response.token not in (getattr(tokenizer, "think_start_id", None), getattr(tokenizer, "think_end_id", None))

    async def whole(job: Job, req, cid: str, stamp: int, chat: bool):
        pieces = {"reasoning": [], "answer": []}
        matcher = StopMatcher(req.stop)
        last = None
        async for last in events(job):
            if last.segment == "answer" or not chat:
                pieces["answer"].append(matcher.feed(last.text))
                if matcher.hit:
                    job.cancelled.set()
                    break
            else:
                pieces["reasoning"].append(last.text)  # chat_message drops the think tags
        pieces["answer"].append(matcher.flush() if not matcher.hit else "")
        finish, used = finish_of(matcher, last), usage_of(job, last)
        if not chat:
            choice = {"index": 0, "text": "".join(pieces["answer"]), "finish_reason": finish, "logprobs": None}
            return {"id": cid, "object": "text_completion", "created": stamp, "model": model_id,
                    "choices": [choice], "usage": used}
        message, has_calls = chat_message("".join(pieces["reasoning"]), "".join(pieces["answer"]), req.tools)
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if has_calls else finish,
                  "logprobs": None}
        return {"id": cid, "object": "chat.completion", "created": stamp, "model": model_id, "choices": [choice],
                "usage": used}

    async def stream(job: Job, req, cid: str, stamp: int, chat: bool):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        matcher = StopMatcher(req.stop)
        last = None
        answer_started = False
        starts = ToolStart()
        tool_text: list[str] | None = None  # the answer from the first tool call on, parsed at the end
        try:
            if chat:
                yield sse(chunk(cid, model_id, stamp, {"role": "assistant", "content": ""}, None, chat=True))
            try:
                async for last in events(job):
                    if chat and last.segment == "reasoning":
                        if visible(last) and last.text:
                            yield sse(chunk(cid, model_id, stamp, {"reasoning_content": last.text}, None, chat=True))
                        continue
                    text = last.text
                    if tool_text is not None:
                        tool_text.append(text)
                        continue
                    if chat:
                        text, call = starts.feed(text)
                        if call is not None:
                            tool_text = [call]
                    if chat and not answer_started:
                        text = text.lstrip("\n")  # the newlines that only follow </think>
                        answer_started = bool(text)
                    text = matcher.feed(text)
                    if text:
                        yield sse(chunk(cid, model_id, stamp, {"content": text}, None, chat=chat, text=text))
                    if matcher.hit:
                        job.cancelled.set()
                        break
            except ApiError as e:
                yield sse(e.body())
                yield "data: [DONE]\n\n"
                return
            tail = "" if matcher.hit else matcher.feed(starts.flush()) + matcher.flush()
            if tail:
                yield sse(chunk(cid, model_id, stamp, {"content": tail}, None, chat=chat, text=tail))
            finish = finish_of(matcher, last)
            if tool_text is not None:
                calls = openai_tool_calls("".join(tool_text), req.tools)
                rest = strip_tool_blocks("".join(tool_text))
                if rest:
                    yield sse(chunk(cid, model_id, stamp, {"content": rest}, None, chat=True))
                if calls:
                    deltas = [dict(c, index=i) for i, c in enumerate(calls)]
                    yield sse(chunk(cid, model_id, stamp, {"tool_calls": deltas}, None, chat=True))
                    finish = "tool_calls"
            yield sse(chunk(cid, model_id, stamp, {}, finish, chat=chat))
            if req.include_usage:
                yield sse({"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": stamp, "model": model_id, "choices": [], "usage": usage_of(job, last)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client went away, or the stream ended: stop generating

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(CHAT_REQUEST_SCHEMA))
    async def chat_completions(request: HttpRequest):
        return await run(request, chat=True)

    @app.post("/v1/completions", openapi_extra=openapi_body(COMPLETION_REQUEST_SCHEMA))
    async def completions(request: HttpRequest):
        return await run(request, chat=False)

    return app
