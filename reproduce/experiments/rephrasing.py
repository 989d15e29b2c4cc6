"""Experiment 2: rephrasing vs epochs (knowledge), K2 Table 1 on Physics of Language Models 3.1's protocol.

Claims: at equal tokens, 10 rewrites x 1 epoch > 1 rewrite x 10 epochs > raw x 10 epochs (K2 Table 1, SimpleQA);
diverse text makes knowledge extractable (PLM 3.1 bioS).

  commands   a biographies-only world, its 1- and 10-rewrite corpora, one tokenizer; pretrain on each corpus for
             the same tokens (the end points, raw and 10 rewrites, at two seeds); probe every base model with
             `k2 eval --suite knowledge-probe` (no fine-tune); QA-fine-tune the seed-0 models on the QA-train
             people and ask the held-out people (`--suite knowledge`)
  measure    per fact (person x attribute), the probe's gold-value log-probability and greedy exact match on
             phrasings no training text uses; arms paired fact by fact, seed spread at the end points; SFT QA
             accuracy on QA-train (the gate) and QA-test people
  plots      probe log-prob and exact match per arm (both seeds), SFT QA beside K2 Table 1
  report     corpus/exposure table, probe table, per-attribute table, SFT table; three summary rows
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from reproduce.common import PAPER, Context, artifact, corpus_tokens, eval_results, metrics, plt, save, with_sets
from reproduce.stats import Rule, binom_se, fmt, judge

KEY, TITLE = "rephrasing", "Rephrasing vs epochs (knowledge)"

# How big this experiment is in each preset (reproduce/common.py's PRESETS holds what experiments share).
# epoch_scale multiplies K2's 10 / 10 / 1 epochs: at 10 every arm sees each person's facts ~100 times (raw: ~108
# passes over one biography; 10 rewrites: 10 passes over ten), the exposure count at which PLM 3.3 places its
# under-trained regime (it saturates at ~1000) and the regime where PLM 3.1's single-biography model memorises
# but cannot extract.
SIZES = {
    "quick": {"world": 12, "epoch_scale": 1, "batch": 4, "seq": 128, "sft_steps": 4, "sft_lr": 0.01,
              "eval_examples": 8, "max_new_tokens": 8},
    # cpu: ~5 idle 2-core minutes (measured 21.5 min wall at load ~10 with OMP_NUM_THREADS=1: a 178-step pretrain
    # 119-155 s, a 200-step fine-tune 147-194 s, the probe of 5 models 22 s): five pretrains, three fine-tunes, two evals
    "cpu": {"world": 50, "epoch_scale": 10, "batch": 16, "seq": 128, "sft_steps": 200, "sft_lr": 0.01,
            "eval_examples": 150, "max_new_tokens": 12},
    # gpu: NOT MEASURED (no GPU here), sized by arithmetic for the small model at ~100K tokens/s on one H100/H200
    # (docs/gpu.md: ~155K at 40% MFU): 1000 people -> ~0.73M tokens of 10 rewrites -> 7.3M tokens per arm,
    # 5 arms ~6 min, 3 fine-tunes of 200 x 64 x 256 tokens ~2 min, evals ~1 min
    "gpu": {"world": 1000, "epoch_scale": 10, "batch": 64, "seq": 256, "sft_steps": 200, "sft_lr": 0.005,
            "eval_examples": 1000, "max_new_tokens": 16},
}
CORPORA = {"raw": "kn-synth", "rw1": "kn-rw1", "rw10": "kn-rw10"}  # arm -> dataset artifact
DOCS_PER_PERSON = {"raw": 1, "rw1": 1, "rw10": 10}
END_POINTS = ("raw", "rw10")  # trained at a second seed: their spread is the seed noise
SEEDS = (0, 1)
SFT_GATE = 0.9  # QA-train accuracy a fine-tune must reach before its held-out accuracy means anything


def run_name(arm: str, seed: int) -> str:
    return f"kn-pt-{arm}" if seed == 0 else f"kn-pt-{arm}-s{seed}"


def label(arm: str, seed: int) -> str:
    return arm if seed == 0 else f"{arm}-s{seed}"


def probe_models() -> list[tuple[str, int]]:
    return [(a, 0) for a in CORPORA] + [(a, s) for a in END_POINTS for s in SEEDS[1:]]


def commands(ctx: Context) -> int:
    """Runs every step; returns the pretraining steps (equal for all arms)."""
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
    for arm, seed in probe_models():
        k2(*with_sets("pretrain", f"{CORPORA[arm]}:latest", "--recipe", ctx.recipe("pretrain"), sets=(
            "tokenizer.ref=kn-tokenizer:latest", "data.val_fraction=0", f"seed={seed}", f"train.steps={steps}",
            f"train.batch_size={K['batch']}", f"train.seq_len={K['seq']}", "train.eval_every=0",
            f"schedule.warmup_steps={warm}", f"optim.lr={P['lr']}")), "--out", run_name(arm, seed))
    # the primary probe: every base model, every person of the world, no fine-tune
    k2("eval", *[f"{run_name(a, s)}:latest" for a, s in probe_models()], *[x for a, s in probe_models() for x in ("--label", label(a, s))],
       "--suite", "knowledge-probe", "--recipe", ctx.recipe("eval"), "--set", f"eval.max_examples={K['world']}",
       "--out", "kn-probe")
    # the PLM 3.1 QA probe: fine-tune on the QA-train people, ask the held-out ones (gated on QA-train accuracy)
    for arm in CORPORA:
        k2(*with_sets("sft", f"{run_name(arm, 0)}:latest", "--recipe", ctx.recipe("sft"), sets=(
            "data.agentic=", "data.mix.agentic=0", "data.mix.math=0", "data.mix.qa=1", "data.mix.corpus=0",
            f"train.steps={K['sft_steps']}", f"optim.lr={K['sft_lr']}",
            f"train.batch_size={K['batch']}", f"train.seq_len={K['seq']}", f"train.eval_every={K['sft_steps']}",
            f"schedule.warmup_steps={max(1, K['sft_steps'] // 10)}")), "--out", f"kn-sft-{arm}")
    k2("eval", *[f"kn-sft-{k}:latest" for k in CORPORA], *[x for k in CORPORA for x in ("--label", k)], "--suite", "knowledge",
       "--recipe", ctx.recipe("eval"), "--set", f"eval.max_examples={K['eval_examples']}",
       "--set", f"eval.max_new_tokens={K['max_new_tokens']}", "--out", "kn-eval-sft")
    return steps


# ----------------------------------------------------------------------------- measurement


def probe_facts(root, name: str) -> tuple[list[tuple[str, str]], dict[str, dict[str, np.ndarray]]]:
    """Per model label, per fact (person, attribute), the probe's scores averaged over its held-out phrasings:
    {"logprob", "logprob_per_token", "exact", "token_acc"} -> array [facts]. Both QA splits pooled: a base model saw every person's
    biography alike. Facts are in the probe's own (seeded, deterministic) order, the same for every model."""
    art = artifact(root, name)
    out, keys = {}, None
    for m in json.loads(art.file("results.json").read_text())["models"]:
        rows = [json.loads(line) for line in art.file(m["suites"]["knowledge-probe"]["files"][0]).read_text().splitlines()]
        facts: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            facts.setdefault((r["person_id"], r["attribute"]), []).append(r)
        if keys is None:
            keys = list(facts)
        assert list(facts) == keys, "probe rows of two models do not pair"
        for r in rows:
            r["logprob_per_token"] = r["logprob"] / r["tokens"]
        out[m["label"]] = {k: np.array([np.mean([r[k] for r in facts[f]]) for f in keys], dtype=float)
                           for k in ("logprob", "logprob_per_token", "exact", "token_acc")}
    return keys, out


