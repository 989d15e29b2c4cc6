"""Checkpoints inside a run directory: everything needed to continue bit for bit.

    <run dir>/checkpoints/step-000100/
        model.safetensors   weights (and the router correction biases, which are buffers)
        optimizer.pt        optimizer state (momentum buffers, Adam moments, step counts)
        state.pt            step, RNG states (torch, numpy, python), the resolved recipe
    <run dir>/checkpoints/latest  -> step-000100

The data order is a pure function of (seed, step), so the step is the whole data position.
A checkpoint is written to a temporary directory and renamed, so a crash while saving
keeps the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from k2cli.errors import K2Error

# Recipe keys that may change between an interrupted run and its resumption: they do not
# change what is computed.
RESUMABLE_CHANGES = {"train.checkpoint_every", "train.keep_checkpoints", "train.eval_every", "train.device"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def recipe_differences(saved: dict, current: dict) -> list[str]:
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, recipe: dict, extra: dict | None = None, keep: int = 2) -> Path:
    ckpts = Path(run_dir) / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = ckpts / f".tmp-{name}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"step": step, "rng": rng_state(), "recipe": recipe, "extra": extra or {}}, tmp / "state.pt")
        dest = ckpts / name
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise K2Error(f"cannot write checkpoint in {ckpts}: {e.strerror}", "free disk space or choose another artifacts root")
    link = ckpts / f".latest-{uuid.uuid4().hex[:6]}"
    os.symlink(name, link)
    os.replace(link, ckpts / "latest")
    old = sorted(p for p in ckpts.iterdir() if p.name.startswith("step-"))
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return dest


def latest_checkpoint(run_dir: Path) -> Path | None:
    link = Path(run_dir) / "checkpoints" / "latest"
    if link.exists():
        return link.resolve()
    return None


def load_checkpoint(path: Path, model, optimizer, recipe: dict) -> dict:
    """Restore model, optimizer and RNG from `path`; returns the saved state (step, extra)."""
    path = Path(path)
    try:
        state = torch.load(path / "state.pt", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise K2Error(f"cannot read checkpoint {path}: {e}", "delete it to start over (--restart)")
    diffs = recipe_differences(state["recipe"], recipe)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise K2Error(
            f"checkpoint {path.name} was made with a different recipe: {'; '.join(diffs[:3])}{more}",
            "resume with the same recipe, or pass --restart to start over",
        )
    sd = load_file(str(path / "model.safetensors"))
    if getattr(model.config, "tie_word_embeddings", False):
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise K2Error(f"checkpoint {path} does not fit this model (missing {missing[:2]}, unexpected {unexpected[:2]})",
                      "it is from another model shape; pass --restart")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    set_rng_state(state["rng"])
    return state
