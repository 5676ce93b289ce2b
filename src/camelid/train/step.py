"""One optimisation step's parts, shared by the trainer and the training benchmark.

``forward_backward`` runs the micro-batches of one step (gradient accumulation) and returns the
mean loss; the caller clips, steps the optimizer and zeroes the gradients. Keeping these small
and separate lets the trainer put its stability guard between backward and the update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss, computed in fp32 whatever the logits' dtype: the loss that
    ``model(inputs, targets=targets)`` computes fused, for models that return logits."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


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
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Accumulate gradients over ``batches``; return the mean loss (detached, on device).

    The model computes the loss itself (``model(inputs, targets=targets)``): on a CPU its head
    and the cross-entropy then run fused, without materialising the (batch, seq, vocab) logits.
    """
    batches = list(batches)
    total = None
    for inputs, targets in batches:
        device_type = inputs.device.type
        ctx = (
            torch.autocast(device_type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            loss = model(inputs, targets=targets) / len(batches)
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    assert total is not None, "forward_backward needs at least one batch"
    return total


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0: only measure); return the total norm before clipping.

    Works for plain and FSDP2-sharded (DTensor) parameters alike.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return norm
