"""THE training loop, shared by pretrain, extend-context, SFT and RL.

What differs between stages is a `Task`: where a step's batch comes from and what its loss
is. Everything else is here, once:

    for each optimizer step:
        batch = task.batch(step)                       # a pure function of (seed, step)
        for each micro-batch (this rank's slice):      # gradient accumulation
            loss_sum, extras, stats = task.loss(model, micro, max_logits)  # stats: MoE balance loss, loads, max logits
            backward((loss_sum / units in the global batch) + alpha * balance loss)
        clip the gradient norm; set the scheduled lr; optimizer step (Muon / AdamW)
        QK-Clip on heads whose max logit exceeded tau           (MuonClip)
        move router biases towards balanced expert load        (aux-loss-free balancing)
        [train.qk_clip_check] the step's micro-batches again, no grad: max logit after the clip
        log metrics.jsonl; evaluate; checkpoint; stop cleanly on SIGINT/SIGTERM or a NaN

Dividing every micro-batch's loss SUM by the unit count of the whole global batch makes the
accumulated gradient identical to one big batch, on one rank or many.

Under torchrun (see k2cli/parallel/, stages/runner.py and docs/distributed.md) the same function runs on
every rank: it joins the process group, wraps the model for `train.parallel` (ddp | fsdp),
trains on this rank's disjoint rows of each global batch, and only rank 0 logs and writes.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from k2cli import parallel
from k2cli.errors import Interrupted, K2Error
from k2cli.model.moe import update_router_biases
from k2cli.model.precision import compute_dtype, resolve_precision
from k2cli.model.transformer import ForwardStats
from k2cli.optim.muon import OptimConfig, build_optimizer
from k2cli.optim.qk_clip import heads_over
from k2cli.optim.schedule import ScheduleConfig, lr_at
from k2cli.train.checkpoint import latest_checkpoint, load_checkpoint, load_optimizer_state, save_checkpoint
from k2cli.train.mfu import training_peak_tflops
from k2cli.train.progress import MetricsLog, TrainProgress
from k2cli.train.tracking import Tracker, parse_track


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 0  # sequences per forward/backward on one rank; 0 = the whole local batch
    seq_len: int = 256
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    balance_loss_alpha: float = 1e-4  # weight of the sequence-wise MoE balance loss (V3: 1e-4)
    bias_update_rate: float = 1e-3  # aux-loss-free router bias step (V3: 0.001); 0 disables
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16: activations; weights stay fp32
    compile: bool = False  # torch.compile the model
    peak_tflops: float = 0.0  # the device's peak for MFU; 0 = measure this device's matmul peak
    track_max_logits: bool = True  # log per-head max attention logits (always on for MuonClip)
    # after each step, recompute the max logit on the SAME micro-batches (one extra forward, no grad)
    # and log it as max_logit_post_clip: QK-Clip's invariant measured, not assumed. Off: nothing changes.
    qk_clip_check: bool = False
    parallel: str = "ddp"  # under torchrun: ddp (replicated model) | fsdp (FSDP2 sharded); one process: ignored
    track: str = ""  # also log every metric to: tensorboard | wandb | "tensorboard,wandb" (train/tracking.py); "" = off

    def validate(self):
        if self.steps < 1:
            raise K2Error(f"train.steps must be >= 1, got {self.steps}", "set --set train.steps=N")
        if self.batch_size < 1 or self.micro_batch_size < 0:
            raise K2Error("train.batch_size must be >= 1 and train.micro_batch_size >= 0", "fix the batch sizes")
        if self.seq_len < 2:
            raise K2Error(f"train.seq_len must be >= 2, got {self.seq_len}", "set a longer sequence length")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise K2Error(f"unknown train.precision '{self.precision}'", "use auto, fp32 or bf16")
        if self.parallel not in parallel.PARALLEL:
            raise K2Error(f"unknown train.parallel '{self.parallel}'", "use ddp or fsdp")
        parse_track(self.track)
        world = parallel.launched_world_size()  # under torchrun, known before the process group exists
        if self.batch_size % world:
            raise K2Error(f"train.batch_size={self.batch_size} sequences do not split over {world} ranks",
                          f"make train.batch_size a multiple of the world size ({world})")


class Task(Protocol):
    """What a stage trains on. Batches are dicts of CPU tensors, first dimension = sequences."""

    tokens_per_sequence: int

    def batch(self, step: int) -> dict: ...  # the GLOBAL batch of optimizer step `step` (0-based)

    def weight(self, micro: dict) -> float: ...  # loss units in a micro-batch (e.g. target tokens)

    # (loss SUM, extra metric sums, the model's ForwardStats): the task runs
    # model(ids, stats=True, max_logits=max_logits) and returns the stats with its loss
    def loss(self, model, micro: dict, max_logits: bool) -> tuple[torch.Tensor, dict, ForwardStats]: ...

    def evaluate(self, model) -> dict: ...  # e.g. {"val_loss": ...}

    # Optional hooks (RL uses them; a task without them behaves as before):
    #   step_metrics() -> dict       metrics of the step's batch (e.g. rollout rewards), logged with the step
    #   state_dict() -> dict         state the batch depends on beyond (seed, step, weights), saved in checkpoints
    #   load_state_dict(dict | None) restores it on resume


@dataclass
class RunResult:
    model: torch.nn.Module
    steps: int
    history: list
    run_dir: Path
    resumed_from: int | None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise K2Error(f"train.device={name} but no CUDA device is available", "use --set train.device=cpu")
    if name == "cuda" and parallel.is_distributed():
        return torch.device("cuda", parallel.local_rank())  # each rank on its own GPU
    return torch.device(name)


def precision_for(model, device: torch.device, precision: str):
    """The context in which `model` computes in `precision` on `device` (model/precision.py)."""
    return compute_dtype(model, resolve_precision(precision, device))


def to_host(named: dict) -> dict:
    """A step's logged tensors in ONE device-to-host transfer: name -> float (0-d), list (1-d) or
    list of lists (2-d). float32 and integer values convert exactly."""
    flat = torch.cat([t.detach().reshape(-1).double() for t in named.values()]).tolist()
    out, i = {}, 0
    for k, t in named.items():
        vals, i = flat[i : i + t.numel()], i + t.numel()
        if t.dim() == 2:
            vals = [vals[r * t.shape[1] : (r + 1) * t.shape[1]] for r in range(t.shape[0])]
        out[k] = vals[0] if t.dim() == 0 else vals
    return out


@contextmanager
def compile_errors(compiling: bool):
    """train.compile=true: a failure inside torch.compile becomes one clear K2Error (never a silent
    fall back to eager)."""
    if not compiling:
        yield
        return
    from torch._dynamo.exc import TorchDynamoException

    try:
        yield
    except TorchDynamoException as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise K2Error(f"train.compile=true: torch.compile failed ({type(e).__name__}: {first})",
                      "turn compilation off with --set train.compile=false") from e


@contextmanager
def stop_signals():
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (a second SIGINT kills)."""
    flag = {"stop": None}

    def handler(signum, _frame):
        if flag["stop"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name

    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be caught here
        old = {}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@torch.no_grad()
def post_step_max_logits(task, model, micros: list[dict], device) -> torch.Tensor:
    """[L, H] per-head max logits of a step's micro-batches recomputed through the weights the NEXT step
    starts from (updated, QK-clipped, router biases moved), max over micro-batches and ranks. QK-Clip
    scaled a clipped head's logits by tau / S, S measured BEFORE the update; the update moved the weights
    too, so after the clip that head sits near tau, not exactly at it: this measures how near."""
    out = None
    for micro in micros:
        micro = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in micro.items()}
        _, _, stats = task.loss(model, micro, True)
        out = stats.max_logits if out is None else torch.maximum(out, stats.max_logits)
    return parallel.all_reduce_max(out)


