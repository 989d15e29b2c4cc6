"""k2 agentic: tool generation and validation, tasks and rubrics, simulators, the planner, the judge,
the stage end to end (micro), bad input, the OpenAI-compatible agent, and the agentic eval suite."""

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import assert_clean_error
from k2cli.agentic.episode import new_episode, run_episodes
from k2cli.agentic.judge import judge_episode
from k2cli.agentic.policies import PlannerPolicy, from_openai_message
from k2cli.agentic.simulators import SimConfig, ToolSimulator
from k2cli.agentic.synthesis import TaskConfig, estimate_tokens, plan_tasks
from k2cli.agentic.tasks import TEMPLATES_BY_NAME, make_task
from k2cli.agentic.toolgen import ToolGenConfig, generate_tools
from k2cli.agentic.tools import BASE_OPS, Env, Tool, WorldTables, base_tool, validate_spec
from k2cli.agentic.agents import AgentConfig
from k2cli.data.chat import ParsedTurn, validate_conversation
from k2cli.data.world import build_world
from k2cli.errors import K2Error

WORLD = build_world(40, seed=0)
TABLES = WorldTables(WORLD, 0)

EXAMPLE = {  # base arguments that succeed on the seed-0 world of 40 people
    "find_person": {"name": WORLD.people[0].name}, "get_contact": {"person_id": WORLD.people[0].id},
    "find_company": {"name": WORLD.companies[0].name}, "city_info": {"city": "Oslo"},
    "get_account": {"name": WORLD.people[1].name}, "get_balance": {"account": WORLD.people[1].account_id},
    "transfer": {"from_account": WORLD.people[1].account_id, "to_account": WORLD.people[2].account_id, "amount": 10},
    "book_meeting": {"person_id": WORLD.people[3].id, "city": "Lima", "date": "2031-01-02"},
    "list_meetings": {"person_id": WORLD.people[3].id}, "cancel_meeting": {"meeting_id": "M0001"},
    "check_stock": {"product": "notebook"}, "place_order": {"product": "notebook", "quantity": 1, "customer": WORLD.people[4].name},
    "order_status": {"order_id": "R0001"}, "days_between": {"start": "2025-01-01", "end": "2025-03-01"},
    "add_days": {"date": "2025-01-30", "days": 3}, "weekday": {"date": "2025-06-02"},
    "convert_units": {"value": 5, "from_unit": "km", "to_unit": "m"}, "time_difference": {"city_a": "Oslo", "city_b": "Lima"},
}


def _stock(tables):
    tables.products["notebook"]["stock"] = max(tables.products["notebook"]["stock"], 5)
    return tables


@pytest.fixture(scope="module")
def toolset():
    return generate_tools(ToolGenConfig(), seed=0)


def test_default_size_reaches_1000_valid_distinct_executable_tools(toolset):
    tools = toolset.tools
    assert len(tools) >= 1000 and len({t.name for t in tools}) == len(tools)
    assert toolset.stats["tools_evolved"] > 900 and toolset.stats["tool_domains"] == 30 and toolset.heldout
    origins = " ".join(t.origin for t in tools)
    for mutation in ("rename_params", "add_optional", "add_required", "constrain", "reshape", "rename_tool"):
        assert mutation in origins
    tables = _stock(WorldTables(WORLD, 0))
    for t in tools:  # every variant wraps its base operation: same behaviour behind another interface
        assert validate_spec(t.spec()) == t.name
        env = Env(tables)
        out = t.execute(env, t.encode_args(EXAMPLE[t.base]))
        assert "error" not in out, (t.name, t.origin, out)
        assert set(t.decode_result(out)) == set(BASE_OPS[t.base].returns), (t.name, out)
    renamed = next(t for t in tools if t.returns == "renamed")
    assert set(renamed.shape_result({k: 1 for k in BASE_OPS[renamed.base].returns})) != set(BASE_OPS[renamed.base].returns)
    constrained = next(t for t in tools if "pattern" in json.dumps(t.parameters) and t.base == "get_contact")
    pid = next(k for k, v in constrained.arg_map.items() if v == "person_id") if "person_id" not in constrained.parameters["properties"] else "person_id"
    assert "error" in constrained.execute(Env(tables), constrained.encode_args({"person_id": "nobody"}) | {pid: "nobody"})


