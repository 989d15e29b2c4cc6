"""Verified inputs and no leftovers (issue 24, items 4-5).

Every consumer checks the files it reads against the manifest (a flipped bit in weights, tokenizer or a
dataset's Arrow file is an error, not a silently different model); `k2 artifacts verify` checks the manifest
against its own hash and `--deep` every manifest up the lineage against the hash its child recorded; a writer
or checkpoint killed mid-write leaves a `.tmp-*` that the next run (or `k2 artifacts gc`) removes; two identical
runs cannot share a run directory; files are flushed before the rename that publishes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_error
from helpers import PEOPLE, dataset_artifact, model_artifact
from k2cli import artifacts
from k2cli.artifacts import ArtifactWriter, open_artifact
from k2cli.errors import K2Error

TEXTS = [f"{n} was born in {c} in {y}." for n, c, y in PEOPLE] * 5
SRC = str(Path(__file__).resolve().parents[1] / "src")


def flip(path: Path, offset: int = -1) -> None:
    """Flip one bit of a file in place (same size)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def write(stage="pretrain", kind="model", text="hello", inputs=()):
    with ArtifactWriter(stage=stage, kind=kind, inputs=list(inputs)) as w:
        (w.dir / "data.txt").write_text(text)
        return w.commit(summary=text)


@pytest.fixture
def chain():
    data = dataset_artifact()
    model = model_artifact(TEXTS, inputs=[data])
    return data, model


# ----------------------------------------------------------------------------- flipped bits


def test_flipped_bit_in_weights_is_caught_by_every_loader(chain):
    import k2cli
    from k2cli.model.io import load_model

    _, model = chain
    load_model(model.path)  # intact: loads (and caches the hashes)
    flip(model.file("model.safetensors"), offset=-5)  # inside the last tensor's bytes: the header stays valid
    for load in (lambda: load_model(model.path),  # serve, chat and the agentic policies call this one
                 lambda: k2cli.load_model(str(model.path)),
                 lambda: load_model(model.path, verify=True)):
        with pytest.raises(K2Error, match="model.safetensors: sha256 mismatch"):
            load()


def test_serve_and_chat_load_through_the_verified_loader():
    """serve, chat and the agentic policies have no loader of their own: they call model.io.load_model."""
    import inspect

    from k2cli.agentic import policies
    from k2cli.stages import serve

    for module in (serve, policies):
        source = inspect.getsource(module)
        assert "from k2cli.model.io import load_model" in source and "load_file(" not in source


def test_flipped_bit_in_tokenizer_is_caught(chain):
    from k2cli.data.tokenizer import load_tokenizer

    _, model = chain
    load_tokenizer(model.path)
    path = model.file("tokenizer.json")
    text = path.read_text()
    i = text.index('"vocab"') + 20
    path.write_text(text[:i] + chr(ord(text[i]) ^ 1) + text[i + 1:])
    with pytest.raises(K2Error, match="tokenizer.json: sha256 mismatch"):
        load_tokenizer(model.path)


