"""Running a stage under torchrun: what only rank 0 does, and when the others follow.

Parallelism itself (process groups, collectives, DDP/FSDP2, DTensor helpers) is `k2cli.parallel`;
this module adds the stage-level side effects on top of it. A stage only marks where rank 0 goes
first (`begin_stage`) and what only rank 0 writes (`artifact_writer`); the training loop calls
`setup()`.

    data           the global batch of step s is task.batch(s), a pure function of (seed, s);
                   rank r trains on its rows [r B/W, (r+1) B/W) (loop.local_slice): disjoint,
                   and resuming needs only the step.
    rank 0 only    non-zero ranks are quiet (K2_QUIET) from import on; only rank 0 logs metrics,
                   writes checkpoints and artifacts (`artifact_writer`); stages that share caches
                   call `begin_stage` so that rank 0 fills them first.

The names of `k2cli.parallel` that stages use are re-exported here (`dist.is_main()` etc.).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from k2cli.artifacts import Artifact, ArtifactWriter
from k2cli.parallel import (PARALLEL, broadcast_object, full_tensor, init, is_distributed, is_main,  # noqa: F401
                            launched_world_size, rank, report_lost_ranks, wait, wait_for_main, world_size)
from k2cli.parallel.groups import _env_int

_followers_waiting = False  # rank 0 after begin_stage: the other ranks wait until it reaches the training


def setup() -> None:
    """Join the process group torchrun describes (once per process), then meet the other ranks.

    Called by the training loop; a no-op outside torchrun. Also releases the other ranks if
    this is rank 0 after `begin_stage`, then waits until every rank has arrived, so that the
    training collectives (short timeout) only start when everybody is there.
    """
    if _env_int("WORLD_SIZE", 1) <= 1:
        return
    init()
    _release_followers()
    wait()


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
    init()
    if is_main():
        _followers_waiting = True
        return resume
    wait()  # until rank 0 calls _release_followers()
    return "auto" if resume == "no" else resume


def _release_followers() -> None:
    global _followers_waiting
    if _followers_waiting:
        _followers_waiting = False
        wait()



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
