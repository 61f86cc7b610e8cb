"""The CPU kernels' sources stay portable to Apple Silicon and arm64 Linux.

Every source that a non-x86 build compiles (read from qwen3_mlx/kernels/CMakeLists.txt) is compiled,
not linked, for aarch64-macos and aarch64-linux-gnu by the clang that the `ziglang` wheel ships,
with the flags CMakeLists.txt gives such a build: no -m flags, no Q3K_X86, against the MLX wheel's
headers. An x86 intrinsic or a Linux-only call reached without its guard fails here, on an x86 machine.
"""

import os
import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ziglang")

KERNELS = Path(__file__).resolve().parent.parent / "qwen3_mlx" / "kernels"
SRC = KERNELS / "src"
CMAKE = (KERNELS / "CMakeLists.txt").read_text()
TARGETS = ["aarch64-macos", "aarch64-linux-gnu"]
STDERR_LINES = 40  # per failing source, in the assertion message


def _without_comments(text):
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _x86_block_and_rest():
    """CMakeLists.txt split into its x86-only block (the if on CMAKE_SYSTEM_PROCESSOR) and the rest."""
    text = _without_comments(CMAKE)
    blocks = list(re.finditer(r'^if\(CMAKE_SYSTEM_PROCESSOR MATCHES "[^"]*x86_64[^"]*"\)\n(.*?)^endif\(\)', text,
                              re.MULTILINE | re.DOTALL))
    assert len(blocks) == 1, "CMakeLists.txt: expected one x86-only if(CMAKE_SYSTEM_PROCESSOR ...) block"
    block = blocks[0]
    return block.group(1), text[:block.start()] + text[block.end():]


def _command_args(text, command):
    """The whitespace-separated arguments of the one call `command(...)` in text (no parentheses inside)."""
    calls = re.findall(re.escape(command) + r"\s+([^()]*)\)", text)
    assert len(calls) == 1, f"CMakeLists.txt: expected one {command}...), found {len(calls)}"
    return calls[0].split()


def _sources(args):
    return [a.removeprefix("${SRC}/") for a in args if a.startswith("${SRC}/") and a.endswith(".cpp")]


def non_x86_build():
    """(sources, flags, linux-only defines) of a non-x86 build, from CMakeLists.txt."""
    x86, rest = _x86_block_and_rest()
    kernel_sources = _sources(_command_args(rest, "set(KERNEL_SOURCES"))
    module = _command_args(rest, "nanobind_add_module(_ext")
    assert "${KERNEL_SOURCES}" in module, "CMakeLists.txt: the module no longer takes ${KERNEL_SOURCES}"
    sources = _sources(module) + kernel_sources
    x86_only = _sources(_command_args(x86, "list(APPEND KERNEL_SOURCES"))

    on_disk = sorted(p.name for p in SRC.glob("*.cpp"))
    assert len(set(sources)) == len(sources), f"a source listed twice: {sources}"
    assert not set(sources) & set(x86_only), f"sources both generic and x86-only: {set(sources) & set(x86_only)}"
    assert sorted(sources + x86_only) == on_disk, (
        f"src/*.cpp and CMakeLists.txt disagree: not built {sorted(set(on_disk) - set(sources) - set(x86_only))}, "
        f"missing {sorted(set(sources + x86_only) - set(on_disk))}")
    # Per-source options and defines (-mavx2, Q3K_X86=1, ...) are x86-only; a non-x86 build has none.
    assert "set_source_files_properties" not in rest, "per-source options outside the x86 block: mirror them here"

    standard = re.search(r"set\(CMAKE_CXX_STANDARD (\d+)\)", rest).group(1)
    assert "set(CMAKE_POSITION_INDEPENDENT_CODE ON)" in rest and "set(CMAKE_BUILD_TYPE Release)" in rest
    options = _command_args(rest, "target_compile_options(_ext PRIVATE")
    assert not [o for o in options if o.startswith("-m")], f"machine flags for every target: {options}"
    domain = re.search(r"nanobind_add_module\(_ext[^()]*\bNB_DOMAIN (\w+)", rest).group(1)
    # The Release build type's own flags (CMAKE_CXX_FLAGS_RELEASE), then the target's.
    flags = [f"-std=c++{standard}", "-fPIC", "-O3", "-DNDEBUG", *options, f"-DNB_DOMAIN={domain}"]
    if "STABLE_ABI" in module and sys.version_info >= (3, 12):  # nanobind ignores STABLE_ABI before 3.12
        flags.append("-DPy_LIMITED_API=0x030C0000")
    # With scipy-openblas32 found (a Linux dependency of the package only): cblas.h and Q3K_HAVE_BLAS.
    blas_defines = _command_args(rest, "target_compile_definitions(_ext PRIVATE")
    assert blas_defines == ["Q3K_HAVE_BLAS=1"], blas_defines
    return sources, flags, [f"-D{d}" for d in blas_defines]


SOURCES, FLAGS, BLAS_DEFINES = non_x86_build()


def include_flags(target):
    import mlx
    import nanobind  # the test extra has it (the build's own pin): bindings.cpp's headers

    # Python's and OpenBLAS's headers are this machine's (x86-64 Linux): close enough for compiling
    # bindings.cpp and driver.cpp, which only call them. MLX's own -DACCELERATE_NEW_LAPACK on macOS is
    # left out: no source includes Accelerate.
    dirs = [os.path.join(next(iter(mlx.__path__)), "include"), nanobind.include_dir(),
            sysconfig.get_paths()["include"]]
    defines = []
    if target.endswith("-linux-gnu"):
        import scipy_openblas32

        dirs.append(scipy_openblas32.get_include_dir())
        defines = BLAS_DEFINES
    return defines + [f"-I{d}" for d in dirs]


def compile_source(target, name, out_dir, cache):
    cmd = [sys.executable, "-m", "ziglang", "c++", "-target", target, *FLAGS, *include_flags(target),
           "-c", str(SRC / name), "-o", str(out_dir / (name + ".o"))]
    # A cache of this run only: each source is compiled, not found in ~/.cache/zig.
    env = dict(os.environ, ZIG_GLOBAL_CACHE_DIR=str(cache), ZIG_LOCAL_CACHE_DIR=str(cache))
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    return name, done.returncode, done.stderr


def test_non_x86_sources_from_cmake():
    assert "bindings.cpp" in SOURCES and "kernels_generic.cpp" in SOURCES
    assert not [s for s in SOURCES if "avx" in s]
    assert not [f for f in FLAGS + BLAS_DEFINES if f.startswith("-m") or "Q3K_X86" in f]


@pytest.mark.parametrize("target", TARGETS)
def test_kernel_sources_compile_for_arm64(target, tmp_path):
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda name: compile_source(target, name, tmp_path, tmp_path / "zig-cache"),
                                SOURCES))
    failed = {name: stderr for name, rc, stderr in results if rc != 0}
    report = []
    for name, stderr in failed.items():
        lines = stderr.strip().splitlines()
        cut = f"\n  ... ({len(lines) - STDERR_LINES} more lines)" if len(lines) > STDERR_LINES else ""
        report.append(f"--- {name} ({target}):\n" + "\n".join(lines[:STDERR_LINES]) + cut)
    assert not failed, f"{len(failed)} of {len(SOURCES)} sources fail for {target}:\n" + "\n".join(report)
    assert sorted(p.name for p in tmp_path.glob("*.o")) == sorted(s + ".o" for s in SOURCES)
