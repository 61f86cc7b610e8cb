"""Chat: cache reuse across turns (checked against a fresh prefill), the session, and the real `qwen3-mlx chat`
driven in a pseudo-terminal and through a pipe."""

import io
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pexpect
import pytest
from test_generate import END_THINK, IM_END, THINK, ScriptedModel

from qwen3_mlx.chat import ChatSession
from qwen3_mlx.models.cache import common_prefix_length
from qwen3_mlx.loader import load
from qwen3_mlx.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path = tiny_checkpoint
    model, tokenizer = load(path)
    return SimpleNamespace(path=path, model=model, tokenizer=tokenizer)


def test_reused_cache_gives_fresh_prefill_logits(tiny):
    """Turn 1 leaves thinking in the cache; turn 2's template drops it. Trimming to the common prefix and
    prefilling the rest must give the next-token logits of a fresh prefill of the whole conversation."""
    tok, model = tiny.tokenizer, tiny.model
    session = ChatSession(model, tok, system="You are helpful.")
    first = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "What is 2+2?"}]
    ids, reused = session.prepare(first)
    assert reused == 0
    # As if the model had generated reasoning and an answer (all fed back into the cache but the last token).
    generated = tok.encode("<think>\nSimple arithmetic.\n</think>\n\n2 + 2 = 4.") + [IM_END]
    model(mx.array(ids + generated[:-1])[None], session.cache)
    session.cached_tokens = ids + generated[:-1]
    session.messages = first[1:] + [{"role": "assistant", "content": "2 + 2 = 4.", "reasoning_content": "Simple arithmetic."}]

    second = session.conversation() + [{"role": "user", "content": "And 3+3?"}]
    full, reused = session.prepare(second)
    assert full == tok.encode(tok.apply_chat_template(second))
    assert 0 < reused < len(ids) + 2  # the prefix stops where the thinking was dropped
    assert session.cache[0].offset == reused
    assert tok.decode(full[:reused]).endswith("<|im_start|>assistant\n")
    reused_logits = model(mx.array(full[reused:])[None], session.cache)[0, -1]
    fresh_logits = model(mx.array(full)[None])[0, -1]
    np.testing.assert_allclose(np.array(reused_logits), np.array(fresh_logits), rtol=1e-4, atol=1e-4)
    assert int(mx.argmax(reused_logits)) == int(mx.argmax(fresh_logits))


def test_turns_reuse_the_cache_and_match_fresh_generation(tiny):
    """Greedy turns through the session equal greedy generation from scratch on the same conversation."""
    from qwen3_mlx.generate import generate

    session = ChatSession(tiny.model, tiny.tokenizer, temperature=0, max_tokens=6, enable_thinking=False)
    for i, question in enumerate(["Hi there", "Tell me more", "Thanks"]):
        tokens = [r.token for r in session.send(question)]
        expected = generate(tiny.model, tiny.tokenizer, session.conversation()[:-1], temperature=0, max_tokens=6,
                            enable_thinking=False)
        assert tokens == expected.tokens
        stats = session.history[-1]
        assert stats.prefill_tokens + stats.reused_tokens == stats.prompt_tokens
        if i:
            # everything before the previous turn's empty "<think>\n\n</think>\n\n" (4 tokens the template drops)
            assert stats.reused_tokens >= session.history[i - 1].prompt_tokens - 4


def test_interrupted_turn_keeps_partial_answer(tiny):
    session = ChatSession(tiny.model, tiny.tokenizer, temperature=0, max_tokens=50, enable_thinking=False)
    stream = session.send("Hello")
    texts = [next(stream).text for _ in range(4)]
    stream.close()
    assert session.messages[-1] == {"role": "assistant", "content": "".join(texts).lstrip("\n")}
    assert session.history[-1].finish_reason == "interrupted" and session.history[-1].generation_tokens == 4
    # the cache holds exactly the prompt and the tokens fed back (the last sampled one is never fed)
    assert all(c.offset == len(session.cached_tokens) for c in session.cache)
    list(session.send("Go on"))  # the conversation continues
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_reasoning_is_separated_and_dropped_from_history(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    hmm, ok = tok.encode(" hmm")[0], tok.encode("ok")[0]

    def rule(fed):
        tail = fed[fed.index(THINK) :] if THINK in fed else []
        if fed[-1] == IM_END or (tail and tail.count(ok) >= 2):
            return IM_END
        if END_THINK in tail:
            return ok
        if THINK in tail:
            return hmm if tail.count(hmm) < 3 else END_THINK
        return THINK

    model = ScriptedModel(rule)
    model.layers = [None, None]
    session = ChatSession(model, tok)
    list(session.send("Q1"))
    assert session.last_reasoning == " hmm hmm hmm"
    assert session.messages[-1] == {"role": "assistant", "content": "okok", "reasoning_content": " hmm hmm hmm"}
    assert session.history[-1].reasoning_tokens == 5  # <think>, 3 x hmm, </think>
    rendered = tok.apply_chat_template(session.conversation() + [{"role": "user", "content": "Q2"}])
    assert "hmm" not in rendered and "okok" in rendered


def test_save_load_roundtrip(tiny, tmp_path):
    session = ChatSession(tiny.model, tiny.tokenizer, system="Sys", temperature=0, max_tokens=3, thinking_budget=7)
    list(session.send("Hello"))
    session.save(tmp_path / "c.json")
    other = ChatSession(tiny.model, tiny.tokenizer)
    other.load(tmp_path / "c.json")
    assert other.conversation() == session.conversation() and other.options.thinking_budget == 7
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "wizard"}]}')
    with pytest.raises(Exception, match="does not hold a conversation"):
        other.load(tmp_path / "bad.json")
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2


