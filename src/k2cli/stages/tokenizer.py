"""`k2 tokenizer train`: a byte-level BPE tokenizer with k2's special tokens, as an artifact.

`k2 pretrain` trains one itself unless given `tokenizer.ref`; this command exists to share one
tokenizer between experiments (e.g. the optimizer comparisons of `make reproduce`).
"""

from __future__ import annotations

import rich_click as click

from k2cli.commands.common import run_options
from k2cli.console import info
from k2cli.data.lm_data import DataConfig, load_documents, training_texts
from k2cli.data.tokenizer import SPECIAL_TOKENS, train_tokenizer
from k2cli.lineage import Split
from k2cli.stages.runner import RunOptions, Stage


def run(corpus: str, vocab_size: int, min_frequency: int = 2, val_fraction: float = 0.05, seed: int = 0,
        text_field: str = "text", split_digits: bool = True, opts: RunOptions = RunOptions()):
    cfg = DataConfig(input=corpus, text_field=text_field, val_fraction=val_fraction)
    recipe = {"data": vars(cfg), "vocab_size": vocab_size, "min_frequency": min_frequency, "split_digits": split_digits,
              "seed": seed}
    with Stage("tokenizer", "tokenizer", recipe, opts) as st:
        ds, art, _ = load_documents(cfg)
        if done := st.up_to_date([art]):
            return done
        texts = training_texts(ds, Split(corpus, val_fraction, seed, "the tokenizer's hold-out"))  # never learn merges from validation text
        with st.writer() as w:
            tok = train_tokenizer(texts, vocab_size, min_frequency, split_digits)
            tok.save(w.dir)
            sample = texts[0][:200]
            w.metrics = {"vocab_size": tok.vocab_size, "special_tokens": len(SPECIAL_TOKENS),
                         "documents": len(texts), "chars_per_token_sample": round(len(sample) / max(1, len(tok.encode(sample))), 2)}
            result = w.commit(summary=f"BPE tokenizer, {tok.vocab_size} tokens")
        info(f"[green]wrote[/] {result.path} ({result.id}): {tok.vocab_size} tokens")
        return result


@click.group("tokenizer", cls=click.RichGroup)
def tokenizer_group():
    """Train and share tokenizers."""


@tokenizer_group.command("train")
@click.argument("corpus")
@click.option("--vocab-size", type=int, default=2048, show_default=True, help="Vocabulary size, special tokens included.")
@click.option("--min-frequency", type=int, default=2, show_default=True, help="Minimum pair count for a merge.")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text in JSON records.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the validation hold-out.")
@click.option("--split-digits/--merge-digits", default=True, show_default=True,
              help="Every digit its own token, or digits merged by BPE like any other characters.")
@run_options()
def train_cmd(corpus, vocab_size, min_frequency, text_field, seed, split_digits, opts):
    """Train a byte-level BPE tokenizer on CORPUS (a dataset artifact or .txt/.jsonl/.parquet files)."""
    run(corpus, vocab_size, min_frequency, seed=seed, text_field=text_field, split_digits=split_digits, opts=opts)


COMMANDS = [tokenizer_group]
