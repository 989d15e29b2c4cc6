"""Model files inside an artifact: `model.json` (the ModelConfig) + `model.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from k2cli.artifacts import Artifact, open_artifact
from k2cli.errors import K2Error
from k2cli.model.config import ModelConfig
from k2cli.model.precision import check_device
from k2cli.model.rope import Rotary
from k2cli.model.transformer import K2Model

CONFIG_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def state_dict_for_saving(model: K2Model) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # safetensors stores a tensor once; it is the embedding
    return sd


def save_model_files(model: K2Model, directory: Path, extra_config: dict | None = None) -> None:
    directory = Path(directory)
    (directory / CONFIG_FILE).write_text(model.config.to_json() + "\n")
    save_file(state_dict_for_saving(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def read_config(directory: Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise K2Error(f"{directory} has no {CONFIG_FILE}", "pass a model artifact")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise K2Error(f"corrupt {path}: {e}", "re-create the model artifact")


def load_weights(model: K2Model, path: Path) -> None:
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise K2Error(f"cannot read weights {path}: {e}", "the artifact is damaged; re-create it")
    if model.config.tie_word_embeddings:
        sd.setdefault("lm_head.weight", sd.get("embed_tokens.weight"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise K2Error(
            f"weights in {path} do not fit the model config: missing {missing[:3]}, unexpected {unexpected[:3]}",
            "the artifact is inconsistent; re-create it",
        )


def load_model(ref, device="cpu", verify: bool = False) -> tuple[K2Model, Artifact]:
    """Build the model stored in a model artifact. Returns (model in eval mode, artifact)."""
    device = check_device(device)  # a missing GPU is a clean error, not an AssertionError deep in torch
    art = open_artifact(ref, kind="model", verify=verify)
    cfg = read_config(art.path)
    with torch.device("meta"):
        model = K2Model(cfg)
    model = model.to_empty(device=device)
    model.rotary = Rotary(cfg).to(device)  # computed from the config, not stored
    load_weights(model, art.file(WEIGHTS_FILE))
    return model.eval(), art


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
