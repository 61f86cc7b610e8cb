"""The agent loop: a chat whose answers may call tools, the tools run, and their results go back to the model
until it answers without a call.

- `Agent(session, tools).run(text)` streams one turn as events: the model's tokens (`GenerationResponse`), each
  call it makes (`ToolCallEvent`), each result (`ToolResultEvent`), the end of each generation step
  (`StepEvent`) and, when the model keeps calling tools, `LimitEvent`. `Agent.ask(text)` returns the final answer.
- A tool runner has `tools` (OpenAI function definitions, given to the chat template and to the tool-call
  grammar) and `call(name, arguments, timeout) -> ToolResult`: `PythonTools` (plain callables) or `McpTools`
  (MCP servers from an `mcpServers` configuration, through the official `mcp` SDK's client).

A tool that raises, times out or reports an error, a call the user declines, a call that does not parse: each
goes back to the model as that call's result (a `tool` message), never as an exception. Ctrl-C while tools
run (or while asking for a confirmation) cancels the running call, gives every pending call a "cancelled"
result and ends the turn.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import inspect
import json
import re
import tempfile
import threading
import time
import typing
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from .chat import ChatSession, TurnStats
from .errors import Qwen3MLXError, read_json
from .generate import GenerationResponse
from .grammar import grammar_for
from .tools import ToolCall

DEFAULT_TOOL_TIMEOUT = 60.0
DEFAULT_MAX_STEPS = 8


@dataclass
class ToolResult:
    """What goes back to the model as a `tool` message. `status`: "ok", "error" (the tool raised, timed out or
    reported an error; the call did not parse or named no tool), "declined" (by the user), "cancelled" (Ctrl-C)."""

    text: str
    status: str = "ok"


class ToolRunner(Protocol):
    tools: list[dict]

    def call(self, name: str, arguments: dict, timeout: float | None = None) -> ToolResult: ...

    def close(self) -> None: ...


def function_tool(name: str, description: str, parameters: dict | None) -> dict:
    """A tool definition in OpenAI's function form (what chat templates and the tool-call grammar take). The
    parameters are closed (see `closed_schema`)."""
    return {"type": "function", "function": {"name": name, "description": description or "",
                                             "parameters": closed_schema(parameters)}}


def closed_schema(schema: dict | None) -> dict:
    """A tool's parameters schema with `additionalProperties: false` when it lists properties and says nothing
    of others: a call passes the parameters the tool declares, no invented ones (JSON Schema's default would let
    the model add any key, and a small model does; the servers ignore or refuse them anyway)."""
    schema = dict(schema or {"type": "object", "properties": {}})
    if schema.get("type", "object") == "object" and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


# Ctrl-C (SIGINT) is sent to the process, and the kernel may hand it to any thread that does not block it
# (MLX's, OpenBLAS's, the MCP loop's, a tool's): Python then raises KeyboardInterrupt in the main thread only
# when that thread next runs Python code, which one long blocking wait would put off until the tool answered.
# So waits for a tool block in short slices.
WAIT_SLICE = 0.05


def wait_result(future: concurrent.futures.Future, timeout: float | None):
    """`future.result(timeout)`, waiting in slices of WAIT_SLICE seconds so that Ctrl-C interrupts it at once."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        try:
            return future.result(WAIT_SLICE if left is None else max(0.0, min(WAIT_SLICE, left)))
        except concurrent.futures.TimeoutError:
            if left is not None and left <= WAIT_SLICE:
                raise


# ---- plain Python callables --------------------------------------------------------------------------------------

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}


def signature_schema(fn: Callable) -> dict:
    """A JSON schema of `fn`'s parameters from their annotations (int, float, str, bool, list, dict; anything else
    is left untyped); parameters without a default are required, others refused unless `fn` takes **kwargs."""
    properties, required, extra = {}, [], False
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve leaves its parameter untyped
        hints = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            extra = extra or p.kind == p.VAR_KEYWORD
            continue
        kind = _JSON_TYPES.get(hints.get(p.name, p.annotation))
        properties[p.name] = {"type": kind} if kind else {}
        if p.default is p.empty:
            required.append(p.name)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": extra}


def result_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


