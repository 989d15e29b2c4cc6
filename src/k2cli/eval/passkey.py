"""`passkey`: long-context retrieval and loss by position (the YaRN repository's protocol).

Passkey retrieval (jquesnelle/yarn eval/passkey.py), built in token space so that a prompt is
exactly the requested length:

    <|endoftext|> filler ... (the five-sentence "grass is green" text, repeated)
    \\n The pass key is K. Remember it. K is the pass key. \\n        <- at depth d of the filler
    filler ...
    \\n What is the pass key? The pass key is                       -> greedy, 10 tokens, first integer

K is a random 5-digit number from a seeded RNG (one stream per length and depth cell). The YaRN
script's one-line task description ("There is an important info hidden inside...") is left out:
a base model cannot follow instructions, and for the tiny model it alone takes about 90 tokens,
most of a 0.5x (128-token) prompt.

Lengths are multiples of the model's ORIGINAL context (rope_scaling.original_max_position_embeddings;
the unscaled context for a plain model; the extend-context parent's context for a model extended
without scaling), so models extended in different ways are measured at the same absolute lengths. All trials of one length have the same length: they are batched without
padding through the latent-KV-cache generator.

Loss by position: held-out documents (the pretrain validation split found in the lineage)
concatenated into sequences of the longest passkey length; the per-token loss is averaged
over sequences and binned by position. A model that extrapolates keeps a flat curve past its
original context; one that does not blows up there.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from k2cli import lineage
from k2cli.errors import K2Error
from k2cli.eval.suite import SuiteResult, register
from k2cli.model.generate import generate

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
NEW_TOKENS = 10  # greedy continuation length (a 5-digit key is at most 5 tokens after a space)
MAX_MULTIPLE = 16.0  # the longest length this suite builds, in multiples of the original context
MIN_FILLER = 8  # a prompt needs some filler to hide the key in


# ----------------------------------------------------------------------------- which context is "original"


def original_context(model_cfg, model_art=None, override: int = 0) -> int:
    """The context the model was pre-trained at: what the passkey lengths are multiples of."""
    if override:
        return int(override)
    rs = model_cfg.rope_scaling
    if rs is not None:
        return int(rs.original_max_position_embeddings)
    if model_art is not None:  # extended without scaling ("none"): the stage records its parent's context
        node = lineage.nearest(model_art, lambda n: bool(n.metrics.get("original_context")))
        if node is not None:
            return int(node.metrics["original_context"])
    return int(model_cfg.max_position_embeddings)


def passkey_lengths(orig: int, multiples) -> list[int]:
    if not multiples:
        raise K2Error("eval.passkey_lengths is empty", "give multiples of the original context, e.g. [0.5, 1, 2, 4]")
    out = []
    for m in multiples:
        if not 0 < m <= MAX_MULTIPLE:
            raise K2Error(f"passkey length {m:g}x the original context ({orig} tokens) is outside what the suite allows",
                          f"use multiples in (0, {MAX_MULTIPLE:g}]")
        out.append(int(round(m * orig)))
    return sorted(set(out))


def check_depths(depths) -> list[float]:
    if not depths:
        raise K2Error("eval.passkey_depths is empty", "give depths between 0 and 1, e.g. [0.1, 0.5, 0.9]")
    for d in depths:
        if not 0 <= d <= 1:
            raise K2Error(f"passkey depth {d:g} is outside [0, 1]", "a depth is the key's position in the filler: 0 = start, 1 = end")
    return sorted(set(float(d) for d in depths))


# ----------------------------------------------------------------------------- prompts


class PromptBuilder:
    """Token-exact passkey prompts for one tokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.head = [tokenizer.eot_id]  # a document start
        self.tail = tokenizer.encode("\n" + QUESTION)
        self.unit = tokenizer.encode(FILLER + " ")  # one repetition of the filler

    def key_line(self, key: int) -> list[int]:
        return self.tok.encode("\n" + KEY_LINE.format(key=key) + "\n")

    def fixed_length(self, key: int = 99999) -> int:
        return len(self.head) + len(self.key_line(key)) + len(self.tail)

    def check_length(self, length: int) -> None:
        need = self.fixed_length() + MIN_FILLER
        if length < need:
            raise K2Error(f"a passkey prompt of {length} tokens cannot be built: the key line and question alone "
                          f"take {need - MIN_FILLER} tokens (plus {MIN_FILLER} of filler)",
                          f"use lengths of at least {need} tokens (raise eval.passkey_lengths or eval.passkey_context)")

    def filler(self, n: int) -> list[int]:
        reps = n // len(self.unit) + 1
        return (self.unit * reps)[:n]

    def build(self, length: int, depth: float, key: int) -> list[int]:
        line = self.key_line(key)
        n_filler = length - len(self.head) - len(line) - len(self.tail)
        if n_filler < MIN_FILLER:
            self.check_length(length)
        before = int(round(depth * n_filler))
        # the filler after the key restarts the text, as the reference does (garbage_inf[:n_suffix])
        ids = self.head + self.filler(before) + line + self.filler(n_filler - before) + self.tail
        assert len(ids) == length, (len(ids), length)
        return ids


