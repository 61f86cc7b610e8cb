"""Enforced tool calls (issue 23): every call the constrained sampler lets out parses, names a declared tool and
validates against that tool's schema (`jsonschema`, the independent judge), in both of Qwen's forms (Qwen3 JSON,
Qwen3.5 XML), for tool_choice auto / required / none / a named tool, with and without parallel calls, after free
reasoning; schemas llguidance cannot express are refused before any token; and the server answers the same."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from helpers import REAL_VOCAB
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3_mlx.generate import generate
from qwen3_mlx.grammar import GrammarError, tool_grammar
from qwen3_mlx.loader import load
from qwen3_mlx.tools import parse_tool_calls

THINK, END_THINK, IM_END = 151667, 151668, 151645
TOOL_CALL, END_TOOL_CALL = 151657, 151658
USER = [{"role": "user", "content": "What is the weather like?"}]
RANDOM = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # the whole (masked) distribution, no filter

# A Qwen3.5-style template: tools as JSON in <tools>, calls in the XML form, and the generation prompt that opens
# <think> (thinking on) or writes an empty block (thinking off), as Qwen3.5's own template does.
XML_TEMPLATE = r"""{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- '# Tools\n\nYou have access to the following functions:\n\n<tools>' }}
{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
{{- '\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\n' + (message.content or '') }}
{%- for tool_call in message.tool_calls or [] %}
{%- set fn = tool_call.function if tool_call.function is defined else tool_call %}
{{- '\n<tool_call>\n<function=' + fn.name + '>\n' }}
{%- for key, value in (fn.arguments or {}).items() %}
{{- '<parameter=' + key + '>\n' + (value if value is string else (value | tojson)) + '\n</parameter>\n' }}
{%- endfor %}
{{- '</function>\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- else %}{{- '<think>\n' }}{%- endif %}
{%- endif %}
"""


def xml_checkpoint(src: Path, dst: Path) -> Path:
    """`src` with the XML-form template: the weights linked, tokenizer_config.json rewritten."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "tokenizer_config.json":
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = XML_TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def forms(tiny_checkpoint, tmp_path_factory):
    """The random tiny model with Qwen3's template (JSON calls) and with a Qwen3.5-style one (XML calls)."""
    json_model, json_tok = load(tiny_checkpoint)
    xml_dir = xml_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("tiny-xml") / "m")
    xml_model, xml_tok = load(xml_dir)
    assert json_tok.tool_call_form == "json" and xml_tok.tool_call_form == "xml"
    return {"json": SimpleNamespace(model=json_model, tok=json_tok, path=tiny_checkpoint),
            "xml": SimpleNamespace(model=xml_model, tok=xml_tok, path=xml_dir)}


def tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"the {name} tool", "parameters": parameters}}


def schema_of(tools: list[dict], name: str) -> dict:
    return next(t["function"]["parameters"] for t in tools if t["function"]["name"] == name)


def check_calls(result, tools, *, named: str | None = None, at_most_one: bool = False) -> bool:
    """Every call in `result` parses, names a declared tool (`named` if given) and validates against its schema.
    A generation cut by max_tokens may leave its last call unterminated: that one alone is not judged. Returns
    whether the generation finished (eos)."""
    calls = result.tool_calls
    finished = result.finish_reason == "stop"
    judged = calls if finished or not calls else calls[:-1]
    if not finished and calls and calls[-1].ok and result.answer.rstrip().endswith("</tool_call>"):
        judged = calls
    declared = {t["function"]["name"] for t in tools}
    for call in judged:
        assert call.ok, (call.error, result.answer)
        assert call.name in declared and (named is None or call.name == named), result.answer
        jsonschema.validate(call.arguments, schema_of(tools, call.name))
    if at_most_one:
        assert len(calls) <= 1 and result.answer.count("<tool_call>") <= 1, result.answer
    return finished


def outside_calls(answer: str) -> str:
    """The answer with its complete <tool_call> blocks taken out."""
    return re.sub(r"<tool_call>.*?</tool_call>", "", answer, flags=re.DOTALL)


