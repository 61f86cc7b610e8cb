"""Random-weight transformers checkpoints at real Qwen3 shapes, for the llama.cpp peer benchmark.

Writes, under --out (default /tmp/peer-ckpt):
  qwen3-0.6b/       Qwen3ForCausalLM, the config of Qwen/Qwen3-0.6B
  moe-12l-64e-a8/   Qwen3MoeForCausalLM, the Qwen3-30B-A3B shape cut to 12 layers and 64 experts (8 active)
  tiny-28l-h64/     Qwen3-0.6B's vocabulary and 28 layers at hidden size 64: the per-token overhead
  qwen3.5-0.8b/, qwen3.5-4b/   Qwen3_5ForCausalLM (text only) at the Qwen3.5 shapes (`--only` them; 4B is 8.4 GB)
each as bf16 safetensors (`save_pretrained`) plus the real Qwen3 tokenizer files, which is what
`../shared/peers/llama-bench.sh` converts to GGUF. Weights are N(0, 0.02) (norms at 1), so the models
are not degenerate but mean nothing: use them for speed figures only.

    python benchmarks/make_peer_checkpoints.py [--out DIR] [--only NAME ...] [--seed N] [--force]

A folder that already holds a complete checkpoint is skipped (unless --force).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from qwen3_mlx.models.registry import shape_config

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO.parent / "shared" / "fixtures" / "qwen3-tokenizer"  # ../shared/fixtures/qwen3-tokenizer

CHECKPOINTS = {
    "qwen3-0.6b": lambda: shape_config("qwen3-0.6b"),
    "moe-12l-64e-a8": lambda: shape_config(
        "qwen3-30b-a3b", num_hidden_layers=12, num_experts=64, num_experts_per_tok=8
    ),
    # per-token overhead: the 0.6B's vocabulary and 28 layers with almost no weights, so a decode step is
    # graph building, scheduling and thread wake-ups
    "tiny-28l-h64": lambda: shape_config(
        "qwen3-0.6b", hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16
    ),
    "qwen3.5-0.8b": lambda: shape_config("qwen3.5-0.8b"),
    "qwen3.5-4b": lambda: shape_config("qwen3.5-4b"),
}
DEFAULT = ("qwen3-0.6b", "moe-12l-64e-a8", "tiny-28l-h64")


def hf_config(cfg: dict):
    """A transformers config from a registry config.json dict."""
    from transformers import AutoConfig

    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    # Qwen/Qwen3-* special tokens (<|endoftext|>, <|im_end|>), as in their config.json
    cfg.setdefault("bos_token_id", 151643)
    cfg.setdefault("eos_token_id", 151645)
    return AutoConfig.for_model(model_type, **cfg)


def fix_config_json(path: Path, cfg: dict) -> None:
    """Write rope_theta at top level too, as the Qwen/Qwen3-* config.json files do.

    transformers 5 saves it only inside `rope_parameters`, which llama.cpp's converter may not read.
    """
    data = json.loads(path.read_text())
    data.setdefault("rope_theta", cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    data.setdefault("torch_dtype", data.get("dtype", "bfloat16"))
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_complete(folder: Path) -> bool:
    """config.json, the tokenizer files and every safetensors shard are there."""
    if not (folder / "config.json").is_file():
        return False
    if any(not (folder / f.name).is_file() for f in TOKENIZER_DIR.iterdir() if f.is_file()):
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return all((folder / s).is_file() for s in shards)
    return (folder / "model.safetensors").is_file()


def build(name: str, folder: Path, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = CHECKPOINTS[name]()
    config = hf_config(cfg)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with no_init_weights():  # we initialise below; skip transformers' own pass over billions of weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.tie_weights()  # no_init_weights also skips the tying of lm_head to embed_tokens (tie_word_embeddings)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2:  # embeddings, projections, stacked experts, router
                p.normal_(0.0, 0.02)
            elif "norm" in pname:
                p.fill_(1.0)
            else:
                p.zero_()
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {type(model).__name__}, {n / 1e9:.3f}B parameters, init {time.perf_counter() - t0:.0f}s",
          flush=True)

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    model.save_pretrained(tmp, max_shard_size="2GB")
    del model
    fix_config_json(tmp / "config.json", cfg)
    for f in TOKENIZER_DIR.iterdir():
        if f.is_file():
            shutil.copyfile(f, tmp / f.name)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    print(f"{name}: saved to {folder} in {time.perf_counter() - t0:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/peer-ckpt"), help="output folder (default %(default)s)")
    ap.add_argument("--only", nargs="+", choices=list(CHECKPOINTS),
                    help=f"build these checkpoints (default: {', '.join(DEFAULT)})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete checkpoint is there")
    args = ap.parse_args(argv)

    if not TOKENIZER_DIR.is_dir() or not (TOKENIZER_DIR / "tokenizer.json").is_file():
        print(f"error: Qwen3 tokenizer folder not found: {TOKENIZER_DIR}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or DEFAULT:
        folder = args.out / name
        if not args.force and is_complete(folder):
            print(f"{name}: {folder} is complete, skipped")
            continue
        build(name, folder, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
