"""Embeddings and rerank (issue 24, items 3-5): the library against transformers (and sentence-transformers),
the CLI, and the server's /v1/embeddings and /v1/rerank through the official `openai` client and raw HTTP.

The embedding checkpoint is what Qwen3-Embedding ships: `Qwen3Model.save_pretrained` (tensor names without
`model.`), the sentence-transformers files (last-token pooling, Normalize), and a tokenizer whose
post-processor appends <|endoftext|> and pads on the left. The reranker is a plain `Qwen3ForCausalLM`."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REAL_VOCAB, TOKENIZER_DIR, dense_config, save_checkpoint

TEXTS = ["hi", "The quick brown fox jumps over the lazy dog.", "What is the capital of France?",
         "Paris is the capital and largest city of France, on the Seine."]
EOS_ID = 151643


def embedding_tokenizer(path: Path) -> None:
    """The Qwen3 tokenizer as Qwen3-Embedding ships it: <|endoftext|> appended by the post-processor, left padding."""
    tok = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    eos = {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [EOS_ID], "tokens": ["<|endoftext|>"]}}
    a, b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
    end = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    tok["post_processor"] = {"type": "Sequence", "processors": [tok["post_processor"], {
        "type": "TemplateProcessing", "single": [a, end], "pair": [a, end, b, end], "special_tokens": eos}]}
    (path / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))


def save_embedding_model(path: Path, seed: int = 0, **overrides):
    """A random Qwen3-Embedding-like folder written by transformers (+ the sentence-transformers files);
    returns the torch Qwen3Model (float32, eval)."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    model = Qwen3Model(Qwen3Config(**dense_config(vocab_size=REAL_VOCAB, **overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    embedding_tokenizer(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": model.config.hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True, "include_prompt": True}))
    (path / "2_Normalize").mkdir()
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 4096, "do_lower_case": False}))
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": "Instruct: Given a web search query, retrieve relevant passages that answer the "
                             "query\nQuery:", "document": ""},
        "default_prompt_name": None, "similarity_fn_name": "cosine"}))
    return model


