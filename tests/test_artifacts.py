"""Versioned artifacts: atomic writes, versions, references, kinds, schema, hashes, lineage."""

import json
import os

import pytest

from k2cli.artifacts import ArtifactWriter, lineage, open_artifact, resolve
from k2cli.errors import K2Error


def write(stage="pretrain", kind="model", text="hello", inputs=(), out=None):
    with ArtifactWriter(stage=stage, kind=kind, out=out, recipe={"lr": 1.0}, inputs=list(inputs)) as w:
        (w.dir / "data.txt").write_text(text)
        return w.commit(summary=text)


def test_versions_and_latest(artifacts_root):
    a, b = write(text="one"), write(text="two")
    assert (a.id, b.id) == ("pretrain/v1", "pretrain/v2")
    assert resolve("pretrain:latest").resolve() == b.path.resolve()
    assert open_artifact("pretrain:v1").file("data.txt").read_text() == "one"
    m = b.manifest
    assert m["schema_version"] == 1 and m["recipe"] == {"lr": 1.0} and m["k2cli_version"]
    assert m["files"]["data.txt"]["sha256"] and "created" in m


def test_failed_write_leaves_nothing(artifacts_root):
    write(text="good")
    with pytest.raises(RuntimeError):
        with ArtifactWriter(stage="pretrain", kind="model") as w:
            (w.dir / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    names = sorted(os.listdir(artifacts_root / "pretrain"))
    assert names == ["latest", "v1"]  # no temp dir, no v2, latest untouched
    assert open_artifact("pretrain:latest").file("data.txt").read_text() == "good"


def test_path_output_refuses_non_empty_without_force(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    with pytest.raises(K2Error, match="not empty"):
        write(out=str(dest))
    assert (dest / "keep.txt").exists()


def test_wrong_kind_schema_and_missing(artifacts_root, tmp_path):
    art = write(kind="dataset")
    with pytest.raises(K2Error, match="is a dataset artifact, expected model"):
        open_artifact(art.path, kind="model")
    with pytest.raises(K2Error, match="not found"):
        open_artifact(tmp_path / "nope")
    with pytest.raises(K2Error, match="no versions"):
        open_artifact("sft:latest")
    m = json.loads((art.path / "manifest.json").read_text())
    m["schema_version"] = 99
    (art.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(K2Error, match="schema version 99"):
        open_artifact(art.path)
    (art.path / "manifest.json").write_text("{not json")
    with pytest.raises(K2Error, match="corrupt manifest"):
        open_artifact(art.path)


def test_tampered_file_fails_verification():
    art = write(text="original")
    assert art.verify() == []
    art.file("data.txt").write_text("changed")
    assert "sha256 mismatch" in art.verify()[0]
    with pytest.raises(K2Error, match="failed verification"):
        open_artifact(art.path, verify=True)


def test_lineage_walks_back_and_reports_missing_parents(tmp_path):
    raw = write(stage="synth", kind="dataset", text="raw")
    mid = write(stage="rephrase", kind="dataset", text="mid", inputs=[raw])
    top = write(stage="pretrain", kind="model", text="top", inputs=[mid])
    chain = [(d, a.id) for d, a in lineage(top)]
    assert chain == [(0, "pretrain/v1"), (1, "rephrase/v1"), (2, "synth/v1")]
    import shutil

    shutil.rmtree(raw.path)
    last = list(lineage(top))[-1]
    assert isinstance(last[1], dict) and last[1]["id"] == "synth/v1"  # a record of what is missing


def test_reuse_skips_only_when_recipe_and_inputs_match(capsys):
    from k2cli.stages.runner import RunOptions, Stage

    def stage(recipe, inputs, reuse=True):
        """What every stage does: the up-to-date decision first, then (if not) the writer."""
        with Stage("pretrain", "model", recipe, RunOptions(reuse=reuse)) as st:
            if done := st.up_to_date(inputs):
                return done, True
            with st.writer() as w:
                (w.dir / "data.txt").write_text("x")
                return w.commit(), False

    raw = write(stage="synth", kind="dataset", text="raw")
    first, skipped = stage({"lr": 1.0}, [raw])
    assert (first.id, skipped) == ("pretrain/v1", False)
    art, skipped = stage({"lr": 1.0}, [raw])  # same recipe, same inputs: nothing written
    assert (art.id, skipped) == ("pretrain/v1", True)
    assert "up to date: pretrain/v1" in capsys.readouterr().err
    assert stage({"lr": 1.0}, [raw], reuse=False)[0].id == "pretrain/v2"  # without --reuse: made again
    assert stage({"lr": 2.0}, [raw])[0].id == "pretrain/v3"  # another recipe
    with ArtifactWriter(stage="synth", kind="dataset", recipe={"seed": 2}) as w:  # a new raw input
        newer = w.commit()
    assert stage({"lr": 2.0}, [newer])[0].id == "pretrain/v4"  # other inputs: made again
    assert stage({"lr": 2.0}, [newer])[1] is True
    (open_artifact("pretrain:v4").path / "data.txt").write_text("changed")  # a damaged latest is never up to date
    assert stage({"lr": 2.0}, [newer])[0].id == "pretrain/v5"


def test_root_is_an_argument_not_the_environment(tmp_path, artifacts_root, k2):
    """`k2 --root DIR` and RunOptions.root decide where artifacts go; the environment is left as it was."""
    from k2cli.stages.runner import RunOptions, Stage

    other = tmp_path / "other"
    with Stage("synth", "dataset", {"seed": 1}, RunOptions(root=str(other))) as st:
        with st.writer() as w:
            art = w.commit()
    assert art.path.parent.parent == other and not artifacts_root.exists()
    assert os.environ["K2_ARTIFACTS"] == str(artifacts_root)
    third = tmp_path / "third"
    k2("--root", third, "model", "init", "--preset", "micro")
    assert (third / "model" / "v1" / "manifest.json").exists() and os.environ["K2_ARTIFACTS"] == str(artifacts_root)
    again = k2("--root", third, "--reuse", "model", "init", "--preset", "micro")
    assert "up to date: model/v1" in again.output and not (third / "model" / "v2").exists()


def test_artifacts_list_is_oldest_first_not_alphabetical(k2, artifacts_root):
    import time as _time

    k2("model", "init", "--preset", "micro", "--out", "zeta")
    _time.sleep(1.1)  # creation times have one-second resolution
    k2("model", "init", "--preset", "micro", "--out", "alpha")
    ids = [row["id"] for row in json.loads(k2("artifacts", "list", "--json").output)]
    assert ids.index("zeta/v1") < ids.index("alpha/v1"), ids
