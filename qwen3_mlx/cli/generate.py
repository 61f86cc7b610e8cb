"""`qwen3-mlx generate`: one prompt, the answer streamed to stdout, statistics to stderr."""

from __future__ import annotations

import typer

from ..options import GenerationOptions
from .app import app, err, out
from .options import (
    KV,
    SAMPLING,
    SYSTEM,
    THINKING,
    ModelSource,
    load_for_generation,
    with_options,
)

# The flags of a command that generates (`generate`, `chat`): sampling, thinking, KV cache, draft and model source.
generation_command = with_options(*SAMPLING, *THINKING, *KV, "num_draft", source=True)


def format_stats(r, options: GenerationOptions) -> str:
    """One statistics line from the last GenerationResponse."""
    draft = ""
    if r.draft_tokens:
        draft = f" | draft kept {r.accepted_tokens}/{r.draft_tokens} ({r.accepted_tokens / r.draft_tokens:.0%})"
    return (
        f"prompt {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"first token {r.time_to_first_token:.2f} s | peak memory {r.peak_memory:.2f} GB{draft}{kv_note(options)}"
    )


def kv_note(options: GenerationOptions) -> str:
    """The quantized KV cache's settings (its group size may have been picked for the model's head_dim)."""
    if options.kv_bits is None:
        return ""
    return f" | KV cache {options.kv_bits}-bit, groups of {options.kv_group_size}"


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
@generation_command
def generate(
    model: str = typer.Argument(..., help="Model folder or Hugging Face repo id."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message."),
    system: str = SYSTEM,
    hide_thinking: bool = typer.Option(
        False,
        "--hide-thinking",
        help="Do not print the reasoning. When stdout is not a terminal (a pipe or a file) the reasoning goes to "
        "stderr anyway, so stdout holds only the answer.",
    ),
    source: ModelSource = None,
    options: GenerationOptions = None,
) -> None:
    """Answer one prompt (rendered with the model's chat template), streaming the text.

    Reasoning is printed dimmed (or hidden with --hide-thinking), the answer normally; statistics go to stderr.
    Piped or redirected, stdout gets only the answer: the reasoning goes to stderr.
    """
    from ..generate import stream_generate

    llm, tokenizer, options, cached = load_for_generation(model, options, source)
    if cached is not None and system is None:
        system = cached.system
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    rest, cache = messages, None  # what to prefill: the messages, or the tokens after the cached ones
    if cached is not None:
        from ..generate import prompt_tokens

        ids = prompt_tokens(tokenizer, messages, options)
        cache, reused = cached.take(ids)
        rest = ids[reused:]
    last = show_stream(stream_generate(llm, tokenizer, rest, options, prompt_cache=cache), hide_thinking)
    if last is not None:
        reason = {"stop": "", "length": " (stopped at --max-tokens)"}.get(last.finish_reason, "")
        err.print(format_stats(last, options) + reason, markup=False)


def show_stream(responses, hide_thinking: bool):
    """Write a stream's reasoning (dimmed, or hidden) and answer; returns its last response."""
    show = ReasoningFilter()
    # `> answer.txt` must capture the answer, not the thinking: off a terminal reasoning goes to stderr.
    thoughts = out if out.is_terminal else err
    last = None
    in_reasoning = False
    for last in responses:
        text = show(last.text, last.segment)
        if last.segment == "reasoning":
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
    return last
