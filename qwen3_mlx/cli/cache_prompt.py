"""`qwen3-mlx cache-prompt`: prefill a long system prompt or document once and save its KV cache to a file."""

from __future__ import annotations

from pathlib import Path

import typer

from ..options import GenerationOptions
from .app import app, err, fail
from .options import load_for_cli, refuse_distributed, with_options


@app.command(
    "cache-prompt",
    help=(
        "Prefill a long system prompt (or a raw document) once and save its KV cache, so later runs start after "
        "it.\n\nExample: qwen3-mlx cache-prompt Qwen/Qwen3-0.6B --prompt-file manual.txt -o manual.safetensors, "
        "then qwen3-mlx chat Qwen/Qwen3-0.6B --prompt-cache manual.safetensors (the file's text becomes the "
        "system prompt)."
    ),
)
@with_options("kv_bits", "kv_group_size")
def cache_prompt(
    model: str = typer.Argument(..., help="Model folder or Hugging Face repo id."),
    prompt_file: Path = typer.Option(..., "--prompt-file", "-f", help="Text file with the prompt to cache."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the cache (.safetensors)."),
    raw: bool = typer.Option(
        False, "--raw", help="Cache the text as a raw completion prompt, not as a chat's system prompt."
    ),
    options: GenerationOptions = None,
):
    import mlx.core as mx

    from ..models.cache import make_cache
    from ..prompt_cache import save_prompt_cache, system_prompt_tokens

    try:
        text = prompt_file.read_text()
    except OSError as e:
        fail(f"cannot read {prompt_file}: {e.strerror or e}")
    if not text.strip():
        fail(f"{prompt_file} is empty")
    if output.exists() and output.is_dir():
        fail(f"{output} is a directory")
    refuse_distributed("cache-prompt")
    llm, tokenizer = load_for_cli(model)
    tokens = tokenizer.encode(text) if raw else system_prompt_tokens(tokenizer, text)
    options = options.validate(llm.args)
    cache = make_cache(llm, kv_bits=options.kv_bits, kv_group_size=options.kv_group_size)
    with err.status(f"prefilling {len(tokens)} tokens...") as status:
        for i in range(0, len(tokens), 512):
            llm.fill(mx.array(tokens[i : i + 512])[None], cache)
            mx.eval([c.state for c in cache])
            status.update(f"prefilling {min(i + 512, len(tokens))}/{len(tokens)} tokens...")
    size = save_prompt_cache(output, llm, cache, tokens, system=None if raw else text)
    err.print(f"cached {len(tokens)} tokens ({size / 1e6:.1f} MB) to {output}", highlight=False)
