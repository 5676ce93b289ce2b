"""The run report: written for finished, partial and unhealthy runs alike."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from camelid.errors import CamelidError
from camelid.train.report import write_report

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
