"""Process groups: joining torchrun's group, who this process is, waiting, lost ranks.

Every function is a no-op (or rank 0 of 1) in a single process.

    process group  gloo on CPU; on CUDA "cpu:gloo,cuda:nccl" (NCCL for device tensors), each
                   rank on the GPU of its LOCAL_RANK. Torn down at exit.
    timeouts       K2_DIST_TIMEOUT (s, default 600) bounds every training collective: a rank
                   that dies or hangs makes the others stop with a K2Error rather than hang.
                   K2_DIST_WAIT_TIMEOUT (s, default 7200) bounds waiting for rank 0 alone
                   (data preparation, checkpoint and artifact writing), on a separate gloo group.

Non-zero ranks are quiet (K2_QUIET) from the import of this module on.
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from k2cli.errors import K2Error

_wait_group = None  # gloo group with the long timeout, for waiting on rank 0 (and for Python objects)

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


def init() -> None:
    """Join the process group torchrun describes (once per process) and make the wait group."""
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


def setup() -> None:
    """Join the process group torchrun describes and meet the other ranks (the training loop calls it;
    a no-op in one process). The stage runner released the waiting ranks first (stages/runner.py), so
    the training collectives (short timeout) only start when everybody is there."""
    if launched_world_size() <= 1:
        return
    init()
    wait()


def shutdown() -> None:
    """Leave the process group (at exit; safe to call twice)."""
    global _wait_group
    if is_distributed():
        dist.destroy_process_group()
    _wait_group = None


def wait() -> None:
    """Barrier on the long-timeout group: for phases where some ranks wait for rank 0's work."""
    if is_distributed():
        with report_lost_ranks(wait_timeout_s()):
            dist.barrier(group=_wait_group)


def wait_for_main() -> None:
    """The other ranks wait here until rank 0 arrives (after writing a checkpoint, say)."""
    wait()


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



def wait_group():
    """The long-timeout gloo group (None outside torchrun)."""
    return _wait_group
