"""`k2 sft MODEL`: supervised fine-tuning on chat data with Muon, loss on assistant tokens only.

    model artifact (pretrained or context-extended) + its tokenizer (chat tokens reserved)
      -> conversations: agentic tool-use trajectories, QA-train knowledge pairs, math solutions, and
       your own chat data (OpenAI/TRL `messages` JSONL: `k2 sft MODEL --data chat.jsonl`)
      -> render with the chat template (ids + assistant mask), drop/truncate overlong, mix, pack
      -> the shared training loop (K2 fine-tunes a Muon-trained model with Muon)
      -> a chat model artifact
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from dataclasses import dataclass, field

import rich_click as click

from k2cli import lineage
from k2cli.artifacts import open_artifact
from k2cli.commands.common import recipe_options, run_options
from k2cli.console import info
from k2cli.data.lm_data import training_documents
from k2cli.data.sft_data import SFTDataConfig, build_sft_data, load_chat, load_conversations
from k2cli.errors import K2Error
from k2cli.optim.muon import OptimConfig
from k2cli.optim.schedule import ScheduleConfig
from k2cli.stages.runner import RunOptions, Stage, load_parent
from k2cli.train.lm_task import LMTask
from k2cli.train.loop import TrainConfig


@dataclass
class SFTRecipe:
    seed: int = 0
    model: str = "pretrain:latest"  # the model to fine-tune
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10, decay_fraction=0.5))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, batch_size=16, seq_len=256))


def gather_sources(recipe: SFTRecipe, model_art, tokenizer) -> tuple[dict, list, object]:
    """(conversations per source, input artifacts, the chat files' report or None).

    With chat files (data.chat), k2's own sources are optional: one that has no data (a model imported
    from Hugging Face has no k2 dataset in its lineage) is left out with a note, so
    `k2 sft IMPORTED --data chat.jsonl` works with the default recipe."""
    cfg = recipe.data
    convs, inputs, report = {}, [], None
    optional = bool(cfg.chat)

    def left_out(source: str, why: str):
        info(f"sft: leaving out {source} ({why})")

    if cfg.chat and cfg.mix.get("chat", 1) > 0:
        convs["chat"], report = load_chat(cfg, tokenizer)
        info("sft: " + report.summary())
    if cfg.mix.get("corpus", 0) > 0:
        docs, art, how = training_documents(model_art, tokenizer, cfg.corpus, required=False)
        if not how:  # e.g. a model imported from Hugging Face: nothing to replay unless a corpus is named
            info(f"sft: no pre-training corpus in the lineage of {model_art.id}: fine-tuning without replay "
                 "(name one with --set data.corpus=REF)")
        if docs:
            convs["corpus"] = [{"ids": d} for d in docs]
            info(f"sft: replaying {how} ({len(docs)} training documents) at weight {cfg.mix['corpus']:g}")
        if art is not None:
            inputs.append(art)
    if cfg.mix.get("agentic", 0) > 0 and cfg.agentic:
        try:
            art = open_artifact(cfg.agentic, kind="dataset")
        except K2Error as e:
            if not optional:
                raise
            left_out("agentic", e.message)
            art = None
        if art is not None:
            convs["agentic"] = load_conversations("agentic", art)
            inputs.append(art)
    if cfg.mix.get("qa", 0) > 0 or cfg.mix.get("math", 0) > 0:
        art = lineage.dataset(model_art, any_of=("qa_train", "math"), ref=cfg.knowledge, key="data.knowledge")
        if art is None and not optional:
            raise K2Error(f"no QA/math data found in the lineage of {model_art.id}", "set data.knowledge to a 'k2 data synth' artifact, or set data.mix.qa=0 and data.mix.math=0")
        if art is None:
            left_out("qa and math", f"no 'k2 data synth' dataset in the lineage of {model_art.id}")
        else:
            for source in ("qa", "math"):
                if cfg.mix.get(source, 0) > 0:
                    convs[source] = load_conversations(source, art)
            inputs.append(art)
    if not any(v for k, v in convs.items() if k != "corpus"):
        raise K2Error("no SFT conversations: every source is empty or weighted 0",
                      "pass chat data (--data chat.jsonl), or check data.agentic, data.knowledge and data.mix")
    return convs, inputs, report


def run(recipe: SFTRecipe, opts: RunOptions = RunOptions()):
    t0 = time.time()
    with Stage("sft", "model", recipe, opts) as st:
        model, model_art, tokenizer = load_parent(recipe.model, "fine-tune a model made by k2 pretrain", recipe.train.seq_len)
        convs, inputs, chat = gather_sources(recipe, model_art, tokenizer)
        if done := st.up_to_date([model_art] + inputs):
            return done
        data = build_sft_data(tokenizer, convs, recipe.data, recipe.train.seq_len, recipe.seed)
        # chat files are not artifacts: their content's hash keys the run (and its resume)
        run_dir = st.run_dir([model_art.manifest["uid"]] + [a.manifest["uid"] for a in inputs]
                             + ([chat.fingerprint] if chat else []))
        if recipe.train.batch_size > len(data.train):
            raise K2Error(f"train.batch_size={recipe.train.batch_size} but the SFT data packs into {len(data.train)} rows",
                          "lower train.batch_size or add data")
        summary_counts = ", ".join(f"{k}: {v['used']} used ({v['dropped_overlong']} dropped, {v['truncated']} truncated)"
                                   for k, v in data.counts.items())
        info(f"sft: {summary_counts}; {len(data.train)} rows x {recipe.train.seq_len}; run dir {run_dir}")
        trained = st.train(model, LMTask(data.train, data.val, recipe.train.batch_size, recipe.seed, recipe.train.eval_batches))
        val = trained.last("val_loss")
        summary = [f"- fine-tuned {model_art.id} for {recipe.train.steps} steps with {recipe.optim.name} (lr {recipe.optim.lr:g})",
                   f"- data: {summary_counts}",
                   f"- validation loss on assistant tokens: {val:.4f}" if val is not None else "- no validation split"]
        with st.writer() as w:
            w.metrics = {"chat": True, "steps": recipe.train.steps, "final_loss": trained.final.get("loss"),
                         "final_val_loss": val, "wall_s": round(time.time() - t0, 1),
                         **{f"{k}_{m}": v[m] for k, v in data.counts.items() for m in ("used", "dropped_overlong", "truncated", "trained_tokens")},
                         **({"chat_rows": chat.rows, "chat_skipped": chat.rows - len(convs["chat"]),
                             "chat_fingerprint": chat.fingerprint} if chat else {})}
            st.write_model(w, trained, model_art.path, summary)
            art = w.commit(summary=f"SFT of {model_art.id}: val loss {val:.3f}" if val is not None else f"SFT of {model_art.id}")
        info(f"[green]wrote[/] {art.path} ({art.id}) in {w.metrics['wall_s']} s")
        return art


@click.command("sft")
@click.argument("model", required=False)
@recipe_options("sft", SFTRecipe)
@run_options(resume=True)
@click.option("--data", "data", multiple=True, metavar="PATH|REF",
              help="Your chat data: OpenAI/TRL `messages` JSONL files or folders (data.chat; repeat for more); or an "
                   "agentic dataset artifact (data.agentic).")
def sft_cmd(model, recipe, recipe_source, data, opts):
    """Fine-tune MODEL (default: the recipe's `model`) on chat data: tool-use trajectories, QA, math, and
    your own OpenAI-format chat JSONL (`--data chat.jsonl`; format in docs/sft.md)."""
    if model:
        recipe = dataclasses.replace(recipe, model=model)
    chat = [str(Path(d).resolve()) for d in data if Path(d).exists() and not (Path(d) / "manifest.json").is_file()]
    agentic = [d for d in data if d not in chat and str(Path(d).resolve()) not in chat]
    if len(agentic) > 1:
        raise K2Error(f"--data names {len(agentic)} dataset artifacts ({', '.join(agentic)})",
                      "pass one agentic dataset artifact; chat JSONL files and folders can be repeated")
    changes = {"chat": [*recipe.data.chat, *chat]} if chat else {}
    if agentic:
        changes["agentic"] = agentic[0]
    if changes:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, **changes))
    run(recipe, opts)


COMMANDS = [sft_cmd]
