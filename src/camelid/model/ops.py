"""Training-time versions of the model's cheap elementwise ops that save less for backward.

Plain autograd keeps every intermediate a backward formula reads: for SwiGLU ``silu(a) * b``
that is ``a``, ``silu(a)`` and ``b``; for RMSNorm ``w * x * rstd`` it is ``x``, ``rstd`` and the
normalised ``x * rstd``. The functions here compute the very same values (the same aten ops, so
bit-identical outputs) but save only the inputs and recompute the rest in backward, where it
costs one elementwise pass. RoPE writes q, k and v into one new tensor and saves nothing (the
projection's output, otherwise kept alive by v, is freed). :func:`recompute_saved` goes one
step further for an op's output that a following matmul saves (the FFN's ``silu(a) * b`` read
again by ``w2``, a norm's output read by the next projections): that saved copy is replaced by
a recipe and rebuilt, again bit-identical, when backward needs it. None of this is activation
checkpointing: no matmul or attention is run twice, only elementwise ops whose inputs are
saved anyway.

The model uses them in eager training only; under ``torch.compile`` the plain ops are traced
and the compiler's partitioner makes the same kind of choice itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from camelid.model.rope import apply_rope


def lean_autograd(*tensors: torch.Tensor) -> bool:
    """Whether the lean (save-less) forms apply: eager, with gradients on, for this input."""
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and not torch.compiler.is_compiling()
    )


# ------------------------------------------------------------------------------- SwiGLU
def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b``, plain ops: what :func:`swiglu` equals and recomputes."""
    return F.silu(a) * b


class _SwiGLU(torch.autograd.Function):
    """``silu(a) * b`` saving ``a`` and ``b`` only; ``silu(a)`` is recomputed in backward and
    the gradient of ``a`` goes through aten's own ``silu_backward``, as plain autograd does."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return swiglu_reference(a, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.ops.aten.silu_backward(grad * b, a)
        if ctx.needs_input_grad[1]:
            grad_b = grad * F.silu(a)
        return grad_a, grad_b


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b``; in eager training it saves ``a`` and ``b`` only (not ``silu(a)``)."""
    if lean_autograd(a, b):
        return _SwiGLU.apply(a, b)
    return swiglu_reference(a, b)


# ------------------------------------------------------------------------------ RMSNorm
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm in fp32, cast back to the input dtype, then scaled (as HF and Meta do)."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """:func:`rms_norm_reference` saving ``x`` and the per-row ``rstd`` (fp32) only: the
    normalised input is recomputed in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        # F.rms_norm's own CPU composite: rsqrt(mean(x^2) + eps), then x * rstd.
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        normed = (x.float() * rstd).to(x.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * normed).flatten(0, -2).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (grad * weight).float()  # the gradient of the fp32 normalised input
            n = normed.float()
            grad_x = (rstd * (g - n * (g * n).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`rms_norm_reference`; in eager training it saves ``x`` and ``rstd`` only."""
    if lean_autograd(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


# ------------------------------------------------------------- recomputing a saved output
class _Recipe:
    """What a saved tensor was replaced by: how to rebuild it (the op's inputs are saved by
    the op itself anyway) and which view of the rebuilt tensor was saved."""

    __slots__ = ("offset", "rebuild", "size", "stride")

    def __init__(self, rebuild: Callable[[], torch.Tensor], view: torch.Tensor) -> None:
        self.rebuild = rebuild
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()


def _storage_ptr(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage, or None for a tensor without a plain one (a wrapper
    subclass such as an in-flight collective's result)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _active_hooks() -> tuple[Callable | None, Callable | None] | None:
    """The saved-tensor hooks in force, or None (unknowable: a pair of Nones)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(True) if top is not None else (None, None)


@contextmanager
def recompute_saved(out: torch.Tensor, rebuild: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Inside the block, autograd saves no view of ``out`` (a contiguous tensor): each saved
    view of its storage is kept as a recipe and rebuilt with ``rebuild()`` (which must return
    ``out``'s exact values from tensors that stay saved anyway) when backward reads it. Every
    other saved tensor is kept as usual. Blocks nest (the outer one's tensor is still caught
    inside the inner one). A no-op unless :func:`lean_autograd` applies, and under anyone
    else's saved-tensor hooks (activation checkpointing has its own)."""
    if not lean_autograd(out):  # first: compiled code must not reach the hooks query below
        yield
        return
    outer = _active_hooks()
    if not (
        out.is_contiguous()
        and out.storage_offset() == 0
        and (outer is None or getattr(outer[0], "recompute_saved", False))
    ):
        yield
        return
    ptr, dtype = out.untyped_storage().data_ptr(), out.dtype
    outer_pack = outer[0] if outer is not None else None

    def pack(t: torch.Tensor) -> torch.Tensor | _Recipe:
        if t.dtype == dtype and _storage_ptr(t) == ptr:
            return _Recipe(rebuild, t)
        return outer_pack(t) if outer_pack is not None else t

    pack.recompute_saved = True  # type: ignore[attr-defined]

    def unpack(t: torch.Tensor | _Recipe) -> torch.Tensor:
        if isinstance(t, _Recipe):
            with torch.no_grad():
                full = t.rebuild()
            return full.as_strided(t.size, t.stride, t.offset)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


# --------------------------------------------------------------------------------- RoPE
def rope_qkv_reference(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rotated: int
) -> torch.Tensor:
    """``qkv`` (B, T, heads, head_dim) with its first ``n_rotated`` heads (q and k) rotated by
    :func:`camelid.model.rope.apply_rope` and the rest (v) as they are, in one new tensor."""
    return torch.cat((apply_rope(qkv[:, :, :n_rotated], cos, sin), qkv[:, :, n_rotated:]), 2)


class _RopeQKV(torch.autograd.Function):
    """:func:`rope_qkv_reference` writing straight into one output and saving nothing but
    cos and sin: its backward is the inverse rotation. q, k and v then live in one tensor that
    attention saves, and the projection's output is freed (plain autograd keeps it alive
    through v, beside the rotated copy of q and k)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_rotated):
        out = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        x1, x2 = qkv[:, :, :n_rotated].chunk(2, dim=-1)
        o1, o2 = out[:, :, :n_rotated].chunk(2, dim=-1)
        torch.mul(x1, cos, out=o1).sub_(x2 * sin)  # apply_rope's x1 * cos - x2 * sin
        torch.mul(x2, cos, out=o2).add_(x1 * sin)  # and x2 * cos + x1 * sin
        out[:, :, n_rotated:] = qkv[:, :, n_rotated:]
        ctx.save_for_backward(cos, sin)
        ctx.n_rotated = n_rotated
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        n = ctx.n_rotated
        grad_qkv = torch.empty_like(grad, memory_format=torch.contiguous_format)
        g1, g2 = grad[:, :, :n].chunk(2, dim=-1)
        d1, d2 = grad_qkv[:, :, :n].chunk(2, dim=-1)
        torch.mul(g1, cos, out=d1).add_(g2 * sin)
        torch.mul(g2, cos, out=d2).sub_(g1 * sin)
        grad_qkv[:, :, n:] = grad[:, :, n:]
        return grad_qkv, None, None, None


def rope_qkv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rotated: int
) -> torch.Tensor:
    """:func:`rope_qkv_reference`; in eager training it saves no activation at all."""
    if lean_autograd(qkv) and not (cos.requires_grad or sin.requires_grad):
        return _RopeQKV.apply(qkv, cos, sin, n_rotated)
    return rope_qkv_reference(qkv, cos, sin, n_rotated)
