"""A run's report: ``report.md`` and plots written beside the run's ``metrics.jsonl``.

The report is what a person reads to judge a run and compare it with others, so it must be
written for any run directory the trainer can leave behind: a finished run, a run killed after
one step, a resumed run whose step numbers go back after a rollback. It reads only what is there
and says what is missing instead of failing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camelid.errors import CamelidError
from camelid.io import atomic_path, format_bytes
from camelid.train.metrics import expert_balance, mfu_doubtful

WARMUP_STEPS = 3  # first steps left out of throughput means (compilation, allocator warm-up)
MAX_EVENT_ROWS = 50
GUARD_EVENTS = ("nonfinite", "spike")
MOE_EVENTS = ("router_blowup", "dead_expert")
HEATMAP_COLUMNS = 240  # at most this many step columns in experts.png; more steps are binned
HEATMAP_PANEL_ROWS = 1600  # expert rows per heatmap panel (~1 pixel each at the largest size)
HEATMAP_RANGE = 8.0  # the heatmap's colours saturate at 8x above or below the mean load
MAX_RANGES = 12  # step ranges listed per layer in the Experts table


@dataclass
class Invocation:
    """One process's part of a run, as metrics.jsonl shows it: from its ``start`` record (in
    files written before those existed: from the end of the previous summary) to its
    ``summary`` record, which a killed process never wrote."""

    index: int  # 1-based, in file order
    start: dict | None = None
    summary: dict | None = None
    last_time: float | None = None  # the latest ``time`` of its records: how far it got
    steps: list[dict] = field(default_factory=list)
    # Filled in by _account: the process's wall time and its split into buckets.
    wall_s: float = 0.0
    time_s: dict[str, float] = field(default_factory=dict)

    @property
    def peak(self) -> dict | None:
        for rec in (self.start, self.summary):
            if rec is not None and isinstance(rec.get("peak"), dict):
                return rec["peak"]
        return None

    @property
    def ended(self) -> str:
        status = (self.summary or {}).get("status")
        if self.summary is None:
            return "no summary (killed, or running)"
        return str(status) if status else "summary"


@dataclass
class _Run:
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    experts: list[dict] = field(default_factory=list)  # MoE models: one record per step
    invocations: list[Invocation] = field(default_factory=list)
    bad_lines: int = 0

    @property
    def summary(self) -> dict | None:
        """The last process's summary; None when it wrote none (killed, or still running)."""
        return self.invocations[-1].summary if self.invocations else None

    def info(self, key: str) -> Any:
        """A fact about the run that every process records alike (model, params, device):
        the latest start or summary record that has it."""
        for inv in reversed(self.invocations):
            for rec in (inv.summary, inv.start):
                if rec is not None and rec.get(key) is not None:
                    return rec[key]
        return None


