"""The server's engine: one thread owns MLX and runs every request; HTTP handlers never touch arrays.

Continuous batching. Each turn of the loop runs
- one prefill piece (at most `prefill_piece` tokens) of the oldest request still reading its prompt (or
  another multi-token forward: a thinking budget's stop text), so a newcomer never stalls the others for
  more than a piece, then
- one batched forward of a single token for every other running request, each at its own length in its
  own KV cache (`BatchKVCache`), and a per-request sampling of its row.
Requests join and leave between turns without copying anyone's cache. A sequence computes bit for bit what
it would alone (the kernels choose by a sequence's own positions, prefill pieces keep the kernels of plain
chunks), so a greedy request gives `qwen3-mlx generate`'s tokens whatever else is running, and a seeded one
draws from its own random stream.

Each request's tokens go back to its handler through an asyncio queue; a handler that goes away (client
disconnect) cancels its request before the next turn.

With a draft model (`serve --draft-model`) requests run one at a time, each through `generate`'s own
speculative decoding (`speculative_generate`: greedy output is plain greedy's, sampling the rejection scheme),
one token handed out per turn. The prefix cache then keeps the target's and the draft's caches together, cut
back as one (an MTP head's cache goes back only where the target's recurrent states can).

Other MLX work (the embedding and rerank models' forwards) goes through `await engine.call(fn)`: `fn` runs on
the engine thread between two turns, so MLX is never used by two threads at once.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..errors import Qwen3MLXError
from ..generate import Sequence, prefill_plan, speculative_generate, split_at
from ..models.cache import batch_cache, make_cache, reusable_prefix, truncate_cache
from ..options import GenerationOptions
from ..sample import Draw
from .protocol import ApiError


class QueueFull(Exception):
    """More requests are waiting than the server takes."""


_WAKE = object()  # put in the job queue to wake an idle engine for a `call`


class PrefixCache:
    """KV caches of earlier requests keyed by the token ids they hold, bounded in bytes (least recently used
    leave first). A request takes the entry sharing the longest prefix with its prompt and prefills only the
    rest: a shared system prompt, or a chat's earlier turns even where Qwen3's template drops old <think>
    blocks (the prefix up to that turn still matches)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: list[tuple[tuple[int, ...], list]] = []  # most recently used last

    def take(self, prompt: list[int], model, fresh=None) -> tuple[list, int]:
        """A cache for `prompt` and how many of its tokens it already holds (at most all but the last). `fresh`:
        makes a new cache (default: the model's); a cache may be several models' layers, cut back together."""
        best, best_len = None, 0
        for i, (tokens, _) in enumerate(self.entries):
            n = reusable_prefix(tokens, prompt)
            if n > best_len:
                best, best_len = i, n
        if best is None:
            return (fresh or (lambda: make_cache(model)))(), 0
        _, cache = self.entries.pop(best)  # the request now owns it; it comes back extended
        return cache, truncate_cache(cache, best_len)  # less when a recurrent state cannot be cut back

    def put(self, tokens: list[int], cache: list) -> None:
        if self.max_bytes <= 0 or not tokens:
            return
        held = min(len(tokens), truncate_cache(cache, len(tokens)))
        self.entries.append((tuple(tokens[:held]), cache))
        while self.entries and sum(sum(c.nbytes for c in e[1]) for e in self.entries) > self.max_bytes:
            self.entries.pop(0)


@dataclass
class Job:
    """One generation: its prompt, its (validated) options, and where its responses go."""

    prompt: list[int]  # token ids
    options: GenerationOptions
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache

    def send(self, kind: str, value: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))


@dataclass
class _Forward:
    """A forward a running request still needs: tokens to feed, and whether its last logits are sampled."""

    tokens: list[int]
    sample: bool = False
    n_generated: int = 0  # of `tokens`, how many are output (for the penalties)
    mask: mx.array | None = None


class _Running:
    def __init__(self, job: Job, seq: Sequence, work: list[_Forward]):
        self.job, self.seq = job, seq
        self.work: deque[_Forward] = deque(work)
        self.y: Draw | None = None  # the sampled next token, not yet handed out
        self.tokens = None  # with a draft model: the speculative generator of this request's responses
        self.spec = None  # and its Speculator (the drafts proposed and kept)
        self.draft_cache: list = []