def reference_embeddings(torch_model, texts: list[str], folder: Path) -> np.ndarray:
    """transformers: the embedding tokenizer (appends <|endoftext|>, pads left), last position, normalised."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch should be padded (on the left)"
    with torch.no_grad():
        h = torch_model(**batch).last_hidden_state[:, -1]
    return torch.nn.functional.normalize(h, dim=-1).numpy()


def close(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= rtol * np.abs(ref).max(), np.abs(ours - ref).max()


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3-embedding")
    torch_model = save_embedding_model(path)
    return path, torch_model


@pytest.fixture(scope="module")
def loaded_embedder(embedder):
    from qwen3_mlx import load

    model, tokenizer = load(embedder[0])
    return model, tokenizer


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3-reranker")
    torch_model = save_checkpoint(path, dense_config(vocab_size=REAL_VOCAB), seed=3, tokenizer=True)
    return path, torch_model


# ---- the library ----


def test_an_embedding_checkpoint_loads_headless(embedder, loaded_embedder):
    from safetensors import safe_open

    with safe_open(str(embedder[0] / "model.safetensors"), "np") as f:
        assert not any(k.startswith("model.") for k in f.keys())  # what save_pretrained writes  # noqa: SIM118
    model, _ = loaded_embedder
    assert model.headless and "lm_head" not in model
    import mlx.core as mx

    assert model.model(mx.array([[1, 2, 3]])).shape == (1, 3, 64)  # the decoder's hidden states
    from qwen3_mlx import Qwen3MLXError, generate

    with pytest.raises(Qwen3MLXError, match="embedding model"):  # no LM head: it does not generate
        generate(model, loaded_embedder[1], "Hi", max_tokens=2)


def test_embeddings_equal_transformers_with_left_padding(embedder, loaded_embedder):
    from qwen3_mlx import embed

    model, tokenizer = loaded_embedder
    ours = embed(model, tokenizer, TEXTS)
    ref = reference_embeddings(embedder[1], TEXTS, embedder[0])
    assert ours.dtype == np.float32 and ours.shape == (4, 64)
    close(ours, ref)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    # One text alone, and all in one padded batch (batch_size 8), give the same vectors.
    for i, t in enumerate(TEXTS):
        close(embed(model, tokenizer, [t]), ours[i : i + 1])


def test_dimensions_truncate_then_renormalise_and_instruction_formats_queries(embedder, loaded_embedder):
    from qwen3_mlx import embed

    model, tokenizer = loaded_embedder
    ref = reference_embeddings(embedder[1], TEXTS, embedder[0])
    ours = embed(model, tokenizer, TEXTS, dimensions=16)
    truncated = ref[:, :16] / np.linalg.norm(ref[:, :16], axis=1, keepdims=True)
    close(ours, truncated)
    task = "Given a web search query, retrieve relevant passages that answer the query"
    queries = embed(model, tokenizer, TEXTS[2:], instruction=task)
    close(queries, reference_embeddings(embedder[1], [f"Instruct: {task}\nQuery:{t}" for t in TEXTS[2:]],
                                        embedder[0]))
    # Token ids are texts already tokenized: the same vectors (the end token appended unless it is there).
    ids = [tokenizer.encode(t) for t in TEXTS]
    close(embed(model, tokenizer, ids), embed(model, tokenizer, TEXTS))
    close(embed(model, tokenizer, [i + [EOS_ID] for i in ids]), embed(model, tokenizer, TEXTS))


def test_embedding_errors_are_domain_errors(loaded_embedder, tmp_path):
    from qwen3_mlx import Qwen3MLXError, embed
    from qwen3_mlx.retrieval import _normalizes

    model, tokenizer = loaded_embedder
    with pytest.raises(Qwen3MLXError, match="dimensions must be between 1 and the model's 64"):
        embed(model, tokenizer, ["x"], dimensions=65)
    with pytest.raises(Qwen3MLXError, match="no texts"):
        embed(model, tokenizer, [])
    (tmp_path / "modules.json").write_text(json.dumps([
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    with pytest.raises(Qwen3MLXError, match="pools with mean.*only last-token"):
        _normalizes(str(tmp_path))


def test_sentence_transformers_gives_the_same_vectors(embedder, loaded_embedder):
    st = pytest.importorskip("sentence_transformers")
    from qwen3_mlx import embed

    model, tokenizer = loaded_embedder
    st_model = st.SentenceTransformer(str(embedder[0]), device="cpu", local_files_only=True)
    close(embed(model, tokenizer, TEXTS), st_model.encode(TEXTS, batch_size=4, convert_to_numpy=True))
    close(embed(model, tokenizer, TEXTS[2:], instruction="Given a web search query, retrieve relevant passages "
                "that answer the query"),
          st_model.encode(TEXTS[2:], prompt_name="query", convert_to_numpy=True))
    close(embed(model, tokenizer, TEXTS, dimensions=16),
          st_model.encode(TEXTS, truncate_dim=16, convert_to_numpy=True, normalize_embeddings=True))


def reference_rerank(torch_model, rows: list[list[int]]) -> np.ndarray:
    """The model card's scoring in transformers: left-padded batch, softmax over the yes / no logits."""
    import torch

    yes, no = 9693, 2152
    L = max(map(len, rows))
    ids = torch.tensor([[EOS_ID] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        logits = torch_model(input_ids=ids, attention_mask=mask).logits[:, -1, :]
    pair = torch.stack([logits[:, no], logits[:, yes]], dim=1).log_softmax(dim=1)
    return pair[:, 1].exp().numpy()


def test_rerank_equals_the_yes_no_probabilities_of_transformers(reranker):
    from qwen3_mlx import load, rerank
    from qwen3_mlx.retrieval import RERANK_PREFIX, RERANK_SUFFIX, rerank_ids

    model, tokenizer = load(reranker[0])
    assert tokenizer.token_to_id("yes") == 9693 and tokenizer.token_to_id("no") == 2152
    query, docs = TEXTS[2], [TEXTS[3], TEXTS[1], "Berlin", TEXTS[0]]
    rows = rerank_ids(tokenizer, query, docs)
    text = tokenizer.decode(rows[0])
    assert text == (RERANK_PREFIX + "<Instruct>: Given a web search query, retrieve relevant passages that answer "
                    f"the query\n<Query>: {query}\n<Document>: {docs[0]}" + RERANK_SUFFIX)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(reranker[0]))  # the model card tokenizes prefix, pair, suffix apart
    pair = (f"<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
            f"<Query>: {query}\n<Document>: {docs[0]}")
    assert rows[0] == [t for part in (RERANK_PREFIX, pair, RERANK_SUFFIX)
                       for t in hf(part, add_special_tokens=False)["input_ids"]]
    scores = rerank(model, tokenizer, query, docs)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    ref = reference_rerank(reranker[1], rows)
    np.testing.assert_allclose(scores, ref, atol=1e-4, rtol=0)
    assert np.ptp(ref) > 1e-3  # the documents do score differently
    custom = rerank(model, tokenizer, query, docs[:2], instruction="Find French cities")
    np.testing.assert_allclose(custom, reference_rerank(reranker[1], rerank_ids(tokenizer, query, docs[:2],
                                                                                 "Find French cities")), atol=1e-4)


def test_rerank_refuses_an_embedding_model(loaded_embedder):
    from qwen3_mlx import Qwen3MLXError, rerank

    with pytest.raises(Qwen3MLXError, match="LM head"):
        rerank(*loaded_embedder, "q", ["d"])


# ---- the command line ----


def run_cli(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "qwen3_mlx", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, NO_COLOR="1"), check=False)


