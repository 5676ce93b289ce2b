"""MoE training over 2 gloo processes on CPU — FSDP2 alone, and expert parallelism (each rank
holds half of every layer's experts, rows dispatched with all-to-all) — against 1 process: one
step's loss, full gradients and global gradient norm; then ``camelid train`` under torchrun
with ``train.expert_parallel``: losses, an exact resume from a DCP checkpoint, the HF export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import test_train
import torch
from conftest import torchrun
from dist_worker import full_grads, masked_batch, moe_config, starve
from test_train import recipe_file, step_losses

from camelid import ModelConfig
from camelid.errors import CamelidError
from camelid.model.moe import MoE
from camelid.train.distributed import World
from camelid.train.parallelize import build_model, check_expert_parallel
from camelid.train.recipe import RecipeError, load_recipe
from camelid.train.step import clip_grad_norm, forward_backward
from camelid.train.trainer import train
from camelid.weights import load as load_weights
from camelid.weights.checkpoint import load as load_checkpoint

dataset = test_train.dataset  # the fixture: a tiny corpus, its tokenizer and prepared shards
WORKER = Path(__file__).with_name("dist_worker.py")


def grad_norms(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in records if r["kind"] == "step"}


def one_process(case: dict) -> dict:
    """What the worker's ``moe_step`` measures, for the whole batch in one process."""
    model = build_model(moe_config(case["scoring"], case["top_k"], case["interleave"]), World(),
                        seed=0, activation_checkpointing=case["ac"])  # fmt: skip
    starve(model, case)
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
    "sigmoid,starve,ep",  # rank 1's experts get no rows at all
]
BF16_CASES = ["sigmoid,top_k=2,bf16", "sigmoid,top_k=2,bf16,ep"]  # FSDP2 alone, then with EP
ALL_CASES = FSDP_CASES + EP_CASES + BF16_CASES


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory) -> list[dict]:
    """Every case's 2-process step, in one torchrun launch (its start-up costs more than them)."""
    out = tmp_path_factory.mktemp("moe-steps") / "out.pt"
    torchrun(str(WORKER), str(out), *(f"--moe={c}" for c in ALL_CASES))
    results = torch.load(out, weights_only=True)
    assert len(results) == len(ALL_CASES)
    return results


def test_two_process_fsdp_moe_step_matches_one_process(two_process_steps):
    """FSDP2 shards the experts like any weight (all-gathered for the forward): no exchange."""
    results = two_process_steps[: len(FSDP_CASES)]
    assert [r["exchanges"] for r in results] == [0] * len(FSDP_CASES)
    check_against_one_process(results)


def test_two_process_expert_parallel_step_matches_one_process(two_process_steps):
    """Sigmoid (gate on the input) and softmax (gate on the output) scoring, top-1 and top-2,
    every layer or every second one MoE, with checkpointing and accumulation: the same loss,
    gradients (the experts' too: each weight's gradient is that of one process, not twice it)
    and global norm as one process."""
    results = two_process_steps[len(FSDP_CASES) : len(FSDP_CASES + EP_CASES)]
    assert all(r["case"]["ep"] for r in results)
    for r in results:
        c = r["case"]
        layers = 2 // c["interleave"]  # MoE layers of the 2-layer model
        assert r["local_experts"] == [2] * layers  # 4 experts, 2 on each rank
        assert r["meshes"] == 1  # the experts' DTensors live on FSDP2's own mesh
        # Two row exchanges (out and back) per MoE layer per micro-batch forward, and as many
        # again when activation checkpointing recomputes the forward in backward.
        assert r["exchanges"] == 2 * layers * c["accum"] * (2 if c["ac"] else 1), c
        if c["starve"]:  # rank 1 ran its experts on no rows: zero gradients, not none
            w13 = [g for k, g in r["grads"].items() if k.endswith("experts.w13")]
            assert w13 and all(g[2:].count_nonzero() == 0 < g[:2].count_nonzero() for g in w13)
    check_against_one_process(results)


