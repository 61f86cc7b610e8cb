import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    # MLX's CPU wheel ships a reference BLAS; with OpenBLAS preloaded the suite runs several times faster.
    from qwen3_mlx.blas import ensure_fast_blas

    ensure_fast_blas()


@pytest.fixture(scope="session")
def tokenizer_dir():
    from helpers import TOKENIZER_DIR

    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.fail(f"the Qwen3 tokenizer fixture is missing at {TOKENIZER_DIR}")
    return TOKENIZER_DIR
