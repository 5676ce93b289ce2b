"""Reports and logs that are true: whole-run accounting across resumes, a finished run left
alone, MFU and its peak, what the console shows, and a metrics.jsonl cut by a kill."""

# ruff: noqa: F811 (the fixtures of test_train.py are imported, and then requested by name)

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import camelid_main
from test_train import dataset, recipe_file  # noqa: F401 (fixtures)

from camelid.data import read_manifest
from camelid.tokenizer import Tokenizer
from camelid.train import metrics
from camelid.train.metrics import Peak, cpu_peak_from, format_mfu, mfu_doubtful
from camelid.train.recipe import load_recipe
from camelid.train.report import format_duration
from camelid.train.trainer import VAL_MIN_TOKENS, train

# A configured peak: no start-up measurement (seconds each), and MFU figures that are plain.
PEAK = {"peak_tflops": 1.0}


def records(run_dir: Path) -> tuple[list[dict], int]:
    """The readable records of metrics.jsonl and the number of lines that are not."""
    good, bad = [], 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            good.append(json.loads(line))
        except ValueError:
            bad += 1
    return good, bad


def stop_at(monkeypatch, step: int, how: str = "signal") -> None:
    """Make the trainer meet a SIGTERM (or a crash, which writes no summary, as a kill -9)
    during step ``step``: the per-step memory probe is the hook."""
    import camelid.train.trainer as trainer

    calls = {"n": 0}
    real = trainer.peak_memory

    def probe(device):
        calls["n"] += 1
        if calls["n"] == step:
            if how == "signal":
                signal.raise_signal(signal.SIGTERM)
            else:
                raise RuntimeError("killed")
        return real(device)

    monkeypatch.setattr(trainer, "peak_memory", probe)


def report_row(run_dir: Path, name: str) -> str:
    for line in (run_dir / "report.md").read_text().splitlines():
        if line.startswith(f"| {name} |"):
            return line.split("|")[2].strip()
    raise AssertionError(f"no row {name!r} in the report")


