"""`k2 extend-context MODEL --factor S --seq-len L`: stretch a model's context, then train at the new length.

    model artifact (pretrained; or extended, with --reextend)
      -> RoPE scaling in the config: YaRN (NTK-by-parts ramp between beta_slow and beta_fast
         rotations + attention temperature mscale), or linear / NTK / none for comparison;
         original_max_position_embeddings = the current context, max_position_embeddings x S
      -> training rows at the new length: the pre-training corpus (found in the lineage),
         long documents and retrieval rows (data/long_context.py), mixed by recipe fractions
      -> the shared training loop (MuonClip, schedule, checkpoints, exact resume)
      -> a model artifact (weights, tokenizer, metrics.jsonl, plots, summary.md) with the
         passkey heat-map, table and loss-by-position of the parent and the extended model

Kimi K2 pre-trained at 4K, then extended to 32K with YaRN (beta_fast = beta_slow = 1); DeepSeek-V3
uses beta_fast 32, beta_slow 1. Training at a length between the original and the new maximum
(tiny: a parent that already retrieves within 256 tokens, trained at 512, factor 4) and evaluating up
to the maximum shows what YaRN buys: retrieval and held-out loss hold to 4x, twice the trained length,
where plain RoPE's fall apart past the trained length (docs/extend-context.md).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import rich_click as click

from k2cli.commands.common import recipe_options, run_options
from k2cli.console import info
from k2cli.data.lm_data import DataConfig, build_lm_data, load_documents, split_token_documents
from k2cli.data.long_context import LongDataConfig, build_long_context_data, find_world
from k2cli.errors import K2Error, did_you_mean
from k2cli.eval.suite import EvalConfig, EvalContext, get_suite
from k2cli.lineage import corpus_split
from k2cli.model.config import ModelConfig, RopeScaling
from k2cli.model.transformer import build_model
from k2cli.optim.muon import OptimConfig
from k2cli.optim.schedule import ScheduleConfig
from k2cli.stages.runner import RunOptions, Stage, load_parent
from k2cli.train.lm_task import LMTask
from k2cli.train.loop import TrainConfig

METHODS = ("yarn", "linear", "ntk", "none")


@dataclass
class ExtendConfig:
    method: str = "yarn"  # yarn | linear | ntk | none (plain extrapolation: positions raised, no scaling)
    factor: float = 4.0  # max_position_embeddings = current context x factor
    beta_fast: float = 32.0  # YaRN: pairs making more rotations than this over the original context keep their frequency
    beta_slow: float = 1.0  # YaRN: pairs making fewer are interpolated by the factor (K2: 1 and 1)
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    reextend: bool = False  # allow extending a model that already has rope scaling

    def validate(self):
        if self.method not in METHODS:
            raise K2Error(f"unknown extension method '{self.method}'", did_you_mean(self.method, METHODS))
        if not self.factor > 1:
            raise K2Error(f"the extension factor must be > 1, got {self.factor:g}", "use e.g. --factor 4 (the context grows 4x)")
        if self.method == "yarn" and self.beta_fast < self.beta_slow:
            raise K2Error(f"yarn needs beta_fast >= beta_slow, got {self.beta_fast:g} < {self.beta_slow:g}",
                          "K2 uses 1 and 1, DeepSeek-V3 32 and 1")


@dataclass
class ExtendRecipe:
    seed: int = 0
    model: str = "pretrain:latest"  # the model to extend
    extend: ExtendConfig = field(default_factory=ExtendConfig)
    data: LongDataConfig = field(default_factory=LongDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-3))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10, decay_fraction=0.3))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=150, batch_size=8, seq_len=512))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(suites=["passkey"]))
    eval_parent: bool = True  # also evaluate the parent, for before/after (costs one more evaluation)


# ----------------------------------------------------------------------------- the new config


def extended_config(cfg: ModelConfig, ext: ExtendConfig, seq_len: int) -> tuple[ModelConfig, int]:
    """(the extended config, the original context). Checks the request against the model."""
    ext.validate()
    current = cfg.max_position_embeddings
    rs = cfg.rope_scaling
    if rs is not None and not ext.reextend:
        raise K2Error(f"the model already has {rs.type} rope scaling (factor {rs.factor:g} over an original context of "
                      f"{rs.original_max_position_embeddings}, now {current} positions)",
                      "pass --reextend to extend it further (the factors multiply), or extend its parent instead")
    if rs is not None and ext.method == "none":
        raise K2Error("--method none cannot re-extend a model that has rope scaling (it would drop the scaling it was trained with)",
                      "use --method yarn, linear or ntk")
    orig = rs.original_max_position_embeddings if rs is not None else current
    total = (rs.factor if rs is not None else 1.0) * ext.factor
    new_max = int(round(current * ext.factor))
    if seq_len <= current:
        raise K2Error(f"sequence length {seq_len} is not larger than the model's current context ({current} tokens)",
                      f"extension trains on longer sequences: pass --seq-len between {current + 1} and {new_max}")
    if seq_len > new_max:
        raise K2Error(f"sequence length {seq_len} is beyond the extended context ({current} x {ext.factor:g} = {new_max})",
                      f"lower --seq-len to at most {new_max} or raise --factor")
    if ext.method == "yarn":
        scaling = RopeScaling("yarn", total, orig, ext.beta_fast, ext.beta_slow, ext.mscale, ext.mscale_all_dim)
    elif ext.method in ("linear", "ntk"):
        scaling = RopeScaling(ext.method, total, orig)
    else:
        scaling = None
    new = dataclasses.replace(cfg, max_position_embeddings=new_max, rope_scaling=scaling).validate()
    return new, orig


# ----------------------------------------------------------------------------- evaluation before/after


def evaluate_pair(pairs, tokenizer, parent_art, data_art, cfg: EvalConfig, out_dir: Path, orig: int, train_len: int):
    """Run the eval suites on [(label, model)]; passkey outputs are combined into one table and figure."""
    from k2cli.eval import passkey

    cfg = dataclasses.replace(cfg, passkey_context=cfg.passkey_context or orig)
    results = {label: {} for label, _ in pairs}
    passkey_rows = []
    for name in cfg.suites:
        suite = get_suite(name)
        for label, model in pairs:
            ctx = EvalContext(model, tokenizer, parent_art, data_art, cfg, out_dir, label)
            reason = suite.applies(ctx)
            if reason:
                info(f"[yellow]skip[/] {name} on {label}: {reason}")
                continue
            info(f"[bold]{name}[/] on {label} ...")
            if name == "passkey":
                r, _ = passkey.evaluate(ctx, write_files=False)
                passkey_rows.append((label, r.rows))
            else:
                r = suite.run(ctx)
            results[label][name] = r.metrics
    files = []
    if passkey_rows:
        pk = [(label, [r for r in rows if r["kind"] == "passkey"]) for label, rows in passkey_rows]
        files.append(passkey.plot_heatmaps(pk, out_dir / "passkey.png", orig, train_len))
        p = passkey.plot_position_loss(passkey_rows, out_dir / "position-loss.png", orig, train_len)
        if p is not None:
            files.append(p)
        (out_dir / "passkey.md").write_text(passkey.table_md(pk, orig))
        (out_dir / "passkey.json").write_text(json.dumps({label: rows for label, rows in passkey_rows}, indent=1) + "\n")
    return results, files, [(label, [r for r in rows if r["kind"] == "passkey"]) for label, rows in passkey_rows]


# ----------------------------------------------------------------------------- the stage


def run(recipe: ExtendRecipe, opts: RunOptions = RunOptions()):
    t0 = time.time()
    with Stage("extend-context", "model", recipe, opts) as st:
        parent, model_art, tokenizer = load_parent(recipe.model, "extend a model made by k2 pretrain")
        cfg, orig = extended_config(parent.config, recipe.extend, recipe.train.seq_len)
        seq_len = recipe.train.seq_len
        if "passkey" in recipe.eval.suites:  # a bad passkey request fails now, not after training
            from k2cli.eval.passkey import check_request

            check_request(tokenizer, recipe.eval.passkey_context or orig, recipe.eval)

        # data: the corpus at the new length (split as the model's pre-training split it) + long documents + retrieval rows
        split = corpus_split(model_art, recipe.data.input, recipe.data.val_fraction, recipe.seed)
        ds, data_art, fingerprint = load_documents(DataConfig(input=split.corpus, text_field=recipe.data.text_field))
        if done := st.up_to_date([model_art, data_art]):
            return done
        world = find_world(recipe.data, data_art)
        lm = build_lm_data(ds, data_art, fingerprint, tokenizer, seq_len, split, split.seed)
        train_docs = split_token_documents(ds, fingerprint, tokenizer, split)[0]
        n_rows = recipe.data.rows or recipe.train.steps * recipe.train.batch_size
        data = build_long_context_data(lm, train_docs, tokenizer, world, seq_len, recipe.data, n_rows, recipe.seed)
        if recipe.train.batch_size > len(data.train):
            raise K2Error(f"train.batch_size={recipe.train.batch_size} but the mix has only {len(data.train)} rows",
                          "raise data.rows or lower train.batch_size")

        run_dir = st.run_dir([model_art.manifest["uid"], fingerprint])
        method = recipe.extend.method
        scale_txt = "no scaling" if cfg.rope_scaling is None else f"{method} x{cfg.rope_scaling.factor:g}"
        info(f"extend-context: {model_art.id} {parent.config.max_position_embeddings} -> {cfg.max_position_embeddings} positions "
             f"({scale_txt}, original {orig}); training at {seq_len}: "
             + ", ".join(f"{k} {v}" for k, v in data.counts.items()) + f" rows ({split.how}"
             + (", world" if world is not None else ", no world") + f"); run dir {run_dir}")
        model = build_model(cfg, seed=recipe.seed)
        model.load_state_dict(parent.state_dict())  # same weights; only the positions changed
        trained = st.train(model, LMTask(data.train, data.val if len(data.val) else None, recipe.train.batch_size, recipe.seed,
                                         recipe.train.eval_batches))
        val = trained.last("val_loss")
        train_wall = round(time.time() - t0, 1)

        with st.writer() as w:
            evals, files, pk = {}, [], []
            if recipe.eval.suites:
                pairs = ([("parent", parent)] if recipe.eval_parent else []) + [(f"{method}", trained.model)]
                evals, files, pk = evaluate_pair(pairs, tokenizer, model_art, data_art, recipe.eval, w.dir, orig, seq_len)
            w.metrics = {
                "method": method,
                "factor": cfg.rope_scaling.factor if cfg.rope_scaling else recipe.extend.factor,
                "original_context": orig,
                "context": cfg.max_position_embeddings,
                "seq_len": seq_len,
                "steps": recipe.train.steps,
                "train_tokens_seen": recipe.train.steps * recipe.train.batch_size * seq_len,
                "final_loss": trained.final.get("loss"),
                "final_val_loss": val,
                **{f"rows_{k}": v for k, v in data.counts.items()},
                **{f"{'parent_' if label == 'parent' else ''}{suite}_{k}": v for label, suites in evals.items()
                   for suite, m in suites.items() for k, v in m.items()},
                "train_wall_s": train_wall,
                "wall_s": round(time.time() - t0, 1),
            }
            summary = [
                f"- extended {model_art.id} from {parent.config.max_position_embeddings} to {cfg.max_position_embeddings} "
                f"positions with {scale_txt} (original context {orig})"
                + (f", beta_fast {recipe.extend.beta_fast:g}, beta_slow {recipe.extend.beta_slow:g}" if method == "yarn" else ""),
                f"- {recipe.train.steps} steps x {recipe.train.batch_size} x {seq_len} tokens with {recipe.optim.name} "
                f"(lr {recipe.optim.lr:g}); rows: " + ", ".join(f"{k} {v}" for k, v in data.counts.items()) + f"; corpus: {split.how}",
                f"- final validation loss {val:.4f} nats/token at length {seq_len}" if val is not None else "- no validation split",
            ]
            if pk:
                from k2cli.eval.passkey import table_md

                summary += ["", "## Passkey retrieval (accuracy by length, all depths)", "", table_md(pk, orig)]
                summary += [f"![{p.stem}]({p.name})" for p in files]
            st.write_model(w, trained, model_art.path, summary)
            acc = w.metrics.get(f"passkey_accuracy_{cfg.max_position_embeddings}")
            note = f", passkey at {cfg.max_position_embeddings}: {acc:.0%}" if acc is not None else ""
            art = w.commit(summary=f"{model_art.id} extended to {cfg.max_position_embeddings} ({scale_txt}){note}")
        info(f"[green]wrote[/] {art.path} ({art.id}) in {w.metrics['wall_s']} s (training {train_wall} s){note}")
        return art


@click.command("extend-context")
@click.argument("model", required=False)
@click.option("--factor", type=float, default=None, help="Context growth: max_position_embeddings = current x FACTOR (extend.factor).")
@click.option("--seq-len", type=int, default=None, help="Training sequence length, above the current context (train.seq_len).")
@click.option("--method", type=click.Choice(METHODS), default=None, help="RoPE scaling: yarn (default), linear, ntk, or none.")
@click.option("--reextend", is_flag=True, help="Allow extending a model that already has rope scaling.")
@recipe_options("extend_context", ExtendRecipe)
@run_options(resume=True)
def extend_context_cmd(model, factor, seq_len, method, reextend, recipe, recipe_source, opts):
    """Extend MODEL's context (default: the recipe's `model`) with YaRN, then train at --seq-len.

    The passkey heat-map and loss by position of the parent and the extended model go into the
    artifact. The same command on the same inputs continues from its last checkpoint.
    """
    if model:
        recipe = dataclasses.replace(recipe, model=model)
    ext = recipe.extend
    if factor is not None:
        ext = dataclasses.replace(ext, factor=factor)
    if method is not None:
        ext = dataclasses.replace(ext, method=method)
    if reextend:
        ext = dataclasses.replace(ext, reextend=True)
    recipe = dataclasses.replace(recipe, extend=ext)
    if seq_len is not None:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, seq_len=seq_len))
    run(recipe, opts)


COMMANDS = [extend_context_cmd]
