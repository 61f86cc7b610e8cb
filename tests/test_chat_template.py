"""The official Qwen3 chat template rendered by us must give transformers' `apply_chat_template` strings."""

import json

import pytest

from qwen3_mlx.options import GenerationOptions
from qwen3_mlx.tokenizer import ChatTemplateError, Tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city. Uses <b>HTML</b> & 'quotes'.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Sofia / 北京"}},
            "required": ["city"],
        },
    },
}
CALC = {
    "type": "function",
    "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic expression",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}

CONVERSATIONS = {
    "single_turn": {"messages": [{"role": "user", "content": "What is 2+2?"}]},
    "system_prompt": {
        "messages": [
            {"role": "system", "content": "You are a terse assistant. /no_think"},
            {"role": "user", "content": "Name a prime."},
        ]
    },
    "multi_turn_thinking_stripped": {
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?"},
            {"role": "user", "content": "Tell me a joke. /think"},
            {"role": "assistant", "content": "<think>\nA short joke.\n</think>\n\nWhy did the chicken cross the road?"},
            {"role": "user", "content": "Why?"},
        ]
    },
    "reasoning_content_field": {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "reasoning_content": "be nice"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye", "reasoning_content": "say bye"},
        ],
        "add_generation_prompt": False,
    },
    "thinking_off": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of Bulgaria?"},
        ],
        "enable_thinking": False,
    },
    "thinking_off_multi_turn": {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\n\n</think>\n\nHello!"},
            {"role": "user", "content": "你好吗？"},
        ],
        "enable_thinking": False,
    },
    "tools_first_call": {
        "messages": [
            {"role": "system", "content": "You help with weather."},
            {"role": "user", "content": "Weather in Sofia?"},
        ],
        "tools": [WEATHER, CALC],
    },
    "tools_with_calls_and_responses": {
        "messages": [
            {"role": "user", "content": "Weather in Sofia and Paris?"},
            {
                "role": "assistant",
                "content": "<think>\nTwo cities, two calls.\n</think>\n\nLet me check.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Sofia"}}},
                    {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                ],
            },
            {"role": "tool", "content": json.dumps({"temp": 21, "sky": "clear"})},
            {"role": "tool", "content": "18 C, rain"},
        ],
        "tools": [WEATHER],
    },
    "multi_step_tool_loop": {
        "messages": [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "What is (3+4)*weather temp in Sofia?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "First the weather.",
                "tool_calls": [{"name": "get_weather", "arguments": {"city": "Sofia"}}],
            },
            {"role": "tool", "content": "21"},
            {
                "role": "assistant",
                "content": "<think>\nNow compute.\n</think>\n\n",
                "tool_calls": [{"function": {"name": "calculate", "arguments": {"expression": "(3+4)*21"}}}],
            },
            {"role": "tool", "content": "147"},
            {"role": "assistant", "content": "<think>\nDone.\n</think>\n\nThe answer is 147."},
            {"role": "user", "content": "Thanks! And in Plovdiv?"},
        ],
        "tools": [WEATHER, CALC],
    },
    "tool_response_as_user_text": {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "<tool_call>\n{\"name\": \"calculate\", \"arguments\": {}}\n</tool_call>"},
            {"role": "user", "content": "<tool_response>\n5\n</tool_response>"},
        ],
        "tools": [CALC],
    },
    "none_values_dropped": {
        "messages": [
            {"role": "user", "content": "x", "name": None},
            {"role": "assistant", "content": "y", "tool_calls": None, "reasoning_content": None},
            {"role": "user", "content": "z"},
        ]
    },
}


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return Tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_template_matches_transformers(ours, reference, name):
    case = CONVERSATIONS[name]
    kwargs = {k: v for k, v in case.items() if k != "messages"}
    kwargs.setdefault("add_generation_prompt", True)
    kwargs.setdefault("enable_thinking", True)
    expected = reference.apply_chat_template(case["messages"], tokenize=False, **kwargs)
    got = ours.apply_chat_template(case["messages"], **kwargs)
    assert got == expected
    # and the token ids of the rendered prompt agree too
    assert ours.encode(got) == reference.apply_chat_template(case["messages"], tokenize=True, return_dict=False, **kwargs)


def test_thinking_switch_and_history(ours):
    on = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    off = ours.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    history = ours.apply_chat_template(CONVERSATIONS["multi_turn_thinking_stripped"]["messages"])
    assert "The user greets me" not in history and "Hello! How can I help?" in history
    assert "/think" in history  # soft switches pass through untouched


