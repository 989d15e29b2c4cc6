"""What every experiment of `make reproduce` shares, top to bottom:

  1. PRESETS, PAPER  what experiments share (base recipe, corpus, experiment 1's run shape; each module sizes
                     itself in its SIZES) and the paper's numbers each result is set beside
  2. K2              the ONLY way an experiment trains or evaluates anything: a subprocess
                     `k2 --root ROOT --reuse <stage> --recipe recipes/<base>/<stage>.toml --set ...`,
                     logged, timed and kept in a ledger (ROOT/ledger.json) that the report quotes
  3. Context         one invocation's state (preset, roots, runner) and the steps several experiments
                     share: the corpus and tokenizer, a pretraining run, experiment 1's MuonClip baseline
  4. readers         numbers read back from artifacts, through the package's read-only API
                     (`k2cli.artifacts.open_artifact`, `read_metrics`, `read_config`, `load_corpus`)
  5. plotting        matplotlib without a display, one call to save a figure into the report

An experiment module (reproduce/experiments/*.py) uses these; run.py strings the experiments together.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ----------------------------------------------------------------------------- 1. presets
#
# What experiments share: the base recipe, the corpus, and the pretraining run of experiment 1 that
# later experiments start from. Token budgets are the unit: a run is steps x batch x seq_len tokens.
# Each experiment module sizes its own runs in its SIZES dict (same preset keys). The cpu preset is
# sized for at most 45 minutes on 2 idle cores (measured per experiment in REPORT.md).

PRESETS: dict[str, dict] = {
    "quick": dict(
        base="micro",  # recipes/micro/*.toml
        world=40, rewrites=2, vocab=512,
        batch=4, seq=128, steps=12, eval_every=4, lr=0.01,
        seeds=[0],
    ),
    "cpu": dict(
        base="tiny",  # recipes/tiny/*.toml: the tiny (1.9M-parameter) MLA+MoE model
        world=400, rewrites=4, vocab=2048,
        batch=8, seq=256, steps=300, eval_every=25, lr=0.01,
        seeds=[0, 1],  # the MuonClip baseline twice: the seed-to-seed spread is the noise floor
    ),
    "gpu": dict(
        base="small",  # recipes/small/*.toml: the small (116M total, 39M active) model on one GPU
        world=2000, rewrites=4, vocab=16384,
        batch=32, seq=1024, steps=1000, eval_every=50, lr=0.006,
        seeds=[0, 1, 2],
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


def was_up_to_date(log_text: str) -> bool:
    """Did `k2 --reuse` skip this step? The ONE place that knows how k2 says so: the stage layer prints
    "up to date: <artifact>" when the latest artifact already has this recipe and these inputs."""
    return "up to date:" in log_text


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
        reused = was_up_to_date(text)
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


def with_sets(*args, sets=()) -> list[str]:
    """`args` followed by one `--set KEY=VALUE` per override, the shape of every recipe command."""
    out = [str(a) for a in args]
    for s in sets:
        out += ["--set", s]
    return out


# ----------------------------------------------------------------------------- 3. one invocation


@dataclass
class Section:
    """One experiment's part of the report: markdown lines, summary rows, plot files, how it went."""

    key: str
    title: str
    body: list[str] = field(default_factory=list)  # markdown lines
    summary: list[list[str]] = field(default_factory=list)  # rows: claim, paper, measured, verdict
    plots: list[str] = field(default_factory=list)
    status: str = "done"  # done | skipped | failed
    wall_s: float = 0.0


class Skipped(Exception):
    """An experiment that cannot run in this build: the reason goes into its section and the summary."""

    def __init__(self, reason: str, summary: list[str]):
        super().__init__(reason)
        self.reason, self.summary = reason, summary


