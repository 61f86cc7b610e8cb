"""Embeddings (Qwen3-Embedding) and reranking (Qwen3-Reranker) on the dense Qwen3 decoder.

Both run token sequences through the decoder as a batch padded on the LEFT, so the last position of every row
is its last real token. Rows of different lengths carry a boolean mask [B, 1, L, L] (causal, and no real
token sees a pad; a pad row sees itself, so no row is all masked and no NaN is ever made); a batch whose rows
share one length needs none and runs the plain causal kernels. Positions are 0..L-1 in every row, as in
transformers: RoPE depends on relative positions only, so a padded row computes what it computes alone.

- `embed`: last-token pooling of the final-norm hidden states, L2 normalised; `dimensions` truncates, then
  renormalises (Qwen3-Embedding is Matryoshka-trained; a folder whose modules do not normalise gets neither).
  The pooling and normalisation are read off the sentence-transformers files of the folder (`modules.json`,
  `1_Pooling/config.json`); a folder without them gets Qwen3-Embedding's (last token, normalised). Every text ends with `<|endoftext|>`, as Qwen3-Embedding's
  tokenizer appends it (its post-processor; our tokenizer encodes without special tokens, so it is appended
  here). Queries take the model card's instruction format, `Instruct: {instruction}\\nQuery:{text}`.
- `rerank`: P("yes") against "no" at the last position of the model card's judge prompt, i.e. the softmax
  over those two logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import Qwen3MLXError, read_json

EOS = "<|endoftext|>"
QUERY_FORMAT = "Instruct: {instruction}\nQuery:{text}"
RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANK_PAIR = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
# A batch's attention scores, [B, heads, L, L] float32, when its rows differ in length: split beyond this.
MASKED_SCORE_BYTES = 1 << 30


@lru_cache(maxsize=16)
def _normalizes(folder: str) -> bool:
    """Whether the folder's sentence-transformers modules normalise the pooled vector (a folder without them:
    Qwen3-Embedding's, normalised). Any pooling but last-token is refused."""
    path = Path(folder)
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return True
    modules = read_json(modules_file)
    try:
        kinds = {m["type"].rsplit(".", 1)[-1]: str(m.get("path", "")) for m in modules}
    except (KeyError, TypeError, AttributeError):
        raise Qwen3MLXError(f"{modules_file} is not a sentence-transformers module list") from None
    unknown = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if unknown:
        raise Qwen3MLXError(f"{path.name}: sentence-transformers module {unknown[0]} is not supported "
                            "(supported: Transformer, Pooling, Normalize)")
    if "Pooling" in kinds:
        config_file = path / kinds["Pooling"] / "config.json"
        config = read_json(config_file)
        if not isinstance(config, dict):
            raise Qwen3MLXError(f"{config_file} is not a pooling config (a JSON object)")
        modes = [k.removeprefix("pooling_mode_").removesuffix("_token") for k, v in config.items()
                 if k.startswith("pooling_mode_") and v is True]
        if modes != ["lasttoken"]:
            raise Qwen3MLXError(f"{path.name} pools with {' + '.join(modes) or 'nothing'}; only last-token pooling "
                                "(Qwen3-Embedding's) is supported")
    return "Normalize" in kinds


def normalizes(model) -> bool:
    """Whether a loaded embedding model's vectors are L2-normalised (its folder's sentence-transformers files;
    Qwen3-Embedding's, yes, when it has none)."""
    folder = getattr(model, "model_path", None)
    return _normalizes(str(folder)) if folder is not None else True


def _check_model(model, what: str) -> None:
    if getattr(model, "model_type", None) != "qwen3":
        raise Qwen3MLXError(f"{what} runs dense Qwen3 models (Qwen3-Embedding, Qwen3-Reranker); this one is "
                            f"{getattr(model, 'model_type', type(model).__name__)!r}")


def padded_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[mx.array, mx.array | None]:
    """Token ids [B, L] padded on the left, and the mask for them (None when every row has the same length)."""
    L = max(len(r) for r in rows)
    ids = mx.array([[pad_id] * (L - len(r)) + list(r) for r in rows], dtype=mx.int32)
    if all(len(r) == L for r in rows):
        return ids, None
    starts = mx.array([L - len(r) for r in rows])[:, None, None, None]  # [B, 1, 1, 1]
    q, k = mx.arange(L)[:, None], mx.arange(L)[None, :]
    return ids, (k <= q) & ((k >= starts) | (k == q))  # [B, 1, L, L]


