#!/usr/bin/env python
"""`make reproduce`: the Kimi K2 report's claims, re-measured at small scale, in one report.

    python reproduce/run.py [--preset cpu|gpu] [--quick] [--only 1,3] [--root DIR] [--report-dir DIR]

Reads top to bottom:

  1. PRESETS         how big each experiment is (quick: micro model, minutes; cpu: tiny model,
                     target 90 minutes on 2 idle cores; gpu: the small model on one GPU)
  2. K2              the ONLY way this script trains or evaluates anything: a subprocess
                     `k2 --root ROOT --reuse <stage> --recipe recipes/<base>/<stage>.toml --set ...`
                     (every command is logged and copied into the report). `--reuse` makes a step
                     whose latest artifact has the same recipe and inputs a no-op, and an interrupted
                     training run resumes from its checkpoint: running this script again continues.
  3. experiments     1 MuonClip vs Muon vs AdamW   2 rephrasing vs epochs   3 sparsity
                     4 context extension           5 RL (when `k2 rl` exists)
                     each runs its commands, then reads its numbers back from the artifacts
                     (manifest.json metrics, metrics.jsonl, eval results) and draws its plots
  4. the report      REPORT.md: a summary table (paper vs measured vs verdict), one section per
                     experiment with plots, seeds, the exact commands and wall times

Artifacts go to reproduce/artifacts/<preset>/ (gitignored); the report and its PNGs to reproduce/
(--quick: to the artifacts root, so a smoke run never overwrites the real report).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ----------------------------------------------------------------------------- 1. presets
#
# Token budgets are the unit: a pretraining run is steps x batch x seq_len tokens. The cpu preset
# is sized for about 90 minutes on 2 idle cores (measured per experiment in REPORT.md).

PRESETS: dict[str, dict] = {
    "quick": dict(
        base="micro",  # recipes/micro/*.toml
        world=40, rewrites=2, vocab=512,
        batch=4, seq=128, steps=12, eval_every=4, lr=0.01,
        seeds=[0], adamw_lrs=[0.01], muon_fractions=[],
        logit=dict(steps=12, lr=0.05, weight_decay=0.0, tau=5.0),
        experts=[4, 8], experts_per_tok=2,
        kn=dict(world=20, epoch_scale=1, batch=4, seq=128, sft_steps=4, eval_examples=8, max_new_tokens=8),
        ext=dict(parent_batch=4, steps=2, batch=2, seq=384, factor=2.0, trials=1, lengths=[1.0, 2.0], depths=[0.5]),
        rl=dict(steps=2, sft_steps=4),
    ),
    "cpu": dict(
        base="tiny",  # recipes/tiny/*.toml: the tiny (1.9M-parameter) MLA+MoE model
        world=400, rewrites=4, vocab=2048,
        batch=8, seq=256, steps=300, eval_every=25, lr=0.01,
        seeds=[0, 1],  # the MuonClip baseline twice: the seed-to-seed spread is the noise floor
        adamw_lrs=[0.01, 0.003],  # AdamW at the shared lr and lower: the better one is the baseline
        muon_fractions=[0.5],  # Muon with its own full schedule at half the tokens (token efficiency)
        logit=dict(steps=200, lr=0.05, weight_decay=0.0, tau=100.0),  # K2's tau, where Muon's logits grow
        experts=[8, 16, 32, 64], experts_per_tok=2,  # sparsity 4, 8, 16, 32 at fixed active parameters
        kn=dict(world=50, epoch_scale=10, batch=16, seq=128, sft_steps=60, eval_examples=150, max_new_tokens=12),
        ext=dict(parent_batch=16, steps=100, batch=8, seq=512, factor=4.0, trials=10, lengths=[0.5, 1.0, 2.0, 3.0, 4.0],
                 depths=[0.1, 0.3, 0.5, 0.7, 0.9]),
        rl=dict(steps=20, sft_steps=100),
    ),
    "gpu": dict(
        base="small",  # recipes/small/*.toml: the small (116M total, 39M active) model on one GPU
        world=2000, rewrites=4, vocab=16384,
        batch=32, seq=1024, steps=1000, eval_every=50, lr=0.006,
        seeds=[0, 1, 2], adamw_lrs=[0.006, 0.002], muon_fractions=[0.25, 0.5],
        logit=dict(steps=500, lr=0.03, weight_decay=0.0, tau=100.0),
        experts=[8, 16, 32, 64, 128], experts_per_tok=4,  # sparsity 2 ... 32 (48 = 192/4 is affordable too)
        kn=dict(world=1000, epoch_scale=10, batch=64, seq=256, sft_steps=300, eval_examples=1000, max_new_tokens=16),
        ext=dict(parent_batch=32, steps=300, batch=16, seq=2048, factor=4.0, trials=20, lengths=[0.5, 1.0, 2.0, 3.0, 4.0],
                 depths=[0.1, 0.3, 0.5, 0.7, 0.9]),
        rl=dict(steps=100, sft_steps=500),
    ),
}

# The paper's numbers each result is set beside.
PAPER = {
    "table1": {"raw": 23.76, "rw1": 27.39, "rw10": 28.94},  # K2 Table 1, SimpleQA accuracy (%)
    "bios": {"none": 9.7, "multi5_permute_fullname": 96.0},  # PLM 3.1 bioS held-out QA (%)
    "moonlight_efficiency": 2.0,  # Muon reaches AdamW's loss with ~52% of the compute
    "k2_tau": 100.0,
}

# ----------------------------------------------------------------------------- 2. the k2 runner


def k2_executable() -> str:
    """`k2` next to this interpreter (the project's .venv), else on PATH."""
    here = Path(sys.executable).parent / "k2"
    if here.exists():
        return str(here)
    found = shutil.which("k2")
    if not found:
        sys.exit("reproduce: no `k2` next to this python or on PATH (run `make setup`)")
    return found


class StepFailed(RuntimeError):
    pass


@dataclass
class K2:
    """Runs `k2 --root ROOT --reuse ...` and keeps a ledger of what ran, what was up to date, and how long it took."""

    root: Path
    exe: str
    ledger: dict = field(default_factory=dict)  # display command -> {"status", "wall_s", "exp"}
    commands: dict = field(default_factory=dict)  # experiment -> [display command, ...] (this invocation)
    exp: str = ""
    render_only: bool = False  # --render-only: run nothing, read the artifacts the ledger says exist

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        path = self.root / "ledger.json"
        if path.exists():
            self.ledger = json.loads(path.read_text())

    def display(self, args) -> str:
        return "k2 --root $ROOT --reuse " + shlex.join(str(a) for a in args)

    def __call__(self, *args) -> str:
        args = [str(a) for a in args]
        shown = self.display(args)
        self.commands.setdefault(self.exp, []).append(shown)
        log = self.root / "logs" / f"{len(list((self.root / 'logs').iterdir())):04d}-{args[0]}.log"
        env = dict(os.environ, K2_ARTIFACTS=str(self.root), COLUMNS="120")
        print(f"[{self.exp}] {shown}", flush=True)
        if self.render_only:
            if shown not in self.ledger or self.ledger[shown]["status"] == "failed":
                raise StepFailed(f"--render-only: `{shown}` has not run yet (run without --render-only)")
            return ""
        t0 = time.time()
        with open(log, "w") as f:
            f.write(shown + "\n\n")
            f.flush()
            rc = self.execute(["--root", str(self.root), "--reuse", *args], f, env)
        wall = time.time() - t0
        text = log.read_text(errors="replace")
        if rc != 0:
            self.ledger[shown] = {"status": "failed", "wall_s": round(wall, 1), "exp": self.exp}
            self.save()
            tail = "\n".join(text.strip().splitlines()[-15:])
            raise StepFailed(f"`{shown}` exited with {rc} (log: {log})\n{tail}")
        reused = "up to date:" in text
        prev = self.ledger.get(shown, {})
        if reused and prev.get("status") == "ran":
            status = prev  # keep the wall time of the run that made the artifact
        else:
            status = {"status": "up to date" if reused else "ran", "wall_s": round(wall, 1), "exp": self.exp}
        self.ledger[shown] = status
        self.save()
        print(f"    {'up to date' if reused else f'ran in {wall:.0f} s'}", flush=True)
        return text

    def execute(self, argv: list[str], log, env: dict) -> int:
        """One `k2` process; its output goes to the log. (Tests swap in an in-process runner.)"""
        return subprocess.run([self.exe, *argv], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode

    def save(self):
        (self.root / "ledger.json").write_text(json.dumps(self.ledger, indent=1) + "\n")

    def available(self, stage: str) -> bool:
        """Does this build of k2 have the command `stage`?"""
        with open(os.devnull, "w") as null:
            return self.execute([stage, "--help"], null, dict(os.environ)) == 0


# ----------------------------------------------------------------------------- reading artifacts back


def art_dir(root: Path, name: str) -> Path:
    return (root / name / "latest").resolve()


def manifest(root: Path, name: str) -> dict:
    return json.loads((art_dir(root, name) / "manifest.json").read_text())


def metrics(root: Path, name: str) -> dict:
    return manifest(root, name).get("metrics", {})


def recipe_value(root: Path, name: str, dotted: str):
    """A value of the resolved recipe an artifact was made with, e.g. 'extend.beta_fast'."""
    d = manifest(root, name).get("recipe", {})
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def history(root: Path, name: str) -> list[dict]:
    path = art_dir(root, name) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def eval_results(root: Path, name: str) -> dict:
    """label -> suite -> metrics, from an eval artifact's results.json."""
    data = json.loads((art_dir(root, name) / "results.json").read_text())
    return {m["label"]: {s: v.get("metrics", {}) for s, v in m["suites"].items()} for m in data["models"]}


def corpus_tokens(root: Path, dataset: str, tokenizer: str) -> int:
    """Tokens of a dataset artifact's corpus under a tokenizer artifact, one end-of-text per document
    (what pretraining packs). Reads the two artifacts with `datasets` and `tokenizers`."""
    import datasets
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(art_dir(root, tokenizer) / "tokenizer.json"))
    texts = datasets.load_from_disk(str(art_dir(root, dataset) / "corpus"))["text"]
    return sum(len(e.ids) + 1 for e in tok.encode_batch(texts, add_special_tokens=False))


# ----------------------------------------------------------------------------- small statistics


def binom_se(p: float, n: int) -> float:
    """Standard error of a proportion; p is kept half a count away from 0 and 1 (0 of n is not certainty)."""
    n = max(n, 1)
    p = min(max(p, 0.5 / n), 1 - 0.5 / n)
    return math.sqrt(p * (1 - p) / n)


def differs(a: float, b: float, noise: float | None) -> bool | None:
    """True when |a - b| is above twice the noise, None when there is no noise estimate."""
    if noise is None:
        return None
    return abs(a - b) > 2 * noise


def tokens_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """First token count at which a (tokens, loss) curve reaches `target` (linear interpolation)."""
    prev = None
    for t, v in points:
        if v <= target:
            if prev is None:
                return t
            (t0, v0) = prev
            return t0 + (t - t0) * (v0 - target) / max(v0 - v, 1e-12)
        prev = (t, v)
    return None


def budget_to_reach(points: list[tuple[float, float]], target: float) -> tuple[float | None, str]:
    """Budget (tokens) at which final losses of runs at several budgets reach `target`, interpolating
    the loss linearly in log(tokens). Returns (tokens, how): how is 'interpolated', 'below smallest budget'
    (an upper bound on the tokens needed) or 'not reached'."""
    pts = sorted(points)
    if not pts:
        return None, "no runs"
    if pts[0][1] <= target:
        return pts[0][0], "below smallest budget"
    for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
        if v1 <= target:
            frac = (v0 - target) / max(v0 - v1, 1e-12)
            return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0))), "interpolated"
    return None, "not reached"