def _num(value: Any) -> float | None:
    """A JSON number as float (NaN kept), anything else (null, strings, bools) as None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _finite(value: Any) -> float | None:
    x = _num(value)
    return x if x is not None and math.isfinite(x) else None


def _first(value: float | None, fallback: float | None) -> float | None:
    return fallback if value is None else value


def _read_metrics(path: Path) -> _Run:
    """Parse metrics.jsonl; lines that cannot be read (a line cut by a kill) are counted."""
    run = _Run()
    inv: Invocation | None = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)  # accepts NaN / Infinity, as Python's json writes them
            except ValueError:
                run.bad_lines += 1
                continue
            if not isinstance(rec, dict):
                run.bad_lines += 1
                continue
            t = _finite(rec.get("time"))
            kind = rec.get("kind")
            new_process = kind == "start" or inv is None or inv.summary is not None
            if new_process:
                inv = Invocation(len(run.invocations) + 1, start=rec if kind == "start" else None)
                run.invocations.append(inv)
            if t is not None:
                inv.last_time = t if inv.last_time is None else max(inv.last_time, t)
            if kind == "step" and _finite(rec.get("step")) is not None:
                run.steps.append(rec)
                inv.steps.append(rec)
            elif kind == "eval" and _finite(rec.get("step")) is not None:
                run.evals.append(rec)
            elif kind == "event":
                run.events.append(rec)
            elif kind == "experts" and _finite(rec.get("step")) is not None:
                run.experts.append(rec)
            elif kind == "summary":
                inv.summary = rec
    _account(run)
    return run


def _account(run: _Run) -> None:
    """Each process's wall time and buckets. A process that wrote its summary says them
    itself; one that did not (killed) counts up to its last record, and its steps' own times
    give its buckets: ``train`` for updates the run kept, ``skipped``, and ``lost`` for steps
    that a later record redoes (the run resumed from an earlier checkpoint, or rolled back);
    whatever else it did (start-up, checkpoints, evaluation) shows as the rest of its time."""
    kept, lowest = set(), math.inf
    for rec in reversed(run.steps):  # a step is kept unless a later record redoes its number
        step = _finite(rec.get("step"))
        if step < lowest:
            kept.add(id(rec))
        lowest = min(lowest, step)
    for inv in run.invocations:
        s = inv.summary
        if s is not None and "invocation_wall_s" in s:
            wall, buckets = _finite(s.get("invocation_wall_s")), s.get("invocation_time_s")
        elif s is not None:  # summaries written before whole-run accounting held the process's
            wall, buckets = _finite(s.get("wall_s")), s.get("time_s")
        else:
            wall, buckets = None, None
        if wall is not None:
            inv.wall_s = wall
            if isinstance(buckets, dict):
                inv.time_s = {
                    str(k): x for k, v in buckets.items() if (x := _finite(v)) is not None
                }
            continue
        inv.wall_s = inv.last_time or 0.0
        for rec in inv.steps:
            seconds = _finite(rec.get("step_time_s")) or 0.0
            if rec.get("skipped") is True:
                bucket = "skipped"
            else:
                bucket = "train" if id(rec) in kept else "lost"
            inv.time_s[bucket] = inv.time_s.get(bucket, 0.0) + seconds


def read_invocations(path: str | Path) -> list[Invocation]:
    """The processes that worked on the run whose metrics.jsonl is ``path``, in order, each
    with its wall time and buckets (see :func:`run_time`)."""
    return _read_metrics(Path(path)).invocations


def run_time(invocations: Sequence[Invocation]) -> tuple[float, dict[str, float]]:
    """Wall time and buckets summed over processes: the whole run's, however often it was
    stopped and resumed. The time between processes (waiting to be resumed) is not in it."""
    wall, buckets = 0.0, {}
    for inv in invocations:
        wall += inv.wall_s
        for k, v in inv.time_s.items():
            buckets[k] = buckets.get(k, 0.0) + v
    return wall, buckets


# --- formatting -----------------------------------------------------------------------------


def _si(n: float | None) -> str:
    """Counts such as parameters and tokens: 124.4M, 2.10B."""
    if n is None:
        return "–"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_duration(s: float | None) -> str:
    """8.3 s, 4m 05s, 2h 03m."""
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m}m {sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"


def _float(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _cell(value: Any, limit: int = 200) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped, bounded length."""
    text = " ".join(str(value).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _fenced(text: str, lang: str = "") -> str:
    """A fenced block whose fence is longer than any backtick run inside the text."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# --- figures --------------------------------------------------------------------------------


def _ema(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """Bias-corrected exponential moving average over the finite points, in file order.

    The smoothing widens with the run's length so that short runs are barely smoothed and long
    runs show the trend through batch noise. It restarts where the step goes back (a rollback
    or resume restores older weights), so it never carries the abandoned branch over.
    """
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
    beta = min(0.9, max(0.0, 1.0 - 10.0 / max(len(points), 1)))
    out_x, out_y, avg, t = [], [], 0.0, 0
    for x, y in points:
        if out_x and x < out_x[-1]:
            avg, t = 0.0, 0
        t += 1
        avg = beta * avg + (1 - beta) * y
        out_x.append(x)
        out_y.append(avg / (1 - beta**t))
    return out_x, out_y


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """Points for a line that breaks where the step goes back (rollback, resume) instead of
    drawing a segment back across the plot."""
    out_x: list[float] = []
    out_y: list[float] = []
    for x, y in zip(xs, ys, strict=True):
        if out_x and x < out_x[-1]:
            out_x.append(math.nan)
            out_y.append(math.nan)
        out_x.append(x)
        out_y.append(y)
    return out_x, out_y


def _new_figure(title: str) -> tuple[Any, Any]:
    # An explicit Agg canvas: no pyplot, no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, dst: Path) -> None:
    for ax in fig.axes:  # a run of one step: show whole steps around it, not fractions
        lo, hi = ax.get_xlim()
        if hi - lo < 2:
            ax.set_xlim((lo + hi) / 2 - 1, (lo + hi) / 2 + 1)
    with atomic_path(dst) as tmp:
        fig.savefig(tmp, format="png")


def _mark_steps(ax: Any, steps: list[float], label: str, **style: Any) -> None:
    if steps:
        ax.vlines(steps, 0, 1, transform=ax.get_xaxis_transform(), label=label, **style)


def _plot_loss(run: _Run, dst: Path) -> None:
    fig, ax = _new_figure("Loss")
    # A skipped update's loss (often the spike that made the guard skip it) is drawn apart and
    # left out of the smoothed curve, which shows what the model actually trained through.
    applied = [r for r in run.steps if r.get("skipped") is not True]
    xs = [float(r["step"]) for r in applied]
    ys = [_num(r.get("loss")) for r in applied]
    ys = [math.nan if y is None else y for y in ys]
    raw = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
    if raw:
        few = len(raw) < 200  # a short run's points stay visible; a long run's become a haze
        size, alpha = (14, 0.6) if few else (6, 0.3)
        ax.scatter(*zip(*raw, strict=True), s=size, color="C0", alpha=alpha, lw=0, label="train")
    ex, ey = _ema(xs, ys)
    if ex:
        ax.plot(*_line(ex, ey), color="C0", lw=1.6, label="train (smoothed)")
    val = [(float(r["step"]), _finite(r.get("val_loss"))) for r in run.evals]
    val = [(x, y) for x, y in val if y is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o", color="C3", ms=5, label="validation")
    bad = [
        (float(r["step"]), _finite(r.get("loss"))) for r in run.steps if r.get("skipped") is True
    ]
    bad = [(x, y) for x, y in bad if y is not None]

    # Keep a single spike from flattening the curve: cap the axis near the smoothed and
    # validation curves and pin losses beyond the cap to its edge.
    trend = ey + [y for _, y in val]
    everything = [y for _, y in raw + bad]
    if everything and trend:
        lo = min(*everything, *trend)
        hi = max(trend)
        span = max(hi - lo, 1e-6)
        if max(everything) > hi + 0.5 * span:
            top = hi + 0.3 * span
            ax.set_ylim(lo - 0.05 * span, top)
            bad = [(x, min(y, top - 0.03 * span)) for x, y in bad]
    if bad:
        ax.scatter(*zip(*bad, strict=True), s=24, color="C3", marker="x", label="skipped loss")

    skipped = [float(r["step"]) for r in run.steps if r.get("skipped") is True]
    _mark_steps(ax, skipped, "skipped update", colors="C3", alpha=0.35, lw=0.8)

    def event_steps(*names: str) -> list[float]:
        at = (_finite(e.get("step")) for e in run.events if e.get("event") in names)
        return sorted({s for s in at if s is not None})

    # Guard events usually coincide with a skipped update, already marked.
    guard = [s for s in event_steps(*GUARD_EVENTS) if s not in set(skipped)]
    _mark_steps(ax, guard, "spike / non-finite", colors="C1", alpha=0.5, lw=0.8)
    _mark_steps(ax, event_steps("rollback"), "rollback", colors="C4", linestyles="--")
    _mark_steps(ax, event_steps("resume"), "resume", colors="0.4", linestyles=":")
    ax.set_ylabel("DPO loss (mean over pairs)" if _is_dpo(run) else "loss (nats/token)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize="small")
    _save(fig, dst)


def _plot_lr(run: _Run, dst: Path) -> None:
    fig, ax = _new_figure("Learning rate")
    pts = [(float(r["step"]), _finite(r.get("lr"))) for r in run.steps]
    pts = [(x, y) for x, y in pts if y is not None]
    ax.plot(
        *_line(*zip(*pts, strict=True)), color="C2", lw=1.6, marker="." if len(pts) < 50 else None
    )
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_ylim(bottom=0)
    _save(fig, dst)


def _plot_throughput(run: _Run, dst: Path) -> None:
    fig, ax = _new_figure("Throughput")
    tps = [(float(r["step"]), _finite(r.get("tokens_per_s"))) for r in run.steps]
    tps = [(x, y) for x, y in tps if y is not None]
    handles = []
    if tps:
        handles += ax.plot(*_line(*zip(*tps, strict=True)), color="C0", lw=1.2, label="tokens/s")
    ax.set_ylabel("tokens/s", color="C0")
    ax.set_ylim(bottom=0)
    mfu = [(float(r["step"]), _finite(r.get("mfu"))) for r in run.steps]
    mfu = [(x, 100 * y) for x, y in mfu if y is not None]
    if mfu:
        ax2 = ax.twinx()
        unreliable = any((inv.peak or {}).get("reliable") is False for inv in run.invocations)
        label = "MFU?" if unreliable or max(y for _, y in mfu) > 100 else "MFU"
        handles += ax2.plot(*_line(*zip(*mfu, strict=True)), color="C1", lw=1.2, label=label)
        ax2.set_ylabel("MFU (%)", color="C1")
        ax2.set_ylim(bottom=0, top=max(1.0, 1.15 * max(y for _, y in mfu)))
        ax2.legend(handles=handles, loc="lower right", fontsize="small")
    _save(fig, dst)


# --- DPO (preference optimisation runs) ----------------------------------------------------

DPO_REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _is_dpo(run: _Run) -> bool:
    return any(_finite(r.get("rewards/margins")) is not None for r in run.steps)


def _dpo_points(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r["step"]), _finite(r.get(key))) for r in records if r.get("skipped") is not True]
    pts = [(x, y) for x, y in pts if y is not None]
    return [x for x, _ in pts], [y for _, y in pts]


def _plot_rewards(run: _Run, dst: Path) -> None:
    """DPO's rewards over the steps: chosen, rejected and their margin (smoothed, the margin's
    raw points too), and the share of pairs whose chosen reward is the higher; validation's
    margin and accuracy as points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 6.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    few = len(run.steps) < 200
    xs, ys = _dpo_points(run.steps, "rewards/margins")
    top.scatter(xs, ys, s=10 if few else 4, color="C0", alpha=0.35, lw=0)
    for key, colour, label in (("rewards/margins", "C0", "margin"),
                               ("rewards/chosen", "C2", "chosen"),
                               ("rewards/rejected", "C3", "rejected")):  # fmt: skip
        ex, ey = _ema(*_dpo_points(run.steps, key))
        if ex:
            top.plot(*_line(ex, ey), color=colour, lw=1.6, label=f"{label} (smoothed)")
    vx, vy = _dpo_points(run.evals, "val_rewards/margins")
    if vx:
        top.plot(vx, vy, "o", color="C1", ms=5, label="validation margin")
    top.axhline(0.0, color="0.5", lw=0.8, ls=":")
    top.set_title("DPO rewards: β (log π − log π_ref), mean over the step's pairs")
    top.set_ylabel("reward")
    top.legend(loc="upper left", fontsize="small")
    ax, ay = _ema(*_dpo_points(run.steps, "rewards/accuracies"))
    if ax:
        bottom.plot(*_line(ax, ay), color="C0", lw=1.6, label="train (smoothed)")
    vx, vy = _dpo_points(run.evals, "val_rewards/accuracies")
    if vx:
        bottom.plot(vx, vy, "o", color="C1", ms=5, label="validation")
    bottom.axhline(0.5, color="0.5", lw=0.8, ls=":")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_title("Reward accuracy: share of pairs with chosen > rejected")
    bottom.set_ylabel("accuracy")
    bottom.set_xlabel("step")
    bottom.legend(loc="lower right", fontsize="small")
    for a in (top, bottom):
        a.grid(True, alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, dst)


