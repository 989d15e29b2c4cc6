"""Model FLOPs utilisation: the device's peak, and the fraction of it a training run reaches.

    MFU = tokens/s x training FLOPs per token / (peak FLOP/s x devices)

FLOPs per token are `ModelConfig.flops_per_token` (6 x active matmul parameters + attention).
The peak is the honest denominator, in this order:
  1. `train.peak_tflops` when set (your own number);
  2. CUDA: the datasheet's dense bf16 tensor-core peak of the GPU (the table below) — what
     nanoGPT, PaLM and torchtitan divide by. Sparsity figures (2x) are NOT peaks of a dense
     matmul, so the table lists the dense ones;
  3. a GPU not in the table: measured, the best of a few large square bf16 matmuls (8192^3),
     which reaches 75-80% of the datasheet on an H100/H200 (issue 19 measured 775 TFLOP/s on
     an H200): MFU against it reads a little high, and `k2` says the peak was measured;
  4. CPU: a measured float32 matmul (2048^3): there is no datasheet figure to trust for a
     shared CPU, and float32 is what k2 trains in there.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass

import torch

# Dense bf16 tensor-core TFLOP/s (fp32 accumulation), from NVIDIA's datasheets: each product page
# prints the sparse figure with an asterisk ("* with sparsity"); dense is half of it.
#   H100 SXM 989.4, H100 PCIe 756, H100 NVL 835 (NVIDIA H100 datasheet); H200 SXM 989, H200 NVL 835
#   (H200 datasheet); A100 312 (A100 datasheet, SXM and PCIe alike); L4 121 (L4 datasheet);
#   L40S 362.05, L40 181.05 (L40S / L40 datasheets); A10 125 (A10 datasheet); RTX 4090 165.2 and
#   RTX 3090 71 (Ada / Ampere GA102 whitepapers: GeForce cards run fp32-accumulate MMA at half the
#   fp16-accumulate rate); RTX A6000 154.8, RTX 6000 Ada 364.25 (workstation datasheets);
#   B200 2250 (HGX B200: 4.5 PFLOPS with sparsity).
# Matched in order against torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3" (SXM),
# "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090": variants first.
DENSE_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756.0),
    (r"H100 NVL", 835.0),
    (r"H100", 989.4),
    (r"H200 NVL", 835.0),
    (r"H200", 989.0),  # also GH200
    (r"B200", 2250.0),
    (r"A100", 312.0),
    (r"L40S", 362.05),
    (r"L40\b", 181.05),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"RTX 6000 Ada", 364.25),
    (r"RTX A6000", 154.8),
    (r"RTX 4090", 165.2),
    (r"RTX 3090", 71.0),
]


@dataclass
class Peak:
    tflops: float
    source: str  # "override", "datasheet", "measured"
    device: str  # the device's name

    def __str__(self) -> str:
        return f"{self.tflops:,.4g} TFLOP/s ({self.source}, {self.device})"


def datasheet_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its `torch.cuda.get_device_name()`, or None if unknown."""
    for pattern, tflops in DENSE_BF16_TFLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            return tflops
    return None


def measure_matmul_peak(device: torch.device | str, dtype: torch.dtype | None = None, n: int | None = None,
                        reps: int = 3) -> float:
    """This device's dense matmul throughput in TFLOP/s: the best of `reps` timed n^3 matmuls.

    Defaults: bf16 8192^3 on CUDA (large enough to saturate the tensor cores; ten back to back per
    timing so that launch gaps vanish), float32 2048^3 on CPU (seconds on two cores).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n = n or (8192 if cuda else 2048)
    inner = 10 if cuda else 1
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm-up (kernel selection, clocks)
    best = float("inf")
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n**3 / best / 1e12


@functools.lru_cache(maxsize=None)
def _measured(device: str, dtype: torch.dtype) -> float:
    """Measured once per process and device: a training stage after another reuses it."""
    return measure_matmul_peak(device, dtype)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def device_peak(device: torch.device | str, override: float = 0.0) -> Peak:
    """The MFU denominator of `device` (see the module docstring for the order)."""
    device = torch.device(device)
    name = device_name(device)
    if override:
        return Peak(float(override), "override", name)
    if device.type == "cuda":
        sheet = datasheet_tflops(name)
        if sheet is not None:
            return Peak(sheet, "datasheet", name)
        return Peak(_measured(str(device), torch.bfloat16), "measured", name)
    return Peak(_measured(str(device), torch.float32), "measured", name)


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * devices)


# Model presets sized for a GPU: asking for one on a CPU is allowed, with a warning.
GPU_PRESETS = ("gpu",)
_warned: set = set()


def warn_if_gpu_preset_on_cpu(model_config, device: torch.device | str) -> bool:
    """One warning line (once per process and preset) when a GPU-sized preset is to run on a CPU.
    A stage can call it as soon as it knows the model and the device; the training loop does."""
    name = getattr(model_config, "name", None)
    if torch.device(device).type != "cpu" or name not in GPU_PRESETS or name in _warned:
        return False
    _warned.add(name)
    from k2cli.console import err

    err.print(f"[yellow]warning:[/] the '{name}' preset is sized for one GPU: on this CPU every step takes "
              "minutes (--preset tiny or small fit a CPU)")
    return True


def training_peak_tflops(device: torch.device | str, override: float = 0.0, model_config=None) -> float:
    """What the training loop calls: the MFU denominator in TFLOP/s (and the GPU-preset warning)."""
    if model_config is not None:
        warn_if_gpu_preset_on_cpu(model_config, device)
    return device_peak(device, override).tflops
