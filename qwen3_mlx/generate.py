"""Text generation: one generator (`stream_generate`) yielding small responses, consumed by chat, generate,
bench and tests; `generate` collects it into a result.

Prompt forms:
- a list of chat messages: rendered with the model's own chat template (`enable_thinking`, `tools` go to it);
- a string: raw text, tokenized as-is with no template (a completion prompt; write the template yourself,
  special tokens such as `<|im_start|>` in the text become their ids);
- a list of token ids: used as-is (`tokenizer` may then be None: no text, no eos, only `max_tokens` stops).

Reasoning vs answer: the runtime follows `<think>` / `</think>` tokens. It starts in the reasoning segment only
if the prompt leaves a `<think>` open (templates that pre-insert it, or a hand-written prompt); otherwise the
model opens the block itself (the Qwen3 template with thinking on) or never does (thinking off: the template
writes an empty, closed block).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .errors import Qwen3MLXError
from .models.cache import make_cache
from .sample import SamplingParams, apply_presence_penalty, apply_repetition_penalty, resolve_sampling, sample
from .tools import ToolCall, parse_tool_calls

# Qwen's early-stop text for a thinking budget (Qwen3 README): it closes the reasoning and the answer follows.
BUDGET_STOP_TEXT = (
    "Considering the limited time by the user, I have to give the solution based on the thinking directly now."
    "\n</think>.\n\n"
)
DEFAULT_MAX_TOKENS = 32768  # Qwen's recommended output budget


@dataclass
class GenerationResponse:
    """One generated token and what it adds."""

    text: str  # newly decoded text of this step ("" if no complete character yet)
    token: int  # the token id of this step (sampled, or forced by the thinking budget)
    segment: str  # "reasoning" (inside <think>...</think>, tags included) or "answer"
    finish_reason: str | None  # None while running; "stop" (eos) or "length" (max_tokens) on the last one
    prompt_tokens: int
    prompt_tps: float  # prefill tokens/s
    generation_tokens: int  # tokens generated so far
    generation_tps: float
    time_to_first_token: float  # seconds from the call to the first token
    peak_memory: float  # GB


@dataclass
class GenerationResult:
    """A whole generation: reasoning and answer separately, tool calls parsed from the answer."""

    text: str  # everything decoded, think tags included (eos excluded)
    reasoning: str  # inside <think>...</think>, tags and surrounding newlines removed
    answer: str  # after </think> (or everything, when there was no reasoning)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # generated ids, eos included
    finish_reason: str | None = None
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    time_to_first_token: float = 0.0
    peak_memory: float = 0.0


def load_generation_config(model=None, tokenizer=None) -> dict:
    """The model folder's generation_config.json (empty when there is none)."""
    for folder in (getattr(model, "model_path", None), getattr(tokenizer, "path", None)):
        if folder is not None and (Path(folder) / "generation_config.json").is_file():
            try:
                data = json.loads((Path(folder) / "generation_config.json").read_text())
            except json.JSONDecodeError:
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def prompt_tokens(tokenizer, prompt, enable_thinking: bool = True, tools: list[dict] | None = None) -> list[int]:
    """Token ids of a prompt given as text, token ids, or chat messages (see the module docstring)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise Qwen3MLXError("a text prompt needs a tokenizer")
        return tokenizer.encode(prompt)
    if isinstance(prompt, mx.array):
        return [int(t) for t in prompt.reshape(-1).tolist()]
    prompt = list(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        if tokenizer is None:
            raise Qwen3MLXError("chat messages need a tokenizer")
        return tokenizer.encode(tokenizer.apply_chat_template(prompt, tools=tools, enable_thinking=enable_thinking))
    if all(isinstance(t, int) for t in prompt):
        return [int(t) for t in prompt]
    raise Qwen3MLXError("prompt must be a string, a list of token ids, or a list of chat messages")


class SegmentTracker:
    """Follows `<think>` / `</think>` token ids: which segment each token belongs to."""

    def __init__(self, think_start: int | None, think_end: int | None, prompt: list[int] = ()):
        self.start, self.end = think_start, think_end
        self.in_reasoning = False
        for t in prompt:
            self._advance(t)

    def _advance(self, token: int) -> None:
        if token == self.start and self.start is not None:
            self.in_reasoning = True
        elif token == self.end and self.end is not None:
            self.in_reasoning = False

    def in_reasoning_after(self, token: int) -> bool:
        """Whether the segment after `token` is the reasoning (without moving past it)."""
        if token == self.start and self.start is not None:
            return True
        if token == self.end and self.end is not None:
            return False
        return self.in_reasoning

    def update(self, token: int) -> str:
        """The segment of `token`; the tags belong to the reasoning they open and close."""
        if token == self.start and self.start is not None:
            self.in_reasoning = True
            return "reasoning"
        if token == self.end and self.end is not None:
            was = self.in_reasoning
            self.in_reasoning = False
            return "reasoning" if was else "answer"
        return "reasoning" if self.in_reasoning else "answer"


def stream_generate(
    model,
    tokenizer,
    prompt,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    presence_penalty: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    enable_thinking: bool = True,
    thinking_budget: int | None = None,
    tools: list[dict] | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 512,
    ignore_eos: bool = False,
    constraint=None,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt` token by token, yielding a `GenerationResponse` per token.

    Sampling defaults are Qwen's recommendations for the mode (thinking: 0.6 / 0.95 / 20 / 0, non-thinking:
    0.7 / 0.8 / 20 / 0); in thinking mode the model's generation_config.json values take precedence.
    `temperature=0` is greedy. `presence_penalty` subtracts from every token generated so far;
    `repetition_penalty` (transformers semantics) covers prompt and generated tokens.

    `thinking_budget=N`: once N reasoning tokens (the opening `<think>` included) have been sampled without
    `</think>`, Qwen's early-stop text is appended as tokens and the model continues with the answer.

    `seed`: each call starts its own random stream from `mx.random.key(seed)`, so one call is reproducible on
    its own, and two calls with the same seed draw the same random numbers (a multi-turn caller passing one seed
    every turn replays the same stream each turn: vary it per turn, e.g. `seed + turn`). Without a seed the
    global MLX random state is used.

    `prompt_cache`: a list of KVCache to extend (the caller passes only the tokens not already cached);
    a fresh cache is made otherwise. `ignore_eos=True` generates exactly `max_tokens` tokens.

    `constraint`: limits the answer's tokens (not the reasoning's), e.g. to a JSON schema. An object with
    `mask()` (an additive [vocab] logits mask for the next token: 0 allowed, -inf not) and `advance(token)`.
    Each step then waits for its token before the next is queued (no pipelining).
    """
    tic = time.perf_counter()
    ids = prompt_tokens(tokenizer, prompt, enable_thinking=enable_thinking, tools=tools)
    if not ids:
        raise Qwen3MLXError("the prompt is empty")
    if max_tokens is None or max_tokens < 1:
        raise Qwen3MLXError(f"max_tokens must be at least 1, got {max_tokens}")
    if thinking_budget is not None and thinking_budget < 0:
        raise Qwen3MLXError(f"thinking_budget must be 0 or more, got {thinking_budget}")
    if constraint is not None and thinking_budget is not None:
        # The budget's closing text ends in the answer segment, where the constraint would not allow it.
        raise Qwen3MLXError("a constraint cannot be combined with thinking_budget yet")
    params = resolve_sampling(
        enable_thinking,
        load_generation_config(model, tokenizer),
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty,
    )
    if params.temperature < 0:
        raise Qwen3MLXError(f"temperature must be 0 or more, got {params.temperature}")
    if params.repetition_penalty is not None and params.repetition_penalty <= 0:
        raise Qwen3MLXError(f"repetition_penalty must be above 0, got {params.repetition_penalty}")

    cache = prompt_cache if prompt_cache is not None else make_cache(model)
    eos = set() if (ignore_eos or tokenizer is None) else set(tokenizer.eos_token_ids)
    think_start = getattr(tokenizer, "think_start_id", None)
    think_end = getattr(tokenizer, "think_end_id", None)
    tracker = SegmentTracker(think_start, think_end, ids)
    detok = tokenizer.detokenizer() if tokenizer is not None else None
    stop_ids = tokenizer.encode(BUDGET_STOP_TEXT) if (tokenizer is not None and thinking_budget is not None) else []
    sampler = _Sampler(model, cache, params, seed, ids)

    # Prefill all but the last prompt token in chunks, evaluating each so memory stays bounded.
    prefix = ids[:-1]
    for i in range(0, len(prefix), prefill_step_size):
        model(mx.array(prefix[i : i + prefill_step_size])[None], cache)
        mx.eval([c.state for c in cache])

    reasoning_sampled = 0
    forced: deque[int] = deque()  # budget-stop tokens waiting to be handed out

    def budget_reached() -> bool:
        return bool(stop_ids) and tracker.in_reasoning and reasoning_sampled >= thinking_budget

    if budget_reached():  # the prompt left <think> open and the budget is 0
        forced.extend(stop_ids)
        y = sampler.step(ids[-1:] + stop_ids, n_generated=len(stop_ids))
    else:
        mask = None
        if constraint is not None and not tracker.in_reasoning:
            mask = constraint.mask()
            if enable_thinking and think_start is not None:
                # Thinking on: the model opens <think> itself as its first token; the constraint starts after.
                mask = mx.where(mx.arange(mask.shape[-1]) == think_start, 0.0, mask)
        y = sampler.step(ids[-1:], n_generated=0, mask=mask)
    mx.async_eval(y)

    n = 0
    t_first = None
    ttft = prompt_tps = 0.0
    while True:
        if forced:
            token, sampled = forced.popleft(), False
        elif constraint is not None:
            # The next mask depends on this token: take it, then queue the next step.
            token, sampled = int(y.item()), True
            if not tracker.in_reasoning and not tracker.in_reasoning_after(token):  # an answer token
                constraint.advance(token)
            if n + 1 < max_tokens and token not in eos:
                next_mask = None if tracker.in_reasoning_after(token) else constraint.mask()
                next_y = sampler.step(y, n_generated=1, mask=next_mask)
                mx.async_eval(next_y)
        else:
            if n + 1 < max_tokens:
                # Queue the next step before handing this token out: the model works while the caller prints.
                next_y = sampler.step(y, n_generated=1)
                mx.async_eval(next_y)
            token, sampled = int(y.item()), True
        n += 1
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            ttft = now - tic
            prompt_tps = len(ids) / ttft
        segment = tracker.update(token)
        if sampled and segment == "reasoning":
            reasoning_sampled += 1

        finish = None
        if token in eos:
            finish = "stop"
            text = detok.flush() if detok else ""
        else:
            text = detok.add(token) if detok else ""
            if n >= max_tokens:
                finish = "length"
        if finish == "length" and detok:
            text += detok.flush()
        if finish is None and not forced and budget_reached():
            # The queued step fed `token` into the cache; its sampled output is dropped in favour of the stop text.
            forced.extend(stop_ids)
            next_y = sampler.step(stop_ids, n_generated=len(stop_ids))
            mx.async_eval(next_y)

        yield GenerationResponse(
            text=text,
            token=token,
            segment=segment,
            finish_reason=finish,
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / (now - t_first) if n > 1 and now > t_first else 0.0,
            time_to_first_token=ttft,
            peak_memory=mx.get_peak_memory() / 1e9,
        )
        if finish is not None:
            return
        if sampled:
            y = next_y


