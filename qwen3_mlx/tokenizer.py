"""Tokenizer of a model folder: `tokenizer.json` (the `tokenizers` library), special tokens, eos ids,
the model's own chat template (rendered in jinja2's sandbox) and a streaming detokenizer."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from .errors import ModelLoadError, Qwen3MLXError

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# Names a message's reasoning may come under; templates read `reasoning_content` (transformers aliases them the same way).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(Qwen3MLXError):
    """The model's chat template is missing, invalid, or refused the conversation."""


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # older configs store AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else None


@lru_cache(maxsize=8)
def _compile_template(source: str):
    """Compile a chat template in jinja2's immutable sandbox, with the globals and filters transformers provides,
    so that templates written for transformers render the same strings here."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters (<, >, &, ') which would change the prompt
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class _GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body.
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class _Namespace(jinja2.utils.Namespace):
        # No underscore attributes: nothing on a namespace may reach Python internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = lambda *a, **k: dict(*a, **k)
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types only: the sandbox trusts no foreign object's methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


class Tokenizer:
    """Byte-level BPE tokenizer of a Qwen3 folder, with its special tokens, eos ids and chat template."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        file = self.path / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(f"{self.path} has no tokenizer.json")
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - whatever the tokenizers library cannot read is a load error
            raise ModelLoadError(f"cannot read {file}: {e}") from None
        self.config = self._read_json("tokenizer_config.json")
        self.special_tokens = {
            name: tok for name in _SPECIAL_TOKEN_NAMES if (tok := _token_content(self.config.get(name))) is not None
        }
        self.eos_token_ids = self._eos_ids()
        self.think_start_id = self._tok.token_to_id(THINK_START)
        self.think_end_id = self._tok.token_to_id(THINK_END)
        self.chat_template = self._read_template()

    def _read_json(self, name: str) -> dict:
        f = self.path / name
        if not f.is_file():
            return {}
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{f} is not valid JSON: {e}") from None
        return data if isinstance(data, dict) else {}

    def _read_template(self) -> str | dict[str, str] | None:
        # transformers v5 saves the template as chat_template.jinja; older folders keep it inside tokenizer_config.json
        jinja_file = self.path / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text()
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            return {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t}
        return template if isinstance(template, str) else None

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            value = self._read_json(name).get("eos_token_id")
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
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) become their ids. Text
        that is not Unicode (a lone surrogate: bytes that were not UTF-8, as Python decodes arguments and stdin,
        or a JSON escape such as \\ud800) is a domain error."""
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # the tokenizers library's answer to a str it cannot convert
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                code = ord(text[e.start])
                what = (f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8" if 0xDC80 <= code <= 0xDCFF
                        else f"U+{code:04X}, a lone surrogate")
                raise Qwen3MLXError(f"the text is not valid Unicode: it holds {what} (after "
                                    f"{text[max(0, e.start - 20):e.start]!r})") from None
            raise

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for (part of a character, for a split multi-byte one); b"" if unknown."""
        piece = self._tok.id_to_token(i)
        if piece is None:
            return b""
        table = _byte_decoder()
        if all(c in table for c in piece):  # a byte-level BPE piece
            return bytes(table[c] for c in piece)
        return piece.encode()  # an added token, stored as its text

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what grammar libraries build their token tables from)."""
        return self._tok.to_str()

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def template_source(self, tools: list[dict] | None = None) -> str:
        """The chat template's text (the tool-use one of a named set when `tools` are given; "" without one)."""
        template = self.chat_template
        if isinstance(template, dict):
            template = (tools and template.get("tool_use")) or template.get("default")
        return template or ""

    @property
    def tool_call_form(self) -> str:
        """How this model writes a tool call, read off its template: "xml" (Qwen3.5 / 3.6:
        `<function=NAME><parameter=KEY>`) or "json" (Qwen3: `{"name": ..., "arguments": ...}`)."""
        return "xml" if "<function=" in self.template_source([{}]) else "json"

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        enable_thinking: bool = True,
        add_generation_prompt: bool = True,
        **kwargs,
    ) -> str:
        """Render a conversation with the model's own template, exactly as transformers' `apply_chat_template`
        (tokenize=False) does for the same arguments. Extra keyword arguments are passed to the template."""
        template = self.template_source(tools)
        if not template:
            raise ChatTemplateError(f"{self.path} has no chat template (tokenizer_config.json or chat_template.jinja)")
        if not messages:
            raise ChatTemplateError("cannot render an empty conversation")
        if tools is not None:
            for tool in tools:
                if not isinstance(tool, dict):
                    raise ChatTemplateError(f"tools must be JSON schemas (dicts), got {type(tool).__name__}")
        chat = []
        for message in messages:
            if not isinstance(message, dict):
                raise ChatTemplateError(f"chat messages must be dicts, got {message!r}")
            # Keys whose value is None are dropped (OpenAI-style content=None), then reasoning names are aliased.
            message = _plain({k: v for k, v in message.items() if v is not None})
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            chat.append(message)
        variables = _plain({**self.special_tokens, "enable_thinking": enable_thinking, **kwargs})
        compiled = _compile_template(template)
        import jinja2

        try:
            return compiled.render(
                messages=chat,
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"the chat template tried something unsafe: {e}") from None
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's map from a piece's characters back to bytes: printable bytes stand for
    themselves, the others for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


class StreamingDetokenizer:
    """Turns token ids into text as they arrive, emitting only whole characters.

    Byte-level BPE splits multi-byte characters across tokens; a partial character decodes to a trailing U+FFFD.
    Text is held back while the pending tokens end in U+FFFD; once they end on a character boundary the text is
    emitted and the pending tokens are dropped, so each step decodes only a few tokens. Decoding splits at
    character boundaries are exact, so the concatenated output equals `decode` of all the tokens.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []
        self.emitted = 0  # characters of decode(pending) already returned

    def add(self, token: int) -> str:
        """Feed one token; return the newly complete text ("" if a character is still incomplete)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            # The last character may be incomplete. Everything before the trailing U+FFFD run is final (UTF-8
            # resynchronises at the next lead byte), so that part can go out now.
            stable = text.rstrip("\ufffd")
            new = stable[self.emitted :]
            self.emitted = max(self.emitted, len(stable))
            return new
        new = text[self.emitted :]
        self.pending.clear()
        self.emitted = 0
        return new

    def flush(self) -> str:
        """The text still held back (a genuinely invalid byte sequence at the end); call once at the end."""
        if not self.pending:
            return ""
        text = self.tokenizer.decode(self.pending)[self.emitted :]
        self.pending.clear()
        self.emitted = 0
        return text


def load_tokenizer(model_path: str | Path) -> Tokenizer:
    return Tokenizer(model_path)