# ------------------------------------------------------------------------- across resumes
def test_report_covers_every_process_and_a_finished_run_is_left_alone(
    tmp_path, dataset, monkeypatch, capsys
):
    path = recipe_file(tmp_path, dataset, train={"steps": 12}, run=PEAK)
    run = tmp_path / "run"
    stop_at(monkeypatch, 5)
    first = train(load_recipe(path), progress=False)
    assert first.status == "stopped" and first.steps == 5 and first.invocations == 1
    assert first.wall_s == first.invocation_wall_s
    monkeypatch.undo()

    second = train(load_recipe(path), resume="latest", progress=False)
    assert second.status == "finished" and second.steps == 12 and second.invocations == 2
    assert second.invocation_steps == 7
    # The run's figures are the sum of both processes', not the last one's.
    wall = first.invocation_wall_s + second.invocation_wall_s
    train_s = first.invocation_time_s["train"] + second.invocation_time_s["train"]
    assert second.wall_s == pytest.approx(wall)
    assert second.wall_s > second.invocation_wall_s
    assert second.time_s["train"] == pytest.approx(train_s)
    assert second.goodput == pytest.approx(train_s / wall)
    assert report_row(run, "wall time") == format_duration(wall)
    assert report_row(run, "goodput") == f"{100 * train_s / wall:.1f}%"
    assert report_row(run, "processes") == "2 (1 resumed)"
    text = (run / "report.md").read_text()
    assert "## Processes" in text and "| 2 |" in text
    summaries = [r for r in records(run)[0] if r["kind"] == "summary"]
    assert summaries[-1]["wall_s"] == pytest.approx(wall)
    assert summaries[-1]["invocation_wall_s"] == pytest.approx(second.invocation_wall_s)

    # --resume on the finished run: nothing rewritten, one line saying so, exit 0.
    before = {name: (run / name).read_bytes() for name in ("report.md", "metrics.jsonl")}
    weights = (run / "hf" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    again = train(load_recipe(path), resume="latest", progress=False)
    assert again.already_finished and again.steps == 12
    assert again.wall_s == pytest.approx(wall)
    assert camelid_main(["train", str(path), "--resume"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "already finished at step 12" in out[0], out
    assert str(run / "report.md") in out[0] and str(run / "hf") in out[0]
    assert {name: (run / name).read_bytes() for name in before} == before
    assert (run / "hf" / "model.safetensors").stat().st_mtime_ns == weights

    # Unless the recipe now asks for more: then it trains on and the report covers all three.
    more = train(load_recipe(path, ["train.steps=14"]), resume="latest", progress=False)
    assert more.steps == 14 and more.invocations == 3 and not more.already_finished
    assert more.wall_s == pytest.approx(wall + more.invocation_wall_s)
    assert report_row(run, "processes") == "3 (2 resumed)"


def test_a_killed_process_counts_and_a_torn_last_line_is_tolerated(
    tmp_path, dataset, monkeypatch, capsys
):
    path = recipe_file(tmp_path, dataset, train={"steps": 14}, run=PEAK)
    run = tmp_path / "run"
    stop_at(monkeypatch, 11, how="crash")  # no summary; steps 9 and 10 after checkpoint 8
    with pytest.raises(RuntimeError, match="killed"):
        train(load_recipe(path), progress=False)
    monkeypatch.undo()
    recs, bad = records(run)
    assert bad == 0 and not any(r["kind"] == "summary" for r in recs)
    # A kill in the middle of writing the last record: cut it in half, no newline.
    text = (run / "metrics.jsonl").read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    (run / "metrics.jsonl").write_text(text[: len(text) - len(last) // 2 - 1])
    kept, _ = records(run)
    killed_wall = max(r["time"] for r in kept)
    lost = sum(r["step_time_s"] for r in kept if r["kind"] == "step" and r["step"] > 8)
    assert lost > 0  # step 9 (step 10's record is the torn one)

    capsys.readouterr()
    summary = train(load_recipe(path), resume="latest", progress=False)
    err = capsys.readouterr().err
    assert "metrics.jsonl ended in a cut line" in err
    recs, bad = records(run)
    assert bad == 1  # the torn line stays one unreadable line; the next record is whole
    lines = (run / "metrics.jsonl").read_text().splitlines()
    torn = next(i for i, line in enumerate(lines) if not line.endswith("}"))
    assert json.loads(lines[torn + 1])["kind"] == "start"
    first = [json.loads(line) for line in lines[:torn]]  # the killed process's records, kept
    assert [r.get("event") for r in first].count("checkpoint") == 3  # steps 0, 4 and 8
    assert any(e.get("event") == "torn_metrics" for e in recs)

    assert summary.status == "finished" and summary.steps == 14 and summary.invocations == 2
    assert summary.wall_s == pytest.approx(killed_wall + summary.invocation_wall_s)
    assert summary.time_s["lost"] == pytest.approx(lost)
    text = (run / "report.md").read_text()
    assert "1 unreadable line(s) in metrics.jsonl were skipped" in text
    assert report_row(run, "wall time") == format_duration(summary.wall_s)
    assert report_row(run, "processes") == "2 (1 resumed)"
    assert report_row(run, "lost") == format_duration(lost)
    assert "Process 1 wrote no summary" in text
    assert "| 1 |" in text and "no summary (killed, or running)" in text


# ---------------------------------------------------------------------------- the console
def test_header_eta_and_validation_on_the_console(tmp_path, dataset, capsys):
    path = recipe_file(tmp_path, dataset, train={"steps": 12}, eval={"interval": 6, "batches": 50},
                       log={"interval": 4}, run=PEAK)  # fmt: skip
    recipe = load_recipe(path)
    summary = train(recipe, progress=False)
    cap = capsys.readouterr()
    out, err = cap.out, cap.err
    vocab = Tokenizer.load(dataset / "tok").vocab_size
    config = recipe.model_config(vocab)
    assert config.name == f"tiny (modified: vocab_size={vocab})"
    head = out.splitlines()[0]
    assert head.startswith(f"camelid train: {config.name}, ")
    assert f"({config.num_params():,})" in head
    manifest = read_manifest(dataset / "data")
    train_tokens = manifest["splits"]["train"]["tokens"]
    assert "128 tokens per step = 4 sequences x 32 tokens x 1 micro-batch x 1 rank" in out
    assert f"12 steps = 1,536 tokens = {1536 / train_tokens:.2f} epochs of the " in out
    assert "1 TFLOP/s, from run.peak_tflops (configured)" in out
    assert f"run         {tmp_path / 'run'}" in out
    # Log lines with elapsed time and ETA; the last one has nothing left to wait for.
    steps = [line for line in out.splitlines() if line.startswith("step ") and "loss " in line
             and "validation" not in line]  # fmt: skip
    assert [line.split()[1] for line in steps] == ["4/12", "8/12", "12/12"]
    assert all(" elapsed " in line and " ETA " in line for line in steps)
    assert steps[-1].endswith("ETA 0.0 s") and "(configured peak)" in steps[0]
    # Validation results, as metrics.jsonl has them.
    evals = [r for r in records(tmp_path / "run")[0] if r["kind"] == "eval"]
    shown = [line for line in out.splitlines() if "validation loss" in line]
    assert [e["step"] for e in evals] == [6, 12] and len(shown) == 2
    for e, line in zip(evals, shown, strict=True):
        assert line.startswith(f"step {e['step']}/12  validation loss {e['val_loss']:.4f}, ")
        assert f"{e['val_bpb']:.4f} bits/byte over " in line
    # The warnings: a split this small, and eval.batches cut to what it holds.
    val_tokens = manifest["splits"]["validation"]["tokens"]
    assert val_tokens < VAL_MIN_TOKENS
    assert f"camelid: warning: the validation split holds only {val_tokens:,} tokens" in err
    batches = ((val_tokens - 1) // 32) // 4
    assert f"eval.batches is 50, but the validation split holds {batches} batches" in err
    kinds = [r["event"] for r in records(tmp_path / "run")[0] if r["kind"] == "event"]
    assert "small_validation" in kinds and "eval_batches_reduced" in kinds
    assert f"over {batches * 4 * 32:,} tokens" in shown[0]
    assert summary.final_val_loss == evals[-1]["val_loss"]


@pytest.mark.parametrize("seq_len", [128, 1400])
def test_a_validation_split_smaller_than_one_batch(tmp_path, dataset, capsys, seq_len):
    """128: 10 sequences, fewer than a batch of 16: evaluated in one batch of 10. 1400: not
    one sequence: no validation, said once at start-up."""
    batch = 16 if seq_len == 128 else 2
    path = recipe_file(tmp_path, dataset, train={"steps": 2, "seq_len": seq_len,
                       "batch_size": batch}, eval={"sample_tokens": 0},
                       checkpoint={"export_hf": False}, run=PEAK)  # fmt: skip
    summary = train(load_recipe(path), progress=False)
    cap = capsys.readouterr()
    recs = records(tmp_path / "run")[0]
    kinds = [r["event"] for r in recs if r["kind"] == "event"]
    val_tokens = read_manifest(dataset / "data")["splits"]["validation"]["tokens"]
    sequences = (val_tokens - 1) // seq_len
    if sequences:
        assert f"holds {sequences} sequences of {seq_len + 1} tokens" in cap.err
        assert f"fewer than one batch of {batch}: each evaluation uses them all" in cap.err
        assert "validation_under_one_batch" in kinds
        assert f"validation loss {summary.final_val_loss:.4f}" in cap.out
        assert f"over {sequences * seq_len:,} tokens" in cap.out
    else:
        assert "no validation loss will be computed" in cap.err
        assert kinds.count("no_validation") == 1
        assert summary.final_val_loss is None and not [r for r in recs if r["kind"] == "eval"]


# -------------------------------------------------------------------------------- MFU
def test_measured_peak_is_flagged_when_the_machine_was_busy():
    n = 256
    seconds = 2 * n**3 / 1e9  # 1 GFLOP/s
    calm = cpu_peak_from([(seconds, 2 * seconds), (2 * seconds, 4 * seconds)], threads=2, n=n)
    busy = cpu_peak_from([(seconds, 1.0 * seconds)], threads=2, n=n)
    assert calm.flops == pytest.approx(1e9) and calm.reliable and calm.source == "measured"
    assert "best of 2" in calm.detail and "measured at start-up" in calm.detail
    if metrics._usable_cores() >= 2:  # a 1-core machine cannot tell one thread's share apart
        assert not busy.reliable and "kept 1.0 of its 2 threads busy" in busy.note
    assert format_mfu(0.42, calm) == "MFU 42.0% (measured peak)"
    assert format_mfu(1.12, calm) == "MFU 112.0%? (measured peak)"
    assert format_mfu(0.42, Peak(1e9, "measured", "", reliable=False)).startswith("MFU 42.0%?")
    assert mfu_doubtful(1.01, True) and mfu_doubtful(0.5, False) and not mfu_doubtful(0.5, True)
    assert not mfu_doubtful(None, False)


@pytest.mark.parametrize("case", ["unreliable", "above-100"])
def test_doubtful_mfu_is_marked_on_the_console_and_in_the_report(
    tmp_path, dataset, monkeypatch, capsys, case
):
    if case == "unreliable":  # a measurement the load spoiled (a peak far too low, flagged)
        note = "the timed matmul kept 0.3 of its 2 threads busy"
        fake = Peak(1e6, "measured", "1 MFLOP/s, fp32 matmul", reliable=False, note=note)
        monkeypatch.setattr(metrics, "_cpu_peak", lambda: fake)
        run_section = {}
    else:  # a configured peak far below what the model reaches
        run_section = {"peak_tflops": 1e-9}
    path = recipe_file(tmp_path, dataset, train={"steps": 8}, log={"interval": 4},
                       eval={"sample_tokens": 0}, checkpoint={"export_hf": False},
                       run=run_section)  # fmt: skip
    train(load_recipe(path), progress=False)
    cap = capsys.readouterr()
    lines = [line for line in cap.out.splitlines() if line.startswith("step 4/8  loss")]
    source = "measured" if case == "unreliable" else "configured"
    assert len(lines) == 1 and f"%? ({source} peak)" in lines[0], cap.out
    start = next(r for r in records(tmp_path / "run")[0] if r["kind"] == "start")
    assert start["peak"]["source"] == source
    assert start["peak"]["reliable"] is (case != "unreliable")
    text = (tmp_path / "run" / "report.md").read_text()
    assert report_row(tmp_path / "run", "mean MFU").endswith("%?")
    assert "MFU is marked '?', not a plain fact" in text
    if case == "unreliable":
        assert "the MFU peak is unreliable" in cap.err
        assert "process 1's peak is unreliable: the timed matmul kept 0.3" in text
        assert "(unreliable)" in report_row(tmp_path / "run", "MFU peak (per device)")
    else:
        assert "an MFU above 100% means the peak is lower" in text


# ------------------------------------------------------------------------- model naming
def test_a_recipe_that_changes_the_shape_names_the_model_so(tmp_path, dataset):
    base = ["data.dir=x", "model.preset=llama-16m"]
    assert load_recipe(None, base).model_config(8192).name == "llama-16m"
    changed = load_recipe(None, [*base, "model.dim=96", "model.n_layers=2"]).model_config(8192)
    assert changed.name == "llama-16m (modified: dim=96, n_layers=2)"
    same = load_recipe(None, [*base, "model.n_layers=6"]).model_config(8192)  # the preset's own
    assert same.name == "llama-16m"
    assert (
        load_recipe(None, base).model_config(4096).name == "llama-16m (modified: vocab_size=4096)"
    )
    # The summary and the report carry it.
    path = recipe_file(tmp_path, dataset, model={"dim": 32, "n_heads": 2}, train={"steps": 2},
                       eval={"sample_tokens": 0}, checkpoint={"export_hf": False},
                       run=PEAK)  # fmt: skip
    summary = train(load_recipe(path), progress=False)
    assert summary.model.startswith("tiny (modified: dim=32, n_heads=2, vocab_size=")
    assert report_row(tmp_path / "run", "model").startswith("tiny (modified: dim=32, n_heads=2")