class Engine:
    """Runs jobs on one worker thread, up to `max_concurrency` of them batched together and `max_queue` more
    waiting. `submit` is called from the event loop; events come back as ("token", GenerationResponse), then
    ("done", None) or ("error", ApiError). `draft_model`: a draft model or MTP drafter (the one every job's
    options name): jobs then run one at a time, speculatively."""

    def __init__(self, model, tokenizer, *, max_queue: int = 64, max_concurrency: int = 8,
                 prompt_cache_bytes: int = 1 << 30, prefill_piece: int = 128, draft_model=None):
        self.model, self.tokenizer = model, tokenizer
        self.drafter = None
        if draft_model is not None:
            from ..speculative import drafter

            self.drafter, max_concurrency = drafter(draft_model), 1
            self._layers = len(make_cache(model))  # a prefix-cache entry: the target's layers, then the draft's
        self.max_queue, self.max_concurrency = max_queue, max(1, max_concurrency)
        self.prefill_piece = prefill_piece
        self.prefixes = PrefixCache(prompt_cache_bytes)
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._calls: queue.Queue = queue.Queue()  # functions to run between turns (`call`)
        self._queued = 0  # submitted, not yet running
        self._lock = threading.Lock()
        self._running: list[_Running] = []
        self.peak_batch = 0  # the most requests one forward has served (reported by /health)
        self.drafted = self.kept = 0  # with a draft model: drafts proposed and kept, all requests so far
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qwen3-mlx-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            free = self.max_concurrency - len(self._running)
            if self._queued >= self.max_queue + max(0, free):
                raise QueueFull(f"the server is busy: {self._queued + len(self._running)} requests are ahead of "
                                "this one")
            self._queued += 1
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)

    async def call(self, fn):
        """Run `fn()` on the engine thread between two turns and return its result (or raise its exception).
        For MLX work beside generation; running generations pause while it runs."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(result, error):
            if not future.done():  # the awaiting handler may be gone (client disconnect)
                future.set_exception(error) if error is not None else future.set_result(result)

        def run():
            try:
                result, error = fn(), None
            except Exception as e:  # noqa: BLE001 (any failure of fn is its caller's, re-raised there)
                result, error = None, e
            loop.call_soon_threadsafe(settle, result, error)

        self._calls.put(run)
        self._jobs.put(_WAKE)
        return await future

    def stats(self) -> dict:
        """Requests running and waiting now, and the largest batch so far (with a draft model: the drafts
        proposed and kept by the requests finished so far)."""
        with self._lock:
            drafts = {} if self.drafter is None else {"draft_tokens": self.drafted, "accepted_tokens": self.kept}
            return {"running": len(self._running), "waiting": self._queued, "max_concurrency": self.max_concurrency,
                    "peak_batch": self.peak_batch, **drafts}

    # ---- the engine thread ----

    def _run(self) -> None:
        while not self._closed:
            while not self._calls.empty():
                self._calls.get()()
            self._admit()
            if not self._running:
                continue
            try:
                self._turn()
            except Exception:  # noqa: BLE001 - never let one failure take the engine down; the log keeps the trace
                traceback.print_exc()
                for r in self._running:
                    r.job.send("error", ApiError(500, "internal error while generating", type="server_error"))
                self._running = []

    def _admit(self) -> None:
        """Start waiting jobs while there is room (waiting for one when nothing runs)."""
        while len(self._running) < self.max_concurrency:
            try:
                job = self._jobs.get(block=not self._running)
            except queue.Empty:
                return
            if job is None:
                self._closed = True
                return
            if job is _WAKE:  # a `call` is waiting: back to the loop, which runs it
                return
            with self._lock:
                self._queued -= 1
            if not job.cancelled.is_set():
                self._start(job)

    def _fresh(self) -> list:
        cache = make_cache(self.model)
        return cache + self.drafter.make_cache() if self.drafter is not None else cache

    def _start(self, job: Job) -> None:
        # The repetition penalty counts the prompt's tokens: a fresh prefill keeps that exact.
        reuse = job.options.repetition_penalty in (None, 1.0)
        cache, cached = self.prefixes.take(job.prompt, self.model, self._fresh) if reuse else (self._fresh(), 0)
        if self.drafter is not None:
            self._start_speculative(job, cache, cached)
            return
        try:
            seq = Sequence(self.model, self.tokenizer, job.prompt, job.options, cache)
        except Qwen3MLXError as e:
            job.send("error", ApiError(400, str(e)))
            return
        except Exception:  # noqa: BLE001 - this request's failure only; the log keeps the trace
            traceback.print_exc()
            job.send("error", ApiError(500, "internal error while starting the request", type="server_error"))
            return
        seq.base = 0  # the job's prompt includes the cached prefix: token i sits at position i
        job.cached_tokens = cached
        rest = seq.prefill[cached:]
        plan = split_at(prefill_plan(len(rest), job.options.prefill_step_size, self.prefill_piece),
                        [c - cached for c in seq.cuts])
        work = [_Forward(rest[a:b]) for a, b in plan]
        tokens, n_generated, mask = seq.first_input()
        work.append(_Forward(tokens, True, n_generated, mask))
        r = _Running(job, seq, work)
        with self._lock:
            self._running.append(r)
        self._hand_out_forced(r)

    def _start_speculative(self, job: Job, cache: list, cached: int) -> None:
        """A job with the draft model: `generate`'s speculative decoding on the target's and the draft's caches
        (both holding the prompt's first `cached` tokens), one token handed out per turn (`_turn`)."""
        from ..speculative import Speculator

        cache, draft_cache = cache[: self._layers], cache[self._layers :]
        try:
            if job.options.draft_model is None:  # the routes give every request the server's options
                raise Qwen3MLXError("this server decodes speculatively: a request's options need its draft model")
            seq = Sequence(self.model, self.tokenizer, job.prompt, job.options, cache)
            seq.base = 0  # the job's prompt includes the cached prefix: token i sits at position i
            spec = Speculator(self.model, seq, draft_cache)
        except Qwen3MLXError as e:
            job.send("error", ApiError(400, str(e)))
            return
        except Exception:  # noqa: BLE001 - this request's failure only; the log keeps the trace
            traceback.print_exc()
            job.send("error", ApiError(500, "internal error while starting the request", type="server_error"))
            return
        job.cached_tokens = cached
        r = _Running(job, seq, [])
        r.tokens, r.spec, r.draft_cache = speculative_generate(self.model, seq, spec, cached), spec, spec.dcache
        with self._lock:
            self._running.append(r)

    def _turn(self) -> None:
        for r in [r for r in self._running if r.job.cancelled.is_set()]:
            self._finish(r)
        if not self._running:
            return
        if self.drafter is not None:
            r = self._running[0]  # the only one
            self.peak_batch = 1
            response = next(r.tokens, None)  # the first one prefills; a round's tokens come one per turn
            if response is not None:
                r.job.send("token", response)
            if response is None or response.finish_reason is not None:
                self._finish(r)
            return
        # One multi-token forward (a prefill piece, a budget's stop text) for the oldest request needing one.
        solo = next((r for r in self._running if r.work and len(r.work[0].tokens) > 1), None)
        pending = []
        if solo is not None:
            f = solo.work.popleft()
            solo.seq.quantize_cache()
            if f.sample:
                logits = self.model(mx.array(f.tokens)[None], solo.seq.cache)
                solo.y = solo.seq.sample(logits[:, -1, :], f.tokens, f.n_generated, f.mask)
                pending.extend(solo.y.arrays())
            else:
                self.model.fill(mx.array(f.tokens)[None], solo.seq.cache)
                pending.extend(c.state for c in solo.seq.cache)  # evaluated now: memory stays bounded
        # One batched single-token forward for everyone else.
        batch = [r for r in self._running if r.work and len(r.work[0].tokens) == 1]
        if batch:
            self.peak_batch = max(self.peak_batch, len(batch))
            heads = [r.work.popleft() for r in batch]
            for r in batch:
                r.seq.quantize_cache()
            inputs = mx.array([f.tokens for f in heads])  # [B, 1]
            logits = self.model(inputs, batch_cache([r.seq.cache for r in batch]))[:, -1, :]  # [B, vocab]
            pending.append(logits)
            for b, (r, f) in enumerate(zip(batch, heads)):
                if f.sample:
                    r.y = r.seq.sample(logits[b : b + 1], f.tokens, f.n_generated, f.mask)
                    pending.extend(r.y.arrays())
        mx.eval(pending)
        for r in [r for r in self._running if r.y is not None and not r.work]:
            self._hand_out(r)

    def _hand_out(self, r: _Running) -> None:
        """Send the sampled token of `r` and plan its next forwards."""
        seq = r.seq
        token, logprobs = int(r.y.token.item()), r.y.read_logprobs()
        r.y = None
        seq.constrain(token)
        response = seq.take(token, logprobs=logprobs)
        r.job.send("token", response)
        if response.finish_reason is not None:
            self._finish(r)
        elif seq.forced:
            # The thinking budget ran out: feed the token, then the stop text, whose last logits are sampled.
            stop = list(seq.forced)
            r.work.extend([_Forward([token]), _Forward(stop, True, len(stop), seq.mask_after(stop[-1]))])
            self._hand_out_forced(r)
        else:
            r.work.append(_Forward([token], True, 1, seq.mask_after(token)))

    def _hand_out_forced(self, r: _Running) -> None:
        while r.seq.forced and r in self._running:
            response = r.seq.take(r.seq.forced.popleft(), sampled=False)
            r.job.send("token", response)
            if response.finish_reason is not None:
                self._finish(r)

    def _finish(self, r: _Running) -> None:
        with self._lock:
            self._running.remove(r)
        if r.tokens is not None:
            r.tokens.close()  # its `finally`: both caches hold every token handed out but the last
            self.drafted, self.kept = self.drafted + r.spec.proposed, self.kept + r.spec.accepted
        self.prefixes.put(r.seq.ids + r.seq.generated, r.seq.cache + r.draft_cache)
        r.job.send("done")
