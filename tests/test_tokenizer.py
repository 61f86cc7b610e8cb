"""Our tokenizer against transformers' own (the reference), and the streaming detokenizer's invariants."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3_mlx.tokenizer import StreamingDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! How are you doing today?",
    "你好，世界！今天天气怎么样？我们去公园散步吧。",
    "Здравей, свят! Как си днес? Българският език използва кирилица.",
    "សួស្តីពិភពលោក! ភាសាខ្មែរមានអក្សរផ្ទាល់ខ្លួន។",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🇧🇬 🤖✨ ❤️",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "spaces:     \t\t  \n\n\n   end   ",
    "digits 1234567890 3.14159265358979 0000000 12,345,678",
    "mixed: The 日本語 текст and العربية with 🎉 in 2025-05-14T10:00:00Z",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nreason\n</think>\n\n<tool_call>{}</tool_call>",
]


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return Tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(ours, reference, text):
    expected = reference.encode(text, add_special_tokens=False)
    assert ours.encode(text) == expected
    assert ours.decode(expected) == reference.decode(expected) == text


def test_special_tokens_and_eos(ours, tmp_path, tokenizer_dir):
    assert ours.token_to_id("<|im_end|>") == 151645
    assert ours.token_to_id("<|endoftext|>") == 151643
    assert (ours.think_start_id, ours.think_end_id) == (151667, 151668)
    assert ours.encode("<tool_call></tool_call>") == [151657, 151658]
    assert ours.vocab_size == 151669
    assert set(ours.eos_token_ids) == {151645, 151643}
    assert ours.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    # eos ids from generation_config.json come first and are kept
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 151645]}))
    assert Tokenizer(tmp_path).eos_token_ids == [7, 151645, 151643]


def stream(tok, ids):
    detok = StreamingDetokenizer(tok)
    chunks = [detok.add(i) for i in ids]
    chunks.append(detok.flush())
    return chunks


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode(ours, text):
    ids = ours.encode(text)
    chunks = stream(ours, ids)
    assert "".join(chunks) == ours.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


def test_split_character_is_held_until_complete(ours):
    # A rare CJK character is split into byte tokens: nothing broken is emitted, then the whole character at once.
    text = "a𠜎b"
    ids = ours.encode(text)
    assert len(ids) > 3, "expected the character to span several byte-level tokens"
    chunks = stream(ours, ids)
    assert "".join(chunks) == text
    assert "𠜎" in chunks or any("𠜎" in c for c in chunks)
    assert all("\ufffd" not in c for c in chunks)


def test_genuinely_invalid_bytes_pass_through(ours):
    # A lone continuation byte decodes to U+FFFD in the full text too; the stream must still match decode.
    byte_token = ours.token_to_id("\u0100")  # byte-level symbol of byte 0x00
    lone = ours.token_to_id("Ģ")  # byte-level symbol of 0x80 (a lone continuation byte)
    ids = ours.encode("x") + [lone] + ours.encode("y") + [byte_token]
    chunks = stream(ours, ids)
    assert "".join(chunks) == ours.decode(ids)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=60))
def test_stream_property(ours, text):
    ids = ours.encode(text)
    full = ours.decode(ids)
    chunks = stream(ours, ids)
    assert "".join(chunks) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in c for c in chunks)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=151668), max_size=30))
def test_stream_property_random_ids(ours, ids):
    # Arbitrary token sequences (not just encodings of valid text): split bytes, lone bytes, special tokens.
    full = ours.decode(ids)
    chunks = stream(ours, ids)
    assert "".join(chunks) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in c for c in chunks)
