"""Linear layers for decoding: a row-dot form of the matrix-vector product, and int8 weights.

Decoding one token multiplies a single row by every weight matrix, so it is bound by how fast
the weights stream from memory. On CPUs the BLAS matrix-vector path streams Llama-shaped
matrices (short rows) at a third of the machine's read bandwidth; written as
``(weight * x).sum(-1)`` and compiled, it becomes one vectorised pass over the weight that runs
near the bandwidth (see docs/benchmarks.md). Int8 weights with one fp32 scale per output row
(symmetric, weight-only) read a quarter of the bytes.

These forms only pay off inside ``torch.compile`` (eager would materialise the product), so they
are taken only while compiling, and the engine swaps them in on a structural copy of the model
that shares its parameters.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

SMALL_BATCH = 16  # up to this many rows, compiled products take the fused row-dot form


def _rows(x: torch.Tensor) -> int:
    return x.shape[:-1].numel()


def _row_dot(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a few rows as one fused multiply-and-sum. The product is laid out
    (out, rows), so each weight row is read once and serves every input row from cache."""
    rows = _rows(x)
    y = (weight.unsqueeze(1) * x.reshape(1, rows, -1)).sum(-1)
    return (y.view(-1) if rows == 1 else y.t()).reshape(*x.shape[:-1], -1)


class RowDotLinear(nn.Linear):
    """``nn.Linear`` whose product for up to ``SMALL_BATCH`` rows, when compiled, is a fused
    multiply-and-sum over the weight's rows (eager keeps the BLAS call: it would materialise
    the product)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x) > SMALL_BATCH or not torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        y = _row_dot(self.weight, x)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """Weight-only int8 linear: ``q`` (out, in) int8 and one scale per output row, with
    ``weight ≈ q * scale[:, None]`` (symmetric, round to nearest).

    Compiled, up to ``SMALL_BATCH`` rows are computed from the int8 weight directly, converting
    as it is read; larger batches and eager calls dequantise the weight and use a matmul."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("q", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if rows <= SMALL_BATCH and torch.compiler.is_compiling():
            y = _row_dot(self.q, x) * self.scale
        else:
            y = F.linear(x, self.q.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def decode_copy(model: nn.Module, int8: bool = False, row_dot: bool = True) -> nn.Module:
    """A copy of ``model`` sharing its parameters, with every ``nn.Linear`` replaced by an
    :class:`Int8Linear` (``int8``) or a :class:`RowDotLinear` (``row_dot``). The original
    model is left untouched."""
    shared = {id(p): p for p in model.parameters()}
    shared.update({id(b): b for b in model.buffers()})
    clone = copy.deepcopy(model, memo=shared)
    for module in list(clone.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            if int8:
                setattr(module, name, Int8Linear(child))
            elif row_dot:
                child.__class__ = RowDotLinear  # same parameters, other forward
    return clone


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with int8 weight-only linear layers (embeddings and norms stay as
    they are). The original model is left untouched."""
    return decode_copy(model, int8=True)


def decode_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once, except the
    embedding table, of which a step reads one row (unless the head shares it). The memory-
    bandwidth roofline of batch-1 decoding is read bandwidth / this."""
    head = getattr(getattr(model, "output", None), "weight", None)
    embedding = getattr(getattr(model, "tok_embeddings", None), "weight", None)
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or (t is embedding and t is not head):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
