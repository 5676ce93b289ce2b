"""Metrics: MFU against a named peak, goodput, and the metrics.jsonl log.

MFU = FLOPs per token (``ModelConfig.flops_per_token``, the one formula) × tokens/s ÷ the peak
of every device of the run. The peak has a provenance that the live line, metrics.jsonl and the
report carry with it (:class:`Peak`): *configured* (``run.peak_tflops``), *nominal* (a GPU's
data-sheet figure) or *measured* (a CPU's fp32 matmul rate, timed at start-up). A measured peak
is only as good as the machine's calm while it was timed: when other processes took the cores,
it comes out low and MFU high, so such a measurement is flagged, and so is any MFU above 100%.

Goodput = time spent in steps whose update was kept ÷ wall time; start-up, checkpointing,
evaluation, rolled-back and skipped steps and export all count against it.

Expert load (MoE models): :func:`expert_balance` turns one step's tokens per expert into the
figures metrics.jsonl's ``experts`` record, the live line (:func:`format_balance`) and the
report share.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from camelid.errors import CamelidError
from camelid.infer.linear import ONEDNN, linear

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

# A CPU peak is timed with torch.mm of this size, repeated (best of) while the budget lasts.
MATMUL_SIZE = 4096
MATMUL_REPS = 5
MATMUL_BUDGET_S = 3.0
# The timed matmul must have kept this share of its threads busy (process CPU time ÷ wall time
# ÷ threads) for the figure to be trusted: below it, other processes had the cores.
MIN_CPU_SHARE = 0.8


@dataclass(frozen=True)
class Peak:
    """The FLOP/s one device is measured against, and where that figure comes from."""

    flops: float | None  # None: no peak known, MFU is not computed
    source: str  # "configured" | "nominal" | "measured" | "unknown"
    detail: str  # what the figure is, for the header and the report
    reliable: bool = True
    note: str = ""  # why it is not reliable

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def mfu_doubtful(mfu: float | None, peak_reliable: bool) -> bool:
    """An MFU that must not be shown as a plain fact: one above 100% (the peak is too low for
    what the model's matmuls reach), or one against a peak the machine's load made unreliable."""
    return mfu is not None and (mfu > 1.0 or not peak_reliable)


def format_mfu(mfu: float | None, peak: Peak) -> str:
    """``MFU 41.2% (measured peak)``; a doubtful figure carries a ``?``: ``MFU 112.0%?``."""
    if mfu is None:
        return ""
    mark = "?" if mfu_doubtful(mfu, peak.reliable) else ""
    return f"MFU {100 * mfu:.1f}%{mark} ({peak.source} peak)"


def device_peak(device: torch.device, configured_tflops: float = 0.0) -> Peak:
    """The peak for MFU: the recipe's figure, a known GPU's data sheet, or a CPU's measured
    fp32 matmul rate (measured once per process)."""
    if configured_tflops > 0:
        return Peak(configured_tflops * 1e12, "configured",
                    f"{configured_tflops:g} TFLOP/s, from run.peak_tflops")  # fmt: skip
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                sheet = f"{tflops:g} TFLOP/s, dense bf16 from the {key} data sheet"
                return Peak(tflops * 1e12, "nominal", sheet)
        return Peak(None, "unknown", f"no data-sheet peak known for {name}; set run.peak_tflops")
    return _cpu_peak()


def device_peak_flops(device: torch.device, configured_tflops: float = 0.0) -> float | None:
    """The peak's figure alone (FLOP/s), for callers that need no provenance."""
    return device_peak(device, configured_tflops).flops


@functools.cache
def _cpu_peak() -> Peak:
    """Measured once per process (a few seconds)."""
    return cpu_peak_from(_matmul_timings(), torch.get_num_threads())


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _matmul_timings(
    n: int = MATMUL_SIZE, reps: int = MATMUL_REPS, budget_s: float = MATMUL_BUDGET_S
) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of each timed n × n matmul after a warm-up: ``reps`` of
    them, or as many as ``budget_s`` allows (at least two). On CPUs the repetitions alternate
    between ``torch.mm`` (MKL) and oneDNN's inner product, which is often the faster of the
    two (the inference engine uses it): the peak is the machine's, not one library's."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    kernels = [lambda: torch.mm(a, b, out=out)]
    if ONEDNN:
        kernels.append(lambda: linear(a, b))
    for kernel in kernels:
        kernel()
    timings: list[tuple[float, float]] = []
    t_start = time.perf_counter()
    while len(timings) < reps and (len(timings) < 2 or time.perf_counter() - t_start < budget_s):
        kernel = kernels[len(timings) % len(kernels)]
        t0, c0 = time.perf_counter(), time.process_time()
        kernel()
        timings.append((time.perf_counter() - t0, time.process_time() - c0))
    return timings


def cpu_peak_from(timings: list[tuple[float, float]], threads: int, n: int = MATMUL_SIZE) -> Peak:
    """The measured peak from matmul timings: the best repetition's rate, trusted only when
    that repetition kept its threads busy (other processes had the cores otherwise)."""
    wall, cpu = min(timings)
    flops = 2 * n**3 / wall
    expected = max(1, min(threads, _usable_cores()))
    share = cpu / wall / expected
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    detail = (f"{flops / 1e9:,.1f} GFLOP/s, fp32 matmul {n}x{n} measured at start-up ({when}), "
              f"best of {len(timings)} in {sum(w for w, _ in timings):.1f} s")  # fmt: skip
    if share >= MIN_CPU_SHARE:
        return Peak(flops, "measured", detail)
    note = (
        f"the timed matmul kept {cpu / wall:.1f} of its {expected} threads busy: other "
        "processes had the cores, so the peak came out low and MFU high; set run.peak_tflops "
        "to pin it"
    )
    return Peak(flops, "measured", detail, reliable=False, note=note)


def measure_matmul_flops(n: int = MATMUL_SIZE, reps: int = 3) -> float:
    """This CPU's fp32 matmul rate: the best of ``reps`` timed n × n matmuls (MKL and oneDNN)
    after a warm-up. Smaller matrices measure well below the peak on some CPUs, and a busy machine
    measures low, which inflates MFU: set run.peak_tflops to pin it."""
    timings = _matmul_timings(n, reps, budget_s=math.inf)
    return 2 * n**3 / min(w for w, _ in timings)


def peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:
        return None


class Clock:
    """This process's wall time split into named buckets, for goodput and the report."""

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
    """Appends one JSON object per line to metrics.jsonl (main rank only); optional TensorBoard.

    Every record carries ``time``: this process's seconds since ``train()`` began. A file that
    ends without a newline (a kill mid-write) gets one first, so the cut record stays one
    unreadable line and the next record starts whole (``torn`` says it happened).
    """

    def __init__(self, run_dir: Path, enabled: bool, clock: Clock, tensorboard: bool) -> None:
        self.enabled, self.clock = enabled, clock
        self.path = run_dir / "metrics.jsonl"
        self.torn = enabled and _ends_mid_line(self.path)
        self._file = open(self.path, "a", buffering=1) if enabled else None  # noqa: SIM115
        if self._file is not None and self.torn:
            self._file.write("\n")
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


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


# --- expert load (mixture-of-experts models) ------------------------------------------------


def expert_balance(tokens: torch.Tensor | Sequence[Sequence[int]]) -> dict[str, Any]:
    """How evenly each MoE layer spread one step's tokens over its experts.

    ``tokens[l][e]`` is the number of tokens layer ``l`` routed to expert ``e`` (the whole
    step, all ranks): a [L, E] tensor or nested lists. Per layer: ``max_mean`` (the busiest
    expert's load ÷ the mean load; 1 is perfect balance, ``E`` is every token on one expert),
    ``cv`` (population standard deviation ÷ mean) and ``dead`` (experts that got no token).
    Whole model: ``max_mean_worst`` (the highest ``max_mean``), ``worst_layer`` (its position in
    the lists) and ``dead_total``. A layer that routed no token at all has no balance to speak
    of: its ``max_mean`` and ``cv`` are None (not a division by zero), and every one of its
    experts counts as dead. The values are plain lists, ints and floats, ready for
    metrics.jsonl. Rows are independent, so the report passes a whole run's [steps · L, E].
    """
    t = torch.as_tensor(tokens, dtype=torch.float64, device="cpu")
    if t.numel() == 0:
        return {"max_mean": [], "cv": [], "dead": [], "max_mean_worst": None,
                "worst_layer": None, "dead_total": 0}  # fmt: skip
    if t.ndim != 2:
        raise ValueError(f"expert_balance: tokens must be [layers, experts], got {tuple(t.shape)}")
    mean = t.mean(dim=1)
    live = mean > 0
    safe = torch.where(live, mean, torch.ones_like(mean))
    ratio = t.amax(dim=1) / safe
    cv = t.std(dim=1, correction=0) / safe
    dead = (t == 0).sum(dim=1)
    max_mean = [
        float(r) if ok else None for r, ok in zip(ratio.tolist(), live.tolist(), strict=True)
    ]
    cvs = [float(c) if ok else None for c, ok in zip(cv.tolist(), live.tolist(), strict=True)]
    worst = int(torch.where(live, ratio, -math.inf).argmax()) if bool(live.any()) else None
    return {
        "max_mean": max_mean,
        "cv": cvs,
        "dead": [int(d) for d in dead.tolist()],
        "max_mean_worst": max_mean[worst] if worst is not None else None,
        "worst_layer": worst,
        "dead_total": int(dead.sum()),
    }


def format_balance(balance: dict[str, Any] | None) -> str:
    """The live line's expert text: the worst layer's max/mean and CV, and the dead experts
    of the whole model, e.g. ``experts max/mean 1.84 cv 0.41 dead 1``; "" for a dense model
    (no balance) or a step whose layers routed nothing."""
    if not balance:
        return ""
    worst = balance.get("worst_layer")
    dead = int(balance.get("dead_total") or 0)
    if worst is None:
        return f"experts dead {dead}" if dead else ""
    cv = balance["cv"][worst]
    return f"experts max/mean {balance['max_mean'][worst]:.2f} cv {cv:.2f} dead {dead}"