@dataclass
class Context:
    """What an experiment gets: the preset's knobs `P`, where artifacts and the report go, and the runner.
    Experiments share artifacts by name (the runner's --reuse makes a repeated command free)."""

    preset: str
    P: dict
    root: Path
    report_dir: Path
    k2: K2

    def recipe(self, stage: str) -> str:
        return f"recipes/{self.P['base']}/{stage}.toml"

    def base_data(self):
        """The K2 pipeline's corpus (world + biographies + math, rephrased) and one tokenizer, shared by 1, 4, 5."""
        P, k2 = self.P, self.k2
        k2("data", "synth", "--recipe", self.recipe("synth"), "--set", f"world.size={P['world']}", "--out", "data-synth")
        k2("rephrase", "data-synth:latest", "--recipe", self.recipe("rephrase"), "--set", f"rewrite.rewrites={P['rewrites']}",
           "--out", "data-rephrase")
        k2("tokenizer", "train", "data-rephrase:latest", "--vocab-size", P["vocab"], "--out", "data-tokenizer")

    def pretrain(self, name: str, *sets: str, steps: int | None = None, seed: int = 0) -> str:
        """One pretraining run of the shared shape on the shared corpus; `sets` are extra --set overrides
        (a later override of the same key wins, so `optim.lr=...` here replaces the preset's lr)."""
        P = self.P
        base = ["data.input=data-rephrase:latest", "tokenizer.ref=data-tokenizer:latest", f"seed={seed}",
                f"train.steps={steps or P['steps']}", f"train.batch_size={P['batch']}", f"train.seq_len={P['seq']}",
                f"train.eval_every={P['eval_every']}", f"optim.lr={P['lr']}"]
        self.k2(*with_sets("pretrain", "--recipe", self.recipe("pretrain"), sets=base + list(sets)), "--out", name)
        return name

    def baseline(self, seed: int | None = None) -> str:
        """Experiment 1's MuonClip run at `seed` (default: the first seed): the model experiments 4 and 5 start from."""
        seed = self.P["seeds"][0] if seed is None else seed
        return self.pretrain(f"opt-muonclip-s{seed}", "optim.name=muonclip", seed=seed)


# ----------------------------------------------------------------------------- 4. reading artifacts back
#
# `ROOT/<name>/latest` is the newest version of a named artifact. Everything below opens it with the
# package's read-only API, so the manifest is schema-checked exactly as `k2` itself reads it.


def artifact(root: Path, name: str):
    from k2cli.artifacts import open_artifact

    return open_artifact((root / name / "latest").resolve())


def metrics(root: Path, name: str) -> dict:
    """The flat metrics of an artifact's manifest (final_val_loss, params_total, wall_s, ...)."""
    return artifact(root, name).metrics


def recipe_value(root: Path, name: str, dotted: str):
    """A value of the resolved recipe an artifact was made with, e.g. 'extend.beta_fast'."""
    d = artifact(root, name).recipe
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def history(root: Path, name: str) -> list[dict]:
    """A training artifact's metrics.jsonl: one dict per logged step (the whole run, resumes included)."""
    from k2cli.train.progress import read_metrics

    return read_metrics(artifact(root, name).file("metrics.jsonl"))


def eval_results(root: Path, name: str) -> dict:
    """label -> suite -> metrics, from an eval artifact's results.json."""
    data = json.loads(artifact(root, name).file("results.json").read_text())
    return {m["label"]: {s: v.get("metrics", {}) for s, v in m["suites"].items()} for m in data["models"]}


def attention_heads(root: Path, name: str) -> int:
    """Attention heads of a model artifact, over all layers (the QK-Clip denominator)."""
    from k2cli.model.io import read_config

    cfg = read_config(artifact(root, name).path)
    return cfg.num_hidden_layers * cfg.num_attention_heads


def corpus_tokens(root: Path, dataset: str, tokenizer: str) -> int:
    """Tokens of a dataset artifact's corpus under a tokenizer artifact, one end-of-text per document
    (what pretraining packs): the corpus as `k2 pretrain` loads it, the tokenizer's own tokenizer.json."""
    import tokenizers

    from k2cli.data.loading import load_corpus

    tok = tokenizers.Tokenizer.from_file(str(artifact(root, tokenizer).file("tokenizer.json")))
    corpus, _ = load_corpus(str(artifact(root, dataset).path))
    texts = corpus["text"]
    return sum(len(e.ids) + 1 for e in tok.encode_batch(texts, add_special_tokens=False))


# ----------------------------------------------------------------------------- 5. plotting


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as p

    return p


def save(fig, path: Path) -> str:
    """Write a figure into the report directory; returns the file name the markdown links to."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt().close(fig)
    return path.name
