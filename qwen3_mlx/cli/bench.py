"""`qwen3-mlx bench`: tokens/s, time to first token, peak memory and bandwidth, optionally against mlx-lm."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import typer

from .app import app, err, out, show_progress
from ..options import GenerationOptions
from .options import PARALLEL, SPLIT, parse_split, with_options


def _bits(value: str) -> int | None:
    if value.lower() in ("none", "float", "float32", "0"):
        return None
    if value not in ("4", "8"):
        raise typer.BadParameter("must be 4, 8 or none")
    return int(value)


def _contexts(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter("a comma-separated list of prompt lengths, e.g. 128,1024,4096") from None


@app.command()
@with_options("kv_bits", "kv_group_size", "num_draft")
def bench(
    model: Optional[str] = typer.Argument(None, help="Model folder or Hugging Face repo id."),
    shape: Optional[str] = typer.Option(
        None, "--shape", help="A registry shape (e.g. qwen3-0.6b) or a config.json path; needs --random."
    ),
    random: bool = typer.Option(False, "--random", help="Random weights of --shape (no download, no tokenizer)."),
    bits: str = typer.Option("none", "--bits", help="Quantize in memory first: 4, 8 or none."),
    group_size: int = typer.Option(64, "--group-size", help="Quantization group size."),
    prompt_tokens: int = typer.Option(128, "-p", "--prompt-tokens", help="Prompt length in tokens."),
    gen_tokens: int = typer.Option(32, "-g", "--gen-tokens", help="Tokens generated per trial."),
    trials: int = typer.Option(2, "-n", "--trials", help="Timed trials after one warm-up."),
    contexts: Optional[str] = typer.Option(None, "--contexts", help="Sweep prompt lengths, e.g. 128,1024,4096."),
    vs: Optional[str] = typer.Option(None, "--vs", help="Compare with mlx-lm on the same weights: --vs mlx-lm."),
    json_file: Optional[str] = typer.Option(None, "--json", help="Write the results here (schema in the README)."),
    plot_file: Optional[str] = typer.Option(None, "--plot", help="PNG of tokens/s per prompt length (needs matplotlib)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights and prompt."),
    draft_model: Optional[str] = typer.Option(
        None, "--draft-model", help="Speculative decoding against plain: a model, or self-4bit / self-8bit (the "
        "random target's own quantization)."
    ),
    device: Optional[str] = typer.Option(
        None, "--device", help="Device profile (see `qwen3-mlx fit`) for the bandwidth share, e.g. m4-pro-48gb."
    ),
    parallel: Optional[str] = PARALLEL,
    split: Optional[str] = SPLIT,
    options: GenerationOptions = None,
) -> None:
    """Measure prefill and decode speed of a model (or a random-weight shape), optionally against mlx-lm."""
    from ..bench import check_output_path, run_bench, save_json, save_plot, table

    def on_trial(name, ctx, i, t):
        err.print(
            f"[dim]{name} p={ctx} trial {i + 1}: prefill {t.prefill_tps:.1f} tok/s, decode {t.decode_tps:.2f} tok/s[/dim]"
        )

    # Fail before the long run, not after it (the results would be lost).
    if json_file:
        check_output_path(json_file, "--json")
    if plot_file:
        check_output_path(plot_file, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from ..bench import BenchError

            raise BenchError("--plot needs matplotlib (the plot extra): pip install matplotlib") from None
    with err.status("benchmarking...") if show_progress() else nullcontext():
        doc = run_bench(
            model,
            shape=shape,
            random=random,
            bits=_bits(bits),
            group_size=group_size,
            prompt_tokens=prompt_tokens,
            gen_tokens=gen_tokens,
            trials=trials,
            contexts=_contexts(contexts),
            vs=vs,
            seed=seed,
            device=device,
            on_trial=on_trial,
            options=options,
            draft_model=draft_model,
            parallel=parallel,
            split=parse_split(split),
        )
    out.print(table(doc))
    if json_file:
        save_json(doc, json_file)
        err.print(f"wrote {json_file}")
    if plot_file:
        save_plot(doc, plot_file)
        err.print(f"wrote {plot_file}")
