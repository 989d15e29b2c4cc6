"""Experiment 1: MuonClip vs Muon vs AdamW, and QK-Clip where attention logits grow.

Claims (K2 section 2.1, Moonlight): Muon's attention logits grow without bound and QK-Clip caps them at tau;
the clip goes quiet later in training and does not hurt the loss; Muon is ~2x as token-efficient as AdamW.

  commands   equal-budget pretraining runs (MuonClip per seed, Muon, AdamW per lr), Muon at smaller budgets
             with their own schedules, and a Muon / MuonClip pair at a high lr where logits grow
  measure    final validation losses, validation curves, the seed spread (the noise floor experiment 3
             reuses), tokens for Muon to reach AdamW's loss, the max-logit and clip histories
  plots      validation loss vs tokens; max logit / fraction of heads clipped / loss, with and without the clip
  report     the runs table, token efficiency, the QK-Clip table; five summary rows judged by the rules below
"""

from __future__ import annotations

from dataclasses import dataclass

from reproduce.common import PAPER, Context, attention_heads, history, metrics, plt, save
from reproduce.stats import Rule, budget_to_reach, differs, fmt, judge, tokens_to_reach, val_curve

KEY, TITLE = "optimizers", "MuonClip vs Muon vs AdamW"

# How big this experiment is in each preset (reproduce/common.py's PRESETS holds what experiments share).
SIZES = {'quick': {'adamw_lrs': [0.01],
           'muon_fractions': [],
           'logit': {'steps': 12, 'lr': 0.05, 'weight_decay': 0.0, 'tau': 5.0}},
 'cpu': {'adamw_lrs': [0.01, 0.003],
         'muon_fractions': [0.5],
         'logit': {'steps': 200, 'lr': 0.05, 'weight_decay': 0.0, 'tau': 100.0}},
 'gpu': {'adamw_lrs': [0.006, 0.002],
         'muon_fractions': [0.25, 0.5],
         'logit': {'steps': 500, 'lr': 0.03, 'weight_decay': 0.0, 'tau': 100.0}}}


@dataclass
class Runs:
    main: dict[str, str]  # label -> artifact name, all at the full budget
    short: dict[int, str]  # tokens -> artifact name: Muon with its own full schedule at a smaller budget
    grow: dict[str, str]  # "muon" | "muonclip" -> artifact name, at the high lr where logits grow


def commands(ctx: Context) -> Runs:
    P = ctx.P
    tps = P["batch"] * P["seq"]  # tokens per step
    ctx.base_data()
    main = {}
    for seed in P["seeds"]:
        main[f"MuonClip (seed {seed})"] = ctx.baseline(seed)
    main["Muon"] = ctx.pretrain("opt-muon", "optim.name=muon")
    for lr in SIZES[ctx.preset]["adamw_lrs"]:
        main[f"AdamW lr {lr:g}"] = ctx.pretrain(f"opt-adamw-lr{lr:g}", "optim.name=adamw", f"optim.lr={lr}")
    short = {}
    for f in SIZES[ctx.preset]["muon_fractions"]:
        steps = max(2, int(round(P["steps"] * f)))
        short[steps * tps] = ctx.pretrain(f"opt-muon-f{f:g}", "optim.name=muon", steps=steps)
    L = SIZES[ctx.preset]["logit"]
    grow = {}
    for opt in ("muon", "muonclip"):
        grow[opt] = ctx.pretrain(f"opt-logit-{opt}", f"optim.name={opt}", f"optim.lr={L['lr']}",
                                 f"optim.weight_decay={L['weight_decay']}", f"optim.qk_clip_tau={L['tau']}",
                                 steps=L["steps"])
    return Runs(main, short, grow)


# ----------------------------------------------------------------------------- measurement


