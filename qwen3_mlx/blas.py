"""Fast BLAS on Linux: MLX's CPU wheel ships a reference BLAS; OpenBLAS makes float32 matmul ~25x faster.

The BLAS is bound when the process starts, so the only way in is LD_PRELOAD and a re-exec of the
same command line. Safe: same cblas ABI, same results within float32 rounding.
Disable with QWEN3_MLX_NO_OPENBLAS=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENBLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]


def find_openblas() -> str | None:
    for path in OPENBLAS_CANDIDATES:
        if Path(path).exists():
            return path
    return None


def openblas_active() -> bool:
    return "libopenblas" in os.environ.get("LD_PRELOAD", "")


def ensure_fast_blas() -> None:
    """Re-exec this process with OpenBLAS preloaded when on Linux, available, and not done already."""
    if not sys.platform.startswith("linux") or openblas_active():
        return
    if os.environ.get("QWEN3_MLX_NO_OPENBLAS") or os.environ.get("_QWEN3_MLX_REEXEC"):
        return
    lib = find_openblas()
    if lib is None or not getattr(sys, "orig_argv", None):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env["_QWEN3_MLX_REEXEC"] = "1"  # never loop, even if the preload is refused
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
