"""Options every stage command shares: --preset, --recipe, --set, --out, --force."""

from __future__ import annotations

import functools

import rich_click as click

from k2cli.console import print_recipe
from k2cli.recipes import resolve_recipe, to_dict


def recipe_options(stage: str, recipe_cls, default_preset: str | None = "tiny"):
    """Add --preset/--recipe/--set to a command; it receives `recipe` (resolved) and `recipe_source`."""

    def decorate(fn):
        @click.option("--preset", default=default_preset, show_default=True, help=f"Recipe preset: recipes/PRESET/{stage}.toml.")
        @click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False), default=None, help="A recipe TOML file (instead of the preset).")
        @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value, e.g. --set train.lr=3e-3 (repeatable).")
        @functools.wraps(fn)
        def wrapper(*args, preset, recipe_file, overrides, **kwargs):
            recipe, source = resolve_recipe(recipe_cls, stage, preset, recipe_file, overrides)
            print_recipe(stage, to_dict(recipe), source)
            return fn(*args, recipe=recipe, recipe_source=source, **kwargs)

        return wrapper

    return decorate


def out_options(fn):
    fn = click.option("--force", is_flag=True, help="Replace a non-empty --out directory.")(fn)
    fn = click.option("--out", default=None, metavar="REF", help="Output: a directory path, or a name to version under the artifacts root.")(fn)
    return fn
