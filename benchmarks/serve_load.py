"""Load test of `qwen3-mlx serve`: many concurrent clients, mixed lengths, streamed and not, some hanging up
mid-stream; every greedy answer must equal the same request run alone.

    python benchmarks/serve_load.py MODEL_DIR [--clients 32] [--requests 4]
    python benchmarks/serve_load.py --url http://127.0.0.1:8080 --model NAME   # a server already running

Prints a table: requests, failures (errors or answers that differ from their solo run), dropped streams,
p50/p95 latency and aggregate generated tokens/s; then checks that the server still answers.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

PROMPTS = ["Hello", "Write a haiku about the sea.", "List three colours", "What is 2 + 2?",
           "Tell me a long story about a dragon who learned to fly over the mountains at night."]
LENGTHS = [8, 24, 48]


def plan(clients: int, per_client: int) -> list[list[dict]]:
    """Each client's requests: prompt, max_tokens, stream or not, and whether it hangs up early."""
    jobs = []
    for c in range(clients):
        mine = []
        for r in range(per_client):
            i = c * per_client + r
            mine.append({"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": LENGTHS[i % len(LENGTHS)],
                         "stream": i % 2 == 1, "drop": i % 8 == 7})
        jobs.append(mine)
    return jobs


def ask(client, model: str, job: dict) -> tuple[str, int]:
    """Greedy chat request (thinking off); returns (answer, completion tokens)."""
    args = dict(model=model, messages=[{"role": "user", "content": job["prompt"]}], max_tokens=job["max_tokens"],
                temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    if not job["stream"]:
        r = client.chat.completions.create(**args)
        return r.choices[0].message.content, r.usage.completion_tokens
    stream = client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    parts, used = [], 0
    for n, ev in enumerate(stream):
        if job["drop"] and n == 2:
            stream.close()  # hang up mid-stream
            return None, 0
        if ev.usage is not None:
            used = ev.usage.completion_tokens
        if ev.choices:
            parts.append(ev.choices[0].delta.content or "")
    return "".join(parts), used


def run_load(base_url: str, model: str, clients: int = 32, per_client: int = 4) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key=os.environ.get("QWEN3_MLX_API_KEY", "unused"),
                           max_retries=0, timeout=600)
    jobs = plan(clients, per_client)
    # The solo answer of every distinct request, one at a time.
    solo = {}
    for mine in jobs:
        for job in mine:
            key = (job["prompt"], job["max_tokens"])
            if key not in solo:
                solo[key] = ask(client, model, dict(job, stream=False, drop=False))[0]
    latencies, tokens, failures, dropped = [], [0], [], [0]
    lock = threading.Lock()

    def one_client(mine):
        for job in mine:
            t = time.perf_counter()
            try:
                answer, used = ask(client, model, job)
            except Exception as e:  # an error is a failure, reported with its type
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                if answer is None:
                    dropped[0] += 1
                    continue
                latencies.append(time.perf_counter() - t)
                tokens[0] += used
                if answer != solo[(job["prompt"], job["max_tokens"])]:
                    failures.append(f"answer differs from its solo run: {job}")

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, jobs))
    wall = time.perf_counter() - start
    alive = ask(client, model, {"prompt": "Hello", "max_tokens": 4, "stream": False, "drop": False})[0] is not None
    lat = sorted(latencies)
    return {
        "requests": clients * per_client, "completed": len(lat), "failures": failures, "dropped": dropped[0],
        "p50_s": statistics.median(lat) if lat else 0.0,
        "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else 0.0,
        "tokens_per_s": tokens[0] / wall if wall else 0.0, "wall_s": wall, "alive_after": alive,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", help="model folder to serve (omit with --url)")
    ap.add_argument("--url", help="an already running server")
    ap.add_argument("--model", help="model name to send with --url")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    args = ap.parse_args()
    proc = None
    if args.url:
        base, model = args.url.rstrip("/"), args.model or "default"
    else:
        if not args.model_dir:
            raise SystemExit("give MODEL_DIR or --url")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "qwen3_mlx", "serve", args.model_dir, "--port", str(port),
                                 "--max-queue", str(args.clients * args.requests)], stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            if "serving" in line:
                break
        base, model = f"http://127.0.0.1:{port}", args.model_dir
    try:
        r = run_load(base, model, args.clients, args.requests)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print("| requests | completed | dropped by the client | failures | p50 s | p95 s | aggregate tok/s | alive after |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {r['requests']} | {r['completed']} | {r['dropped']} | {len(r['failures'])} | {r['p50_s']:.2f} | "
          f"{r['p95_s']:.2f} | {r['tokens_per_s']:.1f} | {r['alive_after']} |")
    for f in r["failures"][:10]:
        print("failure:", f)


if __name__ == "__main__":
    main()
