"""`qwen3-mlx fit`: memory and decode-speed bound of the Qwen3 / Qwen3.5 models per precision and device."""

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
    hybrid = any(predict(m, 4, group_size, context).state_bytes for m in models)
    # qwen4_exp's n-gram tables: read by row from disk (what the loader does), and a row as if resident
    disk = any(predict(m, 4, group_size, context).disk_bytes for m in models)
    head = ["model", "precision", "weights GB", *(["on disk GB"] if disk else []), f"{kv_label} GB",
            *(["state GB"] if hybrid else []), "overhead GB", "total GB"]
    head += [f"{DEVICES[d].key} fit / tok/s" for d in devices]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        for b in bits:
            variants = [False, True] if predict(m, b, group_size, context).disk_bytes else [False]
            for resident in variants:
                f = predict(m, b, group_size, context, kv_bits=kv_bits, tables_resident=resident)
                prec = ("bf16" if b == 16 else f"{b}-bit g{group_size}") + (", tables in RAM" if resident else "")
                cells = [model_label(m), prec, f"{f.weight_bytes / GB:.2f}", *([f"{f.disk_bytes / GB:.2f}"] if disk
                                                                                else []),
                         f"{f.kv_bytes / GB:.2f}", *([f"{f.state_bytes / GB:.2f}"] if hybrid else []),
                         f"{f.overhead / GB:.2f}", f"{f.total / GB:.2f}"]
                for d in devices:
                    ok = f.fits(d)
                    cells.append(f"{'yes' if ok else 'no'} / {f.tokens_per_s(d):.0f}" if ok else "no")
                rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def hosts_table(model: str, hosts: list[str], bits: int, group_size: int, context: int, kv_bits: int | None,
                hop_ms: float) -> str:
    """Markdown table of a pipeline split over `hosts`, then the decode bound with its hop cost."""
    from ..fit import GB, model_label, plan_hosts

    plan = plan_hosts(model, hosts, bits, group_size, context, kv_bits=kv_bits, hop_ms=hop_ms)
    prec = "bf16" if bits == 16 else f"{bits}-bit g{group_size}"
    kv = f"KV@{context}" + (f" ({kv_bits}-bit)" if kv_bits else "")
    rows = [f"{model_label(model)} at {prec} over {len(hosts)} hosts (pipeline, split by memory):", "",
            f"| rank | host | layers | weights GB | {kv} (and states) GB | total GB | usable GB | fits |",
            "|---" * 8 + "|"]
    for r, s in enumerate(plan.shares):
        a, b = s.layers
        extra = " + embedding, head" if r == 0 else ""
        rows.append(f"| {r} | {s.device.key} | {a}-{b - 1} ({b - a}){extra} | {s.weight_bytes / GB:.1f} | "
                    f"{s.kv_bytes / GB:.2f} | {s.total / GB:.1f} | {s.device.usable_gb:g} | "
                    f"{'yes' if s.fits else 'NO'} |")
    compute = plan.token_ms - len(hosts) * hop_ms
    rows += ["", f"decode bound: {plan.tokens_per_s:.1f} tok/s ({compute:.1f} ms reading weights and KV on the hosts "
             f"in turn + {len(hosts)} hops x {hop_ms:g} ms)"]
    if not all(s.fits for s in plan.shares):
        rows.append("does not fit: add a host, use fewer bits, or a shorter context")
    return "\n".join(rows)


@app.command()
def fit(
    model: Optional[str] = typer.Argument(None, help="Registry model, e.g. qwen3-8b, Qwen/Qwen3-8B or qwen3.5-4b."),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="One device (default: all)."),
    context: int = typer.Option(4096, "--context", "-c", help="Context length (tokens) for the KV cache."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help="One precision (16 = bf16); default 16, 8, 6, 4, 3."),
    group_size: int = typer.Option(
        64, "--group-size", "-g", help="Quantization group size (32, 64 or 128): one scale and bias per group."
    ),
    all_models: bool = typer.Option(False, "--all", help="Every registry model (Qwen3, Qwen3.5, Qwen3-Next, Qwen3.8-Flash-Next)."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="A quantized KV cache (4 or 8 bits, groups of 64)."),
    hosts: Optional[str] = typer.Option(
        None, "--hosts", help="Devices in ring order (the first holds embedding and head), comma-separated: the "
        "pipeline split by memory for a run under mlx.launch, e.g. m4-max-128gb,m4-max-128gb,m3-ultra-512gb."
    ),
    hop_ms: float = typer.Option(0.2, "--hop-ms", help="With --hosts: cost of one hop between hosts per token (ms)."),
):
    """Predicted memory (weights, KV cache, overhead) per precision, fit per device, decode tok/s bound.

    Examples: `qwen3-mlx fit qwen3-8b`, `qwen3-mlx fit --all -d iphone-15-pro -b 4`,
    `qwen3-mlx fit qwen3.5-4b -d iphone-16-pro -c 32768`, `qwen3-mlx fit qwen3.8-flash-next -d m3-ultra-512gb`,
    `qwen3-mlx fit qwen3-235b-a22b --bits 8 --hosts m4-max-128gb,m4-max-128gb,m3-ultra-512gb`.
    """
    from ..fit import DEVICES, get_device, predict
    from ..models.registry import SHAPES, shape_config

    if hosts is not None:
        if not model:
            fail("name a model to split over --hosts (e.g. qwen3-235b-a22b)")
        shape_config(model)
        if kv_bits not in (None, 4, 8):
            fail(f"--kv-bits must be 4 or 8, got {kv_bits}")
        out.print(hosts_table(model.lower().split("/")[-1], [get_device(h.strip()).key for h in hosts.split(",")],
                              bits or 4, group_size, context, kv_bits, hop_ms))
        return

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
        + ("state = the linear-attention layers' recurrent states: the live one, the one before the latest step and "
           "a checkpoint per 512-token prefill chunk (at most 16: it stops growing at 8K tokens).\n"
           if any(predict(m, 4, group_size, context).state_bytes for m in models) else "")
        + ("on disk = n-gram tables the loader memory-maps and reads by row (page cache the OS can drop, not in the "
           "total); \"tables in RAM\" counts them resident.\n"
           if any(predict(m, 4, group_size, context).disk_bytes for m in models) else "")
        + "; ".join(f"{d.key}: {d.usable_gb:g} of {d.memory_gb:g} GB usable, {d.bandwidth_gbs:g} GB/s"
                    for d in (DEVICES[k] for k in devices))
    )