@dataclass
class Measurement:
    steps: int
    budget: int  # tokens every arm trains on
    tokens: dict[str, int]  # arm -> corpus tokens
    facts: list[tuple[str, str]]  # (person id, attribute), the probe's order
    probe: dict[str, dict[str, np.ndarray]]  # model label -> {"logprob", "logprob_per_token", "exact", "token_acc"} -> [facts]
    acc: dict[str, float]  # arm -> held-out QA accuracy after SFT
    acc_train: dict[str, float | None]  # arm -> QA accuracy on the SFT (QA-train) people
    per_attr_sft: dict[str, dict[str, float]]  # attribute -> arm -> held-out SFT accuracy
    n_test: int  # held-out questions per SFT model

    # -- the primary measure: gold-value log-probability, arms paired fact by fact
    def mean(self, arm: str, key: str) -> float:
        """A probe score's mean over facts, averaged over the seeds the arm has."""
        return float(np.mean([self.probe[label(arm, s)][key].mean() for s in self.seeds(arm)]))

    def lp(self, arm: str) -> float:
        """Mean log P(gold value) per fact (nats)."""
        return self.mean(arm, "logprob")

    def seeds(self, arm: str) -> list[int]:
        return [s for s in SEEDS if label(arm, s) in self.probe]

    def paired(self, a: str, b: str, seed: int = 0) -> tuple[float, float]:
        """(mean, standard error) of the per-fact log-prob difference a - b at one seed."""
        d = self.probe[label(a, seed)]["logprob"] - self.probe[label(b, seed)]["logprob"]
        return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("inf")

    @property
    def seed_sd(self) -> float | None:
        """Seed-to-seed standard deviation of one run's end-point difference (rw10 - raw): |d0 - d1| / sqrt 2."""
        if not all(len(self.seeds(a)) > 1 for a in END_POINTS):
            return None
        d = [self.paired("rw10", "raw", s)[0] for s in SEEDS]
        return abs(d[0] - d[1]) / math.sqrt(2)

    def lp_noise(self, a: str, b: str) -> float:
        """Standard error of the log-prob difference a - b: the paired (fact-sampling) s.e. or the seed spread,
        whichever is larger. The end points average two seeds (seed s.e. = sd / sqrt 2); rw1 has one."""
        both = all(len(self.seeds(x)) > 1 for x in (a, b))
        sampling = max(self.paired(a, b, s)[1] for s in (SEEDS if both else SEEDS[:1]))
        if both:
            sampling /= math.sqrt(2)
        seed = self.seed_sd
        if seed is not None and both:
            seed /= math.sqrt(2)
        return max(sampling, seed or 0.0)

    def lp_diff(self, a: str, b: str) -> float:
        both = all(len(self.seeds(x)) > 1 for x in (a, b))
        return float(np.mean([self.paired(a, b, s)[0] for s in (SEEDS if both else SEEDS[:1])]))

    def lp_beats(self, a: str, b: str) -> bool:
        return self.lp_diff(a, b) > 2 * self.lp_noise(a, b)

    def lp_within(self, a: str, b: str) -> bool:
        return abs(self.lp_diff(a, b)) <= 2 * self.lp_noise(a, b)

    @property
    def lp_noise_text(self) -> str:
        seed = "-" if self.seed_sd is None else f"{self.seed_sd:.3f}"
        return (f"2 s.e.: rw1-raw {2 * self.lp_noise('rw1', 'raw'):.3f}, rw10-rw1 {2 * self.lp_noise('rw10', 'rw1'):.3f}, "
                f"rw10-raw {2 * self.lp_noise('rw10', 'raw'):.3f} nats; seed sd {seed}")

    # -- greedy exact match (binomial standard errors over facts; the phrasings of a fact are not independent)
    def exact(self, arm: str) -> float:
        return self.mean(arm, "exact")

    def exact_se(self, arm: str) -> float:
        return binom_se(self.exact(arm), len(self.facts) * len(self.seeds(arm)))

    @property
    def exact_noise(self) -> float:
        return math.hypot(self.exact_se("rw10"), self.exact_se("raw"))

    @property
    def exact_noise_pct(self) -> float:
        return 200 * self.exact_noise

    @property
    def exact_beats(self) -> bool:
        return self.exact("rw10") - self.exact("raw") > 2 * self.exact_noise

    @property
    def exact_within(self) -> bool:
        return abs(self.exact("rw10") - self.exact("raw")) <= 2 * self.exact_noise

    # -- the SFT QA probe, gated
    @property
    def min_train(self) -> float:
        return min((v or 0.0) for v in self.acc_train.values())

    @property
    def gate_failed(self) -> bool:
        return self.min_train < SFT_GATE

    def sft_se(self, arm: str) -> float:
        return binom_se(self.acc[arm], self.n_test)

    def sft_beats(self, a: str, b: str) -> bool:
        return self.acc[a] - self.acc[b] > 2 * math.hypot(self.sft_se(a), self.sft_se(b))

    @property
    def sft_noise_pct(self) -> float:
        """Twice the standard error of the raw vs 10-rewrite difference, in points."""
        return 200 * math.hypot(self.sft_se("rw10"), self.sft_se("raw"))


