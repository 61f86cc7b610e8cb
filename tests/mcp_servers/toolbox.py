"""A small stdio MCP server for the agent tests (the official SDK's MCPServer): a tool that works, one that
raises, one that sleeps past any sensible timeout, and one that reports an error result.

`python toolbox.py [--name NAME] [--tools a,b] [--pidfile FILE] [--events FILE] [--http PORT]`: stdio by default;
`--tools` offers only these tools; `--pidfile` appends this process's pid (the tests check that no server outlives
the chat); `--events` appends "slow started" when a call of `slow` is running here and "slow cancelled" when
the client cancels it (a test interrupts the call only once it runs, and sees the cancellation arrive); `--http
PORT` serves streamable HTTP instead.
"""

import argparse
import os
from typing import Annotated

import anyio
from mcp.server.mcpserver import MCPServer
from pydantic import Field

Digit = Annotated[int, Field(ge=0, le=9)]  # small bounds keep a random model's arguments short


def build(name: str, only: set[str] | None = None, events: str | None = None) -> MCPServer:
    app = MCPServer(name)

    def note(event: str) -> None:
        if events:
            with open(events, "a") as f:
                f.write(f"{event}\n")

    def tool(fn):
        return app.tool()(fn) if only is None or fn.__name__ in only else fn

    @tool
    def add(a: Digit, b: Digit) -> int:
        """Add two digits."""
        return a + b

    @tool
    def ping() -> str:
        """Answer with a token only this server knows."""
        return f"pong from {name} 7f3a9c"

    @tool
    def explode() -> str:
        """A tool that always raises."""
        raise RuntimeError("exploded on purpose")

    @tool
    async def slow() -> str:
        """Sleep for a minute, then answer."""
        note("slow started")
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            note("slow cancelled")
            raise
        return "done"

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="toolbox")
    parser.add_argument("--tools")
    parser.add_argument("--pidfile")
    parser.add_argument("--events")
    parser.add_argument("--http", type=int)
    args = parser.parse_args()
    if args.pidfile:
        with open(args.pidfile, "a") as f:
            f.write(f"{os.getpid()}\n")
    app = build(args.name, set(args.tools.split(",")) if args.tools else None, args.events)
    if args.http:
        app.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        app.run()


if __name__ == "__main__":
    main()
