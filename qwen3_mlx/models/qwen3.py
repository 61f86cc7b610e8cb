"""Qwen3 dense decoder (HF `model_type` "qwen3"). Module names equal checkpoint tensor names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from . import fused
from .base import BaseModelArgs, attention_mask, make_rope
from .cache import KVCache
from .layers import Embedding, Linear, RMSNorm


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.scale = hd**-0.5
        bias = args.attention_bias
        # q_proj/o_proj are not square when heads * head_dim != hidden (4B, 14B, 32B, 235B).
        self.q_proj = Linear(dim, self.n_heads * hd, bias=bias)
        self.k_proj = Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.v_proj = Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = Linear(self.n_heads * hd, dim, bias=bias)
        self.q_norm = RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = make_rope(args)

    def __call__(self, x: mx.array, mask=None, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        # [B, L, H*D] -> [B, H, L, D]; QK-norm is per head, before RoPE.
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = kernels.attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden_dim, bias=False)
        self.up_proj = Linear(dim, hidden_dim, bias=False)
        self.down_proj = Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, mlp: nn.Module | None = None):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = mlp if mlp is not None else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache: KVCache | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, args: ModelArgs, layers: list[nn.Module] | None = None):
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = layers if layers is not None else [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None, mask: mx.array | None = None) -> mx.array:
        """Final-norm hidden states [B, L, hidden]. `mask`: an explicit boolean or additive mask [B, 1, L, S]
        instead of the causal one (a batch padded on the left: `retrieval.padded_batch`)."""
        h = self.embed_tokens(inputs)  # [B, L] -> [B, L, hidden]
        cache = cache if cache is not None else [None] * len(self.layers)
        if mask is None:
            mask = attention_mask(h.shape[1], cache[0])
            if mask is None and (out := fused.decode(self, self.layers, h, cache)) is not None:
                return self.norm(out)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs, model: Qwen3Model | None = None):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = model if model is not None else Qwen3Model(args)
        self.headless = False  # a bare decoder checkpoint (Qwen3-Embedding): no LM head, see sanitize
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """Logits [B, L, vocab] for token ids [B, L], appending to `cache` when given."""
        return self.logits(self.model(inputs, cache))

    def logits(self, h: mx.array) -> mx.array:
        """The LM head over final hidden states (the tied embedding when the checkpoint ties them)."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def fill(self, inputs: mx.array, cache: list[KVCache]) -> None:
        """Append token ids [B, L] to `cache` without computing logits (a prompt's prefill)."""
        self.model(inputs, cache)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map checkpoint tensors to module parameters (HF tied checkpoints may still carry lm_head).

        A checkpoint of the decoder alone (`Qwen3Model.save_pretrained`, as Qwen3-Embedding ships: tensor names
        without `model.`) gets the prefix, and the model becomes headless: no lm_head to generate with
        (`qwen3_mlx.embed` reads `self.model`'s hidden states; generation refuses it)."""
        if "embed_tokens.weight" in weights and "model.embed_tokens.weight" not in weights:
            weights = {f"model.{k}": v for k, v in weights.items()}
            self.headless = True
            if "lm_head" in self:
                del self.lm_head
            return weights
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights

    @property
    def layers(self):
        return self.model.layers
