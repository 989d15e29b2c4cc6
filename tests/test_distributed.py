"""Training under torchrun, on CPU: 2 gloo ranks (spawned processes) against one process.

DDP and FSDP2 runs reproduce the one-process losses, QK-Clip decisions and final weights;
checkpoints move between world sizes (2 -> 1 and 1 -> 2) and from older/foreign layouts;
bad input (batch not divisible, a rank that dies) fails with one clear error.
"""

import dataclasses
import multiprocessing as mp
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from k2cli.errors import K2Error
from k2cli.model.transformer import build_model
from k2cli.optim.muon import OptimConfig, assign_owners, build_optimizer, ns_cost
from k2cli.optim.schedule import ScheduleConfig
from k2cli.train import checkpoint
from k2cli import parallel
from k2cli.train import loop
from k2cli.train.loop import TrainConfig, local_slice, train
from k2cli.train.progress import read_metrics
from test_train_loop import CFG as MICRO, make_task

# Two MoE layers (layer 0 dense): side outputs of several sharded layers must all reach the loss.
CFG = dataclasses.replace(MICRO, num_hidden_layers=3)

STEPS = 4
TIMEOUT = 10  # K2_DIST_TIMEOUT of the 2-rank runs, in seconds
TAU = 0.03  # the micro model's max logits are ~0.02-0.04: QK-Clip fires on some heads, not all


def train_run(run_dir, steps=STEPS, parallel="ddp", batch=4, task=None, resume="auto"):
    """The same run whatever the world size: global batch `batch`, checkpoints every 2 steps."""
    model = build_model(CFG, seed=0)
    tc = TrainConfig(steps=steps, batch_size=batch, seq_len=16, eval_every=STEPS, checkpoint_every=2,
                     keep_checkpoints=3, peak_tflops=1.0, parallel=parallel,
                     balance_loss_alpha=0.05)  # large: a mishandled balance-loss gradient must show
    recipe = {"train": dataclasses.asdict(tc), "model": CFG.to_dict(), "optim": {"lr": 1e-2}}
    made = []  # the loop's optimizer, to look at how Muon's state is split between ranks
    build = loop.build_optimizer
    loop.build_optimizer = lambda *a: made.append(build(*a)) or made[-1]
    try:
        result = train(model, task or make_task(batch=batch), OptimConfig(lr=1e-2, qk_clip_tau=TAU),
                       ScheduleConfig(warmup_steps=1), tc, Path(run_dir), recipe, resume=resume)
    finally:
        loop.build_optimizer = build
    result.momentum_held = sum("momentum_buffer" in s for s in made[0].state.values()) if made else None
    return result


def summary(result) -> dict:
    return {
        "loss": [r["loss"] for r in result.history],
        "clipped": [r["heads_clipped"] for r in result.history],
        "val_loss": [r["val_loss"] for r in result.history if "val_loss" in r],
        "weights": {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()},
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def assert_same_run(got: dict, ref: dict, first: int = 0):
    """`got` ran steps first+1..STEPS (a resumed run), `ref` all of them."""
    assert len(got["loss"]) == len(ref["loss"]) - first
    for s, (loss, clipped) in enumerate(zip(got["loss"], got["clipped"]), start=first):
        assert abs(loss - ref["loss"][s]) <= 1e-5 * abs(ref["loss"][s]), (s, got["loss"], ref["loss"])
        assert clipped == ref["clipped"][s], (s, got["clipped"], ref["clipped"])
    assert set(got["weights"]) == set(ref["weights"])
    worst = max(rel(got["weights"][k], ref["weights"][k]) for k in ref["weights"])
    assert worst <= 1e-5, worst


# ----------------------------------------------------------------------------- spawned ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HangAt:
    """A task whose rank 1 stops taking part at step `step`: alive but silent (a hung process, or a
    node gone without closing its connections), until `release` appears."""

    def __init__(self, task, step, release: Path):
        self.task, self.step, self.release = task, step, release
        self.tokens_per_sequence = task.tokens_per_sequence

    def batch(self, step):
        if step == self.step and parallel.rank() == 1:
            deadline = time.time() + 60
            while not self.release.exists() and time.time() < deadline:
                time.sleep(0.1)
            os._exit(0)
        return self.task.batch(step)

    def __getattr__(self, name):
        return getattr(self.task, name)


def _worker(rank: int, world: int, port: int, out: Path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), K2_DIST_TIMEOUT=str(TIMEOUT), K2_QUIET="1")
    torch.set_num_threads(1)
    res = {}
    try:
        try:  # bad input first: it must fail on every rank before any training collective
            train_run(out / "bad", batch=3)
        except K2Error as e:
            res["bad_batch"] = e.line()
        for parallel in ("ddp", "fsdp"):
            r = train_run(out / parallel, parallel=parallel)
            res[parallel] = summary(r)
            res[parallel]["biases"] = [g.e_score_correction_bias.clone() for g in r.model.routers()]
            res[parallel]["momentum_held"] = r.momentum_held
        # a checkpoint of the one-process run continues on 2 ranks (sharded)
        res["from1"] = summary(train_run(out / "from1", parallel="fsdp"))
        torch.save(res, out / f"rank{rank}.pt")
        # last, a rank that stops answering mid-run: the other must stop with a clear error
        t0 = time.time()
        try:
            train_run(out / "hang", task=HangAt(make_task(), 2, out / "released"))
        except K2Error as e:
            res["hang_error"] = e.line()
        res["hang_seconds"] = time.time() - t0
    except BaseException as e:  # anything else: report it to the test rather than hang
        res["crash"] = f"{type(e).__name__}: {e}"
    torch.save(res, out / f"rank{rank}.pt")
    (out / "released").touch()


