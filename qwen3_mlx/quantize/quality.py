"""Quality report of an export: next-token KL divergence and top-1 agreement against the source model.

Both models run layer by layer in float32, each layer's weights read from disk just before it runs and
dropped after, so the report needs about one layer of each model in memory (plus a row block of lm_head; for
the hybrids, whose tensors come through the model's `sanitize`, the whole head in its own dtype).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..loader import apply_quantization, load_config, load_weights, resolve_model_path, weight_files
from ..models import build_model
from ..models.base import attention_mask
from .safetensors_io import Reader, TensorInfo, scan

# A fixed, varied English text (prose, numbers, code) so reports are comparable between runs.
DEFAULT_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at seven, counting all 214 steps "
    "as his father had done before him. From the lamp room he could see the harbour, the fishing boats "
    "returning with their catch, and the narrow road that wound up the cliff toward the village. "
    "In Python, a list comprehension such as [x * x for x in range(10) if x % 2 == 0] builds a new list "
    "from an iterable. The mitochondria convert nutrients into adenosine triphosphate, the energy currency "
    "of the cell, while ribosomes translate messenger RNA into proteins."
)
_EXPERT = re.compile(r"^(.*\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_ROW_BLOCK = 8192


@dataclass
class QualityReport:
    tokens: int
    kl_mean: float  # mean over positions of KL(source || quantized), nats
    kl_max: float
    top1_agreement: float  # fraction of positions where both models pick the same next token

    def __str__(self) -> str:
        return (
            f"KL(source || quantized) mean {self.kl_mean:.4g} nats (max {self.kl_max:.4g}), "
            f"top-1 agreement {100 * self.top1_agreement:.1f}% over {self.tokens} tokens"
        )


def kl_and_top1(ref_logits: np.ndarray, q_logits: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-position KL(ref || q) from logits [T, V], and the top-1 agreement fraction."""
    p = ref_logits - ref_logits.max(-1, keepdims=True)
    q = q_logits - q_logits.max(-1, keepdims=True)
    logp = p - np.log(np.exp(p).sum(-1, keepdims=True))
    logq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    kl = (np.exp(logp) * (logp - logq)).sum(-1)
    top1 = float((ref_logits.argmax(-1) == q_logits.argmax(-1)).mean())
    return kl, top1


def report_tokens(out: Path, vocab: int, text: str, max_tokens: int) -> list[int]:
    """The text's token ids when the export has a tokenizer covering them, else fixed pseudo-random ids."""
    if (out / "tokenizer.json").is_file():
        from ..tokenizer import Tokenizer

        ids = Tokenizer(out).encode(text)[:max_tokens]
        if ids and max(ids) < vocab:
            return ids
    return np.random.default_rng(0).integers(0, vocab, size=max_tokens).tolist()


class _Weights:
    """Named tensors of a folder, read on demand (float tensors as float32)."""

    def __init__(self, folder: Path, reader: Reader):
        self.infos: dict[str, TensorInfo] = scan(weight_files(folder))
        self.reader = reader

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self):
        return self.infos.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def get(self, name: str, r0: int = 0, r1: int | None = None) -> mx.array:
        if name not in self.infos and (m := _EXPERT.match(name)):
            # HF stores experts one by one; stack them like the model's sanitize does.
            e, experts = 0, []
            while (key := f"{m.group(1)}.experts.{e}.{m.group(2)}.weight") in self.infos:
                experts.append(self.get(key))
                e += 1
            return mx.stack(experts)
        a = self.reader.rows(self.infos[name], r0, r1)
        return a if a.dtype == mx.uint32 else a.astype(mx.float32)


class _SanitizedWeights:
    """A folder's tensors as `model.sanitize` names and shapes them (the hybrids: renames, conv transposes,
    folded norms, stacked experts), lazily. A layer's tensors leave the dict when read, so their memory goes
    with the layer; the embedding and head (read twice when tied) stay once read."""

    def __init__(self, folder: Path, model):
        lazy = load_weights(folder)
        if hasattr(model, "rows_on_disk"):  # qwen4_exp's n-gram tables stay in their files, as when loaded
            lazy = model.rows_on_disk(lazy, scan(weight_files(folder)), mx.float32)
        self.lazy = model.sanitize(lazy)
        self.shapes = {k: tuple(v.shape) for k, v in self.lazy.items()}
        self._last: tuple[str, mx.array] | None = None  # the tensor read by rows (embedding, head)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def names(self):
        return self.shapes.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get(self, name: str, r0: int = 0, r1: int | None = None) -> mx.array:
        if self._last is None or self._last[0] != name:
            self._last = None  # let the previous tensor go before the next one is read
            keep = name.startswith(("model.embed_tokens.", "lm_head."))
            a = self.lazy[name] if keep else self.lazy.pop(name)
            mx.eval(a)
            self._last = (name, a)
        a = self._last[1][r0:r1]
        return a if mx.issubdtype(a.dtype, mx.integer) else a.astype(mx.float32)


