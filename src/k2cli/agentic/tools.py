"""Tools over the synthetic world: per-episode state, the base operations of five domains, and
the `Tool` wrapper every tool (base, evolved variant, MCP, external) is called through.

    WorldTables  read-only tables built once from world.json (+ a seeded shop catalogue and
                 calendar), and the initial values of everything a tool can change
    Env          one episode's state: a fresh copy of the mutable tables (account balances,
                 meetings, inventory, orders); `Env.hash()` is what tau-bench-style judging
                 compares after replaying the expected actions on a fresh copy
    BASE_OPS     the operations (find_person, transfer, book_meeting, place_order, add_days, ...),
                 each a compact JSON schema + an implementation `fn(env, args) -> dict`
    Tool         an OpenAI function spec plus how its interface maps onto a base operation:
                 renamed parameters, added parameters (optional, or required with the one value
                 the operation accepts), constraints, and the shape of what it returns. Variants
                 made by `toolgen` are Tools too, so every generated tool is executable.

Results are small dicts on purpose: a tiny model reads them inside a 512-token context.
A base operation reports a domain failure (insufficient funds, out of stock, not found) as
{"error": "..."}; such edge cases are part of the tasks, not bugs.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from k2cli.errors import K2Error

# ----------------------------------------------------------------------------- spec validation

NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _validator_cls():
    try:
        from jsonschema import Draft202012Validator
    except ImportError:  # pragma: no cover - jsonschema is a core dependency
        raise K2Error("the jsonschema package is missing", "pip install 'jsonschema>=4'")
    return Draft202012Validator


_META = None
_VALID_PARAMS: set[str] = set()


def _meta_validator():
    """One validator of the Draft 2020-12 meta-schema, reused (check_schema builds one per call)."""
    global _META
    if _META is None:
        cls = _validator_cls()
        _META = cls(cls.META_SCHEMA)
    return _META


def validate_spec(spec: dict) -> str:
    """Check one tool spec: OpenAI function shape + `parameters` against the JSON Schema Draft
    2020-12 meta-schema. Returns the tool's name; raises K2Error naming the tool and the problem."""
    from jsonschema.exceptions import best_match

    if not isinstance(spec, dict) or spec.get("type") != "function" or not isinstance(spec.get("function"), dict):
        raise K2Error(f"tool spec {str(spec)[:60]!r} is not an OpenAI function tool",
                      'use {"type": "function", "function": {"name", "description", "parameters"}}')
    fn = spec["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not set(name) <= NAME_OK:
        raise K2Error(f"tool name {name!r} is not valid", "use 1-64 letters, digits, '_' or '-'")
    if not isinstance(fn.get("description", ""), str):
        raise K2Error(f"tool '{name}': description must be a string", "give a one-line description")
    params = fn.get("parameters")
    if not isinstance(params, dict):
        raise K2Error(f"tool '{name}': parameters must be a JSON Schema object", 'use {"type": "object", "properties": {...}}')
    key = json.dumps(params, sort_keys=True, default=str)
    e = None if key in _VALID_PARAMS else best_match(_meta_validator().iter_errors(params))
    if e is None:
        _VALID_PARAMS.add(key)  # many evolved tools share a parameter schema: check each schema once
    else:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise K2Error(f"tool '{name}': parameters is not a valid JSON Schema at {where}: {e.message}",
                      "fix the schema (JSON Schema Draft 2020-12)")
    if params.get("type") != "object":
        raise K2Error(f"tool '{name}': parameters must have type 'object', not {params.get('type')!r}",
                      "OpenAI function parameters are an object schema")
    props = params.get("properties", {})
    if not isinstance(props, dict):
        raise K2Error(f"tool '{name}': parameters.properties must be an object", "map parameter names to schemas")
    missing = [r for r in params.get("required", []) if r not in props]
    if missing:
        raise K2Error(f"tool '{name}': required parameters {missing} are not in properties", "declare every required parameter")
    return name


def function_spec(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


# ----------------------------------------------------------------------------- the world's tables

PRODUCTS = ["desk lamp", "notebook", "stapler", "office chair", "monitor", "keyboard", "headset", "backpack",
            "water bottle", "coffee mug", "umbrella", "printer paper", "whiteboard", "webcam", "desk fan",
            "bookshelf", "pen set", "calculator", "mouse pad", "plant pot"]
UNITS = {"km": ("length", 1000.0), "m": ("length", 1.0), "mi": ("length", 1609.344), "ft": ("length", 0.3048),
         "kg": ("mass", 1.0), "g": ("mass", 0.001), "lb": ("mass", 0.45359237), "l": ("volume", 1.0), "ml": ("volume", 0.001)}
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


class WorldTables:
    """Read-only look-ups of one world plus the initial mutable tables (built once per run)."""

    def __init__(self, world, seed: int = 0):
        self.world = world
        self.seed = seed
        self.people = {p.id: p for p in world.people}
        self.person_by_name = {p.name.lower(): p for p in world.people}
        self.person_by_account = {p.account_id: p for p in world.people}
        self.companies = {o.name.lower(): o for o in world.companies}
        self.cities = {c.name.lower(): c for c in world.cities}
        self.city_by_id = {c.id: c for c in world.cities}
        rng = random.Random(f"{seed}:shop")
        self.products = {name: {"price": rng.randint(2, 60) * 5, "stock": rng.choice([0, 1, 2, 3, 5, 8, 12, 20, 30, 50])}
                         for name in PRODUCTS}
        # a few meetings and orders exist before any episode, so cancelling and status look-ups have targets
        rng = random.Random(f"{seed}:calendar")
        people = world.people
        self.meetings = {}
        for i in range(max(4, len(people) // 5)):
            p = rng.choice(people)
            self.meetings[f"M{i:04d}"] = {"person_id": p.id, "city": self.city_by_id[p.employer_city_id].name,
                                          "date": f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"}
        self.orders = {}
        for i in range(max(4, len(people) // 5)):
            p = rng.choice(people)
            self.orders[f"R{i:04d}"] = {"product": rng.choice(PRODUCTS), "quantity": rng.randint(1, 4), "customer": p.name,
                                        "status": rng.choice(["placed", "shipped", "delivered"])}
        self.balances = {p.account_id: p.account_balance for p in people}
        self.initial_hash: str | None = None


def _hash(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


class Env:
    """One episode's state: fresh copies of the mutable tables over the shared read-only world."""

    def __init__(self, tables: WorldTables):
        self.t = tables
        self.balances = dict(tables.balances)
        self.meetings = {k: dict(v) for k, v in tables.meetings.items()}  # rows are flat dicts: a copy per row is enough
        self.inventory = {k: v["stock"] for k, v in tables.products.items()}
        self.orders = {k: dict(v) for k, v in tables.orders.items()}
        self.transfers: list[dict] = []
        self.mutated = False  # set by a successful call of a mutating operation

    def state(self) -> dict:
        return {"balances": self.balances, "meetings": self.meetings, "inventory": self.inventory,
                "orders": self.orders, "transfers": self.transfers}

    def hash(self) -> str:
        if not self.mutated:  # the initial state: hashed once per run
            if self.t.initial_hash is None:
                self.t.initial_hash = _hash(self.state())
            return self.t.initial_hash
        return _hash(self.state())

    # -- shared look-ups (a miss is a domain error the agent sees)
    def person(self, name: str):
        p = self.t.person_by_name.get(str(name).strip().lower())
        if p is None:
            raise ToolFailure(f"no person named {name}")
        return p

    def person_id(self, pid: str):
        p = self.t.people.get(str(pid).strip())
        if p is None:
            raise ToolFailure(f"no person with id {pid}")
        return p

    def city(self, name: str):
        c = self.t.cities.get(str(name).strip().lower())
        if c is None:
            raise ToolFailure(f"no city named {name}")
        return c

    def account(self, acc: str) -> str:
        acc = str(acc).strip()
        if acc not in self.balances:
            raise ToolFailure(f"no account {acc}")
        return acc


class ToolFailure(Exception):
    """A domain failure reported to the agent as {"error": ...} (not found, insufficient funds, ...)."""

    def __init__(self, message: str, **extra):
        super().__init__(message)
        self.extra = extra


# ----------------------------------------------------------------------------- base operations

STR, INT, NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}
DATE = {"type": "string", "description": "YYYY-MM-DD"}


@dataclass
class BaseOp:
    name: str
    category: str
    description: str
    params: dict  # name -> JSON schema (all required)
    fn: Callable[[Env, dict], dict]
    returns: tuple[str, ...]  # the keys of a successful result
    mutates: bool = False
    kinds: dict = field(default_factory=dict)  # param -> kind, for constraints and renames (name, id, account, ...)


def _date(s: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(s))
    except ValueError:
        raise ToolFailure(f"bad date {s}; use YYYY-MM-DD")


def _find_person(env, a):
    p = env.person(a["name"])
    return {"person_id": p.id, "employer": env.t.world.org(p.employer_id).name, "city": env.t.city_by_id[p.employer_city_id].name}


def _get_contact(env, a):
    p = env.person_id(a["person_id"])
    return {"email": p.email, "phone": p.phone}


def _find_company(env, a):
    o = env.t.companies.get(str(a["name"]).strip().lower())
    if o is None:
        raise ToolFailure(f"no company named {a['name']}")
    return {"company_id": o.id, "industry": o.industry, "hq_city": env.t.city_by_id[o.hq_city_id].name}


def _city_info(env, a):
    c = env.city(a["city"])
    return {"country": c.country, "calling_code": c.calling_code, "utc_offset": c.utc_offset}


def _get_account(env, a):
    p = env.person(a["name"])
    return {"account": p.account_id, "balance": env.balances[p.account_id]}


def _get_balance(env, a):
    return {"balance": env.balances[env.account(a["account"])]}


def _transfer(env, a):
    src, dst, amount = env.account(a["from_account"]), env.account(a["to_account"]), int(a["amount"])
    if amount <= 0:
        raise ToolFailure("amount must be positive")
    if src == dst:
        raise ToolFailure("cannot transfer to the same account")
    if env.balances[src] < amount:
        raise ToolFailure("insufficient funds", balance=env.balances[src])
    env.balances[src] -= amount
    env.balances[dst] += amount
    env.transfers.append({"from": src, "to": dst, "amount": amount})
    return {"status": "done", "balance": env.balances[src]}


def _book_meeting(env, a):
    p = env.person_id(a["person_id"])
    city, day = env.city(a["city"]), _date(a["date"])
    for m in env.meetings.values():
        if m["person_id"] == p.id and m["date"] == day.isoformat():
            raise ToolFailure(f"{p.id} is busy on {day.isoformat()}")
    mid = f"M{len(env.meetings):04d}"
    env.meetings[mid] = {"person_id": p.id, "city": city.name, "date": day.isoformat()}
    return {"meeting_id": mid}


def _list_meetings(env, a):
    p = env.person_id(a["person_id"])
    found = [{"meeting_id": k, "date": m["date"]} for k, m in sorted(env.meetings.items()) if m["person_id"] == p.id]
    return {"meetings": found}


def _cancel_meeting(env, a):
    mid = str(a["meeting_id"]).strip()
    if mid not in env.meetings or env.meetings[mid].get("cancelled"):
        raise ToolFailure(f"no meeting {mid}")
    env.meetings[mid]["cancelled"] = True
    return {"status": "cancelled"}


def _check_stock(env, a):
    name = str(a["product"]).strip().lower()
    if name not in env.inventory:
        raise ToolFailure(f"no product {a['product']}")
    return {"stock": env.inventory[name], "price": env.t.products[name]["price"]}


def _place_order(env, a):
    name, qty = str(a["product"]).strip().lower(), int(a["quantity"])
    if name not in env.inventory:
        raise ToolFailure(f"no product {a['product']}")
    customer = env.person(a["customer"])
    if qty <= 0:
        raise ToolFailure("quantity must be positive")
    if env.inventory[name] < qty:
        raise ToolFailure("out of stock", stock=env.inventory[name])
    env.inventory[name] -= qty
    oid = f"R{len(env.orders):04d}"
    env.orders[oid] = {"product": name, "quantity": qty, "customer": customer.name, "status": "placed"}
    return {"order_id": oid, "total": qty * env.t.products[name]["price"]}


def _order_status(env, a):
    o = env.orders.get(str(a["order_id"]).strip())
    if o is None:
        raise ToolFailure(f"no order {a['order_id']}")
    return {"status": o["status"], "product": o["product"]}


def _days_between(env, a):
    return {"days": (_date(a["end"]) - _date(a["start"])).days}


def _add_days(env, a):
    return {"date": (_date(a["date"]) + dt.timedelta(days=int(a["days"]))).isoformat()}


def _weekday(env, a):
    return {"weekday": WEEKDAYS[_date(a["date"]).weekday()]}


def _convert_units(env, a):
    f, t = UNITS.get(str(a["from_unit"])), UNITS.get(str(a["to_unit"]))
    if f is None or t is None:
        raise ToolFailure(f"unknown unit; use one of {', '.join(UNITS)}")
    if f[0] != t[0]:
        raise ToolFailure(f"cannot convert {f[0]} to {t[0]}")
    return {"value": round(float(a["value"]) * f[1] / t[1], 2)}


def _time_difference(env, a):
    x, y = env.city(a["city_a"]), env.city(a["city_b"])
    diff = y.utc_offset - x.utc_offset
    return {"hours": int(diff) if float(diff).is_integer() else diff}


UNIT_ENUM = {"type": "string", "enum": list(UNITS)}
BASE_OPS: dict[str, BaseOp] = {op.name: op for op in [
    # directory: people, companies, cities
    BaseOp("find_person", "directory", "Find a person by full name.", {"name": STR}, _find_person,
           ("person_id", "employer", "city"), kinds={"name": "name"}),
    BaseOp("get_contact", "directory", "Email and phone of a person id.", {"person_id": STR}, _get_contact,
           ("email", "phone"), kinds={"person_id": "person_id"}),
    BaseOp("find_company", "directory", "Find a company by name.", {"name": STR}, _find_company,
           ("company_id", "industry", "hq_city"), kinds={"name": "company"}),
    BaseOp("city_info", "directory", "Country and calling code of a city.", {"city": STR}, _city_info,
           ("country", "calling_code", "utc_offset"), kinds={"city": "city"}),
    # finance: a bank ledger
    BaseOp("get_account", "finance", "Account and balance of a person.", {"name": STR}, _get_account,
           ("account", "balance"), kinds={"name": "name"}),
    BaseOp("get_balance", "finance", "Balance of an account.", {"account": STR}, _get_balance, ("balance",),
           kinds={"account": "account"}),
    BaseOp("transfer", "finance", "Move money between accounts.", {"from_account": STR, "to_account": STR, "amount": INT},
           _transfer, ("status", "balance"), mutates=True,
           kinds={"from_account": "account", "to_account": "account", "amount": "amount"}),
    # scheduling: calendars and bookings
    BaseOp("book_meeting", "scheduling", "Book a meeting with a person.", {"person_id": STR, "city": STR, "date": DATE},
           _book_meeting, ("meeting_id",), mutates=True, kinds={"person_id": "person_id", "city": "city", "date": "date"}),
    BaseOp("list_meetings", "scheduling", "Meetings of a person id.", {"person_id": STR}, _list_meetings, ("meetings",),
           kinds={"person_id": "person_id"}),
    BaseOp("cancel_meeting", "scheduling", "Cancel a meeting.", {"meeting_id": STR}, _cancel_meeting, ("status",),
           mutates=True, kinds={"meeting_id": "meeting_id"}),
    # commerce: orders and inventory
    BaseOp("check_stock", "commerce", "Stock and price of a product.", {"product": STR}, _check_stock, ("stock", "price"),
           kinds={"product": "product"}),
    BaseOp("place_order", "commerce", "Order a product for a customer.", {"product": STR, "quantity": INT, "customer": STR},
           _place_order, ("order_id", "total"), mutates=True, kinds={"product": "product", "quantity": "count", "customer": "name"}),
    BaseOp("order_status", "commerce", "Status of an order.", {"order_id": STR}, _order_status, ("status", "product"),
           kinds={"order_id": "order_id"}),
    # utilities: date and unit arithmetic
    BaseOp("days_between", "utilities", "Days from one date to another.", {"start": DATE, "end": DATE}, _days_between,
           ("days",), kinds={"start": "date", "end": "date"}),
    BaseOp("add_days", "utilities", "Add days to a date.", {"date": DATE, "days": INT}, _add_days, ("date",),
           kinds={"date": "date", "days": "count"}),
    BaseOp("weekday", "utilities", "Weekday of a date.", {"date": DATE}, _weekday, ("weekday",), kinds={"date": "date"}),
    BaseOp("convert_units", "utilities", "Convert a value between units.", {"value": NUM, "from_unit": UNIT_ENUM, "to_unit": UNIT_ENUM},
           _convert_units, ("value",), kinds={"value": "number", "from_unit": "unit", "to_unit": "unit"}),
    BaseOp("time_difference", "utilities", "Hours from city_a's time to city_b's.", {"city_a": STR, "city_b": STR},
           _time_difference, ("hours",), kinds={"city_a": "city", "city_b": "city"}),
]}

CATEGORIES = ("directory", "finance", "scheduling", "commerce", "utilities")


# ----------------------------------------------------------------------------- the Tool wrapper

RETURN_SHAPES = ("plain", "wrapped", "status", "renamed")


@dataclass
class Tool:
    """One callable tool: its OpenAI spec and how it maps onto a base operation (or a runner).

    A variant keeps its base's behaviour behind a different interface:
      arg_map   {its parameter: the base parameter}
      extra     parameters the base does not have: {name: value the base ignores; None = optional}
      returns   plain | wrapped ({"result": r}) | status ({"ok": true, "data": r}) | renamed (key_map)
    `runner` replaces the base operation for MCP and external tools (it gets the arguments as given).
    """

    name: str
    description: str
    parameters: dict
    base: str = ""  # the BASE_OPS name ("" for MCP/external tools)
    category: str = ""
    domain: str = ""  # the application domain ("bank", "crm", ...)
    source: str = "synthetic"  # synthetic | mcp | external
    arg_map: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    returns: str = "plain"
    key_map: dict = field(default_factory=dict)
    origin: str = ""  # how it was made: "base", "domain", "evolved: rename_params+constrain", "mcp"
    runner: Callable[[dict], Any] | None = field(default=None, repr=False, compare=False)
    _validator: Any = field(default=None, repr=False, compare=False)

    @property
    def op(self) -> BaseOp | None:
        return BASE_OPS.get(self.base)

    @property
    def mutates(self) -> bool:
        return bool(self.op and self.op.mutates)

    def spec(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    # -- the interface mapping
    def to_base_args(self, args: dict) -> dict:
        return {self.arg_map.get(k, k): v for k, v in args.items() if k not in self.extra}

    def encode_args(self, base_args: dict) -> dict:
        """What a caller who knows the base operation sends to this tool (the planner does this)."""
        inv = {v: k for k, v in self.arg_map.items()}
        out = {inv.get(k, k): v for k, v in base_args.items()}
        for k, default in self.extra.items():
            if default is not None:
                out[k] = default
        return out

    def shape_result(self, r: dict) -> dict:
        if not isinstance(r, dict) or "error" in r:
            return r
        if self.returns == "wrapped":
            return {"result": r}
        if self.returns == "status":
            return {"ok": True, "data": r}
        if self.returns == "renamed":
            return {self.key_map.get(k, k): v for k, v in r.items()}
        return r

    def decode_result(self, r) -> Any:
        """The base-shaped result (what the planner reads), or r unchanged when it is an error or foreign."""
        if not isinstance(r, dict) or "error" in r:
            return r
        if self.returns == "wrapped" and isinstance(r.get("result"), dict):
            return r["result"]
        if self.returns == "status" and isinstance(r.get("data"), dict):
            return r["data"]
        if self.returns == "renamed":
            inv = {v: k for k, v in self.key_map.items()}
            return {inv.get(k, k): v for k, v in r.items()}
        return r

    # -- execution (no stochasticity here: simulators.ToolSimulator adds it)
    def check_args(self, args) -> str | None:
        """None when the arguments fit the schema; else what is wrong (shown to the agent)."""
        if not isinstance(args, dict):
            return "arguments must be a JSON object"
        props = self.parameters.get("properties", {})
        unknown = [k for k in args if k not in props]
        if unknown:
            return f"unexpected argument(s) {unknown}; expected {sorted(props)}"
        if self._validator is None:
            self._validator = _validator_cls()(self.parameters)
        err = next(iter(self._validator.iter_errors(args)), None)
        if err is not None:
            where = ".".join(str(p) for p in err.absolute_path)
            return f"invalid argument{' ' + where if where else ''}: {err.message}"
        return None

    def execute(self, env: Env, args: dict) -> Any:
        """Run the call; returns the result as the agent sees it. Raises for implementation bugs only."""
        problem = self.check_args(args)
        if problem:
            return {"error": problem}
        if self.runner is not None:
            return self.runner(args)
        try:
            r = self.op.fn(env, self.to_base_args(args))
        except ToolFailure as e:
            return {"error": str(e), **e.extra}
        if self.op.mutates:
            env.mutated = True
        return self.shape_result(r)

    # -- persistence (tools.json): enough to rebuild the executable tool
    def to_dict(self) -> dict:
        d = {"spec": self.spec(), "base": self.base, "category": self.category, "domain": self.domain,
             "source": self.source, "origin": self.origin}
        if self.arg_map:
            d["arg_map"] = self.arg_map
        if self.extra:
            d["extra"] = self.extra
        if self.returns != "plain":
            d["returns"] = self.returns
        if self.key_map:
            d["key_map"] = self.key_map
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Tool":
        fn = d["spec"]["function"]
        return cls(name=fn["name"], description=fn.get("description", ""), parameters=fn["parameters"], base=d.get("base", ""),
                   category=d.get("category", ""), domain=d.get("domain", ""), source=d.get("source", "synthetic"),
                   arg_map=d.get("arg_map", {}), extra=d.get("extra", {}), returns=d.get("returns", "plain"),
                   key_map=d.get("key_map", {}), origin=d.get("origin", ""))


def base_tool(op: BaseOp) -> Tool:
    """The canonical tool of a base operation (its own name and schema)."""
    return Tool(name=op.name, description=op.description,
                parameters={"type": "object", "properties": copy.deepcopy(op.params), "required": list(op.params)},
                base=op.name, category=op.category, domain=op.category, origin="base")


def external_tool(spec: dict, source: str, runner: Callable[[dict], Any]) -> Tool:
    """A tool known only by its spec (MCP, --tools FILE), executed by `runner`."""
    name = validate_spec(spec)
    fn = spec["function"]
    return Tool(name=name, description=fn.get("description", "") or "", parameters=fn["parameters"], source=source,
                category=source, domain=source, origin=source, runner=runner)


def echo_runner(name: str) -> Callable[[dict], dict]:
    """The tool simulator's stand-in for a tool known only by its spec: it acknowledges the call."""
    def run(args: dict) -> dict:
        return {"status": "ok", "tool": name, **{k: v for k, v in list(args.items())[:3]}}
    return run


def load_external_specs(path) -> list[dict]:
    """--tools FILE: a JSON list of OpenAI function tools or MCP tools ({name, description, inputSchema})."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise K2Error(f"tool spec file not found: {p}", "pass a JSON file with a list of tool specs")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise K2Error(f"{p} is not valid JSON: {e}", "write a JSON list of tool specs")
    if isinstance(data, dict):
        data = data.get("tools", [data])
    specs = []
    for item in data if isinstance(data, list) else []:
        if isinstance(item, dict) and "inputSchema" in item:  # MCP shape
            item = {"type": "function", "function": {"name": item.get("name"), "description": item.get("description") or "",
                                                     "parameters": item["inputSchema"]}}
        elif isinstance(item, dict) and "function" not in item and "name" in item:  # a bare function
            item = {"type": "function", "function": item}
        validate_spec(item)
        specs.append(item)
    if not specs:
        raise K2Error(f"{p} has no tool specs", "write a JSON list of OpenAI function tools")
    return specs
