"""Reading a Hugging Face DeepseekV3 / Kimi K2 checkpoint directory, one shard at a time.

A checkpoint as published on the Hub (DeepSeek-V3, Kimi K2) looks like

    config.json                          model_type deepseek_v3 | kimi_k2, the quantization_config
    model.safetensors.index.json         {"weight_map": {tensor name: shard file}}
    model-00001-of-000062.safetensors    ...
    tokenizer files, generation_config.json, *.py (remote code, never run here)

or, small models saved by transformers, a single `model.safetensors`.

FP8 block quantisation (`quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [128, 128]}`): every linear weight W [R, C] is stored as float8_e4m3fn
next to `W_scale_inv` [ceil(R/128), ceil(C/128)] (float32), one scale per 128x128 block, and

    W = fp8(W).float() * scale_inv[i // 128, j // 128]

The last block row/column is partial when R or C is not a multiple of 128 (DeepSeek-V3's
kv_a_proj_with_mqa has R = 512 + 64 = 576). Embeddings, norms, the router and its bias
are stored unquantised.

`iter_hf_tensors` yields the tensors shard by shard (safetensors reads a tensor from a
memory map without loading its file), dequantising on the way, so an import holds at most
one shard's pages plus the tensors it has already converted: never the whole checkpoint twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from k2cli.errors import K2Error
from k2cli.jsonfile import read_object
from k2cli.model.config import ModelConfig
from k2cli.model.hf import from_hf_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"


@dataclass
class HFCheckpoint:
    directory: Path
    hf: dict  # config.json as written
    config: ModelConfig
    weight_map: dict[str, str]  # tensor name -> file name (inside directory)
    block: tuple[int, int] | None  # FP8 block shape (rows, cols), None when not quantised


# ----------------------------------------------------------------------------- config.json


def read_hf_json(directory: Path) -> dict:
    directory = Path(directory)
    path = directory / "config.json"
    if not directory.is_dir():
        raise K2Error(f"not a directory: {directory}", "pass a Hugging Face model directory")
    if not path.is_file():
        raise K2Error(f"{directory} has no config.json", "pass a Hugging Face model directory (save_pretrained writes one)")
    return read_object(path, "pass a valid Hugging Face model directory")


def read_hf_config(directory: Path) -> ModelConfig:
    return _model_config(read_hf_json(directory), Path(directory) / "config.json")


def _model_config(hf: dict, path: Path) -> ModelConfig:
    try:
        return from_hf_config(hf, str(path))
    except KeyError as e:
        raise K2Error(f"{path} lacks the field {e}", "pass a DeepseekV3 / Kimi K2 config.json")
    except (TypeError, ValueError) as e:
        raise K2Error(f"{path} has a field of the wrong type: {e}", "pass a valid DeepseekV3 / Kimi K2 config.json")


def fp8_block(hf: dict, source: str) -> tuple[int, int] | None:
    """The FP8 block shape from `quantization_config`, None for an unquantised checkpoint."""
    q = hf.get("quantization_config")
    if not q:
        return None
    method, fmt, block = q.get("quant_method"), q.get("fmt", "e4m3"), q.get("weight_block_size")
    if method != "fp8" or fmt not in ("e4m3", "e5m2") or not (isinstance(block, list) and len(block) == 2):
        raise K2Error(
            f"{source}: quantization {json.dumps({'quant_method': method, 'fmt': fmt, 'weight_block_size': block})} "
            "is not supported",
            "k2 imports unquantised (bf16/fp16/fp32) checkpoints and FP8 ones with per-block scales "
            "(quant_method fp8, weight_block_size [128, 128]); dequantise others first",
        )
    return int(block[0]), int(block[1])


# ----------------------------------------------------------------------------- shards


def read_weight_map(directory: Path) -> dict[str, str]:
    """Tensor name -> shard file, from the index (sharded) or the single file's header."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
            raise K2Error(f"{index} is damaged (no weight_map of tensor -> file)", "re-download the checkpoint")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise K2Error(
                f"{directory}: {len(missing)} of the {len(files)} shards named in {INDEX_FILE} are missing "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})",
                "download the whole checkpoint",
            )
        return weight_map
    single = directory / SINGLE_FILE
    if single.is_file():
        with _open_shard(single) as f:
            return {name: SINGLE_FILE for name in f.keys()}
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
        raise K2Error(f"{directory} holds PyTorch pickle weights (.bin), not safetensors",
                      "re-save it with save_pretrained(..., safe_serialization=True)")
    if list(directory.glob("*.safetensors")):
        raise K2Error(f"{directory} has safetensors shards but no {INDEX_FILE}", "download the index file too")
    raise K2Error(f"{directory} has no safetensors weights", "pass a directory written by save_pretrained")


