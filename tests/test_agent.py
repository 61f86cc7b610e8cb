"""The agent (issue 23, item 5): MCP servers through the official SDK (a server written here with its MCPServer,
and mcp-server-time from the registry), the agent loop over a chat session on a random-weight model whose tool
calls the tool-call grammar holds to the declared tools, and `qwen3-mlx chat --mcp` through a pipe and in a
pseudo-terminal. Every test that starts servers checks that none outlives it."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pexpect
import pytest

from qwen3_mlx.agent import (
    Agent,
    LimitEvent,
    McpTools,
    PythonTools,
    StepEvent,
    ToolCallEvent,
    ToolResultEvent,
    read_mcp_config,
    signature_schema,
)
from qwen3_mlx.chat import ChatSession
from qwen3_mlx.errors import Qwen3MLXError
from qwen3_mlx.generate import prompt_tokens
from qwen3_mlx.loader import load
from qwen3_mlx.tools import split_tool_calls

TOOLBOX = Path(__file__).parent / "mcp_servers" / "toolbox.py"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    return SimpleNamespace(path=tiny_checkpoint, model=model, tokenizer=tokenizer)


# ---- processes: every server the tests start is marked, and must be gone afterwards ---------------------------


def marked_processes(mark: str) -> list[int]:
    """Pids of live processes whose environment holds QWEN3_MLX_TEST_MARK=mark."""
    needle = f"QWEN3_MLX_TEST_MARK={mark}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            pids.append(int(entry))
    return pids


@pytest.fixture
def mark():
    """A mark for the servers of one test; after it, none may be running (they are killed if they are)."""
    mark = uuid.uuid4().hex
    yield mark
    deadline = time.monotonic() + 10
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = marked_processes(mark)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"MCP server processes outlived the test: {left}"


def toolbox(mark: str, *args: str) -> dict:
    return {"command": sys.executable, "args": [str(TOOLBOX), *args], "env": {"QWEN3_MLX_TEST_MARK": mark}}


def time_server(mark: str) -> dict:
    return {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone=UTC"],
            "env": {"QWEN3_MLX_TEST_MARK": mark}}


def write_config(path: Path, servers: dict) -> Path:
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


# ---- the configuration and the MCP client -----------------------------------------------------------------


def test_mcp_config_is_checked(tmp_path):
    assert read_mcp_config({"mcpServers": {"t": {"command": "x", "args": ["-y"]}, "r": {"url": "http://h/mcp"}}})
    for text, message in [
        ("{", "is not JSON"),
        ('{"servers": {}}', 'no "mcpServers" object'),
        ('{"mcpServers": {"t": {"args": []}}}', 'needs a "command"'),
        ('{"mcpServers": {"t": {"command": "x", "args": "-y"}}}', '"args" must be a list'),
    ]:
        (tmp_path / "c.json").write_text(text)
        with pytest.raises(Qwen3MLXError, match=message):
            read_mcp_config(tmp_path / "c.json")
    with pytest.raises(Qwen3MLXError, match="cannot read"):
        read_mcp_config(tmp_path / "missing.json")


def test_mcp_servers_tools_errors_timeouts_and_shutdown(mark):
    """Our server and mcp-server-time start, a missing command and a server that dies are one line each;
    a result, a raising tool, a timeout and an unknown tool all come back as results; close() stops them all."""
    with McpTools() as tools:
        failures = tools.start({"mcpServers": {
            "box": toolbox(mark),
            "time": time_server(mark),
            "missing": {"command": "/nonexistent/mcp-server"},
            "dies": {"command": sys.executable, "args": ["-c", "import sys; sys.exit('no such thing here')"],
                     "env": {"QWEN3_MLX_TEST_MARK": mark}},
        }})
        assert len(failures) == 2 and all("\n" not in line for line in failures)
        assert "'missing' failed to start: FileNotFoundError" in failures[0] + failures[1]
        assert "no such thing here" in failures[0] + failures[1]  # the dead server's stderr, its last line
        names = [t["function"]["name"] for t in tools.tools]
        assert names == ["add", "ping", "explode", "slow", "get_current_time", "convert_time"]
        add = tools.tools[0]["function"]["parameters"]
        assert add["properties"]["a"]["maximum"] == 9 and add["additionalProperties"] is False
        assert len(marked_processes(mark)) == 2

        assert tools.call("add", {"a": 2, "b": 3}).text == "5"
        result = tools.call("get_current_time", {"timezone": "Etc/UTC"})
        assert result.status == "ok" and json.loads(result.text)["timezone"] == "Etc/UTC"
        bad = tools.call("get_current_time", {"timezone": "Mars/Olympus"})
        assert bad.status == "error" and "Mars/Olympus" in bad.text
        boom = tools.call("explode", {})
        assert boom.status == "error" and boom.text.startswith("error:")
        t0 = time.perf_counter()
        late = tools.call("slow", {}, timeout=0.5)
        assert late.status == "error" and "within 0.5 s" in late.text and time.perf_counter() - t0 < 5
        assert tools.call("add", {"a": 1, "b": 1}).text == "2"  # the server still answers after the timeout
        assert tools.call("nope", {}).status == "error"
    assert marked_processes(mark) == []


def test_colliding_tool_names_are_prefixed_by_server(mark):
    with McpTools() as tools:
        assert tools.start({"mcpServers": {"one": toolbox(mark, "--name", "one", "--tools", "ping,add"),
                                           "two": toolbox(mark, "--name", "two", "--tools", "ping")}}) == []
        assert sorted(t["function"]["name"] for t in tools.tools) == ["add", "one__ping", "two__ping"]
        assert tools.call("two__ping", {}).text == "pong from two 7f3a9c"
        assert tools.call("one__ping", {}).text == "pong from one 7f3a9c"
        assert len(tools.renamed) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_remote_server_over_streamable_http(mark):
    port = free_port()
    env = dict(os.environ, QWEN3_MLX_TEST_MARK=mark)
    server = subprocess.Popen([sys.executable, str(TOOLBOX), "--http", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        with McpTools() as tools:
            assert tools.start({"mcpServers": {"remote": {"url": f"http://127.0.0.1:{port}/mcp"}}}) == []
            assert tools.call("add", {"a": 4, "b": 5}).text == "9"
    finally:
        server.terminate()
        server.wait(10)


def wait_for_event(path: Path, event: str, timeout: float = 30) -> bool:
    """Whether the toolbox reported `event` (a line of its --events file) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and event in path.read_text().splitlines():
            return True
        time.sleep(0.02)
    return False


