"""benchmarks/moe.py at tiny shapes: the weight copy makes both layers agree, and both parts run."""

import argparse
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "moe.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_moe", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_benchmark_layers_agree_and_both_parts_run(top_k, capsys):
    bench = _bench()
    args = argparse.Namespace(
        experts=4, top_k=top_k, dim=64, ffn=32, tokens=48, reps=1, warmup=0,
        model_dim=128, model_ffn=32, model_layers=1, model_vocab=128, model_batch=1,
        model_seq=8, model_reps=1,
    )  # fmt: skip
    layer = bench.bench_layer(args, peak=1e9)
    assert layer["max_diff"] <= 1e-4
    assert layer["tps_camelid"] > 0 and layer["tps_transformers"] > 0
    model = bench.bench_model(args, peak=1e9)
    assert model["ratio"] > 0
    out = capsys.readouterr().out
    assert "the same weights" in out and "layer ratio camelid / transformers" in out
    assert "loss on the batch" in out
