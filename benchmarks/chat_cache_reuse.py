# Run: flock /tmp/qwen3_heavy.lock python benchmarks/chat_cache_reuse.py  (needs the tokenizer fixture; ~5 min on 2 cores)
"""10-turn chat: prefill token counts and TTFT with cache reuse vs a fresh cache every turn.

Random-weight Qwen3-0.6B shape (float32, CPU), the real tokenizer, a thinking-style template that opens <think>
(as Qwen3-Thinking-2507 does) and a thinking budget of 24 so every turn has reasoning the template then drops.
"""
from pathlib import Path
import mlx.core as mx
from qwen3_mlx.models.registry import random_model
from qwen3_mlx.tokenizer import Tokenizer
from qwen3_mlx.chat import ChatSession
from qwen3_mlx.models.cache import make_cache

# the tokenizer fixture beside the checkout (../shared), as in the tests
tok = Tokenizer(Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen3-tokenizer")
old = "{{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking"
assert old in tok.chat_template
tok.chat_template = tok.chat_template.replace(old, "{{- '<|im_start|>assistant\\n<think>\\n' }}\n    {%- if enable_thinking")
model = random_model("qwen3-0.6b", mx.float32, seed=0)
questions = [f"Question {i}: please explain topic number {i} in a few words, with an example about {w}."
             for i, w in enumerate(["apples", "rivers", "music", "bridges", "stars", "bread", "chess", "rain", "glass", "maps"], 1)]

def run(reuse):
    s = ChatSession(model, tok, thinking_budget=24, max_tokens=48, temperature=0)
    rows = []
    for q in questions:
        if not reuse:
            s.cache = make_cache(model); s.cached_tokens = []
        for _ in s.send(q):
            pass
        h = s.history[-1]
        rows.append((h.prompt_tokens, h.reused_tokens, h.prefill_tokens, h.time_to_first_token, h.reasoning_tokens, h.generation_tokens))
    return rows

run(True)  # warm-up
a = run(True); b = run(False)
print("| turn | history tokens | reused | prefilled (reuse) | TTFT reuse (s) | prefilled (fresh) | TTFT fresh (s) |")
print("|---|---|---|---|---|---|---|")
for i, (x, y) in enumerate(zip(a, b), 1):
    print(f"| {i} | {x[0]} | {x[1]} | {x[2]} | {x[3]:.3f} | {y[2]} | {y[3]:.3f} |")
print("reasoning tokens per turn:", [x[4] for x in a], "generated:", [x[5] for x in a])
