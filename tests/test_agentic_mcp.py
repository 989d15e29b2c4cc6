"""k2 agentic --mcp: a real MCP server (tests/mcp_server.py, written with the `mcp` SDK) started over
stdio as a subprocess; its tools are listed, called during trajectory generation, and recorded.
A server that dies mid-episode fails those episodes (counted) and the run goes on; a server that
does not start leaves the synthetic data intact and says why."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("mcp", reason="the mcp package is not installed (pip install 'k2cli[agentic]')")

SERVER = Path(__file__).parent / "mcp_server.py"
COMMAND = f"{sys.executable} {SERVER}"


@pytest.fixture
def synth(k2):
    k2("data", "synth", "--preset", "micro")


def _rows(art):
    import datasets

    return list(datasets.load_from_disk(str(art.path / "chat")))


def test_real_mcp_tools_are_called_and_recorded(synth, k2):
    from k2cli.artifacts import open_artifact

    k2("agentic", "synth:latest", "--preset", "micro", "--mcp", COMMAND, "--set", "agents.count=4", "--set", "agents.test_count=2")
    art = open_artifact("agentic:latest", kind="dataset")
    m = art.metrics
    assert m["tools_mcp"] == 3 and m["kept_mcp"] >= 3 and m["mcp_calls_ok"] >= 4
    tools = json.loads((art.path / "tools.json").read_text())["tools"]
    mcp_specs = {t["spec"]["function"]["name"]: t for t in tools if t["source"] == "mcp"}
    assert set(mcp_specs) == {"add", "shout", "crash"}
    assert mcp_specs["add"]["spec"]["function"]["parameters"]["required"] == ["a", "b"]
    rows = [r for r in _rows(art) if r["tool_source"] == "mcp"]
    add = next(r for r in rows if "functions.add:0" in r["messages"])
    messages = json.loads(add["messages"])
    call = messages[2]["tool_calls"][0]["function"]["arguments"]
    result = messages[3]["content"]
    assert result == f"sum={call['a'] + call['b']}"  # the real server computed it
    assert result in messages[-1]["content"]
    shout = next(r for r in rows if "functions.shout:0" in r["messages"])
    said = json.loads(shout["messages"])[2]["tool_calls"][0]["function"]["arguments"]["text"]
    assert said.upper() in shout["messages"]
    # the crash tool kills the server mid-episode: those episodes fail with a reason, the run goes on
    assert m["rejected_mcp_error"] >= 1 and m["mcp_errors"] >= 1 and m["kept"] > m["kept_mcp"]
    tasks = [json.loads(line) for line in (art.path / "tasks.jsonl").read_text().splitlines()]
    assert any(t["tool_source"] == "mcp" and t["rubric"]["reply_contains_result"] for t in tasks)


def test_an_mcp_server_that_fails_to_start(synth, k2):
    from k2cli.artifacts import open_artifact

    k2("agentic", "synth:latest", "--preset", "micro", "--mcp", f"{COMMAND} --broken", "--set", "agents.count=3",
       "--set", "agents.test_count=0", "--set", "mcp.start_timeout_s=20")
    art = open_artifact("agentic:latest", kind="dataset")
    assert art.metrics["tools_mcp"] == 0 and art.metrics["kept"] > 0
    assert "did not start" in art.metrics["mcp_error"] and "refuses to start" in art.metrics["mcp_error"]
    assert "MCP:" in (art.path / "summary.md").read_text()
