"""Answers held to a shape while they are sampled, with llguidance: each answer token is masked to what the
grammar still allows. Two shapes:

- `response_format` (OpenAI's): a JSON object, or one that validates against a JSON schema;
- tool calls in the model's own form (read off its chat template, as the parser reads either):
  Qwen3's `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` or Qwen3.5 / 3.6's
  `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`.
  `tool_choice` "auto" leaves the text free until the model writes `<tool_call>`, then holds the rest of the
  call to a declared tool and its schema (a lazy lexeme ends the free text at the opening tag); "required" and a
  named tool make the answer calls only; "none" forbids the opening tag.

The reasoning stays free: `generate.Sequence` applies the mask to answer tokens only. Grammars are text (Lark
with inline `%json`), cached by their inputs; a schema the library cannot express is a `GrammarError` naming
the keyword, before any token is generated.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import mlx.core as mx
import numpy as np

from .errors import Qwen3MLXError

# The separators Qwen's templates write (`tojson`: Python's json.dumps defaults), so a call reads as in training.
_JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
_LARK_NAME = _NAME.pattern.replace("/", "\\/")  # inside Lark's /.../, a slash must be escaped
# Keywords of a string schema the XML form cannot hold its raw text to (the JSON form can: llguidance does).
_XML_STRING_LIMITS = ("pattern", "format", "minLength", "maxLength")


class GrammarError(Qwen3MLXError):
    """A response_format or tool schema that cannot be enforced; `option` names the option at fault."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise Qwen3MLXError("enforced tool calls and response_format need llguidance: pip install llguidance") from None
    return llguidance


def response_grammar(response_format: dict | None) -> str | None:
    """The grammar of an OpenAI `response_format` (None for plain text)."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        schema: dict = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise GrammarError("response_format.json_schema.schema must be a JSON schema object", "response_format")
    else:
        raise GrammarError(f"unknown response_format type {kind!r} (text, json_object, json_schema)",
                           "response_format")
    # Fixed separators, no free whitespace: a model cannot wander into blank space forever.
    rule = _json(schema, "response_format schema", "response_format", whitespace_flexible=False)
    return _checked(f"start: {rule}\n", "response_format")


def tool_grammar(tools: list[dict] | None, choice="auto", parallel: bool = True, form: str = "json") -> str | None:
    """The grammar of an answer with tool calls (None when there is nothing to enforce: no tools). `choice`:
    "auto", "required", "none", a tool's name, or OpenAI's {"type": "function", "function": {"name": N}}."""
    named = _chosen_name(choice)
    if not tools:
        if choice not in ("auto", "none"):
            raise GrammarError(f"tool_choice {_show(choice)} needs tools", "tool_choice")
        return None
    functions = _functions(tools)
    if named is not None:
        if named not in functions:
            raise GrammarError(f"tool_choice names {named!r}, which is not among the tools "
                               f"({', '.join(functions)})", "tool_choice")
        functions = {named: functions[named]}
    # Free text: anything that does not open a call in either form (the parser reads both, so neither may pass
    # unchecked), as a negated regex, so the lexer never has to guess.
    triggers = ["<tool_call>", "<function="]
    text = " & ".join(["/(?s:.*)/"] + [f"~/(?s:.*){_regex(t)}(?s:.*)/" for t in triggers])
    # <tool_call> and </tool_call> are single tokens: named as such (a spelled-out tag is refused by TEXT).
    rules = [f"TEXT: {text}", 'calls: call ("\\n" <tool_call> call)*' if parallel else "calls: call"]
    if form == "xml":
        rules += ['call: "\\n<function=" (' + " | ".join(f"f{i}" for i in range(len(functions))) + ') "\\n" </tool_call>',
                  r"param_text[lazy]: /(?s:.*)\n<\/parameter>\n/"]
        for i, (name, params) in enumerate(functions.items()):
            rules += _xml_function(i, name, params)
    else:
        rules.append('call: "\\n" (' + " | ".join(f"f{i}" for i in range(len(functions))) + ') "\\n" </tool_call>')
        for i, (name, params) in enumerate(functions.items()):
            opening = json.dumps(f'{{"name": "{name}", "arguments": ')
            rules += [f"f{i}: {opening} a{i} \"}}\"", f"a{i}: {_json(params, f'tool {name!r}', **_JSON_STYLE)}"]
    if choice == "none":
        start = "start: TEXT?"
    elif choice == "auto":
        start = "start: TEXT? (<tool_call> calls)?"
    else:  # required, or a named tool: calls only (after at most the two newlines that follow </think>)
        start = 'start: NL? <tool_call> calls\nNL: /\\n\\n?/'
    return _checked("\n".join([start, *rules]) + "\n", "tools")


def _regex(literal: str) -> str:
    """`literal` as a regex inside Lark's /.../ (where a slash must be escaped too)."""
    return re.escape(literal).replace("/", "\\/")


