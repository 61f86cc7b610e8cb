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
from .models.cache import make_cache, quantize_cache, truncate_cache
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
    draft_tokens: int = 0  # with a draft model: tokens it proposed so far, and how many the target kept
    accepted_tokens: int = 0


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


# Set by prompt_tokens itself, not through chat_template_kwargs.
TEMPLATE_ARGUMENTS = frozenset({"messages", "tools", "enable_thinking", "add_generation_prompt", "documents"})


def refuse_media(content, where: str) -> None:
    """Raise for image / video / audio parts in a message's content: the models here are run as text only (a
    Qwen3.5 / 3.6 checkpoint's vision tower is not loaded), and the template would emit placeholders for them."""
    if isinstance(content, list):
        for part in (p for p in content if isinstance(p, dict)):
            kind = part.get("type") or next((k for k in ("image", "image_url", "video") if k in part), "text")
            if kind != "text":
                raise Qwen3MLXError(f"{where}: {kind} content is not supported: qwen3-mlx runs the "
                                    "language model only (text in, text out)")


def prompt_tokens(tokenizer, prompt, enable_thinking: bool = True, tools: list[dict] | None = None,
                  chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a prompt given as text, token ids, or chat messages (see the module docstring).
    `chat_template_kwargs`: more variables for the model's chat template (e.g. Qwen3.6's `preserve_thinking`)."""
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
        for i, m in enumerate(prompt):
            refuse_media(m.get("content"), f"message {i}")
        extra = dict(chat_template_kwargs or {})
        taken = sorted(set(extra) & TEMPLATE_ARGUMENTS)
        if taken:
            raise Qwen3MLXError(f"chat_template_kwargs cannot set {', '.join(taken)} (given by its own option)")
        return tokenizer.encode(tokenizer.apply_chat_template(prompt, tools=tools, enable_thinking=enable_thinking,
                                                              **extra))
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


# Prefill pieces of at least this many tokens run the same kernels (per row, bit for bit) whatever their
# size; below it the matmuls switch to their decode or non-BLAS form. Cutting a prompt's chunks into
# pieces no smaller keeps a sequence's numbers identical to an uncut prefill (see `prefill_plan`).
SAME_KERNEL_ROWS = 64


def prefill_plan(n: int, step: int = 512, piece: int | None = None) -> list[tuple[int, int]]:
    """Token ranges [start, end) that prefill `n` tokens: chunks of `step` (each evaluated before the next,
    so memory stays bounded), each cut further into pieces of about `piece` tokens when given (a server
    interleaving a newcomer's prefill with the others' decoding). Pieces are never smaller than
    SAME_KERNEL_ROWS unless their chunk is, so every token runs the kernels it runs in plain chunks."""
    ranges = []
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        if piece is None or c1 - c0 <= piece:
            ranges.append((c0, c1))
            continue
        piece = max(piece, SAME_KERNEL_ROWS)
        starts = list(range(c0, c1, piece))
        if c1 - starts[-1] < SAME_KERNEL_ROWS:
            starts.pop()  # a short tail joins the piece before it
        ranges.extend(zip(starts, starts[1:] + [c1]))
    return ranges


def split_at(ranges: list[tuple[int, int]], cuts: list[int]) -> list[tuple[int, int]]:
    """`ranges` cut in two wherever a position of `cuts` falls inside one."""
    out = []
    for a, b in ranges:
        inner = sorted(c for c in set(cuts) if a < c < b)
        out.extend(zip([a, *inner], [*inner, b]))
    return out


class Sequence:
    """One generation's state between model forwards, shared by `stream_generate` (one sequence) and the
    server's engine (a batch of them): the first input after the prefill, the sampling of each forward's
    last logits, and what each next token means (segment, text, stop, thinking budget).

    Options as `stream_generate`'s. The caller runs the forwards: the prefill of `prefill` (all but the
    last prompt token), then `first_input()`, then each taken token (and `stop_ids` when `take` starts the
    thinking budget's stop text)."""

    def __init__(
        self,
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
        chat_template_kwargs: dict | None = None,
        prompt_cache: list | None = None,
        ignore_eos: bool = False,
        constraint=None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 0,
    ):
        self.tic = time.perf_counter()
        ids = prompt_tokens(tokenizer, prompt, enable_thinking=enable_thinking, tools=tools,
                            chat_template_kwargs=chat_template_kwargs)
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
        if kv_bits is not None:
            if kv_bits not in (4, 8):
                raise Qwen3MLXError(f"kv_bits must be 4 or 8, got {kv_bits}")
            head_dim = getattr(model.args, "head_dim", 0)
            if kv_group_size not in (32, 64, 128) or (head_dim and head_dim % kv_group_size):
                raise Qwen3MLXError(f"kv_group_size must be 32, 64 or 128 and divide head_dim ({head_dim}), "
                                    f"got {kv_group_size}")
            if quantized_kv_start < 0:
                raise Qwen3MLXError(f"quantized_kv_start must be 0 or more, got {quantized_kv_start}")
        self.kv = dict(bits=kv_bits, group_size=kv_group_size, start=quantized_kv_start)
        if params.repetition_penalty is not None and params.repetition_penalty <= 0:
            raise Qwen3MLXError(f"repetition_penalty must be above 0, got {params.repetition_penalty}")

        self.ids, self.prefill = ids, ids[:-1]
        # A model with recurrent state can only go back to a checkpoint: its prefill ends a forward at the start
        # of each message (the end of the system prompt, of each turn), where a later prompt still agrees.
        self.cuts: list[int] = []
        if hasattr(model, "make_cache") and tokenizer is not None:
            im_start = tokenizer.token_to_id("<|im_start|>")
            self.cuts = [i for i, t in enumerate(self.prefill) if t == im_start and i > 0]
        self.max_tokens, self.constraint, self.enable_thinking = max_tokens, constraint, enable_thinking
        self.thinking_budget = thinking_budget
        self.cache = prompt_cache if prompt_cache is not None else make_cache(model)
        # Positions the cache held before this prompt (a chat's earlier turns): token i of ids + generated
        # sits at position base + i.
        self.base = min((c.offset for c in self.cache), default=0)
        self.eos = set() if (ignore_eos or tokenizer is None) else set(tokenizer.eos_token_ids)
        self.think_start = getattr(tokenizer, "think_start_id", None)
        self.tracker = SegmentTracker(self.think_start, getattr(tokenizer, "think_end_id", None), ids)
        self.detok = tokenizer.detokenizer() if tokenizer is not None else None
        self.stop_ids = tokenizer.encode(BUDGET_STOP_TEXT) if (tokenizer is not None and thinking_budget is not None) else []
        self.sampler = _Sampler(model.args.vocab_size, params, seed, ids)
        self.forced: deque[int] = deque()  # budget-stop tokens waiting to be handed out
        self.generated: list[int] = []  # every token handed out (sampled or forced)
        self.finish_reason: str | None = None
        self._reasoning_sampled = 0
        self._t_first = None
        self._ttft = self._prompt_tps = 0.0

    def quantize_cache(self) -> None:
        """With kv_bits: turn the cache quantized once it holds quantized_kv_start positions (call before each
        forward)."""
        quantize_cache(self.cache, bits=self.kv["bits"], group_size=self.kv["group_size"], start=self.kv["start"])

    def budget_reached(self) -> bool:
        return bool(self.stop_ids) and self.tracker.in_reasoning and self._reasoning_sampled >= self.thinking_budget

    def first_input(self) -> tuple[list[int], int, mx.array | None]:
        """(tokens, how many of them count as generated output, logits mask) of the forward after the prefill."""
        if self.budget_reached():  # the prompt left <think> open and the budget is 0
            self.forced.extend(self.stop_ids)
            return self.ids[-1:] + self.stop_ids, len(self.stop_ids), None
        mask = None
        if self.constraint is not None and not self.tracker.in_reasoning:
            mask = self.constraint.mask()
            if self.enable_thinking and self.think_start is not None:
                # Thinking on: the model opens <think> itself as its first token; the constraint starts after.
                mask = mx.where(mx.arange(mask.shape[-1]) == self.think_start, 0.0, mask)
        return self.ids[-1:], 0, mask

    def sample(self, logits: mx.array, fed, n_generated: int, mask: mx.array | None = None) -> mx.array:
        """The next token [1] from the last position's logits [1, vocab] of a forward that fed `fed` (token
        list or array), whose last `n_generated` count as output for the penalties; `mask` is added first."""
        return self.sampler.sample(logits, fed, n_generated, mask)

    def constrain(self, token: int) -> None:
        """Advance the constraint (if any) past a sampled `token` when it is an answer token. Call before
        `take(token)`, then `mask_after(token)` for the forward that feeds it."""
        tracker = self.tracker
        if self.constraint is not None and not tracker.in_reasoning and not tracker.in_reasoning_after(token):
            self.constraint.advance(token)

    def mask_after(self, token: int) -> mx.array | None:
        """The logits mask of the forward that feeds `token` (None without a constraint or in the reasoning)."""
        if self.constraint is None or self.tracker.in_reasoning_after(token):
            return None
        return self.constraint.mask()

    def wants_more(self, token: int) -> bool:
        """Whether a sampled `token` (not yet taken) can be followed by another."""
        return len(self.generated) + 1 < self.max_tokens and token not in self.eos

    def take(self, token: int, sampled: bool = True) -> GenerationResponse:
        """Hand out the next token (sampled, or forced by the budget): its text, segment and finish. When it
        starts the thinking budget's stop text, `forced` fills with `stop_ids`, to feed next."""
        self.generated.append(token)
        n = len(self.generated)
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first = now
            self._ttft = now - self.tic
            self._prompt_tps = len(self.ids) / self._ttft
        segment = self.tracker.update(token)
        if sampled and segment == "reasoning":
            self._reasoning_sampled += 1
        finish = None
        if token in self.eos:
            finish = "stop"
            text = self.detok.flush() if self.detok else ""
        else:
            text = self.detok.add(token) if self.detok else ""
            if n >= self.max_tokens:
                finish = "length"
        if finish == "length" and self.detok:
            text += self.detok.flush()
        if finish is None and not self.forced and self.budget_reached():
            self.forced.extend(self.stop_ids)
        self.finish_reason = finish
        return GenerationResponse(
            text=text,
            token=token,
            segment=segment,
            finish_reason=finish,
            prompt_tokens=len(self.ids),
            prompt_tps=self._prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / (now - self._t_first) if n > 1 and now > self._t_first else 0.0,
            time_to_first_token=self._ttft,
            peak_memory=mx.get_peak_memory() / 1e9,
        )


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
    chat_template_kwargs: dict | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 512,
    ignore_eos: bool = False,
    constraint=None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    draft_model=None,
    num_draft: int = 3,
    draft_cache: list | None = None,
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
    `chat_template_kwargs`: more variables for the chat template of a messages prompt (`preserve_thinking`, ...).

    `constraint`: limits the answer's tokens (not the reasoning's), e.g. to a JSON schema. An object with
    `mask()` (an additive [vocab] logits mask for the next token: 0 allowed, -inf not) and `advance(token)`.
    Each step then waits for its token before the next is queued (no pipelining).

    `kv_bits` (4 or 8): keep the KV cache quantized (groups of `kv_group_size` along head_dim), in float
    until it holds `quantized_kv_start` positions, then all of it quantized (attention reads it as it is).

    `draft_model`: speculative decoding (see `qwen3_mlx.speculative`): the draft proposes `num_draft` tokens a
    round and the target keeps those it agrees with. Greedy output is exactly plain greedy's; sampled output
    follows the same distribution. `draft_cache` (the draft's KVCache list, holding what `prompt_cache` holds)
    lets a chat reuse it across turns; each response counts the drafted and kept tokens.
    """
    seq = Sequence(
        model, tokenizer, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, presence_penalty=presence_penalty, repetition_penalty=repetition_penalty, seed=seed,
        enable_thinking=enable_thinking, thinking_budget=thinking_budget, tools=tools, chat_template_kwargs=chat_template_kwargs,
        prompt_cache=prompt_cache, ignore_eos=ignore_eos, constraint=constraint, kv_bits=kv_bits, kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
    )

    def forward(tokens, n_generated: int, mask=None) -> mx.array:
        seq.quantize_cache()
        inputs = mx.array(tokens) if isinstance(tokens, list) else tokens.reshape(-1)
        logits = model(inputs[None], seq.cache)[:, -1, :]
        y = seq.sample(logits, inputs, n_generated, mask)
        mx.async_eval(y)
        return y

    spec = None
    if draft_model is not None:
        from .speculative import Speculator, check_draft

        check_draft(model, draft_model)
        spec = Speculator(model, draft_model, seq, num_draft, draft_cache)
    # Prefill all but the last prompt token in chunks, evaluating each so memory stays bounded.
    for start, end in split_at(prefill_plan(len(seq.prefill), prefill_step_size), seq.cuts):
        seq.quantize_cache()
        model.fill(mx.array(seq.prefill[start:end])[None], seq.cache)
        mx.eval([c.state for c in seq.cache])
        if spec is not None:
            draft_model.fill(mx.array(seq.prefill[start:end])[None], spec.dcache)
            mx.eval([c.state for c in spec.dcache])
    y = forward(*seq.first_input())
    if spec is not None:
        yield from _speculative(seq, spec, y, forward, lambda tokens: model(mx.array(tokens)[None], seq.cache))
        return
    try:
        yield from _plain(seq, y, forward)
    finally:
        # The cache holds every token handed out but the last (a queued step may have fed one more): the state
        # a caller reusing it (chat) sees, with or without a draft model.
        truncate_cache(seq.cache, seq.base + len(seq.ids) + len(seq.generated) - 1)


def _plain(seq: Sequence, y: mx.array, forward) -> Iterator[GenerationResponse]:
    while True:
        if seq.forced:
            token, sampled = seq.forced.popleft(), False
        elif seq.constraint is not None:
            # The next mask depends on this token: take it, then queue the next step.
            token, sampled = int(y.item()), True
            seq.constrain(token)
            if seq.wants_more(token):
                next_y = forward(y, 1, seq.mask_after(token))
        else:
            if len(seq.generated) + 1 < seq.max_tokens:
                # Queue the next step before handing this token out: the model works while the caller prints.
                next_y = forward(y, 1)
            token, sampled = int(y.item()), True
        response = seq.take(token, sampled)
        if sampled and seq.forced:
            # The queued step fed `token` into the cache; its sampled output is dropped in favour of the stop text.
            next_y = forward(seq.stop_ids, len(seq.stop_ids))
        yield response
        if response.finish_reason is not None:
            return
        if sampled:
            y = next_y


def _speculative(seq: Sequence, spec, y: mx.array, forward, feed) -> Iterator[GenerationResponse]:
    from .speculative import speculative_tokens

    def stop_forward() -> int:
        # The token that started the budget's stop text, then the text, as plain decoding feeds them.
        tokens = seq.ids + seq.generated
        upto = len(tokens) - len(seq.stop_ids)
        held = truncate_cache(seq.cache, seq.base + upto) - seq.base
        if held < upto:
            feed(tokens[held:upto])
        return int(forward(seq.stop_ids, len(seq.stop_ids)).item())

    try:
        while seq.forced:  # the prompt left <think> open and the budget is 0
            yield seq.take(seq.forced.popleft(), sampled=False)
            if seq.finish_reason is not None:
                return
        for token, sampled in speculative_tokens(spec, int(y.item()), stop_forward):
            response = seq.take(token, sampled)
            response.draft_tokens, response.accepted_tokens = spec.proposed, spec.accepted
            yield response
            if response.finish_reason is not None:
                return
    finally:
        spec.settle()


class _Sampler:
    """Logits processing + sampling, with the state they share (penalty masks, PRNG key)."""

    def __init__(self, vocab: int, params: SamplingParams, seed: int | None, prompt: list[int]):
        self.params = params
        self.key = mx.random.key(seed) if seed is not None else None
        # 0/1 masks over the vocabulary: generated tokens (presence) and prompt + generated (repetition).
        self.generated = mx.zeros((vocab,), mx.float32) if params.presence_penalty else None
        self.context = None
        if params.repetition_penalty not in (None, 1.0):
            valid = [t for t in prompt if 0 <= t < vocab]
            self.context = mx.zeros((vocab,), mx.float32)
            if valid:
                self.context = self.context.at[mx.array(valid)].maximum(1.0)

    def sample(self, logits: mx.array, fed, n_generated: int, mask: mx.array | None = None) -> mx.array:
        if n_generated:
            fed = mx.array(fed) if isinstance(fed, list) else fed.reshape(-1)
            new = fed[-n_generated:]
            if self.generated is not None:
                self.generated = self.generated.at[new].maximum(1.0)
            if self.context is not None:
                self.context = self.context.at[new].maximum(1.0)
        logits = logits.astype(mx.float32)  # [1, vocab]
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
        text="".join(text), reasoning=reasoning, answer=answer, tool_calls=parse_tool_calls(answer, options.get("tools")), tokens=tokens
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
