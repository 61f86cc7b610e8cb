"""`qwen3-mlx quantize SRC OUT`: HF weights -> quantized MLX folder (also `--check OUT`, `--fit DEVICE`)."""

from __future__ import annotations

import time
from typing import Optional

import typer

from .app import app, err, fail, out, show_progress


def _progress_bar():
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("quantizing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=err, transient=True,
    )


def _check(folder: str) -> None:
    from rich.markup import escape

    from ..quantize import check_export

    problems = check_export(folder)
    if problems:
        for p in problems:
            err.print(f"[red]✗[/red] {escape(p)}")
        fail(f"{folder} would not load in MLX Swift ({len(problems)} problem(s))")
    out.print(f"{folder}: loadable by MLX Swift (config keys, quantization dict, strict tensor set, tokenizer)")


def _size(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


@app.command()
def quantize(
    src: Optional[str] = typer.Argument(None, help="HF model folder or repo id (bf16/fp16/fp32 safetensors)."),
    out_dir: Optional[str] = typer.Argument(
        None, metavar="OUT", help="Output folder: new (or --force), apart from the source folder."
    ),
    bits: int = typer.Option(4, "--bits", "-b", help="Bits per weight: 2, 3, 4, 5, 6 or 8 (affine)."),
    group_size: int = typer.Option(64, "--group-size", "-g", help="Quantization group size: 32, 64 or 128."),
    recipe: str = typer.Option("uniform", help="uniform, or mixed_L_H (e.g. mixed_4_6: 4-bit, 6-bit where it matters)."),
    embed_bits: Optional[int] = typer.Option(None, help="Bits for embed_tokens (0 = unquantized; default: recipe)."),
    lm_head_bits: Optional[int] = typer.Option(None, help="Bits for lm_head (0 = unquantized; default: recipe)."),
    router_bits: int = typer.Option(8, help="Bits for the MoE router mlp.gate: 8, or 0 for unquantized."),
    max_shard_size: str = typer.Option("5GB", help="Largest output shard."),
    dtype: Optional[str] = typer.Option(None, help="dtype of scales and unquantized tensors (default: the source's)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the quality report (KL / top-1 vs the source)."),
    fit: Optional[str] = typer.Option(None, "--fit", help="Pick the best precision that fits this device."),
    context: int = typer.Option(4096, "--context", help="Context length for --fit."),
    check: Optional[str] = typer.Option(None, "--check", help="Only check an exported folder against MLX Swift's rules."),
    allow_incompatible: bool = typer.Option(
        False, "--allow-incompatible", help="Export a hybrid whose layer_types mlx-lm and MLX Swift would mis-build "
        "(the folder then loads in qwen3-mlx only)."
    ),
    mtp_drafter: Optional[str] = typer.Option(
        None, "--mtp-drafter", help="Also write the checkpoint's multi-token-prediction head (never in OUT's shards) "
        "to this folder, at the same bits: qwen3-mlx generate OUT --draft-model FOLDER."
    ),
):
    """Quantize a Hugging Face Qwen3 / Qwen3.5 / Qwen3-Next checkpoint to MLX's format in bounded memory."""
    from ..quantize import QuantSpec, convert, quality_report

    if check:
        return _check(check)
    if not src or not out_dir:
        fail("usage: qwen3-mlx quantize SRC OUT [options]  (or --check OUT)")
    spec = QuantSpec(bits, group_size, recipe, embed_bits, lm_head_bits, router_bits)
    if fit:
        spec = _fit_spec(src, fit, context, group_size)
    t0 = time.perf_counter()
    from ..loader import load_config, resolve_model_path
    from ..quantize.hybrid import HYBRID_TYPES, export_hybrid

    hybrid = load_config(resolve_model_path(src)).get("model_type") in HYBRID_TYPES
    options = dict(dtype=dtype, max_shard_size=max_shard_size, force=force, log=err.print)
    if hybrid:
        options["allow_incompatible"] = allow_incompatible
    result = _run(export_hybrid if hybrid else convert, src, out_dir, spec, **options)
    if mtp_drafter:
        from ..quantize.mtp import export_mtp

        drafter = export_mtp(src, mtp_drafter, bits=spec.bits, group_size=spec.group_size, force=force)
        err.print(f"wrote the MTP head to {drafter}")
    if hybrid:
        size = sum(f.stat().st_size for f in result.glob("*.safetensors"))
        err.print(f"wrote {result}: {_size(size)} ({spec.label}) in {time.perf_counter() - t0:.1f}s")
        if not no_eval:
            out.print(f"quality: {quality_report(resolve_model_path(src), result)}")
        return
    plan = result.plan
    n_over = len([k for k in plan.quantization if k not in ("bits", "group_size", "mode")])
    err.print(
        f"wrote {result.out}: {len(result.shard_files)} shard(s), {_size(result.bytes_written)} from "
        f"{_size(plan.source_bytes)} ({spec.label}, {n_over} per-layer override(s)) in {result.seconds:.1f}s "
        f"({_size(plan.source_bytes / max(result.seconds, 1e-9))}/s)"
    )
    if not no_eval:
        report = quality_report(plan.source, result.out)
        out.print(f"quality: {report}")
    err.print(f"total {time.perf_counter() - t0:.1f}s")


def _fit_spec(src: str, fit: str, context: int, group_size: int):
    from ..fit import GB, choose, get_device
    from ..loader import load_config, resolve_model_path

    device = get_device(fit)
    chosen = choose(load_config(resolve_model_path(src)), device, context, group_size=group_size)
    err.print(
        f"--fit {device.key}: {chosen.spec.label} needs {chosen.total / GB:.2f} GB of {device.usable_gb:g} GB at "
        f"context {context}"
    )
    return chosen.spec


def _run(run, src: str, out_dir: str, spec, **options):
    """`run` (an exporter), with a live progress bar when a person is watching."""
    if not show_progress():
        return run(src, out_dir, spec, **options)
    with _progress_bar() as bar:
        task = bar.add_task("quantize", total=None)
        return run(src, out_dir, spec, progress=lambda done, total: bar.update(task, completed=done, total=total),
                   **options)