def _chosen_name(choice) -> str | None:
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise GrammarError('tool_choice object must be {"type": "function", "function": {"name": ...}}',
                               "tool_choice")
        return fn["name"]
    if not isinstance(choice, str) or not choice:
        raise GrammarError(f"tool_choice must be auto, required, none or a tool's name, got {_show(choice)}",
                           "tool_choice")
    return None if choice in ("auto", "required", "none") else choice


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def _functions(tools: list[dict]) -> dict[str, dict]:
    """Tool name -> its parameters' schema (OpenAI's function form, or a bare function)."""
    out: dict[str, dict] = {}
    for t in tools:
        fn = t.get("function", t) if isinstance(t, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise GrammarError(f"tool name {name!r} cannot be enforced: names are 1 to 128 of A-Z a-z 0-9 _ . : / -",
                               "tools")
        params = fn.get("parameters")
        params = {"type": "object", "properties": {}} if params in (None, {}) else params
        if not isinstance(params, dict):
            raise GrammarError(f"tool {name!r}: parameters must be a JSON schema object", "tools")
        if name in out:
            raise GrammarError(f"tool {name!r} is declared twice", "tools")
        out[name] = params
    return out


def _json(schema: dict, where: str = "", option: str = "tools", **style) -> str:
    """`schema` as an inline %json rule; one the library refuses is a GrammarError naming `where` and the reason
    (the unsupported keyword), not a grammar listing."""
    rule = "%json " + json.dumps({**schema, "x-guidance": style}, ensure_ascii=False)
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(f"start: {rule}\n")
    if is_error:
        reason = "; ".join(messages).split("\n")[0]
        reason = re.sub(r"^.*?failed to compile JSON schema: ", "", reason)
        raise GrammarError(f"{where or option} cannot be enforced: {reason}", option)
    return rule


def _xml_function(i: int, name: str, params: dict) -> list[str]:
    """Rules of one function in the XML form: its parameters in declared order, the required ones present, the
    others optional, none undeclared; raw text for strings, JSON for other values (what the template writes)."""
    where = f"tool {name!r}"
    if params.get("type", "object") != "object":
        raise GrammarError(f"{where}: parameters must be an object schema", "tools")
    props = params.get("properties") or {}
    required = set(params.get("required") or [])
    missing = sorted(required - set(props))
    if missing:
        raise GrammarError(f"{where}: required parameter(s) {', '.join(missing)} have no schema", "tools")
    rules, parts = [], []
    for j, (key, schema) in enumerate(props.items()):
        if not _NAME.fullmatch(key):
            raise GrammarError(f"{where}: parameter name {key!r} cannot be enforced in the XML tool-call form", "tools")
        rule = f"p{i}_{j}"
        rules.append(f'{rule}: {json.dumps(f"<parameter={key}>")} "\\n" {_xml_value(rule, schema, where, key, rules)}')
        parts.append(rule if key in required else f"{rule}?")
    if not props and params.get("additionalProperties", True) is not False:
        # No declared parameters: any names, raw values (nothing to validate them against).
        rules.append(rf'p{i}_any: "<parameter=" /{_LARK_NAME}/ ">\n" param_text')
        parts.append(f"p{i}_any*")
    rules.insert(0, f'f{i}: {json.dumps(name + ">")} "\\n" {" ".join(parts)} "</function>"')
    return rules


def _xml_value(rule: str, schema, where: str, key: str, rules: list[str]) -> str:
    """The grammar of one XML parameter's value and its closing tag."""
    schema = schema if isinstance(schema, dict) else {}
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    choices = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
        alternatives = " | ".join(json.dumps(c + "\n</parameter>\n", ensure_ascii=False) for c in choices)
        rules.append(f"{rule}_v: {alternatives}")
        return f"{rule}_v"
    if "string" in kinds and choices is None:
        limits = [k for k in _XML_STRING_LIMITS if k in schema]
        if limits:
            raise GrammarError(f"{where}, parameter {key!r}: '{limits[0]}' on a string cannot be enforced in the XML "
                               "tool-call form (its value is raw text)", "tools")
        return "param_text"
    rules.append(f"{rule}_v: {_json(schema, f'{where}, parameter {key!r}', **_JSON_STYLE)}")
    return f'{rule}_v "\\n</parameter>\\n"'


@lru_cache(maxsize=64)
def _checked(grammar: str, option: str) -> str:
    """`grammar` if llguidance accepts it, else a GrammarError with the library's reason (it names the keyword)."""
    llguidance = _llguidance()
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        reason = "; ".join(messages)
        raise GrammarError(f"{option} cannot be enforced: {reason}", option)
    return grammar


def grammar_for(options, form: str = "json") -> str | None:
    """The grammar `options` ask for: response_format's, else the tools' (None when neither applies)."""
    fmt = response_grammar(options.response_format)
    if fmt is not None:
        if options.tools and options.tool_choice not in ("auto", "none"):
            raise GrammarError("response_format cannot be combined with tool_choice "
                               f"{_show(options.tool_choice)}", "response_format")
        return fmt
    return tool_grammar(options.tools, options.tool_choice, options.parallel_tool_calls, form)


@lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer, n_vocab: int):
    """llguidance's token table of `tokenizer`, built once per tokenizer object: keyed by its JSON, every
    constrained generation (each agent step, each server request) serialised the tokenizer again, ~0.1 s."""
    return _llguidance().LLTokenizer(tokenizer.to_json(), n_vocab=n_vocab, eos_token=list(tokenizer.eos_token_ids))


class GrammarConstraint:
    """A `constraint` for stream_generate: an additive logits mask per step, advanced by each answer token."""

    def __init__(self, tokenizer, grammar: str, vocab_size: int):
        ll = _ll_tokenizer(tokenizer, vocab_size)
        self.matcher = _llguidance().LLMatcher(ll, grammar, log_level=0)
        self.vocab_size = vocab_size
        self._bias = np.empty(vocab_size, np.float32)

    def mask(self) -> mx.array:
        allowed = np.frombuffer(self.matcher.compute_logit_bias(), dtype=np.uint8)
        n = min(allowed.shape[0], self.vocab_size)
        # Tokens the tokenizer does not know (a padded vocabulary) are never allowed.
        self._bias[:] = -np.inf
        self._bias[:n][allowed[:n] > 0] = 0.0
        return mx.array(self._bias)

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)


def constraint_for(tokenizer, options, vocab_size: int) -> GrammarConstraint | None:
    """The constraint of `options`: their own `constraint`, else one built from response_format or the tools."""
    if options.constraint is not None:
        return options.constraint
    if tokenizer is None:
        return None
    grammar = grammar_for(options, tokenizer.tool_call_form)
    return None if grammar is None else GrammarConstraint(tokenizer, grammar, vocab_size)
