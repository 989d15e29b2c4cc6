"""What a training run shows and records: a rich live line, metrics.jsonl (the MFU peak: mfu.py)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from k2cli.console import err, quiet


class MetricsLog:
    """Append-only metrics.jsonl; on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    raise TypeError(type(x))


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TrainProgress:
    """step n/N, loss, tok/s, ETA — live on a terminal, a line every few steps otherwise."""

    def __init__(self, title: str, total: int, start: int, enabled: bool = True):
        self.enabled = enabled and not quiet()
        self.live = self.enabled and err.is_terminal
        self.total = total
        self.last_print = 0.0
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("{task.fields[extra]}"),
                TimeRemainingColumn(),
                console=err,
                transient=False,
            )
            self.task = self.progress.add_task(title, total=total, completed=start, loss="-", tps="-", extra="")
            self.progress.start()
        self.title = title

    def update(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        loss = f"{m['loss']:.4f}" if "loss" in m else "-"
        tps = f"{m.get('tokens_per_s', 0):,.0f}"
        extra = " ".join(f"{k} {m[k]:.3g}" for k in ("val_loss", "max_logit", "reward") if k in m)
        if self.live:
            self.progress.update(self.task, completed=step, loss=loss, tps=tps, extra=extra)
        elif time.time() - self.last_print > 10 or step == self.total:
            self.last_print = time.time()
            err.print(f"{self.title} step {step}/{self.total} loss {loss} {tps} tok/s {extra}")

    def close(self) -> None:
        if self.live:
            self.progress.stop()

