"""Terminal output: one rich console for humans (stderr), stdout kept for data (JSON, tables)."""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console
from rich.table import Table

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def quiet() -> bool:
    return bool(os.environ.get("K2_QUIET"))


def info(msg: str) -> None:
    if not quiet():
        err.print(msg)


def print_recipe(title: str, recipe: dict, source: str) -> None:
    """Print the fully resolved recipe at the start of a stage (it is also stored in the manifest)."""
    if quiet():
        return
    err.print(f"[bold]{title}[/] recipe [dim]({source})[/]")
    for section, values in recipe.items():
        if isinstance(values, dict):
            flat = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
            err.print(f"  [cyan]{section}[/] {flat}", soft_wrap=True)
        else:
            err.print(f"  [cyan]{section}[/] = {_short(values)}")


def _short(v) -> str:
    text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return text if len(text) <= 80 else text[:77] + "..."


def table(title: str, columns: list[str], rows: list[list], right: tuple[int, ...] = ()) -> Table:
    t = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for i, c in enumerate(columns):
        t.add_column(c, justify="right" if i in right else "left")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def isatty() -> bool:
    return sys.stderr.isatty()
