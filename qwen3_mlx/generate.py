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
from .options import GenerationOptions, as_options
from .sample import Draw, Sampler, TokenLogprobs
from .tools import ToolCall, parse_tool_calls

# Qwen's early-stop text for a thinking budget (Qwen3 README): it closes the reasoning and the answer follows.
BUDGET_STOP_TEXT = (
    "Considering the limited time by the user, I have to give the solution based on the thinking directly now."
    "\n</think>.\n\n"
)


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
    logprobs: TokenLogprobs | None = None  # with the logprobs option, for sampled tokens (not forced ones)


@dataclass
class GenerationResult:
    """A whole generation: reasoning and answer separately, tool calls parsed from the answer."""

    text: str  # everything decoded, think tags included (eos excluded)
    reasoning: str  # inside <think>...</think>, tags and surrounding newlines removed
    answer: str  # after </think> (or everything, when there was no reasoning)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # generated ids, eos included
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # per token, with the logprobs option
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
TEMPLATE_ARGUMENTS = frozenset({"messages", "tools", "enable_thinking", "add_generation_prompt", "documents",
                                "reasoning_effort"})


def refuse_media(content, where: str) -> None:
    """Raise for image / video / audio parts in a message's content: the models here are run as text only (a
    Qwen3.5 / 3.6 checkpoint's vision tower is not loaded), and the template would emit placeholders for them."""
    if isinstance(content, list):
        for part in (p for p in content if isinstance(p, dict)):
            kind = part.get("type") or next((k for k in ("image", "image_url", "video") if k in part), "text")
            if kind != "text":
                raise Qwen3MLXError(f"{where}: {kind} content is not supported: qwen3-mlx runs the "
                                    "language model only (text in, text out)")


def prompt_tokens(tokenizer, prompt, options: GenerationOptions | None = None) -> list[int]:
    """Token ids of a prompt given as text, token ids, or chat messages (see the module docstring). `options`
    give the template its variables: `enable_thinking`, `tools`, `reasoning_effort`, `chat_template_kwargs`."""
    options = options or GenerationOptions()
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
        return tokenizer.encode(tokenizer.apply_chat_template(prompt, tools=options.tools,
                                                              enable_thinking=options.enable_thinking,
                                                              **template_variables(tokenizer, options)))
    if all(isinstance(t, int) for t in prompt):
        return [int(t) for t in prompt]
    raise Qwen3MLXError("prompt must be a string, a list of token ids, or a list of chat messages")


