"""Next-token prediction on packed rows: the Task of pretrain, extend-context and SFT."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from k2cli.data.packing import PackedData, batch_indices


class LMTask:
    def __init__(self, train: PackedData, val: PackedData | None, batch_size: int, seed: int, eval_batches: int = 4,
                 eval_batch_size: int | None = None):
        self.train_data, self.val_data = train, val
        self.batch_size, self.seed = batch_size, seed
        self.tokens_per_sequence = train.seq_len
        self.eval_batches = eval_batches
        self.eval_batch_size = eval_batch_size or batch_size

    def batch(self, step: int) -> dict:
        return self.train_data.rows(batch_indices(step, self.batch_size, len(self.train_data), self.seed))

    def weight(self, micro: dict) -> float:
        return float((micro["targets"] != -100).sum())

    def loss(self, model, micro: dict, max_logits: bool) -> tuple[torch.Tensor, dict, object]:
        logits, stats = model(micro["input_ids"], stats=True, max_logits=max_logits)
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), micro["targets"].flatten(), ignore_index=-100, reduction="sum")
        return loss_sum, {}, stats

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Mean loss per target token over a fixed slice of the validation rows."""
        if self.val_data is None or len(self.val_data) == 0:
            return {}
        n = min(len(self.val_data), self.eval_batches * self.eval_batch_size)
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, n, self.eval_batch_size):
            rows = self.val_data.rows(np.arange(start, min(start + self.eval_batch_size, n)))
            logits = model(rows["input_ids"].to(device))
            targets = rows["targets"].to(device)
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
        return {"val_loss": total / max(count, 1)}