def _load(module, prefix: str, weights: _Weights) -> None:
    names = [k for k, _ in tree_flatten(module.parameters())]
    module.load_weights([(k, weights.get(f"{prefix}{k}")) for k in names], strict=True)
    mx.eval(module.parameters())


def _drop(module) -> None:
    module.update(tree_map(lambda _: mx.zeros((0,)), module.parameters()))


def _head_logits(h: mx.array, weights: _Weights, head: str, module) -> mx.array:
    """h [1, T, D] @ head^T a row block at a time: the float head can be GBs, and MLX's CPU quantized
    matmul dequantizes the whole weight (1.2 GB for Qwen3's vocabulary at hidden 2048)."""
    rows = weights.shape(f"{head}.weight")[0]
    quantized = f"{head}.scales" in weights
    blocks = []
    for r0 in range(0, rows, _ROW_BLOCK):
        r1 = min(rows, r0 + _ROW_BLOCK)
        w = weights.get(f"{head}.weight", r0, r1)
        if quantized:
            s, b = weights.get(f"{head}.scales", r0, r1), weights.get(f"{head}.biases", r0, r1)
            y = mx.quantized_matmul(h, w, s, b, transpose=True, group_size=module.group_size, bits=module.bits)
        else:
            y = h @ w.T
        mx.eval(y)
        blocks.append(y)
    return mx.concatenate(blocks, axis=-1)


def quality_report(
    src: str | os.PathLike, out: str | os.PathLike, text: str = DEFAULT_TEXT, max_tokens: int = 96
) -> QualityReport:
    """Compare the export at `out` with its source `src` on `text` (next-token distributions)."""
    src, out = resolve_model_path(src), Path(out)
    src_cfg, out_cfg = load_config(src), load_config(out)
    ref, q = build_model(src_cfg), build_model(out_cfg)
    quantization = out_cfg.get("quantization") or {}
    # Dropped layers must not stay in MLX's buffer cache, or resident memory grows to the whole model.
    old_limit = mx.set_cache_limit(256 << 20)
    try:
        with Reader() as reader:
            if src_cfg.get("model_type") in ("qwen3", "qwen3_moe"):
                sw, qw = _Weights(src, reader), _Weights(out, reader)
            else:  # the hybrids' checkpoints differ from their modules by more than names
                sw, qw = _SanitizedWeights(src, ref), _SanitizedWeights(out, q)
            return _report(out, ref, q, sw, qw, quantization, text, max_tokens)
    finally:
        mx.set_cache_limit(old_limit)
        mx.clear_cache()


def _report(out, ref, q, sw, qw, quantization, text, max_tokens) -> QualityReport:
    out_cfg = load_config(out)
    if quantization:
        apply_quantization(q, quantization, dict.fromkeys(qw.names()))
    vocab = (out_cfg.get("text_config") or out_cfg)["vocab_size"]
    ids = report_tokens(out, vocab, text, max_tokens)
    tokens = mx.array(ids)[None]

    h_ref = mx.concatenate([sw.get("model.embed_tokens.weight", i, i + 1) for i in ids])[None]
    _load(q.model.embed_tokens, "model.embed_tokens.", qw)
    h_q = q.model.embed_tokens(tokens)
    streams = getattr(q.model, "hc", 1)  # qwen4_exp: every residual stream starts as the embedding
    h_ref, h_q = (mx.tile(h, (1, 1, streams)) for h in (h_ref, h_q))
    mx.eval(h_ref, h_q)
    _drop(q.model.embed_tokens)
    mask = attention_mask(len(ids))
    for i, (lr, lq) in enumerate(zip(ref.layers, q.layers)):
        prefix = f"model.layers.{i}."
        _load(lr, prefix, sw)
        _load(lq, prefix, qw)
        if streams > 1:  # its layers also read the token ids (the n-gram embeddings)
            h_ref, h_q = lr(h_ref, tokens, mask), lq(h_q, tokens, mask)
        else:
            h_ref, h_q = lr(h_ref, mask), lq(h_q, mask)
        mx.eval(h_ref, h_q)
        _drop(lr)
        _drop(lq)
    final = "norm" if "norm" in q.model else "hyper_connection_mixer"  # qwen4_exp mixes the streams instead
    _load(ref.model[final], f"model.{final}.", sw)
    _load(q.model[final], f"model.{final}.", qw)
    h_ref, h_q = ref.model[final](h_ref), q.model[final](h_q)

    head = "model.embed_tokens" if ref.args.tie_word_embeddings else "lm_head"
    ref_logits = _head_logits(h_ref, sw, head, None)
    q_head = q.model.embed_tokens if q.args.tie_word_embeddings else q.lm_head
    q_logits = _head_logits(h_q, qw, head, q_head)
    kl, top1 = kl_and_top1(np.array(ref_logits[0]), np.array(q_logits[0].astype(mx.float32)))
    return QualityReport(len(ids), float(kl.mean()), float(kl.max()), top1)
