"""Experiment tracking next to metrics.jsonl: TensorBoard and Weights & Biases, both optional.

    train.track = ""                   off (the default): metrics.jsonl and the PNG plots only
                  "tensorboard"        event files under <run dir>/tensorboard (`tensorboard --logdir DIR`)
                  "wandb"              a Weights & Biases run (needs `pip install wandb` and a login, or
                                       WANDB_MODE=offline); project from $WANDB_PROJECT, default "k2"
                  "tensorboard,wandb"  both

Every numeric field of a metrics.jsonl record is logged at its step; a list of numbers (one per
layer, e.g. `max_logit_per_layer`) becomes one scalar per entry (`max_logit_per_layer/3`); deeper
structures (the [layers, experts] load matrix) stay in metrics.jsonl only. A resumed run drops the
tracker's points after its checkpoint's step, as metrics.jsonl does (TensorBoard's purge_step;
W&B resumes the same run id and overwrites nothing it has not logged again).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from k2cli.errors import K2Error

TRACKERS = ("tensorboard", "wandb")


def parse_track(spec: str) -> list[str]:
    """"tensorboard,wandb" -> ["tensorboard", "wandb"]; "" -> []. Unknown names are an error."""
    kinds = [s.strip() for s in spec.split(",") if s.strip()]
    for kind in kinds:
        if kind not in TRACKERS:
            raise K2Error(f"unknown train.track '{kind}'", f"use {' or '.join(TRACKERS)} (comma-separated), or leave it empty")
    return kinds


def scalars(record: dict) -> dict[str, float]:
    """The loggable scalars of one metrics record (booleans, the step itself and identifiers such as
    heads_clipped_ids left out)."""
    out = {}
    for key, value in record.items():
        if key == "step" or key.endswith("_ids") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[key] = float(value)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            out.update({f"{key}/{i}": float(v) for i, v in enumerate(value) if math.isfinite(v)})
    return out


class Tracker:
    """Sends every logged record to the trackers `kinds` names; a no-op when it names none."""

    def __init__(self, kinds: list[str], run_dir: Path, name: str, config: dict, resume_step: int | None = None):
        self.tensorboard = self.wandb = None
        if "tensorboard" in kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise K2Error("train.track=tensorboard needs the tensorboard package",
                              "pip install 'k2cli[track]' (or pip install tensorboard), or drop train.track") from None
            # purge_step: on resume, points after the checkpoint's step are hidden, so curves do not fork
            purge = resume_step + 1 if resume_step is not None else None
            self.tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge)
        if "wandb" in kinds:
            try:
                import wandb
            except ImportError:
                raise K2Error("train.track=wandb needs the wandb package",
                              "pip install wandb (then wandb login, or set WANDB_MODE=offline), or drop train.track") from None
            run_id = Path(run_dir).name  # the run directory's key: a resumed run continues the same W&B run
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "k2"), name=name, id=run_id, resume="allow",
                                    config=config, dir=str(run_dir))

    def log(self, record: dict) -> None:
        values, step = scalars(record), int(record["step"])
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
