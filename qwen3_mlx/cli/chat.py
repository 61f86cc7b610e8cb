"""`qwen3-mlx chat`: a terminal chat with streaming, thinking control and prompt-cache reuse across turns.

On a terminal: colours, reasoning streamed dimmed in a live region that folds to a one-line summary when the
answer starts. When stdin is not a terminal (scripts, pipes): plain lines, no colours, no live rendering.

With `--mcp servers.json` the model gets the MCP servers' tools (`qwen3_mlx.agent`): each call is shown (a
panel on a terminal, one line when piped), run once the user says y(es) / n(o) / a(lways for this tool) or
right away with `--yes`, and its result goes back to the model until it answers without a call.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import typer

from ..agent import (
    CONFIRM_ANSWERS,
    DEFAULT_MAX_STEPS,
    DEFAULT_TOOL_TIMEOUT,
    read_mcp_config,
)
from ..chat import ChatSession
from ..errors import Qwen3MLXError
from ..options import GenerationOptions
from .app import app, err
from .generate import ReasoningFilter, generation_command, kv_note
from .options import SYSTEM, ModelSource, load_for_generation

HELP = """commands:
  /think            thinking on for the next turns        /no_think     thinking off
  /budget N|off     cap reasoning at N tokens             /system TEXT  set the system prompt
  /show             the last reasoning in full            /stats        statistics of this session
  /reset            start over (keeps the system prompt)  /save FILE    /load FILE   the conversation as JSON
  /tools            the tools the model may call (--mcp)
  /help             this help                             /quit         exit (or Ctrl-D)