# ---------------------------------------------------------------------------------------------------------------
# Hypothesis: tool parameter schemas. Kept small so a random model finishes a call in well under max_tokens.

WORDS = st.text(alphabet="abcdefgxyz", min_size=1, max_size=6)
KEYS = st.text(alphabet="abcdefghk_", min_size=1, max_size=5)


@st.composite
def integers(draw):
    schema = {"type": "integer"}
    lo = draw(st.none() | st.integers(-50, 50))
    hi = draw(st.none() | st.integers(-50, 50))
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi if lo is None else max(lo, hi)
    return schema


@st.composite
def numbers(draw):
    schema = {"type": "number"}
    if draw(st.booleans()):
        lo = draw(st.integers(-20, 20))
        schema.update(minimum=lo, maximum=lo + draw(st.integers(0, 30)))
    return schema


def leaves(free_strings: bool):
    enums = st.lists(WORDS, min_size=1, max_size=4, unique=True).map(lambda e: {"type": "string", "enum": e})
    out = enums | integers() | numbers() | st.just({"type": "boolean"})
    if free_strings:
        out = out | st.integers(1, 8).map(lambda n: {"type": "string", "maxLength": n})
    return out


def objects(values, max_props=3):
    @st.composite
    def build(draw):
        props = draw(st.dictionaries(KEYS, values, min_size=1, max_size=max_props))
        keys = list(props)
        required = draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
        schema = {"type": "object", "properties": props}
        if required:
            schema["required"] = required
        # Mostly closed: in an open object a random model may invent a key, and a random key rarely ends.
        if draw(st.sampled_from(["closed"] * 7 + ["open"])) == "closed":
            schema["additionalProperties"] = False
        return schema

    return build()


def values(free_strings: bool):
    """A property's schema: a leaf, an array of leaves, or an object of leaves (inside JSON, even in XML)."""
    leaf = leaves(free_strings)
    arrays = st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, leaf, st.integers(1, 3))
    return leaf | arrays | objects(leaves(True) | arrays, max_props=2)


def parameters(form: str):
    # The XML form writes a string parameter as raw text, ended by "\n</parameter>" (a random model almost never
    # writes that): its top-level strings are enums; strings nested in JSON values are bounded ones.
    top = leaves(free_strings=form == "json") | values(free_strings=True).filter(lambda s: s.get("type") != "string")
    return objects(top, max_props=4)


def toolsets(form: str):
    names = st.lists(st.sampled_from(["get_weather", "lookup", "f_1", "search.web"]), min_size=1, max_size=2,
                     unique=True)
    return names.flatmap(lambda ns: st.tuples(*[parameters(form).map(lambda p, n=n: tool(n, p)) for n in ns])
                         .map(list))


