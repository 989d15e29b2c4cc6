"""Tool worlds for `k2 chat --tools`: executable tools the model's calls are run against.

The interface is deliberately tiny, so any environment can plug in:

    ToolWorld = dict[name, (schema, fn)]   schema: an OpenAI function tool
                                            ({"type": "function", "function": {name, description, parameters}})
                                            fn(arguments: dict) -> anything JSON-serialisable

    tool_schemas(world) -> the `tools` list sent with the conversation
    execute(world, call) -> the tool message content (a JSON string); never raises: an unknown tool,
                            bad arguments or a failing tool become {"error": "..."} for the model to read

`load_tool_world(ref)` builds one from a dataset artifact. Adapter point: the agentic pipeline
(`k2cli.agentic`) owns the real environments over the synthetic world; when it exposes a public
"tools of a dataset" function, `_agentic_world` should return its tools wrapped as above and
take precedence. Until then the fallback is a read-only directory over `world.json`
(people, cities, organisations), enough to chat with a model about the world it was trained on.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable

from k2cli.errors import K2Error

ToolWorld = dict[str, tuple[dict, Callable[[dict], Any]]]


def tool(name: str, description: str, properties: dict, required: list[str] | None = None) -> dict:
    """An OpenAI function-tool schema."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(properties) if required is None else required}}}


def tool_schemas(world: ToolWorld) -> list[dict]:
    return [schema for schema, _ in world.values()]


def execute(world: ToolWorld, name: str, arguments) -> str:
    """Run one call; the result (or the error) as the JSON text of a tool message."""
    if name not in world:
        return json.dumps({"error": f"unknown tool {name!r}; available: {', '.join(sorted(world))}"})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            return json.dumps({"error": f"arguments are not valid JSON ({e.msg})"})
        except RecursionError:
            return json.dumps({"error": "arguments are nested too deeply"})
    if not isinstance(arguments, dict):
        return json.dumps({"error": "arguments must be a JSON object"})
    schema, fn = world[name]
    params = schema["function"].get("parameters", {})
    missing = [k for k in params.get("required", []) if k not in arguments]
    unknown = [k for k in arguments if k not in params.get("properties", {})]
    if missing or unknown:
        return json.dumps({"error": f"{name}: missing {missing}, unexpected {unknown}"})
    try:
        return json.dumps(fn(arguments), ensure_ascii=False)
    except K2Error as e:
        return json.dumps({"error": e.message})
    except Exception as e:  # a tool bug must not end the chat; the model (and the user) see it
        return json.dumps({"error": f"{type(e).__name__}: {e}"})


def load_tool_world(ref: str) -> ToolWorld:
    world = _agentic_world(ref)
    return world if world is not None else directory_world(ref)


def _agentic_world(ref: str) -> ToolWorld | None:
    """Adapter for k2cli.agentic's tool environments; None while it exposes none."""
    try:
        from k2cli import agentic
    except ImportError:
        return None
    make = getattr(agentic, "tool_world", None)  # expected: tool_world(ref) -> ToolWorld (same shape as here)
    if make is None or not callable(make) or len(inspect.signature(make).parameters) < 1:
        return None
    return make(ref)


def directory_world(ref: str) -> ToolWorld:
    """Look-ups over the synthetic world of a dataset artifact (or a world.json file)."""
    from k2cli.data.world import load_world

    w = load_world(ref)
    people = {p.name.lower(): p for p in w.people}
    cities = {c.name.lower(): c for c in w.cities}
    orgs = {o.name.lower(): o for o in w.organisations}

    def find(table: dict, kind: str, name: str):
        hit = table.get(str(name).strip().lower())
        if hit is None:
            raise K2Error(f"no {kind} named {name!r}")
        return hit

    def person(args):
        p = find(people, "person", args["name"])
        return {"id": p.id, "name": p.name, **w.attributes(p), "email": p.email, "phone": p.phone}

    def city(args):
        c = find(cities, "city", args["name"])
        return {"id": c.id, "name": c.name, "country": c.country, "calling_code": c.calling_code,
                "population": c.population, "utc_offset": c.utc_offset}

    def organisation(args):
        o = find(orgs, "organisation", args["name"])
        return {"id": o.id, "name": o.name, "kind": o.kind, "industry": o.industry,
                "headquarters": w.city(o.hq_city_id).name, "founded": o.founded, "domain": o.domain,
                "headcount": o.headcount}

    name = {"name": {"type": "string"}}
    return {
        "find_person": (tool("find_person", "Look up a person of the directory by full name.", {"name": {"type": "string", "description": "full name"}}), person),
        "city_info": (tool("city_info", "Country, calling code, population and UTC offset of a city.", name), city),
        "organisation_info": (tool("organisation_info", "Facts about a company or university.", name), organisation),
    }