def val_curve(hist: list[dict], tokens_per_step: int) -> list[tuple[float, float]]:
    return [(r["step"] * tokens_per_step, r["val_loss"]) for r in hist if "val_loss" in r]


def fmt(v, spec=".3f", none="-") -> str:
    return none if v is None else format(v, spec)


# ----------------------------------------------------------------------------- plotting


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as p

    return p


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt().close(fig)
    return path.name


# ----------------------------------------------------------------------------- 3. experiments


@dataclass
class Section:
    key: str
    title: str
    body: list[str] = field(default_factory=list)  # markdown lines
    summary: list[list[str]] = field(default_factory=list)  # rows: claim, paper, measured, verdict
    plots: list[str] = field(default_factory=list)
    status: str = "done"  # done | skipped | failed
    wall_s: float = 0.0


class Repro:
    def __init__(self, preset: str, P: dict, root: Path, report_dir: Path, k2: K2):
        self.preset, self.P, self.root, self.report_dir, self.k2 = preset, P, root, report_dir, k2
        self.recipe = lambda stage: f"recipes/{P['base']}/{stage}.toml"
        self.noise_val = None  # seed-to-seed spread of the final validation loss (experiment 1)

    # -- shared data: the K2 pipeline's corpus (world + biographies + math, rephrased) and one tokenizer
    def base_data(self):
        P, k2 = self.P, self.k2
        k2("data", "synth", "--recipe", self.recipe("synth"), "--set", f"world.size={P['world']}", "--out", "data-synth")
        k2("rephrase", "data-synth:latest", "--recipe", self.recipe("rephrase"), "--set", f"rewrite.rewrites={P['rewrites']}",
           "--out", "data-rephrase")
        k2("tokenizer", "train", "data-rephrase:latest", "--vocab-size", P["vocab"], "--out", "data-tokenizer")

    def pretrain(self, name: str, *sets: str, steps: int | None = None, seed: int = 0) -> str:
        """One pretraining run of the shared shape; `sets` are extra --set overrides."""
        P = self.P
        base = [f"data.input=data-rephrase:latest", "tokenizer.ref=data-tokenizer:latest", f"seed={seed}",
                f"train.steps={steps or P['steps']}", f"train.batch_size={P['batch']}", f"train.seq_len={P['seq']}",
                f"train.eval_every={P['eval_every']}", f"optim.lr={P['lr']}"]
        args = ["pretrain", "--recipe", self.recipe("pretrain")]
        for s in base + list(sets):
            args += ["--set", s]
        self.k2(*args, "--out", name)
        return name

    # ------------------------------------------------------------------ experiment 1
    def exp_optimizers(self, sec: Section):
        P, root = self.P, self.root
        tps = P["batch"] * P["seq"]  # tokens per step
        self.base_data()
        runs = {}  # label -> artifact name
        for seed in P["seeds"]:
            runs[f"MuonClip (seed {seed})"] = self.pretrain(f"opt-muonclip-s{seed}", "optim.name=muonclip", seed=seed)
        runs["Muon"] = self.pretrain("opt-muon", "optim.name=muon")
        for lr in P["adamw_lrs"]:
            runs[f"AdamW lr {lr:g}"] = self.pretrain(f"opt-adamw-lr{lr:g}", "optim.name=adamw", f"optim.lr={lr}")
        short = {}
        for f in P["muon_fractions"]:
            steps = max(2, int(round(P["steps"] * f)))
            short[steps * tps] = self.pretrain(f"opt-muon-f{f:g}", "optim.name=muon", steps=steps)
        L = P["logit"]
        grow = {}
        for opt in ("muon", "muonclip"):
            grow[opt] = self.pretrain(f"opt-logit-{opt}", f"optim.name={opt}", f"optim.lr={L['lr']}",
                                      f"optim.weight_decay={L['weight_decay']}", f"optim.qk_clip_tau={L['tau']}",
                                      steps=L["steps"])

        # numbers
        final = {label: metrics(root, n)["final_val_loss"] for label, n in runs.items()}
        s0 = f"MuonClip (seed {P['seeds'][0]})"
        seeds_v = [final[f"MuonClip (seed {s})"] for s in P["seeds"]]
        self.noise_val = (max(seeds_v) - min(seeds_v)) if len(seeds_v) > 1 else None
        adamw = {lr: final[f"AdamW lr {lr:g}"] for lr in P["adamw_lrs"]}
        best_lr = min(adamw, key=adamw.get)
        L_adam = adamw[best_lr]
        budget = P["steps"] * tps
        muon_curve = val_curve(history(root, runs["Muon"]), tps)
        t_curve = tokens_to_reach(muon_curve, L_adam)
        budget_pts = [(t, metrics(root, n)["final_val_loss"]) for t, n in short.items()] + [(budget, final["Muon"])]
        t_budget, how = budget_to_reach(budget_pts, L_adam)

        # plot: validation loss vs tokens
        p = plt()
        fig, ax = p.subplots(figsize=(6.4, 4.2))
        for i, (label, n) in enumerate(runs.items()):
            c = val_curve(history(root, n), tps)
            ax.plot([t / 1e6 for t, _ in c], [v for _, v in c], marker=".", label=f"{label}: {final[label]:.3f}",
                    color=f"C{i}", ls="--" if "seed" in label and not label.endswith("seed 0)") else "-")
        for t, n in short.items():
            v = metrics(root, n)["final_val_loss"]
            ax.plot([t / 1e6], [v], marker="*", ms=12, ls="none", color="k", label=f"Muon, own schedule at {t / 1e6:.2g}M tokens: {v:.3f}")
        ax.axhline(L_adam, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("Equal budgets: validation loss vs tokens")
        lo = min(min(final.values()), L_adam)
        ax.set_ylim(lo - 0.1, lo + 1.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        sec.plots.append(save(fig, self.report_dir / "opt_val_loss.png"))

        # plot: max logit and heads clipped, with and without the clip
        hist = {opt: history(root, n) for opt, n in grow.items()}
        fig, axes = p.subplots(1, 3, figsize=(13, 3.8))
        for opt, h in hist.items():
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
        hc = hist["muonclip"]
        n_heads = self.heads(grow["muonclip"])
        frac = [r.get("heads_clipped_total", 0) / n_heads for r in hc]
        axes[1].plot([r["step"] for r in hc], frac, lw=0.6, color="C1", alpha=0.4, label="per step")
        win = max(1, len(frac) // 20)
        smooth = [sum(frac[max(0, i - win + 1): i + 1]) / len(frac[max(0, i - win + 1): i + 1]) for i in range(len(frac))]
        axes[1].plot([r["step"] for r in hc], smooth, lw=1.5, color="C1", label=f"mean over {win} steps")
        axes[1].legend(fontsize=7)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel(f"fraction of heads clipped ({n_heads} heads)")
        axes[1].set_title("QK-Clip activity")
        axes[1].set_ylim(-0.02, 1.02)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("loss (train: faint)")
        axes[2].set_title("loss with and without the clip")
        axes[2].legend(fontsize=7)
        for a in axes:
            a.grid(alpha=0.3)
        sec.plots.append(save(fig, self.report_dir / "opt_qk_clip.png"))

        # clip numbers
        m_noclip = max(r["max_logit"] for r in hist["muon"])
        m_clip = max(r["max_logit"] for r in hc)
        clipped_steps = [r["step"] for r in hc if r.get("heads_clipped_total", 0) > 0]
        last_clip = max(clipped_steps) if clipped_steps else None
        ever = sum(1 for r in hc if r.get("heads_clipped_total", 0) > 0)
        v_noclip, v_clip = metrics(root, grow["muon"])["final_val_loss"], metrics(root, grow["muonclip"])["final_val_loss"]
        main_clipped = metrics(root, runs[s0]).get("heads_clipped_total", 0)

        # text
        sec.body += [
            f"Corpus: the synthetic world ({P['world']} people) with {P['rewrites']} verified rewrites per document "
            f"(`k2 rephrase`), one shared tokenizer; model `{P['base']}` "
            f"({fmt(metrics(root, runs[s0]).get('params_total'), ',')} parameters, "
            f"{fmt(metrics(root, runs[s0]).get('params_active'), ',')} active). Every run: {P['steps']} steps x {P['batch']} x "
            f"{P['seq']} = {budget / 1e6:.2f}M tokens, warmup-stable-decay schedule, peak lr {P['lr']:g} (Muon's update is "
            "RMS-matched to AdamW's, so one lr serves both"
            + (f"; AdamW also at {', '.join(f'{x:g}' for x in P['adamw_lrs'] if x != P['lr'])}" if len(P["adamw_lrs"]) > 1 else "")
            + "), "
            f"weight decay 0.1. Seeds: MuonClip {', '.join(map(str, P['seeds']))}; every other run seed 0.",
            "",
            "| run | final validation loss | max logit at the end | heads clipped (sum over steps) |",
            "|---|---:|---:|---:|",
        ]
        for label, n in runs.items():
            m = metrics(root, n)
            sec.body.append(f"| {label} | {m['final_val_loss']:.4f} | {fmt(m.get('max_logit_final'), '.1f')} | "
                            f"{m.get('heads_clipped_total', 0)} |")
        for t, n in short.items():
            sec.body.append(f"| Muon, {t / 1e6:.2f}M tokens (own schedule) | {metrics(root, n)['final_val_loss']:.4f} | "
                            f"{fmt(metrics(root, n).get('max_logit_final'), '.1f')} | - |")
        noise_txt = (f"The two MuonClip seeds differ by {self.noise_val:.4f}: differences below {2 * self.noise_val:.4f} "
                     "(twice that spread) are called within noise below." if self.noise_val is not None
                     else "One seed only (no noise estimate at this preset).")
        sec.body += ["", noise_txt, "", f"![validation loss vs tokens]({sec.plots[0]})", ""]
        if main_clipped == 0:
            sec.body.append("In the equal-budget runs the clip never fired (max logits stay far below tau = 100), so MuonClip "
                            "and Muon apply the same update there.")
        ratio_curve = budget / t_curve if t_curve else None
        ratio_budget = budget / t_budget if t_budget and short else None
        sec.body += [
            "",
            f"**Token efficiency.** Best AdamW (lr {best_lr:g}) ends at {L_adam:.4f} after {budget / 1e6:.2f}M tokens. "
            + (f"Muon's validation curve first reaches that loss at {t_curve / 1e6:.2f}M tokens ({ratio_curve:.2f}x); "
               if t_curve else "Muon's validation curve never reaches it within the budget; ")
            + ((f"from Muon runs with their own full schedule at {', '.join(f'{t / 1e6:.2f}M' for t in short)} and "
                f"{budget / 1e6:.2f}M tokens, interpolated in log-tokens: {t_budget / 1e6:.2f}M tokens ({ratio_budget:.2f}x, {how})."
                if t_budget else f"the Muon runs at smaller budgets do not reach it ({how}).") if short
               else "(no shorter Muon runs at this preset)."),
            "The curve intercept is conservative (mid-run Muon has not had its learning-rate decay yet); the budget "
            "runs are the fair comparison (Moonlight fits separate runs per budget).",
            "",
            f"**QK-Clip in a setting where logits grow** (lr {L['lr']:g}, weight decay {L['weight_decay']:g}, "
            f"{L['steps']} steps, tau {L['tau']:g}):",
            "",
            "| run | largest max logit | final validation loss | steps with a clip | last step with a clip |",
            "|---|---:|---:|---:|---:|",
            f"| Muon (no clip) | {m_noclip:.1f} | {v_noclip:.4f} | - | - |",
            f"| MuonClip | {m_clip:.1f} | {v_clip:.4f} | {ever} of {len(hc)} | {last_clip if last_clip else '-'} |",
            "",
            "The recorded max logit is measured in the forward pass before that step's clip, so a value slightly "
            "above tau means the weights were rescaled right after.",
            "",
            f"![QK-Clip]({sec.plots[1]})",
        ]
        # summary rows
        grew = m_noclip > L["tau"]
        capped = m_clip <= 1.1 * L["tau"]
        sec.summary.append(["Muon's attention logits grow without bound; QK-Clip caps them at tau",
                            f"vanilla Muon > 1000 (9B-active MoE); MuonClip capped at tau = {PAPER['k2_tau']:g}",
                            f"Muon {m_noclip:.0f} vs MuonClip {m_clip:.1f} (tau {L['tau']:g}, lr {L['lr']:g})",
                            "reproduced" if grew and capped else ("not reproduced: logits did not grow past tau" if not grew
                                                                  else "not reproduced: not capped")])
        late = last_clip is not None and last_clip <= 0.7 * L["steps"]
        sec.summary.append(["the clip goes inactive by itself later in training",
                            "inactive after ~30% of training (12.7% of heads ever clipped)",
                            (f"last clip at step {last_clip} of {L['steps']}; clipped on {ever} of {len(hc)} steps"
                             if last_clip else "never clipped"),
                            "reproduced" if late else ("not reproduced: still clipping in the last 30% of steps"
                                                       if last_clip else "not run: clip never fired")])
        d = v_clip - v_noclip
        verdict = differs(v_clip, v_noclip, self.noise_val)
        if ever == 0:
            v_txt = "not run: the clip never fired (identical runs)"
        elif verdict is False:
            v_txt = "reproduced (within noise)"
        elif verdict:
            v_txt = "reproduced (clip better)" if d < 0 else "not reproduced (clip worse beyond noise)"
        else:
            v_txt = "reproduced (clip better; one seed)" if d <= 0 else f"unclear: clip worse by {d:.4f}, no noise estimate"
        sec.summary.append(["the clip does not hurt the loss", "negligible loss impact (tau = 30 ablation)",
                            f"val loss {v_clip:.4f} with vs {v_noclip:.4f} without ({d:+.4f})", v_txt])
        sec.summary.append(["Muon is ~2x as token-efficient as AdamW (Moonlight)", f"~{PAPER['moonlight_efficiency']:g}x",
                            "; ".join([f"{'>= ' if how == 'below smallest budget' else ''}{ratio_budget:.2f}x (budget runs)" if ratio_budget else
                                       ("budget runs: not reached" if short else ""),
                                       f"{ratio_curve:.2f}x (curve)" if ratio_curve else "curve: not reached"]).strip("; "),
                            self.efficiency_verdict(ratio_budget or ratio_curve, final["Muon"], L_adam)])
        sec.summary.append(["equal budgets: MuonClip / Muon / AdamW validation loss", "MuonClip <= Muon < AdamW",
                            f"MuonClip {final[s0]:.4f}, Muon {final['Muon']:.4f}, AdamW {L_adam:.4f}",
                            ("Muon family better than AdamW" + (" (within noise)" if differs(final["Muon"], L_adam, self.noise_val) is False else ""))
                            if min(final[s0], final["Muon"]) < L_adam else "not reproduced: AdamW better"])

    def efficiency_verdict(self, ratio, muon_loss, adam_loss) -> str:
        if ratio is None:
            return "not reproduced: Muon did not reach AdamW's loss"
        if differs(muon_loss, adam_loss, self.noise_val) is False:
            return f"within noise: {ratio:.2f}x, but the final losses differ by less than the seed spread"
        if ratio >= 1.5:
            return "reproduced"
        if ratio > 1.0:
            return f"partly: Muon ahead, by less than 2x ({ratio:.2f}x)"
        return "not reproduced"

    def heads(self, name: str) -> int:
        cfg = json.loads((art_dir(self.root, name) / "model.json").read_text())
        cfg = cfg.get("config", cfg)
        return cfg["num_hidden_layers"] * cfg["num_attention_heads"]

    # ------------------------------------------------------------------ experiment 2
    def exp_rephrasing(self, sec: Section):
        P, K, root, k2 = self.P, self.P["kn"], self.root, self.k2
        # the world, biographies only (no math documents): pre-training is all biographies
        k2("data", "synth", "--recipe", self.recipe("synth"), "--set", f"world.size={K['world']}", "--set", "math.count=0",
           "--out", "kn-synth")
        k2("rephrase", "kn-synth:latest", "--recipe", self.recipe("rephrase"), "--set", "rewrite.rewrites=1",
           "--set", "rewrite.keep_original=false", "--out", "kn-rw1")
        k2("rephrase", "kn-synth:latest", "--recipe", self.recipe("rephrase"), "--set", "rewrite.rewrites=10",
           "--set", "rewrite.keep_original=false", "--out", "kn-rw10")
        k2("tokenizer", "train", "kn-rw10:latest", "--vocab-size", P["vocab"], "--out", "kn-tokenizer")
        corpora = {"raw": "kn-synth", "rw1": "kn-rw1", "rw10": "kn-rw10"}
        tokens = {k: corpus_tokens(root, d, "kn-tokenizer") for k, d in corpora.items()}
        # equal tokens: one epoch of the 10-rewrite corpus (= 10 epochs of the 1-rewrite corpus) x epoch_scale
        tps = K["batch"] * K["seq"]
        steps = max(2, math.ceil(K["epoch_scale"] * tokens["rw10"] / tps))
        budget = steps * tps
        labels = {"raw": f"raw x {10 * K['epoch_scale']} epochs", "rw1": f"1 rewrite x {10 * K['epoch_scale']} epochs",
                  "rw10": f"10 rewrites x {K['epoch_scale']} epoch{'s' if K['epoch_scale'] > 1 else ''}"}
        warm = max(1, min(20, steps // 10))
        for k, d in corpora.items():
            args = ["pretrain", f"{d}:latest", "--recipe", self.recipe("pretrain")]
            for s in ("tokenizer.ref=kn-tokenizer:latest", "data.val_fraction=0", f"train.steps={steps}",
                      f"train.batch_size={K['batch']}", f"train.seq_len={K['seq']}", "train.eval_every=0",
                      f"schedule.warmup_steps={warm}", f"optim.lr={P['lr']}"):
                args += ["--set", s]
            k2(*args, "--out", f"kn-pt-{k}")
        for k in corpora:
            args = ["sft", f"kn-pt-{k}:latest", "--recipe", self.recipe("sft")]
            for s in ("data.agentic=", "data.mix.agentic=0", "data.mix.math=0", "data.mix.qa=1", "data.mix.corpus=0",
                      f"train.steps={K['sft_steps']}",
                      f"train.batch_size={K['batch']}", f"train.seq_len={K['seq']}", f"train.eval_every={K['sft_steps']}",
                      f"schedule.warmup_steps={max(1, K['sft_steps'] // 10)}"):
                args += ["--set", s]
            k2(*args, "--out", f"kn-sft-{k}")
        ev = ["--suite", "knowledge", "--recipe", self.recipe("eval"), "--set", f"eval.max_examples={K['eval_examples']}",
              "--set", f"eval.max_new_tokens={K['max_new_tokens']}"]
        lab = [x for k in corpora for x in ("--label", k)]
        k2("eval", *[f"kn-sft-{k}:latest" for k in corpora], *lab, *ev, "--out", "kn-eval-sft")
        k2("eval", *[f"kn-pt-{k}:latest" for k in corpora], *lab, *ev, "--out", "kn-eval-base")

        sft = eval_results(root, "kn-eval-sft")
        base = eval_results(root, "kn-eval-base")
        acc = {k: sft[k]["knowledge"]["accuracy"] for k in corpora}
        acc_train = {k: sft[k]["knowledge"].get("accuracy_qa_train_people") for k in corpora}
        cloze = {k: base[k]["knowledge"]["accuracy"] for k in corpora}
        n_test = self.qa_count("kn-synth", "qa_test", K["eval_examples"])
        se = {k: binom_se(acc[k], n_test) for k in corpora}

        p = plt()
        fig, axes = p.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
        x = range(3)
        ks = list(corpora)
        w = 0.27
        axes[0].bar([i - w for i in x], [100 * acc[k] for k in ks], w, yerr=[200 * se[k] for k in ks], capsize=3,
                    label="held-out people, QA after SFT")
        axes[0].bar(list(x), [100 * (acc_train[k] or 0) for k in ks], w, label="QA-train people (SFT data)")
        axes[0].bar([i + w for i in x], [100 * cloze[k] for k in ks], w, label="held-out people, base model cloze")
        axes[0].set_xticks(list(x), [labels[k] for k in ks], fontsize=8)
        axes[0].set_ylabel("accuracy (%)")
        top = max([acc[k] + 2 * se[k] for k in ks] + [acc_train[k] or 0 for k in ks] + [cloze[k] for k in ks])
        axes[0].set_ylim(0, max(10, 110 * top))
        axes[0].set_title(f"Measured ({budget / 1e6:.2f}M tokens each; error bars 2 s.e.)", fontsize=9)
        axes[0].legend(fontsize=7)
        axes[1].bar(list(x), [PAPER["table1"][k] for k in ks], color="gray")
        axes[1].set_xticks(list(x), ["raw x 10", "1 rw x 10", "10 rw x 1"], fontsize=8)
        axes[1].set_title("K2 Table 1 (SimpleQA, %)", fontsize=9)
        for a in axes:
            a.grid(alpha=0.3, axis="y")
        sec.plots.append(save(fig, self.report_dir / "rephrasing.png"))

        sec.body += [
            f"Physics of Language Models 3.1's protocol on the synthetic world: {K['world']} people, one permuted biography "
            "each (no math documents), QA split by person (half the people in `qa_train/`, the other half held out). "
            "Pre-train on all biographies (no validation hold-out) from three corpora, then QA-fine-tune each model on the "
            "QA-train half with `k2 sft` (QA only), and ask the held-out half with `k2 eval --suite knowledge` "
            "(greedy, exact match; chat prompts for the fine-tuned models, cloze prompts for the base models).",
            "",
            f"Equal tokens: every run trains {steps} steps x {K['batch']} x {K['seq']} = {budget:,} tokens, one pass over the "
            f"10-rewrite corpus{' times ' + str(K['epoch_scale']) if K['epoch_scale'] > 1 else ''}. Rewrites are longer than "
            "the templated originals, so the raw corpus is seen more often than 10 times (more exposures of the same facts: "
            "the comparison favours raw text, if anything)."
            + (f" K2's 10 / 10 / 1 epochs are scaled by {K['epoch_scale']} here: at 1 the tiny model memorises too little to "
               "answer anything." if K["epoch_scale"] > 1 else ""),
            "",
            "| corpus | corpus tokens | epochs seen | held-out QA (SFT) | 2 s.e. | QA-train people | base-model cloze (held-out) | K2 Table 1 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k in ks:
            sec.body.append(f"| {labels[k]} | {tokens[k]:,} | {budget / tokens[k]:.1f} | {100 * acc[k]:.1f}% | "
                            f"{200 * se[k]:.1f} | {fmt(acc_train[k] and 100 * acc_train[k], '.1f')}% | "
                            f"{100 * cloze[k]:.1f}% | {PAPER['table1'][k]:.2f} |")
        per_attr = sorted({a for k in ks for a in sft[k]["knowledge"] if a.startswith("accuracy_") and a != "accuracy_qa_train_people"})
        if per_attr:
            sec.body += ["", "Held-out accuracy by attribute (SFT models):", "",
                         "| attribute | " + " | ".join(labels[k] for k in ks) + " |", "|---|" + "---:|" * len(ks)]
            for a in per_attr:
                sec.body.append(f"| {a.removeprefix('accuracy_')} | " + " | ".join(f"{100 * sft[k]['knowledge'].get(a, 0):.0f}%" for k in ks) + " |")
        sec.body += ["", f"{n_test} held-out questions per model (binomial standard errors).", "",
                     f"![rephrasing]({sec.plots[0]})"]

        def cmp(a, b):
            noise = math.sqrt(se[a] ** 2 + se[b] ** 2)
            return differs(acc[a], acc[b], noise)

        up1, up2 = acc["rw1"] > acc["raw"], acc["rw10"] > acc["rw1"]
        sig1, sig2 = cmp("rw1", "raw"), cmp("rw10", "rw1")
        measured = " / ".join(f"{100 * acc[k]:.1f}" for k in ks)
        if up1 and up2 and sig1 and sig2:
            verdict = "reproduced"
        elif acc["rw10"] > acc["raw"] and cmp("rw10", "raw"):
            verdict = "partly: 10 rewrites beat raw beyond noise" + ("" if sig1 and sig2 and up1 and up2 else "; the middle step is within noise or reversed")
        elif max(acc.values()) < 0.02:
            verdict = "not reproduced: all at the floor at this scale"
        else:
            verdict = "not reproduced (differences within noise)" if not (cmp("rw10", "raw")) else "not reproduced: reversed"
        sec.summary.append(["rephrasing beats repeating: raw x10 < 1 rewrite x10 < 10 rewrites x1 (held-out QA, %)",
                            " / ".join(f"{PAPER['table1'][k]:.2f}" for k in ks), measured, verdict])
        sec.summary.append(["diverse text makes knowledge extractable (PLM 3.1 bioS, held-out QA, %)",
                            f"{PAPER['bios']['none']:g} (1 bio) vs {PAPER['bios']['multi5_permute_fullname']:g} (multi5+permute+fullname)",
                            f"{100 * acc['raw']:.1f} (raw) vs {100 * acc['rw10']:.1f} (10 rewrites)",
                            "reproduced (direction)" if acc["rw10"] > acc["raw"] and cmp("rw10", "raw") else
                            ("within noise" if not cmp("rw10", "raw") else "not reproduced")])

    def qa_count(self, dataset: str, split: str, cap: int) -> int:
        import datasets

        return min(cap, len(datasets.load_from_disk(str(art_dir(self.root, dataset) / split))))

    # ------------------------------------------------------------------ experiment 3
    def exp_sparsity(self, sec: Section):
        P, root = self.P, self.root
        self.base_data()
        k = P["experts_per_tok"]
        runs = {}
        for E in P["experts"]:
            if E == self.default_experts() and k == self.default_k():
                # the recipe's own shape: the very run of experiment 1 (reused, not trained twice)
                runs[E] = self.pretrain(f"opt-muonclip-s{P['seeds'][0]}", "optim.name=muonclip", seed=P["seeds"][0])
            else:
                runs[E] = self.pretrain(f"sparsity-e{E}", "optim.name=muonclip", f"model.n_routed_experts={E}",
                                        f"model.num_experts_per_tok={k}")
        rows = []
        for E, n in runs.items():
            m = metrics(root, n)
            rows.append((E / k, E, m["final_val_loss"], m["params_total"], m["params_active"], self.wall(n)))
        p = plt()
        fig, ax = p.subplots(figsize=(5.6, 3.8))
        ax.plot([r[0] for r in rows], [r[2] for r in rows], marker="o")
        if self.noise_val is not None:
            ax.errorbar([r[0] for r in rows], [r[2] for r in rows], yerr=self.noise_val, fmt="none", capsize=3, color="C0")
        ax.set_xscale("log", base=2)
        ax.set_xticks([r[0] for r in rows], [f"{r[0]:g}\n({r[1]} experts)" for r in rows], fontsize=8)
        ax.set_xlabel("sparsity = total experts / active experts")
        ax.set_ylabel("final validation loss")
        ax.set_title(f"Fixed active parameters and tokens ({P['steps'] * P['batch'] * P['seq'] / 1e6:.2f}M)", fontsize=9)
        ax.grid(alpha=0.3)
        sec.plots.append(save(fig, self.report_dir / "sparsity.png"))
        sec.body += [
            f"The model `{P['base']}` with {k} routed experts active per token (plus 1 shared), the number of routed experts "
            f"varied; every run trains on the same {P['steps'] * P['batch'] * P['seq']:,} tokens of the experiment-1 corpus with "
            f"MuonClip, seed {P['seeds'][0]}.",
            "",
            "| sparsity | routed experts | total parameters | active parameters | final validation loss | wall s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for s, E, v, tot, act, w in rows:
            sec.body.append(f"| {s:g} | {E} | {tot:,} | {act:,} | {v:.4f} | {fmt(w, '.0f')} |")
        noise = (f"Noise floor (seed spread of experiment 1): {self.noise_val:.4f}." if self.noise_val is not None else
                 "One seed (no noise estimate at this preset).")
        sec.body += ["", noise, "", f"![sparsity]({sec.plots[0]})"]
        losses = [r[2] for r in rows]
        mono = all(b < a for a, b in zip(losses, losses[1:]))
        gain = losses[0] - losses[-1]
        sig = differs(losses[0], losses[-1], self.noise_val)
        if mono and sig is not False:
            verdict = "reproduced" if sig else "direction reproduced (no noise estimate)"
        elif gain > 0 and sig:
            verdict = "partly: highest sparsity beats lowest beyond noise, not monotone"
        elif sig is False:
            verdict = "within noise"
        else:
            verdict = "not reproduced"
        sec.summary.append(["higher sparsity (more experts, same active) gives lower loss",
                            "monotone; sparsity 48 needs 1.69x / 1.39x / 1.15x fewer FLOPs than 8 / 16 / 32",
                            ", ".join(f"{r[0]:g}: {r[2]:.3f}" for r in rows), verdict])

    def default_experts(self) -> int:
        return {"micro": 4, "tiny": 8, "small": 32}.get(self.P["base"], -1)

    def default_k(self) -> int:
        return {"micro": 2, "tiny": 2, "small": 4}.get(self.P["base"], -1)

    def wall(self, name: str):
        return metrics(self.root, name).get("wall_s")

    # ------------------------------------------------------------------ experiment 4
    def exp_context(self, sec: Section):
        P, X, root = self.P, self.P["ext"], self.root
        self.base_data()
        seed = P["seeds"][0]

        def midtrain(base: str, out: str) -> str:
            """Mid-training, as `make demo` does: the model learns to look things up within its own context."""
            self.k2("pretrain", "--recipe", self.recipe("midtrain"), "--set", f"init={base}:latest",
                    "--set", "data.input=data-rephrase:latest", "--out", out)
            return out

        def extend(parent: str, method: str, out: str) -> str:
            args = ["extend-context", f"{parent}:latest", "--recipe", self.recipe("extend_context")]
            for s in (f"extend.method={method}", f"extend.factor={X['factor']}", f"train.steps={X['steps']}",
                      f"train.batch_size={X['batch']}", f"train.seq_len={X['seq']}", f"train.eval_every={X['steps']}",
                      f"eval.passkey_trials={X['trials']}", f"eval.passkey_lengths={json.dumps(X['lengths'])}",
                      f"eval.passkey_depths={json.dumps(X['depths'])}", f"eval_parent={'true' if method == 'yarn' else 'false'}",
                      f"schedule.warmup_steps={max(1, X['steps'] // 10)}"):
                args += ["--set", s]
            self.k2(*args, "--out", out)
            return out

        # the parent: MuonClip pre-trained with the recipe's own batch (the demo's; experiment 1 uses P["batch"])
        exp1 = self.pretrain(f"opt-muonclip-s{seed}", "optim.name=muonclip", seed=seed)
        base = exp1 if X["parent_batch"] == P["batch"] else self.pretrain(
            f"ext-pretrain-b{X['parent_batch']}", "optim.name=muonclip", f"train.batch_size={X['parent_batch']}", seed=seed)
        parent = midtrain(base, "ext-midtrain")
        names = {method: extend(parent, method, f"ext-{method}") for method in ("none", "linear", "yarn")}
        # and experiment 1's model (fewer pre-training tokens) through the same mid-training and YaRN extension
        weak = extend(midtrain(exp1, "ext-midtrain-exp1"), "yarn", "ext-yarn-exp1") if base != exp1 else None
        m = {k: metrics(root, n) for k, n in names.items()}
        orig = m["yarn"]["original_context"]
        lengths = sorted({int(k.rsplit("_", 1)[1]) for k in m["yarn"] if k.startswith("passkey_accuracy_") and k.rsplit("_", 1)[1].isdigit()})
        curves = {"mid-trained parent, no extension": [m["yarn"].get(f"parent_passkey_accuracy_{L}") for L in lengths]}
        label = {"none": "none (positions raised, no scaling)", "linear": "linear interpolation", "yarn": "YaRN"}
        for k in names:
            curves[label[k]] = [m[k].get(f"passkey_accuracy_{L}") for L in lengths]
        n = m["yarn"].get("passkey_trials_per_length") or X["trials"] * len(X["depths"])
        p = plt()
        fig, ax = p.subplots(figsize=(6, 3.8))
        for i, (lab, ys) in enumerate(curves.items()):
            ax.plot(lengths, [None if y is None else 100 * y for y in ys], marker="o", label=lab, color=f"C{i}",
                    ls=":" if "parent" in lab else "-")
        ax.axvline(orig, color="gray", ls="--", lw=0.8)
        ax.axvline(X["seq"], color="gray", ls=":", lw=0.8)
        ax.text(orig, 103, " original context", fontsize=7)
        ax.text(X["seq"], 96, " trained length", fontsize=7)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("passkey accuracy (%)")
        ax.set_ylim(-3, 108)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        sec.plots.append(save(fig, self.report_dir / "passkey.png"))
        sec.body += [
            (f"Experiment 1's MuonClip model (context {orig}; {P['steps']} x {P['batch']} x {P['seq']} tokens)" if base == exp1 else
             f"A MuonClip model (context {orig}) pre-trained like experiment 1's but with {X['parent_batch']} rows per step "
             f"({P['steps']} x {X['parent_batch']} x {P['seq']} tokens, the `{P['base']}` recipe's own batch; experiment 1 "
             f"uses {P['batch']})") + ", mid-trained at its own length on lookup rows "
            f"(`{self.recipe('midtrain')}`: {metrics(root, parent).get('steps')} steps; the \"mid-trained parent\" row), then "
            f"extended {X['factor']:g}x with each RoPE method (YaRN with the recipe's beta_fast "
            f"{recipe_value(root, names['yarn'], 'extend.beta_fast')}, beta_slow {recipe_value(root, names['yarn'], 'extend.beta_slow')}), trained "
            f"{X['steps']} steps x {X['batch']} x {X['seq']} tokens on the `k2 extend-context` mix (corpus, retrieval, needle "
            f"and copy rows, none with the passkey wording), then the passkey test (YaRN repository protocol): "
            f"{n} trials per length ({X['trials']} per depth x {len(X['depths'])} depths).",
            "",
            f"Passkey accuracy by prompt length, then held-out loss by position (`passkey` suite, loss by position on "
            f"{max(lengths)}-token sequences of held-out documents): within the original {orig} positions, past them, "
            f"and in the last sixteenth of the sequence.",
            "",
            "| method | " + " | ".join(f"{L}" for L in lengths) + " | val loss at train length | loss within | loss past "
            f"{orig} | loss, last bin |",
            "|---|" + "---:|" * (len(lengths) + 4),
        ]

        def pos_loss(lab: str, which: str):
            k = next((k for k, v in label.items() if v == lab), None)
            return m[k].get(f"passkey_loss_{which}") if k else m["yarn"].get(f"parent_passkey_loss_{which}")

        for lab, ys in curves.items():
            k = next((k for k, v in label.items() if v == lab), None)
            vl = fmt(m[k].get("final_val_loss"), ".3f") if k else "-"
            sec.body.append(f"| {lab} | " + " | ".join(fmt(y and 100 * y, '.0f') + "%" if y is not None else "-" for y in ys)
                            + f" | {vl} | " + " | ".join(fmt(pos_loss(lab, w), ".3f") for w in ("within", "beyond", "last_bin")) + " |")
        if weak:
            w = metrics(root, weak)
            acc = lambda pre: ", ".join(f"{L}: {fmt(w.get(f'{pre}passkey_accuracy_{L}') and 100 * w[f'{pre}passkey_accuracy_{L}'], '.0f')}%"
                                        for L in lengths)
            sec.body += ["", f"Experiment 1's MuonClip model ({P['steps']} x {P['batch']} x {P['seq']} tokens), "
                         f"through the same mid-training and YaRN extension: mid-trained {acc('parent_')}; extended {acc('')}."]
        sec.body += ["", f"2 s.e. of one cell is up to {200 * binom_se(0.5, n):.0f} points at {n} trials. Losses are one "
                     f"run per method (no seed spread measured here; experiment 1's seed-to-seed spread of the validation "
                     f"loss is the nearest noise estimate).", "",
                     f"![passkey]({sec.plots[0]})"]
        for method in names:
            img = art_dir(root, names[method]) / "passkey.png"
            if img.exists() and method == "yarn":
                shutil.copy2(img, self.report_dir / "passkey_heatmap.png")
                sec.plots.append("passkey_heatmap.png")
                sec.body += ["", "Depth x length for the parent and YaRN (from the `ext-yarn` artifact):", "",
                             "![passkey heat-map](passkey_heatmap.png)"]
        beyond = [L for L in lengths if L > X["seq"]]

        def mean(k, Ls):
            vs = [m[k].get(f"passkey_accuracy_{L}") for L in Ls]
            vs = [v for v in vs if v is not None]
            return sum(vs) / len(vs) if vs else None

        y_b, l_b, n_b = (mean(k, beyond) for k in ("yarn", "linear", "none"))
        within = [L for L in lengths if L <= orig]
        if y_b is None:
            verdict = "not measured beyond the training length"
        else:
            se_b = binom_se(0.5, n * max(1, len(beyond)))
            best_other = max(v for v in (l_b, n_b) if v is not None)
            verdict = ("reproduced" if y_b - best_other > 2 * math.sqrt(2) * se_b else
                       ("within noise" if abs(y_b - best_other) <= 2 * math.sqrt(2) * se_b else "not reproduced"))
            if max(y_b, best_other) < 0.05:
                verdict = "not reproduced: no method retrieves beyond the trained length at this scale"
                if max((mean(k, lengths) or 0) for k in names) < 0.05:
                    verdict = "not reproduced: no method learned to retrieve from this parent (0% at every length)"
        sec.summary.append(["YaRN extends the context better than linear interpolation or none (passkey)",
                            "K2: 4K -> 32K -> 128K with YaRN (no passkey figure in the report)",
                            f"beyond the trained length ({', '.join(map(str, beyond))}): YaRN {fmt(y_b and 100 * y_b, '.0f')}%, "
                            f"linear {fmt(l_b and 100 * l_b, '.0f')}%, none {fmt(n_b and 100 * n_b, '.0f')}%; "
                            f"within {orig}: YaRN {fmt(mean('yarn', within) and 100 * mean('yarn', within), '.0f')}%",
                            verdict])
        last = {k: m[k].get("passkey_loss_last_bin") for k in names}
        within_y = m["yarn"].get("passkey_loss_within")
        if None in last.values() or within_y is None:
            verdict = "not measured (no loss by position in the artifacts)"
        elif last["yarn"] < min(last["linear"], last["none"]):
            verdict = (f"reproduced (one run each): YaRN's last-bin loss is {last['yarn'] - within_y:+.3f} from its loss "
                       f"within {orig}")
        else:
            verdict = "not reproduced"
        sec.summary.append([f"YaRN keeps held-out loss flat past the original context ({orig} -> {max(lengths)} positions, "
                            f"trained at {X['seq']})",
                            "YaRN paper: perplexity stays low up to the extended context; plain RoPE blows up past its trained length",
                            f"loss in the last bin: YaRN {fmt(last['yarn'], '.3f')}, linear {fmt(last['linear'], '.3f')}, "
                            f"none {fmt(last['none'], '.3f')}, unextended parent "
                            f"{fmt(m['yarn'].get('parent_passkey_loss_last_bin'), '.3f')}", verdict])

    # ------------------------------------------------------------------ experiment 5
    def exp_rl(self, sec: Section):
        P, R, root, k2 = self.P, self.P["rl"], self.root, self.k2
        recipe = REPO / self.recipe("rl")
        if not self.k2.available("rl"):
            sec.status = "skipped"
            sec.body.append("not run: k2 rl not available in this build")
            sec.summary.append(["K1.5 objective beats plain policy gradient (held-out reward); critic refinement helps",
                                "K1.5 / K2 section 3.2", "-", "not run: k2 rl not available"])
            return
        if not recipe.exists():
            sec.status = "skipped"
            sec.body.append(f"not run: k2 rl exists but has no recipe {self.recipe('rl')} yet")
            sec.summary.append(["K1.5 objective beats plain policy gradient (held-out reward); critic refinement helps",
                                "K1.5 / K2 section 3.2", "-", f"not run: no {self.recipe('rl')}"])
            return
        self.base_data()
        parent = self.pretrain(f"opt-muonclip-s{P['seeds'][0]}", "optim.name=muonclip", seed=P["seeds"][0])
        k2("agentic", "data-synth:latest", "--recipe", self.recipe("agentic"), "--out", "rl-agentic")
        args = ["sft", f"{parent}:latest", "--recipe", self.recipe("sft")]
        for s in ("data.agentic=rl-agentic:latest", f"train.steps={R['sft_steps']}", f"train.seq_len={P['seq']}",
                  f"train.eval_every={R['sft_steps']}"):
            args += ["--set", s]
        k2(*args, "--out", "rl-sft")
        runs = {"K1.5 objective": ("rl-k15", ["rl.loss=k15"]), "plain policy gradient": ("rl-pg", ["rl.loss=pg"]),
                "K1.5, no critic refinement": ("rl-k15-nocritic", ["rl.loss=k15", "critic.weight=0"])}
        for label, (name, sets) in runs.items():
            args = ["rl", "rl-sft:latest", "--recipe", self.recipe("rl"), "--set", f"train.steps={R['steps']}",
                    "--set", f"train.seq_len={P['seq']}"]  # the SFT parent keeps the pretrain context
            for s in sets:
                args += ["--set", s]
            k2(*args, "--out", name)
        m = {label: metrics(root, name) for label, (name, _) in runs.items()}
        envs = sorted({k.removeprefix("start_") for v in m.values() for k in v if k.startswith("start_heldout_")})
        p = plt()
        fig, axes = p.subplots(1, 2, figsize=(11, 3.8))
        for i, (label, (name, _)) in enumerate(runs.items()):
            h = [r for r in history(root, name) if any(k.startswith("heldout_") for k in r)]
            start = m[label]  # the starting model's numbers are step 0
            for j, env in enumerate(envs):
                ys = [(0, start.get("start_" + env))] + [(r["step"], r[env]) for r in h if env in r]
                ys = [(x, y) for x, y in ys if y is not None]
                if ys:
                    axes[0].plot([s for s, _ in ys], [y for _, y in ys], marker=".", color=f"C{i}",
                                 ls=["-", "--", ":", "-."][j % 4], label=f"{label}: {env.removeprefix('heldout_')}")
            c = [(0, start.get("critic_accuracy_start"))] + [(r["step"], r["critic_accuracy"]) for r in history(root, name)
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
        sec.plots.append(save(fig, self.report_dir / "rl.png"))
        sec.body += [f"The experiment-1 MuonClip model, SFT ({R['sft_steps']} steps: agentic, QA, math), then `k2 rl` for "
                     f"{R['steps']} steps with each objective (seed 0).", "",
                     "| run | " + " | ".join(f"{e.removeprefix('heldout_')} start -> end" for e in envs) + " | critic accuracy start -> end |",
                     "|---|" + "---:|" * (len(envs) + 1)]
        for label, v in m.items():
            sec.body.append(f"| {label} | " + " | ".join(f"{fmt(v.get('start_' + e))} -> {fmt(v.get('end_' + e))}" for e in envs)
                            + f" | {fmt(v.get('critic_accuracy_start'))} -> {fmt(v.get('critic_accuracy_end'))} |")
        sec.body += ["", f"![rl]({sec.plots[0]})"]

        def gain(label):
            v = m[label]
            g = [v.get("end_" + e) - v.get("start_" + e) for e in envs if v.get("end_" + e) is not None and v.get("start_" + e) is not None]
            return sum(g) / len(g) if g else None

        gk, gp = gain("K1.5 objective"), gain("plain policy gradient")
        n_eval = manifest(root, "rl-k15").get("recipe", {}).get("rl", {}).get("eval_prompts", 0) * max(1, len(envs))
        se_r = math.sqrt(2) * binom_se(0.5, n_eval)  # a difference of two held-out means, rewards in [0, 1]
        sec.summary.append(["K1.5's objective improves held-out reward more than plain policy gradient",
                            "K1.5 / K2 RL (no side-by-side figure)",
                            f"mean held-out gain K1.5 {fmt(gk)} vs PG {fmt(gp)} ({n_eval} held-out episodes each)",
                            self.verdict(gk, gp, se_r)])
        ca, cb = m["K1.5 objective"].get("critic_accuracy_end"), m["K1.5, no critic refinement"].get("critic_accuracy_end")
        n_pairs = m["K1.5 objective"].get("critic_heldout_pairs") or 0
        sec.summary.append(["refining the critic on verifiable pairs makes it more accurate", "K2 section 3.2.2 (closed loop)",
                            f"critic accuracy {fmt(ca)} with vs {fmt(cb)} without ({n_pairs} held-out pairs)",
                            self.verdict(ca, cb, math.sqrt(2) * binom_se(0.5, n_pairs))])

    @staticmethod
    def verdict(a, b, noise) -> str:
        """Claim: a > b."""
        if a is None or b is None:
            return "not measured"
        if differs(a, b, noise) is False:
            return f"within noise (2 s.e. = {2 * noise:.3f})"
        return "reproduced" if a > b else "not reproduced (reversed beyond noise)"


EXPERIMENTS = [
    ("1", "optimizers", "MuonClip vs Muon vs AdamW", Repro.exp_optimizers),
    ("2", "rephrasing", "Rephrasing vs epochs (knowledge)", Repro.exp_rephrasing),
    ("3", "sparsity", "Sparsity at fixed active parameters", Repro.exp_sparsity),
    ("4", "context", "Context extension: none / linear / YaRN", Repro.exp_context),
    ("5", "rl", "RL: K1.5 vs policy gradient; critic refinement", Repro.exp_rl),
]

# ----------------------------------------------------------------------------- 4. the report


def machine_line() -> str:
    """Where the numbers were measured: CPU model and cores, and the commit of the code that ran."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return f"Machine: {cpu}, {os.cpu_count()} cores" + (f"; code at commit `{commit}`" if commit else "") + "."


def render(preset: str, P: dict, sections: list[Section], k2: K2, wall_s: float, report_dir: Path) -> str:
    rows = [r for s in sections for r in s.summary]
    out = [
        "# K2's claims, re-measured at small scale",
        "",
        f"`make reproduce` (preset **{preset}**: recipes `recipes/{P['base']}/*.toml` plus `--set` overrides) ran every "
        "experiment below through the ordinary `k2` command line; every number is read back from the artifacts those "
        "commands wrote. Seeds are stated per experiment; most results are one run, so read small differences with the "
        "noise estimates given.",
        "",
        f"This invocation: {wall_s / 60:.1f} min wall time"
        + f"; compute that made the artifacts: {sum(v['wall_s'] for v in k2.ledger.values() if v['status'] == 'ran') / 60:.1f} min "
          "(steps that were up to date cost nothing). " + machine_line(),
        "",
        "## Summary",
        "",
        "| # | claim | paper | measured here | verdict |",
        "|---|---|---|---|---|",
    ]
    num = {s.key: n for n, s in zip("12345", sections)}
    for s in sections:
        for r in s.summary:
            out.append(f"| {num.get(s.key, '')} | " + " | ".join(c.replace("|", "/") for c in r) + " |")
    if not rows:
        out.append("| | (no experiment ran) | | | |")
    out += ["", "Wall time per experiment:", "", "| experiment | status | this invocation | compute that made its artifacts |",
            "|---|---|---:|---:|"]
    for n, s in zip("12345", sections):
        made = sum(v["wall_s"] for v in k2.ledger.values() if v.get("exp") == s.key and v["status"] == "ran")
        out.append(f"| {n}. {s.title} | {s.status} | {s.wall_s / 60:.1f} min | {made / 60:.1f} min |")
    out += ["", "Verdicts: *reproduced* (the direction and, where a noise estimate exists, beyond twice it), *within noise*, "
            "*partly*, *not reproduced* (measured numbers given), *not run*.", ""]
    for n, s in zip("12345", sections):
        out += [f"## {n}. {s.title}", ""]
        if s.status == "failed":
            out.append("**failed** — see the error below; the rest of the report is unaffected.")
            out.append("")
        out += s.body + [""]
        cmds = k2.commands.get(s.key, [])
        if cmds:
            total = sum(k2.ledger.get(c, {}).get("wall_s", 0) for c in dict.fromkeys(cmds) if k2.ledger.get(c, {}).get("exp") == s.key)
            out += [f"<details><summary>commands ({len(dict.fromkeys(cmds))}; {total / 60:.1f} min of compute made here, "
                    "the rest shared with earlier experiments)</summary>", "",
                    "```bash", f"ROOT={k2.root.relative_to(REPO) if k2.root.is_relative_to(REPO) else k2.root}"]
            for c in dict.fromkeys(cmds):
                led = k2.ledger.get(c, {})
                note = f", made by experiment {led['exp']}" if led.get("exp") not in (None, s.key) else ""
                out.append(f"{c}    # {led.get('status', '?')}, {led.get('wall_s', 0):.0f} s{note}")
            out += ["```", "", "</details>", ""]
    out += ["## Notes", "",
            "- Scale: these are models of about 10^6 parameters trained on about 10^6 tokens; the paper's claims are about "
            "10^12-parameter models on 10^13 tokens. A claim that does not reproduce here is reported as such, with the numbers.",
            "- Re-running `make reproduce` reuses every artifact whose recipe and inputs are unchanged (`k2 --reuse`) and "
            "resumes an interrupted training run from its last checkpoint.",
            f"- Artifacts: `{k2.root.relative_to(REPO) if k2.root.is_relative_to(REPO) else k2.root}` "
            "(`k2 --root DIR artifacts list` shows them; `k2 artifacts show REF` walks the lineage).", ""]
    text = "\n".join(out)
    (report_dir / "REPORT.md").write_text(text)
    return text


def summary_table(sections: list[Section]) -> str:
    lines = ["| # | claim | paper | measured | verdict |", "|---|---|---|---|---|"]
    for n, s in zip("12345", sections):
        for r in s.summary:
            lines.append(f"| {n} | " + " | ".join(c.replace("|", "/") for c in r) + " |")
    return "\n".join(lines)


def main(argv=None, runner=K2) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["cpu", "gpu"], default="cpu", help="experiment sizes (default: cpu)")
    ap.add_argument("--quick", action="store_true", help="micro scale, a few minutes: a smoke test of the whole driver")
    ap.add_argument("--only", default="", help="comma-separated experiment numbers or names (default: all)")
    ap.add_argument("--root", default=None, help="artifacts root (default: reproduce/artifacts/<preset>)")
    ap.add_argument("--render-only", action="store_true", help="run nothing; re-render the report from existing artifacts")
    ap.add_argument("--report-dir", default=None, help="where REPORT.md and the PNGs go (default: reproduce/; --quick: the root)")
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    P = PRESETS[preset]
    root = Path(args.root).resolve() if args.root else HERE / "artifacts" / preset
    report_dir = Path(args.report_dir).resolve() if args.report_dir else (root / "report" if args.quick else HERE)
    report_dir.mkdir(parents=True, exist_ok=True)
    k2 = runner(root=root, exe=k2_executable(), render_only=args.render_only)
    repro = Repro(preset, P, root, report_dir, k2)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    t_start = time.time()
    sections, failed = [], 0
    for num, key, title, fn in EXPERIMENTS:
        sec = Section(key, title)
        sections.append(sec)
        if only and num not in only and key not in only:
            sec.status = "skipped"
            sec.body.append("not run in this invocation (`--only`).")
            continue
        k2.exp = key
        print(f"== experiment {num}: {title}", flush=True)
        t0 = time.time()
        try:
            fn(repro, sec)
        except Exception as e:  # one experiment failing leaves the others and the report intact
            failed += 1
            sec.status = "failed"
            msg = str(e) if isinstance(e, StepFailed) else traceback.format_exc()
            sec.body += ["```", msg.strip()[-3000:], "```"]
            sec.summary.append([title, "-", "-", "failed (see section)"])
            print(f"!! experiment {num} failed: {msg.strip().splitlines()[0]}", flush=True)
        sec.wall_s = time.time() - t0
        print(f"== experiment {num}: {sec.status} in {sec.wall_s / 60:.1f} min", flush=True)
    render(preset, P, sections, k2, time.time() - t_start, report_dir)
    print(f"\nwrote {report_dir / 'REPORT.md'} in {(time.time() - t_start) / 60:.1f} min\n")
    print(summary_table(sections))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
