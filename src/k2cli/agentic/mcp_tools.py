"""Real tools over MCP (Model Context Protocol), with the official `mcp` SDK, over stdio.

    server = McpServer("python my_server.py --flag")   # the command line of a stdio MCP server
    tools = server.start()      # starts the process, initialises the session, lists its tools
    server.call(name, args)     # a real call; the text it returned (or {"error": ...})
    server.close()

The SDK is asynchronous; k2's episode loop is not. One daemon thread runs an asyncio loop with
a single task that owns the whole session (anyio scopes must be left by the task that entered
them) and serves calls from a queue; `call` waits on a future with a timeout.

A server that does not start raises McpFailure with what it wrote on stderr. A server that dies
mid-run makes the calls in flight fail with McpFailure (the episode is marked failed, the run
goes on), and the next call restarts it, at most `max_restarts` times.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shlex
import tempfile
import threading

from k2cli.agentic.simulators import McpFailure
from k2cli.agentic.tools import Tool, external_tool
from k2cli.errors import K2Error


def have_mcp() -> bool:
    try:
        import mcp  # noqa: F401
        from mcp.client.stdio import stdio_client  # noqa: F401
    except ImportError:
        return False
    return True


def _field(obj, *names, default=None):
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


def compact_description(text: str | None, limit: int = 80) -> str:
    """The first sentence, at most `limit` characters: tool declarations share a small context."""
    text = " ".join((text or "").split())
    first = text.split(". ")[0].rstrip(".")
    return (first if len(first) <= limit else first[: limit - 3] + "...") + ("." if first else "")


def strip_titles(schema):
    """Drop the `title` annotations SDKs add to every schema ("addArguments", "A"): they cost tokens
    and say nothing. A *property* named title is kept."""
    if isinstance(schema, list):
        return [strip_titles(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "title" and isinstance(v, str):
            continue
        if k in ("properties", "$defs", "definitions", "patternProperties") and isinstance(v, dict):
            out[k] = {name: strip_titles(sub) for name, sub in v.items()}
        else:
            out[k] = strip_titles(v) if isinstance(v, (dict, list)) else v
    return out


class McpServer:
    def __init__(self, command: str, timeout_s: float = 10.0, start_timeout_s: float = 30.0, max_restarts: int = 2):
        if not have_mcp():
            raise K2Error("--mcp needs the mcp package", "pip install 'k2cli[agentic]' (or pip install mcp)")
        self.command = command
        self.argv = shlex.split(command)
        if not self.argv:
            raise K2Error("--mcp got an empty command", 'pass the server\'s command line, e.g. --mcp "python server.py"')
        self.timeout_s, self.start_timeout_s, self.max_restarts = timeout_s, start_timeout_s, max_restarts
        self.restarts = 0
        self.specs: list[dict] = []
        self.invalid: list[str] = []  # tools whose schema failed validation: "name: problem"
        self._loop = None
        self._queue = None
        self._thread = None
        self._dead: BaseException | None = None
        self._errlog = tempfile.TemporaryFile(mode="w+")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> list[dict]:
        """Start the server and list its tools as OpenAI function specs (invalid ones are skipped and noted)."""
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._dead = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(ready)), daemon=True, name="k2-mcp")
        self._thread.start()
        try:
            raw = ready.result(timeout=self.start_timeout_s)
        except concurrent.futures.TimeoutError:
            self._stop()
            raise McpFailure(f"the MCP server '{self.command}' did not answer within {self.start_timeout_s:g} s{self._stderr_tail()}")
        except Exception as e:  # noqa: BLE001 - the SDK raises many kinds; all mean "did not start"
            raise McpFailure(f"the MCP server '{self.command}' did not start: {_describe(e)}{self._stderr_tail()}") from None
        self.specs, self.invalid = [], []
        for t in raw:
            params = strip_titles(_field(t, "input_schema", "inputSchema") or {"type": "object", "properties": {}})
            spec = {"type": "function", "function": {"name": _field(t, "name"), "description": compact_description(_field(t, "description")),
                                                     "parameters": params}}
            try:
                from k2cli.agentic.tools import validate_spec

                validate_spec(spec)
                self.specs.append(spec)
            except K2Error as e:
                self.invalid.append(e.message)
        return self.specs

    def tools(self) -> list[Tool]:
        return [external_tool(s, "mcp", self._runner(s["function"]["name"])) for s in self.specs]

    def _runner(self, name: str):
        return lambda args: self.call(name, args)

    def close(self) -> None:
        self._stop()
        try:
            self._errlog.close()
        except OSError:
            pass

    def _stop(self) -> None:
        if self._loop is not None and self._queue is not None and self._dead is None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, None)
            except RuntimeError:  # the loop is already closed
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._thread = None

    def _stderr_tail(self) -> str:
        try:
            self._errlog.flush()
            self._errlog.seek(0)
            tail = " ".join(self._errlog.read().strip().splitlines()[-3:])
        except (OSError, ValueError):
            return ""
        return f"; its stderr: {tail[-300:]}" if tail else ""

    async def _main(self, ready: concurrent.futures.Future):
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        params = StdioServerParameters(command=self.argv[0], args=self.argv[1:], env=dict(os.environ))
        try:
            async with stdio_client(params, errlog=self._errlog) as streams:
                read, write = streams[0], streams[1]
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    listed = await session.list_tools()
                    ready.set_result(list(_field(listed, "tools", default=[])))
                    while True:
                        item = await self._queue.get()
                        if item is None:
                            break
                        name, args, fut = item
                        try:
                            res = await asyncio.wait_for(session.call_tool(name, args), self.timeout_s)
                            fut.set_result(res)
                        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                            # a tool's own failure comes back as a result with is_error; an exception
                            # means the connection broke or the server hung: this session is over
                            if not fut.done():
                                fut.set_exception(e)
                            self._dead = e
                            if isinstance(e, asyncio.CancelledError):
                                raise
                            break
        except BaseException as e:  # noqa: BLE001 - the server died or never started
            self._dead = e
            if not ready.done():
                ready.set_exception(e)
        finally:
            self._dead = self._dead or RuntimeError("the MCP session ended")
            while self._queue is not None and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is not None and not item[2].done():
                    item[2].set_exception(McpFailure("the MCP server is gone"))

    # ------------------------------------------------------------------ calls

    def call(self, name: str, args: dict):
        """One real call: the text the tool returned, or {"error": ...} when the tool reported one.
        Raises McpFailure when the server is gone (after trying to restart it)."""
        if self._dead is not None:
            if self.restarts >= self.max_restarts:
                raise McpFailure(f"the MCP server died ({_describe(self._dead)}) and was restarted {self.restarts} times")
            self.restarts += 1
            self._stop()
            self.start()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (name, args, fut))
        except RuntimeError:
            raise McpFailure("the MCP server's session is closed") from None
        try:
            res = fut.result(timeout=self.timeout_s + 5)
        except concurrent.futures.TimeoutError:
            raise McpFailure(f"no answer to {name} within {self.timeout_s:g} s")
        except McpFailure:
            raise
        except asyncio.TimeoutError:
            raise McpFailure(f"no answer to {name} within {self.timeout_s:g} s")
        except Exception as e:  # noqa: BLE001 - connection closed, server died mid-call
            raise McpFailure(f"the call failed: {_describe(e)}") from None
        text = "\n".join(_field(b, "text", default="") or "" for b in (_field(res, "content", default=[]) or [])
                         if _field(b, "type", default="text") == "text").strip()
        if not text:
            structured = _field(res, "structured_content", "structuredContent")
            text = str(structured) if structured is not None else ""
        if _field(res, "is_error", "isError", default=False):
            return {"error": text or "the tool reported an error"}
        return text


def _describe(e: BaseException) -> str:
    """One line for an exception, looking inside exception groups (anyio task groups raise them)."""
    inner = getattr(e, "exceptions", None)
    if inner:
        return _describe(inner[0])
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
