"""qwen3-mlx against llama.cpp on the same shapes, interleaved in one run, plus a memory read test.

    python benchmarks/make_peer_checkpoints.py            # transformers checkpoints at the real shapes
    python benchmarks/vs_llama_cpp.py [--ckpt /tmp/peer-ckpt] [--only q4,moe-q4]
    python benchmarks/vs_llama_cpp.py --only q4-8k     # long context: 8192-token prompt, decode at depth 8192
    python benchmarks/vs_llama_cpp.py --only q35-0.8b-q4,q35-4b-q4 --vs-mlx-lm   # Qwen3.5 shapes, with mlx-lm

For each case it runs llama.cpp's llama-bench (through ../shared/peers/llama-bench.sh, which builds
llama.cpp once and converts the checkpoint to GGUF) and then `qwen3-mlx bench` on the same shape with
the same prompt / generation lengths and threads, so both see the machine in the same state; then the
read test of our kernels' thread pool (the decode roofline). Prints a markdown table of tok/s and
ours / llama.cpp ratios. Only ratios from one run mean anything: the machine drifts by 30% or more.

llama-bench gets `--repack 0` by default: on CPUs with AMX, llama.cpp 0.3.36's AMX path segfaults on
the first batched matmul (llama.cpp issue #20824); pass `--llama-extra ""` where it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "peers" / "llama-bench.sh"

# name: (checkpoint folder, llama.cpp type, ours: bits, None for float32, or "bf16" to load the bf16
# checkpoint itself, whose matmul weights stay bf16 on the CPU)
CASES = {
    "q4": ("qwen3-0.6b", "Q4_0", 4),
    "q8": ("qwen3-0.6b", "Q8_0", 8),
    "f32": ("qwen3-0.6b", "F32", None),
    "bf16": ("qwen3-0.6b", "BF16", "bf16"),
    "moe-q4": ("moe-12l-64e-a8", "Q4_0", 4),
    # per-token overhead: almost no weights, so decode measures graph building, scheduling and wake-ups
    "overhead-q4": ("tiny-28l-h64", "Q4_0", 4),
    # the hybrid generation (make_peer_checkpoints.py --only qwen3.5-0.8b qwen3.5-4b); not in the default run
    "q35-0.8b-q4": ("qwen3.5-0.8b", "Q4_0", 4),
    "q35-4b-q4": ("qwen3.5-4b", "Q4_0", 4),
}
DEFAULT = ("q4", "q8", "f32", "bf16", "moe-q4", "overhead-q4")
# Long context (not in the default run: ~10 minutes): prefill of an 8192-token prompt and decode with 8192
# tokens in the cache; llama-bench as `-p 8192 -n 0` and `-p 0 -n 32 -d 8192`, one repetition each.
LONG_CASES = {"q4-8k": ("qwen3-0.6b", "Q4_0", 4, 8192)}


def preconvert_without_mtp(ckpt: Path) -> None:
    """llama.cpp's converter expects Qwen3.5's multi-token-prediction tensors unless given --no-mtp, which the
    peer script does not pass, and our checkpoints have none: convert here, into the script's own GGUF cache
    (its key: the folder name, config.json and the weight files' names, sizes and times)."""
    import hashlib

    cache = Path(os.environ.get("LLAMA_CACHE", Path.home() / ".cache" / "llama-peer"))
    root = cache / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").exists():  # the peer script unpacks the sdist only when it runs
        sdist = cache / "llama_cpp_python-0.3.36.tar.gz"
        if not sdist.exists():
            raise SystemExit(f"{sdist} missing: run {PEER} once on any checkpoint (it downloads and builds llama.cpp)")
        subprocess.run(["tar", "xzf", str(sdist), "-C", str(cache)], check=True)
    stats = "".join(f"{f.name} {f.stat().st_size} {int(f.stat().st_mtime)}\n" for f in sorted(ckpt.glob("model*.safetensors*")))
    key = hashlib.sha1((ckpt / "config.json").read_bytes() + stats.encode()).hexdigest()[:8]
    out = cache / f"{ckpt.name}-{key}-F32.gguf"
    if not out.exists():
        subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "f32", "--no-mtp",
                        "--outfile", str(out)], check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(root / "gguf-py")))


def llama_bench(ckpt: Path, quant: str, prompt: int, gen: int, threads: int, extra: list[str], reps: int = 3,
                depth: int = 0) -> dict:
    args = ["bash", str(PEER), str(ckpt), quant, "--", "-t", str(threads), "-p", str(prompt), "-n", str(gen),
            "-r", str(reps), *(["-d", str(depth)] if depth else []), *extra]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    res = {}
    for line in out.splitlines():
        m = re.search(r"\|\s*(pp|tg)(\d+)(?:\s*@\s*d\d+)?\s*\|\s*([\d.]+)\s*±", line)
        if m:
            res["prefill_tps" if m.group(1) == "pp" else "decode_tps"] = float(m.group(3))
    want = (["prefill_tps"] if prompt else []) + (["decode_tps"] if gen else [])
    if sorted(res) != sorted(want):
        raise SystemExit(f"could not read llama-bench's table:\n{out}")
    return res