def _dpo_section(run: _Run, run_dir: Path) -> list[str]:
    """A DPO run's rewards: first and last logged step, the last evaluation, and the plot."""
    if not _is_dpo(run):
        return []
    steps = [r for r in run.steps if r.get("skipped") is not True]
    first, last = steps[0], steps[-1]
    last_eval = next((e for e in reversed(run.evals)
                      if _finite(e.get("val_rewards/margins")) is not None), None)  # fmt: skip
    header = (f"step {first['step']:.0f}", f"step {last['step']:.0f}")
    rows = []
    for key in ("loss", *DPO_REWARDS):
        cells = [_float(_finite(first.get(key))), _float(_finite(last.get(key)))]
        if last_eval is not None:
            cells.append(_float(_finite(last_eval.get(f"val_{key}"))))
        rows.append((key, *cells))
    columns = ("", *header) + ((f"validation (step {last_eval['step']:.0f})",) if last_eval else ())
    _plot_rewards(run, run_dir / "rewards.png")
    return [
        "## DPO",
        "",
        *_table(columns, rows),
        "",
        "Rewards are β times the policy's log-probability of a completion minus the reference's "
        "(the start weights'), summed over its tokens: 0 at the start, where the loss is log 2 "
        "(0.6931). Accuracy is the share of pairs whose chosen completion gets the higher reward.",
        "",
        "![DPO rewards](rewards.png)",
        "",
    ]


