"""The dtype policy: float32 weights, activations in the model's compute dtype.

k2 does not use autocast (whose op lists miss `torch._grouped_mm` and decide per op what
runs in bf16). Instead what runs in which dtype is written down here and in the modules:

    parameters, gradients, optimizer state   float32 always (Muon may orthogonalise in bf16 on CUDA)
    activations (the residual stream)        the compute dtype: the embedding output is cast to it
                                             (`K2Model.compute_dtype`; None, the default: the
                                             weights' dtype, float32 — or float64 in tests)
    matmuls (Linear, grouped expert mm,      in the activation dtype: each weight is cast to it at
    attention, absorbed decoding)            use (`Linear`, moe.grouped_mm); a no-op in float32
    float32 whatever the compute dtype       RMSNorm statistics, RoPE angles, the router (logits,
                                             sigmoid, top-k, correction bias), softmax statistics
                                             (row max, log-sum-exp, per-head max logit), losses
                                             (the loss takes logits.float())

With the compute dtype float32 every cast above returns its input: the float32 path is
bit-for-bit what it was before the policy existed.

    with compute_dtype(model, torch.bfloat16):   # training / evaluation / generation in bf16
        logits = model(ids)                      # bf16 logits; weights stay float32
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from k2cli.errors import K2Error

PRECISIONS = ("auto", "fp32", "bf16")


class Linear(nn.Linear):
    """nn.Linear whose weight is cast to the input's dtype (float32 weights, bf16 matmul)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@torch.no_grad()
def store_for_inference(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Keep a model that only serves (k2 serve / k2 chat) in its compute dtype: matrices are stored in
    `dtype` once, so each decoding step reads 2 bytes a weight instead of casting float32 weights at
    every matmul (memory-bound decoding would pay the cast on every token). What the policy keeps in
    float32 stays float32: the router's weights and correction bias, norms (1-D). A no-op for None or
    float32. Training never calls this: its weights are the optimizer's float32 master copy."""
    if dtype is None or dtype == torch.float32:
        return model
    from k2cli.model.moe import Router

    routers = {id(m.weight) for m in model.modules() if isinstance(m, Router)}
    for p in model.parameters():
        if p.dim() >= 2 and id(p) not in routers:
            p.data = p.data.to(dtype)
    return model


def check_device(name) -> torch.device:
    """The torch device `name` (cpu, cuda, cuda:1, ...), or a K2Error when this machine has no such device."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise K2Error(f"unknown device '{name}'", "use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise K2Error(f"device {name} asked for, but no CUDA device is available", "use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise K2Error(f"device {name} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)",
                      "use --device cuda:0")
    return device


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return True  # every CPU torch build computes in bf16 (slowly without AVX512-BF16/AMX)
    return device.type in ("mps", "xpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of `precision` on `device`: auto is bf16 on CUDA (when the GPU has it), else float32."""
    if precision not in PRECISIONS:
        raise K2Error(f"unknown precision '{precision}'", "use auto, fp32 or bf16")
    if precision == "fp32":
        return torch.float32
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and bf16_supported(device) else torch.float32
    if not bf16_supported(device):
        raise K2Error(f"precision bf16 asked for, but {device} has no bfloat16 support",
                      "use --set train.precision=fp32 (or auto)")
    return torch.bfloat16


def inference_dtype(model: nn.Module, device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The compute dtype for generation and serving: the caller's if it set one (the training loop
    does), else `precision` on `device` — auto: bf16 on a CUDA GPU with bf16, the weights' own
    dtype elsewhere (None: nothing changes on CPU)."""
    current = getattr(unwrap(model), "compute_dtype", None)
    if precision == "auto":
        if current is not None:
            return current
        return torch.bfloat16 if device.type == "cuda" and bf16_supported(device) else None
    return resolve_precision(precision, device)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers (FSDP2 shards in place: no wrapper)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


@contextmanager
def compute_dtype(model: nn.Module, dtype: torch.dtype):
    """Run `model`'s activations in `dtype` inside the block (restored after)."""
    core = unwrap(model)
    old = getattr(core, "compute_dtype", None)
    core.compute_dtype = dtype
    try:
        yield
    finally:
        core.compute_dtype = old
