"""MoE expert-load figures, the live-line text, the report's Experts section and the guard's
MoE alarms (router_blowup, dead_expert)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from camelid.train import report
from camelid.train.guard import Alarm, Guard
from camelid.train.metrics import expert_balance, format_balance
from camelid.train.recipe import GuardSection, RecipeError, load_recipe
from camelid.train.report import _ranges, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOADS = [[510, 20, 0, 494], [260, 250, 241, 273]]


# ------------------------------------------------------------------ expert_balance
def test_expert_balance_on_hand_made_loads():
    b = expert_balance(LOADS)
    # Layer 0: mean 256, busiest 510; layer 1: mean 256, busiest 273.
    assert b["max_mean"] == pytest.approx([510 / 256, 273 / 256])
    assert b["cv"] == pytest.approx([statistics.pstdev(row) / 256 for row in LOADS])
    assert b["cv"][0] == pytest.approx(math.sqrt(242392 / 4) / 256)  # by hand: 0.9616
    assert b["dead"] == [1, 0]
    assert (b["worst_layer"], b["max_mean_worst"], b["dead_total"]) == (0, b["max_mean"][0], 1)
    assert expert_balance(torch.tensor(LOADS, dtype=torch.int64)) == b
    json.dumps(b, allow_nan=False)  # JSON-ready: plain floats and ints
    assert all(type(x) is float for x in b["max_mean"] + b["cv"])
    assert all(type(x) is int for x in [*b["dead"], b["dead_total"], b["worst_layer"]])


def test_expert_balance_all_zero_and_one_expert_layers():
    b = expert_balance([[0, 0, 0, 0], [5, 5, 5, 5]])
    assert b["max_mean"] == [None, 1.0] and b["cv"] == [None, 0.0]
    assert b["dead"] == [4, 0] and b["dead_total"] == 4
    assert b["worst_layer"] == 1 and b["max_mean_worst"] == 1.0
    nothing = expert_balance([[0, 0]])
    assert nothing["max_mean"] == [None] and nothing["worst_layer"] is None
    assert nothing["max_mean_worst"] is None and nothing["dead_total"] == 2
    one = expert_balance([[7], [0]])
    assert one["max_mean"] == [1.0, None] and one["cv"] == [0.0, None] and one["dead"] == [0, 1]
    assert expert_balance([])["max_mean"] == []
    with pytest.raises(ValueError, match="layers, experts"):
        expert_balance(torch.zeros(2, 3, 4))


def test_format_balance_is_the_worst_layer_and_every_dead_expert():
    assert format_balance(expert_balance(LOADS)) == "experts max/mean 1.99 cv 0.96 dead 1"
    # The worst layer is the second; its own experts all got tokens, the first layer has 1 dead.
    two = expert_balance([[4, 4, 0, 4], [16, 0, 0, 0]])
    assert format_balance(two) == "experts max/mean 4.00 cv 1.73 dead 4"
    assert format_balance(expert_balance([[0, 0]])) == "experts dead 2"
    assert format_balance(None) == "" and format_balance({}) == ""


# ------------------------------------------------------------------------- guard
def guard(**kw) -> Guard:
    base = {"window": 10, "min_history": 5, "router_logit_limit": 50.0, "dead_expert_steps": 3}
    return Guard(GuardSection(**{**base, **kw}))


ALIVE = [[3, 3, 3, 3], [3, 3, 3, 3]]


def test_router_blowup_is_a_bad_step_that_counts_toward_the_roll_back():
    g = guard(max_bad_steps=2)
    assert g.verdict(3.0, 1.0) is None
    assert g.experts(1, [1, 3], ALIVE, [12.0, 50.0]) == []  # at the limit is not over it
    assert g.verdict(3.1, 1.0) is None
    (alarm,) = g.experts(2, [1, 3], ALIVE, [12.0, 61.5])
    assert isinstance(alarm, Alarm) and (alarm.kind, alarm.bad) == ("router_blowup", True)
    assert "layer 3 61.5" in alarm.detail and "guard.router_logit_limit 50" in alarm.detail
    assert "layer 1" not in alarm.detail
    # The verdict passed the step, the alarm takes it back: the streak counts it, and its loss
    # is not in the spike detector's history.
    assert g.bad_streak == 1 and list(g.recent) == [3.0] and not g.must_roll_back
    assert g.verdict(3.2, 1.0) is None
    (again,) = g.experts(3, [1, 3], ALIVE, [math.nan, 1.0])  # a NaN logit is a blow-up too
    assert again.kind == "router_blowup" and "layer 1 nan" in again.detail
    # Two bad steps in a row, as if both had been spikes: the verdict's reset is taken back.
    assert g.bad_streak == 2 and g.must_roll_back and list(g.recent) == [3.0]
    assert g.verdict(3.3, 1.0) is None and g.experts(4, [1, 3], ALIVE, [9.0, 9.0]) == []
    assert g.bad_streak == 0 and list(g.recent) == [3.0, 3.3]  # a good step ends the streak
    assert g.verdict(3.4, 1.0) is None and g.experts(5, [1, 3], ALIVE, [80.0, 80.0])
    assert g.bad_streak == 1 and not g.must_roll_back


def test_router_blowup_leaves_a_full_spike_window_as_a_bad_step_would():
    g = guard(window=3, min_history=3)
    for loss in (3.0, 3.1, 3.2):
        assert g.verdict(loss, 1.0) is None
    assert g.verdict(3.3, 1.0) is None and list(g.recent) == [3.1, 3.2, 3.3]
    assert g.experts(4, [0], [[1, 1]], [51.0])
    assert list(g.recent) == [3.0, 3.1, 3.2] and g.bad_streak == 1


def test_router_blowup_on_a_step_already_bad_is_counted_once():
    g = guard()
    assert g.verdict(math.nan, 1.0) == "nonfinite" and g.bad_streak == 1
    assert [a.kind for a in g.experts(1, [0], [[1, 1]], [99.0])] == ["router_blowup"]
    assert g.bad_streak == 1
    assert g.experts(1, [0], [[1, 1]], [99.0]) and g.bad_streak == 1  # asked twice: still once


def test_router_limit_zero_and_a_disabled_guard_raise_nothing():
    assert guard(router_logit_limit=0.0).experts(1, [0], [[1, 1]], [1e6]) == []
    g = guard(enabled=False)
    for step in range(1, 10):
        assert g.experts(step, [0], [[0, 5]], [1e6]) == []
    assert g.dead_runs == {} and g.bad_streak == 0


def test_dead_expert_fires_once_and_re_arms_when_it_gets_tokens():
    g = guard(dead_expert_steps=3)
    dead2 = [[4, 4, 0, 4], [3, 3, 3, 3]]
    assert g.experts(1, [1, 3], dead2, [1.0, 1.0]) == []
    assert g.experts(2, [1, 3], dead2, [1.0, 1.0]) == []
    (alarm,) = g.experts(3, [1, 3], dead2, [1.0, 1.0])
    assert (alarm.kind, alarm.bad) == ("dead_expert", False)
    assert alarm.detail == "layer 1: expert 2 got no token in the last 3 steps (to step 3)"
    assert g.bad_streak == 0  # a warning, not a bad step
    assert g.experts(4, [1, 3], dead2, [1.0, 1.0]) == []  # once, however long it stays dead
    assert g.experts(5, [1, 3], dead2, [1.0, 1.0]) == []
    assert g.experts(6, [1, 3], ALIVE, [1.0, 1.0]) == []  # it got tokens: re-armed
    assert g.experts(7, [1, 3], dead2, [1.0, 1.0]) == []
    assert g.experts(8, [1, 3], dead2, [1.0, 1.0]) == []
    assert [a.detail for a in g.experts(9, [1, 3], dead2, [1.0, 1.0])] == [
        "layer 1: expert 2 got no token in the last 3 steps (to step 9)"
    ]
    # Two experts of one layer dying together are one alarm naming both; layers apart.
    h = guard(dead_expert_steps=1)
    alarms = h.experts(1, [1, 3], torch.tensor([[0, 8, 0, 4], [0, 3, 3, 3]]), [1.0, 1.0])
    assert [a.detail for a in alarms] == [
        "layer 1: experts 0, 2 got no token in the last 1 steps (to step 1)",
        "layer 3: expert 0 got no token in the last 1 steps (to step 1)",
    ]
    assert guard(dead_expert_steps=0).experts(1, [0], [[0, 0]], [1.0]) == []


def test_guard_state_round_trip_raises_the_same_alarms_after_a_resume():
    dead = [[0, 5, 5, 5]]
    g = guard(dead_expert_steps=3)
    g.experts(1, [2], dead, [1.0])
    g.experts(2, [2], dead, [1.0])
    state = json.loads(json.dumps(g.state_dict()))  # as trainer.json stores it
    resumed = guard(dead_expert_steps=3)
    resumed.load_state_dict(state)
    assert resumed.dead_runs == {2: [2, 0, 0, 0]}
    assert [a.kind for a in resumed.experts(3, [2], dead, [1.0])] == ["dead_expert"]
    assert [a.kind for a in g.experts(3, [2], dead, [1.0])] == ["dead_expert"]
    # The fired alarm is part of the state too: no second alarm after another resume.
    again = guard(dead_expert_steps=3)
    again.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    assert again.dead_fired == {(2, 0)} and again.experts(4, [2], dead, [1.0]) == []


def test_a_guard_state_from_before_the_moe_alarms_still_loads():
    g = guard(dead_expert_steps=2)
    g.load_state_dict({"recent": [3.0, 3.1], "bad_streak": 1, "drills": {"7": "nan"}})
    assert list(g.recent) == [3.0, 3.1] and g.bad_streak == 1 and g.drills == {7: "nan"}
    assert g.dead_runs == {} and g.dead_fired == set()
    assert g.experts(1, [0], [[0, 1]], [1.0]) == []
    assert [a.kind for a in g.experts(2, [0], [[0, 1]], [1.0])] == ["dead_expert"]


def test_guard_keys_are_declared_with_ranges():
    r = load_recipe(None, ["data.dir=x"])
    assert (r.guard.router_logit_limit, r.guard.dead_expert_steps) == (50.0, 20)
    r = load_recipe(None, ["data.dir=x", "guard.router_logit_limit=0", "guard.dead_expert_steps=0"])
    assert (r.guard.router_logit_limit, r.guard.dead_expert_steps) == (0.0, 0)
    with pytest.raises(RecipeError, match=r"guard\.router_logit_limit must be >= 0"):
        load_recipe(None, ["data.dir=x", "guard.router_logit_limit=-1"])
    with pytest.raises(RecipeError, match=r"guard\.dead_expert_steps must be int"):
        load_recipe(None, ["data.dir=x", "guard.dead_expert_steps=2.5"])


# ------------------------------------------------------------------------ report
def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header, after checking that matplotlib can decode it."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert imread(path).shape[:2] == (height, width)
    return width, height


def _experts(step: int, tokens: list[list[int]], logits: list[float] | None = None) -> dict:
    return {
        "kind": "experts",
        "step": step,
        "layers": [1, 3],
        "tokens": tokens,
        "router_logit_max": logits or [2.0, 3.0],
        "aux_loss": 0.0125,
        "z_loss": None,
        "bias_absmax": [0.004, 0.002],
        **expert_balance(tokens),
        "time": float(step),
    }


def _write(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def _steps(first: int, last: int) -> list[dict]:
    return [{"kind": "step", "step": s, "loss": 3.0 - s / 100, "lr": 1e-3, "time": float(s)}
            for s in range(first, last + 1)]  # fmt: skip


def _row(text: str, layer: int) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| {layer} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_experts_section_and_heatmap(tmp_path):
    balanced = [[64, 64, 64, 64], [64, 64, 64, 64]]
    records = [{"kind": "start", "time": 0.0}]
    for s in range(1, 7):
        records += _steps(s, s)
        # Layer 1's expert 2 dies at steps 2-3 and, in the branch later rolled back, at 5.
        records.append(_experts(s, [[100, 56, 0, 100], [64] * 4] if s in (2, 3, 5) else balanced))
    records.append({"kind": "event", "step": 6, "event": "router_blowup",
                    "detail": "max |router logit| layer 3 61.5 > guard.router_logit_limit 50; "
                    "update skipped"})  # fmt: skip
    records.append({"kind": "event", "step": 6, "event": "rollback", "detail": "to step 3"})
    for s in range(4, 9):  # the redone steps: their records replace the first branch's
        records += _steps(s, s)
        tokens = [[120, 40, 60, 36], [0, 0, 128, 128]] if s == 8 else balanced
        records.append(_experts(s, tokens, [4.5, 7.25] if s == 8 else None))
    records.append({"kind": "experts", "step": 9, "layers": [1, 3], "tokens": [[1, 2], "x"]})
    detail = "layer 3: experts 0, 1 got no token in the last 1 steps"
    records.append({"kind": "event", "step": 8, "event": "dead_expert", "detail": detail})
    run = _write(tmp_path / "moe", records)
    text = write_report(run).read_text()

    section = text[text.index("## Experts") : text.index("## Events")]
    assert "2 MoE layer(s) of 4 routed experts; expert loads of 8 step(s), steps 1–8" in section
    assert "(step 8)" in section
    # Step 8: layer 1 mean 64, busiest 120; layer 3 mean 64, busiest 128, two experts dead.
    cv1 = statistics.pstdev([120, 40, 60, 36]) / 64
    assert _row(section, 1) == ["1", "1.88", f"{cv1:.2f}", "0 of 4", "36", "120", "4.50", "2–3"]
    assert _row(section, 3) == ["3", "2.00", "1.00", "2 of 4", "0", "128", "7.25", "8"]
    assert "At step 8: aux loss 0.0125, max abs selection bias 0.004." in section
    assert "Alarms: 1 router_blowup, 1 dead_expert (listed under Events)." in section
    events = text[text.index("## Events") :]
    assert "| router_blowup | 1 |" in events and "| dead_expert | 1 |" in events
    assert "layer 3 61.5 > guard.router_logit_limit 50" in events
    for name in ("experts.png", "experts_balance.png"):
        assert f"]({name})" in section
        width, height = _png_size(run / name)
        assert width > 500 and height > 300


def test_report_heatmap_bins_long_runs_and_splits_many_experts_into_panels(tmp_path, monkeypatch):
    # The limits scaled down (240 columns, 1600 rows a panel), so the data stays small:
    # 6 layers x 4 experts = 24 rows make 3 panels of 8; 25 steps make columns of 3.
    monkeypatch.setattr(report, "HEATMAP_PANEL_ROWS", 10)
    monkeypatch.setattr(report, "HEATMAP_COLUMNS", 10)
    n_layers, n_experts, steps = 6, 4, 25
    gen = torch.Generator().manual_seed(0)
    records = _steps(1, steps)
    for s in range(1, steps + 1):
        loads = torch.randint(1, 60, (n_layers, n_experts), generator=gen)
        loads[4, 3] = 0
        records.append({"kind": "experts", "step": s, "layers": list(range(n_layers)),
                        "tokens": loads.tolist(), "time": float(s)})  # fmt: skip
    run = _write(tmp_path / "big", records)
    text = write_report(run).read_text()
    assert f"{n_layers} MoE layer(s) of {n_experts} routed experts" in text
    assert _row(text, 4)[-1] == "1–25"  # layer 4's dead expert, every step
    assert all(_row(text, j)[-1] == "none" for j in range(n_layers) if j != 4)
    assert "No MoE alarm" in text
    width, _ = _png_size(run / "experts.png")
    monkeypatch.setattr(report, "HEATMAP_PANEL_ROWS", 1600)
    write_report(run)
    single, _ = _png_size(run / "experts.png")
    assert width > single  # three panels side by side are wider than one


def test_heatmap_cells_are_load_over_mean_per_column_of_binned_steps():
    tokens = np.array(
        [
            [[8, 0, 0, 0], [2, 2, 2, 2]],
            [[0, 8, 0, 0], [2, 2, 2, 2]],
            [[0, 0, 0, 8], [0, 0, 0, 0]],
        ],
        dtype=np.float64,
    )
    cells, per_bin = report._load_ratios(tokens, columns=3)
    assert per_bin == 1 and cells.shape == (8, 3)
    assert cells[:4, 0].tolist() == [4.0, 0.0, 0.0, 0.0]  # layer 1's experts, step 1
    assert cells[4:, 0].tolist() == [1.0] * 4
    assert np.isnan(cells[4:, 2]).all()  # a layer that routed nothing: no ratio
    cells, per_bin = report._load_ratios(tokens, columns=2)  # steps 1-2, then 3 alone
    assert per_bin == 2 and cells.shape == (8, 2)
    assert cells[:4, 0].tolist() == [2.0, 2.0, 0.0, 0.0]  # expert 2 is dead over both steps
    assert cells[:4, 1].tolist() == [0.0, 0.0, 0.0, 4.0] and cells[4:, 0].tolist() == [1.0] * 4


def test_a_dense_run_has_no_experts_section(tmp_path):
    run = _write(tmp_path / "dense", _steps(1, 5))
    text = write_report(run).read_text()
    assert "## Experts" not in text and "experts.png" not in text
    assert not (run / "experts.png").exists() and not (run / "experts_balance.png").exists()


def test_step_ranges():
    assert _ranges([3, 4, 5, 7, 10, 11]) == "3–5, 7, 10–11"
    assert _ranges([]) == ""
    assert _ranges([1, 3, 5, 7], limit=2) == "1, 3, … (4 steps in all)"
