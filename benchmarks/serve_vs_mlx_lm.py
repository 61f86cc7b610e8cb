"""Aggregate decode throughput of `qwen3-mlx serve` against `mlx_lm.server` on one model folder, same run.

    qwen3-mlx quantize /tmp/peer-ckpt/qwen3-0.6b /tmp/q06-4bit --bits 4      # any folder both can load
    python benchmarks/serve_vs_mlx_lm.py /tmp/q06-4bit [--concurrency 1,4,16] [--requests 2] [--max-tokens 32]
                                         [--no-mlx-lm]

The servers run side by side: ours batching (--max-concurrency = the largest level), ours one request at a
time (--max-concurrency 1, what continuous batching replaced) and mlx-lm's (which batches decoding,
--decode-concurrency 32 by default; --no-mlx-lm leaves it out, it is ~100x slower on this CPU). For each
concurrency level, C clients each send `--requests` greedy /v1/completions requests (the same prompts for
every server), one server after the other. Aggregate tokens/s = completion tokens of all requests / wall time
of the level.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PROMPTS = ["The history of the city begins", "A recipe for bread:", "Dear diary, today", "In mathematics, a prime",
           "The spaceship landed on", "Once upon a time", "Weather report for Monday:", "The best way to learn"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early: {proc.args}")
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"server did not start: {proc.args}")


def complete(base: str, model: str, prompt: str, max_tokens: int) -> int:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as r:
        return int(json.loads(r.read())["usage"]["completion_tokens"])


def level(base: str, model: str, clients: int, per_client: int, max_tokens: int) -> float:
    def client(c: int) -> int:
        return sum(complete(base, model, PROMPTS[(c * per_client + i) % len(PROMPTS)], max_tokens)
                   for i in range(per_client))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--no-mlx-lm", action="store_true", help="leave mlx_lm.server out")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    ours = [sys.executable, "-m", "qwen3_mlx", "serve", args.model, "--max-queue", "1024", "--prompt-cache-bytes", "0"]
    commands = {
        "qwen3-mlx": ours + ["--max-concurrency", str(max(levels))],
        "qwen3-mlx, one at a time": ours + ["--max-concurrency", "1"],
    }
    if not args.no_mlx_lm:
        commands["mlx-lm"] = [sys.executable, "-m", "mlx_lm", "server", "--model", args.model]
    procs, bases = {}, {}
    try:
        for name, cmd in commands.items():
            port = free_port()
            procs[name] = subprocess.Popen(cmd + ["--port", str(port)], stderr=subprocess.DEVNULL)
            bases[name] = f"http://127.0.0.1:{port}"
        for name, base in bases.items():
            wait_ready(base, procs[name])
            complete(base, args.model, "Hello", 4)  # warm-up
        rows = []
        for c in levels:
            got = {}
            for name, base in bases.items():
                got[name] = level(base, args.model, c, args.requests, args.max_tokens)
                print(f"concurrency {c}: {name} {got[name]:.1f} tok/s", file=sys.stderr, flush=True)
            rows.append((c, got))
    finally:
        for p in procs.values():
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    names = list(bases)
    print(f"\n{args.model}, greedy /v1/completions, {args.max_tokens} tokens, {args.requests} requests per client, "
          "aggregate tok/s\n")
    print("| concurrency | " + " | ".join(names) + " | batched / one at a time |"
          + (" batched / mlx-lm |" if "mlx-lm" in names else ""))
    print("|---" * (len(names) + 2 + ("mlx-lm" in names)) + "|")
    for c, got in rows:
        ratio = got["qwen3-mlx"] / got["qwen3-mlx, one at a time"]
        extra = f" {got['qwen3-mlx'] / got['mlx-lm']:.0f}x |" if "mlx-lm" in got else ""
        print(f"| {c} | " + " | ".join(f"{got[n]:.3g}" for n in names) + f" | {ratio:.2f}x |" + extra)


if __name__ == "__main__":
    main()
