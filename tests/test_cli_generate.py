"""`qwen3-mlx generate` end to end through the real entry point (`python -m qwen3_mlx`) on a tiny model."""

import os
import subprocess
import sys

import pytest
from helpers import save_thinker

from qwen3_mlx.cli.generate import ReasoningFilter


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    return save_thinker(tmp_path_factory.mktemp("thinker"))


def run(*args, command="generate"):
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "qwen3_mlx", command, *map(str, args)], capture_output=True, text=True, env=env, timeout=120
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


# Each case: options for one run, and those of them whose removal must change the output (a fixed seed makes
# sampling robust to filters that do not bind, so every option is shown to matter in a case where it binds).
OPTION_CASES = [
    (
        dict(temperature=1.5, top_p=0.5, presence_penalty=1.0, repetition_penalty=1.5),
        ["temperature", "top_p", "presence_penalty", "repetition_penalty", "seed"],
    ),
    (dict(temperature=1.5, top_p=1.0, top_k=50), ["top_k"]),
    (dict(temperature=1.5, top_p=1.0, top_k=0, min_p=0.5), ["min_p"]),
]
UNSET = dict(temperature=None, top_p=None, top_k=None, min_p=None, presence_penalty=0.0, repetition_penalty=None)


@pytest.mark.parametrize("options, binding", OPTION_CASES)
def test_generate_sampling_options_and_seed(tiny, options, binding):
    """Every sampling option reaches the library: the CLI prints what `generate` gives with the same options."""
    from qwen3_mlx.generate import generate
    from qwen3_mlx.loader import load

    flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
    proc = run(tiny, "--prompt", "Hi", "--max-tokens", "12", "--thinking-budget", "4", "--seed", "1", *flags)
    assert proc.returncode == 0, proc.stderr
    model, tokenizer = load(tiny)

    def answer(**changed):
        kw = dict(options, max_tokens=12, thinking_budget=4, seed=1) | changed
        return generate(model, tokenizer, [{"role": "user", "content": "Hi"}], **kw).answer.lstrip("\n") + "\n"

    assert proc.stdout == answer() and proc.stdout.strip()
    # the comparison can fail: the output depends on each of these options (and on the seed)
    for name in binding:
        assert answer(**{name: UNSET.get(name, 2)}) != proc.stdout, name


def test_reasoning_goes_to_stderr_when_piped(thinker):
    proc = run(thinker, "--prompt", "Hi", "--max-tokens", "20")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"  # `> answer.txt` holds the answer only
    assert "Let" in proc.stderr
    hidden = run(thinker, "--prompt", "Hi", "--max-tokens", "20", "--hide-thinking")
    assert hidden.stdout == "ok\n" and "Let" not in hidden.stderr


def test_help_shows_defaults_and_repetition_penalty():
    for command in ("generate", "chat"):
        proc = run("--help", command=command)
        assert proc.returncode == 0, proc.stderr
        assert "[default: 32768]" in proc.stdout and "[default: 20]" in proc.stdout
        assert "--repetition-penalty" in proc.stdout


def test_generate_bad_input_is_one_line(tiny, tmp_path):
    proc = run(tmp_path / "nope", "--prompt", "x")
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(tiny, "--prompt", "x", "--max-tokens", "0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    proc = run(tiny, "--prompt", "x", "--reasoning-effort", "low")  # the Qwen3 template does not read it
    assert proc.returncode == 1 and "does not read reasoning_effort" in proc.stderr and "Traceback" not in proc.stderr


def test_reasoning_filter_hides_tags():
    f = ReasoningFilter()
    shown = [f(t, s) for t, s in [("<think>", "reasoning"), ("\n", "reasoning"), ("Let me", "reasoning"),
                                  (" see.\n", "reasoning"), ("</think>", "reasoning"), ("\n\n", "answer"), ("Hi", "answer")]]
    assert "".join(shown[:5]) == "Let me see.\n"
    assert shown[5:] == ["", "Hi"]


def test_kv_bits_picks_a_group_for_head_dim_and_says_so(tmp_path):
    """--kv-bits on a model whose head_dim (32) 64 does not divide: the cache uses groups of 32, the stats line
    says so, and the answer is the library's with that group; a chosen group that does not divide is one line."""
    from helpers import REAL_VOCAB, dense_config, save_checkpoint

    from qwen3_mlx.generate import generate
    from qwen3_mlx.loader import load

    save_checkpoint(tmp_path, dense_config(vocab_size=REAL_VOCAB, head_dim=32), tokenizer=True)
    proc = run(tmp_path, "--prompt", "Hi", "--no-think", "--temperature", "0", "-m", "5", "--kv-bits", "8")
    assert proc.returncode == 0, proc.stderr
    assert "KV cache 8-bit, groups of 32" in proc.stderr
    model, tokenizer = load(tmp_path)
    expected = generate(model, tokenizer, [{"role": "user", "content": "Hi"}], enable_thinking=False, temperature=0,
                        max_tokens=5, kv_bits=8, kv_group_size=32)
    assert proc.stdout == expected.answer.lstrip("\n") + "\n"
    refused = run(tmp_path, "--prompt", "Hi", "-m", "2", "--kv-bits", "8", "--kv-group-size", "64")
    assert refused.returncode == 1 and "divide head_dim (32)" in refused.stderr and "Traceback" not in refused.stderr