def test_bf16_mixed_precision_expert_parallel_matches_fsdp(two_process_steps):
    """Under FSDP2's bf16 policy the block's input arrives in bf16 but FSDP2 does not cast the
    expert-parallel weights it ignores: the dispatch casts this rank's experts itself, and the
    step matches FSDP2 alone to bf16 precision (fp32 gradients either way)."""
    fsdp, ep = two_process_steps[-2:]
    assert not fsdp["case"]["ep"] and ep["case"]["ep"] and ep["exchanges"] == 4
    assert abs(fsdp["loss"].item() - ep["loss"].item()) < 1e-3
    assert abs(fsdp["norm"].item() - ep["norm"].item()) < 1e-2 * fsdp["norm"].item()
    for key, g in fsdp["grads"].items():
        assert ep["grads"][key].dtype == torch.float32, key
        torch.testing.assert_close(ep["grads"][key], g, rtol=5e-2, atol=1e-3, msg=key)


def test_expert_parallel_in_one_process_changes_nothing():
    config = moe_config("sigmoid")
    a = build_model(config, World(), seed=0)
    b = build_model(config, World(), seed=0, expert_parallel=True)
    assert all(m.expert_parallel is None for m in b.modules() if isinstance(m, MoE))
    sa = a.state_dict()
    for name, t in b.state_dict().items():
        assert torch.equal(t, sa[name]), name
    with pytest.raises(CamelidError, match="is dense"):
        build_model(ModelConfig.from_preset("tiny"), World(), seed=0, expert_parallel=True)


def test_layouts_that_cannot_be_built_are_refused_by_name():
    config, two = moe_config("sigmoid"), World(rank=0, world_size=2)
    check_expert_parallel(config, two, expert_parallel=True)  # 4 experts over 2 ranks
    check_expert_parallel(config, World(), expert_parallel=True, compile=True)  # one process
    with pytest.raises(CamelidError, match="over 3 ranks needs n_experts divisible by 3, but "
                       "the model has 4 experts"):  # fmt: skip
        check_expert_parallel(config, World(world_size=3), expert_parallel=True)
    with pytest.raises(CamelidError, match="does not run compiled"):
        check_expert_parallel(config, two, expert_parallel=True, compile=True)
    with pytest.raises(CamelidError, match="is dense"):
        check_expert_parallel(ModelConfig.from_preset("tiny"), World(), expert_parallel=True)


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
    with pytest.raises(RecipeError, match=r"train.expert_parallel = true .* is dense"):
        load_recipe(recipe_file(tmp_path, dataset, train={"expert_parallel": True}))


