"""Prompt cache files: the KV cache of a long system prompt or document, saved once and reused by later runs.

A file (safetensors) holds each layer's keys and values (float, or the quantized cache's words, scales and
biases) for the first N tokens, or a linear-attention layer's conv and recurrent state after them, with the
token ids, the system prompt they came from (if any) and a
fingerprint of the model (its config and a slice of its weights), so a cache is never applied to another
model or to a prompt that does not start with its tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import Qwen3MLXError
from .kernels import QuantizedKV
from .models.cache import IndexedKVCache, KVCache, QuantizedKVCache, RecurrentCache, common_prefix_length, truncate_cache

FORMAT = "qwen3-mlx-prompt-cache/1"


def model_fingerprint(model) -> str:
    """A short hash of the model's config and of a few of its weights (the final norm and the first embedding
    row): two checkpoints of one shape, or one checkpoint at two precisions, differ."""
    h = hashlib.sha256(json.dumps(model.args.to_dict(), sort_keys=True, default=str).encode())
    embed = model.model.embed_tokens
    final = model.model.norm if "norm" in model.model else model.model.hyper_connection_mixer.hc_norm  # qwen4_exp's
    for a in (final.weight, embed.weight[:1], *(embed[k][:1] for k in ("scales", "biases") if k in embed)):
        h.update(np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a).tobytes())
    return h.hexdigest()[:16]


@dataclass
class PromptCache:
    """A loaded prompt cache: per-layer caches holding `tokens`, and the system prompt they render (or None)."""

    cache: list
    tokens: list[int]
    system: str | None = None

    def take(self, prompt: list[int]) -> tuple[list, int]:
        """The cache for `prompt` and how many of its first tokens it holds (all but at least one of them, so
        the generator has a token to feed). Refuses a prompt that does not start with the cached tokens."""
        n, at = len(self.tokens), common_prefix_length(prompt, self.tokens)
        if at < n:
            raise Qwen3MLXError(
                f"the prompt does not start with the {n} cached tokens (it differs from token {at} on); use the "
                "same system prompt or document the cache was made from"
            )
        return self.cache, truncate_cache(self.cache, min(n, len(prompt) - 1))


def save_prompt_cache(path: str | Path, model, cache: list, tokens: list[int], system: str | None = None) -> int:
    """Write the first len(tokens) positions of `cache` to `path`; returns the file's size in bytes."""
    n = len(tokens)
    if not cache or any(c.offset < n for c in cache):
        raise Qwen3MLXError(f"the cache holds fewer than the {n} tokens to save")
    if any(isinstance(c, RecurrentCache) and c.offset != n for c in cache):
        raise Qwen3MLXError(f"a recurrent state can be saved only where it is ({cache[0].offset} positions, not {n})")
    arrays = {}
    kv = [c for c in cache if not isinstance(c, RecurrentCache)]
    quantized = bool(kv) and isinstance(kv[0], QuantizedKVCache)
    for i, c in enumerate(cache):
        if isinstance(c, RecurrentCache):
            arrays[f"{i}.conv"], arrays[f"{i}.recurrent"] = c.conv, c.recurrent
            arrays.update({f"{i}.extra.{j}": a for j, a in enumerate(c.extra)})
        elif quantized:
            for kind, parts in (("keys", c.keys), ("values", c.values)):
                for name, a in zip(QuantizedKV._fields, parts):
                    arrays[f"{i}.{kind}.{name}"] = a[..., :n, :]
        else:
            arrays[f"{i}.keys"], arrays[f"{i}.values"] = c.keys[..., :n, :], c.values[..., :n, :]
            if isinstance(c, IndexedKVCache):
                arrays[f"{i}.index"] = c.index[:, :n]
    metadata = {"format": FORMAT, "tokens": json.dumps(tokens), "model": model_fingerprint(model),
                "model_name": str(getattr(model, "model_path", "") or model.args.model_type),
                "system": json.dumps(system), "layers": str(len(cache)),
                "recurrent": json.dumps([i for i, c in enumerate(cache) if isinstance(c, RecurrentCache)])}
    if quantized:
        metadata.update(kv_bits=str(kv[0].bits), kv_group_size=str(kv[0].group_size))
    path = Path(path)
    mx.save_safetensors(str(path), arrays, metadata=metadata)
    return path.stat().st_size


def load_prompt_cache(path: str | Path, model) -> PromptCache:
    """Read a prompt cache file for `model`, refusing one made for another model."""
    path = Path(path)
    if not path.is_file():
        raise Qwen3MLXError(f"no prompt cache file at {path}")
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # not safetensors, truncated
        raise Qwen3MLXError(f"{path} is not a prompt cache file ({e})") from None
    if metadata.get("format") != FORMAT:
        raise Qwen3MLXError(f"{path} is not a qwen3-mlx prompt cache file")
    if metadata.get("model") != model_fingerprint(model):
        raise Qwen3MLXError(
            f"{path} was made for another model ({metadata.get('model_name')}, fingerprint {metadata.get('model')}); "
            "make it again with `qwen3-mlx cache-prompt` for this one"
        )
    tokens = json.loads(metadata["tokens"])
    layers = int(metadata["layers"])
    recurrent = set(json.loads(metadata.get("recurrent", "[]")))
    cache: list = []
    for i in range(layers):
        if i in recurrent:
            c = RecurrentCache()
            extra = [arrays[f"{i}.extra.{j}"] for j in range(len(arrays)) if f"{i}.extra.{j}" in arrays]
            c.update(arrays[f"{i}.conv"], arrays[f"{i}.recurrent"], len(tokens), extra=extra)
            cache.append(c)
            continue
        if "kv_bits" in metadata:
            c = QuantizedKVCache(int(metadata["kv_bits"]), int(metadata["kv_group_size"]))
            c.keys, c.values = (QuantizedKV._make(arrays[f"{i}.{kind}.{n}"] for n in QuantizedKV._fields)
                                for kind in ("keys", "values"))
        else:
            c = KVCache() if f"{i}.index" not in arrays else IndexedKVCache()
            c.keys, c.values = arrays[f"{i}.keys"], arrays[f"{i}.values"]
            if f"{i}.index" in arrays:
                c.index = arrays[f"{i}.index"]
        c.offset = len(tokens)
        cache.append(c)
    return PromptCache(cache, tokens, json.loads(metadata.get("system", "null")))


def system_prompt_tokens(tokenizer, system: str) -> list[int]:
    """The tokens a conversation with this system prompt starts with, whatever follows (its rendered block)."""
    full = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": "x"}], add_generation_prompt=False))
    alone = tokenizer.encode(tokenizer.apply_chat_template([{"role": "system", "content": system}],
                                                           add_generation_prompt=False))
    return alone[:common_prefix_length(full, alone)]
