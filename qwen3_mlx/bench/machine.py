"""Which CPU a figure was taken on: speeds are only comparable within one machine, so every benchmark document
names the processor (model name, family and model number on x86) and the instruction-set features the kernels
care about."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

# Features that decide which kernels run and how fast (x86 flags, arm64 Linux features).
FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx_vnni",
            "avx512_bf16", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "bf16", "sve")


def _linux() -> dict:
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"model_name": fields.get("model name") or fields.get("Model") or platform.processor(),
            "family": fields.get("cpu family"), "model": fields.get("model"),
            "features": [f for f in FEATURES if f in flags]}


def _macos() -> dict:
    def sysctl(name: str) -> str:
        try:
            return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    arm = {"asimddp": "hw.optional.arm.FEAT_DotProd", "i8mm": "hw.optional.arm.FEAT_I8MM",
           "bf16": "hw.optional.arm.FEAT_BF16"}
    return {"model_name": sysctl("machdep.cpu.brand_string") or platform.processor(), "family": None, "model": None,
            "features": [f for f, key in arm.items() if sysctl(key) == "1"]}


def cpu_info() -> dict:
    """{"model_name", "family", "model", "features"} of this machine's CPU (None / [] where the OS does not say)."""
    try:
        if sys.platform.startswith("linux") and Path("/proc/cpuinfo").is_file():
            return _linux()
        if sys.platform == "darwin":
            return _macos()
    except OSError:
        pass
    return {"model_name": platform.processor() or platform.machine(), "family": None, "model": None, "features": []}


def describe(cpu: dict) -> str:
    """One line: "Intel(R) Xeon(R) Processor (family 6, model 167; avx512f, avx512_vnni, ...)"."""
    numbers = ", ".join(f"{k} {cpu[k]}" for k in ("family", "model") if cpu.get(k))
    detail = "; ".join(p for p in (numbers, ", ".join(cpu.get("features") or [])) if p)
    return f"{cpu.get('model_name')}" + (f" ({detail})" if detail else "")