def hypothesis_settings(examples: int):
    # Derandomized: the same examples every run, so the share of runs that finish within max_tokens (a random
    # model may ramble inside a string) is a fixed number, not a coin toss in CI. The slow variant draws more.
    return settings(max_examples=examples, deadline=None, database=None, derandomize=examples < 20,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Opener:
    """A real model whose answer opens a tool call after `after` sampled tokens (a strong push towards
    <tool_call> until it is written); what follows is the random model's own (masked) choice."""

    def __init__(self, model, after: int, token: int = TOOL_CALL):
        self.model, self.args, self.after, self.token = model, model.args, after, token
        self.steps = 0
        self.sampled: list[int] = []  # tokens fed after the prompt
        self.bias = mx.where(mx.arange(model.args.vocab_size) == token, 60.0, 0.0)

    @property
    def layers(self):
        return self.model.layers

    def fill(self, inputs, cache):
        self.model.fill(inputs, cache)

    def __call__(self, inputs, cache=None):
        if self.steps:
            self.sampled.extend(inputs.reshape(-1).tolist())
        self.steps += 1
        logits = self.model(inputs, cache)
        if self.steps > self.after and self.token not in self.sampled:
            logits = logits + self.bias
        return logits


@pytest.mark.parametrize("form", ["json", "xml"])
@pytest.mark.parametrize("choice", ["required", "auto", "named"])
def test_random_models_calls_validate(forms, form, choice):
    random_calls_validate(forms, form, choice, examples=4)  # the slow variant below draws 60


@pytest.mark.slow
@pytest.mark.parametrize("form", ["json", "xml"])
@pytest.mark.parametrize("choice", ["required", "auto", "named"])
def test_random_models_calls_validate_many(forms, form, choice):
    random_calls_validate(forms, form, choice, examples=60)


def random_calls_validate(forms, form, choice, examples):
    """Hypothesis draws tools (nested objects, arrays, string enums, bounded integers, numbers, booleans, required
    keys, closed objects) and seeds; a random model at temperature 1 fills the calls. "auto": the model is pushed
    to open a call after a few free tokens, then left to itself."""
    m = forms[form]
    stats = Counter()

    @hypothesis_settings(examples)
    @given(tools=toolsets(form), seed=st.integers(0, 2**31), free=st.integers(0, 4), data=st.data())
    def run(tools, seed, free, data):
        named = None
        model = m.model
        if choice == "named":
            named = data.draw(st.sampled_from([t["function"]["name"] for t in tools]))
            tool_choice = data.draw(st.sampled_from([named, {"type": "function", "function": {"name": named}}]))
        elif choice == "auto":
            tool_choice, model = "auto", Opener(m.model, after=free)
        else:
            tool_choice = "required"
        r = generate(model, m.tok, USER, tools=tools, tool_choice=tool_choice, enable_thinking=False, seed=seed,
                     max_tokens=200, **RANDOM)
        stats["total"] += 1
        stats["finished"] += check_calls(r, tools, named=named)
        assert r.tool_calls, r.answer
        if choice == "auto":
            head = r.answer[: r.answer.index("<tool_call>")]
            assert "<function=" not in head and r.tokens.count(TOOL_CALL) >= 1
        else:  # calls only: nothing but whitespace outside them (a cut-off last call aside)
            assert r.answer.startswith("<tool_call>"), r.answer
            if r.finish_reason == "stop":
                assert outside_calls(r.answer).strip() == "", r.answer

    run()
    assert stats["total"] >= examples - 1 and stats["finished"] >= 0.6 * stats["total"], stats


def test_unconstrained_random_model_writes_no_valid_call(forms):
    """The control: the same push to <tool_call> without tools' grammar (tools given to the template only via a
    hand-rendered prompt) gives calls that do not parse."""
    m = forms["json"]
    prompt = m.tok.apply_chat_template(USER, tools=[tool("get_weather", {"type": "object"})], enable_thinking=False)
    bad = 0
    for seed in range(4):
        r = generate(Opener(m.model, after=0), m.tok, prompt, seed=seed, max_tokens=40, **RANDOM)
        calls = parse_tool_calls(r.text)
        bad += bool(calls) and not all(c.ok for c in calls)
    assert bad == 4


# ---------------------------------------------------------------------------------------------------------------
# Scripted models: logits a rule decides, over seeded noise (so a masked-out favourite leaves a random choice).


class ScriptedModel:
    """Stands in for a model: `rule(tokens sampled so far)` names the favoured token (or None), by a wide margin
    over seeded random noise."""

    def __init__(self, rule, seed=0, vocab=REAL_VOCAB):
        self.args = SimpleNamespace(vocab_size=vocab)
        self.layers = [None]
        self.rule = rule
        self.rng = np.random.default_rng(seed)
        self.sampled: list[int] = []
        self.steps = 0

    def fill(self, inputs, cache):
        pass

    def __call__(self, inputs, cache=None):
        if self.steps:
            self.sampled.extend(inputs.reshape(-1).tolist())
        self.steps += 1
        logits = self.rng.standard_normal((1, inputs.shape[1], self.args.vocab_size)).astype(np.float32)
        favoured = self.rule(self.sampled)
        if favoured is not None:
            logits[0, -1, favoured] = 50.0
        return mx.array(logits)


def script(tokens: list[int], then=None):
    """A rule that writes `tokens` in order, then favours `then(sampled)`."""
    def rule(sampled):
        if len(sampled) < len(tokens):
            return tokens[len(sampled)]
        return then(sampled) if then else None
    return rule


def spelled(tok, text: str) -> list[int]:
    """`text` as ordinary text tokens, one character at a time (never the special token it may spell)."""
    return [t for ch in text for t in tok.encode(ch)]


SIMPLE = [tool("get_weather", {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                                            "maximum": 7},
    "metric": {"type": "boolean"}}, "required": ["city", "days"], "additionalProperties": False}),
    tool("get_time", {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
                      "required": ["tz"], "additionalProperties": False})]