def test_cli_embed_prints_json_lines_and_a_table_from_stdin(embedder, loaded_embedder):
    from qwen3_mlx import embed

    model, tokenizer = loaded_embedder
    r = run_cli("embed", embedder[0], *TEXTS[:2], "--dimensions", "16")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["index"] for line in lines] == [0, 1] and lines[1]["text"] == TEXTS[1]
    close(np.array([line["embedding"] for line in lines], np.float32), embed(model, tokenizer, TEXTS[:2], dimensions=16))
    r = run_cli("embed", embedder[0], "--table", stdin="\n".join(TEXTS) + "\n\n")
    assert r.returncode == 0, r.stderr
    assert "embedding (64 values)" in r.stdout and "cosine similarity" in r.stdout and "The quick brown" in r.stdout
    r = run_cli("embed", embedder[0], "x", "--dimensions", "65")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        "error: dimensions must be between 1 and the model's 64, got 65"]


def test_cli_rerank_sorts_documents_by_score(reranker):
    from qwen3_mlx import load, rerank

    docs = [TEXTS[3], TEXTS[1], "Berlin"]
    scores = rerank(*load(reranker[0]), TEXTS[2], docs)
    r = run_cli("rerank", reranker[0], "--query", TEXTS[2], *docs, "--json", "--top-n", "2")
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)["results"]
    assert [x["index"] for x in results] == list(np.argsort(-scores)[:2])
    np.testing.assert_allclose([x["relevance_score"] for x in results], np.sort(scores)[::-1][:2], atol=1e-6)