def test_invalid_specs_are_named_with_their_problem():
    good = base_tool(BASE_OPS["find_person"]).spec()
    bad_type = json.loads(json.dumps(good))
    bad_type["function"]["parameters"]["properties"]["name"]["type"] = "strng"
    with pytest.raises(K2Error, match=r"tool 'find_person': parameters is not a valid JSON Schema at properties/name/type"):
        validate_spec(bad_type)
    not_object = json.loads(json.dumps(good))
    not_object["function"]["parameters"] = {"type": "array"}
    with pytest.raises(K2Error, match="must have type 'object'"):
        validate_spec(not_object)
    missing = json.loads(json.dumps(good))
    missing["function"]["parameters"]["required"] = ["nope"]
    with pytest.raises(K2Error, match=r"required parameters \['nope'\]"):
        validate_spec(missing)
    with pytest.raises(K2Error, match="not an OpenAI function tool"):
        validate_spec({"name": "x"})
    with pytest.raises(K2Error, match="tool name 'has space' is not valid"):
        validate_spec({"type": "function", "function": {"name": "has space", "parameters": {"type": "object"}}})


def _plan(toolset, **kw):
    agents = AgentConfig(count=kw.pop("count", 40), test_count=10, tools_min=1, tools_max=3)
    tasks = TaskConfig(per_agent=3, edge_prob=kw.pop("edge_prob", 0.2), ask_prob=kw.pop("ask_prob", 0.3), **kw)
    return plan_tasks(toolset.tools, toolset.heldout, TABLES, agents, tasks, seed=0)


def test_tasks_have_rubrics_dependencies_and_replayable_state(toolset):
    plan = _plan(toolset)
    train = [t for t in plan.tasks if t["split"] == "train"]
    assert {t["split"] for t in plan.tasks} == {"train", "test"}
    assert {t["tool_source"] for t in plan.tasks if t["split"] == "test"} == {"seen", "unseen"}
    for t in plan.tasks:
        r = t["rubric"]
        assert r["actions"] and r["pattern"] == [a["name"] for a in r["actions"]] and r["checkpoints"] and r["reply_contains"]
        assert set(plan.agents[0]) >= {"id", "system", "tools"}
    multi = [t for t in train if len(t["plan"]["steps"]) > 1]
    assert multi and any(v.startswith("@0.") for t in multi for v in t["plan"]["steps"][1]["args"].values())
    pay = next(t for t in train if t["template"] in ("pay_person", "move_money") and not t["rubric"]["edge"])
    assert any(a["path"].startswith("balances.") for a in pay["rubric"]["assertions"])
    assert any(t["rubric"]["edge"] for t in train) and any(t["user"]["withheld"] for t in train)
    heldout = {t["tool_source"]: t for t in plan.tasks if t["split"] == "test"}
    agent = next(a for a in plan.agents if a["id"] == heldout["unseen"]["agent_id"])
    assert any(n in toolset.heldout for n in agent["tools"])
    assert not any(n in toolset.heldout for a in plan.agents if a["split"] == "train" for n in a["tools"])


def test_planner_retries_asks_and_handles_edge_cases(toolset):
    plan = _plan(toolset)
    agents = {a["id"]: a for a in plan.agents}
    tasks = [t for t in plan.tasks if t["split"] == "train"]
    sim = SimConfig(transient_error_rate=0.3, partial_failure_rate=0.2)
    eps = [new_episode(t, agents[t["agent_id"]], plan.tools, TABLES, sim, seed=1, max_turns=10) for t in tasks]
    run_episodes(eps, PlannerPolicy(max_retries=3))
    verdicts = [judge_episode(ep, TABLES, plan.tools) for ep in eps]
    assert sum(ep.stats["injected_transient_errors"] for ep in eps) > 5 and sum(ep.stats["retries"] for ep in eps) > 5
    assert sum(v.keep for v in verdicts) / len(verdicts) > 0.95, [v.reason for v in verdicts if not v.keep]
    asked = next(ep for ep in eps if ep.task["user"]["withheld"])
    i = next(i for i, m in enumerate(asked.messages) if m.get("content") == asked.task["plan"]["ask"][0]["question"])
    assert asked.messages[i]["role"] == "assistant" and "tool_calls" not in asked.messages[i]
    assert asked.messages[i + 1] == {"role": "user", "content": asked.task["user"]["withheld"][0]["answer"]}
    edge = next(ep for ep in eps if ep.task["rubric"]["edge"] == "insufficient funds")
    assert "insufficient funds" in edge.final_reply and edge.env.hash() == Env(TABLES).hash()
    # a call that keeps failing: one retry is not enough and the trajectory is rejected, with the reason
    eps = [new_episode(t, agents[t["agent_id"]], plan.tools, TABLES, SimConfig(transient_error_rate=0.99), 1, 10) for t in tasks[:5]]
    run_episodes(eps, PlannerPolicy(max_retries=1))
    assert {judge_episode(ep, TABLES, plan.tools).reason for ep in eps} == {"unrecovered_tool_error"}


