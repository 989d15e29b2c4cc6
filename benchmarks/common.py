"""Shared helpers for the side-by-side benchmarks: machine description, timing, RESULTS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        dev = f"{torch.cuda.get_device_name()}, " + dev
    try:
        import transformers

        dev += f", transformers {transformers.__version__}"
    except ImportError:
        pass
    return dev


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_average() -> str:
    """The machine's 1-minute load average (other jobs share it: ratios are what we record)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def time_one(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per call of each function, called in turn (a, b, c, a, b, c, ...) so that all
    of them see the same machine — what makes ratios meaningful on a machine shared with other jobs."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in ts.items()}


def matmul_peak_fn(device: str, n: int = 2048):
    """(fn, flops): one float32 n^3 matmul, the yardstick of MFU; time it interleaved with the work."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return (lambda: a @ b), 2 * n**3


def time_pair(fn_a, fn_b, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds per call of two functions, run interleaved so both see the same machine."""
    for _ in range(warmup):
        fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn_a()
        sync()
        t1 = time.perf_counter()
        fn_b()
        sync()
        ta.append(t1 - t0)
        tb.append(time.perf_counter() - t1)
    return statistics.median(ta), statistics.median(tb)


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section between <!-- name:start --> and <!-- name:end -->."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- {name}:start -->\n{body.rstrip()}\n\n"
        f"_Machine: {machine()}. Commit {git_commit()}, {stamp}. Command: `{' '.join(['python'] + sys.argv)}`._\n"
        f"<!-- {name}:end -->"
    )
    text = path.read_text() if path.exists() else "# Benchmark results\n\nAll figures are ratios measured side by side in one process; see each section's command.\n"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
