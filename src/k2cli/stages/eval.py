"""`k2 eval MODEL... --suite ...`: evaluate one or more models side by side.

For each model and suite: does the suite apply (if not, say why and skip it)? run it; then
write an eval artifact with results.json, report.md (the side-by-side table) and PNG plots.
Held-out data comes from `--data` or, by default, from the nearest dataset in each model's
lineage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import rich_click as click

from k2cli import lineage
from k2cli.artifacts import open_artifact
from k2cli.commands.common import recipe_options, run_options
from k2cli.console import info, out as stdout, table
from k2cli.data.loading import absolute_corpus_ref, is_plain_corpus
from k2cli.data.tokenizer import has_tokenizer, load_tokenizer
from k2cli.errors import K2Error
from k2cli.eval.suite import EvalConfig, EvalContext, all_suites, get_suite, parse_suites
from k2cli.model.io import load_model
from k2cli.recipes import to_dict
from k2cli.stages.runner import RunOptions, Stage


@dataclass
class EvalRecipe:
    eval: EvalConfig = field(default_factory=EvalConfig)


def evaluate_model(ref: str, cfg: EvalConfig, suites: list[str], out_dir: Path, label: str) -> dict:
    model, art = load_model(ref, verify=True)
    if not has_tokenizer(art.path):
        raise K2Error(f"model {art.id} has no tokenizer", "evaluate a model trained by k2 (pretrain writes one), or add tokenizer files")
    tokenizer = load_tokenizer(art.path)
    # --data: a dataset artifact (held-out sets), or any corpus (files, a saved dataset, hf:NAME) for perplexity;
    # otherwise the nearest dataset in the model's lineage
    corpus = absolute_corpus_ref(cfg.data) if cfg.data and is_plain_corpus(cfg.data) else ""
    data_art = lineage.dataset(art, ref="" if corpus else cfg.data)
    ctx = EvalContext(model, tokenizer, art, data_art, cfg, out_dir, label, corpus=corpus)
    results = {"label": label, "id": art.id, "stage": art.stage, "suites": {}}
    for name in suites:
        suite = get_suite(name, cfg)
        reason = suite.applies(ctx)
        if reason:
            info(f"[yellow]skip[/] {name} on {label}: {reason}")
            results["suites"][name] = {"skipped": reason}
            continue
        info(f"[bold]{name}[/] on {label} ...")
        r = suite.run(ctx)
        results["suites"][name] = {"metrics": r.metrics, "notes": r.notes, "rows": r.rows[:50],
                                   "plots": [Path(p).name for p in r.plots],
                                   **({"files": [Path(p).name for p in r.files]} if r.files else {})}
    return results


def comparison_rows(all_results: list[dict], suites: list[str]) -> list[list]:
    rows = []
    for name in suites:
        keys: list[str] = []
        for r in all_results:
            for k in r["suites"].get(name, {}).get("metrics", {}):
                if k not in keys and "layer" not in k:
                    keys.append(k)
        if not keys:
            rows.append([name, "(skipped)"] + [r["suites"].get(name, {}).get("skipped", "")[:40] for r in all_results])
        for k in keys:
            cells = []
            for r in all_results:
                v = r["suites"].get(name, {}).get("metrics", {}).get(k)
                cells.append("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
            rows.append([name, k] + cells)
    return rows


def plot_comparison(all_results, suites, path: Path):
    """One bar group per headline metric (accuracies, losses), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = []
    for name in suites:
        for k in ("accuracy", "success_rate", "bits_per_byte", "loss", "max_logit", "mean_reward"):
            if any(k in r["suites"].get(name, {}).get("metrics", {}) for r in all_results):
                metrics.append((name, k))
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.2), dpi=110, squeeze=False)
    for ax, (name, k) in zip(axes[0], metrics):
        vals = [r["suites"].get(name, {}).get("metrics", {}).get(k, 0) or 0 for r in all_results]
        ax.bar(range(len(vals)), vals, color=[f"C{i}" for i in range(len(vals))])
        ax.set_xticks(range(len(vals)), [r["label"] for r in all_results], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{name}\n{k}", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(models: list[str], recipe: EvalRecipe, suites: list[str] | None = None, labels: list[str] | None = None,
        opts: RunOptions = RunOptions()):
    cfg = recipe.eval
    suites = suites or cfg.suites
    with Stage("eval", "eval", to_dict(recipe) | {"suites": suites, "models": models}, opts) as st:
        for s in suites:
            get_suite(s, cfg)  # unknown names fail before any work
        arts = [open_artifact(m, kind="model") for m in models]
        labels = labels or [a.id for a in arts]
        if done := st.up_to_date(list({a.path: a for a in arts}.values())):
            return done, json.loads(done.file("results.json").read_text())["models"]
        with st.writer() as w:
            results = [evaluate_model(m, cfg, suites, w.dir, label) for m, label in zip(models, labels)]
            header = ["suite", "metric"] + labels
            rows = comparison_rows(results, suites)
            (w.dir / "results.json").write_text(json.dumps({"models": results}, indent=2, default=float) + "\n")
            plot = plot_comparison(results, suites, w.dir / "comparison.png")
            md = ["# Evaluation", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
            md.append("")
            for r in results:
                for name, s in r["suites"].items():
                    for note in s.get("notes", []):
                        md.append(f"- {r['label']} / {name}: {note}")
                    for p in s.get("plots", []):
                        md.append(f"\n![{r['label']} {name}]({p})")
            if plot:
                md.append("\n![comparison](comparison.png)")
            (w.dir / "report.md").write_text("\n".join(md) + "\n")
            w.metrics = {f"{r['label']}/{name}/{k}": v for r in results for name, s in r["suites"].items()
                         for k, v in s.get("metrics", {}).items() if "layer" not in k}
            art = w.commit(summary=f"eval of {len(models)} model(s) on {', '.join(suites)}")
    stdout.print(table(f"evaluation ({art.id})", header, rows))
    info(f"[green]wrote[/] {art.path} ({art.id})")
    return art, results


@click.command("eval")
@click.argument("models", nargs=-1)
@click.option("--suite", "suite_names", default=None, help="Comma-separated suites (default: the recipe's eval.suites). "
              "See --list-suites; lm-eval:hellaswag,arc_easy runs lm-evaluation-harness tasks.")
@click.option("--data", default=None, metavar="REF", help="Dataset artifact with held-out sets (default: from each model's "
              "lineage), or any corpus to measure perplexity on: .txt/.jsonl/.parquet files, a folder, a saved dataset, hf:NAME.")
@click.option("--label", "labels", multiple=True, help="A display name per model (repeat in order).")
@click.option("--list-suites", is_flag=True, is_eager=False, help="List the suites and exit.")
@click.option("--unsafe-sandbox", is_flag=True, help="Run model-written code (rl_envs' code env) even where the OS "
              "offers no isolation (= eval.unsafe_sandbox).")
@recipe_options("eval", EvalRecipe)
@run_options()
def eval_cmd(models, suite_names, data, labels, list_suites, unsafe_sandbox, recipe, recipe_source, opts):
    """Evaluate MODEL... (artifact refs) on the chosen suites, side by side."""
    if unsafe_sandbox:
        recipe.eval.unsafe_sandbox = True
    if list_suites:
        for name, s in all_suites().items():
            stdout.print(f"[bold]{name}[/]: {s.description}")
        return
    if not models:
        raise K2Error("no model to evaluate", "name one or more model artifacts, e.g. k2 eval sft:latest rl:latest")
    if data:
        recipe.eval.data = data
    if labels and len(labels) != len(models):
        raise K2Error(f"{len(labels)} --label values for {len(models)} models", "give one --label per model or none")
    suites = parse_suites(suite_names) if suite_names else None
    run(list(models), recipe, suites, labels=list(labels) or None, opts=opts)



COMMANDS = [eval_cmd]
