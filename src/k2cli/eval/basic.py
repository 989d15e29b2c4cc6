"""Suites that need only held-out text: perplexity (loss, bits per byte) and max-logit statistics."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from k2cli.data.packing import pack
from k2cli.eval.suite import SuiteResult, register
from k2cli.lineage import heldout_split


def heldout_texts(ctx, limit: int = 200) -> tuple[list[str], str]:
    """Documents the model did not train on, and where they came from.

    The corpus is --data's files (ctx.corpus) or the data artifact's corpus/. If the model's pre-training
    read that corpus, the validation split it recorded is used (k2cli.lineage); otherwise all of it.
    """
    from k2cli.data.loading import load_corpus

    if ctx.corpus:
        ref, name = ctx.corpus, ctx.corpus
    elif ctx.data_art is not None and (ctx.data_art.path / "corpus").is_dir():
        ref, name = str(ctx.data_art.path), ctx.data_art.id
    else:
        return [], "no corpus"
    ds, _ = load_corpus(ref)
    how = f"all of {name}"
    split = heldout_split(ctx.model_art, ref)
    if split is not None:
        ds = ds.select(split.indices(len(ds))[1])
        how = f"the validation split of {split.source.id}"
    texts = ds["text"]
    order = np.random.default_rng(ctx.cfg.seed).permutation(len(texts))[:limit]
    return [texts[i] for i in sorted(order)], how


def _rows(ctx, texts):
    docs = [ctx.tokenizer.encode(t) for t in texts]
    n_tokens = sum(len(d) + 1 for d in docs)
    seq_len = min(ctx.cfg.seq_len, ctx.model.config.max_position_embeddings, n_tokens - 1)  # a small held-out set still fits
    return pack(docs, ctx.tokenizer.eot_id, seq_len, seed=ctx.cfg.seed)


@register
class Perplexity:
    name = "perplexity"
    description = "loss (nats/token), perplexity and bits per byte on held-out text"

    def applies(self, ctx):
        return None if heldout_texts(ctx, 1)[0] else "no held-out corpus (pass --data with a dataset artifact or text files)"

    @torch.no_grad()
    def run(self, ctx) -> SuiteResult:
        texts, how = heldout_texts(ctx)
        data = _rows(ctx, texts)
        total_nats, n_tokens = 0.0, 0
        for start in range(0, len(data), ctx.cfg.batch_size):
            rows = data.rows(np.arange(start, min(start + ctx.cfg.batch_size, len(data))))
            logits = ctx.model(rows["input_ids"].to(ctx.device))
            total_nats += float(F.cross_entropy(logits.flatten(0, 1).float(), rows["targets"].to(ctx.device).flatten(), reduction="sum"))
            n_tokens += rows["targets"].numel()
        # the packed rows cover the documents' tokens once; bytes are those of the same documents
        covered = n_tokens / max(1, sum(len(ctx.tokenizer.encode(t)) + 1 for t in texts))
        n_bytes = sum(len(t.encode("utf-8")) for t in texts) * covered
        loss = total_nats / max(n_tokens, 1)
        return SuiteResult(
            metrics={"loss": loss, "perplexity": math.exp(min(loss, 50)), "bits_per_byte": total_nats / math.log(2) / max(n_bytes, 1),
                     "tokens": n_tokens},
            notes=[f"perplexity on {len(texts)} documents ({how})"],
        )


@register
class MaxLogit:
    name = "max_logit"
    description = "per-head maximum attention logits on held-out text (what QK-Clip bounds)"

    def applies(self, ctx):
        return None if heldout_texts(ctx, 1)[0] else "no held-out corpus (pass --data with a dataset artifact or text files)"

    @torch.no_grad()
    def run(self, ctx) -> SuiteResult:
        texts, how = heldout_texts(ctx, 64)
        data = _rows(ctx, texts)
        rows = data.rows(np.arange(min(len(data), ctx.cfg.batch_size)))
        _, stats = ctx.model(rows["input_ids"].to(ctx.device), stats=True, max_logits=True)
        m = stats.max_logits  # [L, H]
        per_layer = m.max(dim=1).values.tolist()
        return SuiteResult(
            metrics={"max_logit": float(m.max()), "mean_head_max_logit": float(m.mean()),
                     **{f"layer{i}_max_logit": v for i, v in enumerate(per_layer)}},
            notes=[f"max logits over {rows['input_ids'].shape[0]} rows of {how}"],
        )
