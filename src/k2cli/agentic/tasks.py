"""Tasks with rubrics, from single calls to multi-step plans with dependencies.

A template is a base-level plan over BASE_OPS plus the words around it:

    steps    [(op, {base arg: "{slot}" | "@i.key" | literal})]   "@0.person_id" = a value read from
             step 0's result: the dependency that makes e.g. "find an employee's city, then book a
             meeting there" a two-step task
    openings what the user says first; `ask` withholds one slot that the user only reveals when
             the agent asks for it (the user simulator's multi-turn part)
    reply    the final answer, formatted with slots and results ("{s1_email}")
    facts    what the reply must contain; `edges` give the reply and facts when a step fails by
             design (insufficient funds, out of stock, busy, not found)

`make_task` instantiates a template for an agent (its tools may be evolved variants: the plan
names the agent's tool for every step), then solves it on a fresh Env without stochasticity.
That ground truth becomes the rubric, tau-bench style:

    actions       the expected calls (the agent's tool names and arguments)
    pattern       the expected tool-use pattern (tool names in order)
    checkpoints   every expected call must happen, successfully, in order
    state_hash    the final state after replaying `actions` on a fresh Env
    assertions    the state changes the task must make ({"path": "balances.ACC000012", "equals": 1640})
    reply_contains  facts the final reply must state
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from typing import Callable

from k2cli.agentic.tools import BASE_OPS, PRODUCTS, UNITS, Env, Tool, WorldTables

# ----------------------------------------------------------------------------- sampling helpers


def _person(rng, t: WorldTables):
    return rng.choice(t.world.people)


def _fake_name(rng, t: WorldTables) -> str:
    from k2cli.data.world import FIRST_NAMES, LAST_NAMES, MIDDLE_NAMES

    while True:
        name = f"{rng.choice(FIRST_NAMES['female'] + FIRST_NAMES['male'])} {rng.choice(MIDDLE_NAMES)} {rng.choice(LAST_NAMES)}"
        if name.lower() not in t.person_by_name:
            return name


def _date(rng) -> str:
    return f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def s_person(rng, t, edge):
    return {"name": _fake_name(rng, t) if edge else _person(rng, t).name}


def s_company(rng, t, edge):
    if edge:
        return {"company": f"{rng.choice(['Blue', 'Red', 'Gold', 'Nova'])} {rng.choice(['Widgets', 'Farms', 'Systems'])}"}
    return {"company": rng.choice(t.world.companies).name}


def s_city(rng, t, edge):
    return {"city": rng.choice(t.world.cities).name}


def s_account(rng, t, edge):
    return {"account": f"ACC9{rng.randint(0, 99999):05d}" if edge else _person(rng, t).account_id}


def s_pay(rng, t, edge):
    p, q = rng.sample(t.world.people, 2)
    bal = t.balances[p.account_id]
    amount = bal + rng.randint(1, 40) * 10 if edge else rng.randint(1, max(1, min(bal, 500) // 10)) * 10
    return {"account": p.account_id, "payee": q.name, "amount": amount, "user": p.name}


def s_move(rng, t, edge):
    p, q = rng.sample(t.world.people, 2)
    bal = t.balances[p.account_id]
    amount = bal + rng.randint(1, 40) * 10 if edge else rng.randint(1, max(1, min(bal, 500) // 10)) * 10
    return {"account": p.account_id, "to_account": q.account_id, "amount": amount, "user": p.name}


def s_meeting(rng, t, edge):
    if edge:  # someone who already has a meeting that day
        m = rng.choice(list(t.meetings.values()))
        return {"name": t.people[m["person_id"]].name, "date": m["date"]}
    p = _person(rng, t)
    taken = {m["date"] for m in t.meetings.values() if m["person_id"] == p.id}
    date = _date(rng)
    while date in taken:
        date = _date(rng)
    return {"name": p.name, "date": date}


def s_cancel(rng, t, edge):
    return {"meeting_id": f"M9{rng.randint(0, 999):03d}" if edge else rng.choice(sorted(t.meetings))}


def s_product(rng, t, edge):
    return {"product": rng.choice(PRODUCTS)}


def s_order(rng, t, edge):
    stocked = [p for p, v in t.products.items() if v["stock"] > 0]
    product = rng.choice(stocked)
    stock = t.products[product]["stock"]
    qty = stock + rng.randint(1, 3) if edge else rng.randint(1, min(stock, 5))
    return {"product": product, "quantity": qty, "name": _person(rng, t).name}


def s_order_id(rng, t, edge):
    return {"order_id": f"R9{rng.randint(0, 999):03d}" if edge else rng.choice(sorted(t.orders))}


def s_two_dates(rng, t, edge):
    a, b = sorted([_date(rng), _date(rng)])
    return {"start": a, "end": b}


def s_add_days(rng, t, edge):
    return {"date": _date(rng), "days": rng.randint(1, 60)}


def s_weekday(rng, t, edge):
    return {"date": _date(rng)}


def s_convert(rng, t, edge):
    kind = rng.choice(["length", "mass"])
    units = [u for u, (k, _) in UNITS.items() if k == kind]
    a, b = rng.sample(units, 2)
    return {"value": rng.randint(1, 200), "from_unit": a, "to_unit": b}


def s_two_cities(rng, t, edge):
    a, b = rng.sample(t.world.cities, 2)
    return {"city_a": a.name, "city_b": b.name}


# ----------------------------------------------------------------------------- templates


@dataclass
class Template:
    name: str
    category: str
    steps: list  # [(op, {base arg: spec})]
    openings: list[str]
    reply: list[str]
    facts: list[str]
    sample: Callable  # (rng, tables, edge: bool) -> slots
    edges: dict = field(default_factory=dict)  # error substring -> (reply templates, fact templates)
    ask: dict | None = None  # {"slot", "openings", "questions", "answers"}
    derive: Callable | None = None  # (results) -> extra reply values

    @property
    def ops(self) -> list[str]:
        return [op for op, _ in self.steps]


NOT_FOUND = {"no person": (["I could not find {name} in the directory."], ["could not find"])}
TEMPLATES = [
    # ---- directory
    Template("employer", "directory", [("find_person", {"name": "{name}"})],
             ["Who does {name} work for?", "Which company employs {name}?", "Where is {name} employed?"],
             ["{name} works for {s0_employer}.", "{s0_employer} employs {name}."], ["{s0_employer}"], s_person, NOT_FOUND),
    Template("work_city", "directory", [("find_person", {"name": "{name}"})],
             ["In which city does {name} work?", "Where does {name} work?"],
             ["{name} works in {s0_city}.", "{name} is based in {s0_city}."], ["{s0_city}"], s_person, NOT_FOUND),
    Template("email", "directory", [("find_person", {"name": "{name}"}), ("get_contact", {"person_id": "@0.person_id"})],
             ["What is the email of {name}?", "I need the email address of {name}."],
             ["The email of {name} is {s1_email}.", "{name}: {s1_email}"], ["{s1_email}"], s_person, NOT_FOUND),
    Template("phone", "directory", [("find_person", {"name": "{name}"}), ("get_contact", {"person_id": "@0.person_id"})],
             ["What is the phone number of {name}?", "How can I call {name}?"],
             ["The phone number of {name} is {s1_phone}.", "Call {name} at {s1_phone}."], ["{s1_phone}"], s_person, NOT_FOUND),
    Template("company_hq", "directory", [("find_company", {"name": "{company}"})],
             ["Where is {company} headquartered?", "In which city is the head office of {company}?"],
             ["{company} is headquartered in {s0_hq_city}."], ["{s0_hq_city}"], s_company,
             {"no company": (["I could not find a company called {company}."], ["could not find"])}),
    Template("city_country", "directory", [("city_info", {"city": "{city}"})],
             ["Which country is {city} in?", "In what country is {city}?"], ["{city} is in {s0_country}."], ["{s0_country}"], s_city),
    Template("calling_code", "directory", [("city_info", {"city": "{city}"})],
             ["What is the calling code of {city}?", "Which dialling code does {city} use?"],
             ["The calling code of {city} is {s0_calling_code}."], ["{s0_calling_code}"], s_city),
    Template("work_country", "directory", [("find_person", {"name": "{name}"}), ("city_info", {"city": "@0.city"})],
             ["In which country does {name} work?", "Which country is {name} working in?"],
             ["{name} works in {s0_city}, {s1_country}."], ["{s1_country}"], s_person, NOT_FOUND),
    # ---- finance
    Template("balance", "finance", [("get_account", {"name": "{name}"})],
             ["What is the balance of {name}'s account?", "How much money does {name} have?"],
             ["{name}'s account {s0_account} holds {s0_balance}.", "{name} has {s0_balance} in account {s0_account}."],
             ["{s0_balance}"], s_person, {"no person": (["I could not find an account for {name}."], ["could not find"])}),
    Template("account_balance", "finance", [("get_balance", {"account": "{account}"})],
             ["What is the balance of account {account}?", "How much is in account {account}?"],
             ["Account {account} holds {s0_balance}."], ["{s0_balance}"], s_account,
             {"no account": (["There is no account {account}."], ["no account"])}),
    Template("pay_person", "finance",
             [("get_account", {"name": "{payee}"}), ("transfer", {"from_account": "{account}", "to_account": "@0.account", "amount": "{amount}"})],
             ["Send {amount} from my account {account} to {payee}.", "Please pay {payee} {amount} from account {account}."],
             ["Sent {amount} to {payee}. Your balance is now {s1_balance}.", "Done: {payee} got {amount}; {account} now holds {s1_balance}."],
             ["{s1_balance}"], s_pay,
             {"insufficient funds": (["The transfer failed: insufficient funds (balance {e_balance}).",
                                      "Sorry, insufficient funds: {account} holds only {e_balance}."], ["insufficient funds"])},
             ask={"slot": "amount", "openings": ["I want to pay {payee} from my account {account}.", "Please send money to {payee} from {account}."],
                  "questions": ["How much should I send?", "What amount?"], "answers": ["{amount}.", "Send {amount}, please."]}),
    Template("move_money", "finance",
             [("transfer", {"from_account": "{account}", "to_account": "{to_account}", "amount": "{amount}"})],
             ["Transfer {amount} from {account} to {to_account}.", "Move {amount} from account {account} to account {to_account}."],
             ["Done. {account} now holds {s0_balance}.", "Transferred {amount}; the balance of {account} is {s0_balance}."],
             ["{s0_balance}"], s_move,
             {"insufficient funds": (["The transfer failed: insufficient funds (balance {e_balance})."], ["insufficient funds"])}),
    # ---- scheduling
    Template("meet_in_city", "scheduling",
             [("find_person", {"name": "{name}"}), ("book_meeting", {"person_id": "@0.person_id", "city": "@0.city", "date": "{date}"})],
             ["Book a meeting with {name} on {date} in the city where they work.", "Set up a meeting with {name} on {date} where {name} works."],
             ["Booked {s1_meeting_id} with {name} in {s0_city} on {date}.", "Meeting {s1_meeting_id}: {name}, {s0_city}, {date}."],
             ["{s1_meeting_id}", "{s0_city}"], s_meeting,
             {"busy": (["{name} is busy on {date}.", "Sorry, {name} is busy on {date}."], ["busy", "{date}"]), **NOT_FOUND},
             ask={"slot": "date", "openings": ["Book a meeting with {name} where they work.", "I want to meet {name} in their city."],
                  "questions": ["On which date?", "What date should I book?"], "answers": ["On {date}.", "{date}."]}),
    Template("list_meetings", "scheduling",
             [("find_person", {"name": "{name}"}), ("list_meetings", {"person_id": "@0.person_id"})],
             ["Which meetings does {name} have?", "List the meetings of {name}."],
             ["{name}'s meetings: {s1_ids}."], ["{s1_ids}"], s_person, NOT_FOUND,
             derive=lambda r: {"s1_ids": ", ".join(m["meeting_id"] for m in r[1]["meetings"]) or "none"} if len(r) > 1 else {}),
    Template("cancel_meeting", "scheduling", [("cancel_meeting", {"meeting_id": "{meeting_id}"})],
             ["Cancel meeting {meeting_id}.", "Please cancel the meeting {meeting_id}."],
             ["Meeting {meeting_id} is cancelled.", "Cancelled {meeting_id}."], ["{meeting_id}"], s_cancel,
             {"no meeting": (["There is no meeting {meeting_id}."], ["no meeting"])}),
    # ---- commerce
    Template("stock", "commerce", [("check_stock", {"product": "{product}"})],
             ["How many units of {product} are in stock?", "Is there any {product} in stock?"],
             ["{s0_stock} units of {product} in stock, {s0_price} each."], ["{s0_stock}", "{s0_price}"], s_product),
    Template("order", "commerce", [("place_order", {"product": "{product}", "quantity": "{quantity}", "customer": "{name}"})],
             ["Order {quantity} {product} for {name}.", "{name} wants {quantity} units of {product}; please order them."],
             ["Order {s0_order_id} placed: {quantity} {product} for {s0_total}.", "Ordered {quantity} {product} for {name}: {s0_order_id}, total {s0_total}."],
             ["{s0_order_id}", "{s0_total}"], s_order,
             {"out of stock": (["Sorry, {product} is out of stock: only {e_stock} left."], ["out of stock"])},
             ask={"slot": "quantity", "openings": ["Please order some {product} for {name}.", "{name} needs {product}; place an order."],
                  "questions": ["How many units?", "What quantity?"], "answers": ["{quantity} units.", "{quantity}."]}),
    Template("order_status", "commerce", [("order_status", {"order_id": "{order_id}"})],
             ["What is the status of order {order_id}?", "Where is my order {order_id}?"],
             ["Order {order_id} is {s0_status}."], ["{s0_status}"], s_order_id,
             {"no order": (["There is no order {order_id}."], ["no order"])}),
    # ---- utilities
    Template("days_between", "utilities", [("days_between", {"start": "{start}", "end": "{end}"})],
             ["How many days are there from {start} to {end}?", "Count the days between {start} and {end}."],
             ["There are {s0_days} days from {start} to {end}.", "{s0_days} days."], ["{s0_days}"], s_two_dates),
    Template("add_days", "utilities", [("add_days", {"date": "{date}", "days": "{days}"})],
             ["What is the date {days} days after {date}?", "Which date is {days} days from {date}?"],
             ["{days} days after {date} is {s0_date}.", "It is {s0_date}."], ["{s0_date}"], s_add_days),
    Template("weekday", "utilities", [("weekday", {"date": "{date}"})],
             ["What day of the week is {date}?", "Which weekday is {date}?"], ["{date} is a {s0_weekday}."], ["{s0_weekday}"], s_weekday),
    Template("convert", "utilities", [("convert_units", {"value": "{value}", "from_unit": "{from_unit}", "to_unit": "{to_unit}"})],
             ["Convert {value} {from_unit} to {to_unit}.", "How many {to_unit} are {value} {from_unit}?"],
             ["{value} {from_unit} is {s0_value} {to_unit}."], ["{s0_value}"], s_convert),
    Template("time_difference", "utilities", [("time_difference", {"city_a": "{city_a}", "city_b": "{city_b}"})],
             ["What is the time difference from {city_a} to {city_b}?", "How many hours is {city_b} ahead of {city_a}?"],
             ["{city_b} is {s0_hours} hours ahead of {city_a}."], ["{s0_hours}"], s_two_cities),
]
TEMPLATES_BY_NAME = {t.name: t for t in TEMPLATES}

STYLES = {"terse": ("", ""), "polite": ("Hello. ", " Thank you."), "casual": ("Hi! ", ""), "formal": ("Good day. ", " Thanks.")}


# ----------------------------------------------------------------------------- formatting and values


class _Fmt(dict):
    def __missing__(self, key):
        raise KeyError(key)


def fill(template: str, values: dict) -> str:
    return template.format_map(_Fmt({k: v for k, v in values.items()}))


def resolve_arg(spec, slots: dict, results: list[dict]):
    """'{slot}' -> the slot's value (type kept); '@i.key' -> step i's result[key]; else the literal."""
    if isinstance(spec, str):
        m = re.fullmatch(r"\{(\w+)\}", spec)
        if m:
            return slots[m.group(1)]
        m = re.fullmatch(r"@(\d+)\.(\w+)", spec)
        if m:
            return results[int(m.group(1))][m.group(2)]
        if "{" in spec:
            return fill(spec, slots)
    return spec


def quoted(values: dict) -> dict:
    """String values in double quotes: "Anna Avery Berg" is then the very same tokens in a request, in
    the JSON of a call or a result, and in the reply (a small BPE splits `Anna` and ` Anna` apart), so
    copying a value is plain copying (tasks.quote_values; the tiny recipe uses it)."""
    return {k: f'"{v}"' if isinstance(v, str) else v for k, v in values.items()}


def reply_values(slots: dict, results: list[dict], error: dict | None = None, derive=None, quote: bool = False) -> dict:
    values = dict(slots)
    for i, r in enumerate(results):
        if isinstance(r, dict):
            values.update({f"s{i}_{k}": v for k, v in r.items()})
    if error:
        values.update({f"e_{k}": v for k, v in error.items() if k != "error"})
    if derive:
        values.update(derive(results))
    return quoted(values) if quote else values


def edge_for(error_text: str, edges: dict) -> str | None:
    for key in edges:
        if key in str(error_text):
            return key
    return None


def state_diff(before: dict, after: dict, path: str = "") -> list[dict]:
    """Leaf changes as assertions: [{"path": "balances.ACC000012", "equals": 1640}]."""
    if before == after:
        return []
    out = []
    if isinstance(before, dict) and isinstance(after, dict):
        for k in sorted(set(before) | set(after), key=str):
            out += state_diff(before.get(k), after.get(k), f"{path}.{k}" if path else str(k))
    elif before != after:
        out.append({"path": path, "equals": after})
    return out


def lookup_path(state: dict, path: str):
    cur = state
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


# ----------------------------------------------------------------------------- tasks


def make_task(template: Template, tools_for_op: dict[str, Tool], tables: WorldTables, rng: random.Random, *, task_id: str,
              agent: dict, split: str, edge_prob: float, ask_prob: float, quote: bool = False) -> dict | None:
    """A task of `template` for an agent whose tool for each base op is `tools_for_op`; solved once
    on a fresh Env to build its rubric. None when the draw cannot be solved (redrawn by the caller)."""
    edge = bool(template.edges) and rng.random() < edge_prob
    slots = template.sample(rng, tables, edge)
    style = rng.choice(list(STYLES))
    hello, bye = STYLES[style]
    ask = template.ask if template.ask and rng.random() < ask_prob else None
    shown = quoted(slots) if quote else slots
    opening = fill(rng.choice(ask["openings"] if ask else template.openings), shown)
    withheld = []
    if ask:
        withheld.append({"slot": ask["slot"], "question": rng.choice(ask["questions"]),
                         "answer": fill(rng.choice(ask["answers"]), shown)})
    steps = [{"tool": tools_for_op[op].name, "op": op, "args": args} for op, args in template.steps]
    edges = {k: {"reply": rng.choice(v[0]), "facts": v[1]} for k, v in template.edges.items()}
    plan = {"steps": steps, "reply": rng.choice(template.reply), "facts": template.facts, "edges": edges,
            "ask": [{"slot": w["slot"], "question": w["question"]} for w in withheld], "quote": quote}
    task = {"id": task_id, "split": split, "agent_id": agent["id"], "category": template.category, "domain": agent["domain"],
            "template": template.name, "tool_source": agent["tool_source"], "slots": slots,
            "user": {"persona": {"name": slots.get("user") or _person(rng, tables).name, "style": style},
                     "opening": f"{hello}{opening}{bye}".strip(), "withheld": withheld},
            "plan": plan}
    rubric = solve(task, tools_for_op_by_name(tools_for_op), tables, template.derive)
    if rubric is None:
        return None
    task["rubric"] = rubric
    return task


def tools_for_op_by_name(tools_for_op: dict[str, Tool]) -> dict[str, Tool]:
    return {t.name: t for t in tools_for_op.values()}


def solve(task: dict, tools: dict[str, Tool], tables: WorldTables, derive=None) -> dict | None:
    """Run the plan on a fresh Env without stochasticity: the ground truth the rubric is made of."""
    env = Env(tables)
    before = _copy_state(env)
    plan, slots = task["plan"], task["slots"]
    results, actions, error, edge = [], [], None, None
    for st in plan["steps"]:
        tool = tools[st["tool"]]
        try:
            base_args = {k: resolve_arg(v, slots, results) for k, v in st["args"].items()}
        except (KeyError, IndexError, TypeError):
            return None
        args = tool.encode_args(base_args)
        out = tool.execute(env, args)
        actions.append({"name": tool.name, "arguments": args})
        if isinstance(out, dict) and "error" in out:
            edge = edge_for(out["error"], plan["edges"])
            if edge is None:
                return None  # an unplanned failure: this draw is not a task
            error = out
            break
        results.append(tool.decode_result(out))
    values = reply_values(slots, results, error, derive)
    try:
        if edge:
            facts = [fill(f, values) for f in plan["edges"][edge]["facts"]]
        else:
            facts = [fill(f, values) for f in plan["facts"]]
    except KeyError:
        return None
    after = env.state()
    success = ("the final reply states " + ", ".join(repr(f) for f in facts)
               + ("; the state changes as asserted" if any(BASE_OPS[s["op"]].mutates for s in plan["steps"]) else "; no state changes"))
    return {"success": success, "actions": actions, "pattern": [a["name"] for a in actions],
            "checkpoints": [{"name": a["name"], "arguments": a["arguments"]} for a in actions],
            "state_hash": env.hash(), "assertions": state_diff(before, after), "reply_contains": facts, "edge": edge}


def _copy_state(env: Env) -> dict:
    st = env.state()
    return {k: ({kk: dict(vv) if isinstance(vv, dict) else vv for kk, vv in v.items()} if isinstance(v, dict) else list(v))
            for k, v in st.items()}


# ----------------------------------------------------------------------------- tasks for tools known only by their spec


def example_args(schema: dict, rng: random.Random, tables: WorldTables | None) -> dict:
    """Arguments derived from a tool's schema (MCP, --tools): enums, constants, typed values by name."""
    out = {}
    props = schema.get("properties", {}) or {}
    for name in schema.get("required", list(props)) or list(props)[:2]:
        s = props.get(name, {})
        out[name] = _example_value(name, s, rng, tables)
    return out


