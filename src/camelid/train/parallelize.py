"""How a model is laid out for training: everything parallel about it, in one place, one order.

    model = build_model(config, world, seed=0, activation_checkpointing=True, compile=True,
                        bf16=True)

The model is built on the meta device (no memory), then, in torchtitan's order:

1. activation checkpointing: each block wrapped in PyTorch's ``checkpoint_wrapper``, so its
   activations are recomputed in backward instead of kept;
2. ``torch.compile`` of each block (one graph per block, reused by every layer);
3. FSDP2 ``fully_shard`` of each block, then of the root, under ``torchrun`` — with a
   ``MixedPrecisionPolicy`` of bf16 parameters and fp32 gradient reductions when the recipe
   trains in bf16. With ``expert_parallel``, each MoE layer's routed experts are first split
   over the ranks instead (:func:`shard_experts`) and kept out of FSDP2;
4. materialisation: each rank allocates only what it holds, and initialises it by the model's
   ``init_plan``, drawing every parameter's full values from one seeded CPU generator and
   keeping its own shard — so the weights are those of a 1-process run whatever the number of
   processes, and no rank ever holds the whole fp32 model.

A plain ``camelid train`` is a world of one: steps 1, 2 and 4 apply, unsharded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.model import Transformer
from camelid.model.lora import LoraConfig, apply_lora, is_lora_name
from camelid.model.moe import ExpertParallel, MoE
from camelid.train.distributed import World


def build_model(
    config: ModelConfig,
    world: World,
    *,
    seed: int,
    activation_checkpointing: bool = False,
    compile: bool = False,
    bf16: bool = False,
    expert_parallel: bool = False,
    lora: LoraConfig | None = None,
) -> Transformer:
    """A freshly initialised model for ``world``, parallelised as the module docstring says.
    ``lora``: LoRA adapters are added first (on the meta device), the base frozen, so FSDP2
    shards them with their blocks; they get peft's init (A kaiming-uniform, B zeros)."""
    with torch.device("meta"):
        model = Transformer(config)
        if lora is not None:
            apply_lora(model, lora)
    parallelize(model, world, activation_checkpointing=activation_checkpointing,
                compile=compile, bf16=bf16, expert_parallel=expert_parallel)  # fmt: skip
    materialize(model, world.device, seed)
    return model


def parallelize(
    model: Transformer,
    world: World,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    bf16: bool = False,
    expert_parallel: bool = False,
) -> Transformer:
    """Apply checkpointing, compile, expert parallelism and FSDP2 to ``model`` in place (any
    device, meta too). ``expert_parallel`` splits the routed experts over the ranks of a
    ``torchrun`` world; in a world of one it changes nothing."""
    check_expert_parallel(model.config, world, expert_parallel=expert_parallel, compile=compile)
    expert_parallel = expert_parallel and world.distributed
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
        experts = shard_experts(model, mesh) if expert_parallel else set()
        # The expert-parallel weights are passed to fully_shard as ignored_params: FSDP2 then
        # neither shards them again, nor all-gathers them in forward (which would put every
        # expert on every rank), nor averages their gradients (each rank's are for other
        # experts), and they stay the Shard(0) DTensors on this same mesh that DCP, clipping
        # and AdamW read. Sharding the experts module with its own fully_shard instead (an
        # FSDP mesh for the experts, as torchtitan does for EP degree < the data-parallel size)
        # would be a mesh of one rank here, where EP spans the whole world: nothing to shard,
        # and DTensors on another mesh than the rest of the model.
        for block in model.layers:
            mine = {p for p in block.parameters() if p in experts}
            fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=mine)
        fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=experts)
    return model


def check_expert_parallel(
    config: ModelConfig, world: World, *, expert_parallel: bool, compile: bool = False
) -> None:
    """Refuse, in one clear message, a layout :func:`parallelize` cannot build: expert
    parallelism of a dense model, over a number of ranks that does not divide the experts, or
    compiled. (The trainer calls this before it writes anything.)"""
    if not expert_parallel:
        return
    if not config.is_moe:
        raise CamelidError(
            f"expert parallelism splits the routed experts of an MoE model, but "
            f"{config.name!r} is dense (n_experts = 0)"
        )
    if not world.distributed:
        return  # a world of one: every expert is local, nothing changes
    if config.n_experts % world.world_size:
        raise CamelidError(
            f"expert parallelism over {world.world_size} ranks needs n_experts divisible by "
            f"{world.world_size}, but the model has {config.n_experts} experts: run with a "
            f"number of processes that divides {config.n_experts}, or turn off "
            "train.expert_parallel"
        )
    if compile:
        raise CamelidError(
            "expert parallelism does not run compiled yet (its all-to-all sizes depend on the "
            "routing, which torch.compile cannot trace): turn off train.compile or "
            "train.expert_parallel"
        )