@dataclass
class Measurement:
    tokens_per_step: int
    budget: int  # tokens of every full-budget run
    s0: str  # label of the first MuonClip seed: the reference run
    runs: dict[str, dict]  # label -> manifest metrics of each full-budget run
    curves: dict[str, list]  # label -> validation (tokens, loss) curve
    short: dict[int, dict]  # tokens -> manifest metrics of a smaller-budget Muon run
    noise: float | None  # spread of the MuonClip seeds' final validation losses (None: one seed)
    best_lr: float  # AdamW's better lr
    adam_loss: float  # ... and its final validation loss: the target Muon has to reach
    t_curve: float | None  # tokens at which Muon's validation curve first reaches adam_loss
    t_budget: float | None  # ... from the budget runs, interpolated in log-tokens
    how: str  # how t_budget was found (interpolated / below smallest budget / not reached)
    # QK-Clip where logits grow
    tau: float
    logit_steps: int
    grow: dict[str, list[dict]]  # "muon" | "muonclip" -> metrics.jsonl history
    grow_final: dict[str, float]  # "muon" | "muonclip" -> final validation loss
    n_heads: int

    @property
    def final(self) -> dict[str, float]:
        return {label: r["final_val_loss"] for label, r in self.runs.items()}

    @property
    def max_noclip(self) -> float:  # the recorded max logit is the forward's, before that step's clip
        return max(r["max_logit"] for r in self.grow["muon"])

    @property
    def max_clip(self) -> float:
        return max(r["max_logit"] for r in self.grow["muonclip"])

    @property
    def clipped_steps(self) -> list[int]:
        return [r["step"] for r in self.grow["muonclip"] if r.get("heads_clipped_total", 0) > 0]

    @property
    def last_clip(self) -> int | None:
        return max(self.clipped_steps) if self.clipped_steps else None

    @property
    def clip_cost(self) -> float:  # validation loss with the clip minus without
        return self.grow_final["muonclip"] - self.grow_final["muon"]

    @property
    def clip_differs(self) -> bool | None:
        return differs(self.grow_final["muonclip"], self.grow_final["muon"], self.noise)

    @property
    def ratio_curve(self) -> float | None:
        return self.budget / self.t_curve if self.t_curve else None

    @property
    def ratio_budget(self) -> float | None:
        return self.budget / self.t_budget if self.t_budget and self.short else None

    @property
    def ratio(self) -> float | None:  # the budget runs are the fair comparison; the curve when they are missing
        return self.ratio_budget or self.ratio_curve

    @property
    def muon_vs_adam(self) -> bool | None:
        return differs(self.final["Muon"], self.adam_loss, self.noise)


def measure(ctx: Context, runs: Runs) -> Measurement:
    P, root = ctx.P, ctx.root
    tps = P["batch"] * P["seq"]
    main = {label: metrics(root, n) for label, n in runs.main.items()}
    seeds_v = [main[f"MuonClip (seed {s})"]["final_val_loss"] for s in P["seeds"]]
    adamw = {lr: main[f"AdamW lr {lr:g}"]["final_val_loss"] for lr in SIZES[ctx.preset]["adamw_lrs"]}
    best_lr = min(adamw, key=adamw.get)
    budget = P["steps"] * tps
    short = {t: metrics(root, n) for t, n in runs.short.items()}
    curves = {label: val_curve(history(root, n), tps) for label, n in runs.main.items()}
    budget_pts = [(t, m["final_val_loss"]) for t, m in short.items()] + [(budget, main["Muon"]["final_val_loss"])]
    t_budget, how = budget_to_reach(budget_pts, adamw[best_lr])
    m = Measurement(
        tokens_per_step=tps, budget=budget, s0=f"MuonClip (seed {P['seeds'][0]})", runs=main, curves=curves, short=short,
        noise=(max(seeds_v) - min(seeds_v)) if len(seeds_v) > 1 else None,
        best_lr=best_lr, adam_loss=adamw[best_lr], t_curve=tokens_to_reach(curves["Muon"], adamw[best_lr]),
        t_budget=t_budget, how=how,
        tau=SIZES[ctx.preset]["logit"]["tau"], logit_steps=SIZES[ctx.preset]["logit"]["steps"],
        grow={opt: history(root, n) for opt, n in runs.grow.items()},
        grow_final={opt: metrics(root, n)["final_val_loss"] for opt, n in runs.grow.items()},
        n_heads=attention_heads(root, runs.grow["muonclip"]),
    )
    ctx.noise_val = m.noise  # the noise floor experiment 3 judges with
    return m


