"""Embedding throughput: texts per second for 32 texts of 128 tokens on a Qwen3-Embedding-0.6B-shaped model
(random weights), ours (`qwen3_mlx.embed`) against sentence-transformers on the same folder, interleaved.

    python benchmarks/embeddings.py [--texts 32] [--tokens 128] [--rounds 3] [--folder DIR] [--layers 28]

The folder is written once by transformers (`Qwen3Model.save_pretrained`, float32, Qwen3-Embedding-0.6B's shape:
hidden 1024, 28 layers, 16 heads, 8 kv heads, head_dim 128, intermediate 3072, vocab 151669) with the
sentence-transformers files of Qwen3-Embedding (last-token pooling, Normalize) and the Qwen3 tokenizer with
Qwen3-Embedding's post-processor (appends <|endoftext|>; padding on the left). Both sides load that folder and
embed the same texts in float32, batch 32; torch runs 2 threads. Each text is 127 tokens of words plus the
end token: 128 tokens. Rounds alternate ours / sentence-transformers after one warm-up each; the JSON line
gives every round's seconds, the median texts per second and the largest difference between the two sides'
vectors.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from qwen3_mlx.bench.machine import cpu_info

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen3-tokenizer"
EOS_ID = 151643
SHAPE = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
             intermediate_size=3072, vocab_size=151669, max_position_embeddings=32768, rope_theta=1000000.0,
             rms_norm_eps=1e-6, tie_word_embeddings=True)
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more can what some time "
         "model data energy river city music science history market water light system language network theory "
         "memory garden window mountain ocean paper engine question answer morning evening winter summer").split()


def write_folder(path: Path, layers: int) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    model = Qwen3Model(Qwen3Config(**{**SHAPE, "num_hidden_layers": layers})).eval()  # transformers' own init
    model.to(torch.float32).save_pretrained(path)
    del model
    tok = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    end = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    tok["post_processor"] = {"type": "Sequence", "processors": [tok["post_processor"], {
        "type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}, end],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, end, {"Sequence": {"id": "B", "type_id": 1}}, end],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [EOS_ID], "tokens": ["<|endoftext|>"]}}}]}
    (path / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": SHAPE["hidden_size"], "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True, "include_prompt": True}))
    (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8192, "do_lower_case": False}))


def make_texts(tokenizer, n: int, tokens: int) -> list[str]:
    """n texts of words, each `tokens - 1` tokens long (the end token makes `tokens`)."""
    rng, texts = random.Random(0), []
    while len(texts) < n:
        ids = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(tokens * 2)))[: tokens - 1]
        text = tokenizer.decode(ids)
        if len(tokenizer.encode(text)) == tokens - 1:
            texts.append(text)
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=28, help="fewer for a quick try (the shape is otherwise kept)")
    ap.add_argument("--folder", type=Path, help="where to write (or find) the model; default a temporary folder")
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        if not (folder / "model.safetensors").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            write_folder(folder, args.layers)

        import mlx.core as mx
        from sentence_transformers import SentenceTransformer

        from qwen3_mlx import embed, load

        model, tokenizer = load(folder, dtype=mx.float32)
        st = SentenceTransformer(str(folder), device="cpu", local_files_only=True,
                                 model_kwargs={"dtype": torch.float32})
        texts = make_texts(tokenizer, args.texts, args.tokens)
        ours_fn = lambda: embed(model, tokenizer, texts, batch_size=args.texts)  # noqa: E731
        theirs_fn = lambda: st.encode(texts, batch_size=args.texts, convert_to_numpy=True)  # noqa: E731
        with torch.inference_mode():
            ours, theirs = ours_fn(), theirs_fn()  # warm-up, and the vectors compared
            times = {"ours": [], "sentence_transformers": []}
            for _ in range(args.rounds):
                for name, fn in (("ours", ours_fn), ("sentence_transformers", theirs_fn)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
                    print(name, f"{times[name][-1]:.2f} s", flush=True)
        rate = {k: args.texts / statistics.median(v) for k, v in times.items()}
        print(json.dumps({
            "cpu": cpu_info(), "torch_threads": torch.get_num_threads(), "texts": args.texts, "tokens_per_text": args.tokens,
            "layers": args.layers, "dtype": "float32",
            "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "texts_per_second": {k: round(v, 2) for k, v in rate.items()},
            "ours_vs_sentence_transformers": round(rate["ours"] / rate["sentence_transformers"], 3),
            "max_abs_difference": float(np.abs(ours - theirs).max()),
        }))


if __name__ == "__main__":
    main()
