"""Rotary position embeddings, with YaRN / linear / NTK-aware scaling for long context.

Layout: like DeepSeek's reference and Hugging Face's `rope_interleave=True`, each rotary
head dimension is made of adjacent pairs (x0, x1), (x2, x3), ... each rotated by one
frequency. We rotate the even/odd slices and write the result de-interleaved
([rotated evens | rotated odds]); queries and keys get the same permutation, so dot
products are unchanged and weights stay in the layout K2 checkpoints ship in.
"""

from __future__ import annotations

import math

import torch

from k2cli.model.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(s) + 1 for s > 1."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float, original_len: int):
    """Rotary pair indices [low, high] between which YaRN ramps from 'keep' to 'interpolate'.

    A pair with wavelength lambda makes original_len / lambda rotations over the original
    context. Pairs making more than beta_fast rotations keep their frequency; pairs making
    fewer than beta_slow are interpolated by the factor; the ramp is linear in between.
    """

    def pair_index(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(pair_index(beta_fast))
    high = math.ceil(pair_index(beta_slow))
    return max(low, 0), min(high, dim - 1)


def yarn_ramp(low: float, high: float, n: int) -> torch.Tensor:
    """0 below `low`, 1 above `high`, linear in between (over pair indices 0..n-1)."""
    if low == high:
        high += 0.001  # avoid a division by zero, as the YaRN reference does
    return ((torch.arange(n, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def inv_freq_and_scale(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dr/2] and the cos/sin multiplier for the configured scaling."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0 / base**exponents, 1.0
    s = rs.factor
    if rs.type == "linear":
        return 1.0 / (s * base**exponents), 1.0
    if rs.type == "ntk":
        ntk_base = base * s ** (dim / (dim - 2)) if dim > 2 else base * s
        return 1.0 / ntk_base**exponents, 1.0
    # yarn: interpolate low frequencies (long wavelengths), keep high ones.
    extrapolated = 1.0 / base**exponents
    interpolated = extrapolated / s
    low, high = yarn_correction_range(rs.beta_fast, rs.beta_slow, dim, base, rs.original_max_position_embeddings)
    keep = 1.0 - yarn_ramp(low, high, dim // 2)  # 1 for high-frequency pairs
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    # cos/sin are multiplied by mscale(s, mscale) / mscale(s, mscale_all_dim); the softmax
    # scale gets mscale(s, mscale_all_dim)^2 (see softmax_scale). With mscale == mscale_all_dim
    # (K2, DeepSeek-V3) the first is 1 and all the temperature sits in the softmax scale.
    if rs.mscale and rs.mscale_all_dim:
        scale = yarn_mscale(s, rs.mscale) / yarn_mscale(s, rs.mscale_all_dim)
    else:
        scale = yarn_mscale(s)
    return inv_freq, scale


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.type == "yarn" and rs.mscale_all_dim:
        m = yarn_mscale(rs.factor, rs.mscale_all_dim)
        scale = scale * m * m
    return scale


class Rotary(torch.nn.Module):
    """Computes cos/sin [B, T, dr/2] for arbitrary positions (no length limit, no table)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_scaling = inv_freq_and_scale(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [B, T] int -> angles [B, T, dr/2] in float32 for accuracy at long range
        angles = positions[..., None].float() * self.inv_freq.float()
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., T, dr] by cos/sin [..., T, dr/2] (broadcast).

    Output [..., T, dr] = [x_e cos - x_o sin | x_o cos + x_e sin] (evens rotated, then odds).
    """
    if x.dtype in (torch.float32, torch.float64) and cos.dtype == x.dtype and not torch.compiler.is_compiling():
        # The same arithmetic as one complex multiply per pair, (x_e + i x_o)(cos + i sin), then
        # a de-interleaving copy: 3 kernels instead of 8 (it matters when decoding one token).
        # (Not under torch.compile: dynamo cannot trace view_as_complex's stride checks, and
        # inductor fuses the real arithmetic below into one kernel anyway.)
        pairs = x.unflatten(-1, (-1, 2))  # [..., dr/2, 2]
        if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
            pairs = pairs.clone()  # view_as_complex needs each (x_e, x_o) pair aligned as one complex number
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin))  # [..., dr/2, 2]
        return rotated.transpose(-1, -2).flatten(-2)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((x_even * cos - x_odd * sin, x_odd * cos + x_even * sin), dim=-1)
