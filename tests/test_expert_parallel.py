"""MoE training over 2 gloo processes on CPU — FSDP2 alone, and expert parallelism (each rank
holds half of every layer's experts, rows dispatched with all-to-all) — against 1 process: one
step's loss, full gradients and global gradient norm; then ``camelid train`` under torchrun
with ``train.expert_parallel``: losses, an exact resume from a DCP checkpoint, the HF export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_train
import torch
from dist_worker import full_grads, masked_batch, moe_config
from test_train import recipe_file, step_losses

from camelid.errors import CamelidError
from camelid.model.moe import MoE
from camelid.train.distributed import World
from camelid.train.parallelize import build_model
from camelid.train.recipe import RecipeError, load_recipe
from camelid.train.step import clip_grad_norm, forward_backward
from camelid.train.trainer import train

dataset = test_train.dataset  # the fixture: a tiny corpus, its tokenizer and prepared shards
WORKER = Path(__file__).with_name("dist_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *args],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def one_process(case: dict) -> dict:
    """What the worker's ``moe_step`` measures, for the whole batch in one process."""
    model = build_model(moe_config(case["scoring"], case["top_k"], case["interleave"]), World(),
                        seed=0, activation_checkpointing=case["ac"])  # fmt: skip
    x, y = masked_batch()
    n = case["accum"]
    loss = forward_backward(model, list(zip(x.chunk(n), y.chunk(n), strict=True)))
    return {"loss": loss, "grads": full_grads(model), "norm": clip_grad_norm(model, 0.0)}


def check_against_one_process(results: list[dict]) -> None:
    for got in results:
        want, name = one_process(got["case"]), str(got["case"])
        assert abs(got["loss"].item() - want["loss"].item()) < 1e-5, name
        assert abs(got["norm"].item() - want["norm"].item()) < 1e-5, name
        assert got["grads"].keys() == want["grads"].keys(), name
        for key, g in want["grads"].items():
            torch.testing.assert_close(got["grads"][key], g, rtol=1e-5, atol=1e-5,
                                       msg=f"{name}: {key}")  # fmt: skip


FSDP_CASES = ["sigmoid", "softmax,top_k=2,interleave=2,ac,accum=2"]
EP_CASES = [
    "sigmoid,ep",
    "sigmoid,top_k=2,interleave=2,ac,accum=2,ep",
    "softmax,accum=2,ep",
    "softmax,top_k=2,ac,ep",
]


def test_two_process_fsdp_moe_step_matches_one_process(tmp_path):
    """FSDP2 shards the experts like any weight (all-gathered for the forward): no exchange."""
    out = tmp_path / "out.pt"
    torchrun(str(WORKER), str(out), *(f"--moe={c}" for c in FSDP_CASES))
    results = torch.load(out, weights_only=True)
    assert [r["exchanges"] for r in results] == [0, 0]
    check_against_one_process(results)


def test_two_process_expert_parallel_step_matches_one_process(tmp_path):
    """Sigmoid (gate on the input) and softmax (gate on the output) scoring, top-1 and top-2,
    every layer or every second one MoE, with checkpointing and accumulation: the same loss,
    gradients (the experts' too: each weight's gradient is that of one process, not twice it)
    and global norm as one process."""
    out = tmp_path / "out.pt"
    torchrun(str(WORKER), str(out), *(f"--moe={c}" for c in EP_CASES))
    results = torch.load(out, weights_only=True)
    for r in results:
        c = r["case"]
        layers = 2 // c["interleave"]  # MoE layers of the 2-layer model
        assert r["local_experts"] == [2] * layers  # 4 experts, 2 on each rank
        # Two row exchanges (out and back) per MoE layer per micro-batch forward, and as many
        # again when activation checkpointing recomputes the forward in backward.
        assert r["exchanges"] == 2 * layers * c["accum"] * (2 if c["ac"] else 1), c
    check_against_one_process(results)


