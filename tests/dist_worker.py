"""Run under ``torchrun`` by test_parallel.py: one optimizer step's gradients, sharded.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT \
        [--tie] [--ac] [--compile] [--accum N]

Each rank builds the model with ``build_model`` (meta device, FSDP2, sharded init), runs
``forward_backward`` over its rows of the global batch from ``masked_batch`` in ``--accum``
micro-batches, and rank 0 saves the loss, the full gradients and every rank's parameter bytes.
"""

from __future__ import annotations

import argparse

import torch

from camelid import ModelConfig
from camelid.loss import IGNORE_INDEX
from camelid.train.distributed import all_reduce_sum, close, init_world
from camelid.train.parallelize import build_model, local_param_bytes
from camelid.train.step import forward_backward


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
    args = ap.parse_args()
    world = init_world("cpu")
    model = build_model(config(args.tie), world, seed=0, activation_checkpointing=args.ac,
                        compile=args.compile)  # fmt: skip
    x, y = masked_batch()
    mine = slice(world.rank, None, world.world_size)  # this rank's rows of the global batch
    xs, ys = x[mine].chunk(args.accum), y[mine].chunk(args.accum)
    loss = forward_backward(model, list(zip(xs, ys, strict=True)), None, world)
    grads = full_grads(model)
    bytes_ = torch.zeros(world.world_size, dtype=torch.float64)
    bytes_[world.rank] = local_param_bytes(model)
    bytes_ = all_reduce_sum(bytes_, world)
    tied = model.output.weight is model.tok_embeddings.weight
    if world.is_main:
        torch.save({"loss": loss, "grads": grads, "param_bytes": bytes_.tolist(), "tied": tied},
                   args.out)  # fmt: skip
    close(world)


if __name__ == "__main__":
    main()
