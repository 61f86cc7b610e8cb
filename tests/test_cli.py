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
