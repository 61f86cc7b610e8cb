"""`qwen3-mlx chat`: a terminal chat with streaming, thinking control and prompt-cache reuse across turns.

On a terminal: colours, reasoning streamed dimmed in a live region that folds to a one-line summary when the
answer starts. When stdin is not a terminal (scripts, pipes): plain lines, no colours, no live rendering.
"""

from __future__ import annotations

import os
import sys
import time

import typer

from ..chat import ChatSession
from ..errors import Qwen3MLXError
from .app import app, err
from ..options import GenerationOptions
from .generate import ReasoningFilter, kv_note
from .options import KV, SAMPLING, SYSTEM, THINKING, ModelSource, load_for_generation, with_options

HELP = """commands:
  /think            thinking on for the next turns        /no_think     thinking off
  /budget N|off     cap reasoning at N tokens             /system TEXT  set the system prompt
  /show             the last reasoning in full            /stats        statistics of this session
  /reset            start over (keeps the system prompt)  /save FILE    /load FILE   the conversation as JSON
  /help             this help                             /quit         exit (or Ctrl-D)
input: end a line with \\ to continue on the next; Ctrl-C stops an answer (the partial answer is kept)."""


class Terminal:
    """Output for the chat: styled and live on a terminal, plain lines otherwise."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.colour = interactive and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        self.out = sys.stdout

    def style(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour and text else text

    def write(self, text: str, code: str | None = None) -> None:
        if text:
            self.out.write(self.style(text, code) if code else text)
            self.out.flush()

    def line(self, text: str = "", code: str | None = None) -> None:
        self.write(text + "\n", None) if not code else self.write(self.style(text, code) + "\n")

    def info(self, text: str) -> None:
        """A status or hint line (stderr, dimmed on a terminal)."""
        err.file.write((self.style(text, "2") if self.colour else text) + "\n")
        err.file.flush()


class ReasoningView:
    """Reasoning streamed under a "thinking" header; on a terminal it is redrawn in place (only the tail that
    fits the screen) and erased when the answer starts, leaving a one-line summary."""

    def __init__(self, term: Terminal):
        self.term = term
        self.text = ""
        self.rows = 0  # terminal rows currently drawn (header included)
        self.active = False

    def _size(self) -> tuple[int, int]:
        try:
            size = os.get_terminal_size(sys.stdout.fileno())
            return size.columns, size.lines
        except OSError:
            return 80, 24

    def _tail(self, cols: int, max_rows: int) -> list[str]:
        from rich.cells import cell_len

        rows: list[str] = []
        for line in reversed(self.text.split("\n")):
            width = cell_len(line)
            n = max(1, -(-width // cols))
            if len(rows) + n > max_rows:
                break
            rows.insert(0, line)
            if sum(max(1, -(-cell_len(r) // cols)) for r in rows) >= max_rows:
                break
        return rows

    def _erase(self) -> None:
        if self.rows:
            # Cursor to the first drawn row, then clear to the end of the screen.
            self.term.write(f"\x1b[{self.rows}F\x1b[J")
            self.rows = 0

    def add(self, text: str) -> None:
        self.active = True
        self.text += text
        if not self.term.interactive or not text:
            return
        cols, lines = self._size()
        from rich.cells import cell_len

        self._erase()
        shown = self._tail(cols, max(1, lines - 4))
        body = "\n".join(shown)
        self.term.line("thinking", "2;3")
        self.term.write(body, "2")
        self.term.write("\n")
        self.rows = 1 + sum(max(1, -(-cell_len(r) // cols)) for r in shown)

    def fold(self, tokens: int, seconds: float) -> None:
        if not self.active:
            return
        if self.term.interactive:
            self._erase()
        summary = f"thought for {tokens} tokens, {seconds:.1f} s (/show to see it)"
        if self.term.interactive:
            self.term.line(summary, "2;3")
        else:
            self.term.line(f"[{summary}]")
        self.active = False


def read_message(term: Terminal, prompt: str) -> str:
    """One message: a line, continued while it ends with a backslash; on a terminal, lines pasted together
    (already waiting on stdin) join the same message."""
    import select

    lines = []
    text = input(prompt if term.interactive else "")
    while True:
        if text.endswith("\\"):
            lines.append(text[:-1])
            text = input("... " if term.interactive else "")
            continue
        lines.append(text)
        if term.interactive:
            ready, _, _ = select.select([sys.stdin], [], [], 0.02)
            if ready:
                text = input("")
                continue
        return "\n".join(lines)


def parse_budget(arg: str) -> int | None:
    if arg.lower() in ("off", "none"):
        return None
    if not arg.isdigit():
        raise ValueError
    return int(arg)


def take_ctrl_c() -> None:
    """Make Ctrl-C on the terminal reach the chat as KeyboardInterrupt (it stops an answer). A process can start
    with SIGINT ignored or blocked, both kept through fork and exec by every descendant: a shell without job
    control (a script, `cmd &`) starts its background jobs with SIGINT ignored. Python then leaves it ignored, and
    ^C did nothing while an answer streamed. The interactive chat reads its input from this terminal, so the
    terminal's Ctrl-C is meant for it."""
    import signal

    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def run_turn(session: ChatSession, term: Terminal, text: str) -> None:
    view = ReasoningView(term)
    show = ReasoningFilter()
    stream = session.send(text)
    started_answer = False
    last = None
    interrupted = False
    t0 = time.perf_counter()
    try:
        for r in stream:
            last = r
            shown = show(r.text, r.segment)
            if r.segment == "reasoning":
                view.add(shown)
            else:
                if not started_answer:
                    started_answer = True
                    view.fold(session.history[-1].reasoning_tokens, time.perf_counter() - t0)
                term.write(shown)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stream.close()
    if view.active:
        view.fold(session.history[-1].reasoning_tokens, time.perf_counter() - t0)
    term.write("\n")
    s = session.history[-1]
    note = " (interrupted)" if interrupted else (" (stopped at --max-tokens)" if s.finish_reason == "length" else "")
    if last is not None:
        term.info(
            f"{s.generation_tokens} tokens, {s.generation_tps:.1f} tok/s, first token {s.time_to_first_token:.2f} s "
            f"(prefilled {s.prefill_tokens} of {s.prompt_tokens} prompt tokens), "
            f"peak memory {s.peak_memory:.2f} GB{note}"
        )
    else:
        term.info(f"no answer{note}")