def _runner_tool(name, fn):
    return Tool(name=name, description="x", parameters={"type": "object", "properties": {}}, source="external", runner=fn)


def test_quoted_values_read_the_same_in_requests_calls_and_replies(toolset):
    plan = _plan(toolset, count=10, edge_prob=0.0, ask_prob=0.0, quote_values=True)
    agents = {a["id"]: a for a in plan.agents}
    task = next(t for t in plan.tasks if t["split"] == "train" and t["template"] == "work_city")
    name = task["slots"]["name"]
    assert f'"{name}"' in task["user"]["opening"]
    ep = new_episode(task, agents[task["agent_id"]], plan.tools, TABLES, SimConfig(0, 0), 0, 8, inject=False)
    run_episodes([ep], PlannerPolicy())
    city = task["rubric"]["reply_contains"][0]
    assert f'"{city}"' in ep.final_reply and judge_episode(ep, TABLES, plan.tools).keep


def test_a_tool_that_raises_or_hangs_becomes_a_counted_error_message():
    def boom(args):
        raise ValueError("kaput")

    def hang(args):
        time.sleep(3)

    tools = {"boom": _runner_tool("boom", boom), "hang": _runner_tool("hang", hang)}
    sim = ToolSimulator(tools, Env(TABLES), SimConfig(timeout_s=0.2), random.Random(0))
    content, kind = sim.call("boom", {})
    assert kind == "exception" and "boom failed: ValueError: kaput" in content
    t0 = time.time()
    content, kind = sim.call("hang", {})
    assert kind == "timeout" and "timed out after 0.2 s" in content and time.time() - t0 < 2
    content, kind = sim.call("nope", {})
    assert kind == "unknown" and "unknown tool nope" in content
    assert sim.stats["tool_exceptions"] == 1 and sim.stats["tool_timeouts"] == 1 and sim.stats["unknown_tool_calls"] == 1


def test_judge_rejects_bad_roles_wrong_state_and_missing_facts(toolset):
    tools = {t.name: t for t in toolset.tools}
    tmpl = TEMPLATES_BY_NAME["move_money"]
    agent = {"id": "A1", "domain": "bank", "tool_source": "seen", "system": "You are a bank.", "tools": ["transfer"]}
    task = make_task(tmpl, {"transfer": tools["transfer"]}, TABLES, random.Random(3), task_id="T1", agent=agent, split="train",
                     edge_prob=0.0, ask_prob=0.0)

    def episode(amount_delta=0, reply_ok=True, swap_roles=False):
        ep = new_episode(task, agent, tools, TABLES, SimConfig(transient_error_rate=0, partial_failure_rate=0), 0, 8)
        args = dict(task["rubric"]["actions"][0]["arguments"])
        args["amount"] += amount_delta
        ep.step(ParsedTurn("", [{"id": "functions.transfer:0", "type": "function", "function": {"name": "transfer", "arguments": args}}]))
        fact = task["rubric"]["reply_contains"][0]
        ep.step(ParsedTurn(f"Done, balance {fact}." if reply_ok else "Done."))
        if swap_roles:
            ep.messages[2], ep.messages[3] = ep.messages[3], ep.messages[2]
        return judge_episode(ep, TABLES, tools)

    assert episode().keep
    assert episode(amount_delta=10).reason == "state_mismatch"
    assert episode(reply_ok=False).reason == "reply_missing_facts"
    v = episode(swap_roles=True)
    assert v.reason == "invalid_conversation" and not v.keep
    with pytest.raises(K2Error):
        validate_conversation([{"role": "tool", "tool_call_id": "functions.transfer:0", "content": "{}"}])


def test_tokenizer_texts_render_tool_conversations():
    from k2cli.agentic import tokenizer_texts

    texts = tokenizer_texts(WORLD, n=10)
    assert len(texts) == 10 and all(t.startswith("<|im_system|>tool_declare") and "<|tool_call_begin|>" in t for t in texts)