def spawn(out: Path, world: int = 2) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + 240
    for p in procs:
        p.join(timeout=max(1, deadline - time.time()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} rank(s) still running after 240 s: a hang"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) if (out / f"rank{r}.pt").exists() else None
            for r in range(world)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as each spawned rank uses: two ranks on 2 cores, and no spinning threads
    competing with them (restored afterwards for the other test files)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference, then every 2-rank run in one spawn (each process start costs seconds)."""
    out = tmp_path_factory.mktemp("dist")
    ref = summary(train_run(out / "ref"))
    # the 2-rank "from1" run resumes the reference's step-2 checkpoint
    shutil.copytree(out / "ref", out / "from1", symlinks=True)
    point_latest(out / "from1", 2)
    ranks = spawn(out)
    for r, res in enumerate(ranks):
        assert res is not None and "crash" not in res, (r, res)
    return out, ref, ranks


def point_latest(run_dir: Path, step: int):
    """Make step-<step> the latest checkpoint (dropping the later ones)."""
    ckpts = run_dir / "checkpoints"
    for p in ckpts.glob("step-*"):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to(f"step-{step:06d}")
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:step]))


# ----------------------------------------------------------------------------- the tests


def test_ddp_and_fsdp_reproduce_one_process(runs):
    _, ref, ranks = runs
    assert sum(map(sum, ref["clipped"])) > 0, "tau too high: QK-Clip never fired, the test would not test it"
    for parallel in ("ddp", "fsdp"):
        for r, res in enumerate(ranks):
            assert_same_run(res[parallel], ref)  # losses, clip decisions per layer and step, final weights
            assert res[parallel]["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
        # router biases (buffers, updated from the all-reduced loads) are identical on every rank
        for a, b in zip(ranks[0][parallel]["biases"], ranks[1][parallel]["biases"]):
            assert torch.equal(a, b)


def test_only_rank0_writes_and_metrics_are_global(runs):
    out, ref, _ = runs
    for parallel in ("ddp", "fsdp"):
        metrics = read_metrics(out / parallel / "metrics.jsonl")
        assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # one writer, no duplicates
        assert [m["tokens"] for m in metrics] == [4 * 16] * STEPS  # global tokens, not one rank's
        state = torch.load(out / parallel / "checkpoints" / "latest" / "state.pt", weights_only=False)
        assert state["saved_by"] == {"world_size": 2, "parallel": parallel} and state["format"] == checkpoint.FORMAT
        assert not list((out / parallel / "checkpoints").glob(".tmp-*"))


def test_batch_not_divisible_by_world_size(runs):
    _, _, ranks = runs
    for res in ranks:
        assert res["bad_batch"].startswith("train.batch_size=3 sequences do not split over 2 ranks")
        assert "multiple of the world size" in res["bad_batch"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_rank_checkpoint_resumes_on_one(runs, tmp_path, parallel):
    out, ref, _ = runs
    shutil.copytree(out / parallel, tmp_path / "run", symlinks=True)
    point_latest(tmp_path / "run", 2)
    # canonical: whole tensors under the plain parameter names, whatever wrote it
    sd = load_file(str(tmp_path / "run" / "checkpoints" / "latest" / "model.safetensors"))
    one = build_model(CFG, seed=0).state_dict()
    assert all(sd[k].shape == one[k].shape for k in sd)
    optim = torch.load(tmp_path / "run" / "checkpoints" / "latest" / "optimizer.pt", weights_only=False)
    muon = next(g for g in optim["param_groups"] if g["name"] == "muon")["params"]
    assert all("momentum_buffer" in optim["state"][n] for n in muon)  # momentum of every matrix, from its owner
    resumed = train_run(tmp_path / "run", parallel=parallel)
    assert resumed.resumed_from == 2
    assert_same_run(summary(resumed), ref, first=2)


def test_one_rank_checkpoint_resumes_on_two_with_fsdp(runs):
    _, ref, ranks = runs
    for res in ranks:
        assert_same_run(res["from1"], ref, first=2)


def test_a_silent_rank_stops_the_others_with_a_clear_error_within_the_timeout(runs):
    _, _, ranks = runs
    assert "hang_error" not in ranks[1]  # it never came back
    err = ranks[0]["hang_error"]
    assert err.startswith("rank 0/2: lost contact with another rank ("), err
    assert f"a collective waits at most {TIMEOUT} s (K2_DIST_TIMEOUT)" in err
    assert ranks[0]["hang_seconds"] < TIMEOUT + 60  # it stopped: no hang (the timeout, plus slack for a busy machine)


def test_distributed_muon_splits_the_matrices_between_ranks(runs):
    _, _, ranks = runs
    model = build_model(CFG, seed=0)
    n_muon = len(next(g for g in build_optimizer(model, OptimConfig()).param_groups if g["kind"] == "muon")["params"])
    for parallel in ("ddp", "fsdp"):
        held = [res[parallel]["momentum_held"] for res in ranks]
        assert sum(held) == n_muon and all(0 < h < n_muon for h in held), held  # each matrix on exactly one rank


# ----------------------------------------------------------------------------- in one process


def test_ranks_get_disjoint_rows_and_resume_needs_only_the_step(monkeypatch):
    task = make_task(batch=8)
    for step in range(3):
        batch = task.batch(step)
        assert torch.equal(batch["input_ids"], make_task(batch=8).batch(step)["input_ids"])  # pure in (seed, step)
        for world in (2, 4):
            monkeypatch.setattr(parallel, "world_size", lambda: world)
            parts = []
            for r in range(world):
                monkeypatch.setattr(parallel, "rank", lambda: r)
                parts.append(local_slice(batch)["input_ids"])
            assert all(p.shape[0] == 8 // world for p in parts)
            assert torch.equal(torch.cat(parts), batch["input_ids"])  # disjoint, in order, nothing left out
        monkeypatch.setattr(parallel, "world_size", lambda: 3)
        with pytest.raises(K2Error, match="does not split over 3 ranks"):
            local_slice(batch)


def test_muon_ownership_is_balanced_and_complete():
    model = build_model(dataclasses.replace(CFG, num_hidden_layers=4), seed=0)
    opt = build_optimizer(model, OptimConfig())
    group = next(g for g in opt.param_groups if g["kind"] == "muon")
    costs = [ns_cost(p.numel() // (A * B), A, B) for p, (A, B) in zip(group["params"], group["matrix_shapes"])]
    for world in (1, 2, 3, 8):
        owners = assign_owners(costs, world)
        assert owners == assign_owners(costs, world)  # every rank computes the same plan
        loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
        assert max(loads) <= sum(costs) / world + max(costs)  # greedy's bound: within one matrix of even


def test_legacy_positional_optimizer_state_still_resumes(runs, tmp_path):
    out, ref, _ = runs
    shutil.copytree(out / "ref", tmp_path / "run", symlinks=True)
    point_latest(tmp_path / "run", 2)
    ck = tmp_path / "run" / "checkpoints" / "latest"
    # rewrite it as the single-process code before distributed training did: torch's positional layout
    model = build_model(CFG, seed=0)
    opt = build_optimizer(model, OptimConfig(lr=1e-2, qk_clip_tau=TAU))
    checkpoint.load_optimizer_state(ck, opt)
    torch.save(opt.state_dict(), ck / "optimizer.pt")
    state = torch.load(ck / "state.pt", weights_only=False)
    del state["format"]
    torch.save(state, ck / "state.pt")
    resumed = train_run(tmp_path / "run")
    assert [r["loss"] for r in resumed.history] == ref["loss"][2:]


def test_foreign_sharded_checkpoint_says_how_to_convert(runs, tmp_path):
    import torch.distributed.checkpoint as dcp

    out, ref, _ = runs
    shutil.copytree(out / "ref", tmp_path / "run", symlinks=True)
    point_latest(tmp_path / "run", 2)
    ck = (tmp_path / "run" / "checkpoints" / "latest").resolve()
    # the same checkpoint as torch.distributed.checkpoint would shard it
    state = {"model": load_file(str(ck / "model.safetensors")), "optimizer": torch.load(ck / "optimizer.pt", weights_only=False)}
    (ck / "model.safetensors").unlink()
    (ck / "optimizer.pt").unlink()
    dcp.save(state, checkpoint_id=ck)
    with pytest.raises(K2Error) as e:
        train_run(tmp_path / "run")
    assert "torch.distributed.checkpoint shards" in e.value.line()
    assert f"python -m k2cli.train.checkpoint convert {ck}" in e.value.line()
    assert checkpoint.main(["convert", str(ck)]) == 0
    resumed = train_run(tmp_path / "run")
    assert [r["loss"] for r in resumed.history] == ref["loss"][2:]