class PythonTools:
    """Tools that are Python callables. `functions`: callables (named by `__name__`, described by their
    docstring, their parameters' schema read off their annotations) or a {name: callable} dict; `schemas`:
    {name: JSON schema} to give a parameters schema yourself. A call runs on a worker thread; past its timeout
    the model gets an error result (Python cannot stop the thread: it finishes in the background)."""

    def __init__(self, functions: Iterable[Callable] | dict[str, Callable], schemas: dict[str, dict] | None = None):
        items = functions.items() if isinstance(functions, dict) else ((f.__name__, f) for f in functions)
        self.functions = dict(items)
        schemas = schemas or {}
        self.tools = [function_tool(name, inspect.getdoc(fn) or "", schemas.get(name) or signature_schema(fn))
                      for name, fn in self.functions.items()]

    def call(self, name: str, arguments: dict, timeout: float | None = DEFAULT_TOOL_TIMEOUT) -> ToolResult:
        fn = self.functions.get(name)
        if fn is None:
            return ToolResult(f"error: there is no tool named {name!r}", "error")
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                future.set_result(ToolResult(result_text(fn(**arguments))))
            except BaseException as e:  # noqa: BLE001 - the model gets what went wrong
                future.set_result(ToolResult(f"error: {type(e).__name__}: {e}", "error"))

        threading.Thread(target=run, name=f"tool {name}", daemon=True).start()
        try:
            return wait_result(future, timeout)
        except concurrent.futures.TimeoutError:
            return ToolResult(f"error: the tool did not answer within {timeout:g} s", "error")

    def close(self) -> None:
        pass


# ---- MCP servers ----------------------------------------------------------------------------------------------


def read_mcp_config(source: str | Path | dict) -> dict[str, dict]:
    """The servers of an `mcpServers` configuration (Qwen-Agent's and the desktop apps' format), from a file or
    a dict: {name: {"command", "args", "env"}} (stdio) or {name: {"url"}} (streamable HTTP). A malformed file is
    one domain error."""
    where = "the MCP configuration"
    if not isinstance(source, dict):
        where = str(source)
        source = read_json(source)
    servers = source.get("mcpServers") if isinstance(source, dict) else None
    if not isinstance(servers, dict):
        raise Qwen3MLXError(f'{where} has no "mcpServers" object, e.g. '
                            '{"mcpServers": {"time": {"command": "uvx", "args": ["mcp-server-time"]}}}')
    for name, entry in servers.items():
        if not isinstance(entry, dict) or not (isinstance(entry.get("command"), str) or isinstance(entry.get("url"), str)):
            raise Qwen3MLXError(f'{where}: server {name!r} needs a "command" (stdio) or a "url" (streamable HTTP)')
        if not isinstance(entry.get("args", []), list) or not isinstance(entry.get("env", {}) or {}, dict):
            raise Qwen3MLXError(f'{where}: server {name!r}: "args" must be a list and "env" an object')
    return servers


@dataclass
class McpTool:
    name: str  # the name the model sees
    server: str
    remote_name: str  # the name on its server
    description: str
    parameters: dict


@dataclass
class _Server:
    name: str
    client: Any = None
    stop: Any = None  # asyncio.Event, set to shut the server down
    task: Any = None
    log: Any = None  # the server's stderr (a temporary file)
    tools: list = field(default_factory=list)


_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


