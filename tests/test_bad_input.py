"""Bad input and a hostile environment end in one `error:` line and exit 2, never a traceback (issue 24, items
3-4): damaged manifests, unreadable files, a full disk, a read-only root, a dangling `latest`, an edited
model.json, a URL that is not one, a negative interval.

What each test proves, honestly: tests run as root, which chmod does not stop, so "unreadable" is simulated by
patching the read to raise the OSError the kernel would (EACCES); a full disk by a writer raising ENOSPC, and,
where user namespaces allow it (`unshare -rm`), for real: a 64 KB tmpfs and a read-only tmpfs as the root of a
real `k2 pretrain`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_error
from helpers import PEOPLE, dataset_artifact, model_artifact
from k2cli import artifacts
from k2cli.artifacts import ArtifactWriter
from k2cli.errors import K2Error

TEXTS = [f"{n} was born in {c} in {y}." for n, c, y in PEOPLE] * 5
SRC = str(Path(__file__).resolve().parents[1] / "src")
MICRO = ["--preset", "micro", "--set", "train.steps=1", "--set", "train.seq_len=16", "--set", "train.batch_size=2",
         "--set", "tokenizer.vocab_size=300", "--set", "train.checkpoint_every=1"]


def write(stage="pretrain", kind="model", text="hello"):
    with ArtifactWriter(stage=stage, kind=kind) as w:
        (w.dir / "data.txt").write_text(text)
        return w.commit(summary=text)


def edit_manifest(art, change):
    path = art.path / "manifest.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps(change(m)))


def corpus(tmp_path) -> Path:
    p = tmp_path / "corpus.jsonl"
    p.write_text("".join(json.dumps({"text": f"{t} {t} {t}"}) + "\n" for t in TEXTS))
    return p


# ----------------------------------------------------------------------------- damaged manifests


@pytest.mark.parametrize("damage, words", [
    (lambda m: [m], "a JSON list"),
    (lambda m: m | {"files": list(m["files"])}, "'files' must map"),
    (lambda m: m | {"files": {"data.txt": "abc"}}, "'files' must map"),
    (lambda m: m | {"kind": ["model"]}, "must be strings"),
    (lambda m: m | {"inputs": {"a": 1}}, "inputs a list"),
])
def test_a_damaged_manifest_is_one_line_and_listed_as_damaged(k2, damage, words):
    good = write(stage="synth", kind="dataset")
    bad = write()
    edit_manifest(bad, damage)
    for cmd in (["artifacts", "show", bad.path], ["artifacts", "verify", bad.path], ["model", "info", bad.path],
                ["artifacts", "show", "pretrain:latest"]):
        assert_clean_error(k2(*cmd, ok=False), "corrupt manifest", words)
    listed = json.loads(k2("artifacts", "list", "--json").output)  # the whole root is still listed
    assert [a["id"] for a in listed] == ["pretrain/v1", good.id]  # by stage, then version
    assert words in listed[0]["damaged"] and "damaged" not in listed[1]
    assert "damaged" in k2("artifacts", "list").output


def test_an_unreadable_manifest(k2, monkeypatch):
    art = write()
    real = Path.read_text

    def read_text(self, *a, **k):
        if self.name == "manifest.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert_clean_error(k2("artifacts", "show", art.path, ok=False), "cannot read", "manifest.json", "Permission denied")
    assert "damaged" in k2("artifacts", "list").output


def test_an_unreadable_dataset_file(k2, monkeypatch):
    data = dataset_artifact()
    real = artifacts.sha256_file

    def sha(path):
        if str(path).endswith(".arrow"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(artifacts, "sha256_file", sha)
    assert_clean_error(k2("pretrain", data.path, *MICRO, ok=False), "corpus/data-", "cannot read (Permission denied)")


@pytest.mark.parametrize("target, words", [("v9", "dangling (-> v9)"), ("latest", "symlink loop")])
def test_a_dangling_or_looping_latest_says_what_is_wrong(k2, artifacts_root, target, words):
    write()
    link = artifacts_root / "pretrain" / "latest"
    link.unlink()
    link.symlink_to(target)
    assert_clean_error(k2("artifacts", "show", "pretrain:latest", ok=False), words, "ln -sfn")
    shutil.rmtree(artifacts_root / "pretrain")
    assert_clean_error(k2("artifacts", "show", "pretrain:latest", ok=False), "has no versions yet")


# ----------------------------------------------------------------------------- model.json


def test_an_edited_model_json_is_not_a_false_shape(k2, tmp_path):
    from k2cli.model.io import read_config

    model = model_artifact(TEXTS)
    k2("model", "info", model.path)
    cfg = json.loads(model.file("model.json").read_text())
    model.file("model.json").write_text(json.dumps(cfg | {"hidden_size": 64}))
    assert_clean_error(k2("model", "info", model.path, ok=False), "failed verification", "model.json")
    # a copy without its manifest: the weights' shapes still contradict it
    plain = tmp_path / "plain"
    shutil.copytree(model.path, plain)
    (plain / "manifest.json").unlink()
    with pytest.raises(K2Error, match=r"does not describe the weights: .* the config makes it"):
        read_config(plain)
    # a wrong type is a model.json field, not a recipe key (in an artifact whose manifest agrees: re-hashed)
    model.file("model.json").write_text(json.dumps(cfg | {"hidden_size": "wide"}))
    edit_manifest(model, lambda m: rehash(m, model, "model.json"))
    result = k2("model", "info", model.path, ok=False)
    assert_clean_error(result, "model.json field 'hidden_size' expects int")
    assert "recipe key" not in result.output
    model.file("model.json").write_text(json.dumps([cfg]))
    edit_manifest(model, lambda m: rehash(m, model, "model.json"))
    assert_clean_error(k2("model", "info", model.path, ok=False), "JSON list")


def rehash(m, art, name):
    """The manifest as if `name` had been written so (a consistent forgery, self-hash included)."""
    m["files"][name] = {"sha256": artifacts.sha256_file(art.file(name)), "bytes": art.file(name).stat().st_size}
    m["self_sha256"] = artifacts.manifest_self_sha256(m)
    return m


def test_weights_of_another_shape_are_one_line():
    from k2cli.model.config import ModelConfig
    from k2cli.model.io import load_weights, save_weights
    from k2cli.model.transformer import build_model

    from helpers import MICRO as SHAPE

    model = build_model(ModelConfig(**SHAPE), seed=0)
    other = build_model(ModelConfig(**SHAPE | {"hidden_size": 48}), seed=0)
    path = Path(artifacts.artifacts_root()) / "w.safetensors"
    path.parent.mkdir(parents=True)
    save_weights({k: v.contiguous() for k, v in other.state_dict().items()}, path)
    with pytest.raises(K2Error, match="do not fit the model config"):
        load_weights(model, path)


# ----------------------------------------------------------------------------- recipes and backends


def test_negative_intervals_are_rejected(k2, tmp_path):
    for key in ("train.checkpoint_every=-1", "train.eval_every=-5", "train.keep_checkpoints=-1", "train.eval_batches=-2"):
        assert_clean_error(k2("pretrain", corpus(tmp_path), "--preset", "micro", "--set", key, ok=False),
                           f"recipe key '{key.split('=')[0]}' must be >= 0")


def test_a_base_url_that_is_not_a_url(k2, tmp_path):
    data = dataset_artifact()
    for url in ("notaurl", "ftp://x/v1", "http://"):
        assert_clean_error(k2("rephrase", data.path, "--backend", "openai", "--model", "m", "--base-url", url, ok=False),
                           "is not an http(s) url")


# ----------------------------------------------------------------------------- a full disk, a read-only root


def enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_at_the_checkpoint_keeps_the_previous_one(artifacts_root, monkeypatch):
    from k2cli.train import checkpoint

    run = artifacts_root / "pretrain" / "runs" / "r"
    checkpoint._write(run, 1, {"w": torch.ones(2)}, {}, {"step": 1}, 2)
    monkeypatch.setattr(checkpoint, "save_file", enospc)
    with pytest.raises(K2Error, match="cannot write checkpoint step-000002 .*No space left on device"):
        checkpoint._write(run, 2, {"w": torch.ones(2)}, {}, {"step": 2}, 2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000001"]
    assert checkpoint.latest_checkpoint(run).name == "step-000001"


def test_disk_full_at_the_plot(tmp_path, monkeypatch):
    import matplotlib.figure

    from k2cli.train.plots import plot_loss

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", enospc)
    with pytest.raises(K2Error, match="cannot write the plot .*loss.png: No space left on device"):
        plot_loss([{"step": 1, "loss": 2.0}], tmp_path / "loss.png")


def test_disk_full_at_the_token_cache(tmp_path, monkeypatch):
    import numpy as np

    from k2cli.data import token_cache
    from k2cli.data.loading import load_corpus
    from k2cli.data.tokenizer import train_tokenizer

    ds, _ = load_corpus(str(corpus(tmp_path)))
    tok = train_tokenizer(TEXTS, vocab_size=300)
    monkeypatch.setattr(np, "save", enospc)  # offsets.npy, after tokens.bin
    with pytest.raises(K2Error, match="cannot write the token cache .*No space left on device"):
        token_cache.tokenize_to_cache(ds, tok, tmp_path / "cache", "key")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f".key-{tok.fingerprint()}.lock"]  # no .tmp-*


def test_the_cli_turns_a_disk_error_from_anywhere_into_one_line(k2, monkeypatch):
    from k2cli.commands import artifacts as cmd

    for code, fix in ((errno.ENOSPC, "free disk space"), (errno.EROFS, "read-only"), (errno.EACCES, "permissions"),
                      (errno.EDQUOT, "quota")):
        monkeypatch.setattr(cmd, "scan_artifacts", lambda c=code: (_ for _ in ()).throw(OSError(c, os.strerror(c), "/x/y")))
        assert_clean_error(k2("artifacts", "list", ok=False), os.strerror(code), "/x/y", fix)
    # any other OSError is a bug: it keeps its traceback
    monkeypatch.setattr(cmd, "scan_artifacts", lambda: (_ for _ in ()).throw(OSError(errno.EBADF, "Bad file descriptor")))
    with pytest.raises(OSError):
        k2("artifacts", "list", ok=False)


def _unshare_ok() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _unshare_ok(), reason="needs user namespaces (unshare -rm) to mount a tmpfs")
@pytest.mark.parametrize("mount, words", [
    ("size=64k", ["No space left on device"]),  # a real full disk: the run fails where it writes
    ("ro", ["Read-only file system"]),  # a real read-only root
])
def test_pretrain_on_a_real_full_or_read_only_root(tmp_path, mount, words):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    remount = "mount -o remount,ro {m} && " if mount == "ro" else ""
    k2 = f"{sys.executable} -m k2cli.cli"
    args = " ".join(str(a) for a in ["--root", mnt / "art", "pretrain", corpus(tmp_path), *MICRO])
    script = f"mount -t tmpfs -o size=1m tmpfs {mnt} && {remount.format(m=mnt)}{k2} {args}; echo rc=$?; find {mnt} -name '.tmp-*'"
    if mount != "ro":
        script = script.replace("size=1m", mount)
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=SRC, K2_QUIET="1"))
    assert out.stdout.splitlines() == ["rc=2"], out.stdout + out.stderr  # no .tmp-* left behind (find prints none)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr  # one line, no traceback
    assert any(w in lines[0] for w in words), out.stderr
