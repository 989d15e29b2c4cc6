"""`k2 artifacts list|show|path|verify|gc`: what exists, where it came from, whether it is intact, and the
leftovers of killed processes."""

from __future__ import annotations

import json

import rich_click as click
from rich.tree import Tree

from k2cli.artifacts import (artifacts_root, lineage, open_artifact, remove_temps, scan_artifacts, stale_temps,
                             temp_dirs, verify_lineage)
from k2cli.console import info, out, table
from k2cli.errors import K2Error


@click.group("artifacts", cls=click.RichGroup)
def artifacts_group():
    """List, inspect and verify versioned artifacts."""


def _size(manifest) -> str:
    n = sum(f.get("bytes", 0) for f in manifest.get("files", {}).values() if isinstance(f, dict))
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@artifacts_group.command("list")
@click.option("--stage", default=None, help="Only this stage.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_cmd(stage, as_json):
    """All artifacts under the artifacts root, oldest first; a damaged one is listed as damaged."""
    found = [(p, a, why) for p, a, why in scan_artifacts() if stage is None or p.parent.name == stage]
    # oldest first, as it says: by creation time (ISO 8601 sorts as text); a damaged one, which has none, by
    # its directory's modification time, in the same order
    found.sort(key=lambda f: f[1].manifest.get("created", "") if f[1] is not None and isinstance(f[1].manifest.get("created"), str)
               else _mtime_iso(f[0]))
    if as_json:
        out.print_json(json.dumps([{"id": a.id, "kind": a.kind, "path": str(p), "created": a.manifest.get("created")}
                                   if a is not None else {"id": f"{p.parent.name}/{p.name}", "path": str(p), "damaged": why}
                                   for p, a, why in found]))
        return
    if not found:
        info(f"no artifacts under {artifacts_root()}")
        return
    rows = [[a.id, a.kind, a.manifest.get("created", ""), _size(a.manifest), str(a.manifest.get("summary", ""))[:60]]
            if a is not None else [f"{p.parent.name}/{p.name}", "[red]damaged[/]", "", "", why[:60]]
            for p, a, why in found]
    out.print(table(f"artifacts in {artifacts_root()}", ["id", "kind", "created", "size", "summary"], rows, right=(3,)))


def _mtime_iso(path) -> str:
    import datetime

    try:
        return datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
    except OSError:
        return ""


@artifacts_group.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def show_cmd(ref, as_json):
    """An artifact's manifest summary and its lineage back to the raw inputs."""
    art = open_artifact(ref)
    m = art.manifest
    if as_json:
        out.print_json(json.dumps(m))
        return
    rows = [
        ["id", art.id],
        ["kind / stage", f"{art.kind} / {art.stage}"],
        ["path", str(art.path)],
        ["created", f"{m.get('created')} by k2cli {m.get('k2cli_version')} (commit {str(m.get('git_commit'))[:10]})"],
        ["files", f"{len(m['files'])} ({_size(m)})"],
        ["summary", m.get("summary", "")],
    ]
    for k, v in (m.get("metrics") or {}).items():
        if not isinstance(v, (dict, list)):
            rows.append([f"metric {k}", v])
    out.print(table(art.id, ["", ""], rows))
    tree = Tree(f"[bold]lineage of {art.id}[/]")
    nodes = {0: tree}
    for depth, node in lineage(art):
        if depth == 0:
            continue
        if isinstance(node, dict):
            label = f"[red]{node.get('id')} (missing: {node.get('path')})[/]"
        else:
            label = f"{node.id} [dim]{node.kind}, {node.manifest.get('summary', '')[:60]}[/]"
        nodes[depth] = nodes[depth - 1].add(label)
    out.print(tree)


@artifacts_group.command("path")
@click.argument("ref")
def path_cmd(ref):
    """Print REF's directory (for scripts: `cat $(k2 artifacts path report:latest)/REPORT.md`)."""
    click.echo(open_artifact(ref).path)


@artifacts_group.command("verify")
@click.argument("ref")
@click.option("--deep", is_flag=True, help="Also verify every artifact up the lineage, and that each is still the "
              "input its child recorded (manifest hashes).")
def verify_cmd(ref, deep):
    """Re-hash every file of an artifact against its manifest (and the manifest against its own hash)."""
    art = open_artifact(ref)
    problems = verify_lineage(art) if deep else art.verify()
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise K2Error(f"{art.id} is damaged: {problems[0]}{more}", "re-run the stage that made it")
    n = sum(1 for _ in lineage(art)) if deep else 1
    info(f"[green]ok[/] {art.id}: {len(art.manifest['files'])} files match their sha256"
         + (f"; {n} artifacts in its lineage intact and unchanged" if deep else ""))


@artifacts_group.command("gc")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
def gc_cmd(dry_run):
    """Remove what killed processes left behind: temporary artifact directories (`.tmp-*`), unfinished
    checkpoints (`.tmp-step-*`), half-made `latest` links. Entries of live processes are kept."""
    stale = [p for d in temp_dirs() for p in stale_temps(d)]
    removed = stale if dry_run else remove_temps(stale)
    for p in removed:
        out.print(("would remove " if dry_run else "removed ") + str(p), soft_wrap=True, highlight=False)
    info(f"{len(removed)} stale entr{'y' if len(removed) == 1 else 'ies'} under {artifacts_root()}"
         + (" (dry run)" if dry_run else ""))


COMMANDS = [artifacts_group]
