"""`k2 rl MODEL`: reinforcement learning of a chat model on the synthetic world's environments.

    chat model (k2 sft) + the datasets in its lineage (world, math, agentic tasks)
      -> environment pools (rl/env.py): math, logic, instruct, code, tools (verifiable), chat (rubric)
      -> prompt selection by the starting model's pass@k (moderate difficulty); the critic's
         held-out (correct, wrong) pairs; held-out rewards of the starting model
      -> the shared training loop with RLTask: K rollouts per prompt, verifiable rewards and the
         self-critique rubric reward, K1.5's objective (or plain policy gradient), PTX, Muon
      -> a chat model artifact with metrics.jsonl, rollouts.jsonl, reward plots and the
         start -> end held-out rewards in its summary
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import asdict, dataclass, field

import rich_click as click

from k2cli import parallel
from k2cli.commands.common import recipe_options, run_options
from k2cli.console import info
from k2cli.data.tokenizer import has_tokenizer, load_tokenizer
from k2cli.errors import K2Error
from k2cli.model.io import load_model
from k2cli.optim.muon import OptimConfig
from k2cli.optim.schedule import ScheduleConfig
from k2cli.recipes import validate
from k2cli.rl.batch import PTXConfig, ptx_rows
from k2cli.rl.critic import Critic, CriticConfig, Pair
from k2cli.rl.env import EnvConfig, build_pools, load_world_data
from k2cli.rl.evaluate import SelectConfig, heldout_pairs, heldout_rewards, select_prompts
from k2cli.rl.objective import TemperatureConfig
from k2cli.rl.plots import plot_rewards, plot_rollout_stats
from k2cli.rl.task import RLConfig, RLTask
from k2cli.stages.runner import RunOptions, Stage, load_parent
from k2cli.train.loop import TrainConfig, pick_device


@dataclass
class RLRecipe:
    seed: int = 0
    model: str = "sft:latest"  # the chat model to improve
    envs: EnvConfig = field(default_factory=EnvConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    ptx: PTXConfig = field(default_factory=PTXConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=2, decay_fraction=0.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=40, batch_size=64, seq_len=512, eval_every=10,
                                                                   checkpoint_every=10))

    def validate(self) -> None:
        """Across sections (each section checks its own values: recipes.validate)."""
        if self.train.batch_size % self.rl.samples_per_prompt:
            raise K2Error(f"train.batch_size={self.train.batch_size} rollouts do not split into prompts of "
                          f"rl.samples_per_prompt={self.rl.samples_per_prompt}",
                          "make train.batch_size (rollouts per step) a multiple of rl.samples_per_prompt")
        if parallel.launched_world_size() > 1:
            raise K2Error("k2 rl runs in one process (its rollouts and critic are not distributed)", "run it without torchrun")


def load_policy(ref: str, seq_len: int):
    model, art, tokenizer = load_parent(ref, "use a chat model made by k2 sft", seq_len)
    if art.stage not in ("sft", "rl") and not art.metrics.get("chat"):
        raise K2Error(f"model {art.id} is a {art.stage} model, not a chat model", "fine-tune it with 'k2 sft' first")
    return model, art, tokenizer


def prepare(model, tokenizer, pools, critic: Critic, recipe: RLRecipe, context: int, run_dir) -> dict:
    """What the starting model decides before training, cached in the run directory (a resumed run
    reads it back instead of sampling again; it is a pure function of the starting weights anyway)."""
    path = run_dir / "prepare.json"
    if path.exists():
        prep = json.loads(path.read_text())
        for key in ("pairs", "first_pairs"):
            prep[key] = [Pair(**p) for p in prep.get(key, [])]
        return prep
    t0 = time.perf_counter()
    cfg, t_start = recipe.rl, recipe.temperature.start
    if recipe.select.k:
        info(f"rl: selecting prompts by pass@{recipe.select.k} of {recipe.model} ...")
    selected, select_stats, first_pairs = select_prompts(model, tokenizer, pools, recipe.select, context, t_start, recipe.seed,
                                                         cfg.gen_batch_size)
    info("rl: held-out critic pairs and the starting model's held-out rewards ...")
    c = recipe.critic
    pairs = heldout_pairs(model, tokenizer, pools, context, c.heldout_prompts, c.heldout_samples, c.heldout_pairs, t_start,
                          recipe.seed, cfg.gen_batch_size)
    start, _ = heldout_rewards(model, tokenizer, pools, context, cfg.eval_prompts, recipe.seed, cfg.gen_batch_size)
    acc = critic.accuracy(pairs)
    if acc is not None:
        start["critic_accuracy"] = acc
    prep = {"selected": selected, "select_stats": select_stats, "start": start, "prepare_s": time.perf_counter() - t0,
            "pairs": [asdict(p) for p in pairs], "first_pairs": [asdict(p) for p in first_pairs]}
    path.write_text(json.dumps(prep, indent=1) + "\n")
    prep["pairs"], prep["first_pairs"] = pairs, first_pairs
    return prep


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def fresh_critic_accuracy(hist: list[dict]) -> tuple[float | None, float | None, int]:
    """The critic's accuracy on each step's new on-policy pairs, judged before it learns from them:
    pair-weighted over the first and the last quarter of the steps that had pairs (and the pair count)."""
    recs = [r for r in hist if r.get("critic_pairs") and "critic_accuracy_fresh" in r]
    if not recs:
        return None, None, 0
    q = max(1, len(recs) // 4)

    def acc(rs):
        return sum(r["critic_accuracy_fresh"] * r["critic_pairs"] for r in rs) / sum(r["critic_pairs"] for r in rs)

    return acc(recs[:q]), acc(recs[-q:]), sum(r["critic_pairs"] for r in recs)


@dataclass
class Setup:
    """Everything a run trains with (also what tests build a task from)."""

    model: object
    model_art: object
    tokenizer: object
    critic: Critic
    data: object  # WorldData
    inputs: list  # the artifacts read: model, critic, datasets
    pools: dict = None
    run_dir: object = None
    prep: dict = None
    task: RLTask = None


def load_inputs(recipe: RLRecipe) -> Setup:
    """The cheap part: the policy, the critic, the datasets (what the output's fingerprint depends on)."""
    validate(recipe)  # the recipes' one walk (tests build a Setup without a Stage)
    model, model_art, tokenizer = load_policy(recipe.model, recipe.train.seq_len)
    inputs = [model_art]
    critic_model, critic_tok = model, tokenizer
    if recipe.critic.model:
        critic_model, critic_art = load_model(recipe.critic.model, verify=True)  # a dataset here: "expected model"
        if not has_tokenizer(critic_art.path):
            raise K2Error(f"critic model {critic_art.id} has no tokenizer", "use a chat model made by k2 sft as critic.model")
        critic_tok = load_tokenizer(critic_art.path)
        inputs.append(critic_art)
    names = [n for n, w in recipe.envs.mix.items() if w > 0]
    data = load_world_data(model_art, recipe.envs,
                           need_agentic="tools" in names or ("agentic" in recipe.ptx.sources and recipe.ptx.beta > 0))
    inputs += [a for a in (data.dataset, data.agentic) if a is not None]
    device = pick_device(recipe.train.device)
    model.to(device)
    critic_model.to(device)
    critic = Critic(critic_model, critic_tok, min(recipe.train.seq_len, critic_model.config.max_position_embeddings),
                    recipe.critic, separate=bool(recipe.critic.model))
    return Setup(model, model_art, tokenizer, critic, data, inputs)


def run_key(s: Setup) -> list[str]:
    """What the run directory is keyed by, besides the recipe: the exact inputs."""
    return [a.manifest["uid"] for a in s.inputs]


def build(recipe: RLRecipe, s: Setup, run_dir) -> Setup:
    """The rest: environment pools, the starting model's selection and held-out numbers (cached in
    `run_dir`), the task."""
    context = recipe.train.seq_len
    names = [n for n, w in recipe.envs.mix.items() if w > 0]
    s.pools = build_pools(s.data, recipe.envs, names, s.tokenizer, context)
    s.run_dir = run_dir
    s.run_dir.mkdir(parents=True, exist_ok=True)
    s.prep = prepare(s.model, s.tokenizer, s.pools, s.critic, recipe, context, s.run_dir)
    for name, pool in s.pools.items():
        info(f"rl: {name}: {len(pool.train)} train / {len(pool.test)} held-out problems ({pool.dropped_long} too long), "
             f"{len(s.prep['selected'].get(name, []))} selected, budget {pool.budget} tokens")
    ptx = ptx_rows(recipe.ptx, s.tokenizer, s.data, context)
    s.task = RLTask(s.model, s.tokenizer, s.pools, s.prep["selected"], s.critic, ptx, s.prep["pairs"], s.run_dir,
                    s.prep["first_pairs"], mix=recipe.envs.mix, rl=recipe.rl, temperature=recipe.temperature,
                    ptx_cfg=recipe.ptx, critic_cfg=recipe.critic, train=recipe.train, seed=recipe.seed)
    return s


def setup(recipe: RLRecipe, resume: str = "auto") -> Setup:
    """Everything `run` trains with, without training (tests build a task from it)."""
    with Stage("rl", "model", recipe, RunOptions(resume=resume)) as st:
        s = load_inputs(recipe)
        return build(recipe, s, st.run_dir(run_key(s)))


def results(recipe: RLRecipe, s: Setup, hist: list[dict]) -> tuple[dict, list[str], str]:
    """The artifact's flat metrics, the summary's start -> end table rows, and a one-line gain."""
    prep, start = s.prep, s.prep["start"]
    end = next((r for r in reversed(hist) if any(k.startswith("heldout_") for k in r)), {})
    keys = sorted(k for k in start if k.startswith("heldout_") and not k.endswith(("_truncated", "_tokens")))
    fresh_first, fresh_last, fresh_n = fresh_critic_accuracy(hist)
    metrics = {"chat": True, "steps": recipe.train.steps, "loss": recipe.rl.loss, "prepare_s": round(prep["prepare_s"], 1),
               "dropped_samples": sum(r.get("dropped_samples", 0) for r in hist),
               **{f"start_{k}": start[k] for k in keys}, **{f"end_{k}": end.get(k) for k in keys},
               "critic_accuracy_start": start.get("critic_accuracy"), "critic_accuracy_end": end.get("critic_accuracy"),
               "critic_heldout_pairs": len(prep["pairs"]), "critic_first_pairs": len(prep["first_pairs"]),
               "critic_accuracy_fresh_first": fresh_first, "critic_accuracy_fresh_last": fresh_last,
               "critic_fresh_pairs": fresh_n, **prep["select_stats"]}
    rows = [f"| {k.replace('heldout_', '')} | {_fmt(start.get(k))} | {_fmt(end.get(k))} |" for k in keys]
    rows.append(f"| critic pairwise accuracy ({len(prep['pairs'])} held-out pairs) | {_fmt(start.get('critic_accuracy'))} | "
                f"{_fmt(end.get('critic_accuracy'))} |")
    rows.append(f"| critic accuracy on each step's new pairs, first / last quarter of the run ({fresh_n} pairs) | "
                f"{_fmt(fresh_first)} | {_fmt(fresh_last)} |")
    gains = ", ".join(f"{k.replace('heldout_', '')} {_fmt(start.get(k))}->{_fmt(end.get(k))}" for k in keys)
    return metrics, rows, gains


def run(recipe: RLRecipe, opts: RunOptions = RunOptions()):
    t0 = time.time()
    with Stage("rl", "model", recipe, opts) as st:
        s = load_inputs(recipe)
        if done := st.up_to_date(s.inputs):  # k2 --reuse stops before any sampling
            return done
        s = build(recipe, s, st.run_dir(run_key(s)))
        task, names = s.task, list(s.pools)
        info(f"rl: {task.P} prompts x {task.K} samples per step, loss {recipe.rl.loss} (tau {recipe.rl.tau:g}), "
             f"envs {', '.join(task.names)}; run dir {s.run_dir}")
        trained = st.train(s.model, task)
        hist = trained.history
        with st.writer() as w:
            w.metrics, rows, gains = results(recipe, s, hist)
            w.metrics["wall_s"] = round(time.time() - t0, 1)
            plots = [p for p in (plot_rewards(hist, s.prep["start"], w.dir / "rewards.png", names),
                                 plot_rollout_stats(hist, w.dir / "rollouts.png")) if p is not None]
            summary = [f"- RL of {s.model_art.id} for {recipe.train.steps} steps: {task.P} prompts x {task.K} samples, "
                       f"{recipe.rl.updates_per_rollout} update(s) per batch of rollouts, loss {recipe.rl.loss} (tau {recipe.rl.tau:g}), "
                       f"{recipe.optim.name} lr {recipe.optim.lr:g}; PTX beta {recipe.ptx.beta:g}; "
                       f"critic: {recipe.critic.model or 'the policy itself'}",
                       f"- environments (mix): {', '.join(f'{n} {recipe.envs.mix[n]:g}' for n in names)}; training prompts "
                       + (f"kept by pass@{recipe.select.k} selection: " if recipe.select.k else "(no selection): ")
                       + ", ".join(f"{n} {len(s.prep['selected'].get(n, []))}" for n in names),
                       f"- samples dropped (reward function failed): {w.metrics['dropped_samples']}; wall time {w.metrics['wall_s']} s",
                       "", "| held-out (greedy) | start | end |", "|---|---:|---:|", *rows, "",
                       *[f"![{p.stem}]({p.name})" for p in plots], "", "Rollout samples: rollouts.jsonl (a few per step)."]
            st.write_model(w, trained, s.model_art.path, summary)
            for name in ("rollouts.jsonl", "prepare.json"):
                if (s.run_dir / name).exists():
                    shutil.copy2(s.run_dir / name, w.dir / name)
            art = w.commit(summary=f"RL of {s.model_art.id}: held-out {gains}")
        info(f"[green]wrote[/] {art.path} ({art.id}) in {w.metrics['wall_s']} s; held-out {gains}")
        return art


@click.command("rl")
@click.argument("model", required=False)
@recipe_options("rl", RLRecipe)
@run_options(resume=True)
@click.option("--unsafe-sandbox", is_flag=True, help="Run the code env's model-written code even where the OS offers "
              "no isolation (= envs.unsafe_sandbox).")
def rl_cmd(model, recipe, recipe_source, opts, unsafe_sandbox):
    """Improve the chat MODEL (default: the recipe's `model`) by RL on the world's environments."""
    if unsafe_sandbox:
        recipe.envs.unsafe_sandbox = True
    if model:
        recipe = dataclasses.replace(recipe, model=model)
    run(recipe, opts)


COMMANDS = [rl_cmd]
