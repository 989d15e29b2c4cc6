"""Re-running a finished training stage, and `k2 --reuse`, for pretrain, extend-context, sft and rl.

The chosen behaviour (stages/runner.py): the same command again writes a NEW version that equals the
first — nothing is trained again (the run directory holds the final checkpoint), and every metric and
the summary come from the run's whole metrics.jsonl. (It used to write val loss null, "no validation
split" and "max attention logit nan", because the metrics were built from what this process ran.)
With --reuse the same command writes nothing and prints "up to date:".
"""

from __future__ import annotations

import json
import re

import pytest

from k2cli.artifacts import open_artifact, resolve
from k2cli.recipes import resolve_recipe
from k2cli.stages import agentic, extend_context, pretrain, rl, sft, synth
from k2cli.stages.runner import RunOptions

STAGES = {"pretrain": pretrain, "extend_context": extend_context, "sft": sft, "rl": rl}
RECIPES = {"pretrain": pretrain.PretrainRecipe, "extend_context": extend_context.ExtendRecipe, "sft": sft.SFTRecipe,
           "rl": rl.RLRecipe}


def recipe(stage: str, *overrides):
    return resolve_recipe(RECIPES[stage], stage, "micro", None, overrides)[0]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The micro chain, one first run per training stage, under a root given as an argument."""
    root = str(tmp_path_factory.mktemp("rerun") / "artifacts")
    opts = RunOptions(root=root)
    data = synth.run(resolve_recipe(synth.SynthRecipe, "synth", "micro", None, ())[0], opts)
    tasks = agentic.run(resolve_recipe(agentic.AgenticRecipe, "agentic", "micro", None, (f"input={data.path}",))[0], opts)
    recipes = {
        "pretrain": recipe("pretrain", f"data.input={data.path}", "train.steps=4"),
        "extend_context": recipe("extend_context", f"model={root}/pretrain/v1", "eval.suites=[]", "train.steps=2",
                                 "train.eval_every=1", "train.checkpoint_every=1"),
        "sft": recipe("sft", f"model={root}/extend-context/v1", f"data.agentic={tasks.path}"),
        "rl": recipe("rl", f"model={root}/sft/v1", "train.steps=2", "envs.mix={math=1.0,chat=1.0}"),
    }
    first = {}
    for name, module in STAGES.items():  # in pipeline order: each stage reads the one before
        first[name] = module.run(recipes[name], opts)
    return root, recipes, first


def comparable(art) -> tuple[dict, str, list[dict]]:
    """Metrics without wall times, summary.md without wall times, and metrics.jsonl without timings."""
    metrics = {k: v for k, v in art.metrics.items() if not k.endswith("wall_s")}
    summary = re.sub(r"wall time [\d.]+ s", "wall time - s", art.file("summary.md").read_text())
    timing = ("tokens_per_s", "mfu", "elapsed_s", "time_s")
    history = [{k: v for k, v in json.loads(line).items() if not k.endswith(timing)}
               for line in art.file("metrics.jsonl").read_text().splitlines()]
    return metrics, summary, history


@pytest.mark.parametrize("name", list(STAGES))
def test_rerun_writes_a_version_equal_to_the_first(chain, name):
    root, recipes, first = chain
    again = STAGES[name].run(recipes[name], RunOptions(root=root))
    assert again.path != first[name].path and again.manifest["version"] == first[name].manifest["version"] + 1
    m1, s1, h1 = comparable(first[name])
    m2, s2, h2 = comparable(again)
    assert m2 == m1 and s2 == s1 and h2 == h1
    headline = "end_heldout_math" if name == "rl" else "final_val_loss"
    assert m2[headline] is not None and m2["steps"] == recipes[name].train.steps == len(h2)
    assert sum(r.get("heads_clipped_total", 0) for r in h2) == sum(r.get("heads_clipped_total", 0) for r in h1)
    assert "nan" not in s2 and "no validation split" not in s2
    assert again.file("model.safetensors").read_bytes() == first[name].file("model.safetensors").read_bytes()
    stage_dir = again.path.parent.name
    with_root = RunOptions(root=root)
    from k2cli.artifacts import using_root

    with using_root(with_root.root):
        latest = open_artifact(f"{stage_dir}:latest", verify=True)
        assert latest.path.resolve() == again.path.resolve() == resolve(f"{stage_dir}:latest").resolve()


@pytest.mark.parametrize("name", list(STAGES))
def test_reuse_writes_nothing_when_recipe_and_inputs_are_unchanged(chain, name, capsys):
    root, recipes, first = chain
    before = sorted(p.name for p in first[name].path.parent.glob("v*"))
    art = STAGES[name].run(recipes[name], RunOptions(root=root, reuse=True))
    assert sorted(p.name for p in first[name].path.parent.glob("v*")) == before
    assert art.path.name == max(before, key=lambda v: int(v[1:]))
    assert f"up to date: {art.id}" in capsys.readouterr().err


def test_reuse_makes_again_what_changed(chain):
    root, recipes, first = chain
    changed = recipe("pretrain", f"data.input={first['pretrain'].manifest['inputs'][0]['path']}", "train.steps=3")
    art = pretrain.run(changed, RunOptions(root=root, reuse=True))  # another recipe: trained, not skipped
    assert art.metrics["steps"] == 3 and art.path.parent == first["pretrain"].path.parent
    assert art.manifest["version"] > first["pretrain"].manifest["version"]