def test_ctrl_c_during_a_call_cancels_it(mark, tmp_path):
    """Ctrl-C (SIGINT) while a call runs on the server: the call raises KeyboardInterrupt at once, the server
    is told to cancel it, and the next call works. The interrupt is sent only once the server reports the call
    running (a fixed delay could land before the call, or outside it, on a loaded machine), and it is received
    by another thread than the waiting one."""
    events = tmp_path / "events"
    with McpTools() as tools:
        assert tools.start({"mcpServers": {"box": toolbox(mark, "--tools", "slow,ping", "--events", str(events))}}) == []
        sent = []

        def interrupt_once_running():
            if wait_for_event(events, "slow started"):
                sent.append(time.perf_counter())
                # Ctrl-C goes to the process and the kernel may hand it to any thread: here, to this one (as it
                # may to an MLX or OpenBLAS thread), so the main thread must notice it while it waits
                # (agent.wait_result); a wait that only woke for the answer fails this test.
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)

        # Python's own SIGINT handler, as a terminal's process has it: a job a shell starts in the background
        # inherits SIGINT ignored (POSIX), and then Python installs none (so this test failed in such runs).
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        waiter = threading.Thread(target=interrupt_once_running, daemon=True)
        waiter.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                tools.call("slow", {}, timeout=30)
            assert sent and time.perf_counter() - sent[0] < 5
        finally:
            waiter.join()
            signal.signal(signal.SIGINT, previous)
        assert wait_for_event(events, "slow cancelled", 5)  # the server was told, not only the caller
        assert tools.call("ping", {}).text == "pong from toolbox 7f3a9c"


# ---- Python tools and the session's tool messages ---------------------------------------------------------------


