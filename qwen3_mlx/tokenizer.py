"""Tokenizer built from a model folder's tokenizer.json (the `tokenizers` library)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import ModelLoadError


class Tokenizer:
    """Byte-level BPE tokenizer of a Qwen3 folder, with its special tokens and eos ids."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        file = self.path / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(f"{self.path} has no tokenizer.json")
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as e:
            raise ModelLoadError(f"cannot read {file}: {e}") from None
        self.eos_token_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            f = self.path / name
            if f.is_file():
                value = json.loads(f.read_text()).get("eos_token_id")
                for i in value if isinstance(value, list) else [value]:
                    if isinstance(i, int) and i not in ids:
                        ids.append(i)
        for token in ("<|im_end|>", "<|endoftext|>"):
            i = self._tok.token_to_id(token)
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def load_tokenizer(model_path: str | Path) -> Tokenizer:
    return Tokenizer(model_path)
