"""A tiny MCP server over stdio, written with the official `mcp` SDK, for tests/test_agentic_mcp.py.

    python tests/mcp_server.py            add, shout, city_fact, crash (exits the process: dies mid-episode)
    python tests/mcp_server.py --broken   exits before speaking MCP (fails to start)
"""

import os
import sys

if "--broken" in sys.argv:
    print("this server refuses to start", file=sys.stderr)
    sys.exit(3)

try:  # mcp >= 2
    from mcp.server.mcpserver import MCPServer as Server
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as Server

server = Server("k2-test-tools")
CITIES = {"Oslo": "Norway", "Lima": "Peru", "Kyoto": "Japan"}


@server.tool()
def add(a: int, b: int) -> str:
    """Add two integers."""
    return f"sum={a + b}"


@server.tool()
def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


@server.tool()
def crash() -> str:
    """Stop the server (a tool whose server dies mid-call)."""
    os._exit(7)


if __name__ == "__main__":
    server.run()