def test_expert_parallel_in_one_process_changes_nothing():
    config = moe_config("sigmoid")
    a = build_model(config, World(), seed=0)
    b = build_model(config, World(), seed=0, expert_parallel=True)
    assert all(m.expert_parallel is None for m in b.modules() if isinstance(m, MoE))
    sa = a.state_dict()
    for name, t in b.state_dict().items():
        assert torch.equal(t, sa[name]), name
    with pytest.raises(CamelidError, match="is dense"):
        build_model(moe_config().__class__.from_preset("tiny"), World(), seed=0,
                    expert_parallel=True)  # fmt: skip


def test_materialize_zeroes_the_selection_bias():
    """to_empty leaves buffers uninitialised; the selection bias must start neutral."""
    model = build_model(moe_config("sigmoid"), World(), seed=0)
    biases = [m.selection_bias for m in model.modules() if isinstance(m, MoE)]
    assert biases and all(torch.equal(b, torch.zeros_like(b)) for b in biases)


def test_recipe_key_and_its_errors(tmp_path, dataset):
    moe = {"preset": "tiny", "n_experts": 4, "moe_ffn_dim": 32, "n_shared_experts": 1}
    path = recipe_file(tmp_path, dataset, model=moe, train={"expert_parallel": True})
    recipe = load_recipe(path)
    assert recipe.train.expert_parallel and recipe.model_config(600).is_moe
    assert load_recipe(recipe_file(tmp_path, dataset, model=moe)).train.expert_parallel is False
    with pytest.raises(RecipeError, match="train.expert_parallel = true .* is dense"):
        load_recipe(recipe_file(tmp_path, dataset, train={"expert_parallel": True}))


def test_camelid_train_expert_parallel_matches_one_process_and_resumes(tmp_path, dataset):
    """`camelid train` under torchrun with expert parallelism: the losses of 1 process within
    1e-4; resumed from its step-3 DCP checkpoint (2 processes, expert-parallel again) it
    continues to the uninterrupted run's losses; its HF export holds every expert."""
    moe = {"preset": "tiny", "n_experts": 4, "n_experts_per_tok": 2, "moe_ffn_dim": 32,
           "n_shared_experts": 1, "moe_interleave_step": 2}  # fmt: skip
    common = {"model": moe, "checkpoint": {"interval": 3},
              "eval": {"interval": 3, "batches": 1, "sample_tokens": 4}}  # fmt: skip
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    for d in (one, two, resumed):
        d.mkdir()
    train(load_recipe(recipe_file(one, dataset, train={"steps": 6, "batch_size": 4}, **common)),
          progress=False)  # fmt: skip
    ep = {"steps": 6, "batch_size": 2, "expert_parallel": True}
    torchrun("-m", "camelid.cli", "train", str(recipe_file(two, dataset, train=ep, **common)))
    a, b = step_losses(one / "run"), step_losses(two / "run")
    assert a.keys() == b.keys() and len(a) == 6
    assert max(abs(a[k] - b[k]) for k in a) < 1e-4, (a, b)
    records = [json.loads(x) for x in (two / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "summary" and records[-1]["world_size"] == 2

    # Resume the step-3 checkpoint in a fresh run directory, on the same layout.
    start = resumed / "step-00000003"
    shutil.copytree(two / "run" / "checkpoints" / "step-00000003", start)
    recipe = recipe_file(resumed, dataset, train=ep, **common)
    torchrun("-m", "camelid.cli", "train", str(recipe), "--resume", str(start))
    c = step_losses(resumed / "run")
    assert sorted(c) == [4, 5, 6]
    assert max(abs(c[k] - b[k]) for k in c) < 1e-6, (b, c)

    # The export gathered every expert: the same tensors as the run's last checkpoint read in
    # one process (DCP re-shards), and the same model as the 1-process run's, nearly.
    from camelid.weights import load as load_weights

    exported = load_weights(two / "run" / "hf")
    reference = load_weights(one / "run" / "hf")
    sd, ref = exported.state_dict(), reference.state_dict()
    assert sd.keys() == ref.keys()
    for key, t in sd.items():
        assert t.shape == ref[key].shape and torch.isfinite(t).all(), key
        torch.testing.assert_close(t, ref[key], rtol=0, atol=1e-3, msg=key)
