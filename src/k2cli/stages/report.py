"""`k2 report REF`: one Markdown page (with its PNGs) telling what each stage of a pipeline did.

Starting from a final artifact — usually the eval artifact of the chain's models — the report
walks the lineage back to the raw inputs and renders, in pipeline order, every stage's
summary, key metrics, timing, recipe highlights and plots, then the evaluation table(s).
A parent that is missing on disk is reported as missing; the rest still renders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import rich_click as click

from k2cli.artifacts import lineage, open_artifact
from k2cli.commands.common import run_options
from k2cli.console import info
from k2cli.stages.runner import RunOptions, Stage

PIPELINE_ORDER = ["import", "model", "synth", "rephrase", "tokenizer", "pretrain", "extend-context", "agentic", "sft", "rl", "eval"]
RECIPE_HIGHLIGHTS = {
    "synth": ["size", "seed"],
    "rephrase": ["rewrites", "backend"],
    "pretrain": ["init", "data.mix", "model.name", "optim.name", "optim.lr", "optim.qk_clip_tau", "train.steps", "train.batch_size", "train.seq_len"],
    "extend-context": ["extend.method", "extend.factor", "extend.beta_fast", "extend.beta_slow", "train.seq_len", "train.steps"],
    "sft": ["optim.name", "optim.lr", "train.steps", "data.mix"],
    "rl": ["rl.objective", "rl.samples_per_prompt", "train.steps", "optim.lr"],
}


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)[:60]
    return str(v)


def _order(art) -> tuple:
    stage = art.stage if not isinstance(art, dict) else "?"
    return (PIPELINE_ORDER.index(stage) if stage in PIPELINE_ORDER else len(PIPELINE_ORDER), art.manifest.get("created", "") if not isinstance(art, dict) else "")


def stage_section(art, images: Path) -> list[str]:
    m = art.manifest
    lines = [f"## {art.stage} — `{art.id}`", "", m.get("summary", "") or "", ""]
    wall = m.get("metrics", {}).get("wall_s")
    facts = [f"created {m.get('created')}" + (f", {wall:.0f} s" if isinstance(wall, (int, float)) else "")]
    for key in RECIPE_HIGHLIGHTS.get(art.stage, []):
        v = _get(m.get("recipe", {}), key)
        if v is not None:
            facts.append(f"{key} = {_fmt(v)}")
    lines.append("_" + "; ".join(facts) + "_")
    lines.append("")
    scalars = [(k, v) for k, v in m.get("metrics", {}).items() if isinstance(v, (int, float, str, bool)) and k != "wall_s"]
    if scalars and art.kind != "eval":
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in scalars[:24]]
        lines.append("")
    slug = art.id.replace("/", "-")  # e.g. midtrain-v1: unique even where two artifacts share a stage
    for png in sorted(art.path.glob("*.png")):
        name = f"{slug}-{png.name}"
        shutil.copy2(png, images / name)
        lines.append(f"![{art.stage} {png.stem}](images/{name})")
    if art.kind == "eval" and art.has("report.md"):
        body = art.file("report.md").read_text().split("\n", 1)[1]  # drop its title
        body = body.replace("](", f"](images/{slug}-")  # its images were copied above
        lines += ["", body]
    return lines + [""]


def build_report(ref: str, opts: RunOptions = RunOptions()):
    with Stage("report", "report", {"ref": ref}, opts) as st:
        top = open_artifact(ref)
        if done := st.up_to_date([top]):
            return done
        return _write_report(st, top)


def _write_report(st: Stage, top):
    nodes, missing = [], []
    for _, node in lineage(top):
        (missing if isinstance(node, dict) else nodes).append(node)
    nodes = sorted({n.path.resolve(): n for n in nodes}.values(), key=_order)
    with st.writer() as w:
        images = w.dir / "images"
        images.mkdir()
        md = ["# k2 pipeline report", "",
              f"From `{top.id}`, back through its lineage: " + " → ".join(f"`{n.id}`" for n in nodes) + ".", ""]
        if missing:
            md += ["> **Missing from disk** (recorded as inputs, not found): "
                   + ", ".join(f"`{m.get('id')}` ({m.get('path')})" for m in missing), ""]
        total = sum(n.manifest.get("metrics", {}).get("wall_s", 0) or 0 for n in nodes
                    if isinstance(n.manifest.get("metrics", {}).get("wall_s"), (int, float)))
        md += [f"Stages: {len(nodes)}; recorded training/processing time {total / 60:.1f} min.", ""]
        for n in nodes:
            md += stage_section(n, images)
        (w.dir / "REPORT.md").write_text("\n".join(md) + "\n")
        w.metrics = {"stages": len(nodes), "missing": len(missing)}
        art = w.commit(summary=f"pipeline report of {top.id} ({len(nodes)} stages)")
    info(f"[green]report[/] {art.path / 'REPORT.md'}" + (f" ([yellow]{len(missing)} missing parent(s)[/])" if missing else ""))
    return art


@click.command("report")
@click.argument("ref")
@run_options()
def report_cmd(ref, opts):
    """Assemble the pipeline report of REF (an eval or model artifact) from its lineage."""
    build_report(ref, opts)


COMMANDS = [report_cmd]
