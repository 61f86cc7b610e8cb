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


class QueueFull(Exception):
    """More requests are waiting than the server takes."""


@dataclass
class Job:
    """One generation: `stream_generate` keyword options, and where its responses go."""

    prompt: Any  # token ids
    options: dict
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))


class Engine:
    """Runs jobs on one worker thread. `submit` is called from the event loop; events come back as
    ("token", GenerationResponse), then ("done", None) or ("error", message)."""

    def __init__(self, model, tokenizer, *, max_queue: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = max_queue
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
                    for response in stream_generate(self.model, self.tokenizer, job.prompt, **job.options):
                        if job.cancelled.is_set():
                            break
                        job.send("token", response)
                job.send("done")
            except Qwen3MLXError as e:
                job.send("error", str(e))
            except Exception:  # never let one request take the engine down; the log keeps the trace
                traceback.print_exc()
                job.send("error", "internal error while generating")
            finally:
                with self._lock:
                    self._waiting -= 1
