"""The MFU denominator: datasheet table, override, CPU measurement; and the MFU arithmetic."""

from __future__ import annotations

import pytest

from k2cli.model.config import ModelConfig
from k2cli.train import mfu


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4),   # SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.05),
    ("NVIDIA L40", 181.05),
    ("NVIDIA A10", 125.0),
    ("NVIDIA GeForce RTX 4090", 165.2),
])
def test_datasheet_lookup(name, tflops):
    assert mfu.datasheet_tflops(name) == tflops


def test_unknown_gpu_is_not_guessed():
    # not in the table: measured instead (A10G is not an A10; Tesla T4 has no bf16 tensor cores)
    for name in ("NVIDIA A10G", "Tesla T4", "NVIDIA GeForce GTX 1080"):
        assert mfu.datasheet_tflops(name) is None


def test_dense_not_sparse():
    """The table holds dense peaks: an H100 SXM is 989 TFLOP/s bf16, not the 1979 'with sparsity'."""
    assert all(t < 1000 for pattern, t in mfu.DENSE_BF16_TFLOPS if "B200" not in pattern)


def test_override_wins():
    peak = mfu.device_peak("cpu", override=12.5)
    assert (peak.tflops, peak.source) == (12.5, "override")
    assert mfu.training_peak_tflops("cpu", 12.5) == 12.5


def test_cpu_peak_is_measured_and_sane():
    measured = mfu.measure_matmul_peak("cpu", n=512, reps=2)
    # a float32 512^3 matmul on any CPU: above 1 GFLOP/s, far below 100 TFLOP/s
    assert 1e-3 < measured < 100
    peak = mfu.device_peak("cpu")
    assert peak.source == "measured" and 1e-3 < peak.tflops < 100
    assert mfu.device_peak("cpu").tflops == peak.tflops  # measured once per process


def test_mfu_example():
    """The small preset at 1024 tokens: 300K tokens/s on an H200 (989 TFLOP/s dense bf16)."""
    cfg = ModelConfig.from_preset("small")
    per_token = cfg.flops_per_token(1024)["train"]
    value = mfu.mfu(300_000, per_token, 989.0)
    assert value == pytest.approx(300_000 * per_token / 989e12)
    assert 0 < value < 1
    assert mfu.mfu(300_000, per_token, 989.0, devices=2) == pytest.approx(value / 2)
    # the case: the loop's old denominator was ~2.3x too low, so its MFU read ~2.3x too high
    assert mfu.mfu(300_000, per_token, 989.0 / 2.3) == pytest.approx(2.3 * value)


def test_gpu_preset_on_cpu_warns_once(capsys, monkeypatch):
    monkeypatch.setattr(mfu, "_warned", set())
    mfu.training_peak_tflops("cpu", 1.0, ModelConfig.from_preset("gpu"))
    assert "sized for one GPU" in capsys.readouterr().err
    assert not mfu.warn_if_gpu_preset_on_cpu(ModelConfig.from_preset("gpu"), "cpu")  # once per process
    mfu.training_peak_tflops("cpu", 1.0, ModelConfig.from_preset("tiny"))
    assert "sized for one GPU" not in capsys.readouterr().err
