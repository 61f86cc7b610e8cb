"""Multi-token prediction (MTP): the draft head Qwen3.5 / 3.6 / 3.8 and Qwen3-Next checkpoints ship as `mtp.*`
tensors, run beside the target as a speculative drafter (`--draft-model mtp`; `speculative.py` verifies).

The checkpoint layout (one MTP layer; the names vLLM reads and transformers' `MtpModel` conversion maps):

    mtp.pre_fc_norm_embedding.weight     zero-centred RMSNorm (1 + w) of the next token's embedding
    mtp.pre_fc_norm_hidden.weight        zero-centred RMSNorm of the target's hidden state
    mtp.fc.weight [hidden, 2 hidden]     over concat(embedding, hidden): the embedding first
    mtp.layers.0.*                       one decoder block like the target's (full attention, its MLP kind)
    mtp.norm.weight                      then the target's lm_head; the embedding table is the target's too

Position i pairs the target's hidden state at i with the embedding of token i + 1 and predicts token i + 2. The
hidden state is the target's after its final norm (what its lm_head reads): transformers' MTP generator, vLLM and
llama.cpp feed that one, and llama.cpp measured more drafts kept with it than with the pre-norm state. Drafting
further feeds the head's own output (after mtp.norm) as the next hidden state.

The head is read from the checkpoint folder beside the model, never loaded into it: our exports leave `mtp.*` out
of the model's shards (mlx-swift-lm adds 1 to every norm of a checkpoint holding them). A model whose head is laid
out otherwise names its own drafter class (`Model.mtp_drafter_class`: qwen4_exp's hyper-connection head).
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
from mlx import nn

from ..errors import Qwen3MLXError
from .base import attention_mask
from .cache import KVCache, RecurrentCache, thin, truncate_cache
from .layers import Linear
from .qwen3_5 import ZeroCenteredRMSNorm

_LAYER = re.compile(r"^(?:model\.)?mtp\.layers\.(\d+)\.")


class MtpCache(RecurrentCache):
    """The drafter's state, counted in the target's positions: `offset` is how many of them it has seen.

    `kv`: the MTP block's keys and values, entry j from the pair (token j + 1, hidden state j). `tokens`,
    `hidden` [1, n, H]: the target's positions kv.offset .. offset - 1 not paired yet (the last one waits for the
    token after it). To `truncate_cache` it is a RecurrentCache: a pair cannot be taken apart, so it goes back
    only to a position after its last pair, or to one whose preceding token and hidden state it kept (`anchors`:
    where each target forward ended, as the target's own recurrent layers keep states around their forwards)."""

    max_anchors = 32

    def __init__(self):
        super().__init__()
        self.kv = KVCache()
        self.tokens: list[int] = []
        self.hidden: mx.array | None = None
        self.anchors: dict[int, tuple[int, mx.array]] = {}  # position p -> (token p - 1, hidden p - 1)

    def append(self, tokens: list[int], hidden: mx.array) -> None:
        """The target's input tokens of a forward at `offset` and their hidden states [1, n, H]."""
        self.tokens = self.tokens + list(tokens)
        self.hidden = hidden if self.hidden is None else mx.concatenate([self.hidden, hidden], axis=1)
        # A copy: a slice would keep the whole forward's hidden states alive.
        self.anchors[self.offset] = (self.tokens[-1], mx.contiguous(hidden[:, -1:]))
        thin(self.anchors, self.max_anchors)

    def take(self, n: int) -> tuple[list[int], mx.array]:
        """Remove and return the first `n` unpaired positions (their tokens and hidden states)."""
        tokens, hidden = self.tokens[:n], self.hidden[:, :n]
        self.tokens = self.tokens[n:]
        self.hidden = mx.contiguous(self.hidden[:, n:]) if self.tokens else None
        return tokens, hidden

    def reachable(self, length: int) -> int:
        if length >= self.offset:
            return self.offset
        if length > self.kv.offset:
            return length
        return max([p for p in self.anchors if p <= length], default=0)

    @property
    def offset(self) -> int:
        return self.kv.offset + len(self.tokens)

    @offset.setter
    def offset(self, value: int) -> None:
        if value == self.offset:
            pass
        elif value == 0:
            self.kv, self.tokens, self.hidden = KVCache(), [], None
        elif self.kv.offset < value < self.offset:
            n = value - self.kv.offset
            self.tokens, self.hidden = self.tokens[:n], self.hidden[:, :n]
        elif value in self.anchors:
            token, hidden = self.anchors[value]
            self.kv.offset = value - 1
            self.tokens, self.hidden = [token], hidden
        else:
            raise ValueError(f"the MTP drafter cannot go back from {self.offset} to {value} positions "
                             f"(kept states at {sorted(self.anchors)})")
        self.anchors = {p: a for p, a in self.anchors.items() if p <= value}

    @property
    def state(self) -> tuple:
        return (*self.kv.state, *(() if self.hidden is None else (self.hidden,)))

    @property
    def nbytes(self) -> int:
        arrays = {id(a): a for a in (*self.state, *(h for _, h in self.anchors.values()))}
        return sum(a.nbytes for a in arrays.values())


class MtpDrafter(nn.Module):
    """The MTP head beside its target (whose embedding and lm_head it uses): a drafter for `speculative.py`.

    The drafter protocol (`speculative.ModelDrafter` is the other one): `make_cache`, `fill` (a prefill chunk),
    `observe` (any other target forward), `propose`, `commit` (after the target's verification), `settle`, and
    `wants_hidden` (the target's forwards hand this drafter their final hidden states)."""

    wants_hidden = True
    unused: tuple[str, ...] = ()  # prefixes of head tensors this drafter does not read

    def __init__(self, target: nn.Module, layer: nn.Module):
        super().__init__()
        args = target.args
        H, eps = args.hidden_size, args.rms_norm_eps
        self.pre_fc_norm_embedding = ZeroCenteredRMSNorm(H, eps=eps)
        self.pre_fc_norm_hidden = ZeroCenteredRMSNorm(H, eps=eps)
        self.fc = Linear(2 * H, H, bias=False)
        self.layers = [layer]
        self.norm = ZeroCenteredRMSNorm(H, eps=eps)
        # Not a child module: the target's weights are its own, not the drafter's parameters.
        object.__setattr__(self, "target", target)
        self.args = args

    def __call__(self, tokens: mx.array, hidden: mx.array, cache: KVCache | None = None) -> mx.array:
        """The head's output [B, L, H] (after mtp.norm) for the pairs (tokens [B, L], hidden [B, L, H]): the
        embedding of token i + 1 and the hidden state at i."""
        e = self.target.model.embed_tokens(tokens)
        x = self.fc(mx.concatenate([self.pre_fc_norm_embedding(e), self.pre_fc_norm_hidden(hidden)], axis=-1))
        x = self.layers[0](x, attention_mask(x.shape[1], cache), cache)
        return self.norm(x)

    def logits(self, h: mx.array) -> mx.array:
        return self.target.logits(h)

    # the drafter protocol -----------------------------------------------------------------------------------

    def make_cache(self) -> list:
        return [MtpCache()]

    def observe(self, cache: list, tokens: list[int], hidden: mx.array) -> None:
        """A target forward of `tokens` at the drafter's offset and its hidden states [1, n, H]."""
        cache[0].append(tokens, hidden)

    def fill(self, cache: list, tokens: list[int], hidden: mx.array) -> None:
        """A prefill chunk: observed, then every position paired but the last (the unpaired hidden states of a
        long prompt are not kept)."""
        c = cache[0]
        c.append(tokens, hidden)
        if len(c.tokens) > 1:
            self._pair(c, len(c.tokens) - 1, c.tokens[1:])

    def _pair(self, c: MtpCache, n: int, next_tokens: list[int]) -> mx.array:
        """Run the first `n` unpaired positions with the tokens after them; the head's outputs [1, n, H]."""
        _, hidden = c.take(n)
        return self(mx.array(next_tokens[:n])[None], hidden, c.kv)

    def propose(self, cache: list, tokens: list[int], base: int, k: int, choose) -> list[mx.array]:
        """`k` drafts [1] after `tokens` (the target holds all but the last): the unpaired positions are paired
        (the last with the last token), then the head runs on its own outputs. `choose(logits [1, vocab])` picks
        each draft."""
        c = cache[0]
        if c.offset != base + len(tokens) - 1:
            raise Qwen3MLXError(f"the MTP drafter has seen {c.offset} positions, the target "
                                f"{base + len(tokens) - 1}")
        h = self._pair(c, len(c.tokens), c.tokens[1:] + tokens[-1:])[:, -1:]
        drafts = []
        for i in range(k):
            d = choose(self.logits(h)[:, -1, :])
            drafts.append(d)
            if i + 1 < k:
                h = self(d[None], h, c.kv)
        return drafts

    def commit(self, cache: list, start: int, tokens: list[int], hidden: mx.array | None) -> None:
        """After the target's verification at `start`: its kept positions' tokens and hidden states. The pairs
        made of the head's own outputs go; those of the target's states stay."""
        c = cache[0]
        c.kv.offset = start
        c.append(tokens, hidden)

    def settle(self, cache: list, tokens: list[int], base: int, n: int) -> None:
        truncate_cache(cache, n)


def mtp_tensors(path: Path) -> dict[str, mx.array]:
    """The `mtp.*` tensors of a checkpoint folder (read lazily), names without a leading `model.`."""
    from ..loader import load_weights

    return {k.removeprefix("model."): v for k, v in load_weights(path).items() if k.startswith(("mtp.", "model.mtp."))}


def load_mtp(target: nn.Module, path: str | Path | None = None) -> MtpDrafter:
    """The MTP head of `target`'s checkpoint (or of `path`: another checkpoint folder of the same model, or a
    drafter folder `quantize/mtp.export_mtp` wrote) as its drafter.

    Weights keep the target's precision policy: float32 on MLX's CPU backend with bfloat16 matmul weights kept
    bfloat16 where our kernels read them, bfloat16 on a GPU."""
    from ..loader import cpu_bf16_weights, default_dtype

    folder = Path(path) if path is not None else getattr(target, "model_path", None)
    if folder is None or not hasattr(target, "hidden_states") or not hasattr(target, "mtp_layer"):
        raise Qwen3MLXError(f"{getattr(target, 'model_type', 'this model')} has no multi-token-prediction head "
                            "to draft with (--draft-model mtp is for Qwen3.5 / 3.6 / 3.8 and Qwen3-Next checkpoints)")
    weights = mtp_tensors(folder)
    if not weights:
        raise Qwen3MLXError(f"{Path(folder).name} has no multi-token-prediction head (no mtp.* tensors): "
                            "--draft-model mtp needs a checkpoint that ships one (Qwen3.5 / 3.6 / 3.8, Qwen3-Next)")
    layer = target.mtp_layer()  # first: a model without a known head layout says so
    kind = getattr(target, "mtp_drafter_class", MtpDrafter)
    layers = sorted({int(m.group(1)) for k in weights if (m := _LAYER.match(k))})
    if layers != [0]:
        raise Qwen3MLXError(f"{Path(folder).name}'s MTP head has layers {layers}; only one-layer heads (layer 0) "
                            "are supported")
    # The block's tensors through the target's own conversion (expert stacking), as if it were its layer 0.
    block = {"model.layers.0." + k[len("mtp.layers.0."):]: v for k, v in weights.items()
             if k.startswith("mtp.layers.0.")}
    block = {k[len("model.layers.0."):]: v for k, v in target.sanitize(block).items()}
    head = {k[len("mtp."):]: v for k, v in weights.items() if not k.startswith("mtp.layers.")}
    ours = {**head, **{f"layers.0.{k}": v for k, v in block.items()}}
    # Every norm of the head is zero-centred in the checkpoint (1 + w), as the target's are.
    ours = {k: v + 1.0 if "norm" in k.split(".")[-2] and k.endswith(".weight") else v for k, v in ours.items()
            if not k.startswith(kind.unused)}
    drafter = kind(target, layer)
    if any(k.endswith(".scales") for k in ours):  # a drafter folder written quantized (`quantize/mtp.py`)
        from ..loader import apply_quantization, load_config

        apply_quantization(drafter, load_config(Path(folder)).get("quantization") or {}, ours)
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(drafter.parameters()))
    if set(ours) != set(expected):
        odd = sorted(set(ours) ^ set(expected))
        raise Qwen3MLXError(f"{Path(folder).name}'s MTP head does not match the model: tensor mtp.{odd[0]} "
                            f"{'is unexpected' if odd[0] in ours else 'is missing'}")
    for name, param in expected.items():
        if tuple(ours[name].shape) != tuple(param.shape):
            raise Qwen3MLXError(f"MTP tensor mtp.{name} has shape {tuple(ours[name].shape)}, expected "
                                f"{tuple(param.shape)} from config.json")
    dtype = default_dtype()
    keep = cpu_bf16_weights(drafter) if dtype == mx.float32 else set()
    floats = (mx.float32, mx.float16, mx.bfloat16)
    drafter.load_weights([(k, v if (k in keep and v.dtype == mx.bfloat16) or v.dtype not in floats else
                           v.astype(dtype)) for k, v in ours.items()], strict=True)
    mx.eval(drafter.parameters())
    drafter.eval()
    return drafter
