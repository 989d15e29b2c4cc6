"""k2cli.lineage: the one walk that finds a model's datasets and its pre-training split, with overrides."""

import json

import pytest

from helpers import dataset_artifact
from k2cli import lineage
from k2cli.artifacts import ArtifactWriter, open_artifact
from k2cli.data.packing import split_documents
from k2cli.errors import K2Error


def model(stage, inputs, recipe=None, data_split=None):
    with ArtifactWriter(stage=stage, kind="model", recipe=recipe or {}, inputs=list(inputs), data_split=data_split) as w:
        (w.dir / "weights").write_text(stage)
        return w.commit()


def test_recorded_split_is_read_downstream_and_checked():
    data = dataset_artifact()  # 24 documents
    record = lineage.split_record(str(data.path.resolve()), 24, 0.25, 3)
    base = model("pretrain", [data], {"seed": 3, "data": {"input": "synth:latest", "val_fraction": 0.25}}, record)
    ext = model("extend-context", [base, data], {"seed": 0, "data": {"input": "", "val_fraction": 0.05}})
    chat = model("sft", [ext])
    split = lineage.corpus_split(chat)  # the pretrain's record, not extend-context's recipe keys
    assert (split.val_fraction, split.seed, split.source.id) == (0.25, 3, base.id)
    assert list(split.indices(24)[1]) == list(split_documents(24, 0.25, 3)[1])
    with pytest.raises(K2Error, match="no longer splits"):  # the corpus changed under the model
        split.indices(30)
    assert lineage.heldout_split(chat, data).source.id == base.id
    assert lineage.heldout_split(chat, dataset_artifact(stage="other")) is None
    # an explicit corpus: the recorded split when it is the same corpus, else (val_fraction, seed) as given
    assert lineage.corpus_split(chat, "synth:latest").source.id == base.id
    other = dataset_artifact(stage="other2")
    explicit = lineage.corpus_split(chat, str(other.path), 0.5, 1)
    assert (explicit.corpus, explicit.val_fraction, explicit.seed, explicit.source) == (str(other.path), 0.5, 1, None)


def test_artifacts_without_the_record_fall_back_to_the_pretrain_recipe():
    data = dataset_artifact()
    base = model("pretrain", [data], {"seed": 2, "data": {"input": "synth:latest", "val_fraction": 0.1}})
    split = lineage.corpus_split(model("sft", [base]))
    assert (split.corpus, split.val_fraction, split.seed, split.val_sha256) == (str(data.path.resolve()), 0.1, 2, "")
    with pytest.raises(K2Error, match="no pre-training corpus"):
        lineage.corpus_split(model("import", []))
    assert lineage.corpus_split(model("import", []), required=False) is None


def test_dataset_prefers_the_explicit_reference_and_checks_its_files():
    data = dataset_artifact()
    with ArtifactWriter(stage="agentic", kind="dataset", inputs=[data]) as w:
        (w.dir / "tasks.jsonl").write_text("")
        (w.dir / "tools.json").write_text(json.dumps({"tools": []}))
        tasks = w.commit()
    m = model("sft", [tasks, data])
    assert lineage.dataset(m, "tasks.jsonl", "tools.json").id == tasks.id
    assert lineage.dataset(m, any_of=("qa_train", "math")).id == data.id
    assert lineage.dataset(m, "world.json") is None
    assert lineage.dataset(m, ref=str(data.path)).id == data.id
    with pytest.raises(K2Error, match="has no tasks.jsonl"):
        lineage.dataset(m, "tasks.jsonl", ref=str(data.path), key="envs.agentic")
    assert open_artifact(str(m.path)).id == m.id