def measure(ctx: Context, steps: int) -> Measurement:
    K, root = SIZES[ctx.preset], ctx.root
    facts, probe = probe_facts(root, "kn-probe")
    sft = {k: v["knowledge"] for k, v in eval_results(root, "kn-eval-sft").items()}
    attrs = sorted({a for k in CORPORA for a in sft[k] if a.startswith("accuracy_") and a != "accuracy_qa_train_people"})
    return Measurement(
        steps=steps, budget=steps * K["batch"] * K["seq"],
        tokens={k: corpus_tokens(root, d, "kn-tokenizer") for k, d in CORPORA.items()},
        facts=facts, probe=probe,
        acc={k: sft[k]["accuracy"] for k in CORPORA},
        acc_train={k: sft[k].get("accuracy_qa_train_people") for k in CORPORA},
        per_attr_sft={a.removeprefix("accuracy_"): {k: sft[k].get(a, 0) for k in CORPORA} for a in attrs},
        n_test=min(K["eval_examples"], metrics(root, "kn-synth")["qa_test"]),  # the eval caps at eval_examples
    )


# ----------------------------------------------------------------------------- verdict rules

# K2 Table 1's order on the probe's gold-value log-probability, each step beyond twice its noise
TABLE1_ORDER = [
    Rule("reproduced ({lp_noise_text})", lambda m: m.lp_beats("rw1", "raw") and m.lp_beats("rw10", "rw1")),
    Rule("partly: 10 rewrites beat raw beyond noise, the middle step does not ({lp_noise_text})",
         lambda m: m.lp_beats("rw10", "raw")),
    Rule("not reproduced: within noise ({lp_noise_text})", lambda m: m.lp_within("rw10", "raw")),
    Rule("not reproduced: reversed beyond noise ({lp_noise_text})"),
]
# PLM 3.1: the diverse corpus makes facts extractable in phrasings never trained on (greedy exact match)
DIVERSITY = [
    Rule("reproduced (2 s.e. = {exact_noise_pct:.1f} points)", lambda m: m.exact_beats),
    Rule("not reproduced: all at the floor (2 s.e. = {exact_noise_pct:.1f} points)",
         lambda m: max(m.exact("raw"), m.exact("rw10")) < 0.02),
    Rule("within noise (2 s.e. = {exact_noise_pct:.1f} points)", lambda m: m.exact_within),
    Rule("not reproduced: reversed (2 s.e. = {exact_noise_pct:.1f} points)"),
]
# The SFT QA probe means something only when the fine-tune answers its own people
SFT_ORDER = [
    Rule("probe failed: QA-train accuracy {min_train:.0%} < 90% (the fine-tune does not fit its own people)",
         lambda m: m.gate_failed),
    Rule("reproduced (2 s.e. = {sft_noise_pct:.1f} points)", lambda m: m.sft_beats("rw1", "raw") and m.sft_beats("rw10", "rw1")),
    Rule("partly: 10 rewrites beat raw beyond noise (2 s.e. = {sft_noise_pct:.1f} points)", lambda m: m.sft_beats("rw10", "raw")),
    Rule("not reproduced: within noise (2 s.e. = {sft_noise_pct:.1f} points)",
         lambda m: not m.sft_beats("raw", "rw10")),
    Rule("not reproduced: reversed (2 s.e. = {sft_noise_pct:.1f} points)"),
]