def template_variables(tokenizer, options: GenerationOptions) -> dict:
    """The chat template's extra variables: `chat_template_kwargs`, and `reasoning_effort` for a template that
    reads it (a template that does not would ignore it silently: refused instead)."""
    extra = dict(options.chat_template_kwargs or {})
    taken = sorted(set(extra) & TEMPLATE_ARGUMENTS)
    if taken:
        raise Qwen3MLXError(f"chat_template_kwargs cannot set {', '.join(taken)} (given by its own option)")
    if options.reasoning_effort is not None:
        if "reasoning_effort" not in tokenizer.template_source(options.tools):
            raise Qwen3MLXError(f"this model's chat template does not read reasoning_effort (given "
                                f"{options.reasoning_effort!r}); leave it out")
        extra["reasoning_effort"] = options.reasoning_effort
    return extra


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
    """One generation's per-token state between model forwards, shared by `stream_generate` (one sequence) and
    the server's engine (a batch of them): the prompt and where it sits in the cache, the sampling of each
    forward's last logits, and what each next token means (segment, text, stop, thinking budget).

    `options` are validated by the caller (`GenerationOptions.validate`). The caller runs the forwards: the
    prefill of `prefill` (all but the last prompt token), then `first_input()`, then each taken token (and
    `stop_ids` when `take` starts the thinking budget's stop text)."""

    def __init__(self, model, tokenizer, prompt, options: GenerationOptions, prompt_cache: list | None = None):
        if getattr(model, "headless", False):
            raise Qwen3MLXError("this is an embedding model (a decoder without an LM head): it embeds "
                                "(qwen3_mlx.embed, qwen3-mlx embed), it does not generate")
        self.tic = time.perf_counter()
        self.options = options
        ids = prompt_tokens(tokenizer, prompt, options)
        if not ids:
            raise Qwen3MLXError("the prompt is empty")
        self.ids, self.prefill = ids, ids[:-1]
        # A model with recurrent state can only go back to a checkpoint: its prefill ends a forward at the start
        # of each message (the end of the system prompt, of each turn), where a later prompt still agrees.
        self.cuts: list[int] = []
        if hasattr(model, "make_cache") and tokenizer is not None:
            im_start = tokenizer.token_to_id("<|im_start|>")
            self.cuts = [i for i, t in enumerate(self.prefill) if t == im_start and i > 0]
        self.cache = prompt_cache if prompt_cache is not None else make_cache(model)
        # Positions the cache held before this prompt (a chat's earlier turns): token i of ids + generated
        # sits at position base + i.
        self.base = min((c.offset for c in self.cache), default=0)
        self.eos = set() if (options.ignore_eos or tokenizer is None) else set(tokenizer.eos_token_ids)
        self.think_start = getattr(tokenizer, "think_start_id", None)
        self.tracker = SegmentTracker(self.think_start, getattr(tokenizer, "think_end_id", None), ids)
        self.detok = tokenizer.detokenizer() if tokenizer is not None else None
        from .grammar import constraint_for

        self.constraint = constraint_for(tokenizer, options, model.args.vocab_size)
        stop_text = BUDGET_STOP_TEXT
        if self.constraint is not None:  # the constraint decides what follows </think>
            stop_text = stop_text[: stop_text.index("</think>") + len("</think>")]
        budgeted = tokenizer is not None and options.thinking_budget is not None
        self.stop_ids = tokenizer.encode(stop_text) if budgeted else []
        params = options.sampling(load_generation_config(model, tokenizer))
        self.sample = Sampler(params, model.args.vocab_size, ids, options.seed, options.logprobs)
        self.forced: deque[int] = deque()  # budget-stop tokens waiting to be handed out
        self.generated: list[int] = []  # every token handed out (sampled or forced)
        self.finish_reason: str | None = None
        self._reasoning_sampled = 0
        self._t_first = None
        self._ttft = self._prompt_tps = 0.0

    def quantize_cache(self) -> None:
        """With kv_bits: turn the cache quantized once it holds quantized_kv_start positions (call before each
        forward)."""
        o = self.options
        quantize_cache(self.cache, bits=o.kv_bits, group_size=o.kv_group_size, start=o.quantized_kv_start)

    def budget_reached(self) -> bool:
        return (bool(self.stop_ids) and self.tracker.in_reasoning
                and self._reasoning_sampled >= self.options.thinking_budget)

    def first_input(self) -> tuple[list[int], int, mx.array | None]:
        """(tokens, how many of them count as generated output, logits mask) of the forward after the prefill."""
        if self.budget_reached():  # the prompt left <think> open and the budget is 0
            self.forced.extend(self.stop_ids)
            return self.ids[-1:] + self.stop_ids, len(self.stop_ids), self.mask_after(self.stop_ids[-1])
        mask = None
        if self.constraint is not None and not self.tracker.in_reasoning:
            mask = self.constraint.mask()
            if self.options.enable_thinking and self.think_start is not None:
                # Thinking on: the model opens <think> itself as its first token; the constraint starts after.
                mask = mx.where(mx.arange(mask.shape[-1]) == self.think_start, 0.0, mask)
        return self.ids[-1:], 0, mask

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
        return len(self.generated) + 1 < self.options.max_tokens and token not in self.eos

    def take(self, token: int, sampled: bool = True, logprobs: TokenLogprobs | None = None) -> GenerationResponse:
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
        finish = "stop" if token in self.eos else ("length" if n >= self.options.max_tokens else None)
        text = ""
        if self.detok is not None:
            text = self.detok.flush() if finish == "stop" else self.detok.add(token)
            if finish == "length":
                text += self.detok.flush()
        if finish is None and not self.forced and self.budget_reached():
            self.forced.extend(self.stop_ids)
        self.finish_reason = finish
        return GenerationResponse(
            text=text, token=token, segment=segment, finish_reason=finish, prompt_tokens=len(self.ids),
            prompt_tps=self._prompt_tps, generation_tokens=n,
            generation_tps=(n - 1) / (now - self._t_first) if n > 1 and now > self._t_first else 0.0,
            time_to_first_token=self._ttft, peak_memory=mx.get_peak_memory() / 1e9, logprobs=logprobs,
        )


