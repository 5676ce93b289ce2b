"""The parallelize step and the exact loss: sharded init, FSDP2 shards, gradient accumulation
under masks, activation checkpointing and compile — each against a plain 1-process step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import config, full_grads, masked_batch

from camelid import Transformer
from camelid.loss import IGNORE_INDEX, cross_entropy
from camelid.train.distributed import World
from camelid.train.parallelize import build_model, local_param_bytes
from camelid.train.step import forward_backward

WORKER = Path(__file__).with_name("dist_worker.py")


def one_step(accum: int = 1, tie: bool = False, **build) -> tuple[torch.Tensor, dict]:
    """Loss and gradients of one step over the whole masked batch, in one process."""
    model = build_model(config(tie), World(), seed=0, **build)
    x, y = masked_batch()
    loss = forward_backward(model, list(zip(x.chunk(accum), y.chunk(accum), strict=True)))
    return loss, full_grads(model)


def assert_same_grads(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=name)


def test_loss_is_the_exact_token_mean_under_masks():
    """The step's loss is the mean over its valid targets, not a mean of per-batch means."""
    model = build_model(config(False), World(), seed=0)
    x, y = masked_batch()
    with torch.no_grad():
        expected = cross_entropy(model(x), y)  # F.cross_entropy's own masked mean
        per_batch = torch.stack([cross_entropy(model(a), b) for a, b in zip(x.chunk(4),
                                 y.chunk(4), strict=True)]).mean()  # fmt: skip
    loss = forward_backward(model, list(zip(x.chunk(4), y.chunk(4), strict=True)))
    assert abs(loss.item() - expected.item()) < 1e-6
    assert abs(per_batch.item() - expected.item()) > 1e-3  # the masks make the two differ


@pytest.mark.parametrize("accum", [2, 4, 8])
def test_gradient_accumulation_equals_one_big_batch(accum):
    loss1, grads1 = one_step(1)
    loss, grads = one_step(accum)
    assert abs(loss.item() - loss1.item()) < 1e-6
    assert_same_grads(grads, grads1, 1e-6)


def test_activation_checkpointing_gives_the_same_gradients():
    loss1, grads1 = one_step(2)
    loss, grads = one_step(2, activation_checkpointing=True)
    assert loss.item() == loss1.item()
    assert_same_grads(grads, grads1, 1e-6)


def test_compiled_training_on_cpu_matches_eager():
    loss1, grads1 = one_step(2)
    loss, grads = one_step(2, compile=True)
    assert abs(loss.item() - loss1.item()) < 1e-5
    assert_same_grads(grads, grads1, 1e-4)  # compiled kernels fuse and reorder float math


def test_init_is_the_seeded_plan_and_tied_once():
    a = build_model(config(True), World(), seed=3)
    b = build_model(config(True), World(), seed=3, activation_checkpointing=True)
    assert a.output.weight is a.tok_embeddings.weight
    sa = a.state_dict()
    for name, t in b.state_dict().items():
        assert torch.equal(t, sa[name.replace("_checkpoint_wrapped_module.", "")]), name
    c = build_model(config(True), World(), seed=4)
    assert not torch.equal(c.tok_embeddings.weight, a.tok_embeddings.weight)
    # The plan's statistics: N(0, 0.02), residual projections scaled down, norms 1.
    assert abs(a.layers[0].attention.wqkv.weight.std().item() - 0.02) < 2e-3
    assert a.layers[0].attention.wo.weight.std().item() < 0.012
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight))
    assert local_param_bytes(a) == 4 * Transformer(config(True)).num_params()


@pytest.mark.parametrize("tie,ac,accum", [(False, False, 1), (True, True, 2)])
def test_two_processes_hold_half_and_give_the_same_gradients(tmp_path, tie, ac, accum):
    """FSDP2 over 2 gloo processes, each with its half of the rows in ``accum`` micro-batches
    with different numbers of masked targets: loss and gradients equal one process's one big
    batch, and each rank holds about half of the parameter bytes."""
    out = tmp_path / "out.pt"
    flags = [*(["--tie"] if tie else []), *(["--ac"] if ac else []), "--accum", str(accum)]
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(out), *flags],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    loss1, grads1 = one_step(1, tie=tie)
    assert abs(got["loss"].item() - loss1.item()) < 1e-6
    assert_same_grads(got["grads"], grads1, 1e-6)
    assert got["tied"] == tie
    whole = 4 * Transformer(config(tie)).num_params()
    for held in got["param_bytes"]:
        assert abs(held - whole / 2) <= 0.05 * whole, (got["param_bytes"], whole)


def test_ignore_index_is_the_one_mask():
    """Every loss in the project masks the same value (the data and fine-tuning code rely on
    it): a fully masked row contributes nothing."""
    model = build_model(config(False), World(), seed=0)
    x, y = masked_batch()
    y2 = y.clone()
    y2[0] = IGNORE_INDEX
    a = forward_backward(model, [(x[1:], y[1:])])
    grads = full_grads(model)
    model.zero_grad()
    b = forward_backward(model, [(x, y2)])
    assert abs(a.item() - b.item()) < 1e-6
    assert_same_grads(full_grads(model), grads, 1e-6)
