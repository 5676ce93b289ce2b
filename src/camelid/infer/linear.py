"""Linear layers for decoding: oneDNN's CPU matmul, a row-dot form of the matrix-vector
product, and int8 weights.

On x86 CPUs PyTorch's ``F.linear`` goes to MKL, which runs the products of a decode step (a few
to a few dozen rows times a Llama-shaped weight) well below the machine's matmul peak: about
half of it at 32 rows, a third for the 32000-wide output projection (docs/benchmarks.md).
oneDNN's inner product, called on the model's own weight (no copy, no repacking), runs the same
products near the peak, so CPU fp32 inference takes it throughout (a whole batch-1 decode step
is faster with it too).

Decoding one token multiplies a single row by every weight matrix, so it is bound by how fast
the weights stream from memory. On CPUs the BLAS matrix-vector path streams Llama-shaped
matrices (short rows) at a third of the machine's read bandwidth; written as
``(weight * x).sum(-1)`` and compiled, it becomes one vectorised pass over the weight that runs
near the bandwidth (see docs/benchmarks.md); on AVX2 CPUs the streaming kernel of
:mod:`camelid.infer.kernels` (software prefetch) runs closer still, and takes its place.
Int8 weights read a quarter of the bytes, in one of two forms (``decode_copy(int8=...)``):
``"row"``, one fp32 scale per output row (symmetric, weight-only), or ``"q8_0"``, llama.cpp's
Q8_0: one fp16 scale per block of 32 inputs, the very values and scales a Q8_0 GGUF file holds
(:class:`Q8_0Linear`).

The row-dot form only pays off inside ``torch.compile`` (eager would materialise the product),
so it is taken only while compiling. The engine swaps these layers in on a structural copy of
the model that shares its parameters; training never sees them.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from camelid.infer import kernels

# Compiled, a single row takes the fused row-dot form. From two rows up the compiler's code for
# it ran far slower than oneDNN (a llama-125m step at two rows: 180 ms against 34 ms).
SMALL_BATCH = 1


def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN = _onednn()


@torch.library.custom_op("camelid::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` by oneDNN's inner product, on the plain (out, in) weight. An opaque op so
    that a compiled graph calls it as is (the compiler's own lowering expects packed weights)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def takes_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` sends this product to oneDNN: CPU, fp32 (oneDNN has no bf16
    inner product on CPUs without bf16 instructions), no autograd (it has no backward) and no
    autocast (which would have ``F.linear`` compute in another dtype)."""
    return (
        ONEDNN
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, by oneDNN where :func:`takes_onednn` says it is quicker."""
    if not takes_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return onednn_linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # no op overhead


def _rows(x: torch.Tensor) -> int:
    return x.shape[:-1].numel()


def _row_dot(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a few rows as one fused multiply-and-sum. The product is laid out
    (out, rows), so each weight row is read once and serves every input row from cache."""
    rows = _rows(x)
    y = (weight.unsqueeze(1) * x.reshape(1, rows, -1)).sum(-1)
    return (y.view(-1) if rows == 1 else y.t()).reshape(*x.shape[:-1], -1)


class DecodeLinear(nn.Linear):
    """``nn.Linear`` for inference: :func:`linear` (oneDNN on CPU fp32), and, with
    ``row_dot`` and when compiled, for ``SMALL_BATCH`` row(s) the fp32 streaming kernel of
    :mod:`camelid.infer.kernels` where it runs, else the fused multiply-and-sum (eager keeps
    the library call: the sum would materialise the product)."""

    row_dot = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_dot and _rows(x) <= SMALL_BATCH and torch.compiler.is_compiling():
            if kernels.takes_f32(x, self.weight):  # the streaming kernel: ~1.4x the row-dot
                y = kernels.f32_matvec(x, self.weight)
            else:
                y = _row_dot(self.weight, x)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)


class RowDotLinear(DecodeLinear):
    """A :class:`DecodeLinear` that takes the row-dot form when compiled."""

    row_dot = True


