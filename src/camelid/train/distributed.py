"""Process groups: whatever `torchrun` sets up, nothing home-made.

Under ``torchrun --nproc_per_node N`` (or across nodes, with ``--nnodes``/``--rdzv-endpoint``)
each process reads RANK, WORLD_SIZE and LOCAL_RANK and joins the group: NCCL on GPUs, gloo on
CPUs. How the model is sharded over it lives in :mod:`camelid.train.parallelize`. A plain
``python`` / ``camelid train`` run is a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from camelid.errors import CamelidError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (immutable)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device: str = "auto") -> World:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
        raise CamelidError(
            f"train.device = cuda, but CUDA is not available here (torch {torch.__version__}: "
            f"{build}); use train.device = auto or cpu"
        )
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise CamelidError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
            "start at most that many processes per node"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(rank, world_size, local_rank, dev)


def all_reduce_mean(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world.world_size
    return t


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when it is true on any: ranks must agree to stop or roll back."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def close(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