# ----------------------------------------------------------------------------- verdict rules

CAP_SLACK = 1.1  # "capped": the largest recorded logit within 10% of tau (it is recorded before the clip)
QUIET_AFTER = 0.7  # "goes inactive": no clip in the last 30% of steps (K2: inactive after ~30% of training)
EFFICIENT = 1.5  # "~2x as token-efficient": at least 1.5x; above 1x is "partly"

QK_CAP = [
    Rule("not reproduced: logits did not grow past tau", lambda m: not m.max_noclip > m.tau),
    Rule("not reproduced: not capped", lambda m: not m.max_clip <= CAP_SLACK * m.tau),
    Rule("reproduced"),
]
CLIP_GOES_QUIET = [
    Rule("reproduced", lambda m: m.last_clip is not None and m.last_clip <= QUIET_AFTER * m.logit_steps),
    Rule("not reproduced: still clipping in the last 30% of steps", lambda m: bool(m.last_clip)),
    Rule("not run: clip never fired"),
]
CLIP_HARMLESS = [
    Rule("not run: the clip never fired (identical runs)", lambda m: not m.clipped_steps),
    Rule("reproduced (within noise)", lambda m: m.clip_differs is False),
    Rule("reproduced (clip better)", lambda m: m.clip_differs and m.clip_cost < 0),
    Rule("not reproduced (clip worse beyond noise)", lambda m: m.clip_differs),
    Rule("reproduced (clip better; one seed)", lambda m: m.clip_cost <= 0),  # no noise estimate from here on
    Rule("unclear: clip worse by {clip_cost:.4f}, no noise estimate"),
]
TOKEN_EFFICIENCY = [
    Rule("not reproduced: Muon did not reach AdamW's loss", lambda m: m.ratio is None),
    Rule("within noise: {ratio:.2f}x, but the final losses differ by less than the seed spread",
         lambda m: m.muon_vs_adam is False),
    Rule("reproduced", lambda m: m.ratio >= EFFICIENT),
    Rule("partly: Muon ahead, by less than 2x ({ratio:.2f}x)", lambda m: m.ratio > 1.0),
    Rule("not reproduced"),
]
LOSS_ORDER = [
    Rule("Muon family better than AdamW (within noise)",
         lambda m: min(m.final[m.s0], m.final["Muon"]) < m.adam_loss and m.muon_vs_adam is False),
    Rule("Muon family better than AdamW", lambda m: min(m.final[m.s0], m.final["Muon"]) < m.adam_loss),
    Rule("not reproduced: AdamW better"),
]

# ----------------------------------------------------------------------------- plots


