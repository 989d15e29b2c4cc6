"""The whole pipeline, end to end, at micro size: the Makefile's own `chain` target.

This runs exactly what `make demo` runs (data synth -> rephrase -> pretrain -> midtrain (pretrain
continued on lookup rows) -> extend-context -> agentic -> sft -> rl -> eval -> report), only with PRESET=micro, into a temporary artifacts
root. Then it checks every artifact, the lineage the report was built from, and that a rerun
is make-style: every stage is up to date and nothing is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
K2 = Path(sys.executable).with_name("k2")  # the k2 of the environment running the tests

STAGES = [  # artifact directory -> (artifact kind, the stage that made it), in pipeline order
    ("synth", "dataset", "synth"),
    ("rephrase", "dataset", "rephrase"),
    ("pretrain", "model", "pretrain"),
    ("midtrain", "model", "pretrain"),  # `k2 pretrain --recipe recipes/micro/midtrain.toml --out midtrain`
    ("extend-context", "model", "extend-context"),
    ("agentic", "dataset", "agentic"),
    ("sft", "model", "sft"),
    ("rl", "model", "rl"),
    ("eval", "eval", "eval"),
    ("report", "report", "report"),
]


def run_chain(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, K2_ARTIFACTS=str(root), K2_QUIET="1")
    return subprocess.run(
        ["make", "--no-print-directory", "chain", "PRESET=micro", f"K2={K2}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )


@pytest.mark.skipif(shutil.which("make") is None or not K2.exists(), reason="needs make and the k2 console script")
def test_micro_pipeline_end_to_end(tmp_path):
    root = tmp_path / "artifacts"
    first = run_chain(root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    # Every stage wrote exactly one complete, verified artifact of the right kind.
    for name, kind, stage in STAGES:
        versions = sorted((root / name).glob("v*"))
        assert [v.name for v in versions] == ["v1"], f"{name}: {versions}"
        manifest = json.loads((versions[0] / "manifest.json").read_text())
        assert manifest["kind"] == kind and manifest["stage"] == stage
        for name in manifest["files"]:
            assert (versions[0] / name).exists(), f"{stage} lost {name}"
    for stage in ("pretrain", "midtrain", "extend-context", "sft", "rl"):
        model_dir = root / stage / "v1"
        assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
        assert (model_dir / "metrics.jsonl").exists(), f"{stage} wrote no metrics.jsonl"

    # The eval compares the five models of the chain side by side.
    results = json.loads((root / "eval" / "v1" / "results.json").read_text())
    assert [m["label"] for m in results["models"]] == ["pretrain", "midtrain", "extend-context", "sft", "rl"]
    for m in results["models"]:
        ppl = m["suites"]["perplexity"]["metrics"]
        assert ppl["loss"] > 0 and ppl["bits_per_byte"] > 0

    # The report walks the lineage back to the raw data: every stage has a section, every image exists.
    report_dir = root / "report" / "v1"
    report = (report_dir / "REPORT.md").read_text()
    for name, _, stage in STAGES[:-1]:
        assert f"## {stage} — `{name}/v1`" in report, f"report has no {name} section"
    assert "Missing from disk" not in report
    images = [line.split("](", 1)[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert images, "the report shows no plots"
    staged = [i for i in images if not i.startswith("images/eval-")]  # the eval section shows its plots twice, on purpose
    assert len(staged) == len(set(staged)), "two sections share an image file (pretrain and midtrain are both v1)"
    for img in images:
        assert (report_dir / img).exists(), f"report links a missing image {img}"
    assert f"report: {report_dir}/REPORT.md" in first.stdout

    # Make-style: a rerun rebuilds nothing.
    again = run_chain(root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("up to date:") == len(STAGES), again.stderr[-3000:]
    for name, _, _ in STAGES:
        assert [v.name for v in (root / name).glob("v*")] == ["v1"]
