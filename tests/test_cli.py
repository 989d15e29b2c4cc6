"""The CLI: help everywhere, the model commands, and every bad input as one clear line (exit 2)."""

import json

import pytest

from conftest import assert_clean_error

COMMANDS = [[], ["model"], ["model", "info"], ["model", "init"], ["export"], ["import-hf"], ["artifacts"],
            ["artifacts", "list"], ["artifacts", "show"], ["artifacts", "verify"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "k2")
def test_help(k2, cmd):
    result = k2(*cmd, "--help")
    assert "Usage" in result.output and len(result.output) > 200


def test_model_info_kimi_k2(k2):
    report = json.loads(k2("model", "info", "--preset", "kimi-k2", "--json").output)
    assert round(report["params"]["total"] / 1e12, 2) == 1.03
    assert round(report["params"]["active"] / 1e9, 1) == 32.9
    text = k2("model", "info", "--preset", "kimi-k2").output
    assert "1.03T" in text and "32.9B" in text


def test_init_export_import_verify(k2, tmp_path, artifacts_root):
    k2("model", "init", "--preset", "tiny", "--set", "hidden_size=64")
    assert (artifacts_root / "model" / "v1" / "model.safetensors").exists()
    info = json.loads(k2("model", "info", "model:latest", "--json").output)
    assert info["config"]["hidden_size"] == 64
    k2("export", "model:latest", "--out", tmp_path / "hf")
    k2("import-hf", tmp_path / "hf")
    k2("artifacts", "verify", "import:v1")
    listed = json.loads(k2("artifacts", "list", "--json").output)
    assert [a["id"] for a in listed] == ["model/v1", "import/v1"]  # oldest first
    assert "model/v1" in k2("artifacts", "show", "model:v1").output


def test_bad_inputs(k2, tmp_path, artifacts_root):
    k2("model", "init")
    k2("model", "init", "--out", tmp_path / "m")
    assert_clean_error(k2("export", "model:v9", "--out", tmp_path / "x", ok=False), "not found")
    assert_clean_error(k2("model", "info", "sft:latest", ok=False), "no versions")
    assert_clean_error(k2("model", "init", "--preset", "tinny", ok=False), "unknown model preset", "tiny")
    assert_clean_error(k2("model", "init", "--set", "hiden_size=8", ok=False), "unknown recipe key", "hidden_size")
    assert_clean_error(k2("model", "init", "--set", "hidden_size=big", ok=False), "expects int")
    assert_clean_error(k2("model", "init", "--set", "qk_rope_head_dim=7", ok=False), "impossible model shape")
    assert_clean_error(k2("model", "init", "--set", "num_experts_per_tok=99", ok=False), "impossible model shape")
    # export target that exists and is not empty
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert_clean_error(k2("export", "model:v1", "--out", tmp_path / "full", ok=False), "not empty", "--force")
    k2("export", "model:v1", "--out", tmp_path / "full", "--force")
    # tampered weights
    weights = artifacts_root / "model" / "v1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert_clean_error(k2("artifacts", "verify", "model:v1", ok=False), "sha256 mismatch")
    assert_clean_error(k2("export", "model:v1", "--out", tmp_path / "y", ok=False), "verification")
    # unknown schema version
    mpath = tmp_path / "m" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["schema_version"] = 7
    mpath.write_text(json.dumps(m))
    assert_clean_error(k2("model", "info", tmp_path / "m", ok=False), "schema version 7")
    # wrong kind: a manifest that says dataset
    m["schema_version"], m["kind"] = 1, "dataset"
    mpath.write_text(json.dumps(m))
    assert_clean_error(k2("export", tmp_path / "m", "--out", tmp_path / "z", ok=False), "dataset artifact, expected model")
    # a non-DeepseekV3 Hugging Face directory
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert_clean_error(k2("import-hf", tmp_path / "llama", ok=False), "model_type 'llama'", "k2 imports DeepseekV3ForCausalLM")
    assert_clean_error(k2("import-hf", tmp_path / "nothing", ok=False), "not a directory")
    # nothing half-written anywhere
    leftovers = [p for p in tmp_path.rglob(".tmp-*")]
    assert leftovers == []


STAGE_RECIPES = {"pretrain": "PretrainRecipe", "sft": "SFTRecipe", "rl": "RLRecipe", "extend_context": "ExtendRecipe",
                 "eval": "EvalRecipe", "rephrase": "RephraseRecipe", "synth": "SynthRecipe", "agentic": "AgenticRecipe"}


@pytest.mark.parametrize("stage", sorted(STAGE_RECIPES))
def test_every_stage_help_example_is_a_valid_override(stage):
    """The --set example each command's --help shows resolves (it used to be train.lr, a key no recipe has)."""
    import importlib

    from k2cli.commands.common import example_override
    from k2cli.recipes import resolve_recipe

    cls = getattr(importlib.import_module(f"k2cli.stages.{stage}"), STAGE_RECIPES[stage])
    resolve_recipe(cls, stage, "micro", None, [example_override(cls)])


def test_eval_list_suites_needs_no_model_and_no_model_is_a_clean_error(k2):
    assert "perplexity" in k2("eval", "--list-suites").output
    assert_clean_error(k2("eval", ok=False), "no model to evaluate")