class Int8Linear(nn.Module):
    """Weight-only int8 linear: ``q`` (out, in) int8 and one scale per output row, with
    ``weight ≈ q * scale[:, None]`` (symmetric, round to nearest).

    Compiled, ``SMALL_BATCH`` row(s) are computed from the int8 weight directly, converting
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
            y = linear(x, self.q.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Q8_0Linear(nn.Module):
    """Weight-only int8 linear in llama.cpp's Q8_0 form: ``q`` (out, in) int8 and ``scale``
    (out, in / 32) fp16, one scale per block of 32 inputs, ``weight == q * scale`` block-wise.

    Built by :func:`camelid.weights.gguf.quantize_q8_0`, so the layer holds exactly the bytes
    a Q8_0 GGUF file of the same weights holds; a model loaded from such a file (whose fp32
    weights are ``q * scale``) gets its file's bytes back. ``in_features`` must be a multiple
    of 32.

    Up to :data:`camelid.infer.kernels.MAX_ROWS` fp32 rows on a CPU with the Q8_0 kernel
    (AVX2/FMA/F16C), compiled or eager, multiply the int8 weight directly, reading it once
    (:mod:`camelid.infer.kernels`); without the kernel, one row inside ``torch.compile`` takes the
    block row-dot form (about 10x slower on AVX2). Everything else (prefill, larger batches,
    eager without the kernel, other dtypes) dequantises the weight per call and runs one
    matmul: no dequantised copy is kept, so memory stays at 34/32 bytes per weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from camelid.weights.gguf import Q8_BLOCK, q8_0_parts, quantize_q8_0

        out, cols = linear.weight.shape
        if cols % Q8_BLOCK:
            raise ValueError(f"Q8_0 needs rows of a multiple of {Q8_BLOCK} inputs, got {cols}")
        q, scale = q8_0_parts(quantize_q8_0(linear.weight), cols)
        device = linear.weight.device
        self.register_buffer("q", q.to(device))
        self.register_buffer("scale", scale.to(device, torch.float16))  # exact: fp16 in the file
        self.bias = linear.bias
        self.in_features, self.out_features = cols, out
        self.kernel = device.type == "cpu" and kernels.available()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``q * scale`` (out, in) in ``dtype`` (exact in fp32)."""
        blocks = self.q.view(self.out_features, -1, 32).to(dtype)
        return (blocks * self.scale.to(dtype).unsqueeze(-1)).view(self.out_features, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if (
            self.kernel
            and rows <= kernels.MAX_ROWS
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad)
        ):
            y = kernels.q8_0_matvec(x, self.q, self.scale)
        elif rows <= SMALL_BATCH and torch.compiler.is_compiling():
            blocks = self.q.view(self.out_features, -1, 32)
            part = (blocks * x.reshape(1, -1, 32)).sum(-1)  # (out, blocks)
            y = (part * self.scale.to(x.dtype)).sum(-1).reshape(*x.shape[:-1], -1)
        else:
            y = linear(x, self.dequantized(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, q8_0"


INT8_FORMS = ("row", "q8_0")


def int8_form(int8: bool | str) -> str | None:
    """``int8=`` as given to the engine → "row", "q8_0" or None (no int8): ``True`` is "row"."""
    if int8 is True:
        return "row"
    if int8 is False or int8 is None:
        return None
    if int8 not in INT8_FORMS:
        raise ValueError(f"int8={int8!r}: expected True, False, 'row' or 'q8_0'")
    return int8


def copyable(model: nn.Module) -> bool:
    """Whether :func:`decode_copy` can copy ``model``: not sharded (FSDP2's parameters are
    DTensors, which a structural copy would not share) and not compiled."""
    from torch.distributed.tensor import DTensor

    return not any(isinstance(p, DTensor) for p in model.parameters()) and not any(
        isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in model.modules()
    )


def decode_copy(model: nn.Module, int8: bool | str = False, row_dot: bool = True) -> nn.Module:
    """A copy of ``model`` sharing its parameters, with every ``nn.Linear`` replaced by an
    int8 layer (``int8``: ``True``/"row" :class:`Int8Linear`, "q8_0" :class:`Q8_0Linear`), a
    :class:`RowDotLinear` (``row_dot``) or else a :class:`DecodeLinear`. With "q8_0", a layer
    whose input size is not a multiple of 32 stays in the weights' own precision (as llama.cpp
    keeps such a tensor in F16, which fp32 holds exactly). The original model is untouched."""
    form = int8_form(int8)
    if row_dot or form == "q8_0":
        kernels.available()  # build the CPU kernels now, not inside a compiled step's trace
    shared = {id(p): p for p in model.parameters()}
    shared.update({id(b): b for b in model.buffers()})
    clone = copy.deepcopy(model, memo=shared)
    for module in list(clone.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear or name == "router":
                continue  # an MoE router reads its weight itself, in fp32 (model/moe.py)
            if form == "q8_0" and child.in_features % 32 == 0:
                setattr(module, name, Q8_0Linear(child))
            elif form == "row":
                setattr(module, name, Int8Linear(child))
            else:  # same parameters, other forward
                child.__class__ = RowDotLinear if row_dot else DecodeLinear
    return clone


def quantize_int8(model: nn.Module, form: str = "row") -> nn.Module:
    """A copy of ``model`` with int8 weight-only linear layers (embeddings and norms stay as
    they are), ``form`` "row" (one scale per output row) or "q8_0" (llama.cpp's blocks of 32).
    The original model is left untouched."""
    return decode_copy(model, int8=form)


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