@pytest.mark.parametrize("form", ["json", "xml"])
def test_none_never_lets_a_call_out(forms, form):
    m = forms[form]
    tok = m.tok
    # a random model, many seeds
    for seed in range(4):
        r = generate(m.model, tok, USER, tools=SIMPLE, tool_choice="none", enable_thinking=False, seed=seed,
                     max_tokens=40, **RANDOM)
        assert TOOL_CALL not in r.tokens and r.tool_calls == [] and "<tool_call>" not in r.answer
    # a model that wants nothing but <tool_call>
    r = generate(ScriptedModel(lambda s: TOOL_CALL), tok, USER, tools=SIMPLE, tool_choice="none",
                 enable_thinking=False, temperature=0, max_tokens=30)
    assert TOOL_CALL not in r.tokens and r.tool_calls == [] and len(r.tokens) == 30
    # one that spells the opening tags out as text, in this form's own way
    opening = "<tool_call>\n<function=get_weather>\n" if form == "xml" else '<tool_call>\n{"name": "get_weather"'
    for text in ([opening] if form == "json" else [opening, "<function=get_weather>\n"]):
        r = generate(ScriptedModel(script(spelled(tok, text), lambda s: IM_END)), tok, USER, tools=SIMPLE,
                     tool_choice="none", enable_thinking=False, temperature=0, max_tokens=40)
        assert r.tool_calls == [] and "<tool_call>" not in r.answer, r.answer
        if form == "xml":
            assert "<function=" not in r.answer, r.answer
    # the control: without tool_choice none the same scripted model does open a call
    r = generate(ScriptedModel(lambda s: TOOL_CALL if not s else IM_END), tok, USER, tools=SIMPLE,
                 tool_choice="auto", enable_thinking=False, temperature=0, max_tokens=30)
    assert r.tokens[0] == TOOL_CALL


@pytest.mark.parametrize("choice", ["none", "auto"])
def test_json_form_spelled_xml_call_is_not_a_call(forms, choice):
    """A Qwen3 (JSON-form) model that writes the unwrapped XML form as text, of an undeclared tool: the parser
    reads either form, so free text must not open one either (it would be a call no grammar held, under "none"
    too)."""
    m = forms["json"]
    text = "<function=nope>\n<parameter=x>\n1\n</parameter>\n</function>"
    r = generate(ScriptedModel(script(spelled(m.tok, text), lambda s: IM_END)), m.tok, USER, tools=SIMPLE,
                 tool_choice=choice, enable_thinking=False, temperature=0, max_tokens=80)
    assert r.tool_calls == [], r.answer


