"""The completion routes' work: a request body to token ids to an engine job, then the job's answer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from ..errors import Qwen3MLXError
from ..generate import prompt_tokens
from ..grammar import GrammarError, constraint_for
from ..options import GenerationOptions
from .engine import Engine, Job, QueueFull
from .protocol import ApiError, Request, parse_request
from .streaming import Reply


def context_length(model) -> int:
    """The tokens a model's context holds (prompt and answer): its config's max_position_embeddings."""
    return int(getattr(getattr(model, "args", None), "max_position_embeddings", 0) or 40960)


class Completions:
    """/v1/chat/completions (chat=True) and /v1/completions over one engine."""

    def __init__(self, engine: Engine, model, tokenizer, *, model_id: str, max_tokens_limit: int,
                 max_body_bytes: int, options: GenerationOptions):
        self.engine, self.model, self.tokenizer, self.model_id = engine, model, tokenizer, model_id
        self.options = options  # the server's own (its KV cache), under every request's
        self.model_ids = (model_id, Path(model_id).name)  # then the other models held (app.py), for 404s
        self.context = context_length(model)
        self.max_tokens_limit, self.max_body_bytes = max_tokens_limit, max_body_bytes
        self.markup = (getattr(tokenizer, "think_start_id", None), getattr(tokenizer, "think_end_id", None))

    async def __call__(self, request: HttpRequest, chat: bool):
        req = parse_request(await self.body_of(request), chat=chat, model_ids=self.model_ids,
                            max_tokens_limit=self.max_tokens_limit, base=self.options)
        return await self.answer(request, req, Reply)

    async def answer(self, request: HttpRequest, req: Request, reply_type=Reply):
        """Run `req` on the engine and answer with `reply_type` (a `Reply`: the shape of the API spoken),
        whole or streamed."""
        job = self.job(req, self.prompt_ids(req))
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="queue_full") from None
        prompt_text = ""  # what an echoing completion starts with
        if req.echo:
            prompt_text = req.prompt if isinstance(req.prompt, str) else self.tokenizer.decode(job.prompt)
        reply = reply_type(job, req, self.model_id, self.markup, self.tokenizer, prompt_text)
        if req.stream:
            return StreamingResponse(reply.events(), media_type="text/event-stream")
        return await reply.whole(request)

    async def body_of(self, request: HttpRequest):
        raw = await request.body()
        if len(raw) > self.max_body_bytes:  # a body sent without its length got past the guard
            raise ApiError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def prompt_ids(self, req: Request) -> list[int]:
        try:
            ids = prompt_tokens(self.tokenizer, req.prompt, req.options)
        except Qwen3MLXError as e:
            raise ApiError(400, str(e)) from None
        if not ids:
            raise ApiError(400, "the prompt is empty")
        vocab = self.model.args.vocab_size
        if not isinstance(req.prompt, str) and not req.chat and not all(0 <= t < vocab for t in ids):
            raise ApiError(400, f"'prompt' token ids must be in [0, {vocab})", param="prompt")
        return ids

    def job(self, req: Request, ids: list[int]) -> Job:
        """The engine's job: the request's options completed by what depends on the prompt (the room left in the
        context) and the grammar, validated against the model."""
        room = self.context - len(ids)
        asked = req.max_tokens  # None: as many as the context and the server's limit allow
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus {req.max_tokens_param} ({asked or 1}) exceeds "
                                f"the model's context of {self.context} tokens", param=req.max_tokens_param,
                           code="context_length_exceeded")
        options = req.options.replace(max_tokens=min(asked or self.max_tokens_limit, room))
        try:
            # Built here, not by the engine, so a schema that cannot be enforced is a 400 before any token.
            options = options.replace(constraint=constraint_for(self.tokenizer, options, self.model.args.vocab_size))
            options = options.validate(self.model.args)
        except GrammarError as e:
            raise ApiError(400, str(e), param=e.option) from None
        except Qwen3MLXError as e:
            raise ApiError(400, str(e)) from None
        return Job(ids, options, asyncio.get_running_loop())