# --- experts (mixture-of-experts runs) ------------------------------------------------------


@dataclass
class _Experts:
    """The run's expert-load records that the report uses: the last one per step (a step redone
    after a resume or roll-back replaces the abandoned branch's), in step order, all of the
    final record's shape (its MoE layers and experts)."""

    layers: list[int]
    steps: list[int]
    tokens: np.ndarray  # [step, layer, expert]
    records: list[dict]

    def balance(self) -> dict[str, list]:
        """:func:`expert_balance`'s per-layer lists, each reshaped to [step][layer]."""
        n_steps, n_layers, n_experts = self.tokens.shape
        flat = expert_balance(torch.from_numpy(self.tokens.reshape(-1, n_experts)))
        return {key: [flat[key][i : i + n_layers] for i in range(0, n_steps * n_layers, n_layers)]
                for key in ("max_mean", "cv", "dead")}  # fmt: skip


def _expert_tokens(rec: dict) -> tuple[list[int], np.ndarray] | None:
    """(layers, tokens [layer, expert]) of an ``experts`` record, or None when it is not well
    formed (a record of another version, or cut)."""
    layers, tokens = rec.get("layers"), rec.get("tokens")
    if not isinstance(layers, list) or not layers or any(_finite(x) is None for x in layers):
        return None
    try:
        loads = np.asarray(tokens, dtype=np.float64)
    except (TypeError, ValueError):  # ragged, or not numbers
        return None
    if loads.ndim != 2 or loads.shape[0] != len(layers) or loads.shape[1] == 0:
        return None
    if not (np.isfinite(loads).all() and (loads >= 0).all()):
        return None
    return [int(x) for x in layers], loads


def _kept_experts(run: _Run) -> _Experts | None:
    kept, lowest = [], math.inf
    for rec in reversed(run.experts):  # kept unless a later record redoes its step (as _account)
        step = _finite(rec.get("step"))
        if step < lowest and (parsed := _expert_tokens(rec)) is not None:
            kept.append((int(step), *parsed, rec))
        lowest = min(lowest, step)
    if not kept:
        return None
    layers, shape = kept[0][1], kept[0][2].shape
    kept = [k for k in reversed(kept) if k[1] == layers and k[2].shape == shape]
    return _Experts(layers, [k[0] for k in kept], np.stack([k[2] for k in kept]),
                    [k[3] for k in kept])  # fmt: skip


def _ranges(steps: list[int], limit: int = MAX_RANGES) -> str:
    """``3–7, 12, 20–21`` for sorted steps; the first ``limit`` ranges, then how many more."""
    spans: list[list[int]] = []
    for s in steps:
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    text = ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in spans[:limit])
    if len(spans) > limit:
        text += f", … ({len(steps)} steps in all)"
    return text


