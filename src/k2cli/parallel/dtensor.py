"""DTensor helpers: FSDP2's row shards (Shard(0) over a 1-D mesh), as Muon and the checkpoints see them."""

from __future__ import annotations

import torch
import torch.distributed as dist

from k2cli.errors import K2Error
from k2cli.parallel.groups import rank, world_size


def dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return DTensor


def is_dtensor(t) -> bool:
    return dist.is_available() and isinstance(t, dtensor_class())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly DTensor) tensor; in-place ops on it change the DTensor."""
    return t.to_local() if is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a DTensor; collective)."""
    return t.full_tensor() if is_dtensor(t) else t


def rows_per_rank(n_rows: int, world: int) -> list[int]:
    """How DTensor's Shard(0) splits n_rows over `world` ranks: torch.chunk, ceil-sized pieces,
    the last ranks short or empty."""
    size = -(-n_rows // world)
    return [max(0, min(size, n_rows - r * size)) for r in range(world)]


def check_row_sharded(p: torch.Tensor) -> None:
    """The sharded layouts distributed Muon and the checkpoints understand: a 1-D mesh, Shard(0)."""
    if not is_dtensor(p):
        return
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or p.device_mesh.size() != world_size():
        raise K2Error(f"unsupported parameter sharding {p.placements} on mesh {tuple(p.device_mesh.shape)}",
                      "k2 supports FSDP2's default: fully_shard over all ranks (1-D mesh, Shard(0))")
    assert local(p).shape[0] == rows_per_rank(p.shape[0], world_size())[rank()], "unexpected Shard(0) split"


def local_rows(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's rows of `full` (shaped like p) when p is row-sharded; `full` itself otherwise."""
    if not is_dtensor(p):
        return full
    sizes = rows_per_rank(p.shape[0], world_size())
    start = sum(sizes[: rank()])
    return full[start : start + sizes[rank()]]


def full_from_local(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rebuild a whole tensor from every rank's rows `t` laid out like p's shards (collective)."""
    if not is_dtensor(p) or t.ndim == 0:
        return t
    D = dtensor_class()
    return D.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()).full_tensor()