class McpTools:
    """MCP servers as a tool runner. The `mcp` SDK is async: its sessions live on a background thread with its
    own event loop; `call` waits for the result there (with a timeout, and Ctrl-C cancels the call).

    `start(config)` starts the servers (stdio: the command, its stderr kept in a temporary file; remote: `url`,
    streamable HTTP), lists their tools and returns one line per server that failed to start (the others
    carry on). A tool name offered by more than one server is renamed `SERVER__TOOL` on each of them (see
    `renamed`). `close()` shuts every server down (stdio: stdin closed, then terminated, then killed)."""

    def __init__(self, startup_timeout: float = 30.0):
        self.startup_timeout = startup_timeout
        self.tools: list[dict] = []
        self.catalogue: dict[str, McpTool] = {}
        self.servers: dict[str, _Server] = {}
        self.renamed: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._logs = None

    def __enter__(self) -> McpTools:  # noqa: PYI034 - not meant to be subclassed
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # the event loop thread ----------------------------------------------------------------------------------

    def _run(self, make: Callable[[], Awaitable], timeout: float | None = None):
        """Run the coroutine `make()` on the loop thread and wait for its result. Ctrl-C or our own timeout
        cancels it there, wherever it lands: the future it cancels exists before the work is handed to the loop
        (`asyncio.run_coroutine_threadsafe` returns its future only after the hand-over, and an interrupt in
        between left the call running on the server), and the coroutine is made on the loop, if still wanted."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="mcp", daemon=True)
            self._thread.start()
        loop, future = self._loop, concurrent.futures.Future()

        def start() -> None:  # on the loop
            if future.cancelled():
                return
            task = loop.create_task(make())

            def settle(_) -> None:
                if task.cancelled():
                    future.cancel()
                elif future.set_running_or_notify_cancel():
                    if task.exception() is not None:
                        future.set_exception(task.exception())
                    else:
                        future.set_result(task.result())

            def cancel(_) -> None:  # from the caller's thread
                if future.cancelled():
                    loop.call_soon_threadsafe(task.cancel)

            task.add_done_callback(settle)
            future.add_done_callback(cancel)

        try:
            loop.call_soon_threadsafe(start)
            return wait_result(future, timeout)
        except BaseException:  # Ctrl-C or our own timeout: the coroutine is cancelled on the loop
            future.cancel()
            raise

    # starting -------------------------------------------------------------------------------------------------

    def start(self, config: str | Path | dict) -> list[str]:
        servers = read_mcp_config(config)
        try:
            from mcp import Client  # noqa: F401
        except ImportError:
            raise Qwen3MLXError("MCP servers need the mcp package: pip install 'qwen3-mlx[agent]'") from None
        if self._logs is None:
            self._logs = tempfile.TemporaryDirectory(prefix="qwen3-mlx-mcp-")
        started = self._run(partial(self._start_all, servers))
        self._index()
        return [line for line in started if line]

    async def _start_all(self, servers: dict[str, dict]) -> list[str | None]:
        return await asyncio.gather(*(self._start_one(name, entry) for name, entry in servers.items()))

    async def _start_one(self, name: str, entry: dict) -> str | None:
        if name in self.servers:
            return f"MCP server {name!r} is already running"
        server = _Server(name, stop=asyncio.Event())
        ready = asyncio.get_running_loop().create_future()
        server.task = asyncio.create_task(self._serve(server, entry, ready))
        self.servers[name] = server  # from now on close() stops it, even while it starts
        try:
            await asyncio.wait_for(asyncio.shield(ready), self.startup_timeout)
        except asyncio.TimeoutError:
            await self._stop([server], 5.0)
            del self.servers[name]
            return f"MCP server {name!r} did not start within {self.startup_timeout:g} s{self._stderr_tail(server)}"
        except Exception as e:  # noqa: BLE001 - one line per server, the chat goes on without it
            await asyncio.gather(server.task, return_exceptions=True)
            del self.servers[name]
            return f"MCP server {name!r} failed to start: {describe(e)}{self._stderr_tail(server)}"
        return None

    @staticmethod
    async def _stop(servers: list[_Server], timeout: float) -> None:
        """Ask each server's task to disconnect; cancel those that do not within `timeout`."""
        for server in servers:
            server.stop.set()
        tasks = [s.task for s in servers if s.task is not None and not s.task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=timeout)

    async def _serve(self, server: _Server, entry: dict, ready: asyncio.Future) -> None:
        """One server's whole life in one task (the SDK's context managers are entered and left in the same
        task): connect, list the tools, wait for `stop`, disconnect."""
        from mcp import Client
        from mcp.client.stdio import StdioServerParameters, stdio_client

        try:
            if "command" in entry:
                # Open for the server's life (close() closes it); a local file, quick to open.
                log = Path(self._logs.name) / f"{_NAME_CHARS.sub('_', server.name)}.log"
                server.log = open(log, "w+")  # noqa: ASYNC230, SIM115
                params = StdioServerParameters(command=entry["command"], args=[str(a) for a in entry.get("args", [])],
                                               env={k: str(v) for k, v in (entry.get("env") or {}).items()} or None,
                                               cwd=entry.get("cwd"))
                transport = stdio_client(params, errlog=server.log)
            else:
                transport = entry["url"]
            async with Client(transport) as client:
                server.client = client
                cursor, tools = None, []
                while True:
                    page = await client.list_tools(cursor=cursor)
                    tools += page.tools
                    cursor = page.next_cursor
                    if not cursor:
                        break
                server.tools = tools
                ready.set_result(None)
                await server.stop.wait()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e if isinstance(e, Exception) else RuntimeError(describe(e)))
            if not isinstance(e, Exception):
                raise
        finally:
            server.client = None  # stopped, or crashed after starting: its calls answer with an error

    def _stderr_tail(self, server: _Server) -> str:
        if server.log is None:
            return ""
        try:
            server.log.flush()
            lines = [line.strip() for line in Path(server.log.name).read_text(errors="replace").splitlines()]
        except OSError:
            return ""
        lines = [line for line in lines if line]
        return f" (its stderr: {lines[-1][:200]})" if lines else ""

    def _index(self) -> None:
        """The tools the model sees. A name more than one server offers becomes SERVER__TOOL on each."""
        count: dict[str, int] = {}
        for server in self.servers.values():
            for tool in server.tools:
                count[tool.name] = count.get(tool.name, 0) + 1
        self.catalogue, self.renamed = {}, []
        for server in self.servers.values():
            for tool in server.tools:
                name = tool.name
                if count[name] > 1:
                    name = f"{_NAME_CHARS.sub('_', server.name)}__{tool.name}"
                    self.renamed.append(f"{tool.name} ({server.name}) -> {name}")
                self.catalogue[name] = McpTool(name, server.name, tool.name, tool.description or "",
                                               tool.input_schema or {"type": "object", "properties": {}})
        self.tools = [function_tool(t.name, t.description, t.parameters) for t in self.catalogue.values()]

    # calling --------------------------------------------------------------------------------------------------

    def call(self, name: str, arguments: dict, timeout: float | None = DEFAULT_TOOL_TIMEOUT) -> ToolResult:
        tool = self.catalogue.get(name)
        if tool is None:
            return ToolResult(f"error: there is no tool named {name!r}", "error")
        server = self.servers.get(tool.server)
        if server is None or server.client is None:
            return ToolResult(f"error: the MCP server {tool.server!r} is not running", "error")
        try:
            # The loop enforces the timeout (and cancels the request); ours only guards against a stuck loop.
            return self._run(partial(self._call, server, tool.remote_name, arguments, timeout),
                             None if timeout is None else timeout + 10)
        except concurrent.futures.TimeoutError:
            return ToolResult(f"error: the tool did not answer within {timeout:g} s", "error")
        except Exception as e:  # noqa: BLE001 - a failed call is the model's result, not a crash
            return ToolResult(f"error: {describe(e)}", "error")

    async def _call(self, server: _Server, name: str, arguments: dict, timeout: float | None) -> ToolResult:
        try:
            result = await asyncio.wait_for(server.client.call_tool(name, arguments), timeout)
        except asyncio.TimeoutError:
            return ToolResult(f"error: the tool did not answer within {timeout:g} s (cancelled)", "error")
        except Exception as e:  # noqa: BLE001
            return ToolResult(f"error: {describe(e)}", "error")
        text = content_text(result)
        if result.is_error:
            return ToolResult(f"error: {text}" if not text.startswith("error") else text, "error")
        return ToolResult(text)

    # stopping -------------------------------------------------------------------------------------------------

    def close(self, timeout: float = 15.0) -> None:
        """Shut every server down and stop the loop thread (idempotent)."""
        loop, self._loop = self._loop, None
        if loop is None:
            return

        try:
            stopping = asyncio.run_coroutine_threadsafe(self._stop(list(self.servers.values()), timeout), loop)
            stopping.result(2 * timeout + 5)
        except BaseException:  # noqa: BLE001, S110 - shutting down whatever happens
            pass
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            for server in self.servers.values():
                if server.log is not None:
                    server.log.close()
            self.servers = {}
            if self._logs is not None:
                self._logs.cleanup()
                self._logs = None


