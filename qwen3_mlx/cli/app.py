"""The typer application and what every command shares: consoles and domain-error handling."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    name="qwen3-mlx",
    help="Run Qwen3 models locally on MLX: chat, generate, serve, quantize, fit, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# stdout carries model text; everything else (progress, statistics, errors) goes to stderr.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    """One red line on stderr, exit code 1."""
    # The message is plain text (it may hold "[...]", e.g. a shape or an extra name): escape it from markup.
    err.print(f"[bold red]error:[/bold red] {escape(message)}", markup=True)
    raise SystemExit(1)


def show_progress() -> bool:
    """Rich live progress only when a person is watching."""
    return sys.stderr.isatty()
