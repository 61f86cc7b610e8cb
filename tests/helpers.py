"""Tiny Qwen3 checkpoints written by transformers itself: the independent reference for every test."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen3-tokenizer"
REAL_VOCAB = 151936  # Qwen3 configs pad the 151,669-token vocabulary to this


def dense_config(**overrides) -> dict:
    cfg = dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return cfg


def moe_config(**overrides) -> dict:
    cfg = dense_config(
        num_hidden_layers=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
    )
    cfg.update(overrides)
    return cfg


def save_checkpoint(
    path: Path,
    config: dict,
    moe: bool = False,
    seed: int = 0,
    max_shard_size: str | None = None,
    torch_dtype: str = "float32",
    tokenizer: bool = False,
):
    """Random-weight Qwen3 / Qwen3-MoE saved with `save_pretrained`; returns the torch model (float32, eval)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg_cls, model_cls = (Qwen3MoeConfig, Qwen3MoeForCausalLM) if moe else (Qwen3Config, Qwen3ForCausalLM)
    hf_config = cfg_cls(**config)
    model = model_cls(hf_config).eval()
    # Default init is tiny (std 0.02): widen it so logits differ meaningfully between tokens.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(getattr(torch, torch_dtype)).save_pretrained(path, **kwargs)
    if tokenizer:
        copy_tokenizer(path)
    return model.float()


def copy_tokenizer(path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, Path(path) / name)


def reference_logits(torch_model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch_model(torch.tensor(ids)).logits.float().numpy()
