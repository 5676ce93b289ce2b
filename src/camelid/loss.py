"""Next-token losses: the one home of ``IGNORE_INDEX``, cross-entropy and the fused CPU head.

Every consumer — pre-training, fine-tuning masks, validation, evaluation — computes its loss
here, so a masked target means the same thing everywhere. Losses come as a *sum* over valid
targets when the caller must normalise over more than one batch (the trainer divides by the
valid targets of a whole optimizer step, across micro-batches and ranks), or as a mean.

The model never computes a loss: ``next_token_loss`` hands it a ``head`` callable that it
applies to its final hidden state and output weight, so the loss runs inside the model's
forward (where an FSDP2-sharded head weight is gathered) and, on a CPU, without ever holding
the (tokens, vocab) logits.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 16 << 20  # the fused CPU head's fp32 logits per chunk, by default ...
MIN_CHUNK_ROWS = 512  # ... but never fewer rows than this (see linear_cross_entropy)
IGNORE_INDEX = -100  # a target that counts neither in the loss nor in its normaliser

Reduction = Literal["mean", "sum"]


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Next-token loss of logits (..., vocab) against targets (...), in fp32 whatever the logits'
    dtype; targets equal to ``IGNORE_INDEX`` are left out of the sum and the mean."""
    return F.cross_entropy(
        logits.flatten(0, -2).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def valid_targets(targets: torch.Tensor) -> torch.Tensor:
    """How many targets count (a 0-d int64 tensor on the targets' device)."""
    return (targets != IGNORE_INDEX).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``h @ weight.T`` against ``targets``, summed with a per-row weight,
    computed in fp32 a chunk of rows at a time. Each chunk's logits become their own gradient
    (softmax - one-hot) in place and go through the head's two backward matmuls at once, so
    the (N, vocab) logits are never held whole and backward only scales the two gradients."""

    @staticmethod
    def forward(ctx, h, weight, targets, mean, chunk_rows, needs_grad):
        # needs_grad: (for h, for weight). A frozen head (LoRA) gets no weight gradient: that
        # would be a (vocab, dim) buffer and a third of the head's matmuls, all wasted.
        need_h, need_w = needs_grad
        dtype = torch.promote_types(h.dtype, torch.float32)  # fp32 at least
        valid = targets != IGNORE_INDEX
        row_weight = valid.to(dtype)  # each row's share of the result
        if mean:  # over no valid target: nan, as F.cross_entropy's mean
            row_weight /= valid.sum()
        targets = targets.where(valid, 0).unsqueeze(1)
        loss = torch.zeros((), dtype=dtype, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None  # the first chunk's product, then accumulated in place
        for start in range(0, len(h), chunk_rows):
            r = slice(start, start + chunk_rows)
            logits = (h[r] @ weight.t()).to(dtype)
            target_logit = logits.gather(1, targets[r])
            shift = logits.amax(1, keepdim=True)
            probs = logits.sub_(shift).exp_()  # unnormalised, in place
            total = probs.sum(1, keepdim=True)
            loss += ((total.log() + shift - target_logit).squeeze(1) * row_weight[r]).sum()
            if need_h or need_w:
                grad = probs.mul_(row_weight[r, None] / total)
                grad.scatter_add_(1, targets[r], -row_weight[r, None])
                grad = grad.to(h.dtype)
                if need_h:
                    grad_h[r] = grad @ weight
                if need_w:  # accumulated in place: no (vocab, dim) temporary per chunk
                    if grad_w is None:
                        grad_w = (grad.t() @ h[r]).to(weight.dtype)
                    elif grad.dtype == grad_w.dtype:
                        grad_w.addmm_(grad.t(), h[r])
                    else:
                        grad_w += grad.t() @ h[r]
        if need_w and grad_w is None:  # no rows at all
            grad_w = torch.zeros_like(weight)
        ctx.grads = (grad_h, grad_w)  # intermediates, not inputs or outputs: no cycle
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        # The gradients are handed over and scaled in place: kept in ctx (not saved tensors,
        # which would stay referenced until the graph is freed), so the parameter's .grad
        # takes this very buffer and a (vocab, dim) weight gradient is never held twice
        # during backward. Hence this backward runs once (no retain_graph through it).
        if ctx.grads is None:
            raise RuntimeError(
                "the fused head's backward ran twice (retain_graph=True is not supported)"
            )
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        grad_h = grad_h.mul_(grad_loss) if ctx.needs_input_grad[0] else None
        grad_w = grad_w.mul_(grad_loss) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_bytes: int | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """``cross_entropy(F.linear(h, weight), targets, reduction)`` for h (..., dim), targets (...).

    On a CPU it runs fused, for the rows whose target is not ``IGNORE_INDEX`` only, holding
    ``chunk_bytes`` of fp32 logits at a time (by default ``CHUNK_BYTES``, but at least
    ``MIN_CHUNK_ROWS`` rows, as thin matmuls are slow; the rows split into equal chunks): no
    logits-sized buffer is allocated (and page-faulted in) every step.
    On GPUs the plain form is kept: their fused log-softmax kernels make fewer passes over the
    logits than this loop (measured on an H100, Llama 3.2 1B, 4 × 2048 tokens, bf16: 4% more
    tokens/s than the fused form, for 8 GiB more memory).
    """
    h, targets = h.flatten(0, -2), targets.flatten()
    if h.device.type != "cpu":
        return cross_entropy(F.linear(h, weight), targets, reduction)
    # Only the rows whose target counts get logits: a masked row adds nothing to the loss and
    # its gradient is exactly zero, so skipping it changes no result (SFT masks about half
    # of the targets, and the head is a fifth of a small model's FLOPs). The selection's
    # backward scatters the kept rows' gradients back, the others' stay zero.
    valid = targets != IGNORE_INDEX
    n_valid = int(valid.sum())
    if 0 < n_valid < len(targets):  # none valid: the mean stays nan, as F.cross_entropy's
        keep = valid.nonzero().squeeze(1)
        h, targets = h.index_select(0, keep), targets.index_select(0, keep)
    chunk_rows = max(1, (chunk_bytes or CHUNK_BYTES) // (4 * weight.shape[0]))
    if chunk_bytes is None:
        # At least 512 rows a chunk: thinner matmuls run far below the peak (vocab 32000,
        # 2-core CPU: the head's forward + input gradient took 1.65 s for 1024 rows in
        # 131-row chunks, 1.27 s in 512-row ones; one chunk of all 1024 rows was no faster
        # than two of 512 and holds twice the logits at the step's peak).
        chunk_rows = max(MIN_CHUNK_ROWS, chunk_rows)
    # Equal chunks: 542 rows in chunks of 512 would leave a 30-row matmul.
    n_chunks = max(1, -(-len(h) // chunk_rows))
    chunk_rows = max(1, -(-len(h) // n_chunks))
    grad = torch.is_grad_enabled()
    needs_grad = (grad and h.requires_grad, grad and weight.requires_grad)
    mean = reduction == "mean"
    return _LinearCrossEntropy.apply(h, weight, targets, mean, chunk_rows, needs_grad)


def next_token_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    reduction: Reduction = "mean",
    input_pos: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's fp32 loss on ``inputs`` (B, T) against ``targets`` (B, T), its head and the
    cross-entropy fused (see the module docstring). ``input_pos`` and ``doc_ids`` (B, T) are
    for packed rows (``camelid.data.SFTLoader``): positions restarting per document, and no
    attention across documents."""
    head = partial(linear_cross_entropy, targets=targets, reduction=reduction)
    if input_pos is None and doc_ids is None:  # as before: models without the packing keywords
        return model(inputs, head=head)
    return model(inputs, input_pos=input_pos, head=head, doc_ids=doc_ids)
