"""Runs across ranks (mlx.launch, ring backend on loopback) against the same model in one process.

Every process a test starts is in its own session and killed (group and all) when the test ends, pass or fail.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from helpers import REAL_VOCAB, dense_config, moe_config, save_checkpoint, save_hybrid

HERE = Path(__file__).parent
LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
PROMPT = ["--prompt", "Tell me about the sea.", "--temp", "0", "--no-think"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist-dense")
    save_checkpoint(path, dense_config(vocab_size=REAL_VOCAB, num_hidden_layers=6, head_dim=32), tokenizer=True)
    return path


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist-moe")
    save_checkpoint(path, moe_config(vocab_size=REAL_VOCAB, head_dim=32), moe=True, tokenizer=True)
    return path


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """Qwen3.5 MoE: 6 layers, Gated DeltaNet but for layers 3 (full attention, every 4th)."""
    path = tmp_path_factory.mktemp("dist-hybrid")
    save_hybrid(path, moe=True, tokenizer=True, vocab_size=REAL_VOCAB, num_hidden_layers=6)
    return path


def free_ports(n: int) -> int:
    """The first of `n` consecutive free TCP ports on loopback (the ring backend listens on port + rank)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            held = []
            for p in range(base, base + n):
                t = socket.socket()
                held.append(t)
                t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
    raise RuntimeError("no free ports")


@contextmanager
def session(cmd, **kw):
    """A process in its own session, killed with everything it started when the block ends (output piped as
    text unless `kw` says otherwise)."""
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kw}
    p = subprocess.Popen(cmd, start_new_session=True, **kw)
    try:
        yield p
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def launch_cmd(n: int, args: list[str]) -> list[str]:
    """`mlx.launch -n N -- python ARGS` on the ring backend over loopback, on free ports."""
    return [sys.executable, "-c", LAUNCH, "-n", str(n), "--backend", "ring", "--starting-port", str(free_ports(n)),
            "--", sys.executable, *args]


def launch(n: int, args: list[str], timeout: float = 180) -> tuple[str, str]:
    """Run `launch_cmd(n, args)`; (stdout, stderr). mlx.launch exits 0 even when a rank fails, so a failing rank
    shows as its traceback or error line in stderr."""
    with session(launch_cmd(n, args)) as p:
        out, err = p.communicate(timeout=timeout)
    assert "Traceback" not in err and "error:" not in err, err
    return out, err


def cli(*args) -> list[str]:
    return ["-m", "qwen3_mlx", *args]


def solo_logits(path):
    from dist_worker import logits
    from qwen3_mlx import load

    model, _ = load(path)
    return logits(model)


def assert_close(got: dict, want: dict, rel: float = 1e-5):
    assert got.keys() == want.keys()
    for k in want:
        err = np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()
        assert err <= rel, f"{k}: relative error {err:.2e}"


@pytest.mark.parametrize(
    "ranks,parallel,split,fixture",
    # Three ranks and the pipelined MoE are the slow set: two ranks per model kind and mode stay by default.
    [(2, "pipeline", None, "dense"), pytest.param(3, "pipeline", "1,3,2", "dense", marks=pytest.mark.slow),
     pytest.param(2, "pipeline", None, "moe", marks=pytest.mark.slow), (2, "tensor", None, "moe"),
     (2, "pipeline", None, "hybrid"), pytest.param(3, "pipeline", "4,1,1", "hybrid", marks=pytest.mark.slow)],
)
def test_logits_equal_single_process(ranks, parallel, split, fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    out = tmp_path / "logits.npz"
    launch(ranks, [str(HERE / "dist_worker.py"), str(path), str(out), parallel] + ([split] if split else []))
    got = dict(np.load(out))
    assert_close(got, solo_logits(path))


@pytest.mark.parametrize("ranks,extra,fixture", [(2, [], "dense"), pytest.param(3, [], "dense", marks=pytest.mark.slow),
                                                  pytest.param(2, [], "moe", marks=pytest.mark.slow),
                                                  (2, ["--parallel", "tensor"], "moe"), (2, [], "hybrid")])
def test_greedy_generate_identical(ranks, extra, fixture, request):
    path = str(request.getfixturevalue(fixture))
    args = cli("generate", path, *PROMPT, "-m", "24")
    solo = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, check=True)
    out, err = launch(ranks, args + extra)
    assert out == solo.stdout and len(out.strip()) > 0
    assert f"rank {ranks - 1}:" in err  # the last rank's own report at exit


