"""The run report: written for finished, partial and unhealthy runs alike."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from camelid.errors import CamelidError
from camelid.train.report import read_invocations, run_time, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECIPE = '[model]\npreset = "tiny"\n\n[train]\nsteps = 120\nlr = 3e-4\n'


def _step(i: int, loss: float = math.nan, **extra) -> dict:
    rec = {
        "kind": "step",
        "step": i,
        "loss": 4.0 * math.exp(-i / 40) + 2.0 if math.isnan(loss) else loss,
        "grad_norm": 1.0,
        "lr": 3e-4 * min(1.0, i / 10),
        "tokens": 4096 * i,
        "tokens_per_s": 500.0 if i <= 3 else 10_000.0,
        "mfu": 0.05 if i <= 3 else 0.40,
        "peak_mem_bytes": 2 * 2**30,
        "step_time_s": 0.4,
        "skipped": False,
        "time": 0.4 * i,
    }
    rec.update(extra)
    return rec


def _write(run_dir: Path, records: list[dict], recipe: str | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    if recipe is not None:
        (run_dir / "recipe.toml").write_text(recipe)
    return run_dir


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, path


def _full_run() -> list[dict]:
    records: list[dict] = [_step(i) for i in range(1, 121)]
    records[59] = _step(60, loss=50.0, skipped=True)
    for s in (40, 80, 120):
        records.append(
            {
                "kind": "eval",
                "step": s,
                "val_loss": 2.5 - s / 1000,
                "val_bpb": 1.1,
                "prompt": "Once upon a time",
                "sample": f" there was a llama at step {s}.",
                "time": 0.4 * s,
            }
        )
    records += [
        {"kind": "event", "step": 60, "event": "spike", "detail": "loss 50.0 > 5 x mean"},
        {"kind": "event", "step": 100, "event": "checkpoint", "detail": "step-100 | 12 MB"},
        {"kind": "event", "step": 110, "event": "future_kind", "detail": "ignored fields ok"},
        {"kind": "unknown", "whatever": 1},
    ]
    records.append(
        {
            "kind": "summary",
            "steps": 120,
            "tokens": 491_520,
            "wall_s": 60.0,
            "goodput": 0.8,
            "time_s": {"startup": 5.0, "train": 48.0, "checkpoint": 2.0, "eval": 3.0},
            "final_val_loss": 2.38,
            "final_val_bpb": 1.0875,
            "model": "llama dense d=256 L=4",
            "params": 12_345_678,
            "device": "cpu",
            "world_size": 1,
            "events": {"spike": 1, "checkpoint": 1},
        }
    )
    return records


def test_full_run(tmp_path):
    run = _write(tmp_path / "run-full", _full_run(), recipe=RECIPE)
    report = write_report(run)
    assert report == run / "report.md"
    text = report.read_text()

    assert "# Run report: run-full" in text
    for figure in ("llama dense d=256 L=4", "12.35M", "491.52K", "80.0%", "2.3800", "1.0875"):
        assert figure in text, figure
    # Means leave out the skipped step and the three warm-up steps.
    assert "10,000" in text and "40.0%" in text
    assert "2.00 GiB" in text
    # Time shares: train 48 of 60 s; the 2 s nobody accounted for shows as "other".
    assert "| train | 48.0 s | 80.0% |" in text
    assert "| other | 2.0 s | 3.3% |" in text
    # Events: counts and rows, with table-breaking characters escaped.
    assert "| spike | 1 |" in text
    assert "step-100 \\| 12 MB" in text
    # The last sample, and the recipe verbatim.
    assert "Once upon a time there was a llama at step 120." in text
    assert "```toml\n" + RECIPE.rstrip() + "\n```" in text

    for name in ("loss.png", "lr.png", "throughput.png"):
        assert f"]({name})" in text
        _assert_png(run / name)
    assert not list(run.glob(".*.tmp*"))


def test_partial_run_without_summary_or_eval(tmp_path):
    run = _write(tmp_path / "killed", [_step(i) for i in range(1, 4)])
    # A kill mid-write leaves a cut last line.
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 4, "lo')
    text = write_report(run).read_text()
    assert "no summary record" in text
    assert "1 unreadable line" in text
    assert "| steps | 3 |" in text
    assert "## Sample" not in text and "## Recipe" not in text
    _assert_png(run / "loss.png")


def test_single_step_and_no_optional_fields(tmp_path):
    run = _write(tmp_path / "one", [{"kind": "step", "step": 0, "loss": 10.5}])
    text = write_report(run).read_text()
    assert "10.5000" in text
    assert (run / "loss.png").is_file()
    assert not (run / "lr.png").exists() and not (run / "throughput.png").exists()


def test_no_steps_only_summary(tmp_path):
    summary = {"kind": "summary", "steps": 0, "events": {"signal": 1, "odd": math.nan}}
    run = _write(tmp_path / "fresh", [summary])
    text = write_report(run).read_text()
    assert "No training steps logged yet." in text
    assert "| signal | 1 |" in text and "odd" not in text
    assert not list(run.glob("*.png"))


def test_unwritable_run_dir_is_a_clear_error(tmp_path, monkeypatch):
    run = _write(tmp_path / "ro", [_step(1)])

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("camelid.train.report.atomic_path", refuse)
    with pytest.raises(CamelidError, match="cannot write the report"):
        write_report(run)


def test_nan_losses_skips_and_rollback(tmp_path):
    records = [_step(i) for i in range(1, 31)]
    records[9] = _step(10, loss=math.nan, skipped=True)
    records[10] = _step(11, loss=math.inf, skipped=True, mfu=None, peak_mem_bytes=None)
    records[11] = {"kind": "step", "step": 12, "loss": None, "skipped": None}
    records.append({"kind": "event", "step": 30, "event": "rollback", "detail": "to step 20"})
    records += [_step(i, loss=2.5) for i in range(21, 26)]  # step numbers go back
    records.append({"kind": "eval", "step": 25, "val_loss": math.nan, "val_bpb": None})
    run = _write(tmp_path / "nan", records)
    assert "NaN" in (run / "metrics.jsonl").read_text()

    text = write_report(run).read_text()
    assert "| last train loss | 2.5000 |" in text
    assert "| final val loss | – |" in text
    assert "| rollback | 1 |" in text
    _assert_png(run / "loss.png")


def test_missing_metrics_names_the_file(tmp_path):
    with pytest.raises(CamelidError, match=r"metrics\.jsonl"):
        write_report(tmp_path / "nowhere")


# ----------------------------------------------------------------- runs of several processes
PEAK = {
    "flops": 1e11,
    "source": "measured",
    "detail": "100.0 GFLOP/s, fp32 matmul",
    "reliable": True,
}


def _start(resumed_from: int | None = None, **extra) -> dict:
    rec = {"kind": "start", "started_at": "2026-01-01 00:00:00 UTC", "resumed_from": resumed_from,
           "model": "tiny: 2 layers", "params": 1000, "device": "cpu", "world_size": 1,
           "peak": PEAK, "time": 1.0}  # fmt: skip
    rec.update(extra)
    return rec


def _killed_then_finished() -> list[dict]:
    """Process 1 killed after step 10 (last checkpoint: step 8) without a summary; process 2
    resumed from step 8, redid steps 9 and 10, and finished at step 20."""
    p1 = [_start(), *(_step(i, time=1.0 + 0.4 * i) for i in range(1, 11))]
    p1.insert(
        9, {"kind": "event", "step": 8, "event": "checkpoint", "detail": "step-8", "time": 4.3}
    )
    p2 = [_start(8, time=2.0)]
    p2 += [
        _step(i, time=2.0 + 0.4 * (i - 8), tokens_per_s=500.0 if i <= 11 else 10_000.0)
        for i in range(9, 21)
    ]  # its own warm-up steps, 9..11, are slow
    p2.append({"kind": "summary", "status": "finished", "steps": 20, "tokens": 4096 * 20,
               "wall_s": 15.0, "goodput": 0.53, "invocations": 2, "invocation_wall_s": 10.0,
               "invocation_time_s": {"startup": 2.0, "train": 4.8, "eval": 1.0},
               "time": 10.0})  # fmt: skip
    return p1 + p2


def test_a_resumed_run_is_accounted_over_every_process(tmp_path):
    run = _write(tmp_path / "resumed", _killed_then_finished())
    first, second = read_invocations(run / "metrics.jsonl")
    # Process 1 counts up to its last record; its steps 9 and 10, redone later, are lost.
    assert first.summary is None and first.wall_s == pytest.approx(5.0)
    assert first.time_s == pytest.approx({"train": 3.2, "lost": 0.8})
    assert second.wall_s == 10.0 and second.time_s["train"] == 4.8
    wall, buckets = run_time([first, second])
    assert wall == pytest.approx(15.0) and buckets["train"] == pytest.approx(8.0)

    text = write_report(run).read_text()
    for row in (
        "| steps | 20 |",
        "| processes | 2 (1 resumed) |",
        "| wall time | 15.0 s |",
        "| goodput | 53.3% |",
        "| lost | 0.8 s | 5.3% |",
        "| other | 3.2 s | 21.3% |",
        "| mean tokens/s | 10,000 |",  # each process's own warm-up steps left out
    ):
        assert row in text, row
    assert "no summary record" not in text  # the last process wrote one
    assert "Process 1 wrote no summary" in text
    assert "| 1 | 2026-01-01 00:00:00 UTC | 0 | 10 | 5.0 s | 64.0% | no summary" in text
    assert "| 2 | 2026-01-01 00:00:00 UTC | 8 | 20 | 10.0 s | 48.0% | finished |" in text
    assert "| model | tiny: 2 layers |" in text  # from the start records


def test_summaries_written_before_start_records_still_add_up(tmp_path):
    records = [_step(i) for i in range(1, 6)]
    records.append({"kind": "summary", "status": "stopped", "steps": 5, "wall_s": 3.0,
                    "goodput": 0.5, "time_s": {"train": 1.5}})  # fmt: skip
    records += [_step(i) for i in range(6, 11)]
    records.append({"kind": "summary", "status": "finished", "steps": 10, "wall_s": 4.0,
                    "goodput": 0.5, "time_s": {"train": 2.0}})  # fmt: skip
    text = write_report(_write(tmp_path / "old", records)).read_text()
    assert "| processes | 2 (1 resumed) |" in text
    assert "| wall time | 7.0 s |" in text and "| goodput | 50.0% |" in text
    assert "| 1 | – | – | 5 | 3.0 s | 50.0% | stopped |" in text


@pytest.mark.parametrize("case", ["unreliable", "above-100", "plain"])
def test_mfu_shows_its_peak_and_is_marked_when_doubtful(tmp_path, case):
    peak = {**PEAK, "reliable": case != "unreliable", "note": "the machine was busy"}
    mfu = 1.2 if case == "above-100" else 0.4
    records = [_start(peak=peak), *(_step(i, mfu=mfu) for i in range(1, 11))]
    text = write_report(_write(tmp_path / case, records)).read_text()
    assert "| MFU peak (per device) | 100.0 GFLOP/s, fp32 matmul" in text
    if case == "plain":
        assert f"| mean MFU | {100 * mfu:.1f}% |" in text and "marked '?'" not in text
        return
    assert f"| mean MFU | {100 * mfu:.1f}%? |" in text
    assert "MFU is marked '?', not a plain fact" in text
    if case == "unreliable":
        assert "process 1's peak is unreliable: the machine was busy" in text
        assert "fp32 matmul (unreliable) |" in text
    else:
        assert "an MFU above 100% means the peak is lower" in text
