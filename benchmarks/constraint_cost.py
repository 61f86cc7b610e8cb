"""What an enforced answer costs per token: decode speed with no grammar, with tools under tool_choice "auto"
(free text, the grammar watching for <tool_call>), "required" (inside a call's JSON) and response_format
json_object, and the grammar's own time per token (llguidance's mask and advance, measured apart).

    python benchmarks/constraint_cost.py [--shape qwen3-0.6b] [--bits 4] [--tokens 64] [--rounds 3]

Random weights of --shape with the real Qwen3 tokenizer (../shared/fixtures/qwen3-tokenizer or --tokenizer),
temperature 1 (a random model's answers are random text; the constrained ones follow the grammar). Cases run
interleaved, `--rounds` times; the median of each is printed with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from qwen3_mlx.bench.machine import cpu_info
from qwen3_mlx.generate import generate, prompt_tokens, stream_generate
from qwen3_mlx.grammar import constraint_for
from qwen3_mlx.models.registry import random_model, shape_config
from qwen3_mlx.options import GenerationOptions
from qwen3_mlx.tokenizer import load_tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "search_notes", "description": "Search the user's notes.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1, "maximum": 50},
        "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["query"],
        "additionalProperties": False}}}]
MESSAGES = [{"role": "user", "content": "Find my notes about the garden and summarise them."}]
# Every case decodes after the same prompt (the messages rendered with the tools): "none" and json_object get
# it as token ids, which the template does not see again, so only the grammar differs.
CASES = {
    "none": dict(),
    "tools, auto": dict(tools=TOOLS, tool_choice="auto"),
    "tools, required": dict(tools=TOOLS, tool_choice="required"),
    "json_object": dict(response_format={"type": "json_object"}),
}


def prompt_for(tok, options: GenerationOptions):
    return MESSAGES if options.tools else prompt_tokens(tok, MESSAGES, options.replace(tools=TOOLS))


def decode_rate(model, tok, options: GenerationOptions) -> float:
    last = None
    for last in stream_generate(model, tok, prompt_for(tok, options), options):
        pass
    return last.generation_tps


def grammar_time(tok, options: GenerationOptions, vocab: int, tokens: list[int]) -> float:
    """Seconds per token of the grammar alone (mask, then advance) over a token sequence it accepts."""
    constraint = constraint_for(tok, options, vocab)
    t0 = time.perf_counter()
    for t in tokens:
        constraint.mask()
        constraint.advance(t)
    return (time.perf_counter() - t0) / max(1, len(tokens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared/fixtures/qwen3-tokenizer"))
    args = ap.parse_args()
    model = random_model(shape_config(args.shape), bits=args.bits)
    tok = load_tokenizer(args.tokenizer)
    vocab = model.args.vocab_size
    base = GenerationOptions(max_tokens=args.tokens, temperature=1.0, top_k=0, top_p=1.0, enable_thinking=False)
    rates: dict[str, list[float]] = {name: [] for name in CASES}
    grammar: dict[str, list[float]] = {name: [] for name in CASES if name != "none"}
    for r in range(args.rounds):
        for name, case in CASES.items():
            options = base.replace(seed=r, **case)
            rates[name].append(decode_rate(model, tok, options))
            if name != "none":
                tokens = generate(model, tok, prompt_for(tok, options), options).tokens
                grammar[name].append(grammar_time(tok, options, vocab, tokens))
    plain = statistics.median(rates["none"])
    rows = []
    for name in CASES:
        tps = statistics.median(rates[name])
        row = {"case": name, "decode_tps": round(tps, 1), "vs_none": round(tps / plain, 3),
               "ms_per_token": round(1000 / tps, 2)}
        if name in grammar:
            row["grammar_us_per_token"] = round(1e6 * statistics.median(grammar[name]), 1)
        rows.append(row)
    print(json.dumps({"cpu": cpu_info(), "shape": args.shape, "bits": args.bits, "tokens": args.tokens,
                      "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
