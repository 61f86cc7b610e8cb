"""Aggregate decode throughput of `qwen3-mlx serve` against `mlx_lm.server` on one model folder, same run.

    qwen3-mlx quantize /tmp/peer-ckpt/qwen3-0.6b /tmp/q06-4bit --bits 4      # any folder both can load
    python benchmarks/serve_vs_mlx_lm.py /tmp/q06-4bit [--concurrency 1,4,16] [--requests 2] [--max-tokens 32]

Both servers run side by side; for each concurrency level, C clients each send `--requests` greedy
/v1/completions requests (the same prompts for both servers), first to ours, then to mlx-lm's. Aggregate
tokens/s = completion tokens of all requests / wall time of the level. mlx-lm's server batches decoding
(--decode-concurrency, default 32); ours runs one request at a time so far.
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
    args = ap.parse_args()
    ours_port, theirs_port = free_port(), free_port()
    ours = subprocess.Popen([sys.executable, "-m", "qwen3_mlx", "serve", args.model, "--port", str(ours_port),
                             "--max-queue", "1024"], stderr=subprocess.DEVNULL)
    theirs = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", args.model, "--port",
                               str(theirs_port)], stderr=subprocess.DEVNULL)
    try:
        bases = {"qwen3-mlx": f"http://127.0.0.1:{ours_port}", "mlx-lm": f"http://127.0.0.1:{theirs_port}"}
        for base in bases.values():
            wait_ready(base, ours if base.endswith(str(ours_port)) else theirs)
        for name, base in bases.items():  # warm-up
            complete(base, args.model, "Hello", 4)
        rows = []
        for c in (int(x) for x in args.concurrency.split(",")):
            got = {}
            for name, base in bases.items():
                got[name] = level(base, args.model, c, args.requests, args.max_tokens)
                print(f"concurrency {c}: {name} {got[name]:.1f} tok/s", file=sys.stderr, flush=True)
            rows.append((c, got["qwen3-mlx"], got["mlx-lm"]))
    finally:
        for p in (ours, theirs):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"\n{args.model}, greedy /v1/completions, {args.max_tokens} tokens, {args.requests} requests per client\n")
    print("| concurrency | qwen3-mlx aggregate tok/s | mlx_lm.server aggregate tok/s | ours / mlx-lm |")
    print("|---|---|---|---|")
    for c, a, b in rows:
        print(f"| {c} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
