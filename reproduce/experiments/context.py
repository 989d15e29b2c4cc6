"""Experiment 4: context extension with no RoPE scaling, linear interpolation, or YaRN (K2 section 2.4).

Claims: YaRN extends the context better than linear interpolation or none (passkey retrieval past the trained
length), and keeps held-out loss flat past the original context (the YaRN paper).

  commands   a MuonClip parent (experiment 1's, or the recipe's own batch), mid-trained on lookup rows, then
             `k2 extend-context` with each method; experiment 1's model through the same chain when they differ
  measure    passkey accuracy by prompt length for each method and the mid-trained parent, loss by position
  plots      passkey accuracy vs prompt length; the YaRN artifact's own depth x length heat-map, copied
  report     the method table; two summary rows judged by the rules below
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from reproduce.common import Context, artifact, metrics, plt, recipe_value, save, with_sets
from reproduce.stats import Rule, binom_se, fmt, judge

KEY, TITLE = "context", "Context extension: none / linear / YaRN"

# How big this experiment is in each preset (reproduce/common.py's PRESETS holds what experiments share).
SIZES = {'quick': {'parent_batch': 4,
           'steps': 2,
           'batch': 2,
           'seq': 384,
           'factor': 2.0,
           'trials': 1,
           'lengths': [1.0, 2.0],
           'depths': [0.5]},
 'cpu': {'parent_batch': 16,
         'steps': 100,
         'batch': 8,
         'seq': 512,
         'factor': 4.0,
         'trials': 10,
         'lengths': [0.5, 1.0, 2.0, 3.0, 4.0],
         'depths': [0.1, 0.3, 0.5, 0.7, 0.9]},
 'gpu': {'parent_batch': 32,
         'steps': 300,
         'batch': 16,
         'seq': 2048,
         'factor': 4.0,
         'trials': 20,
         'lengths': [0.5, 1.0, 2.0, 3.0, 4.0],
         'depths': [0.1, 0.3, 0.5, 0.7, 0.9]}}
METHODS = {"none": "none (positions raised, no scaling)", "linear": "linear interpolation", "yarn": "YaRN"}
PARENT = "mid-trained parent, no extension"  # its numbers are recorded in the YaRN artifact (eval_parent=true)


@dataclass
class Runs:
    base: str  # the pre-trained parent
    exp1: str  # experiment 1's MuonClip run (the same as base when the batches agree)
    parent: str  # base, mid-trained: the model every method extends
    extended: dict[str, str]  # method -> artifact name
    weak: str | None  # experiment 1's model, mid-trained and YaRN-extended (when it is not base)


def commands(ctx: Context) -> Runs:
    P, X = ctx.P, SIZES[ctx.preset]
    ctx.base_data()
    seed = P["seeds"][0]

    def midtrain(base: str, out: str) -> str:
        """Mid-training, as `make demo` does: the model learns to look things up within its own context."""
        ctx.k2("pretrain", "--recipe", ctx.recipe("midtrain"), "--set", f"init={base}:latest",
               "--set", "data.input=data-rephrase:latest", "--out", out)
        return out

    def extend(parent: str, method: str, out: str) -> str:
        ctx.k2(*with_sets("extend-context", f"{parent}:latest", "--recipe", ctx.recipe("extend_context"), sets=(
            f"extend.method={method}", f"extend.factor={X['factor']}", f"train.steps={X['steps']}",
            f"train.batch_size={X['batch']}", f"train.seq_len={X['seq']}", f"train.eval_every={X['steps']}",
            f"eval.passkey_trials={X['trials']}", f"eval.passkey_lengths={json.dumps(X['lengths'])}",
            f"eval.passkey_depths={json.dumps(X['depths'])}", f"eval_parent={'true' if method == 'yarn' else 'false'}",
            f"schedule.warmup_steps={max(1, X['steps'] // 10)}")), "--out", out)
        return out

    # the parent: MuonClip pre-trained with the recipe's own batch (the demo's; experiment 1 uses P["batch"])
    exp1 = ctx.baseline(seed)
    base = exp1 if X["parent_batch"] == P["batch"] else ctx.pretrain(
        f"ext-pretrain-b{X['parent_batch']}", "optim.name=muonclip", f"train.batch_size={X['parent_batch']}", seed=seed)
    parent = midtrain(base, "ext-midtrain")
    extended = {method: extend(parent, method, f"ext-{method}") for method in METHODS}
    # and experiment 1's model (fewer pre-training tokens) through the same mid-training and YaRN extension
    weak = extend(midtrain(exp1, "ext-midtrain-exp1"), "yarn", "ext-yarn-exp1") if base != exp1 else None
    return Runs(base, exp1, parent, extended, weak)


# ----------------------------------------------------------------------------- measurement


@dataclass
class Measurement:
    runs: Runs
    m: dict[str, dict]  # method -> manifest metrics of its extended artifact (passkey_*, parent_passkey_*, ...)
    parent_steps: int | None  # mid-training steps
    beta: tuple  # YaRN's (beta_fast, beta_slow) from its recipe
    weak: dict | None  # manifest metrics of experiment 1's model through the same chain
    heatmap: Path | None  # the YaRN artifact's depth x length passkey plot
    trained: int  # the length the extension trained at
    n: int  # passkey prompts per length

    @property
    def orig(self) -> int:  # the parent's context
        return self.m["yarn"]["original_context"]

    @property
    def lengths(self) -> list[int]:  # prompt lengths the passkey test ran at
        return sorted({int(k.rsplit("_", 1)[1]) for k in self.m["yarn"]
                       if k.startswith("passkey_accuracy_") and k.rsplit("_", 1)[1].isdigit()})

    @property
    def curves(self) -> dict[str, list]:  # row label -> passkey accuracy per length (the parent first)
        out = {PARENT: [self.m["yarn"].get(f"parent_passkey_accuracy_{L}") for L in self.lengths]}
        for k in self.m:
            out[METHODS[k]] = [self.m[k].get(f"passkey_accuracy_{L}") for L in self.lengths]
        return out

    def mean(self, method: str, lengths: list[int]) -> float | None:
        """Mean passkey accuracy of a method over some lengths (those measured)."""
        vs = [self.m[method].get(f"passkey_accuracy_{L}") for L in lengths]
        vs = [v for v in vs if v is not None]
        return sum(vs) / len(vs) if vs else None

    @property
    def beyond(self) -> list[int]:  # lengths past the trained length
        return [L for L in self.lengths if L > self.trained]

    @property
    def within(self) -> list[int]:  # lengths inside the original context
        return [L for L in self.lengths if L <= self.orig]

    def last_bin(self, method: str) -> float | None:  # held-out loss in the last sixteenth of the sequence
        return self.m[method].get("passkey_loss_last_bin")

    @property
    def yarn_rise(self) -> float:  # YaRN's last-bin loss minus its loss within the original context
        return self.last_bin("yarn") - self.m["yarn"]["passkey_loss_within"]

    @property
    def retrieval(self) -> "Retrieval":
        return Retrieval(self.mean("yarn", self.beyond), self.mean("linear", self.beyond), self.mean("none", self.beyond),
                         best_any=max((self.mean(k, self.lengths) or 0) for k in self.m), n=self.n,
                         n_lengths=len(self.beyond))


def measure(ctx: Context, runs: Runs) -> Measurement:
    root, X, yarn = ctx.root, SIZES[ctx.preset], runs.extended["yarn"]
    heatmap = artifact(root, yarn).file("passkey.png")
    return Measurement(
        runs=runs, m={k: metrics(root, n) for k, n in runs.extended.items()},
        parent_steps=metrics(root, runs.parent).get("steps"),
        beta=(recipe_value(root, yarn, "extend.beta_fast"), recipe_value(root, yarn, "extend.beta_slow")),
        weak=metrics(root, runs.weak) if runs.weak else None,
        heatmap=heatmap if heatmap.exists() else None, trained=X["seq"],
        n=metrics(root, yarn).get("passkey_trials_per_length") or X["trials"] * len(X["depths"]),
    )


# ----------------------------------------------------------------------------- verdict rules


@dataclass
class Retrieval:
    """Passkey accuracy past the trained length: YaRN against the better of linear and none."""

    yarn: float | None
    linear: float | None
    none: float | None
    best_any: float  # the best method's mean over every length
    n: int  # prompts per length
    n_lengths: int  # lengths past the trained length

    @property
    def best_other(self) -> float:
        return max(v for v in (self.linear, self.none) if v is not None)

    @property
    def gap(self) -> float:  # YaRN minus the better other method, against 2 s.e. of a difference of two means
        return self.yarn - self.best_other

    @property
    def twice_se(self) -> float:
        return 2 * math.sqrt(2) * binom_se(0.5, self.n * max(1, self.n_lengths))


FLOOR = 0.05  # below 5% accuracy a method does not retrieve at all

YARN_RETRIEVES = [
    Rule("not measured beyond the training length", lambda r: r.yarn is None),
    Rule("not reproduced: no method learned to retrieve from this parent (0% at every length)",
         lambda r: max(r.yarn, r.best_other) < FLOOR and r.best_any < FLOOR),
    Rule("not reproduced: no method retrieves beyond the trained length at this scale",
         lambda r: max(r.yarn, r.best_other) < FLOOR),
    Rule("reproduced", lambda r: r.gap > r.twice_se),
    Rule("within noise", lambda r: abs(r.gap) <= r.twice_se),
    Rule("not reproduced"),
]
YARN_LOSS_FLAT = [
    Rule("not measured (no loss by position in the artifacts)",
         lambda m: None in [m.last_bin(k) for k in m.m] or m.m["yarn"].get("passkey_loss_within") is None),
    Rule("reproduced (one run each): YaRN's last-bin loss is {yarn_rise:+.3f} from its loss within {orig}",
         lambda m: m.last_bin("yarn") < min(m.last_bin("linear"), m.last_bin("none"))),
    Rule("not reproduced"),
]


# ----------------------------------------------------------------------------- plots


def plots(ctx: Context, m: Measurement) -> list[str]:
    X, p = SIZES[ctx.preset], plt()
    fig, ax = p.subplots(figsize=(6, 3.8))
    for i, (lab, ys) in enumerate(m.curves.items()):
        ax.plot(m.lengths, [None if y is None else 100 * y for y in ys], marker="o", label=lab, color=f"C{i}",
                ls=":" if "parent" in lab else "-")
    ax.axvline(m.orig, color="gray", ls="--", lw=0.8)
    ax.axvline(X["seq"], color="gray", ls=":", lw=0.8)
    ax.text(m.orig, 103, " original context", fontsize=7)
    ax.text(X["seq"], 96, " trained length", fontsize=7)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_ylim(-3, 108)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    names = [save(fig, ctx.report_dir / "passkey.png")]
    if m.heatmap is not None:  # drawn by `k2 extend-context` itself: copied, not redrawn
        shutil.copy2(m.heatmap, ctx.report_dir / "passkey_heatmap.png")
        names.append("passkey_heatmap.png")
    return names


# ----------------------------------------------------------------------------- report


def section(ctx: Context, m: Measurement, plots: list[str]) -> list[str]:
    P, X, runs, orig, lengths, n = ctx.P, SIZES[ctx.preset], m.runs, m.orig, m.lengths, m.n
    body = [
        (f"Experiment 1's MuonClip model (context {orig}; {P['steps']} x {P['batch']} x {P['seq']} tokens)" if runs.base == runs.exp1 else
         f"A MuonClip model (context {orig}) pre-trained like experiment 1's but with {X['parent_batch']} rows per step "
         f"({P['steps']} x {X['parent_batch']} x {P['seq']} tokens, the `{P['base']}` recipe's own batch; experiment 1 "
         f"uses {P['batch']})") + ", mid-trained at its own length on lookup rows "
        f"(`{ctx.recipe('midtrain')}`: {m.parent_steps} steps; the \"mid-trained parent\" row), then "
        f"extended {X['factor']:g}x with each RoPE method (YaRN with the recipe's beta_fast "
        f"{m.beta[0]}, beta_slow {m.beta[1]}), trained "
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
    for lab, ys in m.curves.items():
        k = next((k for k, v in METHODS.items() if v == lab), None)
        row = m.m[k] if k else {f"passkey_loss_{w}": m.m["yarn"].get(f"parent_passkey_loss_{w}") for w in ("within", "beyond", "last_bin")}
        vl = fmt(m.m[k].get("final_val_loss"), ".3f") if k else "-"
        body.append(f"| {lab} | " + " | ".join(fmt(y and 100 * y, '.0f') + "%" if y is not None else "-" for y in ys)
                    + f" | {vl} | " + " | ".join(fmt(row.get(f"passkey_loss_{w}"), ".3f") for w in ("within", "beyond", "last_bin")) + " |")
    if m.weak:
        w = m.weak
        acc = lambda pre: ", ".join(f"{L}: {fmt(w.get(f'{pre}passkey_accuracy_{L}') and 100 * w[f'{pre}passkey_accuracy_{L}'], '.0f')}%"
                                    for L in lengths)
        body += ["", f"Experiment 1's MuonClip model ({P['steps']} x {P['batch']} x {P['seq']} tokens), "
                 f"through the same mid-training and YaRN extension: mid-trained {acc('parent_')}; extended {acc('')}."]
    body += ["", f"2 s.e. of one cell is up to {200 * binom_se(0.5, n):.0f} points at {n} trials. Losses are one "
             f"run per method (no seed spread measured here; experiment 1's seed-to-seed spread of the validation "
             f"loss is the nearest noise estimate).", "",
             f"![passkey]({plots[0]})"]
    if len(plots) > 1:
        body += ["", "Depth x length for the parent and YaRN (from the `ext-yarn` artifact):", "",
                 f"![passkey heat-map]({plots[1]})"]
    return body


def summary(ctx: Context, m: Measurement) -> list[list[str]]:
    r, orig, beyond, within = m.retrieval, m.orig, m.beyond, m.within
    pct = lambda v: fmt(v and 100 * v, ".0f")  # noqa: E731 (None stays "-", 0 stays 0)
    last = {k: m.last_bin(k) for k in m.m}
    return [
        ["YaRN extends the context better than linear interpolation or none (passkey)",
         "K2: 4K -> 32K -> 128K with YaRN (no passkey figure in the report)",
         f"beyond the trained length ({', '.join(map(str, beyond))}): YaRN {pct(r.yarn)}%, "
         f"linear {pct(r.linear)}%, none {pct(r.none)}%; within {orig}: YaRN {pct(m.mean('yarn', within))}%",
         judge(YARN_RETRIEVES, r)],
        [f"YaRN keeps held-out loss flat past the original context ({orig} -> {max(m.lengths)} positions, "
         f"trained at {m.trained})",
         "YaRN paper: perplexity stays low up to the extended context; plain RoPE blows up past its trained length",
         f"loss in the last bin: YaRN {fmt(last['yarn'], '.3f')}, linear {fmt(last['linear'], '.3f')}, "
         f"none {fmt(last['none'], '.3f')}, unextended parent "
         f"{fmt(m.m['yarn'].get('parent_passkey_loss_last_bin'), '.3f')}", judge(YARN_LOSS_FLAT, m)],
    ]
