"""Parallelism, one layer below `optim` and `train`: process groups, collectives, DTensor helpers,
DDP/FSDP2 wrapping. Every function is a no-op (or the identity) in one process, so the code
above reads the same with one rank or many.

    groups.py       joining torchrun's process group, rank / world size, waiting, lost ranks
    collectives.py  reductions, objects from rank 0, point to point, Muon's all-to-all (`exchange`)
    dtensor.py      FSDP2's row shards (DTensor, Shard(0)) as Muon and the checkpoints see them
    wrap.py         DDP or FSDP2 around the model; gradient-sync control; whole weights back

    from k2cli import parallel
    parallel.world_size(); parallel.all_reduce_sum(t); parallel.wrap(model, "fsdp")

(Rank-0-only side effects of the stages — who writes artifacts, who prepares data first — live
in the stage runner, `k2cli.stages.runner`, above this layer.)
"""

from k2cli.parallel.collectives import (all_gather_object, all_reduce_max, all_reduce_sum, any_rank, barrier,
                                        broadcast_object, exchange, to_main)
from k2cli.parallel.dtensor import (check_row_sharded, dtensor_class, full_from_local, full_tensor, is_dtensor, local,
                                    local_rows, rows_per_rank)
from k2cli.parallel.groups import (init, is_distributed, is_main, launched_world_size, local_rank, rank,
                                   report_lost_ranks, setup, shutdown, timeout_s, wait, wait_for_main, wait_group,
                                   wait_timeout_s, world_size)
from k2cli.parallel.wrap import PARALLEL, full_model, no_sync, wrap

__all__ = [
    "PARALLEL", "all_gather_object", "all_reduce_max", "all_reduce_sum", "any_rank", "barrier", "broadcast_object",
    "check_row_sharded", "dtensor_class", "exchange", "full_from_local", "full_model", "full_tensor", "init",
    "is_distributed", "is_dtensor", "is_main", "launched_world_size", "local", "local_rank", "local_rows", "no_sync",
    "rank", "report_lost_ranks", "rows_per_rank", "setup", "shutdown", "timeout_s", "to_main", "wait", "wait_for_main",
    "wait_group", "wait_timeout_s", "world_size", "wrap",
]
