"""Optimisers: MuonClip (Muon + AdamW + QK-Clip) and the learning-rate schedule."""

from k2cli.optim.muon import (
    OptimConfig,
    MuonClip,
    build_optimizer,
    muon_update,
    newton_schulz,
    orthogonalize,
)
from k2cli.optim.qk_clip import clip_heads, scale_head_logits
from k2cli.optim.schedule import ScheduleConfig, lr_at

__all__ = [
    "OptimConfig",
    "MuonClip",
    "build_optimizer",
    "muon_update",
    "newton_schulz",
    "orthogonalize",
    "clip_heads",
    "scale_head_logits",
    "ScheduleConfig",
    "lr_at",
]