_GROUP = getattr(builtins, "BaseExceptionGroup", ())  # Python 3.11+ (anyio's backport is a subclass of it there)


def describe(e: BaseException) -> str:
    """An exception in one line; an exception group by its first leaf (the SDK's task groups wrap errors)."""
    while isinstance(e, _GROUP) and e.exceptions:
        e = e.exceptions[0]
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def content_text(result) -> str:
    """An MCP tool result as the text of a `tool` message: its text parts; other parts named by their type;
    the structured content as JSON when there is no text."""
    parts = []
    for block in result.content or []:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} {getattr(block, 'mime_type', '')}]")
        elif kind == "resource_link":
            parts.append(f"[resource {getattr(block, 'uri', '')}]")
        elif kind == "resource":
            resource = block.resource
            parts.append(getattr(resource, "text", None) or f"[resource {getattr(resource, 'uri', '')}]")
        else:
            parts.append(f"[{kind}]")
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


# ---- the loop ---------------------------------------------------------------------------------------------------


@dataclass
class ToolCallEvent:
    """The model called a tool (before it runs: the place to show it)."""

    call: ToolCall


@dataclass
class ToolResultEvent:
    call: ToolCall
    result: ToolResult


@dataclass
class StepEvent:
    """One generation step ended (`stats.kind`: "user" for the first of a turn, "tool" after tool results)."""

    stats: TurnStats


