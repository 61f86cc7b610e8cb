"""`qwen3-mlx serve`: the model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import asyncio

import typer

from ..options import GenerationOptions
from .app import app, err, fail
from .options import DRAFT_HELP, KV, PARALLEL, SPLIT, load_for_cli, with_draft, with_options


@app.command(
    help=(
        "Serve a model over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/responses, /v1/models; "
        "/v1/embeddings and /v1/rerank with --embedding-model, --rerank-model) and Anthropic's (/v1/messages), "
        "with /health.\n\nExample: qwen3-mlx serve Qwen/Qwen3-0.6B --port 8080, then point any OpenAI client at "
        "http://127.0.0.1:8080/v1."
    )
)
@with_options(*KV, "num_draft")
def serve(
    model: str = typer.Argument(..., help="Model folder or Hugging Face repo id."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8080, "--port", help="TCP port.", min=0, max=65535),
    api_key: str = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1 routes."),
    max_concurrency: int = typer.Option(
        8, "--max-concurrency", help="Requests generated together in one batch (each needs its own KV cache).", min=1
    ),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait for a place in the batch (429 beyond).",
                                  min=0),
    max_tokens_limit: int = typer.Option(32768, "--max-tokens-limit", help="Largest max_tokens a request may ask for.", min=1),
    prompt_cache_bytes: int = typer.Option(
        1 << 30, "--prompt-cache-bytes", help="KV cache kept across requests for shared prefixes (0 = off).", min=0
    ),
    responses_store: int = typer.Option(
        256, "--responses-store", help="/v1/responses answers kept for previous_response_id and GET (0 = none).",
        min=0),
    embedding_model: str = typer.Option(
        None, "--embedding-model", help="Also host this Qwen3-Embedding model for /v1/embeddings (folder or repo id)."),
    rerank_model: str = typer.Option(
        None, "--rerank-model", help="Also host this Qwen3-Reranker model for /v1/rerank (folder or repo id)."),
    draft_model: str = typer.Option(
        None, "--draft-model", help=DRAFT_HELP + " With a draft, requests run one at a time (max concurrency 1), each "
        "decoded speculatively; penalties, tools, response_format and logprobs are then a 400."),
    parallel: str = PARALLEL,
    split: str = SPLIT,
    options: GenerationOptions = None,
):
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        fail(f"the server needs FastAPI and uvicorn ({e.name} is missing): pip install 'qwen3-mlx[serve]'")
    from ..distributed import launched
    from ..server.app import create_app

    if launched() and max_concurrency > 64:
        fail("--max-concurrency is at most 64 under mlx.launch (sequences in one forward across ranks)")
    if launched() and draft_model is not None:
        fail("--draft-model is not supported under mlx.launch")
    loaded, tokenizer = load_for_cli(model, parallel=parallel, split=split)
    options = with_draft(loaded, tokenizer, options, draft_model)
    options = options.validate(loaded.args)  # a bad value is one line now, not a 400 on every request
    embedding, rerank = hosted_models(loaded, model, embedding_model, rerank_model)
    api = create_app(loaded, tokenizer, model_id=model, api_key=api_key, max_queue=max_queue,
                     max_concurrency=max_concurrency, options=options,
                     max_tokens_limit=max_tokens_limit, prompt_cache_bytes=prompt_cache_bytes,
                     responses_store=responses_store, embedding=embedding, rerank=rerank, draft_id=draft_model)
    config = uvicorn.Config(api, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)

    async def announce_when_ready():
        while not server.started:
            await asyncio.sleep(0.05)
        if draft_model is not None:
            err.print(f"speculative decoding with --draft-model {draft_model} ({options.num_draft} drafts a round): "
                      "requests run one at a time (max concurrency 1)", highlight=False)
        bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
        err.print(f"qwen3-mlx serving {model} at http://{host}:{bound}/v1", highlight=False)

    async def main():
        await asyncio.gather(server.serve(), announce_when_ready())

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        api.state.engine.close()


def hosted_models(chat_model, chat_id: str, embedding_model: str | None, rerank_model: str | None):
    """The embedding and rerank models to host beside the chat model (each loaded apart, with its own memory)."""
    from ..server.retrieval import Hosted

    if getattr(chat_model, "headless", False):
        fail(f"{chat_id} has no LM head (an embedding model): serve a chat model and pass this one with "
             "--embedding-model")
    if embedding_model is None and rerank_model is None:
        return None, None
    from ..distributed import launched

    if launched():
        fail("--embedding-model and --rerank-model are not supported under mlx.launch")
    embedding = rerank = None
    if embedding_model is not None:
        embedding = Hosted("embedding", *load_for_cli(embedding_model, local=True), embedding_model)
    if rerank_model is not None:
        rerank = Hosted("rerank", *load_for_cli(rerank_model, local=True), rerank_model)
        if getattr(rerank.model, "headless", False):
            fail(f"--rerank-model {rerank_model} has no LM head (an embedding model); a reranker is a "
                 "Qwen3ForCausalLM (Qwen3-Reranker)")
    for h in (embedding, rerank):
        if h is not None and getattr(h.model, "model_type", None) != "qwen3":
            fail(f"--{h.kind}-model {h.model_id} is a {h.model.model_type} model; embeddings and rerank run dense "
                 "Qwen3 models (Qwen3-Embedding, Qwen3-Reranker)")
    return embedding, rerank
