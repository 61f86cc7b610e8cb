"""The gated delta rule of Gated DeltaNet (Qwen3-Next, Qwen3.5/3.6 linear-attention layers), in MLX ops.

Per value head, with a state S [Dk, Dv] carried along the sequence:
    S <- exp(g_t) * S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t
These are MLX's path (a GPU; our CPU kernel's fallback): `gated_delta_chunked` computes a prompt in chunks (a
unit-triangular solve per chunk, the state carried from chunk to chunk), `gated_delta_step` one token. Both, and
our CPU primitive (`kernels.gated_delta`), equal transformers' token-by-token recurrence to float32 rounding
(tests). Everything runs in float32 (the state always is).
"""

from __future__ import annotations

import mlx.core as mx

CHUNK = 64


def gated_delta_step(q, k, v, g, beta, state):
    """One position: q, k [B, H, Dk], v [B, H, Dv], g (log decay), beta [B, H], state [B, H, Dk, Dv]
    -> (output [B, H, Dv], new state)."""
    state = state * mx.exp(g)[..., None, None]
    remembered = (state * k[..., None]).sum(axis=-2)  # [B, H, Dv]: what the state predicts for k
    delta = (v - remembered) * beta[..., None]
    state = state + k[..., None] * delta[..., None, :]
    return (state * q[..., None]).sum(axis=-2), state


def gated_delta_chunked(q, k, v, g, beta, state, chunk: int = CHUNK):
    """q, k [B, H, L, Dk], v [B, H, L, Dv], g, beta [B, H, L], state [B, H, Dk, Dv] -> (output [B, H, L, Dv],
    new state); the sequence in chunks of `chunk` positions."""
    B, H, L, Dk = k.shape
    Dv = v.shape[-1]
    pad = (-L) % chunk
    if pad:
        q, k, v = (mx.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]) for x in (q, k, v))
        g, beta = (mx.pad(x, [(0, 0), (0, 0), (0, pad)]) for x in (g, beta))
    n = (L + pad) // chunk
    q, k, v = (x.reshape(B, H, n, chunk, -1) for x in (q, k, v))
    g, beta = g.reshape(B, H, n, chunk), beta.reshape(B, H, n, chunk)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    cum = mx.cumsum(g, axis=-1)  # [B, H, n, C]: log decay from the chunk's start to each position
    lower = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_))
    # decay[i, j] = exp(cum_i - cum_j) for j <= i; masked before exp (the upper half would overflow)
    decay = mx.exp(mx.where(lower, cum[..., :, None] - cum[..., None, :], -mx.inf))
    strict = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_), k=-1)
    # (I + strictly lower part of (k_beta k^T * decay)) X = rhs: the delta rule's updates within a chunk at once
    system = mx.where(strict, (k_beta @ k.swapaxes(-1, -2)) * decay, 0.0) + mx.eye(chunk)
    rhs = mx.concatenate([v_beta, k_beta * mx.exp(cum)[..., None]], axis=-1)  # [B, H, n, C, Dv + Dk]
    solved = mx.linalg.solve_triangular(system, rhs, upper=False, stream=mx.cpu)
    values, k_cumdecay = solved[..., :Dv], solved[..., Dv:]
    attn = (q @ k.swapaxes(-1, -2)) * decay  # within-chunk attention, causal with the diagonal
    q_decayed = q * mx.exp(cum)[..., None]
    k_decayed = k * mx.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = mx.exp(cum[..., -1])[..., None, None]  # [B, H, n, 1, 1]
    outs = []
    for i in range(n):
        fresh = values[:, :, i] - k_cumdecay[:, :, i] @ state  # [B, H, C, Dv]: the part the state does not predict
        outs.append(q_decayed[:, :, i] @ state + attn[:, :, i] @ fresh)
        state = state * chunk_decay[:, :, i] + k_decayed[:, :, i].swapaxes(-1, -2) @ fresh
    out = mx.concatenate(outs, axis=2)[:, :, :L]
    return out, state
