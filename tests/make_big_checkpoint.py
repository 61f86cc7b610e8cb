"""Write a random-weight HF-format bf16 checkpoint of a registry shape, a tensor row block at a time.

For the conversion memory measurement (`qwen3-mlx quantize` vs `mlx_lm.convert` on a >= 4 GB source):
    python tests/make_big_checkpoint.py qwen3-1.7b /tmp/qwen3-1.7b-random --untied
Never commit the output. transformers' save_pretrained would need the whole float32 model in memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen3_mlx.fit import model_tensors  # noqa: E402
from qwen3_mlx.models.registry import shape_config  # noqa: E402
from qwen3_mlx.quantize.safetensors_io import OutTensor, ShardWriter  # noqa: E402

import mlx.core as mx  # noqa: E402

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen3-tokenizer"


def hf_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes (experts one by one)."""
    out = []
    for t in model_tensors(config):
        if ".switch_mlp." in t.path:
            prefix, proj = t.path.split(".switch_mlp.")
            out += [(f"{prefix}.experts.{e}.{proj}.weight", t.shape[1:]) for e in range(t.shape[0])]
        else:
            out.append((f"{t.path}.weight", t.shape))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape")
    ap.add_argument("out")
    ap.add_argument("--untied", action="store_true", help="add a separate lm_head (makes 1.7B > 4 GB)")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    args = ap.parse_args()
    config = shape_config(args.shape, torch_dtype="bfloat16", architectures=["Qwen3ForCausalLM"])
    if args.untied:
        config["tie_word_embeddings"] = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(config)
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        if cur and size + n > args.shard_gb * 1e9:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = ShardWriter(out / fname, [OutTensor(n, mx.bfloat16, tuple(s)) for n, s in shard], {"format": "pt"})
        for name, shape in shard:
            rows = shape[0]
            cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            step = max(1, (16 << 20) // cols)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                if "norm" in name:
                    x = np.ones((r1 - r0) * cols, np.float32)
                else:
                    x = rng.standard_normal((r1 - r0) * cols, dtype=np.float32) * 0.02
                bits = (x.view(np.uint32) >> 16).astype(np.uint16)
                w.write(name, r0 * cols * 2, mx.array(bits))
            weight_map[name] = fname
        w.close()
        print(f"wrote {fname}", flush=True)
    total = sum(int(np.prod(s)) * 2 for _, s in tensors)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_DIR / f, out / f)
    print(f"{out}: {total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