def test_template_is_sandboxed(ours, tmp_path, tokenizer_dir):
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    evil = Tokenizer(tmp_path)
    with pytest.raises(ChatTemplateError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    with pytest.raises(ChatTemplateError, match="no system role"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_template(tmp_path, tokenizer_dir):
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


# A Qwen3.6-style switch: earlier turns keep their reasoning only with preserve_thinking.
PRESERVE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.role == 'assistant' and m.reasoning_content and (preserve_thinking or loop.last) %}"
    "<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_extra_template_variables_pass_through_as_in_transformers(tmp_path, tokenizer_dir):
    """chat_template_kwargs reach the template and render as transformers renders
    the same keyword; the arguments set by their own options cannot be overridden through them."""
    import json

    from transformers import AutoTokenizer

    from qwen3_mlx.errors import Qwen3MLXError
    from qwen3_mlx.generate import prompt_tokens

    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": PRESERVE}))
    ours, reference = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Add."},
                {"role": "user", "content": "And 3+3?"}]
    for preserve in (True, False):
        want = reference.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True,
                                             preserve_thinking=preserve)
        kwargs = GenerationOptions(chat_template_kwargs={"preserve_thinking": preserve})
        assert prompt_tokens(ours, messages, kwargs) == want
    preserve = GenerationOptions(chat_template_kwargs={"preserve_thinking": True})
    assert "Add." in ours.decode(prompt_tokens(ours, messages, preserve))
    assert "Add." not in ours.decode(prompt_tokens(ours, messages))
    with pytest.raises(Qwen3MLXError, match="cannot set enable_thinking"):
        prompt_tokens(ours, messages, GenerationOptions(chat_template_kwargs={"enable_thinking": False}))


def test_image_content_is_refused_with_a_clear_error(ours):
    from qwen3_mlx.errors import Qwen3MLXError
    from qwen3_mlx.generate import prompt_tokens

    for part in ({"type": "image", "image": "cat.png"}, {"type": "image_url", "image_url": {"url": "data:,"}},
                 {"image": "cat.png"}, {"type": "video", "video": "v.mp4"}):
        with pytest.raises(Qwen3MLXError, match="content is not supported: qwen3-mlx runs the language model only"):
            prompt_tokens(ours, [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, part]}])


EFFORT = (
    "{%- set effort = reasoning_effort if reasoning_effort is defined else 'xhigh' %}"
    "{%- if effort not in ['xhigh', 'medium', 'low'] %}{{ raise_exception('reasoning_effort: ' ~ effort) }}{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n<think>\nEffort: {{ effort }}.\n{% endif %}"
)


def test_reasoning_effort_reaches_a_template_that_reads_it_and_is_refused_otherwise(tmp_path, tokenizer_dir, ours):
    """As transformers renders the keyword; the Qwen3 template, which never reads it, refuses it in one line."""
    import json

    from transformers import AutoTokenizer

    from qwen3_mlx.errors import Qwen3MLXError
    from qwen3_mlx.generate import prompt_tokens

    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": EFFORT}))
    effort_tok, reference = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "2+2?"}]
    for effort in ("low", "medium", "xhigh"):
        want = reference.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True,
                                             reasoning_effort=effort)
        assert prompt_tokens(effort_tok, messages, GenerationOptions(reasoning_effort=effort)) == want
    assert "Effort: xhigh." in effort_tok.decode(prompt_tokens(effort_tok, messages))
    with pytest.raises(Qwen3MLXError, match="reasoning_effort: high"):  # the template's own refusal
        prompt_tokens(effort_tok, messages, GenerationOptions(reasoning_effort="high"))
    with pytest.raises(Qwen3MLXError, match="does not read reasoning_effort"):
        prompt_tokens(ours, messages, GenerationOptions(reasoning_effort="low"))
    with pytest.raises(Qwen3MLXError, match="reasoning_effort"):
        prompt_tokens(effort_tok, messages, GenerationOptions(chat_template_kwargs={"reasoning_effort": "low"}))


def test_text_that_is_not_unicode_is_a_domain_error(ours):
    """Bytes that are not UTF-8 reach Python strings as lone surrogates (arguments, stdin with surrogateescape) and
    JSON can spell one (\\ud800): the tokenizer refuses them in one line, not with the tokenizers library's
    TypeError."""
    from qwen3_mlx.errors import Qwen3MLXError

    with pytest.raises(Qwen3MLXError, match=r"the byte 0xe9, which is not UTF-8 \(after 'caf'\)"):
        ours.encode(b"caf\xe9".decode("utf-8", "surrogateescape"))
    with pytest.raises(Qwen3MLXError, match="U\\+D800, a lone surrogate"):
        ours.encode(json.loads('"a\\ud800b"'))
    assert ours.decode(ours.encode("café")) == "café"
