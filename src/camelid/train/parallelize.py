"""How a model is laid out for training: everything parallel about it, in one place, one order.

    model = build_model(config, world, seed=0, activation_checkpointing=True, compile=True,
                        bf16=True)

The model is built on the meta device (no memory), then, in torchtitan's order:

1. activation checkpointing: each block wrapped in PyTorch's ``checkpoint_wrapper``, so its
   activations are recomputed in backward instead of kept;
2. ``torch.compile`` of each block (one graph per block, reused by every layer);
3. FSDP2 ``fully_shard`` of each block, then of the root, under ``torchrun`` — with a
   ``MixedPrecisionPolicy`` of bf16 parameters and fp32 gradient reductions when the recipe
   trains in bf16;
4. materialisation: each rank allocates only what it holds, and initialises it by the model's
   ``init_plan``, drawing every parameter's full values from one seeded CPU generator and
   keeping its own shard — so the weights are those of a 1-process run whatever the number of
   processes, and no rank ever holds the whole fp32 model.

A plain ``camelid train`` is a world of one: steps 1, 2 and 4 apply, unsharded.
"""

from __future__ import annotations

import torch
from torch import nn

from camelid.config import ModelConfig
from camelid.model import Transformer
from camelid.train.distributed import World


def build_model(
    config: ModelConfig,
    world: World,
    *,
    seed: int,
    activation_checkpointing: bool = False,
    compile: bool = False,
    bf16: bool = False,
) -> Transformer:
    """A freshly initialised model for ``world``, parallelised as the module docstring says."""
    with torch.device("meta"):
        model = Transformer(config)
    parallelize(model, world, activation_checkpointing=activation_checkpointing,
                compile=compile, bf16=bf16)  # fmt: skip
    materialize(model, world.device, seed)
    return model


def parallelize(
    model: Transformer,
    world: World,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    bf16: bool = False,
) -> Transformer:
    """Apply checkpointing, compile and FSDP2 to ``model`` in place (any device, meta too)."""
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for i, block in enumerate(model.layers):
            # The blocks have no randomness (no dropout): no RNG state to stash and restore.
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile:
        for block in model.layers:
            block.compile()
    if world.distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(world.device.type, (world.world_size,))
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, seed: int, std: float = 0.02) -> None:
    """Allocate ``model``'s parameters on ``device`` (only this rank's shards) and initialise
    them by ``model.init_plan``, the same values for any number of ranks."""
    model.to_empty(device=device)
    model.tie_weights()
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for name, kind, s in model.init_plan(std):
        p = params[name]
        local = p.to_local() if hasattr(p, "to_local") else p
        if kind != "normal":
            local.fill_(1.0 if kind == "ones" else 0.0)
            continue
        full = torch.empty(p.shape, dtype=p.dtype).normal_(0.0, s, generator=generator)
        local.copy_(_own_shard(full, p))
    model._reset_selection_bias()  # buffers too: to_empty left them uninitialised


def _own_shard(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` that ``param`` (a plain tensor, or an FSDP2 DTensor sharded along
    dim 0 in ``torch.chunk`` order) holds on this rank."""
    if not hasattr(param, "device_mesh"):
        return full
    mesh = param.device_mesh
    chunks = torch.chunk(full, mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    mine = chunks[rank] if rank < len(chunks) else full[:0]
    local = param.to_local()
    if mine.shape != local.shape:  # a layout this code does not know: never guess
        raise RuntimeError(f"shard of shape {tuple(local.shape)} is not chunk {rank} of "
                           f"{tuple(full.shape)}")  # fmt: skip
    return mine


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards under FSDP2, a tied weight once)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