def _example_value(name: str, s: dict, rng, tables):
    if "const" in s:
        return s["const"]
    if s.get("enum"):
        return rng.choice(s["enum"])
    typ = s.get("type", "string")
    typ = typ[0] if isinstance(typ, list) else typ
    lo, hi = s.get("minimum", 1), s.get("maximum", 20)
    if typ == "integer":
        return rng.randint(int(lo), int(max(lo, min(hi, lo + 50))))
    if typ == "number":
        return round(rng.uniform(float(lo), float(max(lo + 1, min(hi, lo + 100)))), 1)
    if typ == "boolean":
        return rng.choice([True, False])
    if typ == "array":
        return []
    if typ == "object":
        return {}
    low = name.lower()
    if tables is not None and "city" in low:
        return rng.choice(tables.world.cities).name
    if tables is not None and ("name" in low or "person" in low):
        return rng.choice(tables.world.people).name
    if "date" in low or s.get("format") == "date":
        return _date(rng)
    words = [c.name for c in tables.world.cities] if tables is not None else list(string.ascii_lowercase)
    return rng.choice(words)


def make_spec_task(tool: Tool, tables: WorldTables, rng: random.Random, *, task_id: str, agent: dict) -> dict:
    """Call the tool with arguments derived from its schema and report what it returned."""
    args = example_args(tool.parameters, rng, tables)
    shown = ", ".join(f"{k}={v}" for k, v in args.items())
    opening = rng.choice([f"Please use {tool.name} with {shown}.", f"Run {tool.name} for {shown} and tell me the result."])
    if not args:
        opening = rng.choice([f"Please run {tool.name}.", f"What does {tool.name} say?"])
    style = rng.choice(list(STYLES))
    plan = {"steps": [{"tool": tool.name, "op": "", "args": args}], "reply": rng.choice(["{tool} returned: {s0_text}", "Result: {s0_text}"]),
            "facts": [], "edges": {}, "ask": []}
    return {"id": task_id, "split": "train", "agent_id": agent["id"], "category": tool.source, "domain": tool.domain,
            "template": f"{tool.source}_call", "tool_source": tool.source, "slots": {"tool": tool.name},
            "user": {"persona": {"name": rng.choice(tables.world.people).name, "style": style}, "opening": opening, "withheld": []},
            "plan": plan,
            "rubric": {"success": f"{tool.name} is called successfully with the derived arguments and the reply reports its result",
                       "actions": [{"name": tool.name, "arguments": args}], "pattern": [tool.name],
                       "checkpoints": [{"name": tool.name, "arguments": args}], "state_hash": None, "assertions": [],
                       "reply_contains": [], "reply_contains_result": True, "edge": None}}
