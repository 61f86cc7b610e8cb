"""`qwen3-mlx fit`: memory and decode-speed bound of the Qwen3 models per precision and device."""

from __future__ import annotations

from typing import Optional

import typer

from .app import app, fail, out

PRECISIONS = (16, 8, 6, 4, 3)


def fit_table(models: list[str], devices: list[str], context: int, bits: list[int], group_size: int = 64,
              kv_bits: int | None = None) -> str:
    """Markdown table: one row per (model, precision); memory parts in GB, fits and decode tok/s per device."""
    from ..fit import DEVICES, GB, model_label, predict

    kv_label = f"KV@{context}" + (f" ({kv_bits}-bit)" if kv_bits else "")
    head = ["model", "precision", "weights GB", f"{kv_label} GB", "overhead GB", "total GB"]
    head += [f"{DEVICES[d].key} fit / tok/s" for d in devices]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        for b in bits:
            f = predict(m, b, group_size, context, kv_bits=kv_bits)
            prec = "bf16" if b == 16 else f"{b}-bit g{group_size}"
            cells = [model_label(m), prec, f"{f.weight_bytes / GB:.2f}", f"{f.kv_bytes / GB:.2f}",
                     f"{f.overhead / GB:.2f}", f"{f.total / GB:.2f}"]
            for d in devices:
                ok = f.fits(d)
                cells.append(f"{'yes' if ok else 'no'} / {f.tokens_per_s(d):.0f}" if ok else "no")
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


@app.command()
def fit(
    model: Optional[str] = typer.Argument(None, help="Registry model, e.g. qwen3-8b or Qwen/Qwen3-8B."),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="One device (default: all)."),
    context: int = typer.Option(4096, "--context", "-c", help="Context length (tokens) for the KV cache."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help="One precision (16 = bf16); default 16, 8, 6, 4, 3."),
    group_size: int = typer.Option(
        64, "--group-size", "-g", help="Quantization group size (32, 64 or 128): one scale and bias per group."
    ),
    all_models: bool = typer.Option(False, "--all", help="All eight Qwen3 models."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="A quantized KV cache (4 or 8 bits, groups of 64)."),
):
    """Predicted memory (weights, KV cache, overhead) per precision, fit per device, decode tok/s bound."""
    from ..fit import DEVICES, get_device
    from ..models.registry import SHAPES, shape_config

    if all_models:
        models = list(SHAPES)
    elif model:
        shape_config(model)  # unknown name: one clear error
        models = [model.lower().split("/")[-1]]
    else:
        fail("name a model (e.g. qwen3-8b) or pass --all")
    devices = [get_device(device).key] if device else list(DEVICES)
    precisions = [bits] if bits else list(PRECISIONS)
    if kv_bits not in (None, 4, 8):
        fail(f"--kv-bits must be 4 or 8, got {kv_bits}")
    out.print(fit_table(models, devices, context, precisions, group_size, kv_bits))
    out.print(
        "\noverhead = activations of a 512-token prefill chunk + 0.4 GB runtime; tok/s = bandwidth / bytes read "
        "per token (active weights + KV cache), an upper bound.\n"
        + "; ".join(f"{d.key}: {d.usable_gb:g} of {d.memory_gb:g} GB usable, {d.bandwidth_gbs:g} GB/s"
                    for d in (DEVICES[k] for k in devices))
    )
