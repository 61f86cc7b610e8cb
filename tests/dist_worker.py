"""Run under mlx.launch by tests/test_distributed.py: logits of a model spread over the ranks, saved by rank 0.

argv: MODEL OUT.npz PARALLEL [SPLIT]. Covers a prefill without logits (`fill`), a chunk with logits, decode
steps, a trim and refill (chat reuse / speculative rollback), a cache converted to 8-bit, a batch of two
sequences at different lengths (the server), and a forward without a cache.
"""

import sys

import mlx.core as mx
import numpy as np

from qwen3_mlx import distributed
from qwen3_mlx.models.cache import batch_cache, make_cache, quantize_cache, truncate_cache


def logits(model) -> dict[str, np.ndarray]:
    ids = [(7 * i + 3) % 900 + 10 for i in range(40)]
    res = {}
    cache = make_cache(model)
    model.fill(mx.array(ids[:20])[None], cache)
    res["chunk"] = model(mx.array(ids[20:30])[None], cache)
    res["steps"] = mx.concatenate([model(mx.array([[t]]), cache) for t in ids[30:34]], axis=1)
    back = truncate_cache(cache, 25)  # a hybrid's recurrent layers go back to a state checkpoint (20 here)
    res["refill"] = model(mx.array(ids[back:31])[None], cache)
    quantize_cache(cache, bits=8, group_size=32)
    res["quantized"] = model(mx.array(ids[31:35])[None], cache)
    other = make_cache(model)
    model.fill(mx.array(ids[:12])[None], other)
    rows = batch_cache([cache, other])
    res["batch"] = model(mx.array([[ids[35]], [ids[12]]]), rows)
    res["full"] = model(mx.array(ids)[None])
    return {k: np.array(v.astype(mx.float32)) for k, v in res.items()}


if __name__ == "__main__":
    path, out, parallel = sys.argv[1:4]
    split = [int(x) for x in sys.argv[4].split(",")] if len(sys.argv) > 4 else None
    model, _ = distributed.load(path, parallel=parallel, split=split)
    np.savez(out, **logits(model))