@pytest.mark.parametrize("form", ["json", "xml"])
@pytest.mark.parametrize("seed", [0, 1])
def test_auto_text_then_call_held_to_the_schema(forms, form, seed):
    """"auto": free text, then <tool_call>; after it the model wants the same garbage token at every step (and
    noise otherwise). The garbage is masked, and the call that comes out validates."""
    m = forms[form]
    tok = m.tok
    text = tok.encode("Let me check.\n")
    garbage = tok.encode(" banana")[0]
    rule = script(text + [TOOL_CALL], lambda s: garbage)
    r = generate(ScriptedModel(rule, seed=seed), tok, USER, tools=SIMPLE, tool_choice="auto",
                 parallel_tool_calls=False, enable_thinking=False, temperature=0, max_tokens=150)
    assert r.answer.startswith("Let me check.\n<tool_call>")
    after = r.tokens[r.tokens.index(TOOL_CALL):]
    assert garbage not in after and r.finish_reason == "stop" and r.tokens[-1] in tok.eos_token_ids
    (call,) = r.tool_calls
    assert call.ok and call.name in ("get_weather", "get_time"), r.answer
    jsonschema.validate(call.arguments, schema_of(SIMPLE, call.name))
    # the control: without tools the same model writes its garbage
    free = generate(ScriptedModel(rule, seed=seed), tok, USER, enable_thinking=False, temperature=0, max_tokens=20)
    assert free.tokens.count(garbage) > 5 and not all(c.ok for c in free.tool_calls)


def wants_more_calls(tok):
    """A model that, after each </tool_call>, wants a newline and another <tool_call> (noise otherwise)."""
    newline = tok.encode("\n")[0]

    def rule(sampled):
        if not sampled:
            return TOOL_CALL
        if sampled[-1] == END_TOOL_CALL:
            return newline
        if len(sampled) >= 2 and sampled[-2] == END_TOOL_CALL:
            return TOOL_CALL
        return None
    return rule


@pytest.mark.parametrize("form", ["json", "xml"])
def test_parallel_tool_calls_false_allows_one_call(forms, form):
    m = forms[form]
    common = {"tools": SIMPLE, "tool_choice": "required", "enable_thinking": False, "temperature": 0,
              "max_tokens": 160}
    for seed in range(3):
        r = generate(ScriptedModel(wants_more_calls(m.tok), seed=seed), m.tok, USER, parallel_tool_calls=False,
                     **common)
        assert r.finish_reason == "stop" and r.tokens.count(TOOL_CALL) == 1
        check_calls(r, SIMPLE, at_most_one=True)
        assert len(r.tool_calls) == 1
    # the control: with parallel calls the same model writes more than one, each valid
    r = generate(ScriptedModel(wants_more_calls(m.tok), seed=0), m.tok, USER, parallel_tool_calls=True, **common)
    assert len(r.tool_calls) >= 2
    check_calls(r, SIMPLE)


@pytest.mark.parametrize("form", ["json", "xml"])
def test_named_choice_overrides_a_model_that_wants_the_other_tool(forms, form):
    """The model spells a call of get_time; tool_choice names get_weather: every call is get_weather's."""
    m = forms[form]
    other = ('\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n' if form == "json"
             else "\n<function=get_time>\n<parameter=tz>\nUTC\n</parameter>\n</function>\n")
    rule = script([TOOL_CALL] + m.tok.encode(other) + [END_TOOL_CALL, IM_END])
    free = generate(ScriptedModel(rule), m.tok, USER, tools=SIMPLE, tool_choice="auto", enable_thinking=False,
                    temperature=0, max_tokens=80)
    assert [c.name for c in free.tool_calls] == ["get_time"]  # what the model wants, when allowed
    for choice in ("get_weather", {"type": "function", "function": {"name": "get_weather"}}):
        r = generate(ScriptedModel(rule), m.tok, USER, tools=SIMPLE, tool_choice=choice, enable_thinking=False,
                     temperature=0, max_tokens=120)
        assert r.tool_calls and {c.name for c in r.tool_calls} == {"get_weather"}, r.answer
        check_calls(r, SIMPLE, named="get_weather")


