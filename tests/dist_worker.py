"""Run under ``torchrun`` by test_parallel.py: one optimizer step's gradients, sharded.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT \
        [--tie] [--ac] [--compile] [--accum N]
    python -m torch.distributed.run ... tests/dist_worker.py OUT --moe CASE [--moe CASE ...]

Each rank builds the model with ``build_model`` (meta device, FSDP2, sharded init), runs
``forward_backward`` over its rows of the global batch from ``masked_batch`` in ``--accum``
micro-batches, and rank 0 saves the loss, the full gradients, their global norm (measured by
``clip_grad_norm``) and every rank's parameter bytes. Each ``--moe`` CASE (see :func:`moe_case`)
does the same for the tiny MoE model of :func:`moe_config`, all in one launch (starting
torchrun costs more than a step), and OUT holds the list of their results.
"""

from __future__ import annotations

import argparse

import torch

from camelid import ModelConfig
from camelid.loss import IGNORE_INDEX
from camelid.model.moe import MoE
from camelid.train.distributed import all_reduce_sum, close, init_world
from camelid.train.parallelize import build_model, local_param_bytes
from camelid.train.step import clip_grad_norm, forward_backward


def masked_batch(rows: int = 8, seq: int = 24, vocab: int = 512) -> tuple[torch.Tensor, ...]:
    """A fixed global batch whose rows have very different numbers of masked targets."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (rows, seq), generator=g)
    y = torch.randint(0, vocab, (rows, seq), generator=g)
    for r in range(rows):
        y[r, : (r * 7) % seq] = IGNORE_INDEX  # 0, 7, 14, 21, 4, ... masked targets
    return x, y


def config(tie: bool) -> ModelConfig:
    return ModelConfig.from_preset("tiny", tie_embeddings=tie)


def moe_config(scoring: str = "sigmoid", top_k: int = 1, interleave: int = 1) -> ModelConfig:
    """The tiny preset with 4 routed experts (of width 32) and a shared one."""
    return ModelConfig.from_preset(
        "tiny", n_experts=4, n_experts_per_tok=top_k, n_shared_experts=1, moe_ffn_dim=32,
        moe_interleave_step=interleave, router_scoring=scoring,
    )  # fmt: skip


def moe_case(text: str) -> dict:
    """``"softmax,top_k=2,interleave=2,ac,accum=2,ep"``: scoring first, then the
    ``moe_config`` fields, activation checkpointing, micro-batches, expert parallelism (and
    ``bf16``: FSDP2's bf16 mixed precision; ``starve``: every token routed to experts 0 and 1,
    so the rank holding experts 2 and 3 receives no rows)."""
    scoring, *rest = text.split(",")
    case = {"scoring": scoring, "top_k": 1, "interleave": 1, "ac": False, "accum": 1,
            "ep": False, "bf16": False, "starve": False}  # fmt: skip
    for item in rest:
        key, _, value = item.partition("=")
        case[key] = int(value) if value else True
    return case


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        out[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--ac", action="store_true")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--moe", action="append", default=[], type=moe_case)
    args = ap.parse_args()
    world = init_world("cpu")
    if args.moe:
        results = [moe_step(case, world) for case in args.moe]
        if world.is_main:
            torch.save(results, args.out)
        close(world)
        return
    model = build_model(config(args.tie), world, seed=0, activation_checkpointing=args.ac,
                        compile=args.compile)  # fmt: skip
    x, y = masked_batch()
    mine = slice(world.rank, None, world.world_size)  # this rank's rows of the global batch
    xs, ys = x[mine].chunk(args.accum), y[mine].chunk(args.accum)
    loss = forward_backward(model, list(zip(xs, ys, strict=True)), None, world)
    grads = full_grads(model)
    norm = clip_grad_norm(model, 0.0)  # measure only
    bytes_ = torch.zeros(world.world_size, dtype=torch.float64)
    bytes_[world.rank] = local_param_bytes(model)
    bytes_ = all_reduce_sum(bytes_, world)
    tied = model.output.weight is model.tok_embeddings.weight
    if world.is_main:
        torch.save({"loss": loss, "grads": grads, "norm": norm, "param_bytes": bytes_.tolist(),
                    "tied": tied}, args.out)  # fmt: skip
    close(world)


def starve(model: torch.nn.Module, case: dict) -> None:
    """For a ``starve`` case: a selection bias that only experts 0 and 1 can win against."""
    if case.get("starve"):
        for m in model.modules():
            if isinstance(m, MoE):
                m.selection_bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))


def moe_step(case: dict, world) -> dict:
    """One step of the MoE ``case`` on this rank's rows; also how many row exchanges
    (all-to-alls out and back) its forwards made, counted on this rank."""
    from torch.distributed import _functional_collectives as funcol

    cfg = moe_config(case["scoring"], case["top_k"], case["interleave"])
    model = build_model(cfg, world, seed=0, activation_checkpointing=case["ac"],
                        expert_parallel=case["ep"], bf16=case["bf16"])  # fmt: skip
    starve(model, case)
    real, calls = funcol.all_to_all_single_autograd, []
    funcol.all_to_all_single_autograd = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        x, y = masked_batch()
        mine = slice(world.rank, None, world.world_size)
        xs, ys = x[mine].chunk(case["accum"]), y[mine].chunk(case["accum"])
        loss = forward_backward(model, list(zip(xs, ys, strict=True)), None, world)
    finally:
        funcol.all_to_all_single_autograd = real
    w13s = [m.experts.w13 for m in model.modules() if isinstance(m, MoE)]
    local = [(w.to_local() if hasattr(w, "to_local") else w).shape[0] for w in w13s]
    meshes = {p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh")}
    return {"case": case, "loss": loss, "grads": full_grads(model),
            "norm": clip_grad_norm(model, 0.0), "exchanges": len(calls),
            "local_experts": local, "meshes": len(meshes)}  # fmt: skip


if __name__ == "__main__":
    main()