def test_python_tools():
    def add(a: int, b: float = 1.0, *, note: str = "") -> float:
        """Add two numbers.

        More text."""
        return a + b

    def fails() -> str:
        raise ValueError("nope")

    def sleeps() -> str:
        time.sleep(5)
        return "late"

    tools = PythonTools([add, fails, sleeps])
    assert signature_schema(add) == {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "number"},
                                     "note": {"type": "string"}}, "required": ["a"], "additionalProperties": False}
    assert tools.tools[0]["function"]["description"].startswith("Add two numbers.")
    assert tools.call("add", {"a": 2, "b": 0.5}).text == "2.5"
    assert tools.call("fails", {}).text == "error: ValueError: nope"
    assert tools.call("add", {"c": 1}).status == "error"  # a bad argument is the model's error, not ours
    assert "within 0.2 s" in tools.call("sleeps", {}, timeout=0.2).text


def test_split_tool_calls():
    tools = PythonTools([lambda: None]).tools
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{bad\n</tool_call>'
    content, calls = split_tool_calls(text, tools)
    assert [c.ok for c in calls] == [True, False] and calls[0].arguments == {"x": 1}
    assert content == "Let me check.\n\n<tool_call>\n{bad\n</tool_call>"  # what does not parse stays
    assert split_tool_calls("no calls", tools) == ("no calls", [])
    # The XML form, unwrapped; a block the parser does not take as a call (an unwrapped function beside a
    # wrapped call) is no call and stays in the text; so does an unterminated one.
    xml = "Sure.\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>"
    assert split_tool_calls(xml, tools) == ("Sure.", [split_tool_calls(xml, tools)[1][0]])
    assert split_tool_calls(xml, tools)[1][0].arguments == {"x": "1"}
    mixed = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<function=g>\n</function>'
    content, calls = split_tool_calls(mixed, tools)
    assert [c.name for c in calls] == ["f"] and content == "<function=g>\n</function>"
    content, calls = split_tool_calls('A <tool_call>\n{"name": "f"', tools)
    assert not calls[0].ok and content == 'A <tool_call>\n{"name": "f"'


# ---- the loop on a random-weight model (the grammar makes its calls valid) --------------------------------------


def ping() -> str:
    """Answer with a secret token."""
    return "pong 7f3a9c"


@pytest.mark.parametrize("thinking", [False, True], ids=["no-think", "think"])
def test_agent_calls_a_tool_and_its_result_is_in_the_next_prompt(tiny, thinking):
    """tool_choice required on the first step: a call of the one tool is made, the tool runs, its result is in
    the next step's prompt, and that step prefills only what is new (the cache keeps the conversation)."""
    session = ChatSession(tiny.model, tiny.tokenizer, max_tokens=24, seed=0, enable_thinking=thinking,
                          thinking_budget=6 if thinking else None)
    ran = []
    agent = Agent(session, PythonTools({"ping": lambda: ran.append(1) or ping()}, {"ping": {"type": "object"}}),
                  tool_choice="required", max_steps=1)
    events = list(agent.run("Call ping please."))
    steps = [e for e in events if isinstance(e, StepEvent)]
    calls = [e.call for e in events if isinstance(e, ToolCallEvent)]
    assert [c.name for c in calls] == ["ping"] and ran == [1]
    assert [m["role"] for m in session.messages[:3]] == ["user", "assistant", "tool"]
    assert session.messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "ping", "arguments": {}}}]
    assert "<tool_call>" not in session.messages[1]["content"]
    assert session.messages[2] == {"role": "tool", "content": "pong 7f3a9c"}

    # The second step's prompt is the conversation with the tool's result, rendered by the template ...
    second = prompt_tokens(tiny.tokenizer, session.conversation()[:3], session.options.replace(tool_choice="auto"))
    rendered = tiny.tokenizer.decode(second)
    assert rendered.endswith("<tool_response>\npong 7f3a9c\n</tool_response><|im_end|>\n<|im_start|>assistant\n" +
                             ("" if thinking else "<think>\n\n</think>\n\n"))
    assert session.history[1].kind == "tool" and session.history[1].prompt_tokens == len(second)
    assert session.cached_tokens[: len(second)] == second  # ... and it is what the model read
    # ... of which only the new part was prefilled: the first step's prompt came from the cache (less the empty
    # think block the template drops without thinking), so did the generated call with thinking.
    first, step = session.history
    assert [e.stats for e in steps] == [first, step] and [e.stats.kind for e in steps] == ["user", "tool"]
    assert step.reused_tokens >= first.prompt_tokens - 4
    assert step.prefill_tokens == step.prompt_tokens - step.reused_tokens
    new = len(tiny.tokenizer.encode("<|im_start|>user\n<tool_response>\npong 7f3a9c\n</tool_response><|im_end|>\n"
                                    "<|im_start|>assistant\n<think>\n\n</think>\n\n"))
    assert step.prefill_tokens <= new + first.generation_tokens + 4
    assert step.prefill_tokens < step.prompt_tokens / 3