def test_cli_prints_the_texts_as_given_and_refuses_bytes_that_are_not_utf8(embedder, reranker):
    """Output lines are the user's texts, not rich markup or :emoji: codes; stdin that is not UTF-8 is one error
    line, with a strict stdin error handler as with Python's default one here."""
    text = ":smile: [b]bold[/b]\tend"
    r = run_cli("embed", embedder[0], text)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == text
    r = run_cli("embed", embedder[0], "--table", text, "x")
    assert r.returncode == 0 and ":smile: [b]bold[/b]" in r.stdout, r.stdout
    r = run_cli("rerank", reranker[0], "--query", "q", text)
    assert r.returncode == 0 and r.stdout.endswith(f"[0] {text}\n"), r.stdout
    for command in (("embed", embedder[0]), ("rerank", reranker[0], "--query", "q")):
        for handler in ("strict", "surrogateescape"):
            r = subprocess.run([sys.executable, "-m", "qwen3_mlx", *map(str, command)], input=b"ok\ncaf\xe9\n",
                               capture_output=True, timeout=120, check=False,
                               env=dict(os.environ, NO_COLOR="1", PYTHONIOENCODING=f"utf-8:{handler}"))
            assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr
            message = "error: the text is not valid Unicode: it holds the byte 0xe9, which is not UTF-8 (after "
            assert next(line for line in r.stderr.decode().splitlines() if line.strip()).startswith(message)


# ---- the server ----


@pytest.fixture(scope="module")
def retrieval_server(tiny_checkpoint, embedder, reranker):
    import fastapi  # noqa: F401 - fastapi and openai are in the test extra: a missing one fails here
    import openai  # noqa: F401 - (test_server would skip)
    from test_server import Server

    server = Server(tiny_checkpoint, "--embedding-model", embedder[0], "--rerank-model", reranker[0])
    yield server
    server.close()


def test_server_lists_and_serves_embeddings_through_the_openai_client(retrieval_server, embedder, loaded_embedder,
                                                                      tiny_checkpoint, reranker):
    from qwen3_mlx import embed

    model, tokenizer = loaded_embedder
    client = retrieval_server.client()
    assert [m.id for m in client.models.list().data] == [str(tiny_checkpoint), str(embedder[0]), str(reranker[0])]
    ref = embed(model, tokenizer, TEXTS)
    name = embedder[0].name  # the folder's name addresses it too
    r = client.embeddings.create(model=name, input=TEXTS)  # the client asks for base64 and decodes it
    assert r.model == str(embedder[0]) and [d.index for d in r.data] == [0, 1, 2, 3]
    close(np.array([d.embedding for d in r.data], np.float32), ref)
    ids = [tokenizer.encode(t) for t in TEXTS]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(i) + 1 for i in ids)  # each ends with EOS
    r = client.embeddings.create(model=str(embedder[0]), input=TEXTS[1], encoding_format="float", dimensions=16)
    close(np.array([r.data[0].embedding], np.float32), embed(model, tokenizer, TEXTS[1:2], dimensions=16))
    r = client.embeddings.create(model=name, input=TEXTS, encoding_format="base64")
    vectors = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in r.data])
    close(vectors, ref)
    r = client.embeddings.create(model=name, input=ids, encoding_format="float")  # token-id lists
    close(np.array([d.embedding for d in r.data], np.float32), ref)
    r = client.embeddings.create(model=name, input=ids[1], encoding_format="float")  # one list of token ids
    close(np.array([r.data[0].embedding], np.float32), ref[1:2])


