"""Running under torchrun: process groups, parallel wrappers, rank-0-only side effects.

Every function is a no-op (or the identity) in a single process, so the training loop and
the stages read the same with one rank or many. Under torchrun (RANK, WORLD_SIZE,
MASTER_ADDR in the environment) the loop calls `setup()` and `wrap()`; the model never knows
about ranks, and a stage only marks where rank 0 goes first (`begin_stage`) and what only
rank 0 writes (`artifact_writer`).

    process group  gloo on CPU; on CUDA "cpu:gloo,cuda:nccl" (NCCL for device tensors), each
                   rank on the GPU of its LOCAL_RANK. Torn down at exit.
    data           the global batch of step s is task.batch(s), a pure function of (seed, s);
                   rank r trains on its rows [r B/W, (r+1) B/W) (loop.local_slice): disjoint,
                   and resuming needs only the step.
    ddp            DistributedDataParallel: every rank holds the whole model; gradients are
                   all-reduced (averaged) during backward.
    fsdp           FSDP2 `fully_shard` on each decoder layer and on the root: parameters,
                   gradients and AdamW moments are DTensor row shards (Shard(0)), gathered for
                   forward/backward and reduce-scattered (averaged) after it. Each layer's side
                   outputs (ForwardStats) are kept away from FSDP's input handling (`_own_stats`).
    Muon           optim/muon.py: each matrix orthogonalised once, on its full form, by the rank
                   that owns it.
    timeouts       K2_DIST_TIMEOUT (s, default 600) bounds every training collective: a rank
                   that dies or hangs makes the others stop with a K2Error rather than hang.
                   K2_DIST_WAIT_TIMEOUT (s, default 7200) bounds waiting for rank 0 alone
                   (data preparation, checkpoint and artifact writing), on a separate gloo group.

Rank-0-only side effects: non-zero ranks are quiet (K2_QUIET) from import on, only rank 0
logs metrics, writes checkpoints and artifacts (`artifact_writer`); stages that share
caches call `begin_stage` so that rank 0 fills them first.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from k2cli.artifacts import Artifact, ArtifactWriter
from k2cli.errors import K2Error

PARALLEL = ("ddp", "fsdp")

_wait_group = None  # gloo group with the long timeout, for waiting on rank 0 (and for Python objects)
_followers_waiting = False  # rank 0 after begin_stage: the other ranks wait until it reaches the training


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _quiet_followers() -> None:
    """Only rank 0 talks: under torchrun the other ranks are quiet from the moment k2's training
    code is imported (the recipe printout and stage messages included); errors still print."""
    if _env_int("RANK", 0) > 0:
        os.environ.setdefault("K2_QUIET", "1")


_quiet_followers()


# ----------------------------------------------------------------------------- who am I


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_world_size() -> int:
    """The number of ranks this process is one of: the process group's, or else torchrun's WORLD_SIZE."""
    return world_size() if is_distributed() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    return rank() == 0


def timeout_s() -> float:
    return float(os.environ.get("K2_DIST_TIMEOUT", 600))


def wait_timeout_s() -> float:
    return float(os.environ.get("K2_DIST_WAIT_TIMEOUT", 7200))


# ----------------------------------------------------------------------------- set up, tear down


def setup() -> None:
    """Join the process group torchrun describes (once per process), then meet the other ranks.

    Called by the training loop; a no-op outside torchrun. Also releases the other ranks if
    this is rank 0 after `begin_stage`, then waits until every rank has arrived, so that the
    training collectives (short timeout) only start when everybody is there.
    """
    if _env_int("WORLD_SIZE", 1) <= 1:
        return
    _init()
    _release_followers()
    _wait()


def _init() -> None:
    global _wait_group
    if is_distributed():
        if _wait_group is None:  # a process group made by someone else: add ours
            _wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_timeout_s()))
        return
    if not dist.is_available():
        raise K2Error("WORLD_SIZE > 1 but this torch has no torch.distributed", "install a torch build with distributed support")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise K2Error(f"WORLD_SIZE is set but {', '.join(missing)} is not", "launch with torchrun, which sets them all")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"  # NCCL for device tensors, gloo for CPU ones
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as e:  # DistNetworkError/DistStoreError are RuntimeErrors
        raise K2Error(f"rank {os.environ['RANK']}: cannot join the process group at "
                      f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {_first_line(e)}",
                      "check --rdzv-endpoint / --master-addr, that every node can reach it, and that all ranks started")
    _wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_timeout_s()))
    atexit.register(shutdown)


def shutdown() -> None:
    """Leave the process group (at exit; safe to call twice)."""
    global _wait_group
    if is_distributed():
        dist.destroy_process_group()
    _wait_group = None


def _wait() -> None:
    """Barrier on the long-timeout group: for phases where some ranks wait for rank 0's work."""
    if is_distributed():
        with report_lost_ranks(wait_timeout_s()):
            dist.barrier(group=_wait_group)


def wait_for_main() -> None:
    """The other ranks wait here until rank 0 arrives (after writing a checkpoint, say)."""
    _wait()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


_COMM_FAILURES = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout", "broken pipe",
                  "socket", "processgroup")


