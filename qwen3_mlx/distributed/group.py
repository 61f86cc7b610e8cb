"""The process group of a run across machines: MLX's own distributed layer (ring over TCP, JACCL over
Thunderbolt RDMA, MPI: whichever `mlx.launch` set up), with bounded waits and one clear message on a fault."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import mlx.core as mx

from ..errors import Qwen3MLXError

# How long a rank waits for the others to connect at start, and for a step it started to come back.
CONNECT_TIMEOUT = float(os.environ.get("QWEN3_MLX_CONNECT_TIMEOUT", "60"))
PEER_TIMEOUT = float(os.environ.get("QWEN3_MLX_PEER_TIMEOUT", "60"))


class DistributedError(Qwen3MLXError):
    """Ranks that cannot run together: a mismatch between them, or a rank gone."""


def launched() -> bool:
    """True in a process that `mlx.launch` (or mpirun) started as one rank of several."""
    size = os.environ.get("MLX_WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE")
    if size is not None:
        return int(size) > 1
    # ring: MLX_HOSTFILE lists the ranks' addresses; JACCL: MLX_IBV_DEVICES lists each rank's devices.
    listing = os.environ.get("MLX_HOSTFILE") or os.environ.get("MLX_IBV_DEVICES")
    if "MLX_RANK" not in os.environ or not listing:
        return False
    try:
        with open(listing) as f:
            text = f.read().strip()
        return bool(text) and len(json.loads(text)) > 1
    except (OSError, ValueError):
        return True  # let MLX report a malformed file


# The watcher outlives a blocked `mx.distributed.init` (which holds the GIL, so no thread of ours runs):
# a separate process that, unless told the wait is over, prints the message and stops its parent.
_WATCHER = """
import os, select, signal, sys, time
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], timeout)[0]:
    sys.stderr.write(message + "\\n"); sys.stderr.flush()
    os.kill(pid, signal.SIGTERM); time.sleep(3)
    try: os.kill(pid, signal.SIGKILL)
    except OSError: pass
"""


def _local_ranks() -> int:
    """Ranks of this run on this host (loopback runs put them all here), to share its cores."""
    try:
        with open(os.environ["MLX_HOSTFILE"]) as f:
            hosts = json.load(f)
        mine = hosts[int(os.environ["MLX_RANK"])][0].rsplit(":", 1)[0]
        return max(1, sum(1 for h in hosts if h and h[0].rsplit(":", 1)[0] == mine))
    except (KeyError, OSError, ValueError, IndexError, TypeError, AttributeError):
        return 1


def init(timeout: float = CONNECT_TIMEOUT):
    """The world group. A rank that cannot reach the others within `timeout` seconds exits with a message.

    Ranks sharing a host split its cores between them (QWEN3_MLX_THREADS, unless set)."""
    if "QWEN3_MLX_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["QWEN3_MLX_THREADS"] = str(max(1, cores // _local_ranks()))
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    message = (
        f"error: rank {rank} could not connect to the other ranks within {timeout:g} s "
        "(is every host up and reachable, and the same command started on each? "
        "QWEN3_MLX_CONNECT_TIMEOUT sets the wait)"
    )
    watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, str(os.getpid()), str(timeout), message],
                               stdin=subprocess.PIPE)
    try:
        group = mx.distributed.init(strict=True)
    finally:
        watcher.stdin.close()  # the wait is over: the watcher exits
        watcher.wait()
    _stop_on_sigterm(group.rank())
    return group


def _stop_on_sigterm(rank: int) -> None:
    # mlx.launch stops the other ranks with SIGTERM when one exits: say so instead of dying silently. The main
    # thread may be blocked in MLX (a Python handler would wait for it), so a thread reads the wakeup fd.
    if threading.current_thread() is not threading.main_thread():
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)

    def watch():
        while True:
            data = os.read(r, 64)
            if signal.SIGTERM in data:
                sys.stderr.write(f"error: rank {rank} stopped: another rank exited (or the launcher was stopped)\n")
                sys.stderr.flush()
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="qwen3-mlx-sigterm").start()


class Watchdog:
    """Bounds a wait on the other ranks: `with watchdog.waiting("..."):` exits the process with the message
    if the block takes longer than `timeout` seconds (a rank that hangs without closing its connection).
    A rank that exits closes its sockets, and MLX raises at once (see `lost`)."""

    def __init__(self, rank: int, timeout: float = PEER_TIMEOUT):
        self.rank, self.timeout = rank, timeout
        self._deadline = None
        self._what = ""
        self._cv = threading.Condition()
        threading.Thread(target=self._run, daemon=True, name="qwen3-mlx-watchdog").start()

    def _run(self):
        with self._cv:
            while True:
                if self._deadline is None:
                    self._cv.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                sys.stderr.write(
                    f"error: rank {self.rank}: no answer from the other ranks for {self.timeout:g} s while "
                    f"{self._what} (a rank hangs or its host is unreachable; QWEN3_MLX_PEER_TIMEOUT sets the wait)\n"
                )
                sys.stderr.flush()
                os._exit(1)

    def arm(self, what: str) -> None:
        with self._cv:
            self._deadline, self._what = time.monotonic() + self.timeout, what
            self._cv.notify()

    def disarm(self) -> None:
        with self._cv:
            self._deadline = None
            self._cv.notify()


def lost(error: Exception, rank: int) -> DistributedError | None:
    """The domain error for MLX's "peer lost" failures (a rank exited or its host went down), else None."""
    text = str(error)
    if any(tag in text for tag in ("[ring]", "[jaccl]", "[mpi]", "[nccl]")):
        return DistributedError(f"rank {rank}: lost the connection to another rank (it exited or its host went "
                                f"down): {text.strip()}")
    return None


def fingerprint(*parts) -> bytes:
    """16 bytes identifying what a rank runs (model files, split, options), compared across ranks at start."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()[:16]


def check_same(group, what: bytes, description: str) -> None:
    """All ranks must hold the same `what`; otherwise every rank raises, naming the ranks that differ."""
    mine = mx.array(list(what), dtype=mx.uint8)
    every = mx.distributed.all_gather(mine[None], group=group)  # [size, 16]
    mx.eval(every)
    rows = [bytes(r) for r in every.tolist()]
    differ = [r for r, f in enumerate(rows) if f != rows[0]]
    if differ:
        raise DistributedError(
            f"ranks {', '.join(map(str, differ))} differ from rank 0 in {description}: start every rank with the "
            "same command and the same model files"
        )