def test_server_reranks_and_refuses_models_it_does_not_hold(retrieval_server, reranker, embedder, tiny_checkpoint):
    from qwen3_mlx import load, rerank

    docs = [TEXTS[3], TEXTS[1], "Berlin", TEXTS[0]]
    scores = rerank(*load(reranker[0]), TEXTS[2], docs)
    status, body = retrieval_server.post("/v1/rerank", {"model": reranker[0].name, "query": TEXTS[2],
                                                        "documents": docs, "top_n": 3, "return_documents": True})
    assert status == 200, body
    assert [x["index"] for x in body["results"]] == list(np.argsort(-scores)[:3])
    np.testing.assert_allclose([x["relevance_score"] for x in body["results"]], np.sort(scores)[::-1][:3],
                               atol=1e-6)
    assert body["results"][0]["document"] == {"text": docs[body["results"][0]["index"]]}
    assert body["model"] == str(reranker[0]) and body["usage"]["prompt_tokens"] > 0
    status, body = retrieval_server.post("/v1/rerank", {"query": "q", "documents": [{"text": "d"}]})  # no model
    assert status == 200 and len(body["results"]) == 1
    for path, request in (("/v1/embeddings", {"input": "x"}), ("/v1/rerank", {"query": "q", "documents": ["d"]})):
        status, body = retrieval_server.post(path, {**request, "model": "nope"})
        assert status == 404 and body["error"]["code"] == "model_not_found", body
        message = body["error"]["message"]
        for held in (tiny_checkpoint, embedder[0], reranker[0]):
            assert repr(str(held)) in message
    status, body = retrieval_server.post("/v1/embeddings", {"input": "x", "model": reranker[0].name})
    assert status == 400 and "rerank model" in body["error"]["message"]
    for bad in ({"input": []}, {"input": [[]]}, {"input": [1, "a"]}, {"input": "x", "dimensions": 65},
                {"input": "x", "encoding_format": "hex"}, {"input": [[10 ** 7]]}):
        status, body = retrieval_server.post("/v1/embeddings", bad)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", (bad, body)
    for bad in ({"query": "q"}, {"query": "q", "documents": []}, {"query": "q", "documents": [1]},
                {"query": "q", "documents": ["d"], "top_n": 0}):
        status, body = retrieval_server.post("/v1/rerank", bad)
        assert status == 400, (bad, body)
    # The chat model still answers beside them.
    status, body = retrieval_server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_the_new_routes_fuzzed_with_schemathesis_give_no_server_errors(retrieval_server):
    import schemathesis  # in the test extra: a missing one fails
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(retrieval_server.base + "/openapi.json")
    failures, statuses = [], set()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path not in ("/v1/embeddings", "/v1/rerank"):
            continue

        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            response = case.call(timeout=60)
            statuses.add((case.path, response.status_code))
            if response.status_code >= 500:
                failures.append((case.path, case.body, response.status_code, response.text[:200]))

        fuzz()
    assert failures == []
    assert {("/v1/embeddings", 200), ("/v1/rerank", 200)} <= statuses


def test_without_an_embedding_model_the_routes_say_how_to_load_one():
    from qwen3_mlx.server.protocol import ApiError
    from qwen3_mlx.server.retrieval import Retrieval

    routes = Retrieval(None, chat_id="/models/chat", embedding=None, rerank=None, body_of=None)
    for kind, flag in (("embedding", "--embedding-model"), ("rerank", "--rerank-model")):
        for body in ({}, {"model": "chat"}):
            with pytest.raises(ApiError) as e:
                routes.pick(body, kind, flag)
            assert e.value.status == 404 and flag in e.value.message and "'/models/chat' (chat)" in e.value.message
        with pytest.raises(ApiError, match="model 'nope' not found; this server holds '/models/chat'"):
            routes.pick({"model": "nope"}, kind, flag)


def test_engine_call_runs_on_the_engine_thread_between_turns(tiny_checkpoint):
    import asyncio
    import threading

    from qwen3_mlx import load
    from qwen3_mlx.server.engine import Engine

    engine = Engine(*load(tiny_checkpoint))
    try:
        async def main():
            name = await engine.call(lambda: threading.current_thread().name)
            with pytest.raises(ZeroDivisionError):
                await engine.call(lambda: 1 / 0)
            return name, await asyncio.gather(*(engine.call(lambda i=i: i * i) for i in range(5)))

        name, squares = asyncio.run(main())
        assert name == "qwen3-mlx-engine" and squares == [0, 1, 4, 9, 16]
    finally:
        engine.close()


def test_one_token_id_input_may_be_longer_than_the_item_limit():
    """A list of ints is one input (its length is the context's business), a list of strings many."""
    from qwen3_mlx.server.protocol import ApiError
    from qwen3_mlx.server.retrieval import MAX_INPUTS, _inputs

    assert _inputs(list(range(MAX_INPUTS + 5))) == [list(range(MAX_INPUTS + 5))]
    with pytest.raises(ApiError, match="at most"):
        _inputs(["x"] * (MAX_INPUTS + 1))
