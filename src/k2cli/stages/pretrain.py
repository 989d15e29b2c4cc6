"""`k2 pretrain`: train a tokenizer and an MLA+MoE model from scratch with MuonClip (or continue one: --init).

    corpus (dataset artifact or files)
      -> byte-level BPE tokenizer with K2's special tokens (or reuse one: tokenizer.ref; with
         --init MODEL, that model's tokenizer, shape and weights: continued pre-training, the
         tiny recipe's "midtrain" step)
      -> tokenise (cached), hold out validation documents, shuffle documents, pack rows
      -> optionally mix in retrieval-style rows (data.mix: needles, retrieval, copy; data/long_context.py)
         so the model learns to look things up within its context before any extension
      -> the shared training loop (MuonClip, warmup-stable-decay, MoE balancing)
      -> a model artifact: weights, config, tokenizer, metrics.jsonl, plots, summary.md
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import rich_click as click

from k2cli.artifacts import open_artifact
from k2cli.commands.common import recipe_options, run_options
from k2cli.console import info
from k2cli.data.loading import absolute_corpus_ref
from k2cli.data.lm_data import build_lm_data, load_documents, split_token_documents, training_texts
from k2cli.data.long_context import LongDataConfig, build_long_context_data, find_world
from k2cli.data.tokenizer import has_tokenizer, load_tokenizer, resolve_tokenizer, train_tokenizer
from k2cli.errors import K2Error
from k2cli.lineage import Split, corpus_split, split_record
from k2cli.model.config import ModelConfig, human
from k2cli.model.io import load_model
from k2cli.model.transformer import build_model
from k2cli.optim.muon import OptimConfig
from k2cli.optim.schedule import ScheduleConfig
from k2cli.stages.runner import RunOptions, Stage, check_fits
from k2cli.train.lm_task import LMTask
from k2cli.train.loop import TrainConfig, pick_device
from k2cli.train.mfu import warn_if_gpu_preset_on_cpu


@dataclass
class TokenizerConfig:
    vocab_size: int = 2048
    min_frequency: int = 2
    split_digits: bool = True  # every digit its own token (see data/tokenizer.py)
    ref: str = ""  # use this tokenizer instead of training one: a tokenizer/model artifact, an HF tokenizer directory, a tokenizer.json or a tiktoken.model


@dataclass
class PretrainDataConfig(LongDataConfig):
    """The corpus, and what else goes into the training rows. The default is the corpus alone; a mix
    such as {corpus = 0.7, needles = 0.1, retrieval = 0.1, copy = 0.1} adds rows that teach lookup
    within the pre-training length (the sources are the same as extend-context's)."""

    input: str = "rephrase:latest"  # a dataset artifact, a save_to_disk directory, or .txt/.jsonl/.parquet files
    mix: dict[str, float] = field(default_factory=lambda: {"corpus": 1.0})

    def corpus_only(self) -> bool:
        return all(v == 0 for k, v in self.mix.items() if k != "corpus")


@dataclass
class PretrainRecipe:
    seed: int = 0
    init: str = ""  # continue this model artifact (its tokenizer, shape and weights) instead of starting from scratch
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_preset("tiny"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def train_or_reuse_tokenizer(cfg: TokenizerConfig, texts_fn, cache: Path):
    """The tokenizer this run trained (saved in the run directory), or a new one trained on texts_fn()."""
    if (cache / "tokenizer.json").exists():
        return load_tokenizer(cache)
    tok = train_tokenizer(texts_fn(), cfg.vocab_size, cfg.min_frequency, cfg.split_digits)
    cache.mkdir(parents=True, exist_ok=True)
    tok.save(cache)
    return tok


def check_same_split(init_art, data_art, split: Split):
    """Continuing a model on the corpus it was pre-trained on must keep its held-out documents held out:
    the split is a function of (seed, data.val_fraction), so both must match the parent's."""
    if data_art is None:
        return
    parent = corpus_split(init_art, required=False)
    if parent is None:
        return  # no corpus in its lineage (e.g. an imported model): nothing to keep apart
    if parent.same_corpus(data_art.path) and (parent.seed, parent.val_fraction) != (split.seed, split.val_fraction):
        raise K2Error(f"{init_art.id} was pre-trained on this corpus split by seed {parent.seed} and val_fraction "
                      f"{parent.val_fraction:g}; seed={split.seed}, data.val_fraction={split.val_fraction:g} would train on "
                      "its held-out documents", f"set seed={parent.seed} and data.val_fraction={parent.val_fraction:g}")


def run(recipe: PretrainRecipe, opts: RunOptions = RunOptions()):
    t0 = time.time()
    # paths are recorded absolute, so later stages run from any directory find the same files
    ref = recipe.tokenizer.ref
    recipe = dataclasses.replace(
        recipe, data=dataclasses.replace(recipe.data, input=absolute_corpus_ref(recipe.data.input)),
        tokenizer=dataclasses.replace(recipe.tokenizer, ref=str(Path(ref).expanduser().resolve()) if ref and Path(ref).expanduser().exists() else ref))
    with Stage("pretrain", "model", recipe, opts) as st:
        # 1. data, and the documents held out of it (recorded in the manifest for later stages and evals)
        ds, data_art, fingerprint = load_documents(recipe.data)
        split = Split(str(data_art.path.resolve()) if data_art is not None else recipe.data.input, recipe.data.val_fraction,
                      recipe.seed, "this run's split")
        init, init_art = load_model(recipe.init, verify=True) if recipe.init else (None, None)
        if init_art is not None:
            if recipe.tokenizer.ref:
                raise K2Error(f"both init={recipe.init} and tokenizer.ref={recipe.tokenizer.ref}",
                              "drop tokenizer.ref: a continued model keeps its own tokenizer")
            if not has_tokenizer(init_art.path):
                raise K2Error(f"model {init_art.id} has no tokenizer", "continue a model made by k2 pretrain")
            check_same_split(init_art, data_art, split)
        # a tokenizer given (tokenizer.ref: an artifact, an HF tokenizer directory, a tokenizer.json or a
        # tiktoken.model), or the continued model's; otherwise one is trained below
        tokenizer, tok_art = (load_tokenizer(init_art.path), init_art) if init_art else \
            resolve_tokenizer(recipe.tokenizer.ref) if recipe.tokenizer.ref else (None, None)
        if done := st.up_to_date([data_art, tok_art]):  # with --init, tok_art is the continued model
            return done
        run_dir = st.run_dir([fingerprint] + ([init_art.manifest["uid"]] if init_art else [])
                             + ([tokenizer.fingerprint()] if tokenizer is not None and tok_art is None else []))
        # 2. tokenizer (and, continuing a model, that model: its tokenizer and config win over the recipe's)
        tok_dir = tok_art.path if tok_art is not None else run_dir / "tokenizer"
        if tokenizer is not None and tok_art is None:  # a file the user named: the run (and the model) keep a copy
            tok_dir.mkdir(parents=True, exist_ok=True)
            tokenizer.save(tok_dir)
        elif tokenizer is None:  # trained on the training documents, kept in the run directory so a resumed run uses the very same
            tokenizer = train_or_reuse_tokenizer(recipe.tokenizer, lambda: training_texts(ds, split), tok_dir)
        if init is not None:
            cfg = init.config
        else:  # 3. the model's vocabulary follows the tokenizer; its context must hold a training row
            cfg = dataclasses.replace(recipe.model, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eot_id,
                                      pad_token_id=tokenizer.eot_id).validate()
        check_fits(recipe.train.seq_len, cfg)
        data = build_lm_data(ds, data_art, fingerprint, tokenizer, recipe.train.seq_len, split, recipe.seed)
        if recipe.train.batch_size > len(data.train):
            raise K2Error(
                f"train.batch_size={recipe.train.batch_size} sequences but the corpus packs into only {len(data.train)} rows "
                f"of {recipe.train.seq_len} tokens",
                "lower train.batch_size or train.seq_len, or add text",
            )
        # 4. the training rows: the packed corpus, or the recipe's mix of corpus and retrieval-style rows
        train_rows, mix_txt, counts = data.train, "", {}
        if not recipe.data.corpus_only():
            train_docs = split_token_documents(ds, fingerprint, tokenizer, split)[0]
            n_rows = recipe.data.rows or recipe.train.steps * recipe.train.batch_size
            mixed = build_long_context_data(data, train_docs, tokenizer, find_world(recipe.data, data_art),
                                            recipe.train.seq_len, recipe.data, n_rows, recipe.seed)
            train_rows, counts = mixed.train, mixed.counts
            mix_txt = "; mix: " + ", ".join(f"{k} {v}" for k, v in mixed.counts.items() if v) + " rows"
        info(f"pretrain: {data.n_docs} documents, {human(data.n_train_tokens)} training tokens, "
             f"{len(data.train)} rows x {recipe.train.seq_len}{mix_txt}; vocab {tokenizer.vocab_size}; run dir {run_dir}")
        # 5. train (a GPU-sized model on a CPU: say so before the minutes it takes to build)
        warn_if_gpu_preset_on_cpu(cfg, pick_device(recipe.train.device))
        model = build_model(cfg, seed=recipe.seed)
        if init is not None:
            model.load_state_dict(init.state_dict())
        trained = st.train(model, LMTask(train_rows, data.val, recipe.train.batch_size, recipe.seed, recipe.train.eval_batches))
        # 6. the artifact
        val, last = trained.last("val_loss"), trained.final
        metrics = {
            "steps": recipe.train.steps,
            "train_tokens_seen": recipe.train.steps * recipe.train.batch_size * recipe.train.seq_len,
            "final_loss": last.get("loss"),
            "final_val_loss": val,
            "unigram_entropy": data.unigram_entropy,
            "max_logit_final": last.get("max_logit"),
            "heads_clipped_total": trained.total("heads_clipped_total"),
            "params_total": cfg.param_counts()["total"],
            "params_active": cfg.param_counts()["active"],
            "vocab_size": tokenizer.vocab_size,
            **{f"rows_{k}": v for k, v in counts.items()},
        }
        summary = [
            f"- model: {cfg.name}, {human(cfg.param_counts()['total'])} parameters ({human(cfg.param_counts()['active'])} active)"
            + (f", continued from {init_art.id}" if init_art is not None else ""),
            f"- data: {data.n_docs} documents, {human(data.n_train_tokens)} training tokens; "
            f"{recipe.train.steps} steps x {recipe.train.batch_size} x {recipe.train.seq_len} tokens{mix_txt}",
            f"- optimizer: {recipe.optim.name}, lr {recipe.optim.lr:g}"
            + (f", QK-Clip tau {recipe.optim.qk_clip_tau:g}" if recipe.optim.name == "muonclip" else ""),
            f"- final validation loss **{val:.4f}** nats/token vs unigram entropy {data.unigram_entropy:.4f}"
            if val is not None else "- no validation split",
            f"- max attention logit at the end: {last.get('max_logit', float('nan')):.2f}; "
            f"heads clipped over the run: {metrics['heads_clipped_total']}",
        ]
        with st.writer(data_split=split_record(split.corpus, data.n_docs, split.val_fraction, split.seed)) as w:
            w.metrics = metrics | {"wall_s": round(time.time() - t0, 1)}
            st.write_model(w, trained, tok_dir, summary,
                           reference={"unigram entropy": data.unigram_entropy})
            art = w.commit(summary=f"pretrained {cfg.name}: val loss {val:.3f} (unigram {data.unigram_entropy:.3f})"
                           if val is not None else f"pretrained {cfg.name}")
        info(f"[green]wrote[/] {art.path} ({art.id}): val loss {val if val is None else round(val, 4)}, "
             f"unigram entropy {data.unigram_entropy:.4f}, {w.metrics['wall_s']} s")
        return art


@click.command("pretrain")
@click.argument("corpus", required=False)
@recipe_options("pretrain", PretrainRecipe)
@run_options(resume=True)
@click.option("--init", "init", default=None, help="Continue this model artifact's weights (recipe key `init`).")
def pretrain_cmd(corpus, recipe, recipe_source, init, opts):
    """Pre-train a model with MuonClip on a corpus (default: the recipe's data.input).

    The same command on the same inputs continues from its last checkpoint; Ctrl-C saves
    one and stops cleanly.
    """
    if corpus:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, input=corpus))
    if init:
        recipe = dataclasses.replace(recipe, init=init)
    run(recipe, opts)


COMMANDS = [pretrain_cmd]
