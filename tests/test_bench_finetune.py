"""benchmarks/finetune.py at tiny shapes: its chat batch is masked as SFT masks, the two sides'
losses agree, and both parts (LoRA and full SFT) run side by side in their own processes."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_finetune", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_benchmark_batch_is_chat_masked():
    from camelid.loss import IGNORE_INDEX

    x, y = _bench().make_batch(3, 96)
    assert x.shape == y.shape == (3, 96)
    learned = y != IGNORE_INDEX
    assert 0.1 < float(learned.float().mean()) < 0.9
    # Targets are the next inputs wherever they are learned (shifted within the row).
    assert bool((y[:, :-1][learned[:, :-1]] == x[:, 1:][learned[:, :-1]]).all())
    # The first target of every row is a header token (after BOS): never learned.
    assert not bool(learned[:, 0].any())


def test_finetune_benchmark_quick_runs_both_parts(capsys):
    results = _bench().main(["--quick"])
    out = capsys.readouterr().out
    for mode in ("lora", "full"):
        part = results[mode]
        assert part["loss_diff"] <= 1e-4
        for side in ("camelid", "transformers"):
            assert part[side]["tps"] > 0
            assert part[side]["peak_mib"] > 0  # gradients and activations were measured
        assert part["speed"] > 0 and part["memory"] > 0
    assert "Part 1, LoRA SFT step" in out and "Part 2, full SFT step" in out
    assert "loss on the batch before training" in out
    assert "peak memory ratio camelid / transformers" in out
