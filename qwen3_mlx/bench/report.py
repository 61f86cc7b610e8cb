"""Rendering a bench document: a rich table, the JSON file, and an optional matplotlib plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.table import Table

from .harness import FIGURES, HIGHER_IS_BETTER
from .machine import describe
from .models import BenchError

LABELS = {
    "prefill_tps": "prefill tok/s",
    "decode_tps": "decode tok/s",
    "ttft_s": "TTFT s",
    "peak_memory_gb": "peak GB",
    "bandwidth_gbs": "eff. GB/s",
}


def _fmt(x: float) -> str:
    if x != x:  # nan
        return "-"
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3g}"


def table(doc: dict) -> Table:
    """One row per (context, runtime): median [min-max] of each figure, plus a ratio row with --vs."""
    m = doc["model"]
    quant = f"{m['bits']}-bit g{m['group_size']}" if m["bits"] else m["dtype"]
    kv = doc["settings"].get("kv_bits")
    kv = f", {kv}-bit KV cache g{doc['settings']['kv_group_size']}" if kv else ""
    title = (f"{m['name']} ({m['source']}, {quant}{kv}), {doc['settings']['gen_tokens']} generated, "
             f"median of {doc['settings']['trials']}")
    ranks = doc["settings"].get("ranks")
    if ranks:
        layers = ranks.get("layers")
        split = f", layers {'/'.join(str(b - a) for a, b in layers)}" if layers else ""
        title += f"; {ranks['parallel']} over {ranks['count']} ranks{split}"
    k = doc["environment"].get("kernels") or {}
    if k.get("kernels") == "qwen3-mlx":
        int8 = f", {k['int8']} prefill" if k.get("int8") else ""  # the integer path (QWEN3_MLX_INT8)
        title += f"; qwen3-mlx kernels ({k['isa']}{int8}, {k['threads']} threads)"
        if doc["settings"].get("vs"):
            title += f", {doc['settings']['vs']} on MLX's"
    elif k:
        title += f"; MLX's kernels ({k.get('reason')})"
    if doc["environment"].get("cpu"):
        title += f"\non {describe(doc['environment']['cpu'])}"
    t = Table(title=title, title_justify="left")
    t.add_column("prompt", justify="right")
    t.add_column("runtime")
    for f in FIGURES:
        t.add_column(LABELS[f], justify="right")
    bandwidth = doc["environment"].get("device_bandwidth_gbs")
    for run in doc["runs"]:
        for name, res in run["results"].items():
            cells = []
            for f in FIGURES:
                s = res[f]
                cell = f"{_fmt(s['median'])}\n[dim]{_fmt(s['min'])}-{_fmt(s['max'])}[/dim]"
                if f == "bandwidth_gbs" and bandwidth:
                    cell += f" ({100 * res['bandwidth_share']:.0f}%)"
                cells.append(cell)
            t.add_row(str(run["prompt_tokens"]), name, *cells)
        if "ratio" in run:
            cells = []
            for f in FIGURES:
                r = run["ratio"][f]
                good = (r >= 1) == HIGHER_IS_BETTER[f] or r == 1
                cells.append(f"[{'green' if good else 'red'}]{r:.2f}x[/]")
            label = "ours/mlx-lm"
            if "acceptance" in run:
                label = f"draft/plain\n[dim]kept {100 * run['acceptance']:.0f}% of drafts[/dim]"
            t.add_row("", label, *cells)
    return t


def markdown_table(doc: dict) -> str:
    """The same table as GitHub markdown (medians only), for notes and the README."""
    head = "| prompt | runtime | " + " | ".join(LABELS[f] for f in FIGURES) + " |"
    lines = [head, "|" + "---|" * (len(FIGURES) + 2)]
    for run in doc["runs"]:
        for name, res in run["results"].items():
            lines.append(f"| {run['prompt_tokens']} | {name} | " + " | ".join(_fmt(res[f]["median"]) for f in FIGURES) + " |")
        if "ratio" in run:
            label = f"draft/plain (kept {100 * run['acceptance']:.0f}%)" if "acceptance" in run else "ours/mlx-lm"
            lines.append(f"| | {label} | " + " | ".join(f"{run['ratio'][f]:.2f}x" for f in FIGURES) + " |")
    return "\n".join(lines)


def check_output_path(path: str | Path, option: str) -> Path:
    """Fail before a long run if `path` cannot be written: its folder must exist and be writable."""
    p = Path(path).expanduser()
    parent = p.absolute().parent
    if p.is_dir():
        raise BenchError(f"{option} {path}: is a folder, give a file name")
    if not parent.is_dir():
        raise BenchError(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise BenchError(f"{option} {path}: not writable")
    return p


def save_json(doc: dict, path: str | Path) -> None:
    try:
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as e:
        raise BenchError(f"cannot write {path}: {e}") from None


def save_plot(doc: dict, path: str | Path) -> None:
    """PNG: prefill and decode tokens/s against prompt length, one line per runtime (min-max as error bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib (the plot extra): pip install matplotlib") from None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ctx = [run["prompt_tokens"] for run in doc["runs"]]
    names = list(doc["runs"][0]["results"])
    for ax, f in zip(axes, ("prefill_tps", "decode_tps")):
        for name in names:
            s = [run["results"][name][f] for run in doc["runs"]]
            med = [x["median"] for x in s]
            err = [[m - x["min"] for m, x in zip(med, s)], [x["max"] - m for m, x in zip(med, s)]]
            ax.errorbar(ctx, med, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(LABELS[f])
        if len(ctx) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ctx, [str(c) for c in ctx])
        ax.grid(alpha=0.3)
        ax.legend()
    m = doc["model"]
    fig.suptitle(f"{m['name']} ({m['bits'] and str(m['bits']) + '-bit' or m['dtype']})")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise BenchError(f"cannot write {path}: {e}") from None
    finally:
        plt.close(fig)