def handle_command(session: ChatSession, term: Terminal, line: str) -> bool:
    """Run a /command; returns False when the chat should end."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        term.line(HELP)
    elif name in ("/think", "/no_think"):
        session.options = session.options.replace(enable_thinking=name == "/think")
        term.info("thinking on" if name == "/think" else "thinking off")
    elif name == "/budget":
        try:
            session.options = session.options.replace(thinking_budget=parse_budget(arg))
        except ValueError:
            term.info("usage: /budget N (a whole number of tokens) or /budget off")
            return True
        budget = session.options.thinking_budget
        term.info(f"thinking budget {budget if budget is not None else 'off'}")
    elif name == "/system":
        if not arg:
            term.info(f"system prompt: {session.system!r}; usage: /system TEXT")
            return True
        session.system = arg
        term.info("system prompt set")
    elif name == "/reset":
        session.reset()
        term.info("conversation cleared")
    elif name == "/show":
        term.line(session.last_reasoning or "(no reasoning in the last answer)", "2")
    elif name == "/stats":
        if not session.history:
            term.info("no turns yet")
        for row in session.stats_table():
            term.info(
                f"turn {row['turn']}: prompt {row['prompt_tokens']} (reused {row['reused_tokens']}, prefilled "
                f"{row['prefill_tokens']}), first token {row['time_to_first_token']:.3f} s, "
                f"{row['generation_tokens']} tokens at {row['generation_tps']:.1f} tok/s, {row['finish_reason']}"
            )
        term.info(
            f"thinking {'on' if session.options.enable_thinking else 'off'}, budget {session.options.thinking_budget}, "
            f"cache {session.cache[0].offset if session.cache else 0} tokens{kv_note(session.options)}"
        )
    elif name in ("/save", "/load"):
        if not arg:
            term.info(f"usage: {name} FILE")
            return True
        try:
            (session.save if name == "/save" else session.load)(arg)
        except Qwen3MLXError as e:
            term.info(f"error: {e}")
            return True
        term.info(f"saved to {arg}" if name == "/save" else f"loaded {len(session.messages)} messages from {arg}")
    else:
        term.info(f"unknown command {name}; /help lists the commands")
    return True


@app.command()
@with_options(*SAMPLING, *THINKING, *KV, "num_draft", source=True)
def chat(
    model: str = typer.Argument(..., help="Model folder or Hugging Face repo id."),
    system: str = SYSTEM,
    source: ModelSource = None,
    options: GenerationOptions = None,
) -> None:
    """Chat in the terminal. Type /help for commands; Ctrl-C stops an answer, Ctrl-D exits (/exit under
    mlx.launch, which does not pass Ctrl-D on)."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        take_ctrl_c()
    term = Terminal(interactive)
    llm, tokenizer, options, cached = load_for_generation(model, options, source)
    if cached is not None:
        if cached.system is None:
            raise Qwen3MLXError(f"{source.prompt_cache} holds a raw prompt (--raw), not a system prompt a chat can start from")
        if system is not None and system != cached.system:
            raise Qwen3MLXError(f"--system differs from the system prompt {source.prompt_cache} was made from")
        system = cached.system
    session = ChatSession(llm, tokenizer, system=system, options=options)
    if cached is not None:  # the first turn prefills only what follows the cached system prompt
        session.cache, session.cached_tokens = cached.cache, cached.tokens
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        term.info("qwen3-mlx chat: /help for commands, Ctrl-D to quit")
    while True:
        try:
            line = read_message(term, ">>> ")
        except EOFError:
            if interactive:
                term.write("\n")
            return
        except KeyboardInterrupt:
            term.write("\n")
            term.info("(Ctrl-D or /quit to exit)")
            continue
        if not line.strip():
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not handle_command(session, term, line.strip()):
                return
            continue
        run_turn(session, term, line[1:] if line.startswith("//") else line)