def stream_generate(model, tokenizer, prompt, options: GenerationOptions | None = None, *,
                    prompt_cache: list | None = None, draft_cache: list | None = None,
                    **overrides) -> Iterator[GenerationResponse]:
    """Generate from `prompt` token by token, yielding a `GenerationResponse` per token.

    `options` (a `GenerationOptions`; its fields document each option) with keyword `overrides`
    (`stream_generate(model, tok, prompt, temperature=0)`). `prompt_cache`: the per-layer caches to extend (the
    caller passes only the tokens not already cached); a fresh cache otherwise. `draft_cache`: the draft
    model's caches holding what `prompt_cache` holds (a chat reusing both across turns).

    Each call with a `seed` starts its own random stream, so two calls with one seed draw the same numbers (a
    multi-turn caller varies it per turn). With a constraint (a response_format, tools) the next forward is
    queued before its mask is computed: the model runs while the grammar works. With a draft model, greedy
    output is exactly plain greedy's and sampled output follows the same distribution; each response counts the
    drafted and kept tokens.
    """
    options = as_options(options, overrides).validate(getattr(model, "args", None))
    seq = Sequence(model, tokenizer, prompt, options, prompt_cache)
    if options.draft_model is not None:
        from .speculative import Speculator

        yield from speculative_generate(model, seq, Speculator(model, seq, draft_cache))
        return
    forward = _forwarder(model, seq, None)
    _prefill(model, seq, None)
    y = forward(*seq.first_input())
    try:
        yield from _plain(seq, y, forward)
    finally:
        # The cache holds every token handed out but the last (a queued step may have fed one more): the state
        # a caller reusing it (chat) sees, with or without a draft model.
        truncate_cache(seq.cache, seq.base + len(seq.ids) + len(seq.generated) - 1)


def speculative_generate(model, seq: Sequence, spec, cached: int = 0) -> Iterator[GenerationResponse]:
    """The speculative half of `stream_generate`: prefill `seq` (after its first `cached` prompt tokens, which
    both caches already hold) and decode it through `spec` (a `speculative.Speculator` of `seq`). The server's
    engine calls it with a prefix-cache hit; closing the generator early leaves both caches settled."""
    forward = _forwarder(model, seq, spec)
    _prefill(model, seq, spec, cached)
    y = forward(*seq.first_input())
    yield from _speculative(seq, spec, y, forward, spec.forward)


def _forwarder(model, seq: Sequence, spec):
    def forward(tokens, n_generated: int, mask=None) -> Draw:
        """Queue a forward of `tokens` and the sampling of its last logits; `mask` may be a function, called
        once the forward is queued (a constraint's next mask needs the token the forward feeds, not its result)."""
        seq.quantize_cache()
        inputs = mx.array(tokens) if isinstance(tokens, list) else tokens.reshape(-1)
        logits = (spec.forward(tokens) if spec is not None else model(inputs[None], seq.cache))[:, -1, :]
        if callable(mask):
            mx.async_eval(logits)
            mask = mask()
        y = seq.sample(logits, inputs, n_generated, mask)
        mx.async_eval(y.arrays())
        return y

    return forward


def _prefill(model, seq: Sequence, spec, cached: int = 0) -> None:
    """All but the last prompt token (after the first `cached`, already held) in chunks, each evaluated so memory
    stays bounded (the draft's too)."""
    rest = seq.prefill[cached:]
    plan = split_at(prefill_plan(len(rest), seq.options.prefill_step_size), [c - cached for c in seq.cuts])
    for start, end in plan:
        seq.quantize_cache()
        if spec is not None:
            spec.fill(rest[start:end])
            continue
        model.fill(mx.array(rest[start:end])[None], seq.cache)
        mx.eval([c.state for c in seq.cache])


