"""The stage runner: what every stage does around its own work, written once.

A stage module reads top to bottom like a script; the runner owns the rest:

    def run(recipe, opts=RunOptions()):
        with Stage("sft", "model", recipe, opts) as st:      # the artifacts root; under torchrun rank 0 goes first
            model, model_art = load_model(recipe.model)       # ... the stage opens its inputs ...
            if done := st.up_to_date([model_art, ...]):       # k2 --reuse: same recipe, same inputs -> nothing to do
                return done
            st.run_dir([model_art.manifest["uid"]])           # checkpoints; cleared first on --restart
            trained = st.train(model, task)                   # THE loop; history = the run's whole metrics.jsonl
            with st.writer() as w:                            # rank 0 writes, into a temporary directory
                w.metrics = {...}
                st.write_model(w, trained, tokenizer_dir, summary)
                return w.commit(summary="one line")

Every decision is an argument or a return value, never an environment variable:

    opts.root     where artifacts are read and written (`k2 --root`); None: $K2_ARTIFACTS or ./artifacts
    opts.reuse    `k2 --reuse`: `up_to_date(inputs)` returns the latest artifact of this output when it was
                  made from the same recipe and inputs (and prints "up to date: ..."), else None
    opts.resume   training stages: "auto" continues the run directory's last checkpoint, "yes" requires
                  one (--resume), "no" clears the run directory first (--restart)

Re-running a finished training stage (without --reuse) writes a new version equal to the first: the
run directory of the same recipe and inputs holds the final checkpoint and the whole metrics.jsonl,
so nothing is trained again, the final weights are loaded, and every metric and the summary are read
from metrics.jsonl (all the steps of the run, whichever process ran them; never only this process's).

A training stage needs only its Task and its recipe sections (`optim`, `schedule`, `train`); see
docs/CONVENTIONS.md, "Adding a training stage".

Under torchrun (WORLD_SIZE > 1) rank 0 prepares first (clears the run directory, trains the
tokenizer, fills caches on shared storage) while the other ranks wait; they follow when rank 0
reaches the training loop (or the writer, or finds the output up to date), and then find every
cache filled. Only rank 0 writes the artifact; the others get a stand-in writer whose `commit()`
returns rank 0's artifact.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from k2cli import parallel
from k2cli.artifacts import Artifact, ArtifactWriter, artifacts_root, remove_temps, stale_temps, using_root
from k2cli.artifacts import up_to_date as _latest_if_same
from k2cli.console import err
from k2cli.errors import K2Error
from k2cli.recipes import to_dict, validate
from k2cli.train.outputs import run_dir_for, write_model_outputs
from k2cli.train.progress import read_metrics

RESUME = ("auto", "yes", "no")


@dataclass(frozen=True)
class RunOptions:
    """How a stage runs (the command line's --out/--force/--resume/--restart and k2's --root/--reuse)."""

    out: str | None = None  # None: the next version under <root>/<stage>/; a bare name: under <root>/<name>/; else a directory
    force: bool = False  # replace a non-empty --out directory
    resume: str = "auto"  # auto | yes | no (training stages)
    reuse: bool = False  # skip when the latest artifact was made from the same recipe and inputs
    root: str | None = None  # the artifacts root; None: $K2_ARTIFACTS or ./artifacts


@dataclass
class Trained:
    """What the training loop produced, with the history of the WHOLE run (read from metrics.jsonl)."""

    model: object
    history: list[dict]  # every step's record, including steps run by an earlier, interrupted process
    run_dir: Path
    resumed_from: int | None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def last(self, key: str):
        """The latest value of `key` (e.g. val_loss, logged only at evaluation steps), or None."""
        return next((r[key] for r in reversed(self.history) if key in r), None)

    def total(self, key: str):
        return sum(r.get(key, 0) for r in self.history)


class Stage:
    """One run of one stage: see the module docstring. Use as a context manager."""

    def __init__(self, name: str, kind: str, recipe, opts: RunOptions = RunOptions()):
        """`recipe`: the stage's recipe dataclass (or a plain dict), stored in the manifest as a dict."""
        if opts.resume not in RESUME:
            raise ValueError(f"resume must be one of {RESUME}, got {opts.resume!r}")
        self.name, self.kind, self.opts = name, kind, opts
        self.recipe_obj = recipe
        self.recipe = recipe if isinstance(recipe, dict) else to_dict(recipe)  # what the manifest stores
        self.inputs: list[Artifact] = []
        self.resume = opts.resume
        self.dir: Path | None = None  # the run directory (training stages)
        self._locked: Path | None = None  # the run directory whose lock this stage holds
        self._stack = ExitStack()

    def __enter__(self):
        if not isinstance(self.recipe_obj, dict):
            validate(self.recipe_obj)  # the recipes module's one walk (a recipe built in Python skipped resolve)
        self._stack.enter_context(using_root(self.opts.root))
        self.resume = begin_stage(self.opts.resume)
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    # ---- decisions

    def up_to_date(self, inputs: list[Artifact]) -> Artifact | None:
        """Record the inputs; under --reuse, the latest artifact if it has this recipe and these inputs."""
        self.inputs = [a for a in inputs if a is not None]
        if not self.opts.reuse:
            return None
        art = _latest_if_same(self.name, self.kind, self.recipe, self.inputs, self.opts.out)
        if art is not None:
            _release_followers()  # the other ranks find the same artifact and return too
            if parallel.is_main():  # make chain and reproduce/run.py look for this line
                err.print(f"[green]up to date:[/] {art.id} was made from the same recipe and inputs "
                          "(drop --reuse to make it again)", soft_wrap=True)
        return art

    def run_dir(self, key: list[str], name: str | None = None) -> Path:
        """<root>/<stage>/runs/<id>: the same recipe on the same inputs (`key`) is the same run, and resumes.
        Rank 0 holds the run's lock until the stage ends (a second identical run refuses, `lock_run_dir`),
        removes what a killed process left in it (`.tmp-step-*`), and on --restart (resume "no") clears it first."""
        self.dir = run_dir_for(self.name, self.recipe, key) if name is None else artifacts_root() / self.name / "runs" / name
        if parallel.is_main():
            if self._locked != self.dir:
                self._stack.callback(os.close, lock_run_dir(self.dir))
                self._locked = self.dir
            if self.resume == "no" and self.dir.exists():
                shutil.rmtree(self.dir)
            remove_temps(stale_temps(self.dir / "checkpoints"))
        return self.dir

    # ---- work

    def train(self, model, task) -> Trained:
        """THE training loop (train/loop.py) on `task` with the recipe's `optim`, `schedule` and `train`
        sections, in the run directory. The history is the run's whole metrics.jsonl."""
        from k2cli.train.loop import train

        r = self.recipe_obj
        _release_followers()
        result = train(model, task, r.optim, r.schedule, r.train, self.dir, self.recipe, title=self.name, resume=self.resume)
        return Trained(result.model, read_metrics(self.dir / "metrics.jsonl"), self.dir, result.resumed_from)

    def writer(self, data_split: dict | None = None):
        """The artifact writer of this output (rank 0 writes; see `artifact_writer`)."""
        return artifact_writer(stage=self.name, kind=self.kind, out=self.opts.out, recipe=self.recipe, inputs=self.inputs,
                               force=self.opts.force, data_split=data_split)

    def write_model(self, w, trained: Trained, tokenizer_dir: Path, summary: list[str], reference: dict | None = None) -> None:
        """Weights, config, tokenizer, metrics.jsonl, plots (QK-Clip's tau drawn for MuonClip) and summary.md."""
        optim = self.recipe_obj.optim
        tau = optim.qk_clip_tau if optim.name == "muonclip" else None
        write_model_outputs(w, trained.model, tokenizer_dir, trained.run_dir, self.name, summary, tau=tau, reference=reference)


