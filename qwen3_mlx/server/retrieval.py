"""/v1/embeddings (OpenAI's shape) and /v1/rerank (the shape llama.cpp, Jina and Cohere use), served by the
embedding and rerank models `serve` hosts beside the chat model (`--embedding-model`, `--rerank-model`).

Handlers validate and tokenize; the forwards run on the engine thread (`Engine.call`), between two turns of
generation, so MLX is never used by two threads at once. A request names its model by the id /v1/models
gives or its folder's name, or leaves `model` out; each route runs the model of its kind.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HttpRequest

from .. import retrieval
from ..errors import Qwen3MLXError
from .engine import Engine
from .protocol import ApiError, _get, check_fields, openapi_body
from .routes import context_length

MAX_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request


@dataclass
class Hosted:
    """A model the server holds beside the chat model: `kind` is "embedding" or "rerank"."""

    kind: str
    model: Any
    tokenizer: Any
    model_id: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.model_id, Path(self.model_id).name)

    @property
    def context(self) -> int:
        return context_length(self.model)


EMBEDDINGS_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["input"],
    "properties": {
        "model": {"type": "string"},
        "input": {"anyOf": [
            {"type": "string"},
            {"type": "array", "minItems": 1, "items": {"type": "string"}},
            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
            {"type": "array", "minItems": 1, "items": {
                "type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}}]},
        "dimensions": {"type": "integer", "minimum": 1},
        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        "instruction": {"type": "string"},
        "user": {"type": "string"},
    },
    "additionalProperties": False,
}
RERANK_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["query", "documents"],
    "properties": {
        "model": {"type": "string"},
        "query": {"type": "string"},
        "documents": {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "string"}, {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}]}},
        "top_n": {"type": "integer", "minimum": 1},
        "instruction": {"type": "string"},
        "return_documents": {"type": "boolean"},
    },
    "additionalProperties": False,
}


# Every field of a body is implemented (unknown ones are refused): `user` names who asks (no accounting here),
# `instruction` is Qwen3-Embedding's and Qwen3-Reranker's task line.
EMBEDDINGS_FIELDS = frozenset(EMBEDDINGS_REQUEST_SCHEMA["properties"])
RERANK_FIELDS = frozenset(RERANK_REQUEST_SCHEMA["properties"])


class Retrieval:
    """The two routes' work over the hosted models (either may be None)."""

    def __init__(self, engine: Engine, *, chat_id: str, embedding: Hosted | None, rerank: Hosted | None, body_of):
        self.engine, self.body_of = engine, body_of
        self.hosted = {"embedding": embedding, "rerank": rerank}
        self.chat_names = (chat_id, Path(chat_id).name)
        self.chat_id = chat_id

    def held(self) -> str:
        models = [f"{self.chat_id!r} (chat)"] + [f"{h.model_id!r} ({h.kind})" for h in self.hosted.values() if h]
        return ", ".join(models)

    def pick(self, body: Any, kind: str, flag: str) -> Hosted:
        """The model of `kind` for a request, checking the name it gives."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        hosted = self.hosted[kind]
        name = _get(body, "model", (str,))
        if name is not None and not (hosted and name in hosted.names):
            others = [(self.chat_id, "chat", self.chat_names)] + [(h.model_id, h.kind, h.names)
                                                                   for h in self.hosted.values() if h]
            held = next(((i, k) for i, k, names in others if name in names), None)
            if held is None:
                raise ApiError(404, f"model {name!r} not found; this server holds {self.held()}", param="model",
                               type="not_found_error", code="model_not_found")
            if hosted is not None:
                raise ApiError(400, f"model {name!r} is this server's {held[1]} model; this route runs the "
                                    f"{kind} model {hosted.model_id!r}", param="model")
        if hosted is None:
            raise ApiError(404, f"this server holds no {kind} model (it holds {self.held()}); start it with "
                                f"`qwen3-mlx serve MODEL {flag} PATH`", param="model", type="not_found_error",
                           code="model_not_found")
        return hosted

    def rows_fit(self, hosted: Hosted, rows: list[list[int]], param: str) -> int:
        """Checks every row against the model's context and vocabulary; returns the token count."""
        vocab = hosted.model.args.vocab_size
        for i, r in enumerate(rows):
            if len(r) > hosted.context:
                raise ApiError(400, f"{param} {i} has {len(r)} tokens, more than the model's context of "
                                    f"{hosted.context}", param=param, code="context_length_exceeded")
            if not all(0 <= t < vocab for t in r):
                raise ApiError(400, f"token ids must be in [0, {vocab})", param=param)
        return sum(map(len, rows))

    async def run(self, fn):
        try:
            return await self.engine.call(fn)
        except Qwen3MLXError as e:
            raise ApiError(400, str(e)) from None

    async def embeddings(self, request: HttpRequest) -> dict:
        body = await self.body_of(request)
        hosted = self.pick(body, "embedding", "--embedding-model")
        check_fields(body, EMBEDDINGS_FIELDS)
        inputs = _inputs(body.get("input"))
        dimensions = _get(body, "dimensions", (int,), low=1, high=hosted.model.args.hidden_size)
        encoding = _get(body, "encoding_format", (str,), "float")
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"'encoding_format' must be 'float' or 'base64', got {encoding!r}",
                           param="encoding_format")
        instruction = _get(body, "instruction", (str,))
        _get(body, "user", (str,))
        try:
            rows = retrieval.embedding_ids(hosted.tokenizer, inputs, instruction)
        except Qwen3MLXError as e:
            raise ApiError(400, str(e), param="input") from None
        tokens = self.rows_fit(hosted, rows, "input")
        vectors = await self.run(lambda: retrieval.embed(hosted.model, hosted.tokenizer, rows, dimensions=dimensions))
        data = [{"object": "embedding", "index": i,
                 "embedding": _encode(v, encoding)} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": hosted.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def rerank(self, request: HttpRequest) -> dict:
        body = await self.body_of(request)
        hosted = self.pick(body, "rerank", "--rerank-model")
        check_fields(body, RERANK_FIELDS)
        query = _get(body, "query", (str,))
        if query is None:
            raise ApiError(400, "'query' is required", param="query")
        documents = _documents(body.get("documents"))
        top_n = _get(body, "top_n", (int,), len(documents), low=1)
        instruction = _get(body, "instruction", (str,))
        return_documents = _get(body, "return_documents", (bool,), False)
        rows = retrieval.rerank_ids(hosted.tokenizer, query, documents, instruction)
        tokens = self.rows_fit(hosted, rows, "documents")
        scores = await self.run(lambda: retrieval.rerank_scores(hosted.model, hosted.tokenizer, rows))
        order = sorted(range(len(documents)), key=lambda i: -scores[i])[:top_n]
        results = [{"index": i, "relevance_score": float(scores[i]),
                    **({"document": {"text": documents[i]}} if return_documents else {})} for i in order]
        return {"id": "rerank-" + uuid.uuid4().hex[:24], "object": "list", "model": hosted.model_id,
                "results": results, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _inputs(value: Any) -> list[str] | list[list[int]]:
    """`input`: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    why = "'input' must be a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, why + (" (not empty)" if value == [] else ""), param="input")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [value]  # one input, however long (the context check is the route's)
    if len(value) > MAX_INPUTS:
        raise ApiError(400, f"'input' holds {len(value)} items; at most {MAX_INPUTS} per request", param="input")
    if all(isinstance(v, str) for v in value):
        return value
    if all(isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
           for v in value):
        return value
    raise ApiError(400, why, param="input")


def _documents(value: Any) -> list[str]:
    """`documents`: strings, or {"text": ...} objects (Cohere's and Jina's other form)."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'documents' must be a non-empty list of strings", param="documents")
    docs = [d["text"] if isinstance(d, dict) and isinstance(d.get("text"), str) else d for d in value]
    if not all(isinstance(d, str) for d in docs):
        raise ApiError(400, "'documents' must be a list of strings (or {\"text\": ...} objects)", param="documents")
    return docs


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # OpenAI's: the little-endian float32 bytes
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()


def add_retrieval_routes(app: FastAPI, engine: Engine, *, chat_id: str, embedding: Hosted | None,
                         rerank: Hosted | None, body_of) -> list[str]:
    """Add /v1/embeddings and /v1/rerank to `app`; returns the ids of the hosted models (for /v1/models).
    Without the model a route needs, it answers 404 saying which `serve` option loads one."""
    routes = Retrieval(engine, chat_id=chat_id, embedding=embedding, rerank=rerank, body_of=body_of)

    @app.post("/v1/embeddings", openapi_extra=openapi_body(EMBEDDINGS_REQUEST_SCHEMA))
    async def embeddings(request: HttpRequest):
        return await routes.embeddings(request)

    @app.post("/v1/rerank", openapi_extra=openapi_body(RERANK_REQUEST_SCHEMA))
    async def rerank_route(request: HttpRequest):
        return await routes.rerank(request)

    return [h.model_id for h in (embedding, rerank) if h is not None]
