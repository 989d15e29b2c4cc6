"""Evaluation suites: one registry, one context, one result shape.

A suite measures one thing about a model (validation perplexity, held-out knowledge, passkey
retrieval, tool use, ...). It says whether it applies to a model (and why not), and returns
flat numeric metrics plus optional table rows and PNG plots written into the eval artifact.

    @register
    class Perplexity:
        name = "perplexity"
        description = "validation loss and bits per byte"
        def applies(self, ctx) -> str | None: ...   # None = applies; else the reason it does not
        def run(self, ctx) -> SuiteResult: ...

A suite family takes a parameter after a colon: `lm-eval:hellaswag,arc_easy` is the family
`lm-eval` (eval/lm_eval_bridge.py) built for the tasks "hellaswag,arc_easy". Its class has `family`,
`param` (how the parameter reads, for --list-suites), `description` and `__init__(self, arg, cfg)`
(which rejects a bad parameter; the instance is then a suite named `family:arg`), and registers with
`@register_family`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from k2cli.errors import K2Error, did_you_mean


@dataclass
class EvalConfig:
    """Recipe section `eval`: how much to evaluate (kept small by default for CPU)."""

    suites: list[str] = field(default_factory=lambda: ["perplexity", "knowledge", "math", "max_logit"])
    seed: int = 0
    max_examples: int = 100  # per suite, sampled deterministically
    samples: int = 1  # completions per prompt, for pass@k where sampling applies
    temperature: float = 0.8  # sampling temperature when samples > 1
    batch_size: int = 16
    max_new_tokens: int = 32
    seq_len: int = 256  # for perplexity
    data: str = ""  # dataset artifact with the held-out sets; empty = found in the model's lineage
    unsafe_sandbox: bool = False  # rl_envs: run model-written code where the OS offers no isolation (--unsafe-sandbox)
    # passkey suite (eval/passkey.py): lengths are multiples of the model's original context
    passkey_trials: int = 10  # trials per (length, depth) cell
    passkey_lengths: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 3.0, 4.0])
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    passkey_context: int = 0  # the original context the lengths multiply; 0 = the model's own
    position_loss_sequences: int = 8  # held-out sequences of the longest passkey length (0 = skip)
    lm_eval_include: str = ""  # lm-eval: a folder of extra task YAMLs (local datasets); "" = the harness's own tasks


@dataclass
class EvalContext:
    model: torch.nn.Module
    tokenizer: object
    model_art: object  # Artifact of the model
    data_art: object | None  # a dataset Artifact (qa_test/, math/, world.json, corpus/) or None
    cfg: EvalConfig
    out_dir: Path  # where plots go
    label: str  # a short name of the model for tables and plots
    corpus: str = ""  # --data naming text files (not an artifact): the corpus perplexity is measured on

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def model_stage(self) -> str:
        return self.model_art.stage

    @property
    def is_chat_model(self) -> bool:
        """SFT and RL models answer in the chat format; base models are prompted as text."""
        return self.model_art.stage in ("sft", "rl") or bool(self.model_art.manifest.get("metrics", {}).get("chat"))


@dataclass
class SuiteResult:
    metrics: dict  # flat: {"accuracy": 0.42, ...}
    rows: list = field(default_factory=list)  # optional detail rows (dicts)
    plots: list = field(default_factory=list)  # PNG paths inside ctx.out_dir
    notes: list = field(default_factory=list)  # sentences for the report
    files: list = field(default_factory=list)  # other files written into ctx.out_dir (e.g. every scored example)


SUITES: dict[str, object] = {}
FAMILIES: dict[str, type] = {}  # "lm-eval" -> a class built per parameter (`lm-eval:TASK,...`)


def register(cls):
    SUITES[cls.name] = cls()
    return cls


def register_family(cls):
    FAMILIES[cls.family] = cls
    return cls


def get_suite(name: str, cfg: EvalConfig | None = None):
    _load_builtin_suites()
    family, colon, arg = name.partition(":")
    if colon:
        if family not in FAMILIES:
            raise K2Error(f"unknown eval suite family '{family}'", did_you_mean(family, FAMILIES))
        return FAMILIES[family](arg, cfg or EvalConfig())
    if name not in SUITES:
        raise K2Error(f"unknown eval suite '{name}'", did_you_mean(name, list(SUITES) + [f"{f}:..." for f in FAMILIES]))
    return SUITES[name]


def parse_suites(text: str) -> list[str]:
    """`--suite` text -> suite names. A family's parameter runs on over commas until the next suite or
    family name: "perplexity,lm-eval:hellaswag,arc_easy,max_logit" -> perplexity,
    lm-eval:hellaswag,arc_easy, max_logit."""
    _load_builtin_suites()
    names: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if names and ":" in names[-1] and ":" not in part and part not in SUITES:
            names[-1] += "," + part
        else:
            names.append(part)
    return names


def all_suites() -> dict:
    """Every suite by name, each family as `family:PARAM` (for --list-suites)."""
    _load_builtin_suites()
    return SUITES | {f"{f}:{cls.param}": cls for f, cls in FAMILIES.items()}


def _load_builtin_suites():
    """Suites register themselves on import; modules missing from a build are skipped."""
    import importlib

    for module in ("k2cli.eval.basic", "k2cli.eval.knowledge", "k2cli.eval.knowledge_probe", "k2cli.eval.passkey", "k2cli.eval.agentic", "k2cli.eval.rl_envs",
                   "k2cli.eval.lm_eval_bridge"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
