"""Rows of token ids -> the tensors of one RL optimizer step, and the PTX rows.

A row is (ids, mask): a whole sequence and True on the tokens that carry loss. The training
tensors shift by one as usual (position t predicts token t + 1):

    input_ids [N, T]   ids[:-1], right-padded with <|endoftext|>      T = longest row - 1
    targets   [N, T]   ids[t + 1] where mask[t + 1], else -100
    length    [N]      real tokens of each input row (the loss trims the padding of a micro-batch)

One step's batch holds rows of three kinds, each with its per-row numbers:

    kind   RL (0): a rollout; PTX (1): curated next-token data; CRITIC (2): a pairwise verdict
    coef   the row's weight in the summed loss (see RLTask.assemble)
    adv    r_i - rbar(x) (RL rows)
    unit   loss units: 1/K_x for an RL row, so a step's units = the number of prompts
    old_logp  log pi_old(y|x) (RL rows), computed when the batch is made
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

RL, PTX, CRITIC, PAD = 0, 1, 2, 3


def rows_to_tensors(rows: list[tuple[list[int], list[bool]]], pad_id: int) -> dict:
    T = max(len(ids) for ids, _ in rows) - 1
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    length = torch.zeros(len(rows), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        input_ids[i, :n] = torch.tensor(ids[:-1])
        tgt = torch.tensor(ids[1:])
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        targets[i, :n] = torch.where(keep, tgt, torch.full_like(tgt, -100))
        length[i] = n
    return {"input_ids": input_ids, "targets": targets, "length": length}


@dataclass
class PTXConfig:
    """Recipe section `ptx`: next-token loss on curated chat data against forgetting (weight beta)."""

    beta: float = 0.1  # 0 disables
    sources: list[str] = field(default_factory=lambda: ["qa", "math"])  # qa | math (the world dataset) | agentic
    rows: int = 8  # conversations per step

    def validate(self):
        from k2cli.errors import K2Error

        bad = [s for s in self.sources if s not in ("qa", "math", "agentic")]
        if bad:
            raise K2Error(f"unknown ptx source '{bad[0]}'", "valid: agentic, math, qa")
        if self.beta < 0 or self.rows < 0:
            raise K2Error("ptx.beta and ptx.rows must be >= 0", "e.g. beta = 0.1, rows = 8")


def ptx_rows(cfg: PTXConfig, tokenizer, data, context: int) -> list[tuple[list[int], list[bool]]]:
    """The curated set, rendered with assistant masks: QA-train pairs and train-split math solutions of
    the world dataset (what SFT learned from), optionally the agentic trajectories. Held-out data never."""
    from k2cli.data.chat import render
    from k2cli.data.sft_data import load_conversations

    if cfg.beta <= 0 or cfg.rows <= 0:
        return []
    convs = []
    for source in cfg.sources:
        art = data.agentic if source == "agentic" else data.dataset
        if art is not None:
            convs += load_conversations(source, art)
    rows = []
    for c in convs:
        r = render(tokenizer, c["messages"], c.get("tools"))
        if len(r.ids) <= context + 1 and any(r.mask):
            rows.append((r.ids, r.mask))
    return rows