@pytest.mark.parametrize("fixture", [pytest.param("dense", marks=pytest.mark.slow), "hybrid"])
def test_chat_turns_across_ranks(fixture, request):
    """Two turns of `chat` (rank 0 reads stdin): the second reuses the cache that every rank holds (a hybrid's
    from its state checkpoints). mlx.launch never closes a rank's stdin, so the chat ends with /exit."""
    args = cli("chat", str(request.getfixturevalue(fixture)), "--temp", "0", "--no-think", "-m", "12")
    turns = "Hello there\nAnd what about the moon?\n/exit\n"
    solo = subprocess.run([sys.executable, *args], input=turns, capture_output=True, text=True, timeout=120)
    with session(launch_cmd(2, args), stdin=subprocess.PIPE) as p:
        out, err = p.communicate(turns, timeout=180)
    assert "Traceback" not in err and "error:" not in err, err
    assert out == solo.stdout and out.count("\n") >= 2
    assert "prefilled" in err and err.count("prefilled") == solo.stderr.count("prefilled") == 2
    assert [line.split("prefilled")[1] for line in err.splitlines() if "prefilled" in line] == [
        line.split("prefilled")[1] for line in solo.stderr.splitlines() if "prefilled" in line]


def test_fit_hosts_split(capsys):
    from qwen3_mlx.fit import plan_hosts, split_layers

    assert split_layers([10] * 28, [1, 1], first_bytes=20) == [13, 15]  # rank 0 also holds embedding and head
    rng = np.random.default_rng(0)
    for _ in range(20):  # against every possible split: the fullest host is as empty as it can be
        sizes, caps, first = rng.integers(1, 9, 10).tolist(), rng.integers(5, 40, 3).tolist(), int(rng.integers(0, 9))

        def worst(counts):
            bounds = np.cumsum([0] + list(counts))
            return max((sum(sizes[a:b]) + (first if h == 0 else 0)) / caps[h]
                       for h, (a, b) in enumerate(zip(bounds, bounds[1:])))

        best = min(worst((i, j, 10 - i - j)) for i in range(1, 9) for j in range(1, 10 - i))
        got = split_layers(sizes, caps, first_bytes=first)
        assert sum(got) == 10 and min(got) >= 1 and worst(got) <= best * (1 + 1e-9)
    with pytest.raises(Exception, match="at least one layer"):
        split_layers([1, 1], [1, 1, 1])
    plan = plan_hosts("qwen3-235b-a22b", ["m4-max-128gb", "m4-max-128gb"], bits=4)
    assert [s.layers for s in plan.shares] == [(0, 47), (47, 94)]
    assert all(s.fits for s in plan.shares)
    assert not all(s.fits for s in plan_hosts("qwen3-235b-a22b", ["m4-max-128gb"] * 2, bits=8).shares)


# Faults: ranks started by hand (as mlx.launch does: MLX_RANK and a hostfile) to watch each one's exit.


