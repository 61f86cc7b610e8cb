"""Prompt cache files: a saved prefix gives the logits of a fresh prefill, and each refusal says why."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from qwen3_mlx.cli import app
from qwen3_mlx.errors import Qwen3MLXError
from qwen3_mlx.models.cache import make_cache
from qwen3_mlx.prompt_cache import load_prompt_cache, save_prompt_cache, system_prompt_tokens

SYSTEM = "You are a careful assistant. " * 40  # a few hundred tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from helpers import REAL_VOCAB, dense_config, save_checkpoint

    path = tmp_path_factory.mktemp("prompt-cache-model")
    save_checkpoint(path, dense_config(vocab_size=REAL_VOCAB, head_dim=64, hidden_size=128), tokenizer=True)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from qwen3_mlx.loader import load

    return load(checkpoint)


def prefilled(model, tokens, kv_bits=None):
    cache = make_cache(model, kv_bits=kv_bits, kv_group_size=32)
    for i in range(0, len(tokens), 512):
        model(mx.array(tokens[i : i + 512])[None], cache)
        mx.eval([c.state for c in cache])
    return cache


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_a_saved_system_prompt_gives_the_logits_of_a_fresh_prefill(loaded, tmp_path, kv_bits):
    model, tokenizer = loaded
    tokens = system_prompt_tokens(tokenizer, SYSTEM)
    path = tmp_path / "system.safetensors"
    size = save_prompt_cache(path, model, prefilled(model, tokens, kv_bits), tokens, system=SYSTEM)
    assert size > 0
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What now?"}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
    assert ids[: len(tokens)] == tokens and len(ids) > len(tokens)
    pc = load_prompt_cache(path, model)
    assert pc.system == SYSTEM and pc.tokens == tokens
    cache, reused = pc.take(ids)
    assert reused == len(tokens)
    resumed = model(mx.array(ids[reused:])[None], cache)[0, -1]
    fresh = model(mx.array(ids)[None], make_cache(model, kv_bits=kv_bits, kv_group_size=32))[0, -1]
    np.testing.assert_allclose(np.array(resumed), np.array(fresh), atol=1e-4 if kv_bits is None else 2e-2)


def test_refusals(loaded, tmp_path):
    from qwen3_mlx.models.registry import random_model

    model, tokenizer = loaded
    tokens = system_prompt_tokens(tokenizer, SYSTEM)
    path = tmp_path / "c.safetensors"
    save_prompt_cache(path, model, prefilled(model, tokens), tokens, system=SYSTEM)
    other = random_model(dict(model.args.to_dict()), mx.float32, seed=1)  # same shape, other weights
    with pytest.raises(Qwen3MLXError, match="made for another model"):
        load_prompt_cache(path, other)
    pc = load_prompt_cache(path, model)
    wrong = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]))
    with pytest.raises(Qwen3MLXError, match="does not start with the .* cached tokens"):
        pc.take(wrong)
    with pytest.raises(Qwen3MLXError, match="no prompt cache file"):
        load_prompt_cache(tmp_path / "missing.safetensors", model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(Qwen3MLXError, match="not a prompt cache file"):
        load_prompt_cache(tmp_path / "junk.safetensors", model)
    # The whole prompt cached: one token is left for the generator to feed.
    cache, reused = load_prompt_cache(path, model).take(tokens)
    assert reused == len(tokens) - 1 and cache[0].offset == reused


def test_cli_cache_prompt_then_generate_and_chat(checkpoint, tmp_path):
    runner = CliRunner()
    text = tmp_path / "system.txt"
    text.write_text(SYSTEM)
    out = tmp_path / "system.safetensors"
    r = runner.invoke(app, ["cache-prompt", str(checkpoint), "--prompt-file", str(text), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "cached" in r.output
    r = runner.invoke(app, ["generate", str(checkpoint), "-p", "Hello", "--prompt-cache", str(out), "--max-tokens",
                            "4", "--temperature", "0", "--no-think"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["chat", str(checkpoint), "--prompt-cache", str(out), "--max-tokens", "4",
                            "--temperature", "0"], input="Hello\n/stats\n")
    assert r.exit_code == 0, r.output
    # Refused with one red line and exit code 1 (the real entry point, as a user runs it).
    def cli(*args):
        import subprocess
        import sys

        return subprocess.run([sys.executable, "-m", "qwen3_mlx", *map(str, args)], capture_output=True, text=True,
                              timeout=300, input="")

    r = cli("chat", checkpoint, "--prompt-cache", out, "--system", "other")
    assert r.returncode == 1 and "differs from the system prompt" in r.stderr and "Traceback" not in r.stderr
    raw = tmp_path / "raw.safetensors"
    assert runner.invoke(app, ["cache-prompt", str(checkpoint), "-f", str(text), "-o", str(raw), "--raw"]).exit_code == 0
    r = cli("chat", checkpoint, "--prompt-cache", raw)
    assert r.returncode == 1 and "raw prompt" in r.stderr
    r = cli("generate", checkpoint, "-p", "Hi", "--prompt-cache", raw)
    assert r.returncode == 1 and "does not start with" in r.stderr and len(r.stderr.strip().splitlines()) <= 2
