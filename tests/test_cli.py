"""The command line as a user meets it: help, and domain errors as one red line with exit code 1."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "qwen3_mlx", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    r = run("--help")
    assert r.returncode == 0
    for command in ("chat", "generate", "quantize", "fit", "bench"):
        assert command in r.stdout


def test_domain_error_is_one_line_without_traceback(tmp_path):
    missing = tmp_path / "[not] a model"
    r = run("generate", str(missing), "--prompt", "hi")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"error: no such model folder: {missing}"]  # brackets survive rich markup


ENV_PROBE = """
import os, sys
print("START", flush=True)  # a re-exec would print this twice
before = dict(os.environ)
sys.argv = ["qwen3-mlx", "fit", "qwen3-0.6b"]
import qwen3_mlx, qwen3_mlx.kernels
from qwen3_mlx.cli import main
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print("PROBE", dict(os.environ) == before, "LD_PRELOAD" in os.environ)
"""


def test_importing_and_running_a_command_leave_the_environment_alone():
    """No LD_PRELOAD, no re-exec: the linked OpenBLAS needs neither (a library user's process stays theirs)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    r = subprocess.run([sys.executable, "-c", ENV_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("START") == 1
    assert r.stdout.splitlines()[-1] == "PROBE True False"