@contextmanager
def ranks(per_rank_args: list[list[str]], env: dict | None = None):
    base = free_ports(len(per_rank_args))
    hostfile = Path(os.environ.get("TMPDIR", "/tmp")) / f"qwen3-mlx-hosts-{base}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(len(per_rank_args))]))
    procs = []
    try:
        for r, args in enumerate(per_rank_args):
            e = {**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile), **(env or {})}
            procs.append(subprocess.Popen([sys.executable, *args], env=e, start_new_session=True, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        yield procs
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        hostfile.unlink(missing_ok=True)


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_rank_stops_the_survivor(dense, victim):
    args = cli("generate", str(dense), *PROMPT, "-m", "100000")
    # MLX's ring raises at once when a peer's socket closes; the rare time it does not notice, our watchdog
    # ends the wait (QWEN3_MLX_PEER_TIMEOUT) with its own message.
    with ranks([args, args], env={"QWEN3_MLX_PEER_TIMEOUT": "15"}) as (r0, r1):
        deadline = time.monotonic() + 90
        while not select.select([r0.stdout], [], [], 0.2)[0]:  # until rank 0 prints its first tokens
            assert r0.poll() is None and time.monotonic() < deadline, r0.stderr.read()
        victim_p, survivor = (r1, r0) if victim == 1 else (r0, r1)
        victim_p.kill()
        t = time.monotonic()
        survivor.wait(timeout=30)
        assert time.monotonic() - t < 30
        err = survivor.stderr.read()
    assert survivor.returncode != 0
    assert "lost the connection to another rank" in err or "no answer from the other ranks" in err, err
    assert "Traceback" not in err


def test_mismatched_ranks_refused(dense, tmp_path):
    other = tmp_path / "other"
    save_checkpoint(other, dense_config(vocab_size=REAL_VOCAB, num_hidden_layers=6, head_dim=32), seed=1, tokenizer=True)
    (other / "config.json").write_text((dense / "config.json").read_text().replace("1e-06", "1e-05"))
    with ranks([cli("generate", str(dense), *PROMPT), cli("generate", str(other), *PROMPT)]) as procs:
        for p in procs:
            p.wait(timeout=60)
        errs = [p.stderr.read() for p in procs]
    assert all(p.returncode == 1 for p in procs), errs
    assert all("ranks 1 differ from rank 0 in model files" in e for e in errs), errs
    assert all("Traceback" not in e for e in errs)


def test_split_mismatch_refused(dense):
    a = cli("generate", str(dense), *PROMPT, "--split", "2,4")
    b = cli("generate", str(dense), *PROMPT, "--split", "3,3")
    with ranks([a, b]) as procs:
        for p in procs:
            p.wait(timeout=60)
        errs = [p.stderr.read() for p in procs]
    assert all(p.returncode == 1 for p in procs) and all("layer split" in e for e in errs), errs


@pytest.mark.slow
def test_unreachable_rank_times_out(dense):
    with ranks([cli("generate", str(dense), *PROMPT), ["-c", "import time; time.sleep(60)"]],
               env={"QWEN3_MLX_CONNECT_TIMEOUT": "3"}) as (r0, _):
        t = time.monotonic()
        r0.wait(timeout=30)
        err = r0.stderr.read()
    assert r0.returncode != 0 and time.monotonic() - t < 20
    assert "could not connect to the other ranks within 3 s" in err, err


def test_hybrid_tensor_parallel_and_a_split_without_attention_on_rank_0_refused(hybrid):
    with ranks([cli("generate", str(hybrid), *PROMPT, "--parallel", "tensor")] * 2) as procs:
        for p in procs:
            p.wait(timeout=60)
        errs = [p.stderr.read() for p in procs]
    assert all(p.returncode == 1 for p in procs), errs
    assert all("run qwen3_5_moe_text with --parallel pipeline" in e and "Traceback" not in e for e in errs), errs
    with ranks([cli("generate", str(hybrid), *PROMPT, "--split", "3,3")] * 2) as procs:
        for p in procs:
            p.wait(timeout=60)
        errs = [p.stderr.read() for p in procs]
    assert all(p.returncode == 1 and "--split must give rank 0 at least 4 layers" in e for p, e in zip(procs, errs)), errs


def test_options_need_launch(dense):
    r = subprocess.run([sys.executable, *cli("generate", str(dense), *PROMPT, "--split", "3,3")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "under mlx.launch" in r.stderr and "Traceback" not in r.stderr


def test_serve_across_ranks(dense, tmp_path):
    """The OpenAI server on rank 0 with the model on two ranks: batched greedy answers equal `generate`'s, and
    the prefix cache (caches every rank holds) still hits."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    prompts = ["Tell me about the sea.", "Hi", "What is 2+2?", "Name a colour."]
    want = [subprocess.run([sys.executable, *cli("generate", str(dense), "--prompt", q, "--temp", "0", "--no-think",
                                                   "-m", "12")], capture_output=True, text=True, timeout=60,
                           check=True).stdout.strip("\n") for q in prompts]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.err"
    cmd = launch_cmd(2, cli("serve", str(dense), "--port", str(port)))
    with open(log, "w") as f, session(cmd, stdout=subprocess.DEVNULL, stderr=f):
        deadline = time.monotonic() + 90
        while "serving" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)

        def ask(q):
            r = client.chat.completions.create(
                model=str(dense), messages=[{"role": "user", "content": q}], temperature=0, max_tokens=12,
                extra_body={"chat_template_kwargs": {"enable_thinking": False}})
            return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, prompts))
        assert [g for g, _ in got] == want
        again, cached = ask(prompts[0])
        assert again == want[0] and cached > 0
    assert "Traceback" not in log.read_text()


def test_bench_across_ranks(dense):
    out, err = launch(2, cli("bench", str(dense), "-p", "16", "-g", "4", "-n", "1", "--split", "2,4", "--json",
                             str(dense.parent / "bench.json")))
    doc = json.loads((dense.parent / "bench.json").read_text())
    assert doc["settings"]["ranks"] == {"parallel": "pipeline", "count": 2, "layers": [[0, 2], [2, 6]]}
    assert doc["runs"][0]["results"]["qwen3-mlx"]["decode_tps"]["median"] > 0
    assert "rank 1: layers 2-5" in err


def test_fit_hosts_cli():
    r = subprocess.run([sys.executable, *cli("fit", "qwen3-235b-a22b", "--bits", "4", "--hosts",
                                             "m4-max-128gb,m4-max-128gb")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "| 0 | m4-max-128gb | 0-46 (47) + embedding, head |" in r.stdout and "decode bound:" in r.stdout
    bad = subprocess.run([sys.executable, *cli("fit", "qwen3-8b", "--hosts", "m4-max-128gb,toaster")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "unknown device 'toaster'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_speculative_across_ranks(dense, moe):
    """A draft on rank 0 alone, the target across ranks: rejected drafts roll every rank's cache back."""
    args = cli("generate", str(dense), *PROMPT, "-m", "16", "--draft-model", str(moe), "--num-draft", "3")
    solo = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, check=True)
    plain = subprocess.run([sys.executable, *cli("generate", str(dense), *PROMPT, "-m", "16")], capture_output=True,
                           text=True, timeout=120, check=True)
    out, err = launch(2, args)
    assert out == solo.stdout == plain.stdout and "draft kept" in err


@pytest.mark.parametrize("hosts", [2, 3])
def test_runtime_split_is_the_planners(tmp_path, hosts):
    """The split a launch computes from a 4-bit export's files is the one `fit --hosts` predicts for its config."""
    from qwen3_mlx.distributed import split_by_memory
    from qwen3_mlx.fit import plan_hosts
    from qwen3_mlx.loader import load_config
    from qwen3_mlx.quantize import convert

    src = tmp_path / "src"
    cfg = dense_config(vocab_size=REAL_VOCAB, num_hidden_layers=9, head_dim=32, hidden_size=128,
                       intermediate_size=384, tie_word_embeddings=True)
    save_checkpoint(src, cfg, torch_dtype="bfloat16", tokenizer=True)
    out = tmp_path / "q4"
    convert(src, out)
    config = load_config(out)
    runtime = split_by_memory(out, config, [1e9] * hosts)
    planned = [b - a for a, b in (s.layers for s in plan_hosts(load_config(src), ["m4-max-128gb"] * hosts, bits=4)
                                  .shares)]
    assert runtime == planned and runtime[0] == min(runtime) < max(runtime)  # rank 0 also holds the embedding
