"""Collectives: reductions of device tensors, Python objects from rank 0, point to point, and the
all-to-all that distributed Muon exchanges matrices with. The identity in one process."""

from __future__ import annotations

import torch
import torch.distributed as dist

from k2cli.parallel.groups import is_distributed, is_main, local_rank, rank, report_lost_ranks, wait_group, wait_timeout_s, world_size


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (picklable; over the gloo wait group)."""
    if not is_distributed():
        return obj
    box = [obj]
    with report_lost_ranks(wait_timeout_s()):
        dist.broadcast_object_list(box, src=0, group=wait_group())
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (e.g. a stop signal that reached one rank first)."""
    if not is_distributed():
        return flag
    return bool(all_reduce_max(torch.tensor([int(flag)], device=_collective_device())).item())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=wait_group())
    return out


def to_main(t: torch.Tensor | None, src: int, shape: tuple, dtype: torch.dtype, device: torch.device):
    """Rank `src`'s tensor `t` delivered to rank 0 (point to point); None on every other rank.
    Every rank may call it: only `src` and rank 0 act."""
    if src == 0 or not is_distributed():
        return t if is_main() else None
    if rank() == src:
        dist.send(t.contiguous(), dst=0)
    elif is_main():
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buf, src=src)
        return buf
    return None


def _collective_device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def exchange(outgoing: list[list[torch.Tensor]], incoming: list[list[tuple]], dtype: torch.dtype,
             device: torch.device) -> list[list[torch.Tensor]]:
    """Point-to-point in one all_to_all: send outgoing[r] (a list of tensors) to rank r; receive
    from each rank s tensors of the shapes incoming[s]. Returns them, per source rank."""
    send = [torch.cat([t.reshape(-1).to(dtype) for t in ts]) if ts else torch.zeros(0, dtype=dtype, device=device)
            for ts in outgoing]
    send_splits = [s.numel() for s in send]
    recv_sizes = [[_numel(shape) for shape in shapes] for shapes in incoming]
    recv = torch.empty(sum(map(sum, recv_sizes)), dtype=dtype, device=device)
    dist.all_to_all_single(recv, torch.cat(send).to(device), [sum(s) for s in recv_sizes], send_splits)
    out, pieces = [], recv.split([sum(s) for s in recv_sizes])
    for piece, sizes, shapes in zip(pieces, recv_sizes, incoming):
        out.append([x.view(shape) for x, shape in zip(piece.split(sizes), shapes)])
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
