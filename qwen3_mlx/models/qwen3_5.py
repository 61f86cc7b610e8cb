"""Qwen3.5 / Qwen3.6 dense decoder (HF `model_type` "qwen3_5", text part "qwen3_5_text"): a hybrid of Gated
DeltaNet layers (`linear_attn`) and gated full-attention layers (`self_attn`), per `layer_types`.

Module names equal checkpoint tensor names. The vision-language checkpoints hold the language model under
`model.language_model.`; the vision tower and the multi-token-prediction head are skipped (`sanitize`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..errors import ModelLoadError
from . import qwen3
from .base import RoPE, attention_mask, rope_settings
from .cache import KVCache, RecurrentCache
from .layers import Embedding, Linear, RMSNorm


@dataclass
class ModelArgs(qwen3.ModelArgs):
    partial_rotary_factor: float = 0.25
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    layer_types: list[str] = field(default_factory=list)
    full_attention_interval: int = 4

    @classmethod
    def from_dict(cls, params: dict[str, Any]):
        """A text config, or a vision-language config whose `text_config` holds the language model's keys."""
        return super().from_dict(text_params(params))

    def __post_init__(self):
        super().__post_init__()
        if not self.layer_types:
            n = self.full_attention_interval
            self.layer_types = ["full_attention" if (i + 1) % n == 0 else "linear_attention"
                                for i in range(self.num_hidden_layers)]
        unknown = set(self.layer_types) - {"full_attention", "linear_attention"}
        if unknown or len(self.layer_types) != self.num_hidden_layers:
            raise ModelLoadError(f"layer_types must list {self.num_hidden_layers} of full_attention / "
                                 f"linear_attention, got {self.layer_types}")


def text_params(params: dict[str, Any]) -> dict[str, Any]:
    """The language model's config keys: `text_config` of a vision-language config (the top-level model_type and
    tie_word_embeddings kept), or the config itself."""
    if not isinstance(params.get("text_config"), dict):
        return params
    top = {k: v for k, v in params.items() if k in ("tie_word_embeddings",)}
    return {**params["text_config"], **top, "model_type": params["model_type"]}


class ZeroCenteredRMSNorm(RMSNorm):
    """Qwen3.5's RMSNorm scales by (1 + weight); `sanitize` adds the 1 to HF weights, so it runs as a plain one."""


