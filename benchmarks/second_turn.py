"""Time to the first token of a chat's second turn on a hybrid model, ours (resuming from a state checkpoint)
against mlx-lm (which reprocesses the whole conversation: its cache cannot go back past a recurrent state).

    python benchmarks/second_turn.py MODEL [--history 2048] [--answer 16] [--skip-mlx-lm]

The first turn is a system prompt of about --history tokens and a question; the second turn a short
follow-up. Ours: `ChatSession`'s second turn (its stats say how many tokens it prefilled). mlx-lm: its
`stream_generate` on the second turn's whole prompt, the way its chat reprocesses a hybrid model's history.
"""

from __future__ import annotations

import argparse
import time

from qwen3_mlx import load
from qwen3_mlx.chat import ChatSession
from qwen3_mlx.generate import prompt_tokens
from qwen3_mlx.models.cache import RecurrentCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--history", type=int, default=2048)
    ap.add_argument("--answer", type=int, default=16)
    ap.add_argument("--skip-mlx-lm", action="store_true")
    a = ap.parse_args()
    model, tokenizer = load(a.model)
    words = "The tide comes in over the grey stones and goes out again before the evening. "
    system = words * max(1, a.history // len(tokenizer.encode(words)))
    session = ChatSession(model, tokenizer, system=system, temperature=0, max_tokens=a.answer, enable_thinking=False)
    list(session.send("Summarise the text in one line."))
    first = session.history[-1]
    t = time.perf_counter()
    list(session.send("And in one word?"))
    second = session.history[-1]
    print(f"history {first.prompt_tokens} tokens; ours: second turn prompt {second.prompt_tokens} tokens, "
          f"prefilled {second.prefill_tokens}, first token after {second.time_to_first_token:.2f} s "
          f"(turn {time.perf_counter() - t:.2f} s)")
    states = [c for c in session.cache if isinstance(c, RecurrentCache)]
    if states:
        kv = sum(c.nbytes for c in session.cache if not isinstance(c, RecurrentCache))
        live = sum(sum(a.nbytes for a in c.state) for c in states)
        print(f"ours: {len(states)} recurrent layers hold {sum(c.nbytes for c in states) / 1e6:.1f} MB "
              f"(live state {live / 1e6:.1f} MB, checkpoints at {sorted(states[0].checkpoints)}); "
              f"KV cache {kv / 1e6:.1f} MB")
    if a.skip_mlx_lm:
        return
    import mlx_lm

    theirs, their_tokenizer = mlx_lm.load(a.model)
    ids = prompt_tokens(tokenizer, session.conversation()[:-1], enable_thinking=False)
    t = time.perf_counter()
    for _ in mlx_lm.stream_generate(theirs, their_tokenizer, ids, max_tokens=1):
        break
    print(f"mlx-lm: reprocesses {len(ids)} tokens, first token after {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