@pytest.mark.parametrize("form", ["json", "xml"])
@pytest.mark.parametrize("seed", [0, 1])
def test_thinking_stays_free_and_the_call_after_it_validates(forms, form, seed):
    """Thinking on, a thinking budget and tool_choice required: the reasoning is the random model's own text
    (unconstrained: it would never pass the tool grammar), the budget closes it at </think>, then a valid call."""
    m = forms[form]
    model = Opener(m.model, after=0, token=THINK) if form == "json" else m.model  # the XML template opens <think>
    budget = 8
    r = generate(model, m.tok, USER, tools=SIMPLE, tool_choice="required", thinking_budget=budget, seed=seed,
                 max_tokens=200, **RANDOM)
    assert END_THINK in r.tokens and r.reasoning.strip(), r.text
    cut = r.tokens.index(END_THINK)
    reasoning_tokens = r.tokens[:cut]
    # the reasoning is free: random text that is no tool call, nothing like what the grammar would allow
    assert TOOL_CALL not in reasoning_tokens and not r.reasoning.lstrip().startswith("<tool_call>")
    if END_THINK not in r.tokens[:budget + 2]:  # the budget cut it (not the model closing it itself)
        assert "limited time" in r.reasoning
    assert r.answer.lstrip("\n").startswith("<tool_call>"), r.answer
    assert r.tool_calls and check_calls(r, SIMPLE)


def test_constraint_mask_allows_only_grammar_tokens(forms):
    """A look at the masks themselves: after </think> with tool_choice required, the only allowed tokens are
    <tool_call> and newlines; under "none" <tool_call> is the one excluded token among these."""
    from qwen3_mlx.grammar import GrammarConstraint

    tok = forms["json"].tok
    mask = np.array(GrammarConstraint(tok, tool_grammar(SIMPLE, "required"), REAL_VOCAB).mask())
    allowed = set(np.flatnonzero(mask == 0).tolist())
    assert TOOL_CALL in allowed and all(tok.decode([t]).strip("\n") == "" for t in allowed - {TOOL_CALL})
    none = np.array(GrammarConstraint(tok, tool_grammar(SIMPLE, "none"), REAL_VOCAB).mask())
    assert none[TOOL_CALL] == -np.inf and (none == 0).sum() > 100000


# ---------------------------------------------------------------------------------------------------------------
# Errors: refused before any token, naming the keyword or the option.


def test_errors_name_the_keyword_or_option(forms):
    with pytest.raises(GrammarError, match="not") as e:
        tool_grammar([tool("f", {"type": "object", "properties": {"a": {"not": {"type": "string"}}}})], "required")
    assert e.value.option == "tools" and "'f'" in str(e.value)
    pattern = [tool("f", {"type": "object", "properties": {"a": {"type": "string", "pattern": "^a+$"}}})]
    with pytest.raises(GrammarError, match="'pattern'") as e:
        tool_grammar(pattern, "required", form="xml")
    assert e.value.option == "tools"
    assert tool_grammar(pattern, "required", form="json")  # JSON strings can be held to a pattern
    with pytest.raises(GrammarError, match="'nope'") as e:
        tool_grammar(SIMPLE, "nope")
    assert e.value.option == "tool_choice"
    with pytest.raises(GrammarError) as e:
        tool_grammar(SIMPLE, {"type": "function", "function": {"name": "nope"}})
    assert e.value.option == "tool_choice"
    for no_tools in (None, []):
        with pytest.raises(GrammarError, match="needs tools") as e:
            tool_grammar(no_tools, "required")
        assert e.value.option == "tool_choice"
    assert tool_grammar(None, "auto") is None and tool_grammar(None, "none") is None
    # through generate: refused before the model runs
    m = forms["json"]
    model = ScriptedModel(lambda s: IM_END)
    for kwargs in ({"tools": SIMPLE, "tool_choice": "nope"}, {"tool_choice": "required"},
                   {"tools": [tool("f", {"type": "object", "properties": {"a": {"not": {}}}})]}):
        with pytest.raises(GrammarError):
            generate(model, m.tok, USER, enable_thinking=False, max_tokens=5, **kwargs)
    assert model.steps == 0
    with pytest.raises(GrammarError, match="'pattern'"):
        generate(model, forms["xml"].tok, USER, tools=pattern, enable_thinking=False, max_tokens=5)


