"""Hierarchical synthetic tool generation, then evolution (K2 section 3.1.1, at small scale).

    categories (directory, finance, scheduling, commerce, utilities)
      -> application domains per category (bank, payroll, wallet, ...; the first is canonical)
         -> domain tools: every base operation of the category, named and described for the domain,
            with the domain's parameter names
            -> evolved variants: 1-3 mutations drawn per variant from
                 rename_params   a parameter gets another name (name -> full_name)
                 add_optional    an extra optional parameter the operation ignores (note, lang, ...)
                 add_required    an extra required parameter with one allowed value (currency = EUR)
                 constrain       JSON Schema constraints on a parameter (pattern, minimum, maxLength)
                 reshape         another return shape (wrapped, status, renamed keys)
                 rename_tool     another verb in the tool's name

Every variant wraps its base implementation (`tools.Tool`: arg_map / extra / returns), so it
is executable, and every spec is validated (OpenAI shape + the Draft 2020-12 meta-schema).
Distinct means: a new name and a new interface (parameters + return shape); duplicates of an
interface are redrawn.

Held out (never given to a training agent): the last application domain of every category and
a seeded fraction of the other variants — the tools of the "unseen" evaluation tasks.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field

from k2cli.agentic.tools import BASE_OPS, CATEGORIES, Tool, base_tool, validate_spec
from k2cli.errors import K2Error

# category -> application domains (the first is canonical: its tools are the base tools themselves)
DOMAINS = {
    "directory": ["directory", "crm", "hr", "alumni", "phonebook", "staff"],
    "finance": ["bank", "payroll", "wallet", "ledger", "treasury", "credit"],
    "scheduling": ["calendar", "agenda", "meetings", "planner", "office", "events"],
    "commerce": ["shop", "store", "warehouse", "market", "supply", "retail"],
    "utilities": ["utils", "clock", "calc", "converter", "helper", "toolkit"],
}
DOMAIN_LABEL = {"crm": "CRM", "hr": "HR", "alumni": "Alumni", "phonebook": "Phonebook", "staff": "Staff", "payroll": "Payroll",
                "wallet": "Wallet", "ledger": "Ledger", "treasury": "Treasury", "credit": "Credit", "agenda": "Agenda",
                "meetings": "Meetings", "planner": "Planner", "office": "Office", "events": "Events", "store": "Store",
                "warehouse": "Warehouse", "market": "Market", "supply": "Supply", "retail": "Retail", "clock": "Clock",
                "calc": "Calc", "converter": "Converter", "helper": "Helper", "toolkit": "Toolkit"}
# domain-level parameter names (what a CRM calls a person's name, ...): base parameter -> name; a
# rename applies only where the parameter holds what the key's kind says (a company's "name" is no employee)
DOMAIN_PARAMS = {
    "crm": {"name": "contact"}, "hr": {"name": "employee", "person_id": "employee_id"}, "alumni": {"name": "member"},
    "payroll": {"name": "employee", "account": "account_id"}, "wallet": {"account": "wallet_id"},
    "ledger": {"from_account": "debit", "to_account": "credit"}, "agenda": {"date": "day"},
    "meetings": {"meeting_id": "booking_id"}, "store": {"product": "item"}, "warehouse": {"product": "sku"},
    "market": {"customer": "buyer"}, "clock": {"date": "day"}, "calc": {"value": "x"},
}
# parameter synonyms for rename_params: by the kind of the base parameter first, then by its current name
KIND_SYNONYMS = {"company": ["company", "company_name", "org"], "product": ["item", "product_name"]}
PARAM_SYNONYMS = {
    "name": ["full_name", "person_name", "who"], "contact": ["contact_name", "client"], "employee": ["employee_name", "staff_name"],
    "member": ["member_name"], "person_id": ["pid", "person"], "employee_id": ["emp_id"],
    "account": ["acct", "account_no"], "account_id": ["acct_id"], "wallet_id": ["wallet"],
    "from_account": ["source", "from_acct", "payer"], "to_account": ["target", "to_acct", "payee"],
    "debit": ["debit_account"], "credit": ["credit_account"], "amount": ["value", "sum", "amount_eur"],
    "city": ["city_name", "location", "town"], "date": ["on_date", "when"], "day": ["on_day"],
    "meeting_id": ["mid", "event_id"], "booking_id": ["booking"], "product": ["item", "product_name"], "item": ["item_name"],
    "sku": ["sku_name"], "quantity": ["qty", "count", "units"], "customer": ["client", "customer_name"], "buyer": ["buyer_name"],
    "order_id": ["order", "order_ref"], "start": ["from_date", "begin"], "end": ["to_date", "until"], "days": ["n_days", "offset"],
    "value": ["quantity_in", "amount"], "x": ["input"], "from_unit": ["unit_in", "source_unit"], "to_unit": ["unit_out", "target_unit"],
    "city_a": ["from_city", "origin"], "city_b": ["to_city", "destination"],
}
# result-key synonyms for the "renamed" return shape
KEY_SYNONYMS = {
    "person_id": "id", "employer": "company", "city": "work_city", "email": "mail", "phone": "tel", "company_id": "id",
    "industry": "sector", "hq_city": "headquarters", "country": "nation", "calling_code": "dial_code", "utc_offset": "tz",
    "account": "account_no", "balance": "available", "status": "state", "meeting_id": "booking", "meetings": "items",
    "stock": "in_stock", "price": "unit_price", "order_id": "order", "total": "amount_due", "product": "item",
    "days": "n_days", "date": "result_date", "weekday": "day_name", "value": "converted", "hours": "offset_hours",
}
OPTIONAL_EXTRAS = [
    ("note", {"type": "string"}), ("lang", {"type": "string", "enum": ["en", "de", "fr"]}), ("verbose", {"type": "boolean"}),
    ("request_id", {"type": "string"}), ("trace", {"type": "boolean"}),
]
REQUIRED_EXTRAS = {  # category -> (name, schema, the one value)
    "finance": [("currency", {"type": "string", "enum": ["EUR"]}, "EUR")],
    "commerce": [("channel", {"type": "string", "enum": ["web"]}, "web")],
    "scheduling": [("confirm", {"type": "boolean", "const": True}, True)],
    "directory": [("version", {"type": "integer", "const": 2}, 2)],
    "utilities": [("format", {"type": "string", "enum": ["iso"]}, "iso")],
}
CONSTRAINTS = {  # the kind of a base parameter -> schema keywords
    "name": {"minLength": 3, "maxLength": 80}, "company": {"minLength": 2}, "person_id": {"pattern": "^P[0-9]{6}$"},
    "account": {"pattern": "^ACC[0-9]{6}$"}, "amount": {"minimum": 1, "maximum": 100000}, "city": {"maxLength": 40},
    "date": {"pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}, "count": {"minimum": 1, "maximum": 1000},
    "meeting_id": {"pattern": "^M[0-9]{4}$"}, "order_id": {"pattern": "^R[0-9]{4}$"}, "product": {"maxLength": 40},
    "number": {"minimum": -1000000}, "unit": {},
}
VERBS = {"find": ["lookup", "search"], "get": ["fetch", "read"], "check": ["query", "lookup"], "list": ["show", "fetch"],
         "place": ["create", "submit"], "book": ["schedule", "reserve"], "cancel": ["drop", "void"], "add": ["shift", "offset"],
         "convert": ["translate"], "transfer": ["send", "move"]}
MUTATIONS = ("rename_params", "add_optional", "add_required", "constrain", "reshape", "rename_tool")


@dataclass
class ToolGenConfig:
    """Recipe section `tools`."""

    count: int = 1200  # synthetic tools to reach (domain tools + evolved variants)
    max_mutations: int = 3  # per evolved variant: 1..max_mutations drawn
    heldout_domains: int = 1  # per category: the last N application domains are held out (unseen tools)
    heldout_fraction: float = 0.1  # of the other evolved variants, held out too

    def validate(self) -> "ToolGenConfig":
        if self.count < len(BASE_OPS):
            raise K2Error(f"tools.count={self.count} is below the {len(BASE_OPS)} base tools", f"use tools.count >= {len(BASE_OPS)}")
        if not 0 <= self.heldout_fraction < 1 or not 0 <= self.heldout_domains < len(next(iter(DOMAINS.values()))) - 1:
            raise K2Error("tools.heldout_fraction must be in [0, 1) and tools.heldout_domains leave the canonical domain and one more",
                          "e.g. heldout_domains = 1, heldout_fraction = 0.1")
        if self.max_mutations < 1:
            raise K2Error("tools.max_mutations must be at least 1", "e.g. 3")
        return self


@dataclass
class ToolSet:
    tools: list[Tool]
    heldout: set[str] = field(default_factory=set)  # names of tools no training agent may use
    stats: dict = field(default_factory=dict)

    def by_name(self) -> dict[str, Tool]:
        return {t.name: t for t in self.tools}


def _signature(t: Tool) -> str:
    """The interface of a tool within its domain: two tools with the same signature are not distinct."""
    return json.dumps([t.domain, t.base, t.parameters, t.returns, t.key_map, sorted(t.extra)], sort_keys=True)


# which operation defines the kind a DOMAIN_PARAMS key stands for ("name" = a person's name, as in find_person)
_KIND_REF = {"name": "find_person", "person_id": "get_contact", "account": "get_balance", "from_account": "transfer",
             "to_account": "transfer", "date": "weekday", "meeting_id": "cancel_meeting", "product": "check_stock",
             "customer": "place_order", "value": "convert_units"}


def domain_tool(op_name: str, domain: str) -> Tool:
    """The tool of base operation `op_name` in application domain `domain` (canonical = the base tool)."""
    op = BASE_OPS[op_name]
    t = base_tool(op)
    t.domain = domain
    if domain == DOMAINS[op.category][0]:
        return t
    renames = {p: n for p, n in DOMAIN_PARAMS.get(domain, {}).items()
               if p in op.params and op.kinds.get(p) == BASE_OPS[_KIND_REF[p]].kinds[p]}
    props, required = {}, []
    for p, schema in op.params.items():
        q = renames.get(p, p)
        props[q] = copy.deepcopy(schema)
        required.append(q)
    t.name = f"{domain}_{op_name}"
    t.description = f"{DOMAIN_LABEL.get(domain, domain)}: {op.description[0].lower()}{op.description[1:]}"
    t.parameters = {"type": "object", "properties": props, "required": required}
    t.arg_map = {renames[p]: p for p in renames}
    t.origin = "domain"
    return t


def evolve(parent: Tool, rng: random.Random, n_mutations: int, taken: set[str]) -> Tool | None:
    """One evolved variant of `parent` (None when the draw produced nothing new)."""
    t = Tool.from_dict(json.loads(json.dumps(parent.to_dict())))  # a deep copy without the cached validator
    op = BASE_OPS[t.base]
    inv = {v: k for k, v in t.arg_map.items()}  # base param -> current name
    applied = []
    for m in rng.sample(MUTATIONS, k=min(n_mutations, len(MUTATIONS))):
        props, required = t.parameters["properties"], t.parameters["required"]
        if m == "rename_params":
            p = rng.choice(list(op.params))
            cur = inv.get(p, p)
            syn = KIND_SYNONYMS.get(op.kinds.get(p, ""), []) if cur == p else []
            options = [s for s in (syn or PARAM_SYNONYMS.get(cur, [])) if s not in props and s != cur]
            if not options:
                continue
            new = rng.choice(options)
            props[new] = props.pop(cur)
            t.parameters["required"] = [new if r == cur else r for r in required]
            t.arg_map.pop(cur, None)
            t.arg_map[new] = p
            inv[p] = new
        elif m == "add_optional":
            name, schema = rng.choice(OPTIONAL_EXTRAS)
            if name in props:
                continue
            props[name] = copy.deepcopy(schema)
            t.extra[name] = None
        elif m == "add_required":
            name, schema, value = rng.choice(REQUIRED_EXTRAS[op.category])
            if name in props:
                continue
            props[name] = copy.deepcopy(schema)
            required.append(name)
            t.extra[name] = value
        elif m == "constrain":
            p = rng.choice(list(op.params))
            extra = CONSTRAINTS.get(op.kinds.get(p, ""), {})
            cur = inv.get(p, p)
            if not extra or all(k in props[cur] for k in extra):
                continue
            props[cur].update(extra)
        elif m == "reshape":
            shape = rng.choice([s for s in ("wrapped", "status", "renamed") if s != t.returns])
            t.returns = shape
            t.key_map = {k: KEY_SYNONYMS[k] for k in op.returns if k in KEY_SYNONYMS} if shape == "renamed" else {}
        elif m == "rename_tool":
            verb = op.name.split("_")[0]
            if verb not in VERBS:
                continue
            t.name = t.name.replace(op.name, rng.choice(VERBS[verb]) + op.name[len(verb):], 1)
        applied.append(m)
    if not applied:
        return None
    stem, k = t.name, 2
    while f"{stem}_v{k}" in taken:
        k += 1
    t.name = f"{stem}_v{k}"
    t.origin = "evolved: " + "+".join(applied)
    if "rename_params" in applied or "rename_tool" in applied:
        t.description = parent.description
    return t


def generate_tools(cfg: ToolGenConfig, seed: int) -> ToolSet:
    """Categories -> domains -> domain tools -> evolved variants, until `cfg.count` distinct valid tools."""
    cfg.validate()
    rng = random.Random(f"{seed}:toolgen")
    tools: list[Tool] = []
    names: set[str] = set()
    sigs: set[str] = set()
    heldout: set[str] = set()
    heldout_domains = {d for c in CATEGORIES for d in DOMAINS[c][len(DOMAINS[c]) - cfg.heldout_domains:]} if cfg.heldout_domains else set()
    for cat in CATEGORIES:
        for dom in DOMAINS[cat]:
            for op in (o for o in BASE_OPS.values() if o.category == cat):
                t = domain_tool(op.name, dom)
                tools.append(t)
                names.add(t.name)
                sigs.add(_signature(t))
                if dom in heldout_domains:
                    heldout.add(t.name)
    n_domain = len(tools)
    parents = list(tools)
    attempts, dupes = 0, 0
    while len(tools) < cfg.count:
        attempts += 1
        if attempts > 50 * cfg.count:
            raise K2Error(f"could only evolve {len(tools)} distinct tools of the {cfg.count} asked", "lower tools.count")
        parent = parents[attempts % len(parents)] if attempts <= len(parents) else rng.choice(parents)
        child = evolve(parent, rng, rng.randint(1, cfg.max_mutations), names)
        if child is None:
            continue
        sig = _signature(child)
        if sig in sigs or child.name in names:
            dupes += 1
            continue
        tools.append(child)
        names.add(child.name)
        sigs.add(sig)
        if parent.name in heldout or (child.domain not in heldout_domains and rng.random() < cfg.heldout_fraction):
            heldout.add(child.name)
    for t in tools:
        validate_spec(t.spec())
    by_cat = {c: sum(t.category == c for t in tools) for c in CATEGORIES}
    stats = {"tools_synthetic": len(tools), "tools_domain": n_domain, "tools_evolved": len(tools) - n_domain,
             "tools_heldout": len(heldout), "tool_domains": sum(len(v) for v in DOMAINS.values()),
             "tool_categories": len(CATEGORIES), "evolution_duplicates_redrawn": dupes,
             **{f"tools_{c}": n for c, n in by_cat.items()}}
    return ToolSet(tools, heldout, stats)
