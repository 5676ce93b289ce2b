"""Metrics: MFU against a known or measured peak, goodput, and the metrics.jsonl log.

MFU = FLOPs per token (``ModelConfig.flops_per_token``, the one formula) × tokens/s ÷ the
device's peak. Goodput = time spent in steps whose update was kept ÷ wall time; start-up,
checkpointing, evaluation, rolled-back and skipped steps and export all count against it.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from camelid.errors import CamelidError

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched by device name.
GPU_PEAK_TFLOPS = {
    "H200": 989.5,
    "H100 SXM": 989.5,
    "H100 80GB HBM3": 989.5,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.5,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}


def device_peak_flops(device: torch.device, configured_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s for MFU: the recipe's figure, a known GPU's, or a CPU's measured fp32 peak."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return None
    return _cpu_peak()


@functools.cache
def _cpu_peak() -> float:
    """Measured once per process (about 2 s)."""
    return measure_matmul_flops()


def measure_matmul_flops(n: int = 4096, reps: int = 3) -> float:
    """This CPU's fp32 matmul rate: the best of ``reps`` timed n × n ``torch.mm`` after a
    warm-up; what MFU is relative to. Smaller matrices measure well below the peak here, and a
    busy machine measures low, which inflates MFU: set run.peak_tflops to pin it."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:
        return None


class Clock:
    """Wall time split into named buckets, for the goodput figure and the report."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.buckets: dict[str, float] = defaultdict(float)
        self._mark = self.start

    def lap(self, bucket: str) -> float:
        """Charge the time since the last lap to ``bucket``; return it."""
        now = time.perf_counter()
        spent, self._mark = now - self._mark, now
        self.buckets[bucket] += spent
        return spent

    def move(self, src: str, dst: str, seconds: float) -> None:
        self.buckets[src] -= seconds
        self.buckets[dst] += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def goodput(self) -> float:
        return self.buckets["train"] / max(self.elapsed(), 1e-9)


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (main rank only); optional TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, clock: Clock, tensorboard: bool) -> None:
        self.enabled, self.clock = enabled, clock
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1) if enabled else None  # noqa: SIM115
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise CamelidError(
                    "log.tensorboard = true needs the tensorboard package (pip install tensorboard)"
                ) from None

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"kind": kind, **fields, "time": round(self.clock.elapsed(), 4)}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in fields:
            for key, value in fields.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{kind}/{key}", value, fields["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