input: end a line with \\ to continue on the next; Ctrl-C stops an answer (the partial answer is kept) or
cancels a running tool (the turn is kept); a tool call asks y (run it), n (do not), a (always run this tool)."""


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


class CallFilter:
    """Hides tool-call blocks from the streamed answer (the calls are shown on their own)."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self):
        self.buffer = ""
        self.inside = False

    def __call__(self, text: str) -> str:
        self.buffer += text
        shown = []
        while True:
            if self.inside:
                i = self.buffer.find(self.CLOSE)
                if i < 0:
                    self.buffer = self.buffer[-(len(self.CLOSE) - 1):]
                    break
                self.buffer, self.inside = self.buffer[i + len(self.CLOSE):], False
            else:
                i = self.buffer.find(self.OPEN)
                if i < 0:
                    keep = next((k for k in range(len(self.OPEN) - 1, 0, -1) if self.buffer.endswith(self.OPEN[:k])), 0)
                    shown.append(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                shown.append(self.buffer[:i].rstrip("\n"))
                self.buffer, self.inside = self.buffer[i + len(self.OPEN):], True
        return "".join(shown)


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ToolView:
    """How tool calls and results are shown, and the y/n/a question."""

    def __init__(self, term: Terminal):
        self.term = term

    def call(self, call) -> None:
        if not self.term.interactive:
            self.term.line(f"tool call: {call.name} {json.dumps(call.arguments, ensure_ascii=False)}")
            return
        from rich.console import Console
        from rich.panel import Panel
        from rich.text import Text

        console = Console(file=self.term.out, no_color=not self.term.colour, highlight=False)
        body = json.dumps(call.arguments, ensure_ascii=False, indent=2)
        console.print(Panel(Text(body), title=f"tool call: {call.name}", title_align="left", expand=False))

    def result(self, call, result) -> None:
        name = call.name or "(unparsed call)"
        if result.status in ("declined", "cancelled"):
            self.term.line(f"tool {result.status}: {name}", "2")  # line() styles only on a colour terminal
            return
        label = "tool result" if result.status == "ok" else "tool error"
        self.term.line(f"{label}: {name}: {one_line(result.text)}", "2" if result.status == "ok" else "31")

    def confirm(self, call) -> str:
        """y / n / a from the user (on a terminal the question is asked again until it is one of them)."""
        while True:
            try:
                answer = input(f"run {call.name}? [y]es / [n]o / [a]lways: " if self.term.interactive else "")
            except EOFError:
                return "no"
            answer = answer.strip().lower()
            if answer in CONFIRM_ANSWERS:
                return CONFIRM_ANSWERS[answer]
            if not self.term.interactive:
                return "no"


def run_turn(session: ChatSession, term: Terminal, text: str, agent=None) -> None:
    """One turn: the answer streamed; with an agent, its tool calls shown and run, and each step's answer."""
    from ..agent import LimitEvent, StepEvent, ToolCallEvent, ToolResultEvent

    events = agent.run(text) if agent is not None else session.send(text)
    tools_view = ToolView(term)
    view, show, hide_calls = ReasoningView(term), ReasoningFilter(), CallFilter()
    started_answer = False
    interrupted = False
    t0 = time.perf_counter()

    def end_step(stats) -> None:
        if view.active:
            view.fold(stats.reasoning_tokens, time.perf_counter() - t0)
        term.write("\n" if started_answer or agent is None else "")
        note = " (interrupted)" if stats.finish_reason == "interrupted" else (
            " (stopped at --max-tokens)" if stats.finish_reason == "length" else "")
        if not stats.generation_tokens:
            term.info(f"no answer{note}")
            return
        term.info(
            f"{stats.generation_tokens} tokens, {stats.generation_tps:.1f} tok/s, first token "
            f"{stats.time_to_first_token:.2f} s (prefilled {stats.prefill_tokens} of {stats.prompt_tokens} prompt "
            f"tokens), peak memory {stats.peak_memory:.2f} GB{note}"
        )

    steps = len(session.history)
    try:
        for event in events:
            if isinstance(event, StepEvent):
                end_step(event.stats)
                view, show, hide_calls = ReasoningView(term), ReasoningFilter(), CallFilter()
                started_answer, t0 = False, time.perf_counter()
            elif isinstance(event, ToolCallEvent):
                tools_view.call(event.call)
            elif isinstance(event, ToolResultEvent):
                tools_view.result(event.call, event.result)
            elif isinstance(event, LimitEvent):
                term.info(f"the model still calls tools after {event.max_steps} tool steps (--max-tool-steps): "
                          "turn ended, its calls not run")
            else:
                r = event
                shown = show(r.text, r.segment)
                if r.segment == "reasoning":
                    view.add(shown)
                else:
                    if agent is not None:
                        shown = hide_calls(shown)
                    if shown and not started_answer:
                        started_answer = True
                        view.fold(session.history[-1].reasoning_tokens, time.perf_counter() - t0)
                    term.write(shown)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        events.close()
    if agent is None or interrupted:
        # The step the interrupt stopped (its StepEvent never came), or a plain turn's only step.
        if len(session.history) > steps:
            end_step(session.history[-1])
        else:
            term.write("\n")
            term.info("no answer (interrupted)" if interrupted else "no answer")


def list_tools(term: Terminal, agent) -> None:
    tools = agent.runner.tools if agent is not None else []
    if not tools:
        term.info("no tools (give MCP servers with --mcp servers.json)")
        return
    catalogue = getattr(agent.runner, "catalogue", {})
    for tool in tools:
        fn = tool["function"]
        where = f" [{catalogue[fn['name']].server}]" if fn["name"] in catalogue else ""
        description = (fn.get("description") or "").strip().splitlines()
        always = " (always runs)" if fn["name"] in agent.always else ""
        term.line(f"{fn['name']}{where}{always}: {description[0] if description else ''}")


def handle_command(session: ChatSession, term: Terminal, line: str, agent=None) -> bool:
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
    elif name == "/tools":
        list_tools(term, agent)
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


def start_tools(term: Terminal, config: dict):
    """The MCP servers of --mcp, started; one line per server that failed (the chat goes on without it)."""
    from ..agent import McpTools
    from .app import show_progress

    tools = McpTools()
    try:
        with err.status("starting MCP servers") if term.interactive and show_progress() else nullcontext():
            failures = tools.start(config)
    except BaseException:
        tools.close()
        raise
    for line in failures:
        term.info(line)
    for line in tools.renamed:
        term.info(f"tool name offered by more than one server, renamed: {line}")
    servers = ", ".join(f"{s.name} ({len(s.tools)})" for s in tools.servers.values()) or "none"
    term.info(f"MCP: {len(tools.tools)} tools from {len(tools.servers)} servers: {servers} (/tools lists them)")
    return tools


@app.command()
@generation_command
def chat(
    model: str = typer.Argument(..., help="Model folder or Hugging Face repo id."),
    system: str = SYSTEM,
    mcp: Path = typer.Option(  # noqa: B008 - typer's option declaration
        None, "--mcp", help="MCP servers whose tools the model may call: a JSON file in the mcpServers format, "
        "e.g. {\"mcpServers\": {\"time\": {\"command\": \"uvx\", \"args\": \\[\"mcp-server-time\"]}}} (stdio: "
        "command, args, env; remote: url, streamable HTTP)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Run tool calls without asking (scripts)."),
    tool_choice: str = typer.Option(
        "auto", "--tool-choice", help="The first step of each turn: auto (the model decides), required (it calls "
        "a tool), none (it does not), or a tool's name (it calls that one); later steps are auto."),
    max_tool_steps: int = typer.Option(
        DEFAULT_MAX_STEPS, "--max-tool-steps", min=0, help="Tool steps per turn before a turn that keeps calling tools is ended."),
    tool_timeout: float = typer.Option(DEFAULT_TOOL_TIMEOUT, "--tool-timeout", min=0.001, help="Seconds a tool call may take."),
    source: ModelSource = None,
    options: GenerationOptions = None,
) -> None:
    """Chat in the terminal. Type /help for commands; Ctrl-C stops an answer, Ctrl-D exits (/exit under
    mlx.launch, which does not pass Ctrl-D on). With --mcp, the model may call the servers' tools."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        take_ctrl_c()
    term = Terminal(interactive)
    if mcp is None and tool_choice not in ("auto", "none"):
        raise Qwen3MLXError(f"--tool-choice {tool_choice} needs tools: give MCP servers with --mcp servers.json")
    # A bad file is one line before the model loads.
    config = {"mcpServers": read_mcp_config(mcp)} if mcp is not None else None
    llm, tokenizer, options, cached = load_for_generation(model, options, source)
    tools = start_tools(term, config) if config is not None else None
    try:
        chat_loop(term, interactive, llm, tokenizer, options, cached, source, system, tools, yes=yes,
                  tool_choice=tool_choice, max_tool_steps=max_tool_steps, tool_timeout=tool_timeout)
    finally:
        if tools is not None:
            tools.close()  # the MCP servers stop with the chat: on /quit, Ctrl-D and errors


def chat_loop(term, interactive, llm, tokenizer, options, cached, source, system, tools, *, yes, tool_choice,
              max_tool_steps, tool_timeout) -> None:
    if cached is not None:
        if cached.system is None:
            raise Qwen3MLXError(f"{source.prompt_cache} holds a raw prompt (--raw), not a system prompt a chat can start from")
        if system is not None and system != cached.system:
            raise Qwen3MLXError(f"--system differs from the system prompt {source.prompt_cache} was made from")
        system = cached.system
    session = ChatSession(llm, tokenizer, system=system, options=options)
    if cached is not None:  # the first turn prefills only what follows the cached system prompt
        session.cache, session.cached_tokens = cached.cache, cached.tokens
    agent = None
    if tools is not None:
        from ..agent import Agent

        agent = Agent(session, tools, confirm=None if yes else ToolView(term).confirm, tool_choice=tool_choice,
                      max_steps=max_tool_steps, tool_timeout=tool_timeout)
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
            if not handle_command(session, term, line.strip(), agent):
                return
            continue
        run_turn(session, term, line[1:] if line.startswith("//") else line, agent)