def cell_keys(seed: int, length: int, depth: float, trials: int) -> list[int]:
    rng = random.Random(f"passkey:{seed}:{length}:{depth:.4f}")
    return [rng.randint(10000, 99999) for _ in range(trials)]


def first_integer(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


@torch.no_grad()
def run_passkey(model, tokenizer, lengths: list[int], depths: list[float], trials: int, seed: int, batch_size: int,
                orig: int, progress=None) -> list[dict]:
    """One row per (length, depth) cell: trials, correct, accuracy, and a sample answer."""
    builder = PromptBuilder(tokenizer)
    for L in lengths:
        builder.check_length(L)
    rows = []
    for L in lengths:
        cells = [(d, k, builder.build(L, d, k)) for d in depths for k in cell_keys(seed, L, d, trials)]
        answers: list[str] = []
        # long prompts: fewer per batch, so memory stays bounded by batch_size x the original context
        per_batch = max(1, int(batch_size * orig // max(L, orig)))
        for start in range(0, len(cells), per_batch):
            batch = [c[2] for c in cells[start : start + per_batch]]
            gens = generate(model, batch, max_new_tokens=NEW_TOKENS, temperature=0.0)
            answers += [tokenizer.decode(g) for g in gens]
            if progress is not None:
                progress(len(batch))
        for d in depths:
            idx = [i for i, c in enumerate(cells) if c[0] == d]
            correct = sum(first_integer(answers[i]) == cells[i][1] for i in idx)
            rows.append({"kind": "passkey", "length": L, "multiple": round(L / orig, 3), "depth": d, "trials": len(idx),
                         "correct": int(correct), "accuracy": correct / len(idx),
                         "example": f"key {cells[idx[0]][1]} -> {answers[idx[0]].strip()[:24]!r}"})
    return rows


def accuracy_by_length(rows: list[dict]) -> dict[int, tuple[int, int]]:
    """length -> (correct, trials) over all depths."""
    out: dict[int, list[int]] = {}
    for r in rows:
        if r.get("kind", "passkey") != "passkey":
            continue
        c = out.setdefault(r["length"], [0, 0])
        c[0] += r["correct"]
        c[1] += r["trials"]
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def passkey_metrics(rows: list[dict], orig: int) -> dict:
    by_len = accuracy_by_length(rows)
    m = {f"accuracy_{L}": c / n for L, (c, n) in by_len.items()}
    total_c, total_n = sum(c for c, _ in by_len.values()), sum(n for _, n in by_len.values())
    m["accuracy"] = total_c / max(total_n, 1)
    within = [(c, n) for L, (c, n) in by_len.items() if L <= orig]
    beyond = [(c, n) for L, (c, n) in by_len.items() if L > orig]
    if within:
        m["accuracy_within"] = sum(c for c, _ in within) / sum(n for _, n in within)
    if beyond:
        m["accuracy_beyond"] = sum(c for c, _ in beyond) / sum(n for _, n in beyond)
    m["trials_per_length"] = max((n for _, n in by_len.values()), default=0)
    return m


# ----------------------------------------------------------------------------- loss by position


@torch.no_grad()
def position_loss(model, tokenizer, texts: list[str], length: int, n_seq: int, seed: int, batch_size: int,
                  n_bins: int = 16) -> tuple[list[dict], bool]:
    """Mean loss per position bin over `n_seq` sequences of `length` tokens of concatenated texts.

    Returns (rows, repeated): `repeated` says the held-out text was too short for one sequence
    and repeats within it (later positions can then copy, which flatters their loss)."""
    docs = [d for d in (tokenizer.encode(t) for t in texts) if d]
    if not docs:
        return [], False
    rng = np.random.default_rng(seed)
    seqs, repeated = [], False
    for _ in range(n_seq):
        stream = [tokenizer.eot_id]
        used = 0
        while len(stream) < length + 1:
            for i in rng.permutation(len(docs)):
                stream += docs[i] + [tokenizer.eot_id]
                used += 1
                if len(stream) >= length + 1:
                    break
            repeated |= used > len(docs)
        seqs.append(stream[: length + 1])
    tokens = torch.tensor(seqs, dtype=torch.long)
    device = next(model.parameters()).device
    per_batch = max(1, batch_size // 2)
    losses = []
    for s in range(0, len(tokens), per_batch):
        rows = tokens[s : s + per_batch].to(device)
        logits = model(rows[:, :-1])
        losses.append(F.cross_entropy(logits.transpose(1, 2).float(), rows[:, 1:], reduction="none").cpu())
    loss = torch.cat(losses).mean(0)  # [length]: target position t+1 predicted from positions 0..t
    edges = np.linspace(0, length, n_bins + 1).astype(int)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            out.append({"kind": "position_loss", "start": int(a), "end": int(b), "loss": float(loss[a:b].mean())})
    return out, repeated


def loss_metrics(rows: list[dict], orig: int) -> dict:
    within = [r["loss"] * (r["end"] - r["start"]) for r in rows if r["end"] <= orig]
    n_within = sum(r["end"] - r["start"] for r in rows if r["end"] <= orig)
    beyond = [r["loss"] * (r["end"] - r["start"]) for r in rows if r["start"] >= orig]
    n_beyond = sum(r["end"] - r["start"] for r in rows if r["start"] >= orig)
    m = {}
    if n_within:
        m["loss_within"] = sum(within) / n_within
    if n_beyond:
        m["loss_beyond"] = sum(beyond) / n_beyond
    if rows:
        m["loss_last_bin"] = rows[-1]["loss"]
    return m


# ----------------------------------------------------------------------------- tables and plots


def table_md(results: list[tuple[str, list[dict]]], orig: int) -> str:
    """Accuracy by length (rows) for one or more models (columns), as markdown."""
    lengths = sorted({L for _, rows in results for L in accuracy_by_length(rows)})
    head = "| length | x original | " + " | ".join(label for label, _ in results) + " |"
    lines = [head, "|---:|---:|" + "---:|" * len(results)]
    for L in lengths:
        cells = []
        for _, rows in results:
            c, n = accuracy_by_length(rows).get(L, (0, 0))
            cells.append(f"{c / n:.0%} ({c}/{n})" if n else "-")
        lines.append(f"| {L} | {L / orig:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmaps(results: list[tuple[str, list[dict]]], path: Path, orig: int, train_len: int | None = None) -> Path:
    """One length x depth accuracy heat-map per model, side by side."""
    plt = _plt()
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(0.9 + 3.6 * n, 3.4), dpi=110, squeeze=False)
    im = None
    for ax, (label, rows) in zip(axes[0], results):
        rows = [r for r in rows if r.get("kind", "passkey") == "passkey"]
        lengths = sorted({r["length"] for r in rows})
        depths = sorted({r["depth"] for r in rows})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in rows:
            grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{L}\n{L / orig:g}x" for L in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        # the original context (and the training length) as vertical boundaries between columns
        for bound, style, name in ((orig, "-", "original"), (train_len, "--", "trained")):
            if bound and lengths and lengths[0] <= bound < lengths[-1]:
                x = max(j for j, L in enumerate(lengths) if L <= bound) + 0.5
                ax.axvline(x, color="black", ls=style, lw=1.2)
                ax.text(x, -0.6, f" {name}", fontsize=6, va="bottom")
        ax.set_xlabel("prompt length (tokens, x original)", fontsize=8)
        ax.set_ylabel("key depth", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, pad=0.02, label="accuracy")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_position_loss(results: list[tuple[str, list[dict]]], path: Path, orig: int, train_len: int | None = None) -> Path | None:
    results = [(label, [r for r in rows if r.get("kind") == "position_loss"]) for label, rows in results]
    if not any(rows for _, rows in results):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for label, rows in results:
        if rows:
            ax.plot([(r["start"] + r["end"]) / 2 for r in rows], [r["loss"] for r in rows], "o-", ms=3, lw=1, label=label)
    ax.axvline(orig, color="gray", ls="-", lw=1)
    ax.text(orig, ax.get_ylim()[1], " original context", fontsize=7, va="top", color="gray")
    if train_len and train_len != orig:
        ax.axvline(train_len, color="gray", ls="--", lw=1)
        ax.text(train_len, ax.get_ylim()[1], " trained length", fontsize=7, va="top", color="gray")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "model"


# ----------------------------------------------------------------------------- the suite


def check_request(tokenizer, orig: int, cfg) -> tuple[list[int], list[float]]:
    """(lengths, depths) of an EvalConfig, checked before any work: every prompt can be built."""
    lengths = passkey_lengths(orig, cfg.passkey_lengths)
    depths = check_depths(cfg.passkey_depths)
    if cfg.passkey_trials < 1:
        raise K2Error(f"eval.passkey_trials={cfg.passkey_trials} must be at least 1", "e.g. 10 trials per length and depth")
    builder = PromptBuilder(tokenizer)
    for L in lengths:
        builder.check_length(L)
    return lengths, depths


def evaluate(ctx, write_files: bool = True) -> tuple[SuiteResult, int]:
    """Run passkey + loss by position for ctx.model; returns (result, original context)."""
    from k2cli.eval.basic import heldout_texts

    cfg = ctx.cfg
    orig = original_context(ctx.model.config, ctx.model_art, cfg.passkey_context)
    lengths, depths = check_request(ctx.tokenizer, orig, cfg)
    rows = run_passkey(ctx.model, ctx.tokenizer, lengths, depths, cfg.passkey_trials, cfg.seed, cfg.batch_size, orig)
    metrics = passkey_metrics(rows, orig)
    notes = [f"passkey retrieval: {cfg.passkey_trials} trials x {len(depths)} depths per length; lengths "
             + ", ".join(f"{L} ({L / orig:g}x)" for L in lengths) + f" of the original context {orig}"]
    loss_rows: list[dict] = []
    if cfg.position_loss_sequences > 0:
        texts, how = heldout_texts(ctx)
        if texts:
            loss_rows, repeated = position_loss(ctx.model, ctx.tokenizer, texts, max(lengths), cfg.position_loss_sequences,
                                                cfg.seed, cfg.batch_size)
            metrics |= loss_metrics(loss_rows, orig)
            notes.append(f"loss by position: {cfg.position_loss_sequences} sequences of {max(lengths)} tokens of {how}"
                         + (" (the held-out text repeats within a sequence)" if repeated else ""))
        else:
            notes.append(f"loss by position skipped: {how}")
    plots = []
    if write_files:
        name = safe_name(ctx.label)
        plots.append(plot_heatmaps([(ctx.label, rows)], ctx.out_dir / f"passkey-{name}.png", orig))
        p = plot_position_loss([(ctx.label, loss_rows)], ctx.out_dir / f"position-loss-{name}.png", orig)
        if p is not None:
            plots.append(p)
        (ctx.out_dir / f"passkey-{name}.md").write_text(table_md([(ctx.label, rows)], orig))
    return SuiteResult(metrics=metrics, rows=rows + loss_rows, plots=plots, notes=notes), orig


@register
class Passkey:
    name = "passkey"
    description = "passkey retrieval by length x depth (0.5x-4x the original context) and held-out loss by position"

    def applies(self, ctx):
        return None  # needs only the model and its tokenizer; loss by position is skipped without held-out text

    def run(self, ctx) -> SuiteResult:
        return evaluate(ctx)[0]
