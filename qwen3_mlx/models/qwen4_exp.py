"""Qwen3.8-Flash-Next, "a first look at Qwen4" (HF `model_type` "qwen4_exp", text part "qwen4_exp_text").

The qwen3_5_moe hybrid (Gated DeltaNet and gated attention layers, every MLP routed experts plus a gated shared
expert) with three additions:
- hyper-connections: the residual is `hc_count` streams of `hidden_size`. Before each block a low-rank mixer
  folds the (normed) streams into the block's input, and the block's output is added back to every stream with
  a per-token weight each (`attn_hyper_connection`, `mlp_hyper_connection`); a last mixer
  (`hyper_connection_mixer`) makes the final hidden state, in place of a final norm;
- QSA indexed attention: the full-attention layers attend, per query, only to the tokens of the
  `indexer_budget / indexer_compress_ratio` best-scoring complete blocks of `indexer_compress_ratio` keys (a
  compressed-key index of its own, one key head) plus the incomplete last block: full attention while a
  context has no more blocks than that;
- per-layer n-gram embeddings (PLE) on some DeltaNet layers: each token's 2..`ngram_size`-grams (reset after
  EOS) hashed `heads_per_ngram` ways into big tables, gated per stream against the hidden state, then a
  dilated causal depthwise conv. The last `ngram_size - 1` tokens and the conv's inputs are state, kept in the
  layer's RecurrentCache beside the DeltaNet's (so state checkpoints and rollback cover them).
The checkpoint's multi-token-prediction head (`mtp.*`) drafts as `MtpHead` (`--draft-model mtp`).

Module names equal checkpoint tensor names; sanitize() joins the n-gram tables' `shard_*` parts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import kernels
from ..errors import ModelLoadError
from . import qwen3_5, qwen3_5_moe
from .base import attention_mask
from .cache import BatchKVCache, IndexedKVCache, RecurrentCache
from .layers import Embedding, Linear
from .mtp import MtpDrafter


@dataclass
class ModelArgs(qwen3_5_moe.ModelArgs):
    hc_count: int = 4
    hc_lowrank: int = 320
    ple_layer_ids: list[int] = field(default_factory=list)  # one-indexed
    ple_embed_dim: int | None = None
    ple_conv_kernel_size: int = 4
    ngram_size: int = 3
    heads_per_ngram: int = 8
    ngram_vocab_size_base: int = 20_000_000
    make_ngram_vocab_size_divisible_by: int = 128
    seed: int = 1234
    indexer_n_heads: int | None = None
    indexer_kv_heads: int | None = None
    indexer_head_dim: int | None = None
    indexer_budget: int | None = None
    indexer_compress_ratio: int | None = None
    output_gate_type: str | None = None
    hidden_act: str = "silu"
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        # Released configs call the indexed layers "full_attention"; transformers' own "indexed_attention".
        self.layer_types = ["full_attention" if t == "indexed_attention" else t for t in self.layer_types]
        super().__post_init__()
        self.ple_layer_ids = sorted(set(self.ple_layer_ids or []))
        self.ple_embed_dim = self.ple_embed_dim or self.hidden_size
        gate = self.output_gate_type or self.hidden_act
        if gate not in ("sigmoid", "silu"):
            raise ModelLoadError(f"unsupported output_gate_type {gate!r} (sigmoid or silu)")
        if self.hc_count < 2:
            raise ModelLoadError(f"qwen4_exp needs hc_count >= 2, got {self.hc_count}")
        qsa = (self.indexer_n_heads, self.indexer_kv_heads, self.indexer_head_dim, self.indexer_budget,
               self.indexer_compress_ratio)
        if any(v is None or v <= 0 for v in qsa) and "full_attention" in self.layer_types:
            raise ModelLoadError("config.json lacks the QSA indexer's settings (indexer_n_heads, indexer_kv_heads, "
                                 "indexer_head_dim, indexer_budget, indexer_compress_ratio)")
        if self.indexer_kv_heads not in (None, 1) or (self.indexer_budget or 0) % (self.indexer_compress_ratio or 1):
            raise ModelLoadError("the QSA indexer needs indexer_kv_heads 1 and indexer_budget a multiple of "
                                 "indexer_compress_ratio")
        heads = (self.ngram_size - 1) * self.heads_per_ngram
        for i in self.ple_layer_ids:
            if not 1 <= i <= self.num_hidden_layers or self.layer_types[i - 1] != "linear_attention":
                raise ModelLoadError(f"ple_layer_ids holds {i}: PLE runs on linear_attention layers 1.."
                                     f"{self.num_hidden_layers}")
        if self.ple_layer_ids and (heads <= 0 or self.ple_embed_dim % heads or self.eos_id is None):
            raise ModelLoadError("PLE needs ple_embed_dim divisible by (ngram_size - 1) * heads_per_ngram and an "
                                 "eos_token_id")

    @property
    def eos_id(self) -> int | None:
        return self.eos_token_id[0] if isinstance(self.eos_token_id, list) else self.eos_token_id


def _primes_from(start: int, count: int) -> list[int]:
    """The first `count` primes >= `start` (a sieve over a window grown until it holds enough)."""
    span = max(1024, count * 64)
    while True:
        hi = start + span
        small = np.ones(math.isqrt(hi) + 1, bool)
        small[:2] = False
        for p in range(2, math.isqrt(len(small) - 1) + 1):
            if small[p]:
                small[p * p :: p] = False
        window = np.ones(hi - start, bool)
        window[: max(0, 2 - start)] = False
        for p in np.nonzero(small)[0]:
            first = max(p * p, (start + p - 1) // p * p)
            window[first - start :: p] = False
        found = (np.nonzero(window)[0] + start).tolist()
        if len(found) >= count:
            return found[:count]
        span *= 2


_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser (the multipliers' seed stream)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def hash_constants(args: ModelArgs, ple_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A PLE layer's (n-gram multipliers [ngram_size], head table sizes [heads], head offsets [heads]) as
    transformers derives them (checkpoints also carry them; theirs are used). The sizes are distinct primes
    from `ngram_vocab_size_base` on, the multipliers odd and small enough that token * multiplier fits int64."""
    heads = (args.ngram_size - 1) * args.heads_per_ngram
    primes = _primes_from(args.ngram_vocab_size_base, (ple_index + 1) * heads)[ple_index * heads :]
    sizes = np.array(primes, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    half = max(1, ((1 << 63) - 1) // max(args.vocab_size, 1) // 2)
    base = args.seed + 10007 * ple_index
    mults = [2 * (_mix64((base + 0x9E3779B97F4A7C15 * (i + 1)) & _M64) % half) + 1 for i in range(args.ngram_size)]
    return np.array(mults, np.int64), sizes, offsets


class GroupRMSNorm(nn.Module):
    """RMSNorm of each `group`-wide slice of the last axis, one weight over the whole axis (the streams'
    norms). Zero-centred in HF checkpoints: sanitize adds the 1."""

    def __init__(self, dims: int, group: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.group, self.eps = group, eps

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        ones = mx.ones((self.group,), x.dtype)
        normed = kernels.rms_norm(x.reshape(*shape[:-1], -1, self.group), ones, eps=self.eps)
        return normed.reshape(shape) * self.weight


class HyperConnection(nn.Module):
    """Folds the `hc` streams [.., hc * D] into one block input [.., D]; with `combine`, also the weight [.., hc]
    each stream adds the block's output with (`inject`)."""

    def __init__(self, args: ModelArgs, combine: bool = True):
        super().__init__()
        hc, D = args.hc_count, args.hidden_size
        self.hc = hc
        self.hc_norm = GroupRMSNorm(hc * D, D, args.rms_norm_eps)
        self.input_mix_weight_down = Linear(hc * D, args.hc_lowrank, bias=False)
        self.input_mix_weight_up = Linear(args.hc_lowrank, hc * D, bias=False)
        if combine:
            self.block_inject_weight = Linear(hc * D, hc, bias=False)

    def __call__(self, h: mx.array):
        n = self.hc_norm(h)
        w = mx.sigmoid(self.input_mix_weight_up(nn.silu(self.input_mix_weight_down(n) / self.hc)))
        mixed = (w * n).reshape(*h.shape[:-1], self.hc, -1).mean(axis=-2)
        if "block_inject_weight" not in self:
            return mixed
        return mixed, 2 * mx.sigmoid(self.block_inject_weight(n) / self.hc)


def inject(h: mx.array, out: mx.array, weights: mx.array) -> mx.array:
    """Every stream of h [.., hc * D] plus the block's output [.., D] times its weight [.., hc]."""
    return h + (out[..., None, :] * weights[..., :, None]).reshape(h.shape)


class DiskRows:
    """A table [rows, d] left in its safetensors file(s), in consecutive parts (HF's `shard_*`), memory-mapped:
    a lookup reads the rows it names, so the table costs page cache the OS can drop, not resident memory."""

    def __init__(self, parts: list, dtype: mx.Dtype):
        from ..quantize.safetensors_io import DTYPES

        self.maps, starts = [], [0]
        for info in parts:
            np_dtype = DTYPES[info.dtype][2]
            self.maps.append(np.memmap(info.file, np_dtype, "r", offset=info.start, shape=info.shape))
            starts.append(starts[-1] + info.shape[0])
        self.starts = np.array(starts)
        self.bf16 = parts[0].dtype == "BF16"  # numpy has no bfloat16: read as uint16, viewed in MLX
        self.dtype, self.shape = dtype, (int(self.starts[-1]), parts[0].shape[1])

    def take(self, ids: mx.array) -> mx.array:
        """Rows [*ids.shape, d] (ids evaluated here: the rows are read on the host)."""
        flat = np.array(ids).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"n-gram table row out of range 0..{self.shape[0] - 1}")
        part = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty((flat.size, self.shape[1]), self.maps[0].dtype)
        for p in np.unique(part):
            at = part == p
            out[at] = self.maps[p][flat[at] - self.starts[p]]
        rows = mx.array(out)
        rows = rows.view(mx.bfloat16) if self.bf16 else rows
        return rows.astype(self.dtype).reshape(*ids.shape, self.shape[1])


class NGramTable(Embedding):
    """An n-gram table: never quantized (in a file it is read by row from disk, where its size costs no memory;
    random-weight models hold it in memory)."""

    keep_float = True


class NGramEmbedding(nn.Module):
    """Each token's hashed 2..ngram_size-grams: `heads_per_ngram` rows per order from one table, concatenated."""

    def __init__(self, args: ModelArgs, ple_index: int):
        super().__init__()
        self.n, self.per = args.ngram_size, args.heads_per_ngram
        self.heads = (self.n - 1) * self.per
        self.eos = args.eos_id
        mults, sizes, offsets = hash_constants(args, ple_index)
        self.layer_multipliers = mx.array(mults)
        self.ngram_heads_vocab_sizes = mx.array(sizes)
        self.ngram_heads_offsets = mx.array(offsets)
        div = args.make_ngram_vocab_size_divisible_by
        rows = -(-int(sizes.sum()) // div) * div
        self.ngram_embedding = NGramTable(rows, args.ple_embed_dim // self.heads)
        self.disk: DiskRows | None = None  # the table read from its file by row instead (`Model.rows_on_disk`)

    def _shifted(self, tokens: mx.array, shift: int) -> mx.array:
        """tokens [B, T] shifted right by `shift` within each EOS-ended segment, EOS where that leaves it."""
        if shift == 0:
            return tokens
        T = tokens.shape[1]
        pos = mx.arange(T)
        eos_at = mx.where(tokens == self.eos, pos, -1)
        last_eos = mx.concatenate([mx.full((tokens.shape[0], 1), -1, eos_at.dtype),
                                   mx.cummax(eos_at, axis=1)[:, :-1]], axis=1)  # the last EOS before each position
        valid = (pos - (last_eos + 1) >= shift) & (pos >= shift)
        moved = mx.concatenate([mx.full((tokens.shape[0], shift), self.eos, tokens.dtype), tokens[:, :-shift]], axis=1)
        return mx.where(valid, moved, self.eos)

    def ids(self, tokens: mx.array, context: mx.array) -> mx.array:
        """Table rows [B, L, heads] of tokens [B, L] after `context` [B, n - 1] (the tokens before them)."""
        history = mx.concatenate([context, tokens], axis=1).astype(mx.int64)
        shifted = [self._shifted(history, s) * self.layer_multipliers[s] for s in range(self.n)]
        blocks, mixed = [], shifted[0]
        for order in range(2, self.n + 1):
            mixed = mx.bitwise_xor(mixed, shifted[order - 1])
            lo = (order - 2) * self.per
            sizes = self.ngram_heads_vocab_sizes[lo : lo + self.per]
            blocks.append(mx.remainder(mixed[..., None], sizes) + self.ngram_heads_offsets[lo : lo + self.per])
        return mx.concatenate(blocks, axis=-1)[:, -tokens.shape[1] :]

    def __call__(self, tokens: mx.array, context: mx.array | None) -> tuple[mx.array, mx.array]:
        """(embeddings [B, L, ple_embed_dim], the new context: the last n - 1 tokens)."""
        B, L = tokens.shape
        if context is None:
            context = mx.full((B, self.n - 1), self.eos, mx.int64)
        ids = self.ids(tokens, context)
        rows = self.ngram_embedding(ids) if self.disk is None else self.disk.take(ids)  # [B, L, heads, d]
        new_context = mx.concatenate([context, tokens.astype(mx.int64)], axis=1)[:, -(self.n - 1) :]
        return rows.reshape(B, L, -1), new_context


class PLE(nn.Module):
    """Per-layer n-gram embedding added to every stream: a value from the n-grams, gated per stream by the
    (normed) stream against an n-gram key, plus a dilated causal depthwise conv (SiLU) over the gated values."""

    def __init__(self, args: ModelArgs, ple_index: int):
        super().__init__()
        hc, D, E = args.hc_count, args.hidden_size, args.ple_embed_dim
        self.hc, self.D = hc, D
        self.ple_embedding = NGramEmbedding(args, ple_index)
        self.key_proj = Linear(E, hc * D, bias=False)
        self.value_proj = Linear(E, D, bias=False)
        self.norm_key = GroupRMSNorm(hc * D, D, args.rms_norm_eps)
        self.norm_query = GroupRMSNorm(hc * D, D, args.rms_norm_eps)
        self.norm_conv = GroupRMSNorm(hc * D, D, args.rms_norm_eps)
        self.kernel, self.dilation = args.ple_conv_kernel_size, args.ngram_size
        self.conv1d = nn.Conv1d(hc * D, hc * D, self.kernel, groups=hc * D, bias=False)  # [C, K, 1]
        self.span = (self.kernel - 1) * self.dilation  # the conv's state: its last `span` inputs

    def _conv(self, x: mx.array, past: mx.array | None) -> tuple[mx.array, mx.array]:
        B, L, C = x.shape
        if past is None:
            past = mx.zeros((B, self.span, C), x.dtype)
        full = mx.concatenate([past, x], axis=1)
        w = self.conv1d.weight[:, :, 0]  # [C, K]
        y = sum(full[:, j * self.dilation : j * self.dilation + L] * w[:, j] for j in range(self.kernel))
        return nn.silu(y), full[:, -self.span :]

    def __call__(self, h: mx.array, tokens: mx.array, state: tuple) -> tuple[mx.array, tuple]:
        """(what to add to h [B, L, hc * D], the new state (context, conv inputs)); `state` () when fresh."""
        context, past = state or (None, None)
        e, context = self.ple_embedding(tokens, context)
        B, L, _ = h.shape
        key = self.norm_key(self.key_proj(e)).reshape(B, L, self.hc, self.D)
        query = self.norm_query(h).reshape(B, L, self.hc, self.D)
        gate = (key * query).sum(axis=-1, keepdims=True) / math.sqrt(self.D)
        gate = mx.sqrt(mx.maximum(mx.abs(gate), 1e-6)) * mx.sign(gate)  # a signed square root
        gated = (mx.sigmoid(gate) * self.value_proj(e)[:, :, None, :]).reshape(B, L, -1)
        conv, past = self._conv(self.norm_conv(gated), past)
        return gated + conv, (context, past)


def rope_at(x: mx.array, positions: mx.array, inv_freq: mx.array, dims: int, mscale: float = 1.0) -> mx.array:
    """HF's half-split RoPE of the first `dims` of x [.., N, D] at arbitrary positions [N]."""
    angles = positions.astype(mx.float32)[:, None] * inv_freq[None]
    cos, sin = mx.cos(angles) * mscale, mx.sin(angles) * mscale
    half = dims // 2
    x1, x2 = x[..., :half], x[..., half:dims]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., dims:]], axis=-1)


class Indexer(nn.Module):
    """QSA's token selection: a query's score for a block of `compress_ratio` keys is the sum over index heads of
    relu(q_h . k_block) (k_block: the block's mean key, normed, roped at the block's first position); the
    `budget / compress_ratio` best complete blocks and the incomplete last one are what the query attends."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.dim = args.indexer_n_heads, args.indexer_head_dim
        self.ratio = args.indexer_compress_ratio
        self.top = args.indexer_budget // self.ratio
        self.index_qk_proj = Linear(args.hidden_size, (self.n_heads + 1) * self.dim, bias=False)
        self.q_layernorm = qwen3_5.ZeroCenteredRMSNorm(self.dim, eps=args.rms_norm_eps)
        self.k_layernorm = qwen3_5.ZeroCenteredRMSNorm(self.dim, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: IndexedKVCache | None, rope):
        """The keys each of x's L queries attends: None where that is every earlier key; for one query of one
        sequence (decode) `Picked`, their positions; else the boolean mask [B, 1, L, offset + L] (causal
        included). Appends the chunk's index keys to `cache`."""
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q, k = mx.split(self.index_qk_proj(x), [self.n_heads * self.dim], axis=-1)
        keys = cache.update_index(k) if cache is not None else k  # [B, T, dim], raw
        T, c = offset + L, self.ratio
        if T // c <= self.top:  # no query sees more complete blocks than it may pick
            return None
        q = self.q_layernorm(q.reshape(B, L, self.n_heads, self.dim)).transpose(0, 2, 1, 3)
        q = rope(q, offset)  # [B, H, L, dim]
        nb = T // c

        def block_keys(lo: int, hi: int) -> mx.array:  # blocks lo..hi-1: mean key, normed, roped at its start
            pooled = keys[:, lo * c : hi * c].reshape(B, hi - lo, c, self.dim).astype(mx.float32).mean(axis=2)
            return rope_at(self.k_layernorm(pooled.astype(keys.dtype)), mx.arange(lo, hi) * c, *rope.args)

        # a cache keeps the finished blocks' keys: a step computes the block its token completes, if any
        blocks = cache.block_keys(nb, offset // c, block_keys) if cache is not None else block_keys(0, nb)
        qf, bf = q.astype(mx.float32).reshape(B, -1, self.dim), blocks.astype(mx.float32)
        # one sequence: our product kernel (MLX's matmul takes ~15x as long at these small shapes on the CPU)
        scores = kernels.linear(qf, bf[0]) if B == 1 else qf @ bf.swapaxes(-1, -2)
        scores = mx.maximum(scores.reshape(B, self.n_heads, L, nb), 0).sum(axis=1) / math.sqrt(self.dim)  # [B, L, nb]
        qpos = mx.arange(offset, T)[:, None]
        complete = (qpos + 1) // c  # complete blocks each query sees
        seen = mx.arange(nb)[None] < complete  # [L, nb]
        scores = mx.where(seen, scores, -mx.inf)
        best = mx.argsort(-scores, axis=-1)[..., : self.top]
        if B == 1 and L == 1:  # every block is complete for the last query and more than `top` of them: all valid
            tokens = (best.reshape(-1, 1) * c + mx.arange(c)).reshape(-1)
            return Picked(mx.concatenate([tokens, mx.arange(nb * c, T)]))
        picked = mx.put_along_axis(mx.zeros(scores.shape, mx.bool_), best, mx.array(True), axis=-1) & seen
        kpos = mx.arange(T)[None]
        by_block = mx.concatenate([mx.repeat(picked, c, axis=-1), mx.zeros((B, L, T - nb * c), mx.bool_)], axis=-1)
        tail = (kpos >= complete * c) & (kpos <= qpos)
        return (by_block | tail)[:, None]


class Picked:
    """The positions of the keys one decoded query attends (QSA): at most budget + compress_ratio - 1."""

    def __init__(self, positions: mx.array):
        self.positions = positions


class IndexedAttention(qwen3_5.GatedAttention):
    """Gated attention over the keys QSA's indexer picks."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.indexer = Indexer(args)

    def __call__(self, x: mx.array, mask=None, cache: IndexedKVCache | None = None) -> mx.array:
        rope = _IndexRope(self)
        picked = self.indexer(x, cache, rope)
        return super().__call__(x, picked if picked is not None else mask, cache)

    def _attend(self, q: mx.array, k, v, mask) -> mx.array:
        if isinstance(mask, Picked):  # decode: attend the picked keys alone (a fraction of a long context)
            # head by head: MLX's CPU gather of rows from a 2-D array is ~2.5x its gather along axis 2 of [B, H, T, D]
            k, v = (mx.stack([mx.take(a[0, h], mask.positions, axis=0) for h in range(a.shape[1])])[None]
                    for a in (k, v))
            mask = None
        return super()._attend(q, k, v, mask)


class _IndexRope:
    """The attention's RoPE for the indexer's heads: consecutive positions, or any (`rope_at`'s `args`)."""

    def __init__(self, attn: IndexedAttention):
        self.attn = attn
        self.args = (attn.rope._inv_freq, attn.rotary_dims, attn.rope.mscale)

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        return self.attn._rotate(x, offset)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str, ple_index: int | None, dense: bool = False):
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = qwen3_5.GatedDeltaNet(args)
            self.linear_attn.norm = qwen3_5.GatedRMSNorm(args.linear_value_head_dim, args.rms_norm_eps,
                                                         args.output_gate_type or args.hidden_act)
        else:
            self.self_attn = qwen3_5.GatedAttention(args) if dense else IndexedAttention(args)
        self.mlp = qwen3_5_moe.SparseMoeBlock(args)
        if ple_index is not None:
            self.ple = PLE(args, ple_index)
        self.attn_hyper_connection = HyperConnection(args)
        self.mlp_hyper_connection = HyperConnection(args)

    def __call__(self, h: mx.array, tokens: mx.array, mask=None, cache=None) -> mx.array:
        ple_state = None
        if "ple" in self:
            extra, ple_state = self.ple(h, tokens, cache.extra if cache is not None else ())
            h = h + extra
        x, weights = self.attn_hyper_connection(h)
        if self.is_linear:
            out, conv, state = self.linear_attn.mix(x, cache)
            if cache is not None:
                cache.update(conv, state, x.shape[1], extra=ple_state)
        elif isinstance(cache, BatchKVCache):  # each sequence's indexer picks its own keys
            out = mx.concatenate([self.self_attn(x[b : b + 1], None, c) for b, c in enumerate(cache.caches)])
        else:
            out = self.self_attn(x, mask, cache)
        h = inject(h, out, weights)
        x, weights = self.mlp_hyper_connection(h)
        return inject(h, self.mlp(x), weights)


class TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hc = args.hc_count
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        ple = {i - 1: n for n, i in enumerate(args.ple_layer_ids)}
        self.layers = [DecoderLayer(args, t, ple.get(i)) for i, t in enumerate(args.layer_types)]
        self.hyper_connection_mixer = HyperConnection(args, combine=False)

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """The final hidden states [B, L, hidden] (the streams mixed)."""
        return self.hyper_connection_mixer(self.streams(inputs, cache))

    def streams(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """The residual streams [B, L, hc * hidden] after the last layer."""
        h = mx.tile(self.embed_tokens(inputs), (1, 1, self.hc))  # every stream starts as the embedding
        cache = cache if cache is not None else [None] * len(self.layers)
        first = next((c for layer, c in zip(self.layers, cache) if not layer.is_linear), None)
        if isinstance(first, BatchKVCache):
            # Batch views (the server's decode step): one batch through the products and experts, the attention
            # row by row (the layers see to it). A step of several tokens, or a sequence without n-gram state
            # yet, runs each sequence alone.
            fresh = any(not c.extra for layer, view in zip(self.layers, cache) if "ple" in layer
                        for c in view.caches)
            if inputs.shape[1] > 1 or fresh:
                rows = [[view.caches[b] for view in cache] for b in range(inputs.shape[0])]
                return mx.concatenate([self.streams(inputs[b : b + 1], r) for b, r in enumerate(rows)], axis=0)
            first = None
        mask = attention_mask(h.shape[1], first)
        for layer, c in zip(self.layers, cache):
            h = layer(h, inputs, mask, c)
        return h


class MtpHead(MtpDrafter):
    """qwen4_exp's multi-token-prediction head, the layout llama.cpp's converter reads (transformers 5.24 skips
    `mtp.*` and defines none):

        mtp.pre_fc_norm_embedding.weight [H]      zero-centred RMSNorm of the next token's embedding
        mtp.pre_fc_norm_hidden.weight [hc * H]    zero-centred RMSNorm of each of the target's streams
        mtp.fc_embedding.weight, mtp.fc_hidden.weight [H, H]
                                                  stream s starts as fc_embedding(e) + fc_hidden(h_s)
        mtp.layers.0.*                            one block like the target's attention layers, attending
                                                  densely (its indexer's tensors are not read)
        mtp.hyper_connection_mixer.*              its own final mixer, then the target's lm_head

    The hidden state it pairs with the next token is the target's streams before the final mixer, and drafting
    further feeds it its own block's streams."""

    unused = ("layers.0.self_attn.indexer.",)

    def __init__(self, target: nn.Module, layer: nn.Module):
        nn.Module.__init__(self)
        args = target.args
        H, hc, eps = args.hidden_size, args.hc_count, args.rms_norm_eps
        self.pre_fc_norm_embedding = qwen3_5.ZeroCenteredRMSNorm(H, eps=eps)
        self.pre_fc_norm_hidden = GroupRMSNorm(hc * H, H, eps)
        self.fc_embedding = Linear(H, H, bias=False)
        self.fc_hidden = Linear(H, H, bias=False)
        self.layers = [layer]
        self.hyper_connection_mixer = HyperConnection(args, combine=False)
        object.__setattr__(self, "target", target)
        self.args = args

    def __call__(self, tokens: mx.array, hidden: mx.array, cache=None) -> mx.array:
        """The head's streams [B, L, hc * H] for the pairs (tokens [B, L], the target's streams [B, L, hc * H])."""
        B, L, _ = hidden.shape
        e = self.fc_embedding(self.pre_fc_norm_embedding(self.target.model.embed_tokens(tokens)))
        h = self.fc_hidden(self.pre_fc_norm_hidden(hidden).reshape(B, L, self.args.hc_count, -1)) + e[:, :, None]
        return self.layers[0](h.reshape(B, L, -1), tokens, attention_mask(L, cache), cache)

    def logits(self, h: mx.array) -> mx.array:
        return self.target.logits(self.hyper_connection_mixer(h))


_TABLE = re.compile(r"layers\.(\d+)\.ple\.ple_embedding\.ngram_embedding\.(?:shard_(\d+)\.)?weight$")
_PLUS_ONE = ("hc_norm.weight", "q_layernorm.weight", "k_layernorm.weight", "norm_key.weight", "norm_query.weight",
             "norm_conv.weight")


class Model(qwen3_5_moe.Model):
    def __init__(self, args: ModelArgs):
        qwen3_5.Model.__init__(self, args, TextModel(args))

    def make_cache(self) -> list:
        """A RecurrentCache per DeltaNet layer (the PLE's state too, as `extra`), an IndexedKVCache per attention
        layer (keys, values and the indexer's keys)."""
        return [RecurrentCache() if layer.is_linear else IndexedKVCache() for layer in self.layers]

    mtp_drafter_class = MtpHead

    def mtp_layer(self) -> nn.Module:
        return DecoderLayer(self.args, "full_attention", None, dense=True)

    def hidden_states(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """The streams [B, L, hc * hidden] before the final mixer: what the MTP head pairs with the next token
        (`logits` mixes them first)."""
        return self.model.streams(inputs, cache)

    def logits(self, h: mx.array) -> mx.array:
        """The LM head over final hidden states [.., hidden], or over streams [.., hc * hidden] (`hidden_states`),
        mixed first: hc >= 2, so the widths differ."""
        if h.shape[-1] != self.args.hidden_size:
            h = self.model.hyper_connection_mixer(h)
        return super().logits(h)

    def rows_on_disk(self, weights: dict[str, mx.array], infos: dict, dtype: mx.Dtype) -> dict[str, mx.array]:
        """Leave the n-gram tables in their files (read by row: `DiskRows`): their tensors taken out of
        `weights` (returned without them), the tables' parameters out of the model. `infos`: the checkpoint's
        `safetensors_io.scan`."""
        parts: dict[int, dict[int, object]] = {}
        for key in [k for k in weights if _TABLE.search(k)]:
            m = _TABLE.search(key)
            if key not in infos or f"{key[: -len('.weight')]}.scales" in weights:
                return weights  # not a plain float tensor in a file (a quantized export): loaded as usual
            parts.setdefault(int(m[1]), {})[int(m[2] or 0)] = infos[key]
        out = {k: v for k, v in weights.items() if not _TABLE.search(k)}
        for i, found in parts.items():
            emb = self.layers[i].ple.ple_embedding
            table = DiskRows([found[j] for j in sorted(found)], dtype)
            if table.shape != tuple(emb.ngram_embedding.weight.shape):
                raise ModelLoadError(f"layer {i}'s n-gram table is {table.shape}, expected "
                                     f"{tuple(emb.ngram_embedding.weight.shape)} from config.json")
            emb.disk = table
            del emb.ngram_embedding
        return out

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """As qwen3_5_moe's, plus: the n-gram tables' `shard_*` parts joined in order, and the 1 of this model's
        other zero-centred norms (streams, PLE, indexer) folded in for HF checkpoints."""
        hf = any(k.endswith("conv1d.weight") and w.shape[-1] != 1 for k, w in weights.items())
        shards: dict[str, dict[int, mx.array]] = {}
        out = {}
        for key, w in weights.items():
            head, sep, tail = key.partition(".ngram_embedding.shard_")
            if sep:
                index, _, rest = tail.partition(".")
                shards.setdefault(f"{head}.ngram_embedding.{rest}", {})[int(index)] = w
            elif hf and key.endswith(_PLUS_ONE):
                out[key] = w + 1.0
            else:
                out[key] = w
        for key, parts in shards.items():
            if sorted(parts) != list(range(len(parts))):
                raise ModelLoadError(f"{key}: n-gram table shards {sorted(parts)} are not 0..{len(parts) - 1}")
            out[key] = mx.concatenate([parts[i] for i in range(len(parts))], axis=0)
        return super().sanitize(out)