def test_flipped_bit_in_a_dataset_arrow_file_is_caught(chain, k2, tmp_path):
    from k2cli.data.loading import load_corpus, load_part

    data, _ = chain
    load_corpus(str(data.path))
    arrow = next((data.path / "corpus").glob("*.arrow"))
    flip(arrow, offset=len(arrow.read_bytes()) // 2)
    with pytest.raises(K2Error, match=r"corpus/data-.*\.arrow: sha256 mismatch"):
        load_corpus(str(data.path))
    # the CLI: pre-training on it is one error line, not a model trained on different text
    assert_clean_error(k2("pretrain", data.path, "--preset", "micro", ok=False), "failed verification", "arrow")
    # the other parts (qa_test, math, chat) go through load_part
    qa = next((data.path / "qa_test").glob("*.arrow"))
    assert load_part(data, "qa_train") is not None
    flip(qa, offset=len(qa.read_bytes()) // 2)
    with pytest.raises(K2Error, match="qa_test/.*sha256 mismatch"):
        load_part(data, "qa_test")


def test_verification_is_cached_by_inode_size_mtime_ctime(chain, monkeypatch):
    _, model = chain
    calls = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    monkeypatch.setattr(artifacts, "_hashes", {})
    monkeypatch.setattr(artifacts, "_loaded_caches", set())
    open_artifact(model.path).check()
    first = len(calls)
    assert first == len(model.manifest["files"])
    open_artifact(model.path).check()
    assert len(calls) == 2 * first  # files written this instant are "racily clean": hashed again
    monkeypatch.setattr(artifacts, "RACY_S", 0.0)  # (instead of waiting 2 s for them to settle)
    open_artifact(model.path).check()
    open_artifact(model.path).check()
    assert len(calls) == 3 * first  # settled: hashed once more, then nothing re-read
    # the cache persists for the next process, under the root
    saved = json.loads((artifacts.artifacts_root() / artifacts.VERIFY_CACHE).read_text())
    assert any(k.startswith(str(model.file("model.safetensors"))) for k in saved)
    # a write changes the key (mtime/ctime), even one that restores the size and the mtime
    weights = model.file("model.safetensors")
    st = weights.stat()
    time.sleep(0.05)  # past the timestamp tick of the hashing (what RACY_S guarantees in real use)
    flip(weights, offset=-5)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(K2Error, match="sha256 mismatch"):
        open_artifact(model.path).check()


# ----------------------------------------------------------------------------- manifests and lineage


def test_rewriting_a_hash_in_the_manifest_does_not_make_verify_say_ok(k2):
    art = write(text="original")
    art.file("data.txt").write_text("forged!!")  # same size
    m = json.loads((art.path / "manifest.json").read_text())
    m["files"]["data.txt"]["sha256"] = artifacts.sha256_file(art.file("data.txt"))
    (art.path / "manifest.json").write_text(json.dumps(m))
    assert_clean_error(k2("artifacts", "verify", art.path, ok=False), "manifest.json: edited")


def test_verify_deep_walks_parent_manifest_hashes(k2):
    raw = write(stage="synth", kind="dataset", text="raw")
    mid = write(stage="pretrain", text="mid", inputs=[raw])
    top = write(stage="sft", text="top", inputs=[mid])
    k2("artifacts", "verify", "--deep", top.path)
    # edit the root's manifest consistently (file, hash and self-hash rewritten): only its child's record knows
    raw.file("data.txt").write_text("RAW")
    m = json.loads((raw.path / "manifest.json").read_text())
    m["files"]["data.txt"]["sha256"] = artifacts.sha256_file(raw.file("data.txt"))
    m["self_sha256"] = artifacts.manifest_self_sha256(m)
    (raw.path / "manifest.json").write_text(json.dumps(m))
    k2("artifacts", "verify", raw.path)  # on its own it is consistent
    k2("artifacts", "verify", top.path)  # the shallow check of the top is too
    assert_clean_error(k2("artifacts", "verify", "--deep", top.path, ok=False), "synth/v1 was changed after pretrain/v1")
    # a parent that is gone
    import shutil

    shutil.rmtree(mid.path)
    assert_clean_error(k2("artifacts", "verify", "--deep", top.path, ok=False), "gone")


def test_verify_deep_ok_on_an_intact_chain(k2):
    raw = write(stage="synth", kind="dataset", text="raw")
    top = write(stage="sft", text="top", inputs=[write(text="mid", inputs=[raw])])
    assert artifacts.verify_lineage(top) == []
    k2("artifacts", "verify", "--deep", top.path)


# ----------------------------------------------------------------------------- leftovers


def _child(code: str, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True, env=env)


def test_a_writer_killed_mid_write_leaves_nothing_after_the_next_run(artifacts_root):
    write(text="v1")
    p = _child("import time\nfrom k2cli.artifacts import ArtifactWriter\n"
               "w = ArtifactWriter(stage='pretrain', kind='model')\n"
               "(w.dir / 'half.bin').write_bytes(b'x' * 4096)\nprint(w.dir, flush=True)\ntime.sleep(60)\n")
    tmp = Path(p.stdout.readline().strip())
    p.kill()
    p.wait()
    assert tmp.is_dir() and tmp.name.startswith(".tmp-pretrain-")  # what a kill -9 leaves
    # a live writer's directory in the same place is kept
    with ArtifactWriter(stage="pretrain", kind="model") as live:
        assert not tmp.exists()  # the next writer removed the dead one's
        (live.dir / "data.txt").write_text("v2")
        write(text="v3")  # a concurrent writer does not touch the live one's
        assert live.dir.is_dir()
        live.commit()
    assert not [p for p in (artifacts_root / "pretrain").iterdir() if p.name.startswith(".")]
    assert open_artifact("pretrain:latest").manifest["version"] == 3


def test_a_checkpoint_killed_mid_save_is_removed_by_gc_and_by_the_next_save(artifacts_root, k2):
    run = artifacts_root / "pretrain" / "runs" / "r1"
    code = ("import sys, time, torch\nfrom pathlib import Path\nimport k2cli.train.checkpoint as ck\n"
            "def hang(*a, **k):\n    print('saving', flush=True)\n    time.sleep(60)\n"
            "torch.save = hang\nck._write(Path(sys.argv[1]), 3, {'w': torch.zeros(2)}, {}, {}, 2)\n")
    p = _child(code, run)
    assert p.stdout.readline().strip() == "saving"
    p.kill()
    p.wait()
    left = list((run / "checkpoints").glob(".tmp-step-000003-*"))
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()
    assert str(left[0]) in k2("artifacts", "gc", "--dry-run").output
    assert left[0].exists()
    assert str(left[0]) in k2("artifacts", "gc").output
    assert not left[0].exists()
    # and the next save in that run directory removes a dead process's leftover on its own
    p = _child(code, run)
    p.stdout.readline()
    p.kill()
    p.wait()
    from k2cli.train.checkpoint import _write

    _write(run, 4, {"w": torch.zeros(2)}, {}, {"step": 4}, 2)
    assert sorted(x.name for x in (run / "checkpoints").iterdir()) == ["latest", "step-000004"]


def test_gc_keeps_live_and_unknown_recent_entries(artifacts_root, k2):
    sdir = artifacts_root / "pretrain"
    live = sdir / artifacts.temp_name(".tmp-pretrain")  # this process: alive
    legacy = sdir / ".tmp-pretrain-0123456789"  # an older k2's name: no owner, recent
    old_legacy = sdir / ".tmp-pretrain-abcdefabcd"
    for d in (live, legacy, old_legacy):
        d.mkdir(parents=True)
    os.utime(old_legacy, (time.time() - 2 * artifacts.LEGACY_STALE_S,) * 2)
    out = k2("artifacts", "gc").output
    assert live.exists() and legacy.exists() and not old_legacy.exists()
    assert out.splitlines() == [f"removed {old_legacy}"]


# ----------------------------------------------------------------------------- races and durability


def test_a_second_identical_run_refuses_while_the_first_holds_the_run_directory():
    from k2cli.stages.runner import Stage

    with Stage("pretrain", "model", {"seed": 1}) as first:
        first.run_dir(["input-uid"])
        with pytest.raises(K2Error, match="this run is already in progress .*pid"):
            with Stage("pretrain", "model", {"seed": 1}) as second:
                second.run_dir(["input-uid"])
        with Stage("pretrain", "model", {"seed": 2}) as other:  # another recipe: another run directory
            other.run_dir(["input-uid"])
    with Stage("pretrain", "model", {"seed": 1}) as again:  # released when the first ended
        again.run_dir(["input-uid"])


def test_a_second_process_refuses_with_one_line(artifacts_root, k2, tmp_path):
    """Across processes: a child holds the lock (it is a stage between run_dir and its end), the CLI refuses."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(TEXTS) * 4)
    args = ["pretrain", corpus, "--preset", "micro", "--set", "train.steps=1", "--set", "train.seq_len=16",
            "--set", "train.batch_size=2", "--set", "tokenizer.vocab_size=300"]
    from k2cli.stages import pretrain

    seen = {}
    real = pretrain.Stage.run_dir

    def hold(self, key, name=None):  # record the run directory the CLI picks, then stop there
        seen["dir"] = real(self, key, name)
        raise K2Error("stop here")

    import k2cli.stages.runner as runner

    orig = runner.Stage.run_dir
    runner.Stage.run_dir = hold
    try:
        k2(*args, ok=False)
    finally:
        runner.Stage.run_dir = orig
    lock = seen["dir"].parent.parent / ".locks" / f"{seen['dir'].name}.lock"
    p = _child("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
               "os.pwrite(fd, f'pid {os.getpid()} on test'.encode(), 0)\nprint('held', flush=True)\ntime.sleep(60)\n", lock)
    assert p.stdout.readline().strip() == "held"
    try:
        assert_clean_error(k2(*args, ok=False), "already in progress", f"pid {p.pid}")
    finally:
        p.kill()
        p.wait()


def test_files_are_flushed_before_the_rename_publishes_them(monkeypatch):
    synced, renamed = [], []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(os, "rename", lambda a, b: renamed.append((str(a), len(synced))) or real_rename(a, b))
    with ArtifactWriter(stage="pretrain", kind="model") as w:
        (w.dir / "sub").mkdir()
        (w.dir / "sub" / "a.bin").write_bytes(b"a")
        (w.dir / "b.txt").write_text("b")
        tmp = str(w.dir)
        art = w.commit()
    n_before = dict(renamed)[tmp]
    before = synced[:n_before]
    for name in ("sub/a.bin", "b.txt", "manifest.json", "sub"):
        assert f"{tmp}/{name}" in before, name
    assert str(art.path.parent) in synced[n_before:]  # the rename itself, made durable


def test_a_plain_out_directory_parent_loses_only_dead_k2_temporaries(tmp_path):
    """--out DIR: the parent is the user's directory; only entries k2 named with a dead owner are removed."""
    foreign = tmp_path / ".tmp-someone-elses"  # not k2's name: never touched, however old
    foreign.mkdir()
    os.utime(foreign, (time.time() - 10 * artifacts.LEGACY_STALE_S,) * 2)
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".tmp-pretrain-0123456789@{p.stdout.strip()}@{__import__('socket').gethostname()}"
    dead.mkdir()
    with ArtifactWriter(stage="pretrain", kind="model", out=str(tmp_path / "m")) as w:
        (w.dir / "data.txt").write_text("x")
        w.commit()
    assert foreign.exists() and not dead.exists()
