"""Sampling: small pure functions on logits [..., vocab], composed by `Sampler` in a fixed order.

The order is transformers': the constraint's mask, the penalties (presence, repetition), then the filters
(temperature, top-k, top-p, min-p) and the draw. Each step returns logits with removed tokens set to -inf, so
it can be tested on a hand-written distribution. A step that needs the tokens so far (a penalty) is a small
`Processor` that observes them; a new one is one more entry, not a new branch. Log probabilities are read off
the raw logits, before all of them (`token_logprobs`), as OpenAI documents them.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

NEG_INF = float("-inf")

# Qwen's recommendations (model cards): never greedy, it repeats itself endlessly.
THINKING_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
NON_THINKING_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}


def apply_presence_penalty(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """Subtract `penalty` from every token that occurs in `seen` (a 0/1 mask [..., vocab]), once per token."""
    if not penalty:
        return logits
    return logits - penalty * seen.astype(logits.dtype)


def apply_repetition_penalty(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """CTRL / transformers repetition penalty: seen tokens' logits divided by `penalty` when positive,
    multiplied when negative."""
    if penalty is None or penalty == 1.0:
        return logits
    penalised = mx.where(logits > 0, logits / penalty, logits * penalty)
    return mx.where(seen.astype(mx.bool_), penalised, logits)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the `k` highest logits (ties with the k-th are kept too)."""
    vocab = logits.shape[-1]
    if not k or k <= 0 or k >= vocab:
        return logits
    kth = mx.sort(logits, axis=-1)[..., vocab - k : vocab - k + 1]  # [..., 1]
    return mx.where(logits < kth, NEG_INF, logits)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus: keep the smallest set of most likely tokens whose probabilities sum to at least `p`.

    The most likely token always stays (transformers' `min_tokens_to_keep=1`), so `p=0` is greedy-like
    rather than an empty set that `categorical` would turn into a uniform draw over the vocabulary.
    """
    if p is None or p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)  # most likely first
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    # A token stays when the mass strictly before it is below p; the first one stays whatever p is.
    before = mx.cumsum(probs, axis=-1) - probs
    first = mx.arange(logits.shape[-1]) == 0  # [vocab]
    keep_sorted = mx.logical_or(before < p, first)
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, NEG_INF)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Keep tokens whose probability is at least `min_p` times the most likely token's."""
    if not min_p:
        return logits
    # In log space: logit - max >= log(min_p)
    top = mx.max(logits, axis=-1, keepdims=True)
    return mx.where(logits - top < mx.log(mx.array(min_p, logits.dtype)), NEG_INF, logits)


def apply_temperature(logits: mx.array, temperature: float) -> mx.array:
    return logits if temperature == 1.0 else logits / temperature


@dataclass
class SamplingParams:
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float | None = None


def resolve_sampling(
    enable_thinking: bool,
    generation_config: dict | None = None,
    **given,
) -> SamplingParams:
    """Sampling parameters: explicit values, else the model's generation_config.json, else Qwen's recommendation.

    Qwen ships its thinking-mode values in generation_config.json, so that file is consulted only in thinking mode;
    with thinking off Qwen's non-thinking recommendation (0.7 / 0.8 / 20 / 0) applies unless set explicitly.
    """
    defaults = dict(THINKING_DEFAULTS if enable_thinking else NON_THINKING_DEFAULTS)
    if enable_thinking and generation_config:
        for key in defaults:
            value = generation_config.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                defaults[key] = value
    values = {k: (given[k] if given.get(k) is not None else v) for k, v in defaults.items()}
    return SamplingParams(
        temperature=float(values["temperature"]),
        top_p=float(values["top_p"]),
        top_k=int(values["top_k"]),
        min_p=float(values["min_p"]),
        presence_penalty=float(given.get("presence_penalty") or 0.0),
        repetition_penalty=given.get("repetition_penalty"),
    )


def filter_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Temperature, top-k, top-p and min-p on full-vocabulary logits (the reference path)."""
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return apply_min_p(logits, params.min_p)


def sample(logits: mx.array, params: SamplingParams, key: mx.array | None = None) -> mx.array:
    """One token id per row of `logits` [B, vocab] -> [B] (uint32). Temperature 0 is greedy.

    With top-k set, the k candidates are gathered first and the other filters run on [B, k] instead of the
    whole vocabulary: the same distribution as `filter_logits`, without sorting 152k logits per token.
    """
    if params.temperature == 0:
        return mx.argmax(logits, axis=-1)
    vocab = logits.shape[-1]
    if params.top_k and 0 < params.top_k < vocab:
        candidates = mx.argpartition(-logits, params.top_k - 1, axis=-1)[..., : params.top_k]  # [B, k]
        values = mx.take_along_axis(logits, candidates, axis=-1)
        reduced = SamplingParams(params.temperature, params.top_p, 0, params.min_p)
        choice = mx.random.categorical(filter_logits(values, reduced), axis=-1, key=key)  # [B]
        return mx.take_along_axis(candidates, choice[..., None], axis=-1)[..., 0]
    return mx.random.categorical(filter_logits(logits, params), axis=-1, key=key)


class Processor:
    """A logits step with state: `observe` sees each forward's newly generated tokens (an int array), then
    `__call__` transforms the next logits [1, vocab]."""

    def observe(self, tokens: mx.array) -> None:
        pass

    def __call__(self, logits: mx.array) -> mx.array:
        raise NotImplementedError


class PresencePenalty(Processor):
    """`apply_presence_penalty` over the tokens generated so far (a 0/1 mask over the vocabulary)."""

    def __init__(self, vocab: int, penalty: float):
        self.seen, self.penalty = mx.zeros((vocab,), mx.float32), penalty

    def observe(self, tokens: mx.array) -> None:
        self.seen = self.seen.at[tokens].maximum(1.0)

    def __call__(self, logits: mx.array) -> mx.array:
        return apply_presence_penalty(logits, self.seen, self.penalty)


class RepetitionPenalty(PresencePenalty):
    """`apply_repetition_penalty` over the prompt's tokens and those generated so far."""

    def __init__(self, vocab: int, penalty: float, prompt: list[int]):
        super().__init__(vocab, penalty)
        valid = [t for t in prompt if 0 <= t < vocab]
        if valid:
            self.observe(mx.array(valid))

    def __call__(self, logits: mx.array) -> mx.array:
        return apply_repetition_penalty(logits, self.seen, self.penalty)


def token_logprobs(logits: mx.array, token: mx.array, top: int) -> tuple[mx.array, ...]:
    """The log probability of `token` [1] under `logits` [1, vocab] (log-softmax, float32), and the `top` most
    likely ids with theirs (unordered): (logprob [1], ids [top], logprobs [top])."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logp, token.reshape(-1, 1).astype(mx.int32), axis=-1).reshape(-1)
    if not top:
        return (chosen,)
    ids = mx.argpartition(-logp, top - 1, axis=-1)[..., :top].reshape(-1)
    return chosen, ids, logp.reshape(-1)[ids]


@dataclass
class TokenLogprobs:
    """A token's log probability under the model's distribution (before any penalty, filter or mask) and the
    most likely tokens at its position, most likely first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Draw:
    """One sampling: the token [1] and, when asked for, the arrays of its log probabilities (`token_logprobs`)."""

    token: mx.array
    logprobs: tuple[mx.array, ...] | None = None

    def arrays(self) -> list[mx.array]:
        return [self.token, *(self.logprobs or ())]

    def read_logprobs(self) -> TokenLogprobs | None:
        if self.logprobs is None:
            return None
        chosen, *top = self.logprobs
        pairs = zip(np.array(top[0]).tolist(), np.array(top[1]).tolist()) if top else ()
        return TokenLogprobs(float(chosen.item()), sorted(pairs, key=lambda p: (-p[1], p[0])))


class Sampler:
    """One sequence's sampling: its processors (penalties), its random stream (from `seed`, or MLX's global
    one without a seed), and with `top_logprobs` (0 or more) the log probabilities of each draw."""

    def __init__(self, params: SamplingParams, vocab: int, prompt: list[int], seed: int | None = None,
                 top_logprobs: int | None = None):
        self.params = params
        self.top_logprobs = top_logprobs
        self.key = mx.random.key(seed) if seed is not None else None
        self.processors: list[Processor] = []
        if params.presence_penalty:
            self.processors.append(PresencePenalty(vocab, params.presence_penalty))
        if params.repetition_penalty not in (None, 1.0):
            self.processors.append(RepetitionPenalty(vocab, params.repetition_penalty, prompt))

    def next_key(self) -> mx.array | None:
        """The key of the next draw (None: MLX's global random state)."""
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub

    def __call__(self, logits: mx.array, fed, n_generated: int, mask: mx.array | None = None) -> Draw:
        """The next token from the last position's logits [1, vocab] of a forward that fed `fed` (token list
        or array), whose last `n_generated` are output; `mask` (a constraint's, additive) is applied first."""
        if n_generated and self.processors:
            new = (mx.array(fed) if isinstance(fed, list) else fed.reshape(-1))[-n_generated:]
            for p in self.processors:
                p.observe(new)
        raw = logits = logits.astype(mx.float32)
        if mask is not None:
            logits = logits + mask
        for p in self.processors:
            logits = p(logits)
        token = sample(logits, self.params, self.next_key())
        if self.top_logprobs is None:
            return Draw(token)
        return Draw(token, token_logprobs(raw, token, self.top_logprobs))
