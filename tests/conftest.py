import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tokenizer_dir():
    from helpers import TOKENIZER_DIR

    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.fail(f"the Qwen3 tokenizer fixture is missing at {TOKENIZER_DIR}")
    return TOKENIZER_DIR
