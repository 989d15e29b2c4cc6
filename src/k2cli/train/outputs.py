"""What every training stage leaves behind: a run directory while it runs, a model artifact when done."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from k2cli.artifacts import ArtifactWriter, artifacts_root
from k2cli.model.io import copy_tokenizer_files, save_model_files
from k2cli.train.progress import read_metrics
from k2cli.train.plots import plot_expert_load, plot_loss, plot_max_logits


def run_dir_for(stage: str, recipe: dict, inputs: list[str]) -> Path:
    """<root>/<stage>/runs/<id>: the same recipe on the same inputs is the same run (and resumes)."""
    key = json.dumps({"recipe": recipe, "inputs": inputs}, sort_keys=True, default=str)
    return artifacts_root() / stage / "runs" / hashlib.sha256(key.encode()).hexdigest()[:12]


def write_model_outputs(
    w: ArtifactWriter,
    model,
    tokenizer_dir: Path,
    run_dir: Path,
    title: str,
    summary: list[str],
    tau: float | None = None,
    reference: dict | None = None,
    chat_template: str | None = None,
) -> None:
    """Weights, config, tokenizer, metrics.jsonl (and TensorBoard event files), plots and summary.md into the artifact."""
    save_model_files(model, w.dir)
    copy_tokenizer_files(tokenizer_dir, w.dir)
    metrics = Path(run_dir) / "metrics.jsonl"
    history = read_metrics(metrics)  # the whole run, including steps before a resume
    if metrics.exists():
        shutil.copy2(metrics, w.dir / "metrics.jsonl")
    if (Path(run_dir) / "tensorboard").is_dir():  # train.track=tensorboard: the event files travel with the model
        shutil.copytree(Path(run_dir) / "tensorboard", w.dir / "tensorboard")
    plots = []
    if history:
        plots.append(plot_loss(history, w.dir / "loss.png", f"{title}: loss", reference))
        plots.append(plot_max_logits(history, w.dir / "max_logit.png", tau, f"{title}: max attention logit per layer"))
        plots.append(plot_expert_load(history, w.dir / "expert_load.png"))
    lines = [f"# {title}", ""] + summary + [""]
    lines += [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    (w.dir / "summary.md").write_text("\n".join(lines) + "\n")
