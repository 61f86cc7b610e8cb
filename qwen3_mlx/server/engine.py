"""The server's engine: one thread owns MLX and runs the requests; HTTP handlers never touch arrays.

This first version runs one request at a time, in arrival order, with a bounded queue behind it (continuous
batching is the next step). Each request's tokens go back to its handler through an asyncio queue, and a
handler that goes away (client disconnect) cancels its request within one token.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

from ..errors import Qwen3MLXError
from ..generate import stream_generate
from ..models.cache import make_cache, truncate_cache
from .protocol import ApiError


class QueueFull(Exception):
    """More requests are waiting than the server takes."""


class PrefixCache:
    """KV caches of earlier requests keyed by the token ids they hold, bounded in bytes (least recently used
    leave first). A request takes the entry sharing the longest prefix with its prompt and prefills only the
    rest: a shared system prompt, or a chat's earlier turns even where Qwen3's template drops old <think>
    blocks (the prefix up to that turn still matches)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: list[tuple[tuple[int, ...], list]] = []  # most recently used last

    def take(self, prompt: list[int], model) -> tuple[list, int]:
        """A cache for `prompt` and how many of its tokens it already holds (at most all but the last)."""
        best, best_len = None, 0
        for i, (tokens, _) in enumerate(self.entries):
            n = 0
            limit = min(len(tokens), len(prompt) - 1)
            while n < limit and tokens[n] == prompt[n]:
                n += 1
            if n > best_len:
                best, best_len = i, n
        if best is None:
            return make_cache(model), 0
        _, cache = self.entries.pop(best)  # the request now owns it; it comes back extended
        truncate_cache(cache, best_len)
        return cache, best_len

    def put(self, tokens: list[int], cache: list) -> None:
        if self.max_bytes <= 0 or not tokens:
            return
        held = min(c.offset for c in cache)
        self.entries.append((tuple(tokens[:held]), cache))
        while self.entries and sum(sum(c.nbytes for c in e[1]) for e in self.entries) > self.max_bytes:
            self.entries.pop(0)


@dataclass
class Job:
    """One generation: `stream_generate` keyword options, and where its responses go."""

    prompt: Any  # token ids
    options: dict
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache

    def send(self, kind: str, value: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))


class Engine:
    """Runs jobs on one worker thread. `submit` is called from the event loop; events come back as
    ("token", GenerationResponse), then ("done", None) or ("error", ApiError)."""

    def __init__(self, model, tokenizer, *, max_queue: int = 64, prompt_cache_bytes: int = 1 << 30):
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = max_queue
        self.prefixes = PrefixCache(prompt_cache_bytes)
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="qwen3-mlx-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting >= self.max_queue + 1:  # the running job plus max_queue waiting
                raise QueueFull(f"the server is busy: {self._waiting} requests are ahead of this one")
            self._waiting += 1
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if not job.cancelled.is_set():
                    # The repetition penalty counts the prompt's tokens: a fresh prefill keeps that exact.
                    reuse = job.options.get("repetition_penalty") in (None, 1.0)
                    cache, cached = self.prefixes.take(job.prompt, self.model) if reuse else (make_cache(self.model), 0)
                    job.cached_tokens = cached
                    generated: list[int] = []
                    try:
                        for response in stream_generate(self.model, self.tokenizer, job.prompt[cached:],
                                                        prompt_cache=cache, **job.options):
                            generated.append(response.token)
                            if job.cancelled.is_set():
                                break
                            job.send("token", response)
                    finally:
                        self.prefixes.put(job.prompt + generated, cache)
                job.send("done")
            except Qwen3MLXError as e:
                job.send("error", ApiError(400, str(e)))
            except Exception:  # never let one request take the engine down; the log keeps the trace
                traceback.print_exc()
                job.send("error", ApiError(500, "internal error while generating", type="server_error"))
            finally:
                with self._lock:
                    self._waiting -= 1
