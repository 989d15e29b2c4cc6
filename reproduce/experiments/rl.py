"""Experiment 5: RL with K1.5's objective vs plain policy gradient, and critic refinement (K2 section 3.2).

Claims: K1.5's objective improves held-out reward more than plain policy gradient; refining the critic on
verifiable pairs makes it more accurate (the closed loop of K2 section 3.2.2).

  commands   experiment 1's MuonClip model, SFT on agentic, QA and math rows, then `k2 rl` with each objective
             (and K1.5 without the critic's refinement); skipped when this build has no `k2 rl` or no recipe
  measure    held-out reward per environment at the start and end, critic accuracy, their histories
  plots      held-out reward per RL step; critic accuracy per RL step
  report     the start -> end table; two summary rows, each "a beats b" against its binomial noise
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from reproduce.common import REPO, Context, Skipped, artifact, history, metrics, plt, save, with_sets
from reproduce.stats import BEATS, Comparison, binom_se, fmt, judge

KEY, TITLE = "rl", "RL: K1.5 vs policy gradient; critic refinement"

# How big this experiment is in each preset (reproduce/common.py's PRESETS holds what experiments share).
SIZES = {'quick': {'steps': 2, 'sft_steps': 4},
 'cpu': {'steps': 20, 'sft_steps': 100},
 'gpu': {'steps': 100, 'sft_steps': 500}}
CLAIM = "K1.5 objective beats plain policy gradient (held-out reward); critic refinement helps"
RUNS = {  # label -> (artifact name, --set overrides of the rl recipe)
    "K1.5 objective": ("rl-k15", ["rl.loss=k15"]),
    "plain policy gradient": ("rl-pg", ["rl.loss=pg"]),
    "K1.5, no critic refinement": ("rl-k15-nocritic", ["rl.loss=k15", "critic.weight=0"]),
}


def commands(ctx: Context) -> None:
    P, R, k2 = ctx.P, SIZES[ctx.preset], ctx.k2
    if not k2.available("rl"):
        raise Skipped("not run: k2 rl not available in this build", [CLAIM, "K1.5 / K2 section 3.2", "-", "not run: k2 rl not available"])
    if not (REPO / ctx.recipe("rl")).exists():
        raise Skipped(f"not run: k2 rl exists but has no recipe {ctx.recipe('rl')} yet",
                      [CLAIM, "K1.5 / K2 section 3.2", "-", f"not run: no {ctx.recipe('rl')}"])
    ctx.base_data()
    parent = ctx.baseline()
    k2("agentic", "data-synth:latest", "--recipe", ctx.recipe("agentic"), "--out", "rl-agentic")
    k2(*with_sets("sft", f"{parent}:latest", "--recipe", ctx.recipe("sft"), sets=(
        "data.agentic=rl-agentic:latest", f"train.steps={R['sft_steps']}", f"train.seq_len={P['seq']}",
        f"train.eval_every={R['sft_steps']}")), "--out", "rl-sft")
    for name, sets in RUNS.values():
        k2(*with_sets("rl", "rl-sft:latest", "--recipe", ctx.recipe("rl"), sets=(
            f"train.steps={R['steps']}", f"train.seq_len={P['seq']}",  # the SFT parent keeps the pretrain context
            *sets)), "--out", name)


# ----------------------------------------------------------------------------- measurement


@dataclass
class Measurement:
    m: dict[str, dict]  # label -> manifest metrics: start_/end_heldout_<env>, critic_accuracy_start/_end, ...
    hist: dict[str, list[dict]]  # label -> metrics.jsonl history
    envs: list[str]  # "heldout_<env>" of every held-out environment
    eval_prompts: int  # held-out prompts per environment

    def gain(self, label: str) -> float | None:
        """Mean held-out reward gain over the environments, start to end."""
        v = self.m[label]
        g = [v.get("end_" + e) - v.get("start_" + e) for e in self.envs
             if v.get("end_" + e) is not None and v.get("start_" + e) is not None]
        return sum(g) / len(g) if g else None

    @property
    def n_eval(self) -> int:  # held-out episodes per run
        return self.eval_prompts * max(1, len(self.envs))

    @property
    def objective(self) -> Comparison:  # a difference of two held-out means, rewards in [0, 1]
        return Comparison(self.gain("K1.5 objective"), self.gain("plain policy gradient"),
                          math.sqrt(2) * binom_se(0.5, self.n_eval))

    @property
    def n_pairs(self) -> int:
        return self.m["K1.5 objective"].get("critic_heldout_pairs") or 0

    @property
    def critic(self) -> Comparison:
        return Comparison(self.m["K1.5 objective"].get("critic_accuracy_end"),
                          self.m["K1.5, no critic refinement"].get("critic_accuracy_end"),
                          math.sqrt(2) * binom_se(0.5, self.n_pairs))


def measure(ctx: Context, runs: None) -> Measurement:
    m = {label: metrics(ctx.root, name) for label, (name, _) in RUNS.items()}
    return Measurement(
        m=m, hist={label: history(ctx.root, name) for label, (name, _) in RUNS.items()},
        envs=sorted({k.removeprefix("start_") for v in m.values() for k in v if k.startswith("start_heldout_")}),
        eval_prompts=artifact(ctx.root, "rl-k15").recipe.get("rl", {}).get("eval_prompts", 0),
    )


# ----------------------------------------------------------------------------- plots


def plots(ctx: Context, m: Measurement) -> list[str]:
    p = plt()
    fig, axes = p.subplots(1, 2, figsize=(11, 3.8))
    for i, label in enumerate(RUNS):
        h = [r for r in m.hist[label] if any(k.startswith("heldout_") for k in r)]
        start = m.m[label]  # the starting model's numbers are step 0
        for j, env in enumerate(m.envs):
            ys = [(0, start.get("start_" + env))] + [(r["step"], r[env]) for r in h if env in r]
            ys = [(x, y) for x, y in ys if y is not None]
            if ys:
                axes[0].plot([s for s, _ in ys], [y for _, y in ys], marker=".", color=f"C{i}",
                             ls=["-", "--", ":", "-."][j % 4], label=f"{label}: {env.removeprefix('heldout_')}")
        c = [(0, start.get("critic_accuracy_start"))] + [(r["step"], r["critic_accuracy"]) for r in m.hist[label]
                                                           if "critic_accuracy" in r]
        c = [(x, y) for x, y in c if y is not None]
        if c:
            axes[1].plot([s for s, _ in c], [y for _, y in c], marker="o", color=f"C{i}", label=label)
    axes[0].set_xlabel("RL step")
    axes[0].set_ylabel("held-out reward")
    axes[0].legend(fontsize=6)
    axes[1].set_xlabel("RL step")
    axes[1].set_ylabel("critic accuracy on held-out verifiable pairs")
    axes[1].legend(fontsize=7)
    for a in axes:
        a.grid(alpha=0.3)
    return [save(fig, ctx.report_dir / "rl.png")]


# ----------------------------------------------------------------------------- report


def section(ctx: Context, m: Measurement, plots: list[str]) -> list[str]:
    R, envs = SIZES[ctx.preset], m.envs
    body = [f"The experiment-1 MuonClip model, SFT ({R['sft_steps']} steps: agentic, QA, math), then `k2 rl` for "
            f"{R['steps']} steps with each objective (seed 0).", "",
            "| run | " + " | ".join(f"{e.removeprefix('heldout_')} start -> end" for e in envs) + " | critic accuracy start -> end |",
            "|---|" + "---:|" * (len(envs) + 1)]
    for label, v in m.m.items():
        body.append(f"| {label} | " + " | ".join(f"{fmt(v.get('start_' + e))} -> {fmt(v.get('end_' + e))}" for e in envs)
                    + f" | {fmt(v.get('critic_accuracy_start'))} -> {fmt(v.get('critic_accuracy_end'))} |")
    return body + ["", f"![rl]({plots[0]})"]


def summary(ctx: Context, m: Measurement) -> list[list[str]]:
    o, c = m.objective, m.critic
    return [
        ["K1.5's objective improves held-out reward more than plain policy gradient", "K1.5 / K2 RL (no side-by-side figure)",
         f"mean held-out gain K1.5 {fmt(o.a)} vs PG {fmt(o.b)} ({m.n_eval} held-out episodes each)", judge(BEATS, o)],
        ["refining the critic on verifiable pairs makes it more accurate", "K2 section 3.2.2 (closed loop)",
         f"critic accuracy {fmt(c.a)} with vs {fmt(c.b)} without ({m.n_pairs} held-out pairs)", judge(BEATS, c)],
    ]
