"""`qwen3-mlx generate` end to end through the real entry point (`python -m qwen3_mlx`) on a tiny model."""

import os
import subprocess
import sys

import pytest
from helpers import REAL_VOCAB, dense_config, save_checkpoint

from qwen3_mlx.cli.generate import ReasoningFilter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-cli-gen")
    save_checkpoint(path, dense_config(vocab_size=REAL_VOCAB), tokenizer=True)
    return path


def run(*args):
    env = dict(os.environ, NO_COLOR="1")
    return subprocess.run(
        [sys.executable, "-m", "qwen3_mlx", "generate", *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def test_generate_streams_answer_and_stats(tiny):
    from qwen3_mlx.generate import generate
    from qwen3_mlx.loader import load

    proc = run(tiny, "--prompt", "Hello there", "--system", "Be brief.", "--no-think", "--temperature", "0", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    model, tokenizer = load(tiny)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    expected = generate(model, tokenizer, messages, enable_thinking=False, temperature=0, max_tokens=12)
    assert proc.stdout == expected.answer.lstrip("\n") + "\n"
    assert "generation 12 tokens" in proc.stderr and "tok/s" in proc.stderr and "peak memory" in proc.stderr
    assert "max-tokens" in proc.stderr


def test_generate_sampling_options_and_seed(tiny):
    common = [tiny, "--prompt", "Hi", "--max-tokens", "10", "--top-p", "0.9", "--top-k", "5", "--min-p", "0.01",
              "--presence-penalty", "0.5", "--thinking-budget", "4", "--hide-thinking"]
    a = run(*common, "--seed", "1", "--temperature", "0.9")
    b = run(*common, "--seed", "1", "--temperature", "0.9")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_generate_bad_input_is_one_line(tiny, tmp_path):
    proc = run(tmp_path / "nope", "--prompt", "x")
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(tiny, "--prompt", "x", "--max-tokens", "0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_reasoning_filter_hides_tags():
    f = ReasoningFilter()
    shown = [f(t, s) for t, s in [("<think>", "reasoning"), ("\n", "reasoning"), ("Let me", "reasoning"),
                                  (" see.\n", "reasoning"), ("</think>", "reasoning"), ("\n\n", "answer"), ("Hi", "answer")]]
    assert "".join(shown[:5]) == "Let me see.\n"
    assert shown[5:] == ["", "Hi"]