def lock_run_dir(run_dir: Path) -> int:
    """Take the run's lock, `<root>/<stage>/.locks/<run id>.lock` (fcntl.flock, exclusive, non-blocking; beside
    runs/, not in it, so that --restart can delete the run directory while holding it), or refuse in one line: two
    identical runs started together would otherwise train into one run directory (doubled metrics, mixed
    checkpoints). Refusing rather than waiting: the first run may take hours, and re-running after it ends
    writes the same version from its final checkpoint anyway. Returns the open descriptor; the lock lasts
    until it is closed (the stage's end, or the process's death: a killed run never leaves a stale lock)."""
    import fcntl

    lock = run_dir.parent.parent / ".locks" / f"{run_dir.name}.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise K2Error(f"cannot write the run directory {run_dir.parent}: {e.strerror}",
                      "free disk space, fix the permissions, or choose another artifacts root (k2 --root DIR)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held by another process (or another Stage of this one)
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise K2Error(f"this run is already in progress ({holder}) in {run_dir}",
                      "wait for it to finish (re-running it then writes the same version without training), "
                      "or change the recipe or inputs") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd


def load_parent(ref: str, hint: str, seq_len: int | None = None):
    """The model a stage continues (verified), with its tokenizer: (model, artifact, tokenizer). `hint` says
    which model to pass instead; `seq_len` (train.seq_len) must fit the model's positions."""
    from k2cli.data.tokenizer import has_tokenizer, load_tokenizer
    from k2cli.model.io import load_model

    model, art = load_model(ref, verify=True)
    if not has_tokenizer(art.path):
        raise K2Error(f"model {art.id} has no tokenizer (no tokenizer.json or tiktoken.model)", hint)
    check_fits(seq_len or 0, model.config)
    return model, art, load_tokenizer(art.path)


