"""`qwen3-mlx generate`: one prompt, the answer streamed to stdout, statistics to stderr."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import Qwen3MLXError
from .app import app, err, fail, out

# Shared with `qwen3-mlx chat`. Help text is rich markup: a literal "[" must be written "\\[" or rich eats the tag.
MAX_TOKENS = typer.Option(None, "--max-tokens", "-m", help="Most tokens to generate \\[default: 32768].", min=1)
TEMPERATURE = typer.Option(
    None, "--temperature", "--temp", help="0 is greedy \\[default: Qwen's, 0.6 thinking / 0.7 not].", min=0.0
)
TOP_P = typer.Option(
    None,
    "--top-p",
    help="Nucleus sampling; 0 keeps only the most likely token \\[default: 0.95 thinking / 0.8 not].",
    min=0.0,
    max=1.0,
)
TOP_K = typer.Option(None, "--top-k", help="Keep the k most likely tokens, 0 = all \\[default: 20].", min=0)
MIN_P = typer.Option(
    None, "--min-p", help="Drop tokens below min_p x the top probability \\[default: 0].", min=0.0, max=1.0
)
PRESENCE = typer.Option(0.0, "--presence-penalty", help="Subtracted from every token already generated (0 to 2).")
REPETITION = typer.Option(
    None,
    "--repetition-penalty",
    help="Divides the logits of tokens in the prompt or output (transformers' semantics; 1 = off, >1 penalises).",
)
SEED = typer.Option(None, "--seed", help="Seed for reproducible sampling.")
NO_THINK = typer.Option(False, "--no-think", help="Thinking off (the template's hard switch).")
BUDGET = typer.Option(None, "--thinking-budget", help="Cut reasoning after N tokens, then answer.", min=0)
SYSTEM = typer.Option(None, "--system", "-s", help="System prompt.")
KV_BITS = typer.Option(None, "--kv-bits", help="Keep the KV cache quantized to 4 or 8 bits (less memory per token).")
KV_GROUP = typer.Option(64, "--kv-group-size", help="Values per scale in the quantized KV cache (32, 64, 128).")
DRAFT = typer.Option(
    None, "--draft-model", help="A small model of the same family proposing tokens for the big one to check "
    "(speculative decoding: same output, fewer big-model steps), e.g. Qwen/Qwen3-0.6B for Qwen/Qwen3-8B."
)
NUM_DRAFT = typer.Option(3, "--num-draft", help="Tokens the draft proposes per round.", min=1, max=16)
PROMPT_CACHE = typer.Option(
    None, "--prompt-cache", help="A file from `qwen3-mlx cache-prompt`: start after its tokens (its system prompt "
    "applies unless --system is given)."
)
PARALLEL = typer.Option(
    None, "--parallel", help="Under mlx.launch: 'pipeline' (each rank a block of layers, split by memory) or "
    "'tensor' (MoE: each rank a slice of every expert) \\[default: pipeline]."
)
SPLIT = typer.Option(
    None, "--split", help="Under mlx.launch with pipeline: layers per rank, e.g. 10,18 \\[default: by each host's "
    "memory]."
)
TEMPLATE_KWARGS = typer.Option(
    None, "--chat-template-kwargs", help="More variables for the model's chat template, as a JSON object, e.g. "
    "'{\"preserve_thinking\": true}' (Qwen3.6: keep earlier turns' reasoning)."
)


def template_kwargs(text: str | None) -> dict:
    """--chat-template-kwargs as a dict (a domain error unless it is a JSON object)."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise Qwen3MLXError(f"--chat-template-kwargs is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise Qwen3MLXError("--chat-template-kwargs must be a JSON object, e.g. '{\"preserve_thinking\": true}'")
    return value


KV_START = typer.Option(
    0, "--quantized-kv-start", help="With --kv-bits: keep the cache in float until it holds N positions.", min=0
)


def draft_options(llm, tokenizer, draft_model, num_draft) -> dict:
    """stream_generate's speculative decoding options: the draft loaded and checked against the target."""
    if draft_model is None:
        return {}
    from ..speculative import check_draft

    draft, draft_tokenizer = load_for_cli(draft_model, local=True)
    check_draft(llm, draft, tokenizer, draft_tokenizer)
    return dict(draft_model=draft, num_draft=num_draft)


def kv_options(kv_bits, kv_group_size, quantized_kv_start) -> dict:
    """stream_generate's KV cache options, from the CLI's flags (a bad value is refused by the generator)."""
    if kv_bits is None:
        return {}
    return dict(kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start)


def sampling_options(
    max_tokens, temperature, top_p, top_k, min_p, presence_penalty, seed, repetition_penalty=None
) -> dict:
    options = dict(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty,
    )
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    if seed is not None:
        options["seed"] = seed
    return options


def load_for_cli(model: str, *, parallel: str | None = None, split: str | None = None, local: bool = False):
    """Load a model and its tokenizer, with a status line on stderr. Under `mlx.launch` (unless `local`), the
    model is spread over the ranks: rank 0 gets it, the other ranks serve it and exit when rank 0 is done."""
    from ..distributed import launched
    from ..loader import load
    from .app import show_progress

    if not local and launched():
        from .. import distributed

        return distributed.load(model, parallel=parallel or "pipeline", split=parse_split(split))
    if not local and (parallel is not None or split is not None):
        fail("--parallel and --split spread a model over several processes: start the command under mlx.launch, "
             "e.g. mlx.launch -n 2 -- qwen3-mlx generate MODEL --prompt Hi")
    if show_progress():
        with err.status(f"loading {model}"):
            return load(model)
    return load(model)


