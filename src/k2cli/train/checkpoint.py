"""Checkpoints inside a run directory: everything needed to continue bit for bit.

    <run dir>/checkpoints/step-000100/
        model.safetensors   weights (and the router correction biases, which are buffers)
        optimizer.pt        optimizer state (momentum buffers, Adam moments, step counts)
        state.pt            step, RNG states (torch, numpy, python), the resolved recipe, format
    <run dir>/checkpoints/latest  -> step-000100

The data order is a pure function of (seed, step), so the step is the whole data position.
A checkpoint is written to a temporary directory and renamed, so a crash while saving
keeps the previous checkpoint intact.

Canonical form (FORMAT 2), whatever the number of ranks that wrote it: every tensor whole,
the optimizer state keyed by parameter NAME (`MuonClip.canonical_state_dict`: FSDP shards
all-gathered, Muon momentum sent to rank 0 by the rank that owns it). Rank 0 writes it; any
world size and either parallel mode loads it, each rank keeping its share. That costs one
gather of the model through rank 0 per checkpoint, fine at the scales k2 runs; a model too big
for that would use torch.distributed.checkpoint (per-rank shards), which `convert` turns
into this form. Format 1 (before distributed training: optimizer state keyed by position)
still loads.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from k2cli import parallel
from k2cli.artifacts import fsync_path, fsync_tree, remove_temps, stale_temps, temp_name
from k2cli.errors import K2Error

FORMAT = 2

# Recipe keys that may change between an interrupted run and its resumption: they do not
# change what is computed.
RESUMABLE_CHANGES = {"train.checkpoint_every", "train.keep_checkpoints", "train.eval_every", "train.device",
                     "train.parallel"}


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
    """Write a canonical checkpoint. Under torchrun every rank calls it (it gathers the shards and
    the momentum on rank 0, which writes) and returns once rank 0 is done."""
    sd = {}
    for k, v in model.state_dict().items():  # the module itself, not a DDP wrapper: plain names
        v = parallel.full_tensor(v)  # FSDP: all-gather, on every rank
        if parallel.is_main():
            sd[k] = v.detach().contiguous().cpu()
    osd = optimizer.canonical_state_dict()
    dest = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    if parallel.is_main():
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        meta = {"world_size": parallel.world_size(), "parallel": recipe.get("train", {}).get("parallel", "ddp")}
        _write(run_dir, step, sd, osd, {"step": step, "rng": rng_state(), "recipe": recipe, "extra": extra or {},
                                        "format": FORMAT, "saved_by": meta}, keep)
    parallel.wait_for_main()
    return dest


def _write(run_dir: Path, step: int, sd: dict, osd: dict, state: dict, keep: int) -> Path:
    """Into `.tmp-step-N-<owner>` (artifacts.temp_name: a later run removes it if this process dies), every file
    flushed to disk, then renamed into place and `latest` moved: a crash or a full disk at any point leaves
    the previous checkpoint as it was."""
    ckpts = Path(run_dir) / "checkpoints"
    name = f"step-{step:06d}"
    tmp = None
    try:
        ckpts.mkdir(parents=True, exist_ok=True)
        remove_temps(stale_temps(ckpts))
        tmp = ckpts / temp_name(f".tmp-{name}")
        tmp.mkdir()
        save_file(sd, str(tmp / "model.safetensors"))
        torch.save(osd, tmp / "optimizer.pt")
        torch.save(state, tmp / "state.pt")
        fsync_tree(tmp)
        dest = ckpts / name
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
        link = ckpts / temp_name(".latest")
        os.symlink(name, link)
        os.replace(link, ckpts / "latest")
        fsync_path(ckpts)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a failed write as RuntimeError
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:160]
        if not isinstance(e, OSError) and _nearly_full(ckpts):  # torch/safetensors word a full disk their own way
            reason = f"no space left on device ({reason})"
        raise K2Error(f"cannot write checkpoint {name} in {ckpts}: {reason}",
                      "free disk space (the previous checkpoint is intact; the run resumes from it), "
                      "or choose another artifacts root (k2 --root DIR)") from None
    old = sorted(p for p in ckpts.iterdir() if p.name.startswith("step-"))
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return dest


def _nearly_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 16 << 20
    except OSError:
        return False


def latest_checkpoint(run_dir: Path) -> Path | None:
    link = Path(run_dir) / "checkpoints" / "latest"
    if link.exists():
        return link.resolve()
    return None


def read_state(path: Path, recipe: dict) -> dict:
    """state.pt of a checkpoint, after checking that k2 can load it and that the recipe matches."""
    path = Path(path)
    if (path / ".metadata").exists() or any(path.glob("*.distcp")):
        raise K2Error(
            f"checkpoint {path} holds torch.distributed.checkpoint shards, not k2's canonical single-file form",
            f"convert it once with: python -m k2cli.train.checkpoint convert {path}",
        )
    try:
        state = torch.load(path / "state.pt", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise K2Error(f"cannot read checkpoint {path}: {e}", "delete it to start over (--restart)")
    if state.get("format", 1) > FORMAT:
        raise K2Error(f"checkpoint {path} has format {state['format']}, newer than this k2 reads ({FORMAT})",
                      "resume it with the k2 version that wrote it, or pass --restart")
    diffs = recipe_differences(state["recipe"], recipe)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise K2Error(
            f"checkpoint {path.name} was made with a different recipe: {'; '.join(diffs[:3])}{more}",
            "resume with the same recipe, or pass --restart to start over",
        )
    return state


def load_model_weights(path: Path, model) -> None:
    """Whole weights into a plain (not yet sharded) model: load before wrapping with FSDP."""
    sd = load_file(str(Path(path) / "model.safetensors"))
    if getattr(model.config, "tie_word_embeddings", False):
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise K2Error(f"checkpoint {path} does not fit this model (missing {missing[:2]}, unexpected {unexpected[:2]})",
                      "it is from another model shape; pass --restart")


def load_optimizer_state(path: Path, optimizer) -> None:
    """The canonical optimizer state into `optimizer` (built on the wrapped model), each rank its share."""
    osd = torch.load(Path(path) / "optimizer.pt", weights_only=False)
    if any(isinstance(n, int) for g in osd.get("param_groups", []) for n in g.get("params", [])):
        osd = _from_positions(osd, optimizer)  # format 1
    optimizer.load_canonical_state_dict(osd)


def _from_positions(osd: dict, optimizer) -> dict:
    """Format 1 (torch's Optimizer.state_dict: state keyed by position over the param groups) ->
    canonical. Positions follow the optimizer's routing of the model's parameters, which is
    the same on any number of ranks."""
    if [len(g["params"]) for g in osd["param_groups"]] != [len(g["params"]) for g in optimizer.param_groups]:
        raise K2Error("the checkpoint's optimizer state does not fit this optimizer", "pass --restart to start over")
    state = {}
    for saved, group in zip(osd["param_groups"], optimizer.param_groups):
        for i, p in zip(saved["params"], group["params"]):
            if i in osd["state"]:
                state[optimizer.names[p]] = osd["state"][i]
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [optimizer.names[p] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_checkpoint(path: Path, model, optimizer, recipe: dict) -> dict:
    """Restore model, optimizer (None: not now) and RNG from `path`; returns the saved state (step, extra).

    Under FSDP load the weights into the plain model, wrap it, build the optimizer, then
    `load_optimizer_state` (what the training loop does).
    """
    state = read_state(path, recipe)
    load_model_weights(path, model)
    if optimizer is not None:
        load_optimizer_state(path, optimizer)
    set_rng_state(state["rng"])
    return state


# ----------------------------------------------------------------------------- conversion


def convert_dcp(path: Path) -> None:
    """Turn a torch.distributed.checkpoint directory into k2's canonical form, in place.

    Expects what `dcp.save({"model": get_model_state_dict(m), "optimizer": get_optimizer_state_dict(m, opt)})`
    writes (parameter names as keys: the canonical layout, just sharded), next to k2's state.pt.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    if not (path / "state.pt").exists():
        raise K2Error(f"{path} has no state.pt (step, RNG, recipe)", "copy it from the k2 checkpoint this one was made from")
    tmp = path / f".convert-{uuid.uuid4().hex[:6]}.pt"
    try:
        dcp_to_torch_save(path, tmp)
        full = torch.load(tmp, weights_only=False)
    finally:
        tmp.unlink(missing_ok=True)
    if not {"model", "optimizer"} <= set(full):
        raise K2Error(f"{path}: expected 'model' and 'optimizer' entries, found {sorted(full)}",
                      "save the DCP checkpoint as {'model': ..., 'optimizer': ...}")
    save_file({k: v.contiguous() for k, v in full["model"].items()}, str(path / "model.safetensors"))
    torch.save(full["optimizer"], path / "optimizer.pt")
    state = torch.load(path / "state.pt", weights_only=False)
    torch.save(state | {"format": FORMAT}, path / "state.pt")
    for p in [path / ".metadata", *path.glob("*.distcp")]:
        p.unlink()


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "convert":
        print("usage: python -m k2cli.train.checkpoint convert CHECKPOINT_DIR", file=sys.stderr)
        return 2
    try:
        convert_dcp(Path(args[1]))
    except K2Error as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return 2
    print(f"converted {args[1]} to k2's canonical checkpoint form")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
