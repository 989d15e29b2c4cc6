"""The K2 model: embeddings -> [MLA + (dense MLP | MoE)] x L -> RMSNorm -> LM head.

Written for a single device; data parallelism and sharding are applied from outside
(`k2cli.train.distributed`). Module names mirror Hugging Face's DeepseekV3 (without its
`model.` prefix), so the HF adapter in `hf.py` is a rename plus an expert split.

    model(input_ids)                            -> logits [B, T, V]
    model(input_ids, stats=ForwardStats(...))   -> logits, and stats filled with the MoE
                                                   balance loss, expert loads and (when
                                                   asked) per-head max attention logits
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from k2cli.model.attention import MLAttention
from k2cli.model.config import ModelConfig
from k2cli.model.moe import DenseMLP, MoE, Router
from k2cli.model.norm import RMSNorm
from k2cli.model.precision import Linear
from k2cli.model.rope import Rotary


@dataclass
class ForwardStats:
    """Side outputs of one forward pass that training needs (filled only when passed in)."""

    track_max_logits: bool = False
    max_logits: list = field(default_factory=list)  # per layer: [H] max pre-softmax logit
    balance_losses: list = field(default_factory=list)  # per MoE layer: scalar, with grad
    expert_counts: list = field(default_factory=list)  # per MoE layer: [E] tokens routed

    def add_moe(self, balance_loss, counts):
        self.balance_losses.append(balance_loss)
        self.expert_counts.append(counts)

    def balance_loss(self) -> torch.Tensor:
        return torch.stack(self.balance_losses).mean() if self.balance_losses else torch.zeros(())

    def max_logit_matrix(self) -> torch.Tensor | None:
        return torch.stack(self.max_logits) if self.max_logits else None  # [L, H]

    def load_matrix(self) -> torch.Tensor | None:
        return torch.stack(self.expert_counts) if self.expert_counts else None  # [L_moe, E]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask=None, cache=None, stats: ForwardStats | None = None):
        max_logits = stats.max_logits if stats is not None and stats.track_max_logits else None
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, max_logits)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, stats) if self.is_moe else self.mlp(h))


class K2Model(nn.Module):
    # The dtype activations run in (model/precision.py; None: the weights' own dtype). Weights
    # stay float32 whatever it is.
    compute_dtype: torch.dtype | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "K2Model":
        """Normal(0, initializer_range) for every matrix, ones for norms, zero router bias."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm gains are the only 1-D parameters
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for r in self.routers():
            r.e_score_correction_bias.zero_()
        return self

    # ------------------------------------------------------------------ helpers
    def routers(self) -> list[Router]:
        return [layer.mlp.gate for layer in self.layers if layer.is_moe]

    def attention_layers(self) -> list[MLAttention]:
        return [layer.self_attn for layer in self.layers]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, positions=None, mask=None, cache=None, stats: ForwardStats | None = None,
                last_only: bool = False):
        """input_ids [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only, as generation needs).

        positions [B, T] default to cache.length + arange(T). `mask` (bool [B, 1, T, S]) is
        only needed for padded batches; plain causal attention is the default.
        """
        B, T = input_ids.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)  # float32 table, compute-dtype activations
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, stats)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))


def build_model(cfg: ModelConfig, device="cpu", seed: int | None = 0) -> K2Model:
    """A freshly initialised model (on the meta device: shapes only, for counting)."""
    if str(device) == "meta":
        with torch.device("meta"):
            return K2Model(cfg)
    model = K2Model(cfg)
    model.init_weights(seed)
    return model.to(device)
