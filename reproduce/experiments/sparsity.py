"""Experiment 3: sparsity at fixed active parameters (K2 section 2.3, the sparsity scaling law).

Claim: with the active experts per token fixed, more routed experts (higher sparsity) give a lower loss.

  commands   one MuonClip pretraining run per routed-expert count, on experiment 1's corpus and budget
             (the recipe's own shape is experiment 1's run itself, reused)
  measure    final validation loss, total and active parameters, wall time per expert count
  plots      final validation loss vs sparsity, with experiment 1's seed spread as error bars
  report     the table; one summary row judged by the rules below
"""

from __future__ import annotations

from dataclasses import dataclass

from reproduce.common import Context, metrics, plt, save
from reproduce.stats import Rule, differs, fmt, judge

KEY, TITLE = "sparsity", "Sparsity at fixed active parameters"

# How big this experiment is in each preset (reproduce/common.py's PRESETS holds what experiments share).
SIZES = {'quick': {'experts': [4, 8], 'experts_per_tok': 2},
 'cpu': {'experts': [8, 16, 32, 64], 'experts_per_tok': 2},
 'gpu': {'experts': [8, 16, 32, 64, 128], 'experts_per_tok': 4}}

# The routed-expert shape of each base recipe (recipes/<base>/pretrain.toml): (routed experts, active per token).
RECIPE_EXPERTS = {"micro": (4, 2), "tiny": (8, 2), "small": (32, 4)}


def commands(ctx: Context) -> dict[int, str]:
    """Routed experts -> artifact name."""
    P, k = ctx.P, SIZES[ctx.preset]["experts_per_tok"]
    ctx.base_data()
    runs = {}
    for E in SIZES[ctx.preset]["experts"]:
        if (E, k) == RECIPE_EXPERTS.get(P["base"]):
            runs[E] = ctx.baseline()  # the recipe's own shape: the very run of experiment 1 (reused, not trained twice)
        else:
            runs[E] = ctx.pretrain(f"sparsity-e{E}", "optim.name=muonclip", f"model.n_routed_experts={E}",
                                   f"model.num_experts_per_tok={k}")
    return runs


@dataclass
class Row:
    sparsity: float  # routed experts / active experts per token
    experts: int
    val_loss: float
    params_total: int
    params_active: int
    wall_s: float | None


@dataclass
class Measurement:
    rows: list[Row]  # in the preset's expert order (increasing)
    noise: float | None  # experiment 1's seed spread (None when it did not run or had one seed)

    @property
    def monotone(self) -> bool:
        losses = [r.val_loss for r in self.rows]
        return all(b < a for a, b in zip(losses, losses[1:]))

    @property
    def gain(self) -> float:  # loss at the lowest sparsity minus at the highest
        return self.rows[0].val_loss - self.rows[-1].val_loss

    @property
    def ends_differ(self) -> bool | None:
        return differs(self.rows[0].val_loss, self.rows[-1].val_loss, self.noise)


def measure(ctx: Context, runs: dict[int, str]) -> Measurement:
    k, rows = SIZES[ctx.preset]["experts_per_tok"], []
    for E, n in runs.items():
        m = metrics(ctx.root, n)
        rows.append(Row(E / k, E, m["final_val_loss"], m["params_total"], m["params_active"], m.get("wall_s")))
    return Measurement(rows, ctx.noise_val)


MORE_EXPERTS_LOWER_LOSS = [
    Rule("reproduced", lambda m: m.monotone and m.ends_differ),
    Rule("direction reproduced (no noise estimate)", lambda m: m.monotone and m.ends_differ is None),
    Rule("partly: highest sparsity beats lowest beyond noise, not monotone", lambda m: m.gain > 0 and m.ends_differ),
    Rule("within noise", lambda m: m.ends_differ is False),
    Rule("not reproduced"),
]


def plots(ctx: Context, m: Measurement) -> list[str]:
    P, rows, p = ctx.P, m.rows, plt()
    fig, ax = p.subplots(figsize=(5.6, 3.8))
    ax.plot([r.sparsity for r in rows], [r.val_loss for r in rows], marker="o")
    if m.noise is not None:
        ax.errorbar([r.sparsity for r in rows], [r.val_loss for r in rows], yerr=m.noise, fmt="none", capsize=3, color="C0")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r.sparsity for r in rows], [f"{r.sparsity:g}\n({r.experts} experts)" for r in rows], fontsize=8)
    ax.set_xlabel("sparsity = total experts / active experts")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"Fixed active parameters and tokens ({P['steps'] * P['batch'] * P['seq'] / 1e6:.2f}M)", fontsize=9)
    ax.grid(alpha=0.3)
    return [save(fig, ctx.report_dir / "sparsity.png")]


def section(ctx: Context, m: Measurement, plots: list[str]) -> list[str]:
    P = ctx.P
    body = [
        f"The model `{P['base']}` with {SIZES[ctx.preset]['experts_per_tok']} routed experts active per token (plus 1 shared), the number "
        f"of routed experts varied; every run trains on the same {P['steps'] * P['batch'] * P['seq']:,} tokens of the "
        f"experiment-1 corpus with MuonClip, seed {P['seeds'][0]}.",
        "",
        "| sparsity | routed experts | total parameters | active parameters | final validation loss | wall s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in m.rows:
        body.append(f"| {r.sparsity:g} | {r.experts} | {r.params_total:,} | {r.params_active:,} | {r.val_loss:.4f} | "
                    f"{fmt(r.wall_s, '.0f')} |")
    noise = (f"Noise floor (seed spread of experiment 1): {m.noise:.4f}." if m.noise is not None else
             "One seed (no noise estimate at this preset).")
    return body + ["", noise, "", f"![sparsity]({plots[0]})"]


def summary(ctx: Context, m: Measurement) -> list[list[str]]:
    return [["higher sparsity (more experts, same active) gives lower loss",
             "monotone; sparsity 48 needs 1.69x / 1.39x / 1.15x fewer FLOPs than 8 / 16 / 32",
             ", ".join(f"{r.sparsity:g}: {r.val_loss:.3f}" for r in m.rows), judge(MORE_EXPERTS_LOWER_LOSS, m)]]
