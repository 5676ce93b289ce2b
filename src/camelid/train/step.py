"""One optimisation step's parts, shared by the trainer and the training benchmark.

``forward_backward`` runs the micro-batches of one step (gradient accumulation) and returns the
step's exact mean loss; the caller clips, steps the optimizer and zeroes the gradients. Keeping
these small and separate lets the trainer put its stability guard between backward and the
update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from camelid.loss import next_token_loss, valid_targets
from camelid.train import balance
from camelid.train.distributed import World, all_reduce_sum
from camelid.train.parallelize import average_expert_grads


@dataclass
class StepOutcome:
    """One optimizer step's forward and backward, as the trainer logs it."""

    loss: torch.Tensor  # detached, on device, the same on every rank
    tokens: int  # the step's tokens over all ranks (a DPO step: its pairs' tokens, no padding)
    metrics: dict[str, float] = field(default_factory=dict)  # more for the step record


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); never norms or biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW with weight-decay groups; the fused kernel (one pass over all parameters) on CUDA
    and CPU alike."""
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=True
    )


def forward_backward(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    autocast_dtype: torch.dtype | None = None,
    world: World | None = None,
) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step over ``batches``; return its loss
    (detached, on device, the same on every rank).

    The loss is the sum of the cross-entropy over every valid target of the step — all
    micro-batches, all ranks — divided by the number of those targets, so masked targets and
    uneven micro-batches give the exact mean over the step's tokens (as torchtitan does), not a
    mean of per-batch means. Its head and the cross-entropy run fused
    (``camelid.loss.next_token_loss``). An MoE model's router losses, when on, join the
    gradients normalised over the step's tokens (:mod:`camelid.train.balance`); the loss
    returned is the cross-entropy alone. A batch is ``(inputs, targets)``, or packed
    fine-tuning rows ``(inputs, targets, positions, doc_ids)`` (``camelid.data.SFTLoader``).
    """
    world = world or World()
    batches = list(batches)
    if not batches:
        raise ValueError("forward_backward needs at least one batch")
    device = batches[0][0].device
    # Real tokens: a packed row's padding (document id -1) is not counted (MoE statistics).
    local = sum(b[0].numel() if len(b) < 4 else int((b[3] >= 0).sum()) for b in batches)
    tokens = torch.tensor(float(local), device=device)
    valid = sum(valid_targets(b[1]) for b in batches)
    counts = torch.stack([valid.double(), tokens.double()])
    n_valid, n_tokens = all_reduce_sum(counts, world).unbind()
    # FSDP2 averages gradients over ranks; scaling by the world size turns that into the sum.
    scale = world.world_size / n_valid
    balance.begin_step(model, int(n_tokens), world.world_size, local)  # MoE router accounting
    average_expert_grads(model)  # expert-parallel weights, which FSDP2 does not reduce, too
    total = torch.zeros((), dtype=torch.float64, device=device)
    for inputs, targets, *packed in batches:
        ctx = (
            torch.autocast(inputs.device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            nats = next_token_loss(model, inputs, targets, "sum", *packed)
        (nats * scale.to(nats.dtype)).backward()
        total += nats.detach()
    return (all_reduce_sum(total, world) / n_valid).float()


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0: only measure); return the total norm before clipping.

    Works for plain and sharded (DTensor) parameters alike: FSDP2's and the expert-parallel
    ones are all DTensors on one mesh, so each shard's norm is a partial one and the total is
    reduced over the ranks once, into the norm of the whole gradient.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return norm