def labels(K: dict) -> dict[str, str]:
    e = K["epoch_scale"]
    return {"raw": f"raw x {10 * e} epochs", "rw1": f"1 rewrite x {10 * e} epochs",
            "rw10": f"10 rewrites x {e} epoch{'s' if e > 1 else ''}"}


# ----------------------------------------------------------------------------- plots


def plots(ctx: Context, m: Measurement) -> list[str]:
    ks, p = list(CORPORA), plt()
    fig, axes = p.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 3, 2]})
    x = np.arange(3)
    names = [labels(SIZES[ctx.preset])[k] for k in ks]
    for ax, key, scale, ylabel in ((axes[0], "logprob", 1, "mean log P(gold value) per fact (nats)"),
                                   (axes[1], "exact", 100, "greedy exact match (%)")):
        for s in SEEDS:
            vals = [scale * m.probe[label(k, s)][key].mean() if label(k, s) in m.probe else np.nan for k in ks]
            ax.plot(x, vals, "o", ms=8 - 3 * s, label=f"seed {s}")
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    axes[0].set_title(f"knowledge probe, base models ({len(m.facts)} facts; paired)", fontsize=9)
    axes[1].set_title("same prompts, greedy", fontsize=9)
    w = 0.27
    axes[2].bar(x - w, [PAPER["table1"][k] for k in ks], w, color="gray", label="K2 Table 1 (SimpleQA)")
    axes[2].bar(x, [100 * m.acc[k] for k in ks], w, label="held-out QA after SFT")
    axes[2].bar(x + w, [100 * (m.acc_train[k] or 0) for k in ks], w, label="QA-train people (gate 90%)")
    axes[2].set_xticks(x, names, fontsize=7)
    axes[2].set_ylabel("%")
    axes[2].legend(fontsize=7)
    for a in axes:
        a.grid(alpha=0.3, axis="y")
    return [save(fig, ctx.report_dir / "rephrasing.png")]