class GatedAttention(nn.Module):
    """Full attention whose q_proj also yields a per-head output gate; RoPE on the first dims of each head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = hd**-0.5
        bias = args.attention_bias
        self.q_proj = Linear(dim, self.n_heads * hd * 2, bias=bias)
        self.k_proj = Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.v_proj = Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = Linear(self.n_heads * hd, dim, bias=bias)
        self.q_norm = ZeroCenteredRMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(hd, eps=args.rms_norm_eps)
        theta, scaling = rope_settings(args)
        factor = (args.rope_parameters or {}).get("partial_rotary_factor", args.partial_rotary_factor)
        self.rotary_dims = int(hd * factor)
        self.rope = RoPE(self.rotary_dims, theta, scaling, args.max_position_embeddings)

    def _rotate(self, x: mx.array, offset: int) -> mx.array:
        r = self.rotary_dims
        return mx.concatenate([self.rope(x[..., :r], offset=offset), x[..., r:]], axis=-1)

    def __call__(self, x: mx.array, mask=None, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        qg = self.q_proj(x).reshape(B, L, self.n_heads, -1)  # [B, L, H, 2 * hd]: query and gate per head
        q, gate = mx.split(qg, 2, axis=-1)
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self._rotate(q, offset), self._rotate(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = self._attend(q, k, v, mask).transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(o * mx.sigmoid(gate.reshape(B, L, -1)))

    def _attend(self, q: mx.array, k, v, mask) -> mx.array:
        return kernels.attention(q, k, v, scale=self.scale, mask=mask)


class GatedRMSNorm(nn.Module):
    """RMSNorm of each value head (a plain weight), times silu(z) (or sigmoid(z): qwen4_exp's `output_gate_type`)."""

    def __init__(self, dims: int, eps: float, activation: str = "silu"):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps
        self.activation = activation

    def __call__(self, x: mx.array, z: mx.array) -> mx.array:
        normed = kernels.rms_norm(x, self.weight, eps=self.eps)
        if self.activation == "sigmoid":
            return mx.sigmoid(z.astype(mx.float32)).astype(normed.dtype) * normed
        return kernels.swiglu(z, normed)  # silu(z) * norm(x)


class GatedDeltaNet(nn.Module):
    """Linear attention: a causal depthwise conv over q, k, v, then the gated delta rule (`gated_delta`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_k, self.n_v = args.linear_num_key_heads, args.linear_num_value_heads
        self.dk, self.dv = args.linear_key_head_dim, args.linear_value_head_dim
        self.key_dim, self.value_dim = self.n_k * self.dk, self.n_v * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = args.linear_conv_kernel_dim
        D = args.hidden_size
        self.in_proj_qkv = Linear(D, self.conv_dim, bias=False)
        self.in_proj_z = Linear(D, self.value_dim, bias=False)
        self.in_proj_b = Linear(D, self.n_v, bias=False)
        self.in_proj_a = Linear(D, self.n_v, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = mx.ones((self.n_v,))
        self.A_log = mx.zeros((self.n_v,))
        self.norm = GatedRMSNorm(self.dv, args.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, D, bias=False)

    def _conv(self, x: mx.array, cache: RecurrentCache | None) -> tuple[mx.array, mx.array]:
        """The causal depthwise conv (and SiLU) over [B, L, C] after the cached inputs; (output, new conv state)."""
        past = cache.conv if cache is not None else None
        return kernels.causal_conv(x, self.conv1d.weight, past)

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """(q, k, v concatenated [B, L, conv_dim], z [B, L, Hv, Dv], b and a [B, L, Hv])."""
        B, L, _ = x.shape
        z = self.in_proj_z(x).reshape(B, L, self.n_v, self.dv)
        return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)

    def __call__(self, x: mx.array, mask=None, cache: RecurrentCache | None = None) -> mx.array:
        out, conv, state = self.mix(x, cache)
        if cache is not None:
            cache.update(conv, state, x.shape[1])
        return out

    def mix(self, x: mx.array, cache: RecurrentCache | None) -> tuple[mx.array, mx.array, mx.array]:
        """(output, new conv state, new delta-rule state), `cache` read and left as it was."""
        B, L, _ = x.shape
        mixed, z, b, a = self._project(x)
        qkv, conv = self._conv(mixed, cache)
        q, k, v = mx.split(qkv, [self.key_dim, 2 * self.key_dim], axis=-1)
        # [B, L, heads, d] -> [B, heads, L, d]; key heads repeated to the value heads they serve
        # q and k L2-normed per head (q also scaled by dk^-0.5), before the key heads are repeated.
        q, k = (kernels.l2_norm(t.reshape(B, L, self.n_k, self.dk), s) for t, s in ((q, self.dk**-0.5), (k, 1.0)))
        v = v.reshape(B, L, self.n_v, self.dv).transpose(0, 2, 1, 3)
        rep = self.n_v // self.n_k
        q, k = (mx.repeat(t, rep, axis=2).transpose(0, 2, 1, 3) if rep > 1 else t.transpose(0, 2, 1, 3)
                for t in (q, k))
        beta = mx.sigmoid(b).transpose(0, 2, 1)  # [B, Hv, L]
        g = (-mx.exp(self.A_log) * nn.softplus(a + self.dt_bias)).transpose(0, 2, 1)
        state = cache.recurrent if cache is not None and cache.recurrent is not None else \
            mx.zeros((B, self.n_v, self.dk, self.dv), mx.float32)
        o, state = kernels.gated_delta(q, k, v, g, beta, state)  # [B, Hv, L, Dv]
        o = self.norm(o.transpose(0, 2, 1, 3), z)  # [B, L, Hv, Dv]
        return self.out_proj(o.reshape(B, L, -1)), conv, state


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str, mlp: nn.Module | None = None, linear=GatedDeltaNet):
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = linear(args)
        else:
            self.self_attn = GatedAttention(args)
        self.mlp = mlp if mlp is not None else qwen3.MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = ZeroCenteredRMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        mixer = self.linear_attn if self.is_linear else self.self_attn
        h = x + mixer(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, args: ModelArgs, layers: list[nn.Module] | None = None):
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = layers if layers is not None else [DecoderLayer(args, t) for t in args.layer_types]
        self.norm = ZeroCenteredRMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        h = self.embed_tokens(inputs)  # [B, L] -> [B, L, hidden]
        cache = cache if cache is not None else [None] * len(self.layers)
        # The attention layers' mask (per-row lengths for a batch at different lengths), from the first one's cache.
        first = next((c for layer, c in zip(self.layers, cache) if not layer.is_linear), None)
        mask = attention_mask(h.shape[1], first)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(qwen3.Model):
    def __init__(self, args: ModelArgs, model: TextModel | None = None):
        super().__init__(args, model if model is not None else TextModel(args))

    def make_cache(self) -> list:
        """A KVCache per attention layer, a RecurrentCache (conv and delta-rule state) per linear one."""
        return [RecurrentCache() if layer.is_linear else KVCache() for layer in self.layers]

    def hidden_states(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """The final-norm hidden states [B, L, hidden] of a forward (`logits` turns them into logits): what a
        multi-token-prediction drafter pairs with the next token (`models/mtp.py`)."""
        return self.model(inputs, cache)

    def mtp_layer(self) -> nn.Module:
        """A decoder block shaped as this family's multi-token-prediction layer (full attention, the model's MLP)."""
        return DecoderLayer(self.args, "full_attention")

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF tensors to ours: the language model of a vision-language checkpoint (vision tower and MTP head
        skipped), conv weights [C, 1, K] -> [C, K, 1], and the 1 of the zero-centred norms folded in."""
        skipped = {k for k in weights if k.startswith(("model.visual.", "visual.", "mtp.", "model.mtp."))}
        if skipped:
            print(f"qwen3-mlx: skipping {len(skipped)} vision / multi-token-prediction tensors (text only)",
                  file=sys.stderr)
        out = {}
        for key, w in weights.items():
            if key in skipped:
                continue
            key = key.replace("model.language_model.", "model.", 1)  # HF's vision-language layout
            if key.startswith("language_model."):  # mlx-lm's (our exports)
                key = key[len("language_model."):]
            out[key] = w
        hf = any(k.endswith("conv1d.weight") and w.shape[-1] != 1 for k, w in out.items())
        if hf:
            for key, w in list(out.items()):
                if key.endswith("conv1d.weight"):
                    out[key] = w.swapaxes(1, 2)
                elif key.endswith(("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight",
                                   "k_norm.weight")) or key == "model.norm.weight":
                    out[key] = w + 1.0
        return super().sanitize(out)