def _open_shard(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise K2Error(f"cannot read {path}: {e}", "the checkpoint is damaged; re-download it")


def open_hf_checkpoint(directory: Path) -> HFCheckpoint:
    directory = Path(directory)
    hf = read_hf_json(directory)
    config = _model_config(hf, directory / "config.json")
    block = fp8_block(hf, str(directory / "config.json"))
    return HFCheckpoint(directory, hf, config, read_weight_map(directory), block)


# ----------------------------------------------------------------------------- FP8


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    """w [R, C] float8, scale_inv [ceil(R/bm), ceil(C/bn)] -> float32 [R, C].

    Pad w to whole blocks, view it as [R/bm, bm, C/bn, bn], scale each block, cut the padding off."""
    bm, bn = block
    R, C = w.shape
    nr, nc = -(-R // bm), -(-C // bn)
    if scale_inv.dim() != 2 or tuple(scale_inv.shape) != (nr, nc):
        raise K2Error(
            f"tensor '{name}{SCALE_SUFFIX}' has shape {list(scale_inv.shape)}, but {name} {list(w.shape)} "
            f"in {bm}x{bn} blocks needs [{nr}, {nc}]",
            "the checkpoint's weight_block_size does not match its scales",
        )
    out = torch.zeros(nr * bm, nc * bn, dtype=torch.float32)
    out[:R, :C] = w.float()
    out.view(nr, bm, nc, bn).mul_(scale_inv.float()[:, None, :, None])
    return out[:R, :C].contiguous() if (R, C) != out.shape else out


# ----------------------------------------------------------------------------- tensors


def iter_hf_tensors(ckpt: HFCheckpoint, keep: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every kept tensor, shard by shard; FP8 weights come out dequantised (float32).

    Scales are consumed, never yielded. A tensor is read only when it is kept."""
    by_file: dict[str, list[str]] = {}
    for name, file in ckpt.weight_map.items():
        if not name.endswith(SCALE_SUFFIX) and keep(name):
            by_file.setdefault(file, []).append(name)
    for file in sorted(by_file):
        with _open_shard(ckpt.directory / file) as f:
            present = set(f.keys())
            for name in by_file[file]:
                if name not in present:
                    raise K2Error(f"{INDEX_FILE} puts '{name}' in {file}, which does not hold it",
                                  "the checkpoint is damaged; re-download it")
                t = _read(f, name, file)
                if t.dtype in FP8_DTYPES:
                    scale = _scale(ckpt, f, file, name, t)  # (raises unless config and scale are there)
                    t = dequantize_fp8(t, scale, ckpt.block, name)
                yield name, t


def _read(f, name: str, file: str) -> torch.Tensor:
    """A tensor that owns its memory: safetensors hands out views of the file's memory map, and
    keeping one would keep the whole shard's pages resident after the reader has moved on."""
    try:
        return f.get_tensor(name).clone()
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise K2Error(f"cannot read tensor '{name}' from {file}: {e}", "the checkpoint is damaged; re-download it")


def _scale(ckpt: HFCheckpoint, f, file: str, name: str, t: torch.Tensor) -> torch.Tensor:
    scale_name = name + SCALE_SUFFIX
    if ckpt.block is None:
        raise K2Error(
            f"tensor '{name}' is {str(t.dtype).removeprefix('torch.')} but config.json has no FP8 quantization_config",
            "add the checkpoint's quantization_config (quant_method fp8, weight_block_size) to config.json",
        )
    if scale_name not in ckpt.weight_map:
        raise K2Error(
            f"tensor '{name}' is {str(t.dtype).removeprefix('torch.')} but the checkpoint has no '{scale_name}'",
            "an FP8 checkpoint needs a weight_scale_inv per quantised weight; download the complete checkpoint",
        )
    if ckpt.weight_map[scale_name] == file:
        return _read(f, scale_name, file)
    other = ckpt.weight_map[scale_name]  # a scale may sit in another shard: read just that tensor
    with _open_shard(ckpt.directory / other) as g:
        return _read(g, scale_name, other)


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in one dict (FP8 dequantised): for small models and tests."""
    return dict(iter_hf_tensors(open_hf_checkpoint(directory)))
