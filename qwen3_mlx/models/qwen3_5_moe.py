"""Qwen3.5 / Qwen3.6 mixture-of-experts (HF `model_type` "qwen3_5_moe", text part "qwen3_5_moe_text"): the
qwen3_5 hybrid with every MLP a routed SwiGLU block plus a shared expert scaled by sigmoid(shared_expert_gate)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from . import qwen3_5, qwen3_moe
from .layers import Linear
from .qwen3 import MLP


@dataclass
class ModelArgs(qwen3_5.ModelArgs):
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True  # the reference always renormalises the top-k

    @classmethod
    def from_dict(cls, params):
        """As qwen3_5's; every layer is sparse, so a config need not give a dense `intermediate_size`."""
        params = qwen3_5.text_params(params)
        return super().from_dict({"intermediate_size": 0, **params})


class SparseMoeBlock(qwen3_moe.SparseMoeBlock):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(args.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x) + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class Model(qwen3_5.Model):
    def __init__(self, args: ModelArgs):
        layers = [qwen3_5.DecoderLayer(args, t, SparseMoeBlock(args)) for t in args.layer_types]
        super().__init__(args, qwen3_5.TextModel(args, layers))

    def mtp_layer(self):
        return qwen3_5.DecoderLayer(self.args, "full_attention", SparseMoeBlock(self.args))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """As qwen3_5's, then experts to `switch_mlp` stacks: transformers' fused `experts.gate_up_proj`
        [E, 2I, D] (gate rows first) and `experts.down_proj`, or the per-expert tensors of hub checkpoints."""
        weights = super().sanitize(weights)
        for key in [k for k in weights if k.endswith(".mlp.experts.gate_up_proj")]:
            prefix = key[: -len(".experts.gate_up_proj")]
            gate, up = mx.split(weights.pop(key), 2, axis=1)
            weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate
            weights[f"{prefix}.switch_mlp.up_proj.weight"] = up
            weights[f"{prefix}.switch_mlp.down_proj.weight"] = weights.pop(f"{prefix}.experts.down_proj")
        return qwen3_moe.stack_experts(weights, self.args.num_experts)


