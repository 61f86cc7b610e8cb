"""Qwen3 mixture-of-experts decoder (HF `model_type` "qwen3_moe"): Qwen3 attention, routed SwiGLU experts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelLoadError
from .. import kernels
from . import qwen3
from .layers import Linear
from .switch import SwitchGLU


@dataclass
class ModelArgs(qwen3.ModelArgs):
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool = False

    def is_sparse(self, layer: int) -> bool:
        """HF's rule for which layers are MoE; the others use a dense MLP of `intermediate_size`."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)

    def __call__(self, x: mx.array) -> mx.array:
        inds, scores = kernels.route(self.gate(x), self.top_k, self.norm_topk_prob)  # [B, L, k] each
        y = self.switch_mlp(x, inds)  # [B, L, k, D]
        return (y * scores[..., None].astype(y.dtype)).sum(axis=-2)


class Model(qwen3.Model):
    def __init__(self, args: ModelArgs):
        layers = [
            qwen3.DecoderLayer(
                args,
                SparseMoeBlock(args) if args.is_sparse(i) else qwen3.MLP(args.hidden_size, args.intermediate_size),
            )
            for i in range(args.num_hidden_layers)
        ]
        super().__init__(args, qwen3.Qwen3Model(args, layers))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Stack HF's per-expert tensors `mlp.experts.{e}.{proj}.*` into `mlp.switch_mlp.{proj}.*` [E, ...]."""
        return stack_experts(super().sanitize(weights), self.args.num_experts)


_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")


def stack_experts(weights: dict[str, mx.array], n: int) -> dict[str, mx.array]:
    """`{prefix}.experts.{e}.{proj}.{kind}` for e < n -> `{prefix}.switch_mlp.{proj}.{kind}` [n, ...], in place."""
    groups: dict[tuple[str, str, str], dict[int, str]] = {}
    for key in weights:
        m = _PER_EXPERT.match(key)
        if m:
            prefix, e, proj, kind = m.groups()
            groups.setdefault((prefix, proj, kind), {})[int(e)] = key
    for (prefix, proj, kind), by_expert in groups.items():
        missing = [e for e in range(n) if e not in by_expert]
        if missing:
            raise ModelLoadError(f"missing tensor {prefix}.experts.{missing[0]}.{proj}.{kind} in the checkpoint")
        extra = [e for e in by_expert if e >= n]
        if extra:
            raise ModelLoadError(f"unexpected tensor {by_expert[extra[0]]} (num_experts is {n})")
        shapes = [tuple(weights[by_expert[e]].shape) for e in range(n)]
        if odd := [e for e in range(n) if shapes[e] != shapes[0]]:  # mx.stack would raise a bare ValueError
            raise ModelLoadError(f"the experts' {prefix}.experts.*.{proj}.{kind} differ in shape: expert 0 "
                                 f"{shapes[0]}, expert {odd[0]} {shapes[odd[0]]}")
        weights[f"{prefix}.switch_mlp.{proj}.{kind}"] = mx.stack([weights.pop(by_expert[e]) for e in range(n)])
    return weights
