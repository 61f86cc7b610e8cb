"""Speculative decoding: a drafter proposes a few tokens, the target checks them in one forward.

The drafter is a small model of the same vocabulary (`ModelDrafter`) or the target's own multi-token-prediction
head (`models/mtp.MtpDrafter`, which drafts from the target's hidden states). Each round the drafter proposes
`num_draft` tokens on its own cache; the target runs its last token and the drafts as one forward (a few positions: the kernels compute each exactly as a decode step would) and keeps
the drafts it agrees with:
- greedy: a draft stays while it is the target's argmax, then the target's own token follows, so the output
  is the one plain greedy decoding gives, token for token;
- sampling: the standard rejection scheme (Leviathan et al. 2023, Chen et al. 2023): draft d is kept with
  probability min(1, p(d) / q(d)), else a token is drawn from max(p - q, 0) renormalised; when all are kept
  one more comes from the target. The output follows the target's distribution (after the same
  temperature / top-k / top-p / min-p filters on both models).
Both caches are cut back to the kept tokens after each round.
"""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import numpy as np

from .errors import Qwen3MLXError
from .models.cache import make_cache, truncate_cache
from .sample import filter_logits


def check_draft(args, draft_args, tokenizer=None, draft_tokenizer=None) -> None:
    """Refuse a draft (its `ModelArgs`, and tokenizer when given) that cannot propose the target's tokens."""
    if draft_args.vocab_size != args.vocab_size:
        raise Qwen3MLXError(f"the draft model's vocabulary ({draft_args.vocab_size}) differs from the target's "
                            f"({args.vocab_size})")
    if tokenizer is not None and draft_tokenizer is not None and tokenizer.to_json() != draft_tokenizer.to_json():
        raise Qwen3MLXError("the draft model's tokenizer differs from the target's: its tokens would mean other text")


def _probs(logits: mx.array, params) -> mx.array:
    """[N, vocab] logits -> the sampling distribution after the filters (float32)."""
    return mx.softmax(filter_logits(logits.astype(mx.float32), params), axis=-1)


