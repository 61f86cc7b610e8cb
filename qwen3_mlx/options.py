"""Generation options: one frozen dataclass, declared once with its defaults and help, validated once.

`stream_generate`, `ChatSession`, the server's engine, `bench` and every CLI command take a `GenerationOptions`;
the CLI builds its flags from the fields' metadata (`cli/options.py`), the server parses a request body into one
(`server/protocol.py`). Qwen's per-mode sampling defaults are resolved here (`sampling`), nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import Qwen3MLXError
from .sample import SamplingParams, resolve_sampling

DEFAULT_MAX_TOKENS = 32768  # Qwen's recommended output budget
KV_GROUP_SIZES = (32, 64, 128)


def _opt(default: Any, help: str, *flags: str, **bounds) -> Any:
    """A field with its help text and CLI flags (`flags`, `min`/`max`: what `cli/options.py` turns into a
    typer option; no flags: not a CLI option)."""
    return field(default=default, metadata={"help": help, "flags": flags, **bounds})


# Help text is rich markup in the CLI: a literal "[" is written "\\[".
@dataclass(frozen=True)
class GenerationOptions:
    """Everything that shapes one generation besides the prompt and the caches it extends."""

    max_tokens: int = _opt(DEFAULT_MAX_TOKENS, "Most tokens to generate.", "--max-tokens", "-m", min=1)
    # Sampling: None takes Qwen's recommendation for the mode (see `sampling`).
    temperature: float | None = _opt(
        None, "0 is greedy \\[default: Qwen's, 0.6 thinking / 0.7 not].", "--temperature", "--temp", min=0.0)
    top_p: float | None = _opt(
        None, "Nucleus sampling; 0 keeps only the most likely token \\[default: 0.95 thinking / 0.8 not].",
        "--top-p", min=0.0, max=1.0)
    top_k: int | None = _opt(None, "Keep the k most likely tokens, 0 = all \\[default: 20].", "--top-k", min=0)
    min_p: float | None = _opt(
        None, "Drop tokens below min_p x the top probability \\[default: 0].", "--min-p", min=0.0, max=1.0)
    presence_penalty: float = _opt(
        0.0, "Subtracted from every token already generated (0 to 2).", "--presence-penalty")
    repetition_penalty: float | None = _opt(
        None, "Divides the logits of tokens in the prompt or output (transformers' semantics; 1 = off, >1 "
        "penalises).", "--repetition-penalty")
    seed: int | None = _opt(
        None, "Seed for reproducible sampling: each call starts its own random stream from it.", "--seed")
    # Thinking.
    enable_thinking: bool = _opt(True, "The chat template's thinking switch.")
    thinking_budget: int | None = _opt(
        None, "Cut reasoning after N tokens, then answer.", "--thinking-budget", min=0)
    # The prompt's rendering (messages prompts only).
    tools: tuple | list | None = _opt(  # noqa: RUF009 - _opt makes a field()
        None, "Tool schemas for the chat template (OpenAI's function form).")
    chat_template_kwargs: dict | None = _opt(  # noqa: RUF009 - _opt makes a field()
        None, "More variables for the model's chat template.")
    reasoning_effort: str | None = _opt(
        None, "The chat template's reasoning_effort (Qwen3.8: xhigh, medium, low); refused by templates without it.",
        "--reasoning-effort")
    # Tool calls: with `tools`, every call the model opens is held to a declared tool and its schema.
    tool_choice: str | dict = _opt(  # noqa: RUF009 - _opt makes a field()
        "auto", "auto (calls optional, each one valid), required (one or more calls), none (no call), or a tool's "
        "name (a call of it); OpenAI's {type: function, function: {name}} form is accepted too.")
    parallel_tool_calls: bool = _opt(True, "Allow more than one tool call in an answer.")
    response_format: dict | None = _opt(  # noqa: RUF009 - _opt makes a field()
        None, "OpenAI's response_format: {type: json_object} or {type: json_schema, json_schema: {schema}} holds "
        "the answer to JSON (the reasoning stays free).")
    logprobs: int | None = _opt(
        None, "Report each sampled token's log probability and this many (0 to 20) most likely alternatives, from "
        "the model's distribution before any filter (GenerationResponse.logprobs).")
    # Stopping and constraints.
    ignore_eos: bool = _opt(False, "Generate exactly max_tokens tokens.")
    constraint: Any = _opt(  # noqa: RUF009 - _opt makes a field()
        None, "Limits the answer's tokens (not the reasoning's): an object with mask() (an additive [vocab] "
        "logits mask) and advance(token), e.g. a JSON schema grammar.")
    # KV cache.
    kv_bits: int | None = _opt(
        None, "Keep the KV cache quantized to 4 or 8 bits (less memory per token).", "--kv-bits")
    kv_group_size: int | None = _opt(
        None, "Values per scale in the quantized KV cache: 32, 64 or 128 \\[default: 64, or the largest that divides "
        "head_dim when 64 does not].", "--kv-group-size")
    quantized_kv_start: int = _opt(
        0, "With --kv-bits: keep the cache in float until it holds N positions.", "--quantized-kv-start", min=0)
    prefill_step_size: int = _opt(512, "Prompt tokens per prefill forward (memory stays bounded).")
    # Speculative decoding.
    draft_model: Any = _opt(  # noqa: RUF009 - _opt makes a field()
        None, "A loaded draft model of the same vocabulary (speculative decoding).")
    num_draft: int = _opt(3, "Tokens the draft proposes per round.", "--num-draft", min=1, max=16)

    def replace(self, **changes) -> GenerationOptions:
        """A copy with `changes` (unknown names are refused, not ignored)."""
        unknown = sorted(set(changes) - set(self.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes) if changes else self

    def validate(self, model_args=None) -> GenerationOptions:
        """Raise one domain error naming the first bad option (`model_args`: the checks that depend on the model,
        e.g. the KV group size dividing head_dim). Returns the options to use: these, with what was left to the
        model resolved (the KV group size)."""
        for name, check, need in (
            ("max_tokens", self.max_tokens is not None and self.max_tokens >= 1, "at least 1"),
            ("temperature", self.temperature is None or self.temperature >= 0, "0 or more"),
            ("top_p", self.top_p is None or 0 <= self.top_p <= 1, "between 0 and 1"),
            ("top_k", self.top_k is None or self.top_k >= 0, "0 or more"),
            ("min_p", self.min_p is None or 0 <= self.min_p <= 1, "between 0 and 1"),
            ("repetition_penalty", self.repetition_penalty is None or self.repetition_penalty > 0, "above 0"),
            ("thinking_budget", self.thinking_budget is None or self.thinking_budget >= 0, "0 or more"),
            ("prefill_step_size", self.prefill_step_size >= 1, "at least 1"),
            ("num_draft", self.num_draft >= 1, "at least 1"),
        ):
            if not check:
                raise Qwen3MLXError(f"{name} must be {need}, got {getattr(self, name)}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            raise Qwen3MLXError(f"logprobs must be 0 to 20 alternatives, got {self.logprobs}")
        if self.draft_model is not None:
            if self.presence_penalty or self.repetition_penalty not in (None, 1.0):
                raise Qwen3MLXError("a draft model cannot be combined with presence or repetition penalties yet")
            if self.constrained:
                raise Qwen3MLXError("a draft model cannot be combined with tools or a response_format yet (their "
                                    "grammar masks each token)")
            if self.logprobs is not None:
                raise Qwen3MLXError("a draft model cannot be combined with logprobs yet")
            if model_args is not None:
                from .speculative import check_draft

                check_draft(model_args, self.draft_model.args)
        return self._validate_kv(model_args)

    @property
    def constrained(self) -> bool:
        """Whether the answer is held to a grammar: a constraint, a response_format, or tools (whose calls are)."""
        fmt = (self.response_format or {}).get("type")
        return self.constraint is not None or bool(self.tools) or fmt not in (None, "text")

    def _validate_kv(self, model_args) -> GenerationOptions:
        """Check the KV cache options; returns them with the group size resolved when none was chosen."""
        if self.kv_bits is None:
            return self
        if self.kv_bits not in (4, 8):
            raise Qwen3MLXError(f"kv_bits must be 4 or 8, got {self.kv_bits}")
        if self.quantized_kv_start < 0:
            raise Qwen3MLXError(f"quantized_kv_start must be 0 or more, got {self.quantized_kv_start}")
        head_dim = getattr(model_args, "head_dim", 0) or 0
        if self.kv_group_size is None:
            # mlx-lm's 64 where it divides head_dim (the cache mlx-lm would build), else the largest that does.
            fits = [g for g in (64, *sorted(KV_GROUP_SIZES, reverse=True)) if not head_dim or head_dim % g == 0]
            if not fits:
                raise Qwen3MLXError(f"no KV cache group size (32, 64, 128) divides head_dim ({head_dim}): this model's "
                                    "KV cache cannot be quantized; leave out kv_bits")
            return self.replace(kv_group_size=fits[0])
        if self.kv_group_size not in KV_GROUP_SIZES or (head_dim and head_dim % self.kv_group_size):
            divides = f" and divide head_dim ({head_dim})" if head_dim else ""
            raise Qwen3MLXError(f"kv_group_size must be 32, 64 or 128{divides}, got {self.kv_group_size}")
        return self

    def sampling(self, generation_config: dict | None = None) -> SamplingParams:
        """The sampling numbers: explicit values, else the model's generation_config.json (thinking mode only),
        else Qwen's recommendation for the mode."""
        return resolve_sampling(self.enable_thinking, generation_config, temperature=self.temperature,
                                top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                                presence_penalty=self.presence_penalty, repetition_penalty=self.repetition_penalty)


def as_options(options: GenerationOptions | None, overrides: dict) -> GenerationOptions:
    """`options` (or the defaults) with keyword `overrides`: how functions that take options also take the
    keyword form (`stream_generate(..., temperature=0.6)`)."""
    return (options or GenerationOptions()).replace(**overrides)