def test_declined_failed_and_always_calls_go_back_as_results(tiny):
    asked = []
    answers = iter(["n", "a"])

    def confirm(call):
        asked.append(call.name)
        return next(answers)

    def explode() -> str:
        """Always fails."""
        raise RuntimeError("exploded")

    session = ChatSession(tiny.model, tiny.tokenizer, max_tokens=16, seed=0, enable_thinking=False)
    agent = Agent(session, PythonTools([explode]), confirm=confirm, tool_choice="explode", max_steps=1)
    for _ in range(3):
        results = [e.result for e in agent.run("Go") if isinstance(e, ToolResultEvent)]
        assert results and results[0].status in ("declined", "error")
    tool_messages = [m["content"] for m in session.messages if m["role"] == "tool"]
    assert tool_messages[0] == "the user declined to run this tool call"
    assert tool_messages[1] == tool_messages[2] == "error: RuntimeError: exploded"
    assert asked == ["explode", "explode"]  # "always": not asked again


def test_step_limit_ends_the_loop_saying_so(tiny):
    session = ChatSession(tiny.model, tiny.tokenizer, max_tokens=16, seed=0, enable_thinking=False)
    agent = Agent(session, PythonTools([ping]), tool_choice="ping", max_steps=0)
    events = list(agent.run("Go"))
    assert isinstance(events[-1], LimitEvent) and events[-1].calls[0].name == "ping"
    assert session.messages[-1]["content"].startswith("not run: the limit of 0 tool steps")
    assert not any(isinstance(e, ToolCallEvent) for e in events)


def test_ctrl_c_in_a_tool_keeps_the_turn(tiny):
    def interrupted() -> str:
        """Stands for a tool the user stops."""
        raise KeyboardInterrupt

    session = ChatSession(tiny.model, tiny.tokenizer, max_tokens=16, seed=0, enable_thinking=False)
    agent = Agent(session, PythonTools([interrupted]), tool_choice="interrupted")
    agent.runner.call = lambda name, args, timeout: interrupted()  # raised in the chat's thread, as Ctrl-C is
    events = list(agent.run("Go"))
    assert isinstance(events[-1], ToolResultEvent) and events[-1].result.status == "cancelled"
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool"]
    assert agent.ask("And now?") is not None  # the conversation goes on


def test_agent_over_mcp_time_server(tiny, mark):
    """The library with a registry server: the model (held to get_current_time) calls it, the server answers."""
    with McpTools() as tools:
        tools.start({"mcpServers": {"time": time_server(mark)}})
        session = ChatSession(tiny.model, tiny.tokenizer, max_tokens=40, seed=1, temperature=0.7,
                              enable_thinking=False)
        agent = Agent(session, tools, tool_choice="get_current_time", max_steps=1)
        results = [e for e in agent.run("What time is it?") if isinstance(e, ToolResultEvent)]
        assert results and results[0].call.name == "get_current_time"
        result = results[0].result
        assert result.text == session.messages[2]["content"]  # the server's answer went back to the model
        # The random model's timezone argument is noise: the server either answers for it or says it is invalid.
        if result.status == "ok":
            assert json.loads(result.text)["timezone"]
        else:
            assert result.status == "error" and "Invalid timezone" in result.text, result.text


# ---- the command line ---------------------------------------------------------------------------------------


def chat_args(path, config, *args):
    return [sys.executable, "-m", "qwen3_mlx", "chat", str(path), "--mcp", str(config), "--no-think", *args]