def _load_ratios(tokens: np.ndarray, columns: int) -> tuple[np.ndarray, int]:
    """The heatmap's cells from tokens [step, layer, expert]: rows layer-major (layer 0's
    experts, then layer 1's, ...), one column per step or, past ``columns`` steps, per bin of
    consecutive steps (their tokens summed), each cell the expert's load ÷ its layer's mean in
    that column; NaN where the layer routed nothing. Returns (cells, steps per column)."""
    n_steps, n_layers, n_experts = tokens.shape
    per_bin = max(1, math.ceil(n_steps / columns))
    n_cols = math.ceil(n_steps / per_bin)
    pad = n_cols * per_bin - n_steps
    if pad:  # the last bin sums fewer steps; load ÷ mean does not depend on how many
        tokens = np.concatenate([tokens, np.zeros((pad, n_layers, n_experts))])
    binned = tokens.reshape(n_cols, per_bin, n_layers, n_experts).sum(axis=1)
    mean = binned.mean(axis=2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = binned / mean
    return ratio.transpose(1, 2, 0).reshape(n_layers * n_experts, n_cols), per_bin


def _plot_experts(ex: _Experts, dst: Path) -> None:
    """Heatmap: one row per expert, grouped by MoE layer (separated and labelled), one column
    per step (or per bin of steps on a long run), colour = the expert's load ÷ its layer's mean
    load on a log scale centred at 1 (black: no token). A model with more experts in all than a
    panel shows at about a pixel each is drawn in several panels side by side, so a dead
    expert stays a visible line even with 48 layers of 128 experts."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    n_layers, n_experts = len(ex.layers), ex.tokens.shape[2]
    image, per_bin = _load_ratios(ex.tokens, HEATMAP_COLUMNS)
    image = np.ma.masked_where(~(image > 0), image)
    # A fixed range, so that runs compare at a glance: 8x above or below the mean saturates
    # (fewer experts cannot be more than E times the mean).
    vmax = float(min(HEATMAP_RANGE, max(n_experts, 2)))
    norm = LogNorm(vmin=1 / vmax, vmax=vmax)
    cmap = colormaps["RdBu_r"].with_extremes(bad="black")

    panels = math.ceil(n_layers * n_experts / HEATMAP_PANEL_ROWS)
    per_panel = math.ceil(n_layers / panels)
    panels = math.ceil(n_layers / per_panel)
    rows = per_panel * n_experts
    height = min(max(3.5, 1.5 + 0.012 * rows), 18)
    fig = Figure(figsize=(min(6 + 4 * panels, 20), height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    first, last = ex.steps[0], ex.steps[-1]
    im = None
    for p, ax in enumerate(axes):
        lo, hi = p * per_panel, min((p + 1) * per_panel, n_layers)
        im = ax.imshow(image[lo * n_experts : hi * n_experts], aspect="auto",
                       interpolation="nearest", cmap=cmap, norm=norm,
                       extent=(first - 0.5, last + 0.5, (hi - lo) * n_experts, 0))  # fmt: skip
        for j in range(1, hi - lo):
            ax.axhline(j * n_experts, color="white", lw=1.0 if hi - lo <= 16 else 0.6)
        if n_layers == 1:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
            ticks = [t for t in ax.get_yticks() if 0 <= t < n_experts]
            ax.set_yticks([t + 0.5 for t in ticks], [f"{t:.0f}" for t in ticks])
            ax.set_ylabel(f"expert (MoE layer {ex.layers[0]})")
        else:
            every = math.ceil((hi - lo) / 24)  # at most 24 labels a panel
            shown = range(0, hi - lo, every)
            ax.set_yticks([(j + 0.5) * n_experts for j in shown],
                          [f"layer {ex.layers[lo + j]}" for j in shown])  # fmt: skip
            ax.tick_params(axis="y", length=0, labelsize="small" if hi - lo <= 12 else "x-small")
            if p == 0:
                ax.set_ylabel(f"{n_experts} experts per MoE layer, grouped by layer")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6 if panels > 1 else 10))
    title = "Expert load (tokens ÷ the layer's mean)"
    if per_bin > 1:
        title += f", {per_bin} steps per column"
    fig.suptitle(title)
    bar = fig.colorbar(im, ax=list(axes), extend="both", fraction=0.04 if panels == 1 else 0.02)
    k = math.floor(math.log2(vmax))
    ticks = [2.0**i for i in range(-k, k + 1)]  # powers of two: a factor of 2 is one step
    bar.set_ticks(ticks, labels=[f"{t:g}" if t >= 1 else f"1/{1 / t:g}" for t in ticks])
    bar.minorticks_off()
    bar.set_label("load ÷ mean load (log; black: no token)")
    _save(fig, dst)


def _plot_expert_balance(ex: _Experts, dst: Path) -> None:
    """Each MoE layer's max/mean load over the steps, and its max |router logit| when logged."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    logits = [rec.get("router_logit_max") for rec in ex.records]
    has_logits = any(isinstance(v, list) and len(v) == len(ex.layers) for v in logits)
    fig = Figure(figsize=(8, 6.5 if has_logits else 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if has_logits else 1, 1, sharex=True, squeeze=False)[:, 0]
    n = len(ex.layers)
    lo, span = ex.layers[0], max(ex.layers[-1] - ex.layers[0], 1)
    colours = [colormaps["viridis"]((layer - lo) / span) for layer in ex.layers]  # as the bar
    balance = ex.balance()["max_mean"]
    ax = axes[0]
    for j, layer in enumerate(ex.layers):
        ys = [math.nan if b[j] is None else b[j] for b in balance]
        ax.plot(ex.steps, ys, color=colours[j], lw=1.2, label=f"layer {layer}")
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
    ax.set_title("Expert balance: max / mean load per MoE layer")
    ax.set_ylabel("max / mean load (1: even)")
    finite = [y for b in balance for y in b if y is not None]
    if finite and max(finite) > 10:
        ax.set_yscale("log")
    if has_logits:
        ax2 = axes[1]
        for j in range(n):
            ys = []
            for v in logits:
                y = _num(v[j]) if isinstance(v, list) and len(v) == n else None
                ys.append(math.nan if y is None else y)
            ax2.plot(ex.steps, ys, color=colours[j], lw=1.2)
        ax2.set_title("Router: max |logit| per MoE layer")
        ax2.set_ylabel("max |router logit|")
    for a in axes:
        a.grid(True, alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("step")
    if n <= 8:
        ax.legend(loc="upper right", fontsize="small")
    else:  # too many layers for a legend: a colour bar of the layer numbers
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        sm = ScalarMappable(Normalize(lo, lo + span), colormaps["viridis"])
        fig.colorbar(sm, ax=list(axes), label="MoE layer", fraction=0.04)
    _save(fig, dst)


def _experts_section(run: _Run, run_dir: Path) -> list[str]:
    """Empty for a dense run (no ``experts`` records)."""
    ex = _kept_experts(run)
    if ex is None:
        return []
    _plot_experts(ex, run_dir / "experts.png")
    _plot_expert_balance(ex, run_dir / "experts_balance.png")
    final = expert_balance(torch.from_numpy(ex.tokens[-1]))
    last = ex.records[-1]
    logits = last.get("router_logit_max")
    logits = logits if isinstance(logits, list) and len(logits) == len(ex.layers) else None
    any_dead = (ex.tokens == 0).any(axis=2)  # [step, layer]
    dead_steps = [[s for s, d in zip(ex.steps, any_dead[:, j], strict=True) if d]
                  for j in range(len(ex.layers))]  # fmt: skip
    rows = []
    for j, layer in enumerate(ex.layers):
        row = ex.tokens[-1, j]
        rows.append(
            (
                str(layer),
                _float(final["max_mean"][j], 2),
                _float(final["cv"][j], 2),
                f"{final['dead'][j]} of {len(row)}",
                f"{min(row):,.0f}",
                f"{max(row):,.0f}",
                "–" if logits is None else _float(_finite(logits[j]), 2),
                _cell(_ranges(dead_steps[j]) or "none"),
            )
        )
    header = ("MoE layer", "max/mean", "CV", "dead", "min tokens", "max tokens",
              "max abs router logit", "steps with a dead expert")  # fmt: skip
    lines = [
        "## Experts",
        "",
        f"{len(ex.layers)} MoE layer(s) of {ex.tokens.shape[2]} routed experts; expert "
        f"loads of {len(ex.steps)} step(s), steps {ex.steps[0]}–{ex.steps[-1]} (a step redone "
        "after a resume or roll-back counts once, as redone). The table is the last step's "
        f"(step {ex.steps[-1]}): max/mean is the busiest expert's tokens ÷ the layer's mean, "
        "CV the coefficient of variation of the loads.",
        "",
        *_table(header, rows),
        "",
    ]
    extras = [(name, _finite(last.get(key))) for name, key in
              (("aux loss", "aux_loss"), ("router z-loss", "z_loss"))]  # fmt: skip
    bias = last.get("bias_absmax")
    if isinstance(bias, list) and bias and all(_finite(b) is not None for b in bias):
        extras.append(("max abs selection bias", max(_finite(b) for b in bias)))
    if shown := [f"{name} {value:.4g}" for name, value in extras if value is not None]:
        lines += [f"At step {ex.steps[-1]}: " + ", ".join(shown) + ".", ""]
    alarms = {k: sum(1 for e in run.events if e.get("event") == k) for k in MOE_EVENTS}
    if any(alarms.values()):
        counts = ", ".join(f"{n} {k}" for k, n in alarms.items() if n)
        lines += [f"Alarms: {counts} (listed under Events).", ""]
    else:
        lines += ["No MoE alarm (router_blowup, dead_expert).", ""]
    lines += ["![Expert load](experts.png)", "", "![Expert balance](experts_balance.png)", ""]
    return lines


# --- report ---------------------------------------------------------------------------------


def _throughput_means(run: _Run) -> tuple[float | None, float | None, bool]:
    """Mean tokens/s and MFU over applied steps, past each process's first few (warm-up)
    steps; and whether that MFU is doubtful (above 100%, or against an unreliable peak)."""
    applied: list[tuple[dict, Invocation]] = []
    for inv in run.invocations:
        mine = [r for r in inv.steps if r.get("skipped") is not True]
        applied += [(r, inv) for r in (mine[WARMUP_STEPS:] if len(mine) > WARMUP_STEPS else mine)]

    def mean(key: str) -> float | None:
        vals = [v for r, _ in applied if (v := _finite(r.get(key))) is not None]
        return sum(vals) / len(vals) if vals else None

    mfu = mean("mfu")
    unreliable = any(
        (inv.peak or {}).get("reliable") is False
        for r, inv in applied
        if _finite(r.get("mfu")) is not None
    )
    return mean("tokens_per_s"), mfu, mfu_doubtful(mfu, not unreliable)


def _peak_text(run: _Run) -> str:
    """The peak MFU is relative to, per process when they differ."""
    peaks = [(inv.index, p) for inv in run.invocations if (p := inv.peak) is not None]
    texts = []
    for index, p in peaks:
        text = str(p.get("detail") or p.get("source") or "?")
        if p.get("reliable") is False:
            text += " (unreliable)"
        texts.append((index, text))
    if not texts:
        return "–"
    if len({t for _, t in texts}) == 1:
        return _cell(texts[-1][1])
    return _cell("; ".join(f"process {i}: {t}" for i, t in texts))


def _mfu_note(run: _Run, mfu: float | None) -> list[str]:
    notes = []
    for inv in run.invocations:
        p = inv.peak or {}
        if p.get("reliable") is False:
            note = p.get("note") or "the machine was busy while the peak was measured"
            notes.append(f"process {inv.index}'s peak is unreliable: {note}")
    if mfu is not None and mfu > 1.0:
        notes.append(
            "an MFU above 100% means the peak is lower than what this model's matmuls reach "
            "here; set run.peak_tflops to the device's real peak"
        )
    if not notes:
        return []
    return ["", "MFU is marked '?', not a plain fact: " + "; ".join(notes) + "."]


def _summary_section(run: _Run) -> list[str]:
    s = run.summary or {}
    last = run.steps[-1] if run.steps else {}
    last_eval = run.evals[-1] if run.evals else {}
    # The summary's figure, or, for a run cut short before writing one, the last record's.
    steps = _first(_num(s.get("steps")), _num(last.get("step")))
    tokens = _first(_num(s.get("tokens")), _num(last.get("tokens")))
    wall, buckets = run_time(run.invocations)
    if "train" in buckets and wall > 0:
        goodput = buckets["train"] / wall
    else:
        goodput = _finite(s.get("goodput"))
    val_loss = _first(_finite(s.get("final_val_loss")), _finite(last_eval.get("val_loss")))
    val_bpb = _first(_finite(s.get("final_val_bpb")), _finite(last_eval.get("val_bpb")))
    last_loss = next(
        (v for r in reversed(run.steps) if (v := _finite(r.get("loss"))) is not None), None
    )
    tps, mfu, doubtful = _throughput_means(run)
    mems = [v for r in run.steps if (v := _finite(r.get("peak_mem_bytes"))) is not None]
    world = _num(run.info("world_size"))
    processes = len(run.invocations)

    rows = [
        ("model", _cell(run.info("model") or "–")),
        ("parameters", _si(_num(run.info("params")))),
        ("device", _cell(run.info("device") or "–")),
        ("world size", "–" if world is None else f"{world:.0f}"),
        ("steps", "–" if steps is None else f"{steps:.0f}"),
        ("tokens", _si(tokens)),
        ("processes", f"{processes}" + (f" ({processes - 1} resumed)" if processes > 1 else "")),
        ("wall time", format_duration(wall if wall > 0 else None)),
        ("goodput", _pct(goodput)),
        ("final val loss", _float(val_loss)),
        ("final val bpb", _float(val_bpb)),
        ("last train loss", _float(last_loss)),
        ("mean tokens/s", "–" if tps is None else f"{tps:,.0f}"),
        ("mean MFU", _pct(mfu) + ("?" if doubtful else "")),
        ("MFU peak (per device)", _peak_text(run)),
        ("peak memory", format_bytes(max(mems)) if mems else "–"),
    ]
    lines = ["## Summary", ""]
    if run.summary is None:
        lines += [
            "The run's last process wrote no summary record (still running, or killed): the "
            "figures below come from the last logged records.",
            "",
        ]
    lines += _table(("", "value"), rows)
    lines += [
        "",
        "Wall time and goodput cover every process of the run (the time between a stop and "
        "its resume is not counted). Means of tokens/s and MFU leave out skipped updates and "
        f"each process's first {WARMUP_STEPS} steps (warm-up).",
        *_mfu_note(run, mfu),
    ]
    return lines


def _time_section(run: _Run) -> list[str]:
    wall, buckets = run_time(run.invocations)
    parts = list(buckets.items())
    if not parts:
        return []
    total = sum(v for _, v in parts)
    if wall > total:
        parts.append(("other", wall - total))
        total = wall
    rows = [(_cell(k), format_duration(v), _pct(v / total if total > 0 else None))
            for k, v in parts]  # fmt: skip
    lines = ["## Time", "", *_table(("phase", "time", "share"), rows)]
    killed = [inv for inv in run.invocations if inv.summary is None and inv.steps]
    if killed:
        which = ", ".join(str(inv.index) for inv in killed)
        lines += [
            "",
            f"Process {which} wrote no summary: its time counts up to its last record, its "
            "steps' own times give train, skipped and lost (steps redone after a resume or "
            "roll-back), and the rest of its time shows as other.",
        ]
    return lines


def _processes_section(run: _Run) -> list[str]:
    if len(run.invocations) < 2:
        return []
    rows = []
    for inv in run.invocations:
        start = inv.start or {}
        first = _num(start.get("resumed_from"))
        if first is None and inv.start is not None:
            first = 0.0  # a fresh start
        steps = [s for r in inv.steps if (s := _finite(r.get("step"))) is not None]
        last = _first(_num((inv.summary or {}).get("steps")), max(steps) if steps else None)
        train = inv.time_s.get("train")
        rows.append(
            (
                str(inv.index),
                _cell(start.get("started_at") or "–"),
                "–" if first is None else f"{first:.0f}",
                "–" if last is None else f"{last:.0f}",
                format_duration(inv.wall_s),
                _pct(train / inv.wall_s if train is not None and inv.wall_s > 0 else None),
                _cell(inv.ended),
            )
        )
    header = ("process", "started", "from step", "to step", "wall time", "goodput", "ended")
    return ["## Processes", "", *_table(header, rows)]


def _events_section(run: _Run) -> list[str]:
    counts: dict[str, int] = {}
    for e in run.events:
        name = str(e.get("event") or "?")
        counts[name] = counts.get(name, 0) + 1
    if not counts:  # records may be gone while the summary still counts them
        summary_counts = (run.summary or {}).get("events")
        if isinstance(summary_counts, dict):
            counts = {str(k): int(n) for k, v in summary_counts.items() if (n := _finite(v))}
    if not counts:
        return ["## Events", "", "None."]
    lines = ["## Events", ""]
    lines += _table(("event", "count"), [(_cell(k), str(v)) for k, v in sorted(counts.items())])
    if run.events:
        events = run.events
        half = MAX_EVENT_ROWS // 2
        gap = len(events) > MAX_EVENT_ROWS
        shown = events[:half] + events[-half:] if gap else events
        rows = []
        for i, e in enumerate(shown):
            if gap and i == half:
                rows.append(("…", f"{len(events) - 2 * half} more", ""))
            step = _num(e.get("step"))
            rows.append(
                (
                    "–" if step is None else f"{step:.0f}",
                    _cell(e.get("event") or "?"),
                    _cell(e.get("detail") or ""),
                )
            )
        lines += ["", *_table(("step", "event", "detail"), rows)]
    return lines


def _sample_section(run: _Run) -> list[str]:
    for r in reversed(run.evals):
        sample = r.get("sample")
        if isinstance(sample, str) and sample:
            step = _num(r.get("step"))
            prompt = r.get("prompt") if isinstance(r.get("prompt"), str) else ""
            head = "## Sample" + ("" if step is None else f" (step {step:.0f})")
            return [head, "", _fenced(prompt + sample)]
    return []


def _write_plots(run: _Run, run_dir: Path) -> list[str]:
    """Draw the plots the records allow and return the Markdown lines that embed them."""
    plots = []
    if run.steps:
        plots.append(("loss.png", "Loss", _plot_loss))
        if any(_finite(r.get("lr")) is not None for r in run.steps):
            plots.append(("lr.png", "Learning rate", _plot_lr))
        if any(_finite(r.get("tokens_per_s")) is not None for r in run.steps):
            plots.append(("throughput.png", "Throughput", _plot_throughput))
    if not plots:
        return ["No training steps logged yet.", ""]
    lines = []
    for name, title, plot in plots:
        plot(run, run_dir / name)
        lines += [f"![{title}]({name})", ""]
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and its plots into ``run_dir`` and return the report's path.

    Works on any run directory with a ``metrics.jsonl``, finished or not, so a person can look
    at a run while it trains or after it was killed.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise CamelidError(f"{metrics}: no such file; is {run_dir} a training run directory?")
    try:
        run = _read_metrics(metrics)
    except OSError as exc:
        raise CamelidError(f"{metrics}: cannot read ({exc.strerror or exc})") from exc

    lines = [f"# Run report: {run_dir.resolve().name}", ""]
    if run.bad_lines:
        lines += [f"{run.bad_lines} unreadable line(s) in metrics.jsonl were skipped.", ""]
    lines += [*_summary_section(run), ""]
    if time_lines := _time_section(run):
        lines += [*time_lines, ""]
    if process_lines := _processes_section(run):
        lines += [*process_lines, ""]

    try:
        lines += ["## Plots", "", *_write_plots(run, run_dir)]
        lines += _dpo_section(run, run_dir)
        if expert_lines := _experts_section(run, run_dir):
            lines += [*expert_lines]
        lines += [*_events_section(run), ""]
        if sample_lines := _sample_section(run):
            lines += [*sample_lines, ""]
        recipe = run_dir / "recipe.toml"
        if recipe.is_file():
            text = recipe.read_text(encoding="utf-8", errors="replace")
            lines += ["## Recipe", "", "[recipe.toml](recipe.toml)", "", _fenced(text, "toml"), ""]
        report = run_dir / "report.md"
        with atomic_path(report) as tmp:
            tmp.write_text("\n".join(lines), encoding="utf-8")
    except OSError as exc:
        raise CamelidError(f"{run_dir}: cannot write the report ({exc})") from exc
    return report
