import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The suite checks the models against transformers and MLX on the exact float path; the integer kernels
# (activations quantized to int8) have their own tests (test_int8.py), which switch them on.
os.environ.setdefault("QWEN3_MLX_INT8", "0")


@pytest.fixture(scope="session")
def tokenizer_dir():
    from helpers import TOKENIZER_DIR

    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.fail(f"the Qwen3 tokenizer fixture is missing at {TOKENIZER_DIR}")
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random 2-layer Qwen3 with the real vocabulary and tokenizer, written by transformers (built once)."""
    from helpers import REAL_VOCAB, dense_config, save_checkpoint

    path = tmp_path_factory.mktemp("tiny-real-vocab")
    save_checkpoint(path, dense_config(vocab_size=REAL_VOCAB), tokenizer=True)
    return path