# ----------------------------------------------------------------------------- report


def section(ctx: Context, m: Measurement, plots: list[str]) -> list[str]:
    K, ks, names = SIZES[ctx.preset], list(CORPORA), labels(SIZES[ctx.preset])
    body = [
        f"Physics of Language Models 3.1's protocol on the synthetic world: {K['world']} people, one permuted biography "
        "each (no math documents). Pre-train on all biographies (no validation hold-out) from three corpora at equal "
        f"tokens ({m.steps} steps x {K['batch']} x {K['seq']} = {m.budget:,} tokens: one pass over the 10-rewrite corpus"
        f"{' x ' + str(K['epoch_scale']) if K['epoch_scale'] > 1 else ''}). The end points (raw, 10 rewrites) are trained "
        "at two seeds.",
        "",
        "**Primary measure: a knowledge probe of the base models, no fine-tune** (`k2 eval --suite knowledge-probe`). For "
        "every person and attribute, a sentence in one of two phrasings that no training text uses (no word trigram "
        "shared with the biography templates, the QA questions, the rewriter's styles or the math problems; tested) ends "
        "just before the value; the probe scores log P(gold value) teacher-forced and whether greedy decoding writes the "
        "value. Scores are averaged over the two phrasings per fact; both QA halves are pooled (the base model saw every "
        "biography alike). Arms are compared fact by fact (paired): the noise of a difference is the larger of the paired "
        "standard error and the seed spread of the end points' difference (seeds averaged at the end points).",
        "",
        "| corpus | corpus tokens | exposures per person | log P(value), nats | per token | greedy exact | value-token recall |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in ks:
        seeds = " / ".join(f"{m.probe[label(k, s)]['logprob'].mean():.2f}" for s in m.seeds(k))
        body.append(f"| {names[k]} | {m.tokens[k]:,} | {m.budget / m.tokens[k] * DOCS_PER_PERSON[k]:.0f} | "
                    f"{m.lp(k):.3f} (seeds {seeds}) | {m.mean(k, 'logprob_per_token'):.3f} | "
                    f"{100 * m.exact(k):.1f}% (2 s.e. {200 * m.exact_se(k):.1f}) | {100 * m.mean(k, 'token_acc'):.1f}% |")
    body += ["",
             "Paired differences of log P(gold value) per fact (nats; positive: the first arm knows more):", "",
             "| comparison | difference | 2 s.e. paired (seed 0) | 2 x seed sd (end points) | noise used, 2 s.e. | beyond noise |",
             "|---|---:|---:|---:|---:|---|"]
    for a, b in (("rw1", "raw"), ("rw10", "rw1"), ("rw10", "raw")):
        sd = m.seed_sd
        body.append(f"| {names[a]} - {names[b]} | {m.lp_diff(a, b):+.3f} | {2 * m.paired(a, b)[1]:.3f} | "
                    f"{fmt(sd and 2 * sd, '.3f')} | {2 * m.lp_noise(a, b):.3f} | {'no' if m.lp_within(a, b) else 'yes'} |")
    body += ["", "Greedy exact match by attribute (seed 0):", "",
             "| attribute | " + " | ".join(names[k] for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    attrs = sorted({a for _, a in m.facts})
    for attr in attrs:
        idx = [i for i, (_, a) in enumerate(m.facts) if a == attr]
        body.append(f"| {attr} | " + " | ".join(f"{100 * m.probe[k]['exact'][idx].mean():.0f}%" for k in ks) + " |")
    body += ["",
             f"**SFT QA probe (PLM 3.1), gated:** each seed-0 model QA-fine-tuned ({K['sft_steps']} steps, lr {K['sft_lr']}) on "
             "the QA-train half, then asked the held-out half (greedy, exact match). Its held-out accuracy counts only "
             f"if every fine-tune answers its own QA-train people at >= {SFT_GATE:.0%}; otherwise the row says \"probe failed\".",
             "",
             "| corpus | QA-train people (gate) | held-out QA | 2 s.e. | K2 Table 1 |", "|---|---:|---:|---:|---:|"]
    for k in ks:
        body.append(f"| {names[k]} | {fmt(m.acc_train[k] and 100 * m.acc_train[k], '.1f')}% | {100 * m.acc[k]:.1f}% | "
                    f"{200 * m.sft_se(k):.1f} | {PAPER['table1'][k]:.2f} |")
    body += ["", f"{m.n_test} held-out questions per SFT model (binomial standard errors).", "", f"![rephrasing]({plots[0]})"]
    return body


def summary(ctx: Context, m: Measurement) -> list[list[str]]:
    ks = list(CORPORA)
    table1 = " / ".join(f"{PAPER['table1'][k]:.2f}" for k in ks)
    return [
        ["rephrasing beats repeating: raw x10 < 1 rewrite x10 < 10 rewrites x1 (base-model probe: log P(gold value), nats)",
         table1, " / ".join(f"{m.lp(k):.2f}" for k in ks), judge(TABLE1_ORDER, m)],
        ["diverse text makes knowledge extractable (PLM 3.1 bioS; probe greedy exact match on unseen phrasings, %)",
         f"{PAPER['bios']['none']:g} (1 bio) vs {PAPER['bios']['multi5_permute_fullname']:g} (multi5+permute+fullname)",
         f"{100 * m.exact('raw'):.1f} (raw) vs {100 * m.exact('rw10'):.1f} (10 rewrites)", judge(DIVERSITY, m)],
        ["rephrasing beats repeating after QA fine-tuning (held-out QA, %; gate: QA-train >= 90%)",
         table1, " / ".join(f"{100 * m.acc[k]:.1f}" for k in ks) + f" (QA-train min {100 * m.min_train:.0f})",
         judge(SFT_ORDER, m)],
    ]