def test_chat_through_a_pipe_runs_mcp_tools(tiny, tmp_path, mark):
    config = write_config(tmp_path / "servers.json", {
        "box": toolbox(mark, "--tools", "ping,add"), "time": time_server(mark), "broken": {"command": "/nonexistent"}})
    script = f"Ping the box\n/tools\n/save {tmp_path / 'c.json'}\n"
    proc = subprocess.run(chat_args(tiny.path, config, "--yes", "--tool-choice", "ping", "--max-tokens", "20",
                                    "--seed", "0"), input=script, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stdout + proc.stderr
    assert "MCP server 'broken' failed to start" in proc.stderr
    assert "MCP: 4 tools from 2 servers" in proc.stderr
    assert "tool call: ping {}\ntool result: ping: pong from toolbox 7f3a9c\n" in proc.stdout
    assert "ping [box]: Answer with a token" in proc.stdout and "get_current_time [time]" in proc.stdout
    assert proc.stderr.count("prefilled") >= 2  # the call's step, then the next one's
    saved = json.loads((tmp_path / "c.json").read_text())["messages"]
    assert [m["role"] for m in saved][:3] == ["user", "assistant", "tool"] and saved[-1]["role"] == "assistant"
    assert saved[2]["content"] == "pong from toolbox 7f3a9c"


def test_chat_error_stops_the_servers(tiny, tmp_path, mark):
    config = write_config(tmp_path / "servers.json", {"box": toolbox(mark, "--tools", "ping")})
    proc = subprocess.run(chat_args(tiny.path, config, "--tool-choice", "nosuch"), input="", capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: tool_choice names 'nosuch', which is not among "
                                                           "the tools (ping)")


@contextmanager
def chat_in_pty(args):
    env = dict(os.environ, TERM="xterm", NO_COLOR="")
    child = pexpect.spawn(args[0], args[1:], env=env, encoding="utf-8", timeout=60, dimensions=(40, 120))
    child.logfile_read = io.StringIO()
    try:
        expect(child, ">>> ")
        yield child
    finally:
        child.close(force=True)


def expect(child, pattern):
    try:
        return child.expect_exact(pattern)
    except (pexpect.TIMEOUT, pexpect.EOF) as e:
        seen = child.logfile_read.getvalue()
        pytest.fail(f"the chat did not print {pattern!r} ({type(e).__name__}); the last 2000 characters:\n"
                    f"{seen[-2000:]}", pytrace=False)


def test_chat_in_a_pty_asks_before_running_a_tool(tiny, tmp_path, mark):
    """On a terminal: the call in a panel and a question; y runs it, a (always) runs it and does not ask again."""
    config = write_config(tmp_path / "servers.json", {"box": toolbox(mark, "--tools", "ping,add")})
    with chat_in_pty(chat_args(tiny.path, config, "--tool-choice", "ping", "--max-tokens", "20", "--seed", "0",
                               "--max-tool-steps", "1")) as child:
        for answer in ("y", "a"):
            child.sendline("Use a tool")
            expect(child, "tool call: ping")
            expect(child, "run ping? [y]es / [n]o / [a]lways: ")
            child.sendline(answer)
            expect(child, "tool result: ping: pong from toolbox 7f3a9c")
            expect(child, ">>> ")
        child.sendline("Once more")
        expect(child, "tool result: ping: pong from toolbox 7f3a9c")
        expect(child, ">>> ")
        seen = child.logfile_read.getvalue()
        assert seen.count("[y]es / [n]o / [a]lways") == 2 and "╭" in seen and "╰" in seen  # rich panels
        child.sendline("/tools")
        expect(child, "add [box]: Add two digits.")
        expect(child, ">>> ")
        assert len(marked_processes(mark)) == 1
        child.sendeof()
        expect(child, pexpect.EOF)
        child.close()
        assert child.exitstatus == 0


@pytest.mark.slow  # the library-level Ctrl-C test covers the cancellation; this one adds the pty
def test_ctrl_c_in_the_chat_cancels_a_running_tool(tiny, tmp_path, mark):
    events = tmp_path / "events"
    config = write_config(tmp_path / "servers.json", {"box": toolbox(mark, "--tools", "slow", "--events", str(events))})
    with chat_in_pty(chat_args(tiny.path, config, "--tool-choice", "slow", "--max-tokens", "20", "--seed", "0",
                               "--max-tool-steps", "1")) as child:
        child.sendline("Take your time")
        expect(child, "run slow? [y]es / [n]o / [a]lways: ")
        child.sendline("y")
        assert wait_for_event(events, "slow started")  # the call is running (it sleeps a minute)
        child.sendintr()
        expect(child, "tool cancelled: slow")
        expect(child, ">>> ")
        assert wait_for_event(events, "slow cancelled", 5)
        child.sendline("/quit")
        expect(child, pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