def _batches(lengths: list[int], batch_size: int, heads: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped by length (shortest first) into batches of at most `batch_size` rows and `max_tokens`
    padded tokens; a batch whose rows differ in length also keeps its masked scores under MASKED_SCORE_BYTES."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if current is not None:
            n, top, low = len(current) + 1, lengths[i], lengths[current[0]]
            fits = n <= batch_size and n * top <= max_tokens
            if fits and low != top:
                fits = n * heads * top * top * 4 <= MASKED_SCORE_BYTES
            if fits:
                current.append(i)
                continue
        batches.append([i])
    return batches


def _last_hidden(model, rows: list[list[int]], pad_id: int, batch_size: int, max_tokens: int) -> list[mx.array]:
    """The final-norm hidden state at each row's last token, [hidden] each, in the order of `rows`."""
    out: list[mx.array | None] = [None] * len(rows)
    heads = model.args.num_attention_heads
    for batch in _batches([len(r) for r in rows], batch_size, heads, max_tokens):
        ids, mask = padded_batch([rows[i] for i in batch], pad_id)
        h = model.model(ids, mask=mask)[:, -1, :].astype(mx.float32)  # [B, hidden]
        mx.eval(h)
        for j, i in enumerate(batch):
            out[i] = h[j]
    return out


def _token_id(tokenizer, token: str) -> int:
    i = tokenizer.token_to_id(token)
    if i is None:
        raise Qwen3MLXError(f"the tokenizer has no {token!r} token (not a Qwen3 tokenizer?)")
    return i


def embedding_ids(tokenizer, texts: str | Sequence[str] | Sequence[Sequence[int]],
                  instruction: str | None = None) -> list[list[int]]:
    """What `embed` runs: each text (formatted as a query when `instruction` is given) as token ids ending with
    `<|endoftext|>`. A list of token-id lists is taken as already tokenized (the end token appended unless it
    is there)."""
    eos = _token_id(tokenizer, EOS)
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise Qwen3MLXError("nothing to embed: no texts given")
    rows = []
    for t in texts:
        if isinstance(t, str):
            if instruction is not None:
                t = QUERY_FORMAT.format(instruction=instruction, text=t)
            rows.append(tokenizer.encode(t) + [eos])
        else:
            if instruction is not None:
                raise Qwen3MLXError("an instruction formats texts; token ids are embedded as they are")
            ids = [int(i) for i in t]
            rows.append(ids if ids and ids[-1] == eos else ids + [eos])
    return rows


def embed(model, tokenizer, texts: str | Sequence[str] | Sequence[Sequence[int]], instruction: str | None = None,
          dimensions: int | None = None, *, batch_size: int = 32, max_tokens: int = 16384) -> np.ndarray:
    """Embeddings of `texts` (strings, or token-id lists), float32 [n, d], one row per text in order.

    `instruction`: the task, for queries (`Instruct: {instruction}\\nQuery:{text}`); documents go without one.
    `dimensions`: keep the first d values (renormalised, for a model that normalises). Texts are batched by
    length, at most `batch_size` texts and `max_tokens` padded tokens per forward."""
    _check_model(model, "embed")
    rows = embedding_ids(tokenizer, texts, instruction)
    hidden = model.args.hidden_size
    if dimensions is not None and not 1 <= dimensions <= hidden:
        raise Qwen3MLXError(f"dimensions must be between 1 and the model's {hidden}, got {dimensions}")
    vectors = mx.stack(_last_hidden(model, rows, _token_id(tokenizer, EOS), batch_size, max_tokens))
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    if normalizes(model):
        vectors = vectors / mx.maximum(mx.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    return np.array(vectors, dtype=np.float32)


def rerank_ids(tokenizer, query: str, documents: Sequence[str], instruction: str | None = None) -> list[list[int]]:
    """The model card's judge prompt for each (query, document) pair, as token ids (prefix, pair and suffix
    tokenized apart, as the model card does)."""
    if isinstance(documents, str):
        raise Qwen3MLXError("documents must be a list of strings")
    prefix, suffix = tokenizer.encode(RERANK_PREFIX), tokenizer.encode(RERANK_SUFFIX)
    instruction = RERANK_INSTRUCTION if instruction is None else instruction
    return [prefix + tokenizer.encode(RERANK_PAIR.format(instruction=instruction, query=query, document=d)) + suffix
            for d in documents]


def rerank_scores(model, tokenizer, rows: list[list[int]], *, batch_size: int = 16,
                  max_tokens: int = 16384) -> np.ndarray:
    """P(yes) / (P(yes) + P(no)) at the last position of each row of `rerank_ids`, float32 [n]."""
    _check_model(model, "rerank")
    if getattr(model, "headless", False):
        raise Qwen3MLXError("rerank needs a model with an LM head (Qwen3-Reranker, a Qwen3ForCausalLM); this one "
                            "is a bare decoder (an embedding model)")
    if not rows:
        return np.zeros((0,), np.float32)
    yes, no = _token_id(tokenizer, "yes"), _token_id(tokenizer, "no")
    h = mx.stack(_last_hidden(model, rows, _token_id(tokenizer, EOS), batch_size, max_tokens))  # [n, hidden]
    logits = model.logits(h).astype(mx.float32)
    return np.array(mx.sigmoid(logits[:, yes] - logits[:, no]), dtype=np.float32)  # softmax over (yes, no)


def rerank(model, tokenizer, query: str, documents: Sequence[str], instruction: str | None = None, *,
           batch_size: int = 16) -> np.ndarray:
    """Relevance of each document to `query`, float32 [n] in the documents' order: Qwen3-Reranker's probability
    of "yes" against "no". `instruction` defaults to the model card's web-search one."""
    return rerank_scores(model, tokenizer, rerank_ids(tokenizer, query, documents, instruction),
                         batch_size=batch_size)