def split_batch(batch: dict, size: int) -> list[dict]:
    n = next(iter(batch.values())).shape[0]
    size = size or n
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def local_slice(batch: dict) -> dict:
    """This rank's disjoint share of the global batch."""
    world, r = parallel.world_size(), parallel.rank()
    if world == 1:
        return batch
    n = next(iter(batch.values())).shape[0]
    if n % world:
        raise K2Error(f"global batch of {n} sequences does not split over {world} ranks", "make train.batch_size a multiple of the world size")
    per = n // world
    return {k: v[r * per : (r + 1) * per] for k, v in batch.items()}


@parallel.report_lost_ranks()  # under torchrun: a dead or hung rank -> one clear K2Error, not a hang
def train(
    model,
    task: Task,
    optim_cfg: OptimConfig,
    schedule_cfg: ScheduleConfig,
    cfg: TrainConfig,
    run_dir: Path,
    recipe: dict,
    title: str = "train",
    resume: str = "auto",
    wrap=None,
) -> RunResult:
    """Train `model` on `task`; checkpoints and metrics.jsonl go to `run_dir`.

    resume: "auto" continues from the run directory's latest checkpoint if there is one,
    "yes" requires one, "no" starts over. `wrap(model) -> forward module` applies
    data parallelism or sharding from outside; by default, under torchrun, `train.parallel`
    picks DDP or FSDP2 (parallel.wrap). The optimizer always sees the unwrapped
    model. FSDP shards `model` in place: use the returned `RunResult.model` (whole weights).
    """
    cfg.validate()
    parallel.setup()  # under torchrun: join the process group (no-op in one process)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)  # the activations' dtype; weights stay float32
    model.to(device)
    clip_qk = optim_cfg.name == "muonclip"
    track_max_logits = clip_qk or cfg.track_max_logits

    start = 0
    resumed_from = None
    # rank 0 decides, so that every rank resumes from the same checkpoint (on shared storage)
    ckpt = parallel.broadcast_object(latest_checkpoint(run_dir) if resume != "no" and parallel.is_main() else None)
    if resume == "yes" and ckpt is None:
        raise K2Error(f"nothing to resume: {run_dir} has no checkpoint", "drop --resume to start a new run")
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, None, recipe)  # weights and RNG; optimizer state once it exists
        start = resumed_from = state["step"]
        if hasattr(task, "load_state_dict"):
            task.load_state_dict(state.get("extra", {}).get("task"))
        if parallel.is_main():
            from k2cli.console import info

            info(f"[yellow]resuming[/] {title} from step {start} ({ckpt})")
    if start >= cfg.steps:
        return RunResult(model, start, [], run_dir, resumed_from)

    forward_model = wrap(model) if wrap else parallel.wrap(model, cfg.parallel)  # FSDP makes model's params shards
    optimizer = build_optimizer(model, optim_cfg)  # on the (possibly sharded) parameters
    if ckpt is not None:
        load_optimizer_state(ckpt, optimizer)
    if cfg.compile:
        # one graph for the whole forward (fullgraph: a graph break is an error, not a slow path)
        forward_model = torch.compile(forward_model, fullgraph=True)
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start if resumed_from is not None else None) if parallel.is_main() else None
    tracker = Tracker(parse_track(cfg.track) if parallel.is_main() else [], run_dir, title, recipe, resumed_from)
    peak = training_peak_tflops(device, cfg.peak_tflops, model.config)  # TFLOP/s, the MFU denominator (train/mfu.py)
    flops_per_token = model.config.flops_per_token(task.tokens_per_sequence)["train"]
    progress = TrainProgress(title, cfg.steps, start, enabled=parallel.is_main())
    history = []
    t_last = time.perf_counter()
    t_begin = t_last

    # the whole run computes in `dtype`: the task's batches (RL rollouts), losses and evaluations
    with stop_signals() as stop, compute_dtype(model, dtype):
        try:
            for step in range(start, cfg.steps):
                model.train()
                micros = split_batch(local_slice(task.batch(step)), cfg.micro_batch_size)
                units = torch.tensor(float(sum(task.weight(m) for m in micros)), device=device)
                units = parallel.all_reduce_sum(units).clamp(min=1.0)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), device=device)
                balance = torch.zeros((), device=device)
                max_logits, loads, extras, tokens = None, None, {}, 0
                for i, micro in enumerate(micros):
                    micro = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in micro.items()}
                    sync = parallel.no_sync(forward_model) if i < len(micros) - 1 else nullcontext()
                    with sync:
                        with compile_errors(cfg.compile):
                            part, extra, stats = task.loss(forward_model, micro, track_max_logits)
                            bal = stats.balance_loss.to(device)
                        # DDP/FSDP average gradients over ranks: x world_size makes that average the
                        # global SUM / units; the balance loss is a per-rank mean, averaged as it is
                        with compile_errors(cfg.compile):
                            (part * parallel.world_size() / units + cfg.balance_loss_alpha * bal / len(micros)).backward()
                    loss_sum += part.detach().float()
                    balance += bal.detach().float() / len(micros)
                    tokens += micro["input_ids"].numel()
                    m = stats.max_logits
                    if m is not None:
                        max_logits = m if max_logits is None else torch.maximum(max_logits, m)
                    ld = stats.expert_counts
                    if ld is not None:
                        loads = ld.float() if loads is None else loads + ld.float()
                    for k, v in extra.items():  # tensors stay on the device until the one transfer below
                        extras[k] = extras.get(k, 0.0) + v

                if cfg.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
                grad_norm = parallel.full_tensor(grad_norm)  # FSDP: a DTensor of partial norms
                lr = lr_at(step, cfg.steps, optim_cfg.lr, schedule_cfg)
                optimizer.set_lr(lr)
                optimizer.step()

                # Everything logged is gathered on the device and crosses to the host ONCE per step
                # (the step itself never waits on the host: no .item()/.tolist() before this point).
                logged = {"loss": parallel.all_reduce_sum(loss_sum) / units, "grad_norm": grad_norm}
                if max_logits is not None:
                    logged["max_logits"] = max_logits = parallel.all_reduce_max(max_logits)
                    if clip_qk:
                        logged["clipped"] = optimizer.clip_qk(max_logits)
                        logged["clipped_heads"] = heads_over(max_logits, optim_cfg.qk_clip_tau)  # [L, H] which heads
                if loads is not None:
                    loads = parallel.all_reduce_sum(loads)
                    if cfg.bias_update_rate > 0:
                        update_router_biases(model.routers(), loads, cfg.bias_update_rate)
                    logged["imbalance"] = loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)  # [L_moe]
                    logged["expert_load"] = loads / loads.sum(dim=1, keepdim=True)  # [L_moe, E]
                    logged["balance"] = parallel.all_reduce_sum(balance) / parallel.world_size()
                if cfg.qk_clip_check and max_logits is not None:
                    with compile_errors(cfg.compile):
                        logged["max_logits_post"] = post_step_max_logits(task, forward_model, micros, device)
                if extras:  # task metrics, averaged over micro-batches (and ranks)
                    sums = torch.stack([torch.as_tensor(extras[k], dtype=torch.float64, device=device) for k in sorted(extras)])
                    logged["extras"] = parallel.all_reduce_sum(sums) / parallel.world_size()
                host = to_host(logged)

                loss = host["loss"]
                if not math.isfinite(loss):
                    last = latest_checkpoint(run_dir)
                    raise K2Error(
                        f"{title}: the loss became {loss} at step {step + 1}; "
                        + (f"the last good checkpoint ({last.name}) is kept" if last else "no checkpoint was written yet"),
                        "lower optim.lr, raise schedule.warmup_steps, or use train.grad_clip",
                    )
                record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": host["grad_norm"]}
                if "max_logits" in host:
                    per_layer = [max(row) for row in host["max_logits"]]
                    record["max_logit"] = max(per_layer)
                    record["max_logit_per_layer"] = per_layer
                    if clip_qk:
                        record["heads_clipped"] = [int(c) for c in host["clipped"]]
                        record["heads_clipped_total"] = sum(record["heads_clipped"])
                        H = len(host["clipped_heads"][0])
                        ids = [li * H + h for li, row in enumerate(host["clipped_heads"]) for h, o in enumerate(row) if o]
                        if ids:  # flat head ids (layer * H + head): which heads, so "ever clipped" can be counted
                            record["heads_clipped_ids"] = ids
                if "max_logits_post" in host:
                    record["max_logit_post_clip"] = max(max(row) for row in host["max_logits_post"])
                if "imbalance" in host:
                    imbalance = host["imbalance"]
                    record["expert_imbalance"] = sum(imbalance) / len(imbalance)
                    record["expert_imbalance_per_layer"] = imbalance
                    record["expert_load"] = host["expert_load"]
                    record["balance_loss"] = host["balance"]

                now = time.perf_counter()
                global_tokens = tokens * parallel.world_size()
                record["tokens"] = global_tokens
                record["tokens_per_s"] = global_tokens / max(now - t_last, 1e-9)
                record["mfu"] = record["tokens_per_s"] * flops_per_token / (peak * 1e12 * parallel.world_size())
                record["elapsed_s"] = now - t_begin
                for k, v in zip(sorted(extras), host.get("extras", [])):
                    record[k] = v / len(micros)
                if hasattr(task, "step_metrics"):
                    record.update(task.step_metrics())
                t_last = now

                done = step + 1
                if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                    model.eval()
                    with torch.no_grad():
                        record.update(task.evaluate(model))
                    t_last = time.perf_counter()  # evaluation time is not training throughput
                history.append(record)
                if log is not None:
                    log.write(record)
                tracker.log(record)
                progress.update(done, record)

                stopping = parallel.any_rank(stop["stop"] is not None)  # a signal may reach the ranks at different steps
                if done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or stopping:
                    # every rank takes part (shards and momentum are gathered); rank 0 writes
                    task_state = {"task": task.state_dict()} if hasattr(task, "state_dict") else None
                    save_checkpoint(run_dir, done, model, optimizer, recipe, extra=task_state, keep=cfg.keep_checkpoints)
                    t_last = time.perf_counter()
                if stopping and done < cfg.steps:
                    raise Interrupted(
                        f"{title} stopped by {stop['stop'] or 'a signal to another rank'} after step {done}/{cfg.steps}; "
                        f"checkpoint saved in {run_dir}",
                        "run the same command again to resume exactly where it stopped",
                    )
        finally:
            progress.close()
            tracker.close()
    model = parallel.full_model(model)  # FSDP: whole weights, gathered from the shards (every rank)
    model.eval()
    return RunResult(model, cfg.steps, history, run_dir, resumed_from)