def ours(ckpt: Path, bits, prompt: int, gen: int, threads: int, trials: int = 3, mlx_lm: bool = False) -> dict:
    """`qwen3-mlx bench` on the checkpoint's shape (random weights at `bits`); with `mlx_lm` also mlx-lm on the
    same weights, alternated with ours in the same process, under "mlx-lm"."""
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / "bench.json"
        model = [str(ckpt)] if bits == "bf16" else ["--shape", str(ckpt / "config.json"), "--random"]
        cmd = ["qwen3-mlx", "bench", *model, "-p", str(prompt), "-g", str(gen), "-n", str(trials), "--json",
               str(js)]
        if isinstance(bits, int):
            cmd += ["--bits", str(bits)]
        if mlx_lm:
            cmd += ["--vs", "mlx-lm"]
        env = dict(os.environ, QWEN3_MLX_THREADS=str(threads))
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        doc = json.loads(js.read_text())

    def figures(r):
        return {"prefill_tps": r["prefill_tps"]["median"], "decode_tps": r["decode_tps"]["median"],
                "bandwidth_gbs": r["bandwidth_gbs"]["median"], "peak_gb": r["peak_memory_gb"]["median"]}

    results = doc["runs"][0]["results"]
    out = {**figures(results["qwen3-mlx"]), "kernels": doc["environment"].get("kernels")}
    if mlx_lm:
        out["mlx-lm"] = figures(results["mlx-lm"])
    return out


def read_test(threads: int) -> float:
    code = "from qwen3_mlx import kernels; print(kernels._ext.read_bandwidth(1 << 30, 5))"
    env = dict(os.environ, QWEN3_MLX_THREADS=str(threads))
    return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/peer-ckpt"), help="make_peer_checkpoints.py's --out")
    ap.add_argument("--only", default=",".join(DEFAULT),
                    help=f"comma-separated cases of {', '.join([*CASES, *LONG_CASES])}")
    ap.add_argument("-p", type=int, default=128, help="prompt tokens")
    ap.add_argument("-g", type=int, default=32, help="generated tokens")
    ap.add_argument("-t", type=int, default=2, help="threads, both runtimes")
    ap.add_argument("-r", "--trials", type=int, default=3, help="repetitions, both runtimes (long cases: 1)")
    ap.add_argument("--llama-extra", default="--repack 0", help="more llama-bench arguments")
    ap.add_argument("--vs-mlx-lm", action="store_true",
                    help="also mlx-lm on the same weights (in our bench process, alternated with ours)")
    args = ap.parse_args()
    rows = []
    for name in args.only.split(","):
        if name not in CASES and name not in LONG_CASES:
            raise SystemExit(f"unknown case {name!r}")
        folder, quant, bits, *long = CASES.get(name) or LONG_CASES[name]
        ckpt = args.ckpt / folder
        if not (ckpt / "config.json").exists():
            raise SystemExit(f"{ckpt} missing: run benchmarks/make_peer_checkpoints.py first")
        print(f"[{name}] llama.cpp {quant} ...", file=sys.stderr, flush=True)
        extra = args.llama_extra.split()
        if folder.startswith("qwen3.5"):
            preconvert_without_mtp(ckpt)
        if long:
            ctx = long[0]
            peer = {**llama_bench(ckpt, quant, ctx, 0, args.t, extra, reps=1),
                    **llama_bench(ckpt, quant, 0, args.g, args.t, extra, reps=1, depth=ctx)}
        else:
            peer = llama_bench(ckpt, quant, args.p, args.g, args.t, extra, reps=args.trials)
        print(f"[{name}] qwen3-mlx ...", file=sys.stderr, flush=True)
        mine = ours(ckpt, bits, long[0] if long else args.p, args.g, args.t, trials=1 if long else args.trials,
                    mlx_lm=args.vs_mlx_lm)
        rows.append((name, folder, quant, bits, peer, mine))
    gbs = read_test(args.t)
    k = rows[0][5]["kernels"] if rows else {}
    print(f"\n{args.t} threads, prompt {args.p} (long cases: their own), {args.g} generated; qwen3-mlx kernels: {k}; "
          f"read test {gbs:.1f} GB/s\n")
    print("| case | llama.cpp prefill / decode tok/s | qwen3-mlx prefill / decode tok/s | ours / llama.cpp "
          "prefill / decode | our decode GB/s (share of read test) | our peak GB |")
    print("|---|---|---|---|---|---|")
    for name, folder, quant, bits, peer, mine in rows:
        ours_q = "bf16 weights" if bits == "bf16" else f"{bits}-bit g64" if bits else "float32"
        if name in LONG_CASES:
            ours_q += f", prompt {LONG_CASES[name][3]} / decode at depth {LONG_CASES[name][3]}"
        print(f"| {folder} {quant} vs {ours_q} | {peer['prefill_tps']:.1f} / {peer['decode_tps']:.1f} | "
              f"{mine['prefill_tps']:.1f} / {mine['decode_tps']:.2f} | "
              f"{mine['prefill_tps'] / peer['prefill_tps']:.2f}x / {mine['decode_tps'] / peer['decode_tps']:.2f}x | "
              f"{mine['bandwidth_gbs']:.1f} ({100 * mine['bandwidth_gbs'] / gbs:.0f}%) | {mine['peak_gb']:.2f} |")
    if args.vs_mlx_lm:
        print("\n| case | mlx-lm prefill / decode tok/s | qwen3-mlx prefill / decode tok/s | ours / mlx-lm |")
        print("|---|---|---|---|")
        for name, folder, quant, bits, peer, mine in rows:
            theirs = mine["mlx-lm"]
            print(f"| {folder} {bits}-bit g64 | {theirs['prefill_tps']:.2f} / {theirs['decode_tps']:.2f} | "
                  f"{mine['prefill_tps']:.1f} / {mine['decode_tps']:.2f} | "
                  f"{mine['prefill_tps'] / theirs['prefill_tps']:.1f}x / {mine['decode_tps'] / theirs['decode_tps']:.1f}x |")


if __name__ == "__main__":
    main()