def shard_experts(model: Transformer, mesh) -> set[nn.Parameter]:
    """Split every MoE layer's routed experts over the ranks of the 1-D ``mesh``: expert e on
    rank ``e // (E / world size)``. Their weights become DTensors ``Shard(0)`` (still on the
    meta device until :func:`materialize`) and each MoE layer learns its process group, so
    ``MoE.routed`` dispatches rows to the ranks holding their experts. Returns the sharded
    parameters (for FSDP2 to leave alone)."""
    from torch.distributed.tensor import DTensor, Shard

    size, n = mesh.size(), model.config.n_experts
    if n % size:  # check_expert_parallel says it in a user's terms first
        raise CamelidError(f"{n} experts cannot be split evenly over {size} ranks")
    sharded = set()
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        experts = module.experts
        for name in ("w13", "w2"):
            full = getattr(experts, name)
            local = torch.empty((n // size, *full.shape[1:]), dtype=full.dtype,
                                device=full.device)  # fmt: skip
            dt = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
            param = nn.Parameter(dt, requires_grad=full.requires_grad)
            setattr(experts, name, param)
            sharded.add(param)
        module.expert_parallel = ExpertParallel(group=mesh.get_group(), size=size)
    return sharded


def expert_parallel_params(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Each expert-parallel weight of ``model`` and the number of ranks it is split over."""
    out = []
    for module in model.modules():
        ep = getattr(module, "expert_parallel", None)
        if isinstance(module, MoE) and ep is not None:
            out += [(module.experts.w13, ep.size), (module.experts.w2, ep.size)]
    return out


def average_expert_grads(model: nn.Module) -> None:
    """Make backward give every expert-parallel weight of ``model`` FSDP2's gradient: the mean
    over ranks of each rank's gradient (idempotent; ``forward_backward`` calls it).

    FSDP2 averages a sharded weight's gradient over the ranks. An expert's weight lives on one
    rank only, and the all-to-all's backward already brings every rank's rows' gradient to it,
    so its gradient is the SUM over ranks: world size times the FSDP2 convention (which
    ``forward_backward``'s loss scale turns into the exact sum over the step). A gradient hook
    divides by the number of ranks each time backward reaches the weight, so gradient
    accumulation over micro-batches and activation checkpointing stay exact."""
    for p, n in expert_parallel_params(model):
        # Marked on the weight itself: one that replaces it (a load that assigns) gets its own.
        if not getattr(p, "_camelid_grad_mean", False):
            p.register_hook(lambda g, n=n: g / n)
            p._camelid_grad_mean = True


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, seed: int, std: float = 0.02) -> None:
    """Allocate ``model``'s parameters on ``device`` (only this rank's shards) and initialise
    them by ``model.init_plan``, the same values for any number of ranks."""
    model.to_empty(device=device)
    model.tie_weights()
    model._reset_selection_bias()  # a buffer, not in the plan: to_empty left it uninitialised
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for name, kind, s in model.init_plan(std):
        if is_lora_name(name):
            continue  # after the base, by peft's rule (below)
        p = params[name]
        local = p.to_local() if hasattr(p, "to_local") else p
        if kind != "normal":
            local.fill_(1.0 if kind == "ones" else 0.0)
            continue
        full = torch.empty(p.shape, dtype=p.dtype).normal_(0.0, s, generator=generator)
        local.copy_(_own_shard(full, p))
    for name, p in params.items():
        if not is_lora_name(name):
            continue
        full = torch.zeros(p.shape, dtype=p.dtype)
        if ".lora_A." in name:  # peft's init: A kaiming-uniform, B zeros (a no-op adapter)
            torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        local = p.to_local() if hasattr(p, "to_local") else p
        local.copy_(_own_shard(full, p))
    model._reset_selection_bias()  # buffers too: to_empty left them uninitialised


@torch.no_grad()
def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a plain model's full ``state`` (a :class:`Transformer` state dict) into ``model``,
    which may be wrapped (activation checkpointing, compile) and sharded (FSDP2, expert
    parallel): each rank keeps its own shard of every parameter, and the buffers whole."""
    names = {}
    for prefix, module in model.named_modules():
        tensors = [*module.named_parameters(recurse=False), *(
            (n, b) for n, b in module.named_buffers(recurse=False)
            if n not in module._non_persistent_buffers_set)]  # fmt: skip
        for name, t in tensors:
            full = f"{prefix}.{name}" if prefix else name
            names[full.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")] = t
    missing = sorted(n for n in set(names) - set(state) if not is_lora_name(n))
    if missing:
        raise RuntimeError(f"the weights lack {missing[0]} (and {len(missing) - 1} more)")
    for name, t in names.items():
        if name not in state:  # LoRA adapters: a base model's weights have none
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        local.copy_(_own_shard(state[name].to(local.dtype), t))


def _own_shard(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` that ``param`` (a plain tensor, or a DTensor sharded along dim 0
    in ``torch.chunk`` order: FSDP2's, or the experts of :func:`shard_experts`) holds on this
    rank."""
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
