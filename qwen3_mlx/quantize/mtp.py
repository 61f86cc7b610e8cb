"""The multi-token-prediction head as a drafter folder of its own, beside an export that leaves it out.

Our exports never put `mtp.*` in the model's shards (mlx-swift-lm adds 1 to every norm of a checkpoint that holds
one). `export_mtp` writes the head alone: `model.safetensors` with the checkpoint's `mtp.*` tensors under their
own names and values (norms zero-centred as Qwen stores them: `models/mtp.load_mtp` reads both folders alike),
matmul weights quantized when `bits` is given, and a `config.json` (the source's, `mtp_drafter: true`, the
`quantization` dict). `qwen3-mlx generate EXPORT --draft-model DRAFTER_FOLDER` runs it against the export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

from ..loader import load_config, resolve_model_path
from ..models.mtp import mtp_tensors
from .recipes import QuantizeError

_FLOAT = (mx.float32, mx.float16, mx.bfloat16)


def export_mtp(src: str | os.PathLike, out: str | os.PathLike, *, bits: int | None = None, group_size: int = 64,
               force: bool = False) -> Path:
    """Write the `mtp.*` head of the checkpoint `src` to the folder `out` (see the module docstring); its
    2-D weights (projections, per-expert matrices; not the norms, not the MoE router) quantized to `bits`."""
    source = resolve_model_path(src)
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise QuantizeError(f"{out} already exists (use --force to replace it)")
    tensors = mtp_tensors(source)
    if not tensors:
        raise QuantizeError(f"{source.name} has no multi-token-prediction head (no mtp.* tensors) to export")
    written: dict[str, mx.array] = {}
    quantized = []
    for name, w in tensors.items():
        if bits and w.ndim == 2 and w.dtype in _FLOAT and name.endswith(".weight") and \
                not name.endswith(".mlp.gate.weight") and w.shape[-1] % group_size == 0:
            q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
            base = name[: -len(".weight")]
            written.update({name: q, f"{base}.scales": scales, f"{base}.biases": biases})
            quantized.append(base)
        else:
            written[name] = w
    config = {**load_config(source), "mtp_drafter": True}
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if bits:
        config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), written, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