def plots(ctx: Context, m: Measurement) -> list[str]:
    L, tps, p = SIZES[ctx.preset]["logit"], m.tokens_per_step, plt()

    # validation loss vs tokens at equal budgets
    fig, ax = p.subplots(figsize=(6.4, 4.2))
    for i, (label, c) in enumerate(m.curves.items()):
        ax.plot([t / 1e6 for t, _ in c], [v for _, v in c], marker=".", label=f"{label}: {m.final[label]:.3f}",
                color=f"C{i}", ls="--" if "seed" in label and not label.endswith("seed 0)") else "-")
    for t, r in m.short.items():
        v = r["final_val_loss"]
        ax.plot([t / 1e6], [v], marker="*", ms=12, ls="none", color="k", label=f"Muon, own schedule at {t / 1e6:.2g}M tokens: {v:.3f}")
    ax.axhline(m.adam_loss, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Equal budgets: validation loss vs tokens")
    lo = min(min(m.final.values()), m.adam_loss)
    ax.set_ylim(lo - 0.1, lo + 1.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    names = [save(fig, ctx.report_dir / "opt_val_loss.png")]

    # max logit, heads clipped, and loss, with and without the clip
    fig, axes = p.subplots(1, 3, figsize=(13, 3.8))
    for opt, h in m.grow.items():
        label = "Muon (no clip)" if opt == "muon" else f"MuonClip (tau {L['tau']:g})"
        axes[0].plot([r["step"] for r in h], [r["max_logit"] for r in h], label=label)
        c = val_curve(h, tps)
        axes[2].plot([r["step"] for r in h], [r["loss"] for r in h], alpha=0.35, lw=0.8)
        axes[2].plot([t / tps for t, _ in c], [v for _, v in c], marker="o", label=f"{label} (validation)",
                     color=axes[2].lines[-1].get_color())
    axes[0].axhline(L["tau"], color="k", ls=":", lw=1, label="tau")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("max attention logit (all heads)")
    axes[0].set_title(f"lr {L['lr']:g}, weight decay {L['weight_decay']:g}")
    axes[0].legend(fontsize=7)
    hc = m.grow["muonclip"]
    frac = [r.get("heads_clipped_total", 0) / m.n_heads for r in hc]
    axes[1].plot([r["step"] for r in hc], frac, lw=0.6, color="C1", alpha=0.4, label="per step")
    win = max(1, len(frac) // 20)
    smooth = [sum(frac[max(0, i - win + 1): i + 1]) / len(frac[max(0, i - win + 1): i + 1]) for i in range(len(frac))]
    axes[1].plot([r["step"] for r in hc], smooth, lw=1.5, color="C1", label=f"mean over {win} steps")
    axes[1].legend(fontsize=7)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(f"fraction of heads clipped ({m.n_heads} heads)")
    axes[1].set_title("QK-Clip activity")
    axes[1].set_ylim(-0.02, 1.02)
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("loss (train: faint)")
    axes[2].set_title("loss with and without the clip")
    axes[2].legend(fontsize=7)
    for a in axes:
        a.grid(alpha=0.3)
    names.append(save(fig, ctx.report_dir / "opt_qk_clip.png"))
    return names


# ----------------------------------------------------------------------------- report


def section(ctx: Context, m: Measurement, plots: list[str]) -> list[str]:
    P, L, ref = ctx.P, SIZES[ctx.preset]["logit"], m.runs[m.s0]
    body = [
        f"Corpus: the synthetic world ({P['world']} people) with {P['rewrites']} verified rewrites per document "
        f"(`k2 rephrase`), one shared tokenizer; model `{P['base']}` "
        f"({fmt(ref.get('params_total'), ',')} parameters, "
        f"{fmt(ref.get('params_active'), ',')} active). Every run: {P['steps']} steps x {P['batch']} x "
        f"{P['seq']} = {m.budget / 1e6:.2f}M tokens, warmup-stable-decay schedule, peak lr {P['lr']:g} (Muon's update is "
        "RMS-matched to AdamW's, so one lr serves both"
        + (f"; AdamW also at {', '.join(f'{x:g}' for x in SIZES[ctx.preset]['adamw_lrs'] if x != P['lr'])}" if len(SIZES[ctx.preset]["adamw_lrs"]) > 1 else "")
        + "), "
        f"weight decay 0.1. Seeds: MuonClip {', '.join(map(str, P['seeds']))}; every other run seed 0.",
        "",
        "| run | final validation loss | max logit at the end | heads clipped (sum over steps) |",
        "|---|---:|---:|---:|",
    ]
    for label, r in m.runs.items():
        body.append(f"| {label} | {r['final_val_loss']:.4f} | {fmt(r.get('max_logit_final'), '.1f')} | "
                    f"{r.get('heads_clipped_total', 0)} |")
    for t, r in m.short.items():
        body.append(f"| Muon, {t / 1e6:.2f}M tokens (own schedule) | {r['final_val_loss']:.4f} | "
                    f"{fmt(r.get('max_logit_final'), '.1f')} | - |")
    noise_txt = (f"The two MuonClip seeds differ by {m.noise:.4f}: differences below {2 * m.noise:.4f} "
                 "(twice that spread) are called within noise below." if m.noise is not None
                 else "One seed only (no noise estimate at this preset).")
    body += ["", noise_txt, "", f"![validation loss vs tokens]({plots[0]})", ""]
    if ref.get("heads_clipped_total", 0) == 0:
        body.append("In the equal-budget runs the clip never fired (max logits stay far below tau = 100), so MuonClip "
                    "and Muon apply the same update there.")
    hc, last_clip = m.grow["muonclip"], m.last_clip
    body += [
        "",
        f"**Token efficiency.** Best AdamW (lr {m.best_lr:g}) ends at {m.adam_loss:.4f} after {m.budget / 1e6:.2f}M tokens. "
        + (f"Muon's validation curve first reaches that loss at {m.t_curve / 1e6:.2f}M tokens ({m.ratio_curve:.2f}x); "
           if m.t_curve else "Muon's validation curve never reaches it within the budget; ")
        + ((f"from Muon runs with their own full schedule at {', '.join(f'{t / 1e6:.2f}M' for t in m.short)} and "
            f"{m.budget / 1e6:.2f}M tokens, interpolated in log-tokens: {m.t_budget / 1e6:.2f}M tokens ({m.ratio_budget:.2f}x, {m.how})."
            if m.t_budget else f"the Muon runs at smaller budgets do not reach it ({m.how}).") if m.short
           else "(no shorter Muon runs at this preset)."),
        "The curve intercept is conservative (mid-run Muon has not had its learning-rate decay yet); the budget "
        "runs are the fair comparison (Moonlight fits separate runs per budget).",
        "",
        f"**QK-Clip in a setting where logits grow** (lr {L['lr']:g}, weight decay {L['weight_decay']:g}, "
        f"{L['steps']} steps, tau {L['tau']:g}):",
        "",
        "| run | largest max logit | final validation loss | steps with a clip | last step with a clip |",
        "|---|---:|---:|---:|---:|",
        f"| Muon (no clip) | {m.max_noclip:.1f} | {m.grow_final['muon']:.4f} | - | - |",
        f"| MuonClip | {m.max_clip:.1f} | {m.grow_final['muonclip']:.4f} | {len(m.clipped_steps)} of {len(hc)} | "
        f"{last_clip if last_clip else '-'} |",
        "",
        "The recorded max logit is measured in the forward pass before that step's clip, so a value slightly "
        "above tau means the weights were rescaled right after.",
        "",
        f"![QK-Clip]({plots[1]})",
    ]
    return body


def summary(ctx: Context, m: Measurement) -> list[list[str]]:
    L, final, ever, n = SIZES[ctx.preset]["logit"], m.final, len(m.clipped_steps), len(m.grow["muonclip"])
    efficiency = "; ".join([
        f"{'>= ' if m.how == 'below smallest budget' else ''}{m.ratio_budget:.2f}x (budget runs)" if m.ratio_budget
        else ("budget runs: not reached" if m.short else ""),
        f"{m.ratio_curve:.2f}x (curve)" if m.ratio_curve else "curve: not reached"]).strip("; ")
    return [
        ["Muon's attention logits grow without bound; QK-Clip caps them at tau",
         f"vanilla Muon > 1000 (9B-active MoE); MuonClip capped at tau = {PAPER['k2_tau']:g}",
         f"Muon {m.max_noclip:.0f} vs MuonClip {m.max_clip:.1f} (tau {L['tau']:g}, lr {L['lr']:g})", judge(QK_CAP, m)],
        ["the clip goes inactive by itself later in training", "inactive after ~30% of training (12.7% of heads ever clipped)",
         f"last clip at step {m.last_clip} of {L['steps']}; clipped on {ever} of {n} steps" if m.last_clip else "never clipped",
         judge(CLIP_GOES_QUIET, m)],
        ["the clip does not hurt the loss", "negligible loss impact (tau = 30 ablation)",
         f"val loss {m.grow_final['muonclip']:.4f} with vs {m.grow_final['muon']:.4f} without ({m.clip_cost:+.4f})",
         judge(CLIP_HARMLESS, m)],
        ["Muon is ~2x as token-efficient as AdamW (Moonlight)", f"~{PAPER['moonlight_efficiency']:g}x", efficiency,
         judge(TOKEN_EFFICIENCY, m)],
        ["equal budgets: MuonClip / Muon / AdamW validation loss", "MuonClip <= Muon < AdamW",
         f"MuonClip {final[m.s0]:.4f}, Muon {final['Muon']:.4f}, AdamW {m.adam_loss:.4f}", judge(LOSS_ORDER, m)],
    ]
