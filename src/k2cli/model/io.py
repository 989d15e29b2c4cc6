"""Model files inside an artifact: `model.json` (the ModelConfig) + `model.safetensors`."""

from __future__ import annotations

import json
import os
import shutil
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
# The files a model carries with it: its tokenizer (k2's BPE, any Hugging Face tokenizer, or Kimi's
# tiktoken one), chat template and generation defaults. Data only: a checkpoint's tokenization_*.py
# (remote code) is never copied, let alone run. They sit in the artifact's top directory, where
# `k2cli.data.tokenizer` reads them and where `k2 export` copies them from.
TOKENIZER_FILES = (
    "tokenizer.json",          # HF fast tokenizer (k2's own BPE is one)
    "tokenizer_config.json",   # special tokens, chat template, tokenizer class
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",     # transformers 5 writes the template here
    "chat_template.json",
    "tiktoken.model",          # Kimi K2's tokenizer (base64 token + rank per line)
    "tokenizer.model",         # sentencepiece
    "vocab.json",
    "merges.txt",
    "generation_config.json",  # eos ids a checkpoint's authors chose (tokenizer ids, so they travel with it)
)


def state_dict_for_saving(model: K2Model) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # safetensors stores a tensor once; it is the embedding
    return sd


def save_model_files(model: K2Model, directory: Path, extra_config: dict | None = None) -> None:
    save_state_dict_files(state_dict_for_saving(model), model.config, directory)


def save_state_dict_files(sd: dict[str, torch.Tensor], cfg: ModelConfig, directory: Path) -> None:
    """model.json + model.safetensors from a state dict (as `state_dict_for_saving` gives it)."""
    directory = Path(directory)
    (directory / CONFIG_FILE).write_text(cfg.to_json() + "\n")
    save_weights(sd, directory / WEIGHTS_FILE)


def save_weights(sd: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors creates its files 0600; weights are meant to be shared like any other file."""
    save_file(sd, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)


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
    """Copy the TOKENIZER_FILES `src` has into `dst`, byte for byte. Returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
