"""Model files inside an artifact: `model.json` (the ModelConfig) + `model.safetensors`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from k2cli.artifacts import MANIFEST, Artifact, open_artifact
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
    """safetensors creates its files 0600; weights are meant to be shared like any other file. A full disk (which
    safetensors reports as its own error type) is one K2Error."""
    try:
        save_file(sd, str(path), metadata={"format": "pt"})
        os.chmod(path, 0o644)
    except (SafetensorError, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip()[:200]
        raise K2Error(f"cannot write the weights {path}: {reason}",
                      "free disk space, or choose another artifacts root (k2 --root DIR)") from None


def read_config(directory: Path) -> ModelConfig:
    """model.json of a model directory, checked: in an artifact, against its manifest's hash; anywhere, against
    the tensor shapes in model.safetensors (an edited model.json must not describe a model that is not there)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise K2Error(f"{directory} has no {CONFIG_FILE}", "pass a model artifact")
    if (directory / MANIFEST).is_file():
        open_artifact(directory).check(CONFIG_FILE)
    try:
        cfg = ModelConfig.from_dict(json.loads(path.read_text()), source=str(path))
    except OSError as e:
        raise K2Error(f"cannot read {path}: {e.strerror}", "check its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise K2Error(f"corrupt {path}: {e}", "re-create the model artifact")
    if (directory / WEIGHTS_FILE).is_file():
        check_shapes(cfg, directory / WEIGHTS_FILE, path)
    return cfg


def check_shapes(cfg: ModelConfig, weights: Path, config_path: Path) -> None:
    """Every tensor `cfg` defines has that shape in `weights` (read from the safetensors header only, against a
    model built on the meta device: no memory, no weights read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise K2Error(f"cannot read weights {weights}: {e}", "the artifact is damaged; re-create it") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in K2Model(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    for name, shape in expected.items():
        if name in stored and stored[name] != shape:
            raise K2Error(f"{config_path} does not describe the weights: {name} is {list(stored[name])} in "
                          f"{weights.name}, the config makes it {list(shape)}", "restore model.json, or re-create the model artifact")
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise K2Error(f"{config_path} does not describe the weights in {weights.name}: missing {missing[:3]}, "
                      f"unexpected {unexpected[:3]}", "restore model.json, or re-create the model artifact")


def load_weights(model: K2Model, path: Path) -> None:
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise K2Error(f"cannot read weights {path}: {e}", "the artifact is damaged; re-create it")
    if model.config.tie_word_embeddings:
        sd.setdefault("lm_head.weight", sd.get("embed_tokens.weight"))
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise K2Error(f"weights in {path} do not fit the model config: {str(e).splitlines()[-1].strip()[:200]}",
                      "the artifact is inconsistent; re-create it") from None
    if missing or unexpected:
        raise K2Error(
            f"weights in {path} do not fit the model config: missing {missing[:3]}, unexpected {unexpected[:3]}",
            "the artifact is inconsistent; re-create it",
        )


def load_model(ref, device="cpu", verify: bool = False) -> tuple[K2Model, Artifact]:
    """Build the model stored in a model artifact. Returns (model in eval mode, artifact).

    Every file of the artifact (weights, config, tokenizer) is checked against the manifest's sha256 before
    use: with `verify`, re-hashed; otherwise through the cache of hashes (`Artifact.check`: a file unchanged
    since it was last hashed is not read again), so serve, chat, `k2cli.load_model` and the agentic
    policies never load a damaged model silently."""
    device = check_device(device)  # a missing GPU is a clean error, not an AssertionError deep in torch
    art = open_artifact(ref, kind="model", verify=verify)
    if not verify:
        art.check()
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