def check_fits(seq_len: int, cfg) -> None:
    if seq_len > cfg.max_position_embeddings:
        raise K2Error(f"train.seq_len={seq_len} is above the model's {cfg.max_position_embeddings} positions",
                      "lower train.seq_len or raise model.max_position_embeddings")


# ----------------------------------------------------------------------------- several ranks

_followers_waiting = False  # rank 0 after begin_stage: the other ranks wait until it reaches the training


def begin_stage(resume: str = "auto") -> str:
    """At the top of a stage: under torchrun rank 0 prepares first while the others wait (released by
    `_release_followers`). Returns the `resume` mode this rank must use: rank 0 already cleared the run
    directory, so for the others "no" becomes "auto" (they must not delete what rank 0 wrote since)."""
    global _followers_waiting
    if parallel.launched_world_size() <= 1:
        return resume
    parallel.init()
    if parallel.is_main():
        _followers_waiting = True
        return resume
    parallel.wait_for_main()  # until rank 0 calls _release_followers()
    return "auto" if resume == "no" else resume


def _release_followers() -> None:
    global _followers_waiting
    if _followers_waiting:
        _followers_waiting = False
        parallel.wait_for_main()


def artifact_writer(**kw):
    """`ArtifactWriter(**kw)` for a stage that may run under torchrun: rank 0 writes the artifact;
    the others get a stand-in whose files go to a scratch directory and whose `commit()` waits
    for rank 0's and returns the same artifact (path and manifest)."""
    _release_followers()
    if not parallel.is_distributed():
        return ArtifactWriter(**kw)
    return _MainWriter(**kw) if parallel.is_main() else _FollowerWriter(**kw)


class _MainWriter(ArtifactWriter):
    """Rank 0: a normal writer that also tells the other ranks what it committed. (If rank 0
    fails instead, its exit breaks the connection and the waiting ranks stop with a K2Error.)"""

    def commit(self, summary: str = "") -> Artifact:
        art = super().commit(summary)
        parallel.broadcast_object((str(art.path), art.manifest))
        return art


class _FollowerWriter:
    """What a non-zero rank writes into goes to a scratch directory, removed afterwards."""

    def __init__(self, **kw):
        self.stage = kw.get("stage", "artifact")
        self.metrics = {}
        self.dir = Path(tempfile.mkdtemp(prefix=f"k2-rank{parallel.rank()}-{self.stage}-"))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        shutil.rmtree(self.dir, ignore_errors=True)
        return False

    def commit(self, summary: str = "") -> Artifact:
        path, manifest = parallel.broadcast_object(None)
        return Artifact(Path(path), manifest)
