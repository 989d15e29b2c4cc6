"""Stage recipes: TOML files loaded into typed dataclasses, with `--set key=value` overrides.

Every stage declares its recipe as a dataclass whose fields are sections (themselves
dataclasses) or plain values. A recipe is resolved in three layers:

    defaults of the dataclass  <-  recipes/<preset>/<stage>.toml (or --recipe FILE)  <-  --set a.b=c

A section may name a `preset` (for instance `[model] preset = "tiny"`): the section then
starts from that preset and the remaining keys override it. Unknown keys and values of
the wrong type are errors that name the key and suggest the closest valid one.

Values are checked once, by ONE walk at resolve time (`validate`): every section's own
`validate()` (its ranges), children first, then the recipe's `validate()` if it has one (checks
that span sections, e.g. rl's rollouts per step against samples per prompt). The stage runner
walks again, for recipes built in Python.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import tomllib
import types
import typing
from pathlib import Path

from k2cli.errors import K2Error, did_you_mean


# ----------------------------------------------------------------------------- where recipes live


def recipes_dir() -> Path:
    """`$K2_RECIPES`, else `./recipes` when it exists, else the recipes shipped with the package.

    The shipped ones are the repository's top-level `recipes/`, packaged as
    `k2cli/builtin_recipes` (a link in the source tree, real files in a wheel). `stages/` at
    the top of the repository links to `recipes/` too, so older `--recipe stages/...` commands
    still work; `$K2_STAGES` is read as an alias of `$K2_RECIPES`.
    """
    env = os.environ.get("K2_RECIPES") or os.environ.get("K2_STAGES")
    if env:
        return Path(env)
    here = Path.cwd() / "recipes"
    if here.is_dir():
        return here
    return Path(str(importlib.resources.files("k2cli") / "builtin_recipes"))


def presets_for(stage: str) -> list[str]:
    root = recipes_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / f"{stage}.toml").is_file())


def recipe_path(stage: str, preset: str) -> Path:
    path = recipes_dir() / preset / f"{stage}.toml"
    if not path.is_file():
        have = presets_for(stage)
        raise K2Error(
            f"unknown preset '{preset}' for stage '{stage}' (no {path})",
            did_you_mean(preset, have) if have else f"no preset has a {stage}.toml under {recipes_dir()}; pass --recipe FILE",
        )
    return path


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise K2Error(f"recipe file not found: {path}", "check the --recipe path")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise K2Error(f"cannot parse recipe {path}: {e}", "fix the TOML syntax")


# ----------------------------------------------------------------------------- typed building


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _optional_inner(tp):
    """For `X | None` return X, else None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value, tp, key: str, what: str = "recipe key"):
    """Check (and where lossless, convert) `value` to type `tp`; raise K2Error otherwise. `what` names `key` in
    messages ("recipe key", or "model.json field" for a stored model config)."""
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, inner, key, what)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise K2Error(f"{what} '{key}' is a section; got {value!r}", f"set its fields, e.g. {key}.<field>=...")
        return build(tp, value, prefix=key, what=what)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp) or (typing.Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise K2Error(f"{what} '{key}' expects a list, got {value!r}", f"write e.g. {key}=[1, 2]")
        return [coerce(v, item, f"{key}[{i}]", what) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise K2Error(f"{what} '{key}' expects a table, got {value!r}", f"write e.g. {key}={{a = 1}}")
        _, vt = typing.get_args(tp) or (str, typing.Any)
        return {str(k): coerce(v, vt, f"{key}.{k}", what) for k, v in value.items()}
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise K2Error(f"{what} '{key}' expects {_type_name(tp)}, got {value!r}", f"give {key} a {_type_name(tp)} value")


def build(cls, table: dict, prefix: str = "", what: str = "recipe key"):
    """Build dataclass `cls` from a (possibly partial) TOML table."""
    table = dict(table)
    preset = table.pop("preset", None)
    if preset is not None and hasattr(cls, "from_preset"):
        obj = cls.from_preset(preset)
    elif preset is not None:
        raise K2Error(f"section '{prefix or cls.__name__}' does not take a preset", "remove the 'preset' key")
    else:
        obj = cls()
    return update(obj, table, prefix, what)


def update(obj, table: dict, prefix: str = "", what: str = "recipe key"):
    """Return a copy of dataclass `obj` with the keys of `table` applied (typed, checked)."""
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            valid = [f"{prefix}.{n}" if prefix else n for n in names]
            raise K2Error(f"unknown {what} '{full}'", did_you_mean(full, valid))
        tp = hints[key]
        current = getattr(obj, key)
        inner = _optional_inner(tp) or tp
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            base = current if current is not None else inner()
            if "preset" in value and hasattr(inner, "from_preset"):
                changes[key] = build(inner, value, full, what)
            else:
                changes[key] = update(base, value, full, what)
        else:
            changes[key] = coerce(value, tp, full, what)
    return dataclasses.replace(obj, **changes)


def _is_count(name: str) -> bool:
    """Fields that count or space things (`train.checkpoint_every`, `keep_checkpoints`, `eval_batches`): never
    negative, whatever section declares them (0 turns an interval off)."""
    return name.endswith(("_every", "_batches")) or name.startswith("keep_")


def validate(recipe, prefix: str = "") -> None:
    """The one validation walk: every nested section's `validate()` (children first), then the recipe's own;
    on the way, no count (`_is_count`) may be negative."""
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate(value, key)
        elif _is_count(f.name) and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise K2Error(f"recipe key '{key}' must be >= 0, got {value}", f"set --set {key}=N (0 turns it off)")
    check = getattr(recipe, "validate", None)
    if callable(check):
        check()


def parse_override(text: str) -> tuple[list[str], object]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as a TOML value, else as a string)."""
    if "=" not in text:
        raise K2Error(f"bad override '{text}'", "write --set section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise K2Error(f"bad override key in '{text}'", "write --set section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def nest(path: list[str], value) -> dict:
    out: dict = value
    for part in reversed(path):
        out = {part: out}
    return out


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def resolve_recipe(cls, stage: str, preset: str | None = None, recipe_file: str | None = None, overrides=()):
    """Resolve a stage recipe. Returns (recipe object, where it came from)."""
    table: dict = {}
    source = "defaults"
    if recipe_file:
        table = read_toml(recipe_file)
        source = str(recipe_file)
    elif preset:
        path = recipe_path(stage, preset)
        table = read_toml(path)
        source = str(path)
    for text in overrides:
        path, value = parse_override(text)
        table = merge(table, nest(path, value))
    recipe = build(cls, table)
    validate(recipe)
    return recipe, source
