"""The HTTP side of `qwen3-mlx serve`: OpenAI-compatible routes (chat completions, completions, Responses) and
Anthropic's Messages over one engine (FastAPI).

Handlers validate and tokenize, hand token ids to the engine thread and relay what it yields; they never
touch MLX arrays (routes.py, streaming.py, responses.py, anthropic.py). Every error is answered in the shape
of the API the route speaks, and none carries a stack trace (errors.py).
"""

from __future__ import annotations

from functools import partial

from fastapi import FastAPI
from fastapi import Request as HttpRequest

from ..options import GenerationOptions
from . import anthropic, responses
from .engine import Engine
from .errors import install_guards
from .protocol import CHAT_REQUEST_SCHEMA, COMPLETION_REQUEST_SCHEMA, now, openapi_body
from .retrieval import Hosted, add_retrieval_routes
from .routes import Completions


def create_app(model, tokenizer, *, model_id: str, api_key: str | None = None, max_queue: int = 64,
               max_concurrency: int = 8, max_tokens_limit: int = 32768, max_body_bytes: int = 8 << 20,
               prompt_cache_bytes: int = 1 << 30, options: GenerationOptions | None = None,
               responses_store: int = 256, embedding: Hosted | None = None,
               rerank: Hosted | None = None, draft_id: str | None = None) -> FastAPI:
    """The FastAPI app serving `model` as `model_id` (the engine thread starts here). `options`: the server's
    own generation options, under every request's (its KV cache: kv_bits, kv_group_size, quantized_kv_start).
    `responses_store`: how many /v1/responses answers are kept for previous_response_id and GET.
    `embedding`, `rerank`: models hosted beside the chat model for /v1/embeddings and /v1/rerank (retrieval.py).
    With `options.draft_model` (a draft model or an MTP drafter, named `draft_id` by /health) every request is
    decoded speculatively, one at a time; options speculation refuses are a 400."""
    options = options or GenerationOptions()
    engine = Engine(model, tokenizer, max_queue=max_queue, max_concurrency=max_concurrency,
                    prompt_cache_bytes=prompt_cache_bytes, draft_model=options.draft_model)
    complete = Completions(engine, model, tokenizer, model_id=model_id, max_tokens_limit=max_tokens_limit,
                           max_body_bytes=max_body_bytes, options=options)
    created = now()
    app = FastAPI(title="qwen3-mlx", version="0.1.0", description="OpenAI-compatible Qwen3 server on MLX")
    app.state.engine = engine
    install_guards(app, api_key=api_key, max_body_bytes=max_body_bytes)
    hosted = add_retrieval_routes(app, engine, chat_id=model_id, embedding=embedding, rerank=rerank,
                                  body_of=complete.body_of)
    complete.model_ids += tuple(hosted)  # named by a 404 for a model the route does not run

    @app.get("/health")
    async def health():
        draft = {} if options.draft_model is None else {"draft_model": draft_id or "draft",
                                                         "num_draft": options.num_draft}
        return {"status": "ok", "model": model_id, **draft, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "qwen3-mlx"}
                                           for i in [model_id, *hosted]]}

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(CHAT_REQUEST_SCHEMA))
    async def chat_completions(request: HttpRequest):
        return await complete(request, chat=True)

    @app.post("/v1/completions", openapi_extra=openapi_body(COMPLETION_REQUEST_SCHEMA))
    async def completions(request: HttpRequest):
        return await complete(request, chat=False)

    @app.post("/v1/messages", openapi_extra=openapi_body(anthropic.MESSAGES_REQUEST_SCHEMA))
    async def messages(request: HttpRequest):
        req = anthropic.parse_request(await complete.body_of(request), model_ids=complete.model_ids,
                                      max_tokens_limit=max_tokens_limit, base=complete.options)
        return await complete.answer(request, req, anthropic.MessageReply)

    @app.post("/v1/messages/count_tokens", openapi_extra=openapi_body(anthropic.COUNT_TOKENS_REQUEST_SCHEMA))
    async def count_tokens(request: HttpRequest):
        req = anthropic.parse_request(await complete.body_of(request), model_ids=complete.model_ids,
                                      max_tokens_limit=max_tokens_limit, base=complete.options, count_only=True)
        return {"input_tokens": len(complete.prompt_ids(req))}

    store = responses.ResponseStore(responses_store)

    @app.post("/v1/responses", openapi_extra=openapi_body(responses.RESPONSES_REQUEST_SCHEMA))
    async def create_response(request: HttpRequest):
        req = responses.parse_request(await complete.body_of(request), model_ids=complete.model_ids,
                                      max_tokens_limit=max_tokens_limit, base=complete.options, store=store,
                                      tokenizer=tokenizer)
        return await complete.answer(request, req, partial(responses.ResponseReply, store=store))

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        return store.get(response_id, param=None).response

    return app