@dataclass
class LimitEvent:
    """The model still called tools after `max_steps` steps: the calls were not run and the turn ends."""

    max_steps: int
    calls: list[ToolCall]


Event = GenerationResponse | ToolCallEvent | ToolResultEvent | StepEvent | LimitEvent
CONFIRM_ANSWERS = {"y": "yes", "yes": "yes", "n": "no", "no": "no", "a": "always", "always": "always"}


class Agent:
    """A chat session that runs the tools its answers call.

    `confirm(call) -> "yes" | "no" | "always"` (or "y" / "n" / "a", or a bool) is asked before each call; None
    runs every call. "always" runs this tool without asking for the rest of the session. `tool_choice` applies
    to the first step of each turn (None: the session's), later steps are "auto"; `max_steps`: tool steps per
    turn before the loop is ended; `tool_timeout`: seconds per call."""

    def __init__(self, session: ChatSession, tools: ToolRunner, *, confirm: Callable[[ToolCall], Any] | None = None,
                 tool_choice: str | dict | None = None, max_steps: int = DEFAULT_MAX_STEPS,
                 tool_timeout: float | None = DEFAULT_TOOL_TIMEOUT):
        if max_steps < 0:
            raise Qwen3MLXError(f"max_steps must be 0 or more, got {max_steps}")
        self.session, self.runner = session, tools
        self.confirm = confirm
        self.tool_choice = tool_choice
        self.max_steps = max_steps
        self.tool_timeout = tool_timeout
        self.always: set[str] = set()
        session.options = session.options.replace(tools=list(tools.tools) or None).validate(
            getattr(session.model, "args", None))
        # A tool schema or tool_choice the grammar cannot hold (or a choice with no tools) is refused now, not at
        # the first message.
        grammar_for(session.options.replace(tool_choice=tool_choice or session.options.tool_choice),
                    session.tokenizer.tool_call_form)

    def step_options(self, step: int):
        options = self.session.options
        if not options.tools:
            return options
        if step == 0:
            return options.replace(tool_choice=self.tool_choice) if self.tool_choice is not None else options
        return options.replace(tool_choice="auto")

    def run(self, text: str) -> Iterator[Event]:
        """One turn: the user's `text`, then as many tool steps as the model needs (at most `max_steps`)."""
        stream = self.session.send(text, self.step_options(0))
        step = 0
        while True:
            yield from stream  # an abandoned turn (Ctrl-C, .close()) closes it: it keeps its partial answer
            stats = self.session.history[-1]
            calls = list(self.session.last_tool_calls)
            yield StepEvent(stats)
            if not calls:
                return
            if step >= self.max_steps:
                for call in calls:
                    self.session.add_tool_result(f"not run: the limit of {self.max_steps} tool steps in a turn was "
                                                 "reached")
                yield LimitEvent(self.max_steps, calls)
                return
            step += 1
            cancelled = False
            for call in calls:
                if cancelled:
                    result = ToolResult("cancelled by the user", "cancelled")
                else:
                    if call.ok:
                        yield ToolCallEvent(call)
                    try:
                        result = self._run_call(call)
                    except KeyboardInterrupt:
                        cancelled = True
                        result = ToolResult("cancelled by the user", "cancelled")
                self.session.add_tool_result(result.text)
                yield ToolResultEvent(call, result)
            if cancelled:
                return
            stream = self.session.step(self.step_options(step))

    def _run_call(self, call: ToolCall) -> ToolResult:
        if not call.ok:
            return ToolResult(f"error: the tool call could not be used: {call.error}", "error")
        if self.confirm is not None and call.name not in self.always:
            answer = self.confirm(call)
            answer = ("yes" if answer else "no") if isinstance(answer, bool) else CONFIRM_ANSWERS.get(
                str(answer).strip().lower(), "no")
            if answer == "no":
                return ToolResult("the user declined to run this tool call", "declined")
            if answer == "always":
                self.always.add(call.name)
        return self.runner.call(call.name, call.arguments, self.tool_timeout)

    def ask(self, text: str) -> str:
        """Run a turn to its end and return the final answer."""
        for _ in self.run(text):
            pass
        return self.session.messages[-1]["content"] if self.session.messages[-1]["role"] == "assistant" else ""