# ---- the real command line -------------------------------------------------------------------------------------


def sigint_state(pid: int) -> str:
    """How process `pid` treats SIGINT, read from /proc: pending, blocked, ignored, caught."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError as e:
        return f"SIGINT state unknown ({e})"
    names = {"SigPnd": "pending", "ShdPnd": "pending (process)", "SigBlk": "blocked", "SigIgn": "ignored",
             "SigCgt": "caught"}
    masks = {k: int(v, 16) for k, _, v in (line.partition(":\t") for line in status.splitlines()) if k in names}
    bit = 1 << (signal.SIGINT - 1)
    return "SIGINT " + ", ".join(f"{name} {'yes' if masks.get(k, 0) & bit else 'no'}" for k, name in names.items())


def expect(child, pattern, exact: bool = False):
    """child.expect(pattern), failing with what the chat printed so far and how it treats SIGINT."""
    try:
        if exact:
            return child.expect_exact(pattern)
        return child.expect(pattern, searchwindowsize=4000)  # an unbounded stream is not searched from its start
    except (pexpect.TIMEOUT, pexpect.EOF) as e:
        seen = child.logfile_read.getvalue()
        state = "exited" if isinstance(e, pexpect.EOF) else sigint_state(child.pid)
        pytest.fail(f"the chat did not print {pattern!r} within {child.timeout} s ({type(e).__name__}; {state}); "
                    f"it printed {len(seen)} characters, the last 2000:\n{seen[-2000:]}", pytrace=False)


def foreground_job():
    """SIGINT as a shell's foreground job gets it: default, not blocked."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def background_job():
    """SIGINT as a shell without job control starts a background job (`python -m pytest &` in a script, which
    every process the tests start then inherits): ignored; blocked as well, as a parent may leave it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


@contextmanager
def chat_in_pty(path, *args, preexec_fn=None):
    """`qwen3-mlx chat` in a pseudo-terminal, at its first prompt; killed on the way out, failed test or not."""
    env = dict(os.environ, TERM="xterm", NO_COLOR="")
    child = pexpect.spawn(
        sys.executable, ["-m", "qwen3_mlx", "chat", str(path), *args], env=env, encoding="utf-8", timeout=60,
        dimensions=(40, 120), preexec_fn=preexec_fn,
    )
    child.logfile_read = io.StringIO()
    try:
        expect(child, "/help for commands")
        expect(child, ">>> ", exact=True)
        yield child
    finally:
        child.close(force=True)


def test_chat_in_a_pty(tiny, tmp_path):
    with chat_in_pty(tiny.path, "--max-tokens", "6", "--seed", "0", "--no-think") as child:
        child.sendline("Hello!")
        expect(child, r"6 tokens, [\d.]+ tok/s, first token [\d.]+ s "
                      r"\(prefilled \d+ of \d+ prompt tokens\), peak memory")
        expect(child, ">>> ", exact=True)
        child.sendline("Tell me \\")  # a trailing backslash continues the message
        expect(child, "... ", exact=True)
        child.sendline("more")
        expect(child, r"prefilled (\d+) of (\d+) prompt tokens")
        prefilled, total = map(int, child.match.groups())
        assert prefilled < total  # the first turn came from the cache
        for command, reply in [
            ("/help", "/budget N|off"),
            ("/think", "thinking on"),
            ("/no_think", "thinking off"),
            ("/budget 12", "thinking budget 12"),
            ("/budget off", "thinking budget off"),
            ("/budget soon", "usage: /budget N"),
            ("/system Be terse.", "system prompt set"),
            ("/show", "no reasoning"),
            ("/stats", "turn 2: prompt"),
            ("/frobnicate", "unknown command /frobnicate"),
            ("/save", "usage: /save FILE"),
            (f"/save {tmp_path / 'conv.json'}", "saved to"),
        ]:
            expect(child, ">>> ", exact=True)
            child.sendline(command)
            expect(child, reply, exact=True)
        saved = json.loads((tmp_path / "conv.json").read_text())
        assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2
        assert saved["messages"][2]["content"] == "Tell me \nmore" and saved["system"] == "Be terse."
        expect(child, ">>> ", exact=True)
        child.sendline("/reset")
        expect(child, "conversation cleared", exact=True)
        expect(child, ">>> ", exact=True)
        child.sendline(f"/load {tmp_path / 'conv.json'}")
        expect(child, "loaded 4 messages", exact=True)
        expect(child, ">>> ", exact=True)
        child.sendline("/quit")
        expect(child, pexpect.EOF)
        child.close()
        assert child.exitstatus == 0


@pytest.mark.parametrize("started_as", [foreground_job, background_job], ids=["foreground", "background"])
def test_ctrl_c_stops_answer_and_keeps_turn(tiny, tmp_path, started_as):
    """Ctrl-C stops a 100,000-token answer, also when the chat was started with SIGINT ignored and blocked (it
    was ignored then, and the answer streamed on)."""
    args = ["--max-tokens", "100000", "--no-think", "--temperature", "1.5", "--top-k", "0", "--top-p", "1",
            "--seed", "0"]
    with chat_in_pty(tiny.path, *args, preexec_fn=started_as) as child:
        child.sendline("Write forever")
        expect(child, "Write forever\r\n", exact=True)  # the echo: what follows is the answer
        expect(child, r"\S{10}")  # the answer is streaming
        child.sendintr()
        expect(child, r"\(interrupted\)")
        expect(child, ">>> ", exact=True)
        child.sendline(f"/save {tmp_path / 'c.json'}")
        expect(child, "saved to", exact=True)
        saved = json.loads((tmp_path / "c.json").read_text())
        assert saved["messages"][1]["role"] == "assistant" and saved["messages"][1]["content"]
        expect(child, ">>> ", exact=True)
        child.sendintr()  # at the prompt: a hint, not an exit
        expect(child, "Ctrl-D or /quit", exact=True)
        expect(child, ">>> ", exact=True)
        child.sendeof()
        expect(child, pexpect.EOF)
        child.close()
        assert child.exitstatus == 0


def test_chat_through_a_pipe(tiny):
    script = "Hello\n/no_think\nSecond\n/stats\n/nope\n"
    proc = subprocess.run(
        [sys.executable, "-m", "qwen3_mlx", "chat", str(tiny.path), "--max-tokens", "5", "--temperature", "0"],
        input=script, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stdout + proc.stderr  # no colours, no cursor movement
    assert ">>>" not in proc.stdout
    assert proc.stderr.count("5 tokens,") == 2 and "turn 2: prompt" in proc.stderr and "unknown command /nope" in proc.stderr


def scripted_thinking_session(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    hmm, ok = tok.encode(" hmm")[0], tok.encode("ok")[0]

    def rule(fed):
        tail = fed[len(fed) - fed[::-1].index(THINK) - 1 :] if THINK in fed else []
        if tail and tail.count(ok) >= 2:
            return IM_END
        if END_THINK in tail:
            return ok
        if tail:
            return hmm if tail.count(hmm) < 3 else END_THINK
        return THINK

    return ChatSession(ScriptedModel(rule), tok)


@pytest.mark.parametrize("interactive", [False, True])
def test_reasoning_view_folds_to_summary(tokenizer_dir, interactive, capsys):
    from qwen3_mlx.cli.chat import Terminal, handle_command, run_turn

    session = scripted_thinking_session(tokenizer_dir)
    term = Terminal(interactive)
    term.colour = interactive
    run_turn(session, term, "Q1")
    out = capsys.readouterr().out
    assert "thought for 5 tokens" in out and out.rstrip().endswith("okok")
    if interactive:
        assert "thinking" in out and " hmm hmm hmm" in out  # streamed live, dimmed
        assert "\x1b[J" in out  # then erased and replaced by the summary
        assert out.index("\x1b[J") < out.index("thought for")
    else:
        assert "hmm" not in out and "\x1b" not in out  # plain lines: only the summary
    handle_command(session, term, "/show")
    assert "hmm hmm hmm" in capsys.readouterr().out


def test_layers_left_uneven_by_an_interrupt_realign(tiny):
    """Ctrl-C while a forward graph is built can leave early layers one position ahead; the next turn must
    bring every layer back to the same length and still match a fresh prefill."""
    session = ChatSession(tiny.model, tiny.tokenizer, temperature=0, max_tokens=5, enable_thinking=False)
    list(session.send("Hello"))
    k, v = session.cache[0].state
    session.cache[0].update_and_fetch(k[..., -1:, :], v[..., -1:, :])  # layer 0 got one stray position
    assert session.cache[0].offset == session.cache[1].offset + 1
    ids, reused = session.prepare(session.conversation() + [{"role": "user", "content": "More"}])
    assert len({c.offset for c in session.cache}) == 1 and session.cache[0].offset == reused
    rest = mx.array(ids[reused:])[None]
    reused_logits = tiny.model(rest, session.cache)[:, -1]
    fresh = tiny.model(mx.array(ids)[None])[:, -1]
    np.testing.assert_allclose(np.array(reused_logits), np.array(fresh), atol=1e-4)
