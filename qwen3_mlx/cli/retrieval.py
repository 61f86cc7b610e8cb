"""`qwen3-mlx embed` and `qwen3-mlx rerank`: embeddings (Qwen3-Embedding) and relevance scores
(Qwen3-Reranker) from the command line."""

from __future__ import annotations

import io
import json
import sys

import typer

from .app import app, fail, out
from .options import load_for_cli


def _inputs(model: str, args: list[str] | None, what: str):
    """(model, tokenizer, texts) of a command: the texts are the arguments, else stdin's non-empty lines (read
    first: a missing input fails before the model loads). Bytes that are not UTF-8 reach the tokenizer, which
    refuses them in one line, whatever the locale's error handler for stdin."""
    texts = args
    if not texts:
        if sys.stdin.isatty():
            fail(f"give the {what} as arguments or on stdin, one per line")
        stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
        texts = [line.rstrip("\n") for line in stdin if line.strip()]
        if not texts:
            fail(f"no {what} on stdin")
    return (*load_for_cli(model, local=True), texts)


def _line(text: str) -> None:
    """One line of output as it is: the texts are the user's, not rich markup or :emoji: codes."""
    print(text)


def _short(text: str, width: int = 48) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command(
    help=(
        "Embed texts with a Qwen3-Embedding model: one JSON line per text ({index, text, embedding}), or a "
        "compact table with --table. Texts come from the arguments, else from stdin, one per line.\n\n"
        "Example: qwen3-mlx embed Qwen/Qwen3-Embedding-0.6B \"What is MLX?\" --instruction \"Given a web search "
        "query, retrieve relevant passages that answer the query\" --dimensions 256"
    )
)
def embed(
    model: str = typer.Argument(..., help="Embedding model folder or Hugging Face repo id."),
    texts: list[str] = typer.Argument(  # noqa: B008 - typer's argument declaration
        None, help="Texts to embed (default: stdin lines)."),
    instruction: str = typer.Option(
        None, "--instruction", "-i", help="Task for queries: each text becomes 'Instruct: TASK\\nQuery:TEXT'."),
    dimensions: int = typer.Option(None, "--dimensions", "-d", help="Keep the first N values, renormalised.", min=1),
    table: bool = typer.Option(False, "--table", help="A compact table (and cosine similarities) instead of JSON."),
    batch_size: int = typer.Option(32, "--batch-size", help="Texts per forward.", min=1),
):
    from ..retrieval import embed as embed_texts

    loaded, tokenizer, texts = _inputs(model, texts, "texts")
    vectors = embed_texts(loaded, tokenizer, texts, instruction=instruction, dimensions=dimensions,
                          batch_size=batch_size)
    if not table:
        for i, (t, v) in enumerate(zip(texts, vectors)):
            _line(json.dumps({"index": i, "text": t, "embedding": [round(float(x), 7) for x in v]}))
        return
    from rich.table import Table
    from rich.text import Text

    rows = Table(box=None, pad_edge=False)
    for name in ("#", "text", f"embedding ({vectors.shape[1]} values)"):
        rows.add_column(name)
    for i, (t, v) in enumerate(zip(texts, vectors)):
        rows.add_row(str(i), Text(_short(t)), " ".join(f"{x:+.4f}" for x in v[:6]) + " …")
    out.print(rows)
    if 1 < len(texts) <= 12:
        sims = vectors @ vectors.T
        grid = Table(box=None, pad_edge=False, title="cosine similarity", title_justify="left")
        grid.add_column("#")
        for j in range(len(texts)):
            grid.add_column(str(j), justify="right")
        for i in range(len(texts)):
            grid.add_row(str(i), *(f"{sims[i, j]:.3f}" for j in range(len(texts))))
        out.print(grid)


@app.command(
    help=(
        "Score documents against a query with a Qwen3-Reranker model (the probability of 'yes'), best first: "
        "one line per document (score, index, text), or JSON with --json. Documents come from the arguments, "
        "else from stdin, one per line.\n\n"
        "Example: qwen3-mlx rerank Qwen/Qwen3-Reranker-0.6B --query \"capital of France\" \"Paris is the capital "
        "of France.\" \"Berlin is in Germany.\""
    )
)
def rerank(
    model: str = typer.Argument(..., help="Reranker model folder or Hugging Face repo id."),
    documents: list[str] = typer.Argument(  # noqa: B008 - typer's argument declaration
        None, help="Documents to score (default: stdin lines)."),
    query: str = typer.Option(..., "--query", "-q", help="The query."),
    instruction: str = typer.Option(
        None, "--instruction", "-i",
        help="The task (default: 'Given a web search query, retrieve relevant passages that answer the query')."),
    top_n: int = typer.Option(None, "--top-n", "-n", help="Show only the N best.", min=1),
    as_json: bool = typer.Option(False, "--json", help="One JSON object: {results: [{index, relevance_score}]}."),
):
    from ..retrieval import rerank as rerank_documents

    loaded, tokenizer, documents = _inputs(model, documents, "documents")
    scores = rerank_documents(loaded, tokenizer, query, documents, instruction=instruction)
    order = sorted(range(len(documents)), key=lambda i: -scores[i])[:top_n]
    if as_json:
        _line(json.dumps({"results": [{"index": i, "relevance_score": float(scores[i])} for i in order]}))
        return
    for i in order:
        _line(f"{scores[i]:.4f}  [{i}] {_short(documents[i], 96)}")
