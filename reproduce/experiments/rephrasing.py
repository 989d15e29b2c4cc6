"""Experiment 2: rephrasing vs epochs (knowledge), K2 Table 1 on Physics of Language Models 3.1's protocol.

Claims: at equal tokens, 10 rewrites x 1 epoch > 1 rewrite x 10 epochs > raw x 10 epochs on held-out QA
(K2 Table 1); diverse text makes knowledge extractable (PLM 3.1 bioS).

  commands   a biographies-only world, its 1- and 10-rewrite corpora, one tokenizer; pretrain on each corpus for
             the same tokens, QA-fine-tune each on the QA-train people, evaluate QA (SFT) and cloze (base)
  measure    held-out QA accuracy with binomial standard errors, QA-train accuracy, cloze accuracy, per attribute
  plots      measured accuracies beside K2 Table 1
  report     the corpus table and the per-attribute table; two summary rows judged by the rules below
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from reproduce.common import PAPER, Context, corpus_tokens, eval_results, metrics, plt, save, with_sets
from reproduce.stats import Rule, binom_se, differs, fmt, judge

KEY, TITLE = "rephrasing", "Rephrasing vs epochs (knowledge)"

# How big this experiment is in each preset (reproduce/common.py's PRESETS holds what experiments share).
SIZES = {'quick': {'world': 20,
           'epoch_scale': 1,
           'batch': 4,
           'seq': 128,
           'sft_steps': 4,
           'eval_examples': 8,
           'max_new_tokens': 8},
 'cpu': {'world': 50,
         'epoch_scale': 10,
         'batch': 16,
         'seq': 128,
         'sft_steps': 60,
         'eval_examples': 150,
         'max_new_tokens': 12},
 'gpu': {'world': 1000,
         'epoch_scale': 10,
         'batch': 64,
         'seq': 256,
         'sft_steps': 300,
         'eval_examples': 1000,
         'max_new_tokens': 16}}
CORPORA = {"raw": "kn-synth", "rw1": "kn-rw1", "rw10": "kn-rw10"}  # arm -> dataset artifact


def commands(ctx: Context) -> int:
    """Runs every step; returns the pretraining steps (equal for all three arms)."""
    P, K, k2 = ctx.P, SIZES[ctx.preset], ctx.k2
    # the world, biographies only (no math documents): pre-training is all biographies
    k2("data", "synth", "--recipe", ctx.recipe("synth"), "--set", f"world.size={K['world']}", "--set", "math.count=0",
       "--out", "kn-synth")
    for n in (1, 10):
        k2("rephrase", "kn-synth:latest", "--recipe", ctx.recipe("rephrase"), "--set", f"rewrite.rewrites={n}",
           "--set", "rewrite.keep_original=false", "--out", f"kn-rw{n}")
    k2("tokenizer", "train", "kn-rw10:latest", "--vocab-size", P["vocab"], "--out", "kn-tokenizer")
    # equal tokens: one epoch of the 10-rewrite corpus (= 10 epochs of the 1-rewrite corpus) x epoch_scale
    steps = max(2, math.ceil(K["epoch_scale"] * corpus_tokens(ctx.root, "kn-rw10", "kn-tokenizer") / (K["batch"] * K["seq"])))
    warm = max(1, min(20, steps // 10))
    for k, d in CORPORA.items():
        k2(*with_sets("pretrain", f"{d}:latest", "--recipe", ctx.recipe("pretrain"), sets=(
            "tokenizer.ref=kn-tokenizer:latest", "data.val_fraction=0", f"train.steps={steps}",
            f"train.batch_size={K['batch']}", f"train.seq_len={K['seq']}", "train.eval_every=0",
            f"schedule.warmup_steps={warm}", f"optim.lr={P['lr']}")), "--out", f"kn-pt-{k}")
    for k in CORPORA:
        k2(*with_sets("sft", f"kn-pt-{k}:latest", "--recipe", ctx.recipe("sft"), sets=(
            "data.agentic=", "data.mix.agentic=0", "data.mix.math=0", "data.mix.qa=1", "data.mix.corpus=0",
            f"train.steps={K['sft_steps']}",
            f"train.batch_size={K['batch']}", f"train.seq_len={K['seq']}", f"train.eval_every={K['sft_steps']}",
            f"schedule.warmup_steps={max(1, K['sft_steps'] // 10)}")), "--out", f"kn-sft-{k}")
    ev = ["--suite", "knowledge", "--recipe", ctx.recipe("eval"), "--set", f"eval.max_examples={K['eval_examples']}",
          "--set", f"eval.max_new_tokens={K['max_new_tokens']}"]
    lab = [x for k in CORPORA for x in ("--label", k)]
    k2("eval", *[f"kn-sft-{k}:latest" for k in CORPORA], *lab, *ev, "--out", "kn-eval-sft")
    k2("eval", *[f"kn-pt-{k}:latest" for k in CORPORA], *lab, *ev, "--out", "kn-eval-base")
    return steps


# ----------------------------------------------------------------------------- measurement


@dataclass
class Measurement:
    steps: int
    budget: int  # tokens every arm trains on
    tokens: dict[str, int]  # arm -> corpus tokens
    acc: dict[str, float]  # arm -> held-out QA accuracy after SFT
    acc_train: dict[str, float | None]  # arm -> QA accuracy on the SFT (QA-train) people
    cloze: dict[str, float]  # arm -> held-out cloze accuracy of the base model
    per_attr: dict[str, dict[str, float]]  # "accuracy_<attribute>" -> arm -> held-out accuracy after SFT
    n_test: int  # held-out questions per model

    @property
    def se(self) -> dict[str, float]:
        return {k: binom_se(self.acc[k], self.n_test) for k in CORPORA}

    def beyond_noise(self, a: str, b: str) -> bool:
        """Do arms a and b differ by more than twice the standard error of their difference?"""
        return differs(self.acc[a], self.acc[b], math.sqrt(self.se[a] ** 2 + self.se[b] ** 2))

    @property
    def rw1_beats_raw(self) -> bool:
        return self.acc["rw1"] > self.acc["raw"] and self.beyond_noise("rw1", "raw")

    @property
    def rw10_beats_rw1(self) -> bool:
        return self.acc["rw10"] > self.acc["rw1"] and self.beyond_noise("rw10", "rw1")

    @property
    def rw10_beats_raw(self) -> bool:
        return self.acc["rw10"] > self.acc["raw"] and self.beyond_noise("rw10", "raw")


def measure(ctx: Context, steps: int) -> Measurement:
    K, root = SIZES[ctx.preset], ctx.root
    sft = {k: v["knowledge"] for k, v in eval_results(root, "kn-eval-sft").items()}
    base = {k: v["knowledge"] for k, v in eval_results(root, "kn-eval-base").items()}
    attrs = sorted({a for k in CORPORA for a in sft[k] if a.startswith("accuracy_") and a != "accuracy_qa_train_people"})
    return Measurement(
        steps=steps, budget=steps * K["batch"] * K["seq"],
        tokens={k: corpus_tokens(root, d, "kn-tokenizer") for k, d in CORPORA.items()},
        acc={k: sft[k]["accuracy"] for k in CORPORA},
        acc_train={k: sft[k].get("accuracy_qa_train_people") for k in CORPORA},
        cloze={k: base[k]["accuracy"] for k in CORPORA},
        per_attr={a: {k: sft[k].get(a, 0) for k in CORPORA} for a in attrs},
        n_test=min(K["eval_examples"], metrics(root, "kn-synth")["qa_test"]),  # the eval caps at eval_examples
    )


# ----------------------------------------------------------------------------- verdict rules

# K2 Table 1's order, raw < 1 rewrite < 10 rewrites, each step beyond twice its standard error
TABLE1_ORDER = [
    Rule("reproduced", lambda m: m.rw1_beats_raw and m.rw10_beats_rw1),
    Rule("partly: 10 rewrites beat raw beyond noise; the middle step is within noise or reversed", lambda m: m.rw10_beats_raw),
    Rule("not reproduced: all at the floor at this scale", lambda m: max(m.acc.values()) < 0.02),
    Rule("not reproduced (differences within noise)", lambda m: not m.beyond_noise("rw10", "raw")),
    Rule("not reproduced: reversed"),
]
DIVERSITY = [
    Rule("reproduced (direction)", lambda m: m.rw10_beats_raw),
    Rule("within noise", lambda m: not m.beyond_noise("rw10", "raw")),
    Rule("not reproduced"),
]


def labels(K: dict) -> dict[str, str]:
    e = K["epoch_scale"]
    return {"raw": f"raw x {10 * e} epochs", "rw1": f"1 rewrite x {10 * e} epochs",
            "rw10": f"10 rewrites x {e} epoch{'s' if e > 1 else ''}"}


# ----------------------------------------------------------------------------- plots


def plots(ctx: Context, m: Measurement) -> list[str]:
    ks, se, p = list(CORPORA), m.se, plt()
    fig, axes = p.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    x = range(3)
    w = 0.27
    axes[0].bar([i - w for i in x], [100 * m.acc[k] for k in ks], w, yerr=[200 * se[k] for k in ks], capsize=3,
                label="held-out people, QA after SFT")
    axes[0].bar(list(x), [100 * (m.acc_train[k] or 0) for k in ks], w, label="QA-train people (SFT data)")
    axes[0].bar([i + w for i in x], [100 * m.cloze[k] for k in ks], w, label="held-out people, base model cloze")
    axes[0].set_xticks(list(x), [labels(SIZES[ctx.preset])[k] for k in ks], fontsize=8)
    axes[0].set_ylabel("accuracy (%)")
    top = max([m.acc[k] + 2 * se[k] for k in ks] + [m.acc_train[k] or 0 for k in ks] + [m.cloze[k] for k in ks])
    axes[0].set_ylim(0, max(10, 110 * top))
    axes[0].set_title(f"Measured ({m.budget / 1e6:.2f}M tokens each; error bars 2 s.e.)", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].bar(list(x), [PAPER["table1"][k] for k in ks], color="gray")
    axes[1].set_xticks(list(x), ["raw x 10", "1 rw x 10", "10 rw x 1"], fontsize=8)
    axes[1].set_title("K2 Table 1 (SimpleQA, %)", fontsize=9)
    for a in axes:
        a.grid(alpha=0.3, axis="y")
    return [save(fig, ctx.report_dir / "rephrasing.png")]


# ----------------------------------------------------------------------------- report


def section(ctx: Context, m: Measurement, plots: list[str]) -> list[str]:
    K, ks, names = SIZES[ctx.preset], list(CORPORA), labels(SIZES[ctx.preset])
    body = [
        f"Physics of Language Models 3.1's protocol on the synthetic world: {K['world']} people, one permuted biography "
        "each (no math documents), QA split by person (half the people in `qa_train/`, the other half held out). "
        "Pre-train on all biographies (no validation hold-out) from three corpora, then QA-fine-tune each model on the "
        "QA-train half with `k2 sft` (QA only), and ask the held-out half with `k2 eval --suite knowledge` "
        "(greedy, exact match; chat prompts for the fine-tuned models, cloze prompts for the base models).",
        "",
        f"Equal tokens: every run trains {m.steps} steps x {K['batch']} x {K['seq']} = {m.budget:,} tokens, one pass over the "
        f"10-rewrite corpus{' times ' + str(K['epoch_scale']) if K['epoch_scale'] > 1 else ''}. Rewrites are longer than "
        "the templated originals, so the raw corpus is seen more often than 10 times (more exposures of the same facts: "
        "the comparison favours raw text, if anything)."
        + (f" K2's 10 / 10 / 1 epochs are scaled by {K['epoch_scale']} here: at 1 the tiny model memorises too little to "
           "answer anything." if K["epoch_scale"] > 1 else ""),
        "",
        "| corpus | corpus tokens | epochs seen | held-out QA (SFT) | 2 s.e. | QA-train people | base-model cloze (held-out) | K2 Table 1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    se = m.se
    for k in ks:
        body.append(f"| {names[k]} | {m.tokens[k]:,} | {m.budget / m.tokens[k]:.1f} | {100 * m.acc[k]:.1f}% | "
                    f"{200 * se[k]:.1f} | {fmt(m.acc_train[k] and 100 * m.acc_train[k], '.1f')}% | "
                    f"{100 * m.cloze[k]:.1f}% | {PAPER['table1'][k]:.2f} |")
    if m.per_attr:
        body += ["", "Held-out accuracy by attribute (SFT models):", "",
                 "| attribute | " + " | ".join(names[k] for k in ks) + " |", "|---|" + "---:|" * len(ks)]
        for a, by_arm in m.per_attr.items():
            body.append(f"| {a.removeprefix('accuracy_')} | " + " | ".join(f"{100 * by_arm[k]:.0f}%" for k in ks) + " |")
    body += ["", f"{m.n_test} held-out questions per model (binomial standard errors).", "", f"![rephrasing]({plots[0]})"]
    return body


def summary(ctx: Context, m: Measurement) -> list[list[str]]:
    ks = list(CORPORA)
    return [
        ["rephrasing beats repeating: raw x10 < 1 rewrite x10 < 10 rewrites x1 (held-out QA, %)",
         " / ".join(f"{PAPER['table1'][k]:.2f}" for k in ks), " / ".join(f"{100 * m.acc[k]:.1f}" for k in ks),
         judge(TABLE1_ORDER, m)],
        ["diverse text makes knowledge extractable (PLM 3.1 bioS, held-out QA, %)",
         f"{PAPER['bios']['none']:g} (1 bio) vs {PAPER['bios']['multi5_permute_fullname']:g} (multi5+permute+fullname)",
         f"{100 * m.acc['raw']:.1f} (raw) vs {100 * m.acc['rw10']:.1f} (10 rewrites)", judge(DIVERSITY, m)],
    ]