def test_camelid_train_expert_parallel_matches_one_process_and_resumes(tmp_path, dataset):
    """`camelid train` under torchrun with expert parallelism (validation and a sample every 2
    steps too; bias balancing and both router losses on): the losses, expert loads and router
    losses of 1 process (and of FSDP2 without expert parallelism) within 1e-4; resumed from
    its step-2 DCP checkpoint (2 processes, expert-parallel again) it continues to the
    uninterrupted run's losses, and in one process nearly so; its HF export holds every
    expert."""
    moe = {"preset": "tiny", "n_experts": 4, "n_experts_per_tok": 2, "moe_ffn_dim": 32,
           "n_shared_experts": 1, "moe_interleave_step": 2}  # fmt: skip
    # A configured MFU peak: measuring the CPU's would take seconds of each process's start.
    common = {
        "model": moe,
        # Balancing and both router losses on: their normalisation over ranks is checked too.
        "moe": {"bias_update_rate": 0.01, "aux_loss_coef": 0.01, "z_loss_coef": 0.001},
        "eval": {"interval": 2, "batches": 1, "sample_tokens": 4},
        "run": {"peak_tflops": 1.0},
    }
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    for d in (one, two, resumed):
        d.mkdir()
    train(load_recipe(recipe_file(one, dataset, train={"steps": 4, "batch_size": 4},
                                  checkpoint={"interval": 0}, **common)),
          progress=False)  # fmt: skip
    ep = {"steps": 4, "batch_size": 2, "expert_parallel": True}
    recipe = recipe_file(two, dataset, train=ep, checkpoint={"interval": 2}, **common)
    res = torchrun("-m", "camelid.cli", "train", str(recipe))
    assert "experts split over the 2 ranks" in res.stdout  # the header says the layout
    a, b = step_losses(one / "run"), step_losses(two / "run")
    assert a.keys() == b.keys() and len(a) == 4
    assert max(abs(a[k] - b[k]) for k in a) < 1e-4, (a, b)
    # The gradient norms too: AdamW hardly sees a gradient off by a constant factor, the norm
    # (and so clipping) does — every step's, so a gradient rule applied twice would show.
    na, nb = grad_norms(one / "run"), grad_norms(two / "run")
    assert na.keys() == nb.keys() and max(abs(na[k] - nb[k]) / na[k] for k in na) < 1e-4
    records = [json.loads(x) for x in (two / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "summary" and records[-1]["world_size"] == 2
    # The experts' loads are summed over ranks: the same loads, router losses and biases.
    ea, eb = experts_records(one / "run"), experts_records(two / "run")
    assert ea.keys() == eb.keys() == {1, 2, 3, 4}
    for k in ea:
        assert ea[k]["tokens"] == eb[k]["tokens"] and ea[k]["bias_absmax"] == eb[k]["bias_absmax"]
        for key in ("aux_loss", "z_loss"):
            assert abs(ea[k][key] - eb[k][key]) < 1e-5, (key, ea[k], eb[k])

    # FSDP2 alone (every expert on every rank, sharded like the rest): the same run again.
    fsdp = tmp_path / "fsdp"
    fsdp.mkdir()
    recipe_fsdp = recipe_file(fsdp, dataset, train={**ep, "expert_parallel": False},
                              checkpoint={"interval": 0, "export_hf": False}, **common)  # fmt: skip
    torchrun("-m", "camelid.cli", "train", str(recipe_fsdp))
    f = step_losses(fsdp / "run")
    assert f.keys() == a.keys() and max(abs(a[k] - f[k]) for k in a) < 1e-4, (a, f)
    assert [r["tokens"] for r in experts_records(fsdp / "run").values()] == [
        ea[k]["tokens"] for k in sorted(ea)
    ]

    # Resume the step-2 checkpoint in a fresh run directory, on the same layout.
    start = resumed / "step-00000002"
    shutil.copytree(two / "run" / "checkpoints" / "step-00000002", start)
    recipe = recipe_file(resumed, dataset, train=ep, checkpoint={"interval": 0,
                         "export_hf": False}, **common)  # fmt: skip
    torchrun("-m", "camelid.cli", "train", str(recipe), "--resume", str(start))
    c = step_losses(resumed / "run")
    assert sorted(c) == [3, 4]
    assert max(abs(c[k] - b[k]) for k in c) < 1e-6, (b, c)

    # The same checkpoint resumes in one process too (DCP re-shards model and optimizer).
    single = tmp_path / "single"
    single.mkdir()
    recipe = recipe_file(single, dataset, train={"steps": 4, "batch_size": 4},
                         checkpoint={"interval": 0, "export_hf": False}, **common)  # fmt: skip
    train(load_recipe(recipe), resume=str(start), progress=False)
    d = step_losses(single / "run")
    assert sorted(d) == [3, 4] and max(abs(d[k] - b[k]) for k in d) < 1e-4, (b, d)

    # The export gathered every expert: exactly the weights of the run's last checkpoint (read
    # in one process: DCP re-shards), and nearly the 1-process run's.
    exported = load_weights(two / "run" / "hf").state_dict()
    saved = load_checkpoint(two / "run" / "checkpoints" / "step-00000004").state_dict()
    reference = load_weights(one / "run" / "hf").state_dict()
    assert exported.keys() == saved.keys() == reference.keys()
    assert any(".experts." in key for key in exported)
    for key, t in exported.items():
        assert torch.equal(t, saved[key]), key
        torch.testing.assert_close(t, reference[key], rtol=0, atol=1e-3, msg=key)


def experts_records(run: Path) -> dict[int, dict]:
    """Step -> the last "experts" record of that step."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "experts":
            out[r["step"]] = r
    return out