def _plain(seq: Sequence, y: Draw, forward) -> Iterator[GenerationResponse]:
    while True:
        if seq.forced:
            token, sampled = seq.forced.popleft(), False
        elif seq.constraint is not None:
            # The next mask depends on this token, the forward that feeds it does not: the forward is queued
            # first and runs while the grammar computes the mask.
            def next_mask(y: Draw = y):
                token = int(y.token.item())
                seq.constrain(token)
                return seq.mask_after(token) if seq.wants_more(token) else None

            if len(seq.generated) + 1 < seq.options.max_tokens:
                next_y = forward(y.token, 1, next_mask)
            else:
                next_mask()
            token, sampled = int(y.token.item()), True
        else:
            if len(seq.generated) + 1 < seq.options.max_tokens:
                # Queue the next step before handing this token out: the model works while the caller prints.
                next_y = forward(y.token, 1)
            token, sampled = int(y.token.item()), True
        response = seq.take(token, sampled, y.read_logprobs() if sampled else None)
        if sampled and seq.forced:
            # The queued step fed `token` into the cache; its sampled output is dropped in favour of the stop text.
            next_y = forward(seq.stop_ids, len(seq.stop_ids), seq.mask_after(seq.stop_ids[-1]))
        yield response
        if response.finish_reason is not None:
            return
        if sampled:
            y = next_y


def _speculative(seq: Sequence, spec, y: Draw, forward, feed) -> Iterator[GenerationResponse]:
    from .speculative import speculative_tokens

    def stop_forward() -> int:
        # The token that started the budget's stop text, then the text, as plain decoding feeds them.
        tokens = seq.ids + seq.generated
        upto = len(tokens) - len(seq.stop_ids)
        held = truncate_cache(seq.cache, seq.base + upto) - seq.base
        if held < upto:
            feed(tokens[held:upto])
        return int(forward(seq.stop_ids, len(seq.stop_ids)).token.item())

    try:
        while seq.forced:  # the prompt left <think> open and the budget is 0
            yield seq.take(seq.forced.popleft(), sampled=False)
            if seq.finish_reason is not None:
                return
        for token, sampled in speculative_tokens(spec, int(y.token.item()), stop_forward):
            response = seq.take(token, sampled)
            response.draft_tokens, response.accepted_tokens = spec.proposed, spec.accepted
            yield response
            if response.finish_reason is not None:
                return
    finally:
        spec.settle()


def tidy_segments(reasoning: str, answer: str) -> tuple[str, str]:
    """Streamed reasoning and answer text without the think tags and the newlines that only frame them."""
    return reasoning.replace("<think>", "").replace("</think>", "").strip("\n"), answer.lstrip("\n")


def generate(model, tokenizer, prompt, options: GenerationOptions | None = None, *, prompt_cache: list | None = None,
             draft_cache: list | None = None, **overrides) -> GenerationResult:
    """Run `stream_generate` to the end and return the whole result (the same arguments)."""
    options = as_options(options, overrides)
    pieces = {"reasoning": [], "answer": []}
    text: list[str] = []
    tokens: list[int] = []
    logprobs = []
    last = None
    for last in stream_generate(model, tokenizer, prompt, options, prompt_cache=prompt_cache, draft_cache=draft_cache):
        tokens.append(last.token)
        logprobs.append(last.logprobs)
        text.append(last.text)
        pieces[last.segment].append(last.text)
    reasoning, answer = tidy_segments("".join(pieces["reasoning"]), "".join(pieces["answer"]))
    stats = {name: getattr(last, name) for name in ("finish_reason", "prompt_tokens", "prompt_tps", "generation_tokens",
                                                    "generation_tps", "time_to_first_token", "peak_memory")}
    return GenerationResult(text="".join(text), reasoning=reasoning, answer=answer, tokens=tokens,
                            logprobs=logprobs if options.logprobs is not None else [],
                            tool_calls=parse_tool_calls(answer, options.tools), **(stats if last else {}))