def test_xml_tool_without_parameters(forms):
    """A tool that declares no parameters (common: get_time(), list_files()) in the XML form."""
    m = forms["xml"]
    tools = [tool("noop", {"type": "object", "properties": {}})]
    assert tool_grammar(tools, "required", form="xml")
    r = generate(ScriptedModel(lambda s: None), m.tok, USER, tools=tools, tool_choice="required",
                 enable_thinking=False, temperature=0, max_tokens=60)
    assert r.answer.startswith("<tool_call>\n<function=noop>")


# ---------------------------------------------------------------------------------------------------------------
# The server, through the official openai client.



@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    import fastapi  # noqa: F401 - in the test extra: a missing one fails here (test_server would skip)
    from test_server import Server

    s = Server(tiny_checkpoint, "--max-concurrency", "1")
    yield s
    s.close()


@pytest.fixture(scope="module")
def xml_server(forms):
    import fastapi  # noqa: F401 - in the test extra: a missing one fails here (test_server would skip)
    from test_server import Server

    s = Server(forms["xml"].path, "--max-concurrency", "1")
    yield s
    s.close()


def server_calls(client, model, stream: bool, **kwargs):
    """(finish_reason, [(name, arguments dict)], content) of one chat request."""
    if not stream:
        choice = client.chat.completions.create(model=model, **kwargs).choices[0]
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        return choice.finish_reason, calls, choice.message.content
    finish, calls, content = None, {}, []
    for ev in client.chat.completions.create(model=model, stream=True, **kwargs):
        for choice in ev.choices:
            finish = choice.finish_reason or finish
            content.append(choice.delta.content or "")
            for c in choice.delta.tool_calls or []:
                entry = calls.setdefault(c.index, ["", ""])
                entry[0] += c.function.name or ""
                entry[1] += c.function.arguments or ""
    return finish, [(n, json.loads(a)) for _, (n, a) in sorted(calls.items())], "".join(content)


@pytest.mark.parametrize("stream", [False, True])
def test_server_required_and_single_call(server, tiny_checkpoint, stream):
    client = server.client()
    base = {"messages": USER, "tools": SIMPLE, "max_tokens": 200, "temperature": 1.0, "top_p": 1.0,
            "extra_body": {"chat_template_kwargs": {"enable_thinking": False}, "top_k": 0}}
    for seed in range(3):
        finish, calls, content = server_calls(client, tiny_checkpoint.name, stream, seed=seed, tool_choice="required",
                                              **base)
        assert finish == "tool_calls" and calls and not (content or "").strip()
        for name, arguments in calls:
            jsonschema.validate(arguments, schema_of(SIMPLE, name))
        finish, calls, _ = server_calls(client, tiny_checkpoint.name, stream, seed=seed, tool_choice="required",
                                        parallel_tool_calls=False, **base)
        assert finish == "tool_calls" and len(calls) == 1
        jsonschema.validate(calls[0][1], schema_of(SIMPLE, calls[0][0]))
    named = {"type": "function", "function": {"name": "get_time"}}
    finish, calls, _ = server_calls(client, tiny_checkpoint.name, stream, seed=7, tool_choice=named, **base)
    assert finish == "tool_calls" and calls and {n for n, _ in calls} == {"get_time"}
    # the unconstrained control: the same random model never calls a tool by itself
    finish, calls, _ = server_calls(client, tiny_checkpoint.name, stream, seed=0, tool_choice="none",
                                    **{**base, "max_tokens": 30})
    assert finish == "length" and calls == []


def test_server_xml_form_required(xml_server, forms):
    client = xml_server.client()
    model = forms["xml"].path.name
    for stream in (False, True):
        finish, calls, _ = server_calls(client, model, stream, messages=USER, tools=SIMPLE, tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=200, seed=3, temperature=1.0,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert finish == "tool_calls" and len(calls) == 1
        jsonschema.validate(calls[0][1], schema_of(SIMPLE, calls[0][0]))
    status, body = xml_server.post("/v1/chat/completions", {"messages": USER, "tools": [tool("f", {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "^x$"}}})]})
    assert status == 400 and "'pattern'" in body["error"]["message"]