def parse_split(split: str | None) -> list[int] | None:
    """--split's layers per rank, e.g. "10,18" -> [10, 18]."""
    if split is None:
        return None
    try:
        return [int(x) for x in split.split(",")]
    except ValueError:
        fail(f"--split takes layers per rank separated by commas, e.g. 10,18; got {split!r}")


def refuse_distributed(option: str) -> None:
    """One clear error for an option a run across ranks does not support."""
    from ..distributed import launched

    if launched():
        fail(f"{option} is not supported under mlx.launch (each rank holds only part of the KV cache)")


def format_stats(r) -> str:
    """One statistics line from the last GenerationResponse."""
    draft = ""
    if r.draft_tokens:
        draft = f" | draft kept {r.accepted_tokens}/{r.draft_tokens} ({r.accepted_tokens / r.draft_tokens:.0%})"
    return (
        f"prompt {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"first token {r.time_to_first_token:.2f} s | peak memory {r.peak_memory:.2f} GB{draft}"
    )


def write(text: str, dim: bool = False, console=out) -> None:
    """Model text to `console` (stdout by default) exactly as generated (no rich markup, emoji or highlighting),
    flushed at once; dimmed only on a colour terminal."""
    if not text:
        return
    if dim and console.is_terminal and not console.no_color:
        text = f"\x1b[2m{text}\x1b[0m"
    console.file.write(text)
    console.file.flush()


class ReasoningFilter:
    """Display text for a stream: drops the think tags and the newlines around them, which only structure."""

    def __init__(self):
        self.segment = None
        self.at_start = True  # strip leading newlines of each segment

    def __call__(self, text: str, segment: str) -> str:
        if segment != self.segment:
            self.segment, self.at_start = segment, True
        text = text.replace("<think>", "").replace("</think>", "")
        if self.at_start:
            text = text.lstrip("\n")
            self.at_start = not text
        return text


@app.command()
def generate(
    model: str = typer.Argument(..., help="Model folder or Hugging Face repo id."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message."),
    system: str = SYSTEM,
    no_think: bool = NO_THINK,
    thinking_budget: int = BUDGET,
    hide_thinking: bool = typer.Option(
        False,
        "--hide-thinking",
        help="Do not print the reasoning. When stdout is not a terminal (a pipe or a file) the reasoning goes to "
        "stderr anyway, so stdout holds only the answer.",
    ),
    max_tokens: int = MAX_TOKENS,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    min_p: float = MIN_P,
    presence_penalty: float = PRESENCE,
    repetition_penalty: float = REPETITION,
    seed: int = SEED,
    kv_bits: int = KV_BITS,
    kv_group_size: int = KV_GROUP,
    quantized_kv_start: int = KV_START,
    prompt_cache: Path = PROMPT_CACHE,
    draft_model: str = DRAFT,
    num_draft: int = NUM_DRAFT,
    parallel: str = PARALLEL,
    split: str = SPLIT,
    chat_template_kwargs: str = TEMPLATE_KWARGS,
) -> None:
    """Answer one prompt (rendered with the model's chat template), streaming the text.

    Reasoning is printed dimmed (or hidden with --hide-thinking), the answer normally; statistics go to stderr.
    Piped or redirected, stdout gets only the answer: the reasoning goes to stderr.
    """
    from ..generate import stream_generate

    variables = template_kwargs(chat_template_kwargs)
    if prompt_cache is not None:
        refuse_distributed("--prompt-cache")
    llm, tokenizer = load_for_cli(model, parallel=parallel, split=split)
    cached = None
    if prompt_cache is not None:
        from ..prompt_cache import load_prompt_cache

        cached = load_prompt_cache(prompt_cache, llm)
        system = system if system is not None else cached.system
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    source, extra = messages, {}
    if cached is not None:
        from ..generate import prompt_tokens

        ids = prompt_tokens(tokenizer, messages, enable_thinking=not no_think, chat_template_kwargs=variables)
        extra["prompt_cache"], reused = cached.take(ids)
        source = ids[reused:]
    show = ReasoningFilter()
    # `> answer.txt` must capture the answer, not the thinking: off a terminal reasoning goes to stderr.
    thoughts = out if out.is_terminal else err
    last = None
    in_reasoning = False
    for r in stream_generate(
        llm,
        tokenizer,
        source,
        enable_thinking=not no_think,
        thinking_budget=thinking_budget,
        chat_template_kwargs=variables,
        **sampling_options(max_tokens, temperature, top_p, top_k, min_p, presence_penalty, seed, repetition_penalty),
        **kv_options(kv_bits, kv_group_size, quantized_kv_start),
        **draft_options(llm, tokenizer, draft_model, num_draft),
        **extra,
    ):
        last = r
        text = show(r.text, r.segment)
        if r.segment == "reasoning":
            in_reasoning = True
            if not hide_thinking:
                write(text, dim=True, console=thoughts)
        else:
            if in_reasoning:
                in_reasoning = False
                if not hide_thinking:
                    write("\n\n", console=thoughts)
            write(text)
    write("\n")
    if last is not None:
        reason = {"stop": "", "length": " (stopped at --max-tokens)"}.get(last.finish_reason, "")
        err.print(format_stats(last) + reason, markup=False)
