"""The `k2` command: a thin click group. Each command lives with the code it drives.

Every K2Error raised below is printed as one line and exits with status 2.
"""

from __future__ import annotations

import errno
import os
import sys

import rich_click as click
from rich.markup import escape

from k2cli import __version__
from k2cli.artifacts import using_root
from k2cli.console import err
from k2cli.errors import K2Error

click.rich_click.TEXT_MARKUP = "markdown"
click.rich_click.SHOW_ARGUMENTS = True
click.rich_click.MAX_WIDTH = 100


# The environment's refusals that no stage can do anything about but report: a full disk or quota, a read-only
# file system, a permission denied. Code that knows what it was writing raises its own K2Error first; this net
# catches the rest (a library's write deep in a stage), names the path and the fix, and nothing else: any
# other OSError is a bug and keeps its traceback.
DISK_ERRORS = {
    errno.ENOSPC: "free disk space there, or choose another artifacts root (k2 --root DIR)",
    errno.EDQUOT: "free space within your quota, or choose another artifacts root (k2 --root DIR)",
    errno.EROFS: "the file system is read-only: choose a writable artifacts root (k2 --root DIR)",
    errno.EACCES: "fix the permissions, or choose an artifacts root you can write (k2 --root DIR)",
}


def os_error_line(e: OSError) -> str | None:
    """The one line a disk/permission OSError becomes, or None for any other OSError."""
    if e.errno not in DISK_ERRORS:
        return None
    from k2cli.artifacts import artifacts_root

    where = f": {e.filename}" if e.filename else f" (writing under {artifacts_root()})"
    return f"{e.strerror or os.strerror(e.errno)}{where} ({DISK_ERRORS[e.errno]})"


class K2Group(click.RichGroup):
    """A group that turns K2Error (and a full disk, a read-only or forbidden path) into one clear line and exit
    status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except K2Error as e:
            label = "stopped" if e.exit_code != 2 else "error"
            err.print(f"[bold red]{label}:[/] {escape(e.line())}", soft_wrap=True)  # k2cli[kimi] is text, not markup
            ctx.exit(e.exit_code)
        except OSError as e:
            line = os_error_line(e)
            if line is None:
                raise
            err.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True, highlight=False)
            ctx.exit(2)


@click.group(cls=K2Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="k2")
@click.option(
    "--root",
    type=click.Path(file_okay=False),
    default=None,
    help="Artifacts root directory (default: $K2_ARTIFACTS or ./artifacts).",
)
@click.option(
    "--reuse",
    is_flag=True,
    help="Skip a stage whose latest artifact was made from the same recipe and inputs (make-style): prints 'up to date: ...'.",
)
@click.pass_context
def cli(ctx, root, reuse):
    """**k2** — the Kimi K2 training recipe, end to end, on one machine.

    Pipeline: `data synth` → `rephrase` → `pretrain` → `extend-context` → `agentic` → `sft` → `rl` → `eval` → `report`.
    Every stage reads and writes versioned artifacts under the artifacts root; refer to
    them by path, `stage:vN` or `stage:latest`.
    """
    # Passed on as arguments: every stage command builds its RunOptions from ctx.obj (commands/common.py);
    # the root also holds for the whole command (artifact references, `k2 artifacts`, `k2 serve`).
    ctx.obj = {"root": root, "reuse": reuse}
    ctx.with_resource(using_root(root))


# Modules that contribute commands, in the order of the pipeline. Each exports COMMANDS.
COMMAND_MODULES = [
    "k2cli.commands.model",
    "k2cli.stages.synth",
    "k2cli.stages.rephrase",
    "k2cli.stages.tokenizer",
    "k2cli.stages.pretrain",
    "k2cli.stages.extend_context",
    "k2cli.stages.agentic",
    "k2cli.stages.sft",
    "k2cli.stages.rl",
    "k2cli.stages.eval",
    "k2cli.stages.report",
    "k2cli.stages.serve",
    "k2cli.commands.artifacts",
]


def _register():
    import importlib

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that stage is not part of this build
                continue
            raise
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main():
    cli.main(prog_name="k2")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
