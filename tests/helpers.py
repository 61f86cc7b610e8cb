"""Tiny Qwen3 checkpoints written by transformers itself: the independent reference for every test."""

from __future__ import annotations

import json
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


THINK, END_THINK, IM_END = 151667, 151668, 151645


def save_thinker(path: Path) -> Path:
    """A checkpoint that always thinks "Let", then answers "ok": a bigram model written as transformers weights.

    With every attention and MLP output projection zeroed the residual stream is the current token's embedding,
    so the next token depends on the current one only. Embeddings are one-hot "states" (RMSNorm makes them 8x
    one-hot), and lm_head row t points at the state whose successor is t:
    "\n" (end of the prompt) -> <think> -> "Let" -> </think> -> "ok" -> <|im_end|>, anything else -> <|im_end|>.
    """
    import torch

    from qwen3_mlx.tokenizer import Tokenizer

    tok = Tokenizer(TOKENIZER_DIR)
    (newline,), (let,), (ok,) = tok.encode("\n"), tok.encode("Let"), tok.encode("ok")
    model = save_checkpoint(path, dense_config(vocab_size=REAL_VOCAB), tokenizer=True)
    chain = [newline, THINK, let, END_THINK, ok]  # state i + 1 belongs to chain[i]; state 0 to every other token
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        embed[:, 0] = 1.0
        head.zero_()
        for state, token in enumerate(chain, start=1):
            embed[token] = 0.0
            embed[token, state] = 1.0
        for state, successor in enumerate(chain[1:] + [IM_END], start=1):
            head[successor, state] = 10.0
        head[IM_END, 0] = 10.0
    model.save_pretrained(path)
    return path


def text_config(**overrides):
    cfg = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
               linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
               max_position_embeddings=4096, tie_word_embeddings=False)
    cfg.update(overrides)
    return cfg


MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)


def save_hybrid(path, seed=0, tokenizer=False, moe=False, next_=False, **overrides):
    """A random Qwen3_5ForCausalLM (Qwen3_5MoeForCausalLM with `moe`, Qwen3NextForCausalLM with `next_`: fused
    DeltaNet projections, layer 1 a dense MLP) written by transformers; weights widened so the layers matter."""
    import torch
    from transformers import (Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, Qwen3_5TextConfig,
                              Qwen3NextConfig, Qwen3NextForCausalLM)

    torch.manual_seed(seed)
    if next_:
        cfg = text_config(**{**MOE, "intermediate_size": 96, "mlp_only_layers": [1], **overrides})
        model = Qwen3NextForCausalLM(Qwen3NextConfig(**cfg)).eval()
    elif moe:
        model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**text_config(**{**MOE, **overrides}))).eval()
    else:
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text_config(**overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # zero-centred norms around 0, the gated norm's plain weight around 1
                p.copy_(0.1 * torch.randn_like(p) + (1.0 if "linear_attn.norm" in name else 0.0))
            elif "A_log" in name or "dt_bias" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    if tokenizer:
        copy_tokenizer(path)
    return model


def edit_config(folder: Path, fn) -> None:
    """Rewrite `folder`'s config.json through `fn` (which edits the dict in place): a broken export, for checks."""
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
