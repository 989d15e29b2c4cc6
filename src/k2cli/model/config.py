"""Model configuration: the Kimi K2 / DeepSeek-V3 shape, named presets, validation, counting.

Field names follow Hugging Face's `DeepseekV3Config` so that export/import is a rename-free
copy. `q_lora_rank = 0` means "no low-rank query path" (HF writes that as `None`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from k2cli.errors import K2Error, did_you_mean

ROPE_TYPES = ("yarn", "linear", "ntk")


@dataclass
class RopeScaling:
    """How rotary frequencies are rescaled to reach beyond the pre-training context.

    yarn   : NTK-by-parts interpolation with a ramp between beta_slow and beta_fast rotations,
             plus an attention temperature mscale (YaRN, arXiv 2309.00071).
    linear : position interpolation, every frequency divided by `factor`.
    ntk    : NTK-aware scaling, the rotary base multiplied by factor^(d/(d-2)).
    """

    type: str = "yarn"
    factor: float = 4.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 2048
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # MLA: queries through an optional low-rank path, keys/values through a compressed latent.
    q_lora_rank: int = 64  # 0 = a single full-rank W_q
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32  # per-head query/key part without rotary position
    qk_rope_head_dim: int = 16  # per-head query part with RoPE; the key part is ONE shared head
    v_head_dim: int = 32
    # Feed-forward: `first_k_dense_replace` dense SwiGLU layers, then MoE layers.
    intermediate_size: int = 384
    moe_intermediate_size: int = 96
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    # Positions
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Numerics and init
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace) if self.n_routed_experts else 0

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    # ------------------------------------------------------------------ presets and (de)serialisation
    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise K2Error(f"unknown model preset '{name}'", did_you_mean(name, PRESETS))
        return dataclasses.replace(PRESETS[name])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "model.json") -> "ModelConfig":
        """A stored config (a model artifact's model.json): its mistakes are named as fields of `source`."""
        from k2cli.recipes import build

        if not isinstance(d, dict):
            raise K2Error(f"{source} holds a JSON {type(d).__name__}, not an object of model fields",
                          "re-create the model artifact")
        cfg = build(cls, d, what=f"{source} field")
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "ModelConfig":
        def bad(msg, hint="fix the model shape"):
            raise K2Error(f"impossible model shape: {msg}", hint)

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.q_lora_rank < 0:
            bad(f"q_lora_rank must be >= 0 (0 disables the low-rank query path), got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            bad(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad(f"first_k_dense_replace={self.first_k_dense_replace} must be in [0, num_hidden_layers]")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            bad("dense layers need intermediate_size > 0")
        if self.n_routed_experts < 0:
            bad("n_routed_experts must be >= 0")
        if self.num_moe_layers:
            E, k = self.n_routed_experts, self.num_experts_per_tok
            if self.moe_intermediate_size <= 0:
                bad("MoE layers need moe_intermediate_size > 0")
            if not 1 <= k <= E:
                bad(f"num_experts_per_tok={k} must be between 1 and n_routed_experts={E}")
            if self.n_group < 1 or E % self.n_group:
                bad(f"n_group={self.n_group} must divide n_routed_experts={E}")
            if not 1 <= self.topk_group <= self.n_group:
                bad(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")
            per_group = E // self.n_group
            if self.n_group > 1 and per_group < 2:
                bad(f"each routing group needs at least 2 experts (groups score their top 2), got {per_group}")
            if self.topk_group * per_group < k:
                bad(f"topk_group={self.topk_group} groups of {per_group} experts cannot supply {k} experts per token")
            if self.n_shared_experts < 0:
                bad("n_shared_experts must be >= 0")
        if self.rope_theta <= 0:
            bad("rope_theta must be positive")
        rs = self.rope_scaling
        if rs is not None:
            if rs.type not in ROPE_TYPES:
                raise K2Error(f"unknown rope_scaling.type '{rs.type}'", did_you_mean(rs.type, ROPE_TYPES))
            if rs.factor <= 1:
                raise K2Error(f"rope_scaling.factor must be > 1, got {rs.factor}", "use a factor such as 2, 4 or 32")
            if rs.original_max_position_embeddings <= 0:
                bad("rope_scaling.original_max_position_embeddings must be positive")
            if rs.type == "yarn" and rs.beta_fast < rs.beta_slow:
                bad(f"yarn needs beta_fast >= beta_slow, got {rs.beta_fast} < {rs.beta_slow}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                bad(f"{name}={v} is outside the vocabulary (size {self.vocab_size})")
        return self

    # ------------------------------------------------------------------ counting
    def param_counts(self) -> dict:
        """Exact parameter counts by part, from the shapes alone (no tensors allocated)."""
        D, H = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            q = D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        else:
            q = D * H * self.qk_head_dim
        kv = D * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        attn = q + kv + H * self.v_head_dim * D
        norms = 2 * D
        dense_mlp = 3 * D * self.intermediate_size
        expert = 3 * D * self.moe_intermediate_size
        router = self.n_routed_experts * D  # + correction bias (a buffer, counted apart)
        shared = self.n_shared_experts * expert
        L, Lm = self.num_hidden_layers, self.num_moe_layers
        Ld = L - Lm
        embed = self.vocab_size * D
        head = 0 if self.tie_word_embeddings else self.vocab_size * D
        routed_total = Lm * self.n_routed_experts * expert
        routed_active = Lm * self.num_experts_per_tok * expert
        common = embed + head + D + L * (attn + norms) + Ld * dense_mlp + Lm * (router + shared)
        return {
            "embedding": embed,
            "lm_head": head,
            "attention": L * attn,
            "dense_mlp": Ld * dense_mlp,
            "router": Lm * router,
            "shared_experts": Lm * shared,
            "routed_experts": routed_total,
            "norms": L * norms + D,
            "total": common + routed_total,
            "active": common + routed_active,
            "per_expert": expert,
        }

    def flops_per_token(self, seq_len: int | None = None) -> dict:
        """Matmul FLOPs per token (the convention of nanoGPT/PaLM/torchtitan MFU).

        forward = 2 * (active matmul parameters) + attention scores and mixing
        (2 * T * H * (qk_head_dim + v_head_dim) per layer, full square, not halved for the
        causal mask); training = 3 x forward. The embedding lookup costs no FLOPs.
        """
        T = seq_len or self.max_position_embeddings
        c = self.param_counts()
        matmul_params = c["active"] - c["embedding"] - c["norms"]
        if self.q_lora_rank:
            matmul_params -= self.num_hidden_layers * self.q_lora_rank
        matmul_params -= self.num_hidden_layers * self.kv_lora_rank
        attn = 2 * T * self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * self.num_hidden_layers
        fwd = 2 * matmul_params + attn
        return {"seq_len": T, "forward": fwd, "train": 3 * fwd}

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """MLA caches only the normalised latent and the shared rope key per token and layer."""
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * bytes_per_value


def _kimi_k2() -> ModelConfig:
    # Kimi K2 (K2-Instruct config.json). Built only on the meta device, for counting.
    return ModelConfig(
        name="kimi-k2",
        vocab_size=163840,
        hidden_size=7168,
        num_hidden_layers=61,
        num_attention_heads=64,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        n_routed_experts=384,
        num_experts_per_tok=8,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.827,
        norm_topk_prob=True,
        max_position_embeddings=131072,
        rope_theta=50000.0,
        rope_scaling=RopeScaling(
            type="yarn",
            factor=32.0,
            original_max_position_embeddings=4096,
            beta_fast=1.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        bos_token_id=163584,
        eos_token_id=163585,
    )


PRESETS: dict[str, ModelConfig] = {
    # ~100K parameters: end-to-end tests in seconds.
    "micro": ModelConfig(
        name="micro", vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64,
        moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
    ),
    # ~2M parameters: trains on 2 CPU cores in minutes.
    "tiny": ModelConfig(name="tiny"),
    # ~100M total parameters, ~40M active: one GPU.
    "small": ModelConfig(
        name="small",
        vocab_size=16384,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        intermediate_size=1536,
        moe_intermediate_size=256,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.0,
        max_position_embeddings=1024,
    ),
    # ~1.9B total, ~380M active: one H100/H200 in bf16. Chosen by arithmetic, not yet measured (no GPU was
    # lent to the task that made it; docs/gpu.md):
    #   * K2's head shape exactly (qk 128 + 64 rope = 192, v 128) and K2's ratios: MLA with low-rank q/kv,
    #     64 fine-grained experts (K2: 384) of width D/3, top-6 + 1 shared, sigmoid routing, layer 0 dense.
    #   * every matmul fills the tensor cores: at 32 x 2048 = 65K tokens per micro-batch each expert sees
    #     65K x 6 / 64 = 6K rows of [6K, 1536] x [1536, 512], ~360 FLOP/byte in bf16, at an H100's ridge
    #     point (989 TFLOP/s / 3.35 TB/s = 295); D = 1536 keeps attention/LM-head projections >= 1536 wide.
    #   * FLOPs per token at 2048 (`k2 model info --preset gpu`): training 2.55 GFLOP = 6 x 330M matmul
    #     parameters (78%) + causal-square attention (22%); the LM head is 12%. At 40% MFU an H100 trains
    #     989e12 x 0.4 / 2.55e9 = 155K tokens/s: the pretrain recipe's 2000 x 64 x 2048 tokens in ~30 min.
    #   * memory: 1.9B fp32 parameters + gradients + Muon/AdamW state ~ 24 GB, activations of a 16 x 2048
    #     micro-batch in bf16 a few tens of GB: inside 80 GB.
    "gpu": ModelConfig(
        name="gpu",
        vocab_size=32768,
        hidden_size=1536,
        num_hidden_layers=12,
        num_attention_heads=12,
        q_lora_rank=768,
        kv_lora_rank=256,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        intermediate_size=4096,
        moe_intermediate_size=512,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        max_position_embeddings=2048,
    ),
    "kimi-k2": _kimi_k2(),
}


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"
