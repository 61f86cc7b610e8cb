"""Qwen3-Next (HF `model_type` "qwen3_next", e.g. Qwen3-Next-80B-A3B): the Qwen3.5 hybrid with the DeltaNet's
projections fused (`in_proj_qkvz`, `in_proj_ba`, grouped per key head) and MoE layers per `decoder_sparse_step`
/ `mlp_only_layers` (the others a dense MLP of `intermediate_size`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from . import qwen3_5, qwen3_5_moe
from .layers import Linear
from .qwen3 import MLP


@dataclass
class ModelArgs(qwen3_5_moe.ModelArgs):
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, params):
        return qwen3_5.ModelArgs.from_dict.__func__(cls, params)

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and self.num_experts > 0 and (layer + 1) % self.decoder_sparse_step == 0


class FusedGatedDeltaNet(qwen3_5.GatedDeltaNet):
    """Projections fused per key head: qkvz [.., nk, 2 Dk + 2 (Hv / nk) Dv], ba [.., nk, 2 Hv / nk]."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        del self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a
        D, r = args.hidden_size, self.n_v // self.n_k
        self.in_proj_qkvz = Linear(D, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = Linear(D, 2 * self.n_v, bias=False)
        self.group = r

    def _project(self, x: mx.array):
        B, L, _ = x.shape
        r, dk, dv = self.group, self.dk, self.dv
        qkvz = self.in_proj_qkvz(x).reshape(B, L, self.n_k, -1)
        q, k, v, z = mx.split(qkvz, [dk, 2 * dk, 2 * dk + r * dv], axis=-1)
        b, a = mx.split(self.in_proj_ba(x).reshape(B, L, self.n_k, 2 * r), 2, axis=-1)
        mixed = mx.concatenate([q.reshape(B, L, -1), k.reshape(B, L, -1), v.reshape(B, L, -1)], axis=-1)
        return mixed, z.reshape(B, L, self.n_v, dv), b.reshape(B, L, self.n_v), a.reshape(B, L, self.n_v)


class Model(qwen3_5_moe.Model):
    def __init__(self, args: ModelArgs):
        layers = [
            qwen3_5.DecoderLayer(
                args, t,
                qwen3_5_moe.SparseMoeBlock(args) if args.is_sparse(i) else MLP(args.hidden_size, args.intermediate_size),
                linear=FusedGatedDeltaNet,
            )
            for i, t in enumerate(args.layer_types)
        ]
        qwen3_5.Model.__init__(self, args, qwen3_5.TextModel(args, layers))