def test_estimate_errs_long_and_openai_messages_parse():
    text = '{"type": "function", "function": {"name": "find_person"}} Anna Avery Berg works in Oslo.'
    assert estimate_tokens(text) >= 40
    turn = from_openai_message({"content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weekday", "arguments": '{"date": "2025-01-01"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "weekday", "arguments": "{not json"}}]}, first_index=3)
    assert turn.tool_calls[0]["id"] == "functions.weekday:3" and turn.tool_calls[0]["function"]["arguments"] == {"date": "2025-01-01"}
    assert turn.errors and "not valid JSON" in turn.errors[0]


# ----------------------------------------------------------------------------- the stage, end to end


@pytest.fixture
def synth(k2):
    k2("data", "synth", "--preset", "micro")


def test_agentic_stage_micro(synth, k2):
    from k2cli.artifacts import open_artifact
    from k2cli.data.sft_data import load_conversations

    k2("agentic", "synth:latest", "--preset", "micro")
    art = open_artifact("agentic:latest", kind="dataset")
    m = art.metrics
    assert m["tools_total"] >= 200 and m["agents_train"] == 20 and m["tasks_train"] == 60 and m["tasks_test"] > 0
    assert m["kept"] > 40 and m["kept"] + m["rejected"] == m["trajectories"]
    assert m["rejected"] == sum(v for k, v in m.items() if k.startswith("rejected_"))
    assert m["injected_transient_errors"] > 0 and m["planner_test_success"] == 1.0
    assert art.manifest["inputs"][0]["id"].startswith("synth/") and art.has("world.json") and art.has("summary.md")
    tools = json.loads((art.path / "tools.json").read_text())["tools"]
    assert len(tools) == m["tools_total"] and {t["split"] for t in tools} == {"train", "heldout"}
    for t in tools[:50]:
        validate_spec(t["spec"])
    tasks = [json.loads(line) for line in (art.path / "tasks.jsonl").read_text().splitlines()]
    assert {t["split"] for t in tasks} == {"train", "test"} and all("rubric" in t for t in tasks)
    import datasets

    chat = datasets.load_from_disk(str(art.path / "chat"))
    assert {"messages", "tools", "task_id", "agent_id", "domain", "tool_source"} <= set(chat.column_names)
    convs = load_conversations("agentic", art)
    for c in convs:
        validate_conversation(c["messages"])
        assert c["messages"][-1]["role"] == "assistant" and 1 <= len(c["tools"]) <= 2
    assert max(chat["tokens"]) <= 768
    assert all("functions." in r for r in chat["messages"])
    # k2 chat --tools agentic:latest: the canonical tools over one persistent state
    from k2cli.serve.tools import execute, load_tool_world

    world = load_tool_world("agentic:latest")
    assert len(world) == len(BASE_OPS)
    person = WORLD.people[0]
    assert json.loads(execute(world, "get_account", {"name": person.name}))["account"] == person.account_id


def test_agentic_bad_inputs(synth, k2, tmp_path):
    bad = tmp_path / "bad_tools.json"
    bad.write_text(json.dumps([{"type": "function", "function": {"name": "lookup_weather", "description": "x",
                                "parameters": {"type": "object", "properties": {"city": {"type": 5}}}}}]))
    assert_clean_error(k2("agentic", "synth:latest", "--preset", "micro", "--tools", bad, ok=False),
                       "lookup_weather", "not a valid JSON Schema", "properties/city/type")
    assert_clean_error(k2("agentic", "synth:latest", "--preset", "micro", "--agent", "gpt", ok=False), "unknown agent 'gpt'")
    assert_clean_error(k2("agentic", "synth:latest", "--preset", "micro", "--agent", "openai", ok=False), "needs a model name")
    assert_clean_error(k2("agentic", "synth:latest", "--preset", "micro", "--set", "tasks.templates=[\"emial\"]", ok=False),
                       "unknown task template", "email")
    assert_clean_error(k2("agentic", "nothing:v9", "--preset", "micro", ok=False), "not found")


def test_external_spec_tools_are_called(synth, k2, tmp_path):
    from k2cli.artifacts import open_artifact

    specs = tmp_path / "tools.json"
    specs.write_text(json.dumps([{"name": "ping_host", "description": "Ping a host.",
                                  "inputSchema": {"type": "object", "properties": {"host": {"type": "string", "enum": ["a.example"]}},
                                                  "required": ["host"]}}]))
    k2("agentic", "synth:latest", "--preset", "micro", "--tools", specs, "--set", "agents.count=2", "--set", "agents.test_count=0")
    art = open_artifact("agentic:latest", kind="dataset")
    assert art.metrics["tools_external"] == 1
    import datasets

    rows = [r for r in datasets.load_from_disk(str(art.path / "chat")) if r["tool_source"] == "external"]
    assert rows and "a.example" in rows[0]["messages"] and "ping_host" in rows[0]["tools"]


# ----------------------------------------------------------------------------- an OpenAI-compatible agent


class FakeAgentServer:
    """/v1/chat/completions: calls the first declared tool with the date found in the conversation,
    then answers with what the tool returned (enough to solve `weekday` tasks)."""

    def __init__(self):
        self.bodies = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                last = body["messages"][-1]
                if last["role"] == "tool":
                    msg = {"role": "assistant", "content": f"It is a {json.loads(last['content']).get('weekday', last['content'])}."}
                else:
                    import re

                    date = re.search(r"\d{4}-\d{2}-\d{2}", last["content"]).group(0)
                    fn = body["tools"][0]["function"]
                    arg = next(iter(fn["parameters"]["required"]))
                    msg = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0", "type": "function",
                           "function": {"name": fn["name"], "arguments": json.dumps({arg: date})}}]}
                data = json.dumps({"choices": [{"message": msg, "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *a):
        self.server.shutdown()
        self.server.server_close()


def test_openai_agent_against_a_loopback_endpoint(synth, k2):
    from k2cli.artifacts import open_artifact

    with FakeAgentServer() as server:
        k2("agentic", "synth:latest", "--preset", "micro", "--agent", "openai", "--base-url", server.url, "--model", "fake",
           "--set", 'tasks.templates=["weekday"]', "--set", "tasks.edge_prob=0", "--set", "simulator.transient_error_rate=0",
           "--set", "simulator.partial_failure_rate=0", "--set", "agents.count=3", "--set", "agents.test_count=0")
    art = open_artifact("agentic:latest", kind="dataset")
    assert art.metrics["policy"] == "openai" and art.metrics["kept"] >= 3
    assert server.bodies and server.bodies[0]["tools"][0]["type"] == "function" and server.bodies[0]["model"] == "fake"


# ----------------------------------------------------------------------------- the eval suite, model in the loop


def test_agentic_eval_suite_runs_the_model_in_the_loop(synth, k2):
    from helpers import chat_texts, model_artifact
    from k2cli.artifacts import open_artifact

    k2("agentic", "synth:latest", "--preset", "micro")
    data = open_artifact("agentic:latest", kind="dataset")
    import datasets

    rows = datasets.load_from_disk(str(data.path / "chat"))
    convs = [{"messages": json.loads(r["messages"]), "tools": json.loads(r["tools"])} for r in rows]
    model = model_artifact(chat_texts(convs), inputs=[data], stage="sft", vocab_size=600, max_position_embeddings=1024)
    k2("eval", model.path, "--suite", "agentic", "--preset", "micro", "--set", "eval.max_examples=4")
    ev = open_artifact("eval:latest", kind="eval")
    results = json.loads((ev.path / "results.json").read_text())["models"][0]["suites"]["agentic"]
    m = results["metrics"]
    assert m["tasks"] == 4 and m["tasks_seen"] + m["tasks_unseen"] == 4
    for k in ("well_formed_rate", "tool_call_well_formed_rate", "success_rate", "success_rate_seen", "success_rate_unseen"):
        assert 0.0 <= m[k] <= 1.0
    assert m["avg_turns"] >= 1 and results["rows"]
    # a base model is not evaluated on tool use
    base = model_artifact(["hello world"] * 10, inputs=[data], stage="pretrain")
    k2("eval", base.path, "--suite", "agentic", "--preset", "micro")
    ev = open_artifact("eval:latest", kind="eval")
    assert "not a chat model" in json.loads((ev.path / "results.json").read_text())["models"][0]["suites"]["agentic"]["skipped"]


def test_k2_model_as_agent_and_as_judge(synth, k2):
    """A (random) micro k2 model writes the trajectories, or judges the planner's: nothing passes, and the
    error says why, by reason."""
    from helpers import model_artifact

    model = model_artifact(["Anna Avery Berg works in Oslo."] * 20, stage="sft", max_position_embeddings=1024)
    small = ("--set", "agents.count=2", "--set", "agents.test_count=0", "--set", "tasks.per_agent=2")
    r = k2("agentic", "synth:latest", "--preset", "micro", "--agent", f"k2:{model.path}", *small,
           "--set", "policy.max_new_tokens=12", "--set", "episode.max_turns=2", ok=False)
    assert_clean_error(r, "no trajectory passed the judge")
    assert "max_turns" in r.output or "reply_missing_facts" in r.output or "state_mismatch" in r.output
    r = k2("agentic", "synth:latest", "--preset", "micro", "--judge", f"k2:{model.path}", *small, ok=False)
    assert_clean_error(r, "no trajectory passed the judge", "model_judge")
