"""`response_format` enforced during sampling, with llguidance: each answer token is masked to what the JSON
schema still allows, so the answer parses and validates whatever the model's own preference."""

from __future__ import annotations

import json
from functools import lru_cache

import mlx.core as mx
import numpy as np

from .protocol import ApiError


@lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer_json: str, n_vocab: int, eos: tuple[int, ...]):
    import llguidance

    return llguidance.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=list(eos))


def grammar_for(response_format: dict | None) -> str | None:
    """The llguidance grammar of an OpenAI `response_format` (None for plain text); 400 if it is not usable."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    try:
        import llguidance
    except ImportError:
        raise ApiError(400, "response_format needs llguidance on the server: pip install 'qwen3-mlx[serve]'",
                       param="response_format") from None
    kind = response_format.get("type")
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object",
                           param="response_format")
    else:
        raise ApiError(400, f"unknown response_format type {kind!r} (text, json_object, json_schema)",
                       param="response_format")
    try:
        # Fixed separators, no free whitespace: a model cannot wander into blank space forever.
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
    except Exception as e:  # the library's own message says what is wrong with the schema
        raise ApiError(400, f"response_format schema rejected: {e}", param="response_format") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ApiError(400, f"response_format schema rejected: {'; '.join(messages)}", param="response_format")
    return grammar


class GrammarConstraint:
    """The `constraint` stream_generate takes: an additive logits mask per step, advanced by each answer token."""

    def __init__(self, tokenizer, grammar: str, vocab_size: int):
        import llguidance

        ll = _ll_tokenizer(tokenizer.to_json(), vocab_size, tuple(tokenizer.eos_token_ids))
        self.matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
        self.vocab_size = vocab_size

    def mask(self) -> mx.array:
        allowed = np.frombuffer(self.matcher.compute_logit_bias(), dtype=np.uint8)[: self.vocab_size]
        bias = np.where(allowed > 0, 0.0, -np.inf).astype(np.float32)
        if bias.shape[0] < self.vocab_size:  # tokens the tokenizer does not know (padded vocabulary)
            bias = np.concatenate([bias, np.full(self.vocab_size - bias.shape[0], -np.inf, np.float32)])
        return mx.array(bias)

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)