def _pick(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from a (possibly unnormalised) distribution with uniform u in [0, 1)."""
    c = np.cumsum(probs, dtype=np.float64)
    return int(min(np.searchsorted(c, u * c[-1], side="right"), len(probs) - 1))


def accept_drafts(p: np.ndarray, q: np.ndarray, drafts: list[int], u: np.ndarray) -> list[int]:
    """The rejection scheme on one round: target distributions p [k + 1, vocab] (after each prefix), draft
    distributions q [k, vocab] that drafts [k] were drawn from, uniforms u [k + 1]. Returns the kept drafts
    then one token from the target (the residual max(p - q, 0) after a rejection, p itself after all k)."""
    k = len(drafts)
    j = 0
    while j < k and u[j] * q[j, drafts[j]] < p[j, drafts[j]]:  # kept with probability min(1, p / q)
        j += 1
    if j < k:
        residual = np.maximum(p[j] - q[j], 0.0)
        return drafts[:j] + [_pick(residual if residual.sum() > 0 else p[j], u[k])]
    return drafts + [_pick(p[k], u[k])]


class ModelDrafter:
    """A separate draft model of the target's vocabulary: it proposes from its own cache of the same tokens.

    The drafter protocol (`models/mtp.MtpDrafter` is the other one): `make_cache`, `fill` (a prefill chunk),
    `observe` (any other target forward), `propose`, `commit` (after the verification), `settle`; `wants_hidden`:
    whether the target's forwards must hand it their final hidden states (`model.hidden_states`)."""

    wants_hidden = False

    def __init__(self, model):
        self.model, self.args = model, model.args

    def make_cache(self) -> list:
        return make_cache(self.model)

    def fill(self, cache: list, tokens: list[int], hidden) -> None:
        self.model.fill(mx.array(tokens)[None], cache)

    def observe(self, cache: list, tokens: list[int], hidden) -> None:
        """Nothing: the draft catches up on the tokens when it next proposes."""

    def propose(self, cache: list, tokens: list[int], base: int, k: int, choose) -> list[mx.array]:
        T = base + len(tokens) - 1
        held = truncate_cache(cache, min(cache[0].offset if cache else 0, T))
        x = mx.array(tokens[held - base :])
        drafts = []
        for _ in range(k):
            d = choose(self.model(x[None], cache)[:, -1, :])
            drafts.append(d)
            x = d
        return drafts

    def commit(self, cache: list, start: int, tokens: list[int], hidden) -> None:
        # The draft fed up to its second-to-last draft: it keeps what the target kept.
        truncate_cache(cache, min(cache[0].offset, start + len(tokens)))

    def settle(self, cache: list, tokens: list[int], base: int, n: int) -> None:
        held = truncate_cache(cache, n)
        if held < n:  # the draft is a token or two behind: catch up
            self.model.fill(mx.array(tokens[held - base : n - base])[None], cache)
            mx.eval([c.state for c in cache])


def drafter(draft):
    """The drafter for `GenerationOptions.draft_model`: a model, or already a drafter (an MTP head)."""
    return draft if hasattr(draft, "propose") else ModelDrafter(draft)


class Speculator:
    """The draft side of one generation and the verification of its proposals (see the module docstring).
    The target's forwards of a speculative generation go through it (`fill`, `forward`), so a drafter that
    reads the target's hidden states sees every position."""

    def __init__(self, model, seq, draft_cache: list | None = None):
        self.model, self.seq, self.k = model, seq, seq.options.num_draft
        self.drafter = drafter(seq.options.draft_model)
        self.dcache = draft_cache if draft_cache is not None else self.drafter.make_cache()
        held = min((c.offset for c in seq.cache), default=0)  # seq.base, or more (the server's prefix cache)
        if min((c.offset for c in self.dcache), default=0) < held:
            raise Qwen3MLXError("the draft's cache must hold the tokens the prompt cache holds")
        truncate_cache(self.dcache, held)
        self.params = seq.sample.params
        self.greedy = self.params.temperature == 0
        self.proposed = self.accepted = 0

    def _target(self, inputs: mx.array):
        """The target's forward of inputs [1, L] on the sequence's cache: (logits or None, hidden or None)."""
        if not self.drafter.wants_hidden:
            return self.model(inputs, self.seq.cache), None
        h = self.model.hidden_states(inputs, self.seq.cache)
        return self.model.logits(h), h

    def fill(self, tokens: list[int]) -> None:
        """A prefill chunk into both caches, evaluated (memory stays bounded)."""
        if self.drafter.wants_hidden:
            hidden = self.model.hidden_states(mx.array(tokens)[None], self.seq.cache)
        else:
            hidden = self.model.fill(mx.array(tokens)[None], self.seq.cache)
        self.drafter.fill(self.dcache, tokens, hidden)
        mx.eval([c.state for c in self.seq.cache], [c.state for c in self.dcache])

    def forward(self, tokens: list[int]) -> mx.array:
        """Logits [1, L, vocab] of the target's forward of `tokens` after what its cache holds, shown to the
        drafter (which goes back with the target when the target went back)."""
        start = min(c.offset for c in self.seq.cache)
        if self.drafter.wants_hidden and truncate_cache(self.dcache, start) != start:
            raise Qwen3MLXError(f"the drafter cannot follow the target back to position {start}")
        logits, hidden = self._target(mx.array(tokens)[None])
        self.drafter.observe(self.dcache, tokens, hidden)
        return logits

    def _uniforms(self, n: int) -> np.ndarray:
        return np.array(mx.random.uniform(shape=(n,), key=self.seq.sample.next_key()))

    def round(self) -> list[int]:
        """One draft-and-verify round after the taken tokens so far; returns the tokens it produces (the kept
        drafts, then the target's own). The target's cache then holds all of them but the last."""
        seq, cache = self.seq, self.seq.cache
        tokens = seq.ids + seq.generated  # token i at position seq.base + i
        T = seq.base + len(tokens) - 1  # positions the target holds: everything but the last token
        truncate_cache(cache, T)
        q = []

        def choose(logits: mx.array) -> mx.array:
            if self.greedy:
                return mx.argmax(logits, axis=-1)
            qi = _probs(logits, self.params)
            q.append(qi)
            return mx.random.categorical(mx.log(qi), axis=-1, key=self.seq.sample.next_key())

        proposal = mx.concatenate(self.drafter.propose(self.dcache, tokens, seq.base, self.k, choose))  # [k]
        logits, hidden = self._target(mx.concatenate([mx.array(tokens[-1:]), proposal])[None])
        logits = logits[0]  # [k + 1, vocab]
        if self.greedy:
            target = mx.argmax(logits, axis=-1)
            mx.eval(proposal, target)
            d, t = proposal.tolist(), target.tolist()
            j = 0
            while j < self.k and d[j] == t[j]:
                j += 1
            out = d[:j] + [t[j]]
        else:
            p = _probs(logits, self.params)
            qs = mx.concatenate(q)
            mx.eval(proposal, p, qs)
            out = accept_drafts(np.array(p), np.array(qs), proposal.tolist(), self._uniforms(self.k + 1))
            j = len(out) - 1
        self.proposed += self.k
        self.accepted += j
        # The target fed its last token and all k drafts: keep those kept.
        held = truncate_cache(cache, T + 1 + j)
        if held < T + 1 + j:  # a recurrent state went back to the round's start: feed the kept tokens again
            self.model.fill(mx.array((tokens + out[:j])[held - seq.base :])[None], cache)
        self.drafter.commit(self.dcache, T, tokens[-1:] + out[:j], None if hidden is None else hidden[:, : j + 1])
        return out

    def settle(self) -> None:
        """Leave both caches holding every token handed out but the last, as plain generation leaves its
        cache, so a chat's next turn reuses the same prefix with a draft as without one."""
        base, tokens = self.seq.base, self.seq.ids + self.seq.generated
        n = truncate_cache(self.seq.cache, base + len(tokens) - 1)
        self.drafter.settle(self.dcache, tokens, base, n)


def speculative_tokens(speculator: Speculator, first: int, stop_forward) -> Iterator[tuple[int, bool]]:
    """(token, sampled) in order: `first` (the target's first sampled token), then rounds of drafts. A token
    that starts the thinking budget's stop text drops the rest of its round; `stop_forward()` then feeds the
    stop text to the target and returns the token after it."""
    seq = speculator.seq
    pending = [first]
    while True:
        while pending:
            token = pending.pop(0)
            yield token, True
            if seq.finish_reason is not None:
                return
            if seq.forced:
                pending = []
                while seq.forced:
                    yield seq.forced.popleft(), False
                    if seq.finish_reason is not None:
                        return
                pending = [stop_forward()]
        pending = speculator.round()
