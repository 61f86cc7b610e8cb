"""One model on 1, 2 and 3 ranks (mlx.launch, ring backend, loopback), alternated in one run: decode and
prefill tok/s, each rank's peak memory, and the per-hop cost of a decode step's messages.

    python benchmarks/distributed.py MODEL [--ranks 1,2,3] [--rounds 2] [--parallel pipeline|tensor] [-p 128] [-g 32]

On one machine the ranks share its cores (each gets cores / ranks threads), so more ranks is slower here:
what this measures is the memory per rank and the cost the pipeline adds, not a speed-up. Prints a markdown
table. `--hop` (run under mlx.launch by this script) times the messages of one pipeline hop.

By default the ranks are started the way mlx.launch starts them (MLX_RANK and a ring hostfile per process)
but without mlx.launch itself: its stdout/stderr relay polls in a busy loop (about one core per launch on
this machine: its stdin pipe is always writable, so its select() never sleeps), which on 2 cores halves the
speed of the ranks it runs. `--launcher mlx` measures through it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"


def run(ranks: int, args: list[str], port: int, launcher: str) -> tuple[dict, dict[int, float]]:
    """bench's JSON document from rank 0, and every other rank's reported peak memory (GB)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "qwen3_mlx", "bench", *args, "--json", str(out)]
        if ranks == 1:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            err = r.stderr
        elif launcher == "mlx":
            cmd = [sys.executable, "-c", LAUNCH, "-n", str(ranks), "--backend", "ring", "--starting-port", str(port),
                   "--", *cmd]
            err = subprocess.run(cmd, capture_output=True, text=True, timeout=3600).stderr
        else:  # what mlx.launch sets up for each rank, without its I/O relay (see the module docstring)
            hostfile = Path(tmp) / "hosts.json"
            hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(ranks)]))
            procs = [subprocess.Popen(cmd, env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for r in range(ranks)]
            err = "".join(p.communicate(timeout=3600)[1] for p in procs)
        if not out.exists():
            raise SystemExit(f"{ranks} ranks failed:\n{err[-3000:]}")
        peaks = {int(m[1]): float(m[2]) for m in re.finditer(r"rank (\d+): .*peak memory ([\d.]+) GB", err)}
        return json.loads(out.read_text()), peaks


def hop_probe(trials: int = 300) -> None:
    """Under mlx.launch -n 2: rank 0 sends a decode step's header and [1, 1, hidden] activation to rank 1, which
    sends the activation back (one hop each way, as the pipeline's messages); half the round trip is a hop."""
    import mlx.core as mx

    from qwen3_mlx.distributed.group import init
    from qwen3_mlx.distributed.protocol import SIZE

    g = init()
    header, x = mx.zeros((SIZE,), mx.int32), mx.ones((1, 1, 1024))
    times = []
    for i in range(trials):
        t = time.perf_counter()
        if g.rank() == 0:
            mx.eval(mx.distributed.send(header, 1))
            mx.eval(mx.distributed.send(x, 1))
            mx.eval(mx.distributed.recv_like(x, 1))
        else:
            mx.eval(mx.distributed.recv_like(header, 0))
            y = mx.distributed.recv_like(x, 0)
            mx.eval(mx.distributed.send(y, 0))
        times.append(time.perf_counter() - t)
    if g.rank() == 0:
        print(json.dumps({"hop_ms": statistics.median(times[20:]) / 2 * 1e3}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--ranks", default="1,2,3")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--parallel", default="pipeline", help="pipeline, tensor, or both: pipeline,tensor")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-g", type=int, default=32)
    ap.add_argument("--port", type=int, default=42400)
    ap.add_argument("--launcher", choices=("manual", "mlx"), default="manual",
                    help="start the ranks as mlx.launch does (manual, default) or through mlx.launch itself")
    ap.add_argument("--hop", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hop:
        hop_probe()
        return
    ranks = [int(x) for x in a.ranks.split(",")]
    configs = [(n, mode) for n in ranks for mode in (["-"] if n == 1 else a.parallel.split(","))]
    bench = [a.model, "-p", str(a.p), "-g", str(a.g), "-n", "1"]
    results: dict[tuple, list] = {c: [] for c in configs}
    hops = []
    for round_ in range(a.rounds):
        for n, mode in configs:
            extra = ["--parallel", mode] if n > 1 else []
            doc, peaks = run(n, bench + extra, a.port, a.launcher)
            res = doc["runs"][0]["results"]["qwen3-mlx"]
            results[n, mode].append((res["decode_tps"]["median"], res["prefill_tps"]["median"],
                                     res["peak_memory_gb"]["median"], peaks, doc["settings"].get("ranks")))
            print(f"round {round_ + 1}, {n} rank(s) {mode}: decode {results[n, mode][-1][0]:.2f} tok/s",
                  file=sys.stderr)
        r = subprocess.run([sys.executable, "-c", LAUNCH, "-n", "2", "--backend", "ring", "--starting-port",
                            str(a.port), "--", sys.executable, __file__, "--hop"], capture_output=True, text=True)
        hops.append(json.loads(r.stdout.strip().splitlines()[-1])["hop_ms"])
    single = statistics.median(x[2] for x in results[configs[0]]) if configs[0][0] == 1 else None
    print("| ranks | parallel | split | decode tok/s | prefill tok/s | rank 0 peak GB | other ranks' peak GB | "
          "largest rank vs 1 rank |\n|---|---|---|---|---|---|---|---|")
    for n, mode in configs:
        rows = results[n, mode]
        decode = statistics.median(x[0] for x in rows)
        prefill = statistics.median(x[1] for x in rows)
        peak0 = statistics.median(x[2] for x in rows)
        others = [statistics.median(x[3].get(r, float("nan")) for x in rows) for r in range(1, n)]
        info = rows[-1][4] or {}
        split = "/".join(str(b - a_) for a_, b in info["layers"]) if info.get("layers") else (
            "1/n of each expert" if mode == "tensor" else "all")
        share = f"{max([peak0] + others) / single:.0%}" if single else "-"
        print(f"| {n} | {mode} | {split} | {decode:.2f} | {prefill:.1f} | {peak0:.3f} | "
              f"{', '.join(f'{o:.3f}' for o in others) or '-'} | {share} |")
    print(f"\nper-hop cost (decode step's header + activation, loopback): {statistics.median(hops):.3f} ms")


if __name__ == "__main__":
    main()
