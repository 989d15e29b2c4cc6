"""The K2 model: embeddings -> [MLA + (dense MLP | MoE)] x L -> RMSNorm -> LM head.

Written for a single device; data parallelism and sharding are applied from outside
(`k2cli.parallel`). Module names mirror Hugging Face's DeepseekV3 (without its
`model.` prefix), so the HF adapter in `hf.py` is a rename plus an expert split.

    model(input_ids)                                 -> logits [B, T, V]
    model(input_ids, stats=True, max_logits=True)    -> logits, ForwardStats(MoE balance loss,
                                                        expert loads, per-head max logits)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from k2cli.model.attention import MLAttention
from k2cli.model.config import ModelConfig
from k2cli.model.moe import DenseMLP, MoE, Router
from k2cli.model.norm import RMSNorm
from k2cli.model.precision import Linear
from k2cli.model.rope import Rotary


class ForwardStats(NamedTuple):
    """Side outputs of one forward pass that training needs, returned with the logits.

    Each layer returns its own (no list is threaded through forward), so FSDP2 sees them as
    ordinary outputs of the sharded layers and torch.compile as ordinary graph outputs.
    """

    balance_loss: torch.Tensor  # scalar float32: the MoE balance loss, mean over MoE layers, with grad
    expert_counts: torch.Tensor | None  # [L_moe, E] tokens routed to each expert (None without MoE)
    max_logits: torch.Tensor | None  # [L, H] per-head max pre-softmax logit, float32, no grad (when asked)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask=None, cache=None, stats: bool = False, max_logits: bool = False):
        """x [B, T, D] -> x, or with `stats` (x, head max [H] | None, balance loss | None, counts [E] | None)."""
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, max_logit=stats and max_logits)
        attn, head_max = attn if stats and max_logits else (attn, None)
        x = x + attn
        h = self.post_attention_layernorm(x)
        if not stats:
            return x + self.mlp(h)
        if not self.is_moe:
            return x + self.mlp(h), head_max, None, None
        out, balance, counts = self.mlp(h, stats=True)
        return x + out, head_max, balance, counts


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
    def forward(self, input_ids, positions=None, mask=None, cache=None, last_only: bool = False,
                stats: bool = False, max_logits: bool = False):
        """input_ids [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only, as generation needs).

        positions [B, T] default to cache.length + arange(T). `mask` (bool [B, 1, T, S]) is
        only needed for padded batches; plain causal attention is the default. With `stats`,
        returns (logits, ForwardStats), the per-head max logits included when `max_logits`.
        """
        B, T = input_ids.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)  # float32 table, compute-dtype activations
        cos, sin = self.rotary(positions, x.dtype)
        side = []  # per layer, with stats: (head max | None, balance loss | None, counts | None)
        for layer in self.layers:
            if stats:
                x, *out = layer(x, cos, sin, mask, cache, stats=True, max_logits=max_logits)
                side.append(out)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        if not stats:
            return logits
        head_max, balance, counts = ([s[i] for s in side if s[i] is not None] for i in range(3))
        return logits, ForwardStats(
            balance_loss=torch.stack(balance).mean() if balance else logits.new_zeros((), dtype=torch.float32),
            expert_counts=torch.stack(counts) if counts else None,
            max_logits=torch.stack(head_max) if head_max else None,
        )


def build_model(cfg: ModelConfig, device="cpu", seed: int | None = 0) -> K2Model:
    """A freshly initialised model (on the meta device: shapes only, for counting)."""
    if str(device) == "meta":
        with torch.device("meta"):
            return K2Model(cfg)
    model = K2Model(cfg)
    model.init_weights(seed)
    return model.to(device)
