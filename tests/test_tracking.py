"""Optional experiment tracking: TensorBoard event files with every scalar of metrics.jsonl."""

import builtins

import pytest

from k2cli.errors import K2Error
from k2cli.train.tracking import Tracker, parse_track, scalars


def test_scalars_flatten_per_layer_lists_and_skip_matrices_and_ids():
    record = {"step": 3, "loss": 2.5, "max_logit_per_layer": [1.0, 4.0], "expert_load": [[0.5, 0.5]],
              "heads_clipped_total": 2, "heads_clipped_ids": [0, 5], "nan": float("nan"), "flag": True, "note": "x"}
    assert scalars(record) == {"loss": 2.5, "max_logit_per_layer/0": 1.0, "max_logit_per_layer/1": 4.0,
                               "heads_clipped_total": 2.0}


def test_parse_track():
    assert parse_track("") == []
    assert parse_track("tensorboard, wandb") == ["tensorboard", "wandb"]
    with pytest.raises(K2Error, match="unknown train.track 'tensorbord'"):
        parse_track("tensorbord")


def _read_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_hold_every_step_and_resume_purges(tmp_path):
    pytest.importorskip("tensorboard")
    tracker = Tracker(["tensorboard"], tmp_path, "t", {})
    for step in range(1, 5):
        tracker.log({"step": step, "loss": 10.0 - step, "max_logit_per_layer": [step, 2 * step]})
    tracker.close()
    events = _read_events(tmp_path)
    assert events["loss"] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
    assert events["max_logit_per_layer/1"][-1] == (4, 8.0)

    # resumed from the step-2 checkpoint: steps 3 and 4 are logged again, the old ones are purged
    tracker = Tracker(["tensorboard"], tmp_path, "t", {}, resume_step=2)
    for step in (3, 4):
        tracker.log({"step": step, "loss": 100.0 + step})
    tracker.close()
    assert _read_events(tmp_path)["loss"] == [(1, 9.0), (2, 8.0), (3, 103.0), (4, 104.0)]


def test_missing_package_is_one_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kw):
        if name == "wandb":
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(K2Error, match="needs the wandb package"):
        Tracker(["wandb"], tmp_path, "t", {})


def test_pretrain_with_train_track_tensorboard_writes_event_files(k2, artifacts_root):
    pytest.importorskip("tensorboard")
    k2("data", "synth", "--preset", "micro")
    k2("rephrase", "--preset", "micro")
    k2("pretrain", "--preset", "micro", "--set", "train.steps=3", "--set", "train.track=tensorboard")
    art = artifacts_root / "pretrain" / "latest"
    events = _read_events(art)
    assert [step for step, _ in events["loss"]] == [1, 2, 3] and "val_loss" in events and "max_logit" in events


def test_unknown_tracker_is_a_clean_error(k2):
    from conftest import assert_clean_error

    assert_clean_error(k2("pretrain", "--preset", "micro", "--set", "train.track=mlflow", ok=False), "unknown train.track 'mlflow'")