@contextmanager
def report_lost_ranks(seconds: float | None = None):
    """Turn a failed collective (a peer died or hung past the timeout) into one clear K2Error."""
    try:
        yield
    except K2Error:
        raise
    except RuntimeError as e:  # torch.distributed.DistError and gloo's errors are RuntimeErrors
        text = str(e).lower()
        if not (is_distributed() or _env_int("WORLD_SIZE", 1) > 1) or not (
            isinstance(e, getattr(dist, "DistError", ())) or any(s in text for s in _COMM_FAILURES)
        ):
            raise
        raise K2Error(
            f"rank {rank()}/{world_size()}: lost contact with another rank ({_first_line(e)}): a rank died or hung",
            f"see the other ranks' errors; a collective waits at most {seconds or timeout_s():g} s (K2_DIST_TIMEOUT)",
        ) from e


# ----------------------------------------------------------------------------- stages


def begin_stage(resume: str = "auto") -> str:
    """Call at the top of a stage's run(): under torchrun rank 0 prepares first (clears the run
    directory on a restart, trains the tokenizer, tokenises, fills caches on shared storage)
    while the others wait; they follow once rank 0 reaches `artifact_writer` or the training
    loop, and then find every cache filled.

    Returns the `resume` mode this rank must use: rank 0 already cleared the run directory, so
    for the others "no" becomes "auto" (there is nothing left to resume from, and they must not
    delete what rank 0 wrote since).
    """
    global _followers_waiting
    if _env_int("WORLD_SIZE", 1) <= 1:
        return resume
    _init()
    if is_main():
        _followers_waiting = True
        return resume
    _wait()  # until rank 0 calls _release_followers()
    return "auto" if resume == "no" else resume


def _release_followers() -> None:
    global _followers_waiting
    if _followers_waiting:
        _followers_waiting = False
        _wait()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (picklable; over the gloo wait group)."""
    if not is_distributed():
        return obj
    box = [obj]
    with report_lost_ranks(wait_timeout_s()):
        dist.broadcast_object_list(box, src=0, group=_wait_group)
    return box[0]


def artifact_writer(**kw):
    """`ArtifactWriter(**kw)` for a stage that may run under torchrun: rank 0 writes the artifact;
    the others get a stand-in whose files go to a scratch directory and whose `commit()` waits
    for rank 0's and returns the same artifact (path and manifest)."""
    _release_followers()
    if not is_distributed():
        return ArtifactWriter(**kw)
    return _MainWriter(**kw) if is_main() else _FollowerWriter(**kw)


class _MainWriter(ArtifactWriter):
    """Rank 0: a normal writer that also tells the other ranks what it committed. (If rank 0
    fails instead, its exit breaks the connection and the waiting ranks stop with a K2Error.)"""

    def commit(self, summary: str = "") -> Artifact:
        art = super().commit(summary)
        broadcast_object((str(art.path), art.manifest))
        return art


class _FollowerWriter:
    """What a non-zero rank writes into goes to a scratch directory, removed afterwards."""

    def __init__(self, **kw):
        self.stage = kw.get("stage", "artifact")
        self.metrics = {}
        self.dir = Path(tempfile.mkdtemp(prefix=f"k2-rank{rank()}-{self.stage}-"))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        shutil.rmtree(self.dir, ignore_errors=True)
        return False

    def commit(self, summary: str = "") -> Artifact:
        path, manifest = broadcast_object(None)
        return Artifact(Path(path), manifest)


# ----------------------------------------------------------------------------- parallel wrappers


def wrap(model: torch.nn.Module, parallel: str = "ddp"):
    """The module to run forward/backward through: DDP around `model`, or `model` itself sharded
    in place by FSDP2 (its parameters become DTensor shards). The identity in one process."""
    if world_size() == 1:
        return model
    if parallel == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        device = next(model.parameters()).device
        # Buffers (router correction biases) are updated identically on every rank from the
        # all-reduced expert loads: no need to broadcast them before each forward.
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
    if parallel == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            raise K2Error("train.parallel=fsdp needs FSDP2 (torch >= 2.6)", "upgrade torch or use train.parallel=ddp")
        for layer in getattr(model, "layers", []):
            fully_shard(layer)  # one all-gather per layer, resharded after its forward
        fully_shard(model)  # the rest: embeddings, final norm, lm_head
        return model
    raise K2Error(f"unknown train.parallel '{parallel}'", "use ddp or fsdp")


def no_sync(module):
    """Skip the gradient reduction of this backward (all but the last micro-batch)."""
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(module)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


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


def full_model(model: torch.nn.Module) -> torch.nn.Module:
    """A plain module with the whole weights: `model` itself unless FSDP sharded it, in which case
    a new instance of its class is built from the gathered state (collective)."""
    if not any(is_dtensor(p) for p in model.parameters()):
        return model
    from torch.distributed.fsdp import FSDPModule

    device = local(next(model.parameters())).device
    state = {k: full_tensor(v) for k, v in model.state_dict().items()}
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    plain = cls(model.config)
    plain.load_state_dict(state)
    return plain.to(device)


# ----------------------------------------------------------------------------- collectives


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
    dist.all_gather_object(out, obj, group=_wait_group)
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