class _Sampler:
    """Model step + logits processing + sampling, with the state they share (cache, penalty masks, PRNG key)."""

    def __init__(self, model, cache, params: SamplingParams, seed: int | None, prompt: list[int]):
        self.model, self.cache, self.params = model, cache, params
        vocab = model.args.vocab_size
        self.key = mx.random.key(seed) if seed is not None else None
        # 0/1 masks over the vocabulary: generated tokens (presence) and prompt + generated (repetition).
        self.generated = mx.zeros((vocab,), mx.float32) if params.presence_penalty else None
        self.context = None
        if params.repetition_penalty not in (None, 1.0):
            valid = [t for t in prompt if 0 <= t < vocab]
            self.context = mx.zeros((vocab,), mx.float32)
            if valid:
                self.context = self.context.at[mx.array(valid)].maximum(1.0)

    def step(self, tokens, n_generated: int, mask: mx.array | None = None) -> mx.array:
        """Feed `tokens` (list or [1] array) after the cache; return the sampled next token as a [1] array.
        The last `n_generated` of them count as generated output for the penalties; `mask` is added to the
        logits (a constraint's allowed tokens)."""
        inputs = mx.array(tokens) if isinstance(tokens, list) else tokens.reshape(-1)
        if n_generated:
            new = inputs[-n_generated:]
            if self.generated is not None:
                self.generated = self.generated.at[new].maximum(1.0)
            if self.context is not None:
                self.context = self.context.at[new].maximum(1.0)
        logits = self.model(inputs[None], self.cache)[:, -1, :].astype(mx.float32)  # [1, vocab]
        if mask is not None:
            logits = logits + mask
        p = self.params
        if self.generated is not None:
            logits = apply_presence_penalty(logits, self.generated, p.presence_penalty)
        if self.context is not None:
            logits = apply_repetition_penalty(logits, self.context, p.repetition_penalty)
        subkey = None
        if self.key is not None:
            self.key, subkey = mx.random.split(self.key)
        return sample(logits, p, subkey)


def tidy_segments(reasoning: str, answer: str) -> tuple[str, str]:
    """Streamed reasoning and answer text without the think tags and the newlines that only frame them."""
    return reasoning.replace("<think>", "").replace("</think>", "").strip("\n"), answer.lstrip("\n")


def generate(model, tokenizer, prompt, **options) -> GenerationResult:
    """Run `stream_generate` to the end and return the whole result (same keyword options)."""
    pieces = {"reasoning": [], "answer": []}
    text: list[str] = []
    tokens: list[int] = []
    last = None
    for last in stream_generate(model, tokenizer, prompt, **options):
        tokens.append(last.token)
        text.append(last.text)
        pieces[last.segment].append(last.text)
    reasoning, answer = tidy_segments("".join(pieces["reasoning"]), "".join(pieces["answer"]))
    result = GenerationResult(
        text="".join(text), reasoning=reasoning, answer=answer, tool_calls=parse_tool_calls(answer), tokens=tokens
    )
    if last is not None:
        for name in (
            "finish_reason",
            "prompt_tokens",
            "prompt_tps",
            "generation_tokens",
            "generation_tps",
            "time_to_first_token",
            "peak_memory",
        ):
            setattr(result, name, getattr(last, name))
    return result
