"""k2 report: a Markdown page from a lineage, with plots; a missing parent is named, the rest renders."""

import shutil

from helpers import PEOPLE, dataset_artifact, model_artifact
from k2cli.artifacts import open_artifact


def test_report_from_eval_lineage(k2):
    data = dataset_artifact()
    texts = [f"{n} was born in {c}." for n, c, _ in PEOPLE] * 5
    base = model_artifact(texts, inputs=[data], stage="pretrain")
    chat = model_artifact(texts, inputs=[base, data], stage="sft")
    k2("eval", base.path, chat.path, "--suite", "perplexity", "--set", "eval.seq_len=32")
    k2("report", "eval:latest")
    rep = open_artifact("report:latest", kind="report")
    text = rep.file("REPORT.md").read_text()
    for stage in ("## synth", "## pretrain", "## sft", "## eval"):
        assert stage in text, stage
    assert text.index("## synth") < text.index("## pretrain") < text.index("## sft") < text.index("## eval")
    assert "| perplexity | loss |" in text  # the evaluation table
    for link in [l for l in text.split("(") if l.startswith("images/")]:
        assert (rep.path / link.split(")")[0]).exists(), link  # every image it shows is in the artifact

    shutil.rmtree(data.path)  # a parent that is gone
    k2("report", "eval:latest")
    text = open_artifact("report:latest").file("REPORT.md").read_text()
    assert "Missing from disk" in text and data.id in text and "## sft" in text
