"""Options every stage command shares: --preset, --recipe, --set; --out, --force (--resume, --restart) -> RunOptions."""

from __future__ import annotations

import dataclasses
import functools

import rich_click as click

from k2cli.console import print_recipe
from k2cli.recipes import resolve_recipe, to_dict


def example_override(recipe_cls) -> str:
    """A valid `--set` example for this recipe: its learning rate or step count if it trains, else the
    first value of its first section."""
    fields = {f.name: f for f in dataclasses.fields(recipe_cls)}
    for section, key, value in (("optim", "lr", "3e-3"), ("train", "steps", "100")):
        if section in fields and key in {f.name for f in dataclasses.fields(fields[section].default_factory())}:
            return f"{section}.{key}={value}"
    for f in fields.values():
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(section := f.default_factory()):
            for leaf in dataclasses.fields(section):
                value = getattr(section, leaf.name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return f"{f.name}.{leaf.name}={value}"
    return "seed=1"


def recipe_options(stage: str, recipe_cls, default_preset: str | None = "tiny"):
    """Add --preset/--recipe/--set to a command; it receives `recipe` (resolved) and `recipe_source`."""
    example = example_override(recipe_cls)

    def decorate(fn):
        @click.option("--preset", default=default_preset, show_default=True, help=f"Recipe preset: recipes/PRESET/{stage}.toml.")
        @click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False), default=None, help="A recipe TOML file (instead of the preset).")
        @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=f"Override a recipe value, e.g. --set {example} (repeatable).")
        @functools.wraps(fn)
        def wrapper(*args, preset, recipe_file, overrides, **kwargs):
            recipe, source = resolve_recipe(recipe_cls, stage, preset, recipe_file, overrides)
            print_recipe(stage, to_dict(recipe), source)
            return fn(*args, recipe=recipe, recipe_source=source, **kwargs)

        return wrapper

    return decorate


def run_options(resume: bool = False, restart: str = ""):
    """Add --out/--force (a training stage, `resume`: --resume and --restart; `restart`: --restart with
    this help); the command receives `opts`, a RunOptions that also carries k2's --root and --reuse
    (the group's `ctx.obj`)."""

    def decorate(fn):
        @click.option("--out", default=None, metavar="REF", help="Output: a directory path, or a name to version under the artifacts root.")
        @click.option("--force", is_flag=True, help="Replace a non-empty --out directory.")
        @functools.wraps(fn)
        def wrapper(*args, out, force, resume_flag=False, restart=False, **kwargs):
            from k2cli.stages.runner import RunOptions

            group = click.get_current_context().find_root().obj or {}
            opts = RunOptions(out=out, force=force, resume="yes" if resume_flag else "no" if restart else "auto",
                              reuse=bool(group.get("reuse")), root=group.get("root"))
            return fn(*args, opts=opts, **kwargs)

        if resume or restart:
            wrapper = click.option("--restart", is_flag=True, help=restart or "Discard this run's checkpoints and start over.")(wrapper)
        if resume:
            wrapper = click.option("--resume", "resume_flag", is_flag=True, help="Require a checkpoint of this run to continue from.")(wrapper)
        return wrapper

    return decorate
