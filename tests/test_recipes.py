"""Recipes: typed TOML -> dataclasses, presets, --set overrides with clear errors."""

from dataclasses import dataclass, field

import pytest

from k2cli.errors import K2Error
from k2cli.model.config import ModelConfig
from k2cli.recipes import build, parse_override, resolve_recipe


@dataclass
class Train:
    lr: float = 1e-3
    steps: int = 10
    tags: list[str] = field(default_factory=list)
    resume: bool = False
    name: str | None = None


@dataclass
class Recipe:
    seed: int = 0
    train: Train = field(default_factory=Train)
    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_preset("tiny"))


def test_overrides_are_typed():
    r, _ = resolve_recipe(Recipe, "x", overrides=["train.lr=3e-3", "train.steps=5", "train.tags=['a','b']", "train.resume=true", "seed=7"])
    assert (r.train.lr, r.train.steps, r.train.tags, r.train.resume, r.seed) == (3e-3, 5, ["a", "b"], True, 7)
    r, _ = resolve_recipe(Recipe, "x", overrides=["train.lr=1", "train.name=run1"])
    assert r.train.lr == 1.0 and isinstance(r.train.lr, float) and r.train.name == "run1"


def test_preset_section_then_overrides():
    r = build(Recipe, {"model": {"preset": "small", "num_hidden_layers": 2}})
    assert r.model.hidden_size == 512 and r.model.num_hidden_layers == 2


def test_toml_file(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('seed = 3\n[train]\nlr = 0.5\n[model]\npreset = "tiny"\nhidden_size = 64\n')
    r, source = resolve_recipe(Recipe, "x", recipe_file=str(p), overrides=["model.num_hidden_layers=2"])
    assert (r.seed, r.train.lr, r.model.hidden_size, r.model.num_hidden_layers) == (3, 0.5, 64, 2)
    assert source == str(p)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown recipe key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.lr=1", "unknown recipe key 'trian'"),
        ("train.steps=abc", "'train.steps' expects int"),
        ("train.steps=1.5", "'train.steps' expects int"),
        ("train.resume=1", "'train.resume' expects bool"),
        ("model.qk_rope_head_dim=15", "even"),
        ("noequals", "bad override"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(K2Error) as e:
        resolve_recipe(Recipe, "x", overrides=[override])
    assert message in e.value.line()


def test_parse_override_falls_back_to_string():
    assert parse_override("a.b=hello world") == (["a", "b"], "hello world")
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])


def test_unknown_preset_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("K2_RECIPES", str(tmp_path))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "x.toml").write_text("seed = 1\n")
    assert resolve_recipe(Recipe, "x", preset="tiny")[0].seed == 1
    with pytest.raises(K2Error, match="did you mean 'tiny'"):
        resolve_recipe(Recipe, "x", preset="tiyn")
    with pytest.raises(K2Error, match="not found"):
        resolve_recipe(Recipe, "x", recipe_file=str(tmp_path / "missing.toml"))
    (tmp_path / "bad.toml").write_text("seed = = 1")
    with pytest.raises(K2Error, match="cannot parse"):
        resolve_recipe(Recipe, "x", recipe_file=str(tmp_path / "bad.toml"))
