"""The lean training ops (camelid.model.ops): the same values as the plain ops, the same
gradients, and less saved for backward; the fused LoRA forward equal to one adapter at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import camelid.model.ops as ops
from camelid import ModelConfig, Transformer
from camelid.loss import IGNORE_INDEX, next_token_loss
from camelid.model.lora import LoraConfig, apply_lora, lora_parameters
from camelid.model.rope import apply_rope

F64 = torch.float64


def grads_of(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn's output and the gradients of a fixed random projection of it w.r.t. the inputs."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    weight = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in inputs if t.requires_grad]


def assert_same(lean_fn, plain_fn, inputs, tol):
    """Outputs bit-identical, gradients within tol, and each lean op really used."""
    out, grads = grads_of(lean_fn, *inputs)
    ref, ref_grads = grads_of(plain_fn, *inputs)
    assert torch.equal(out, ref)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (F64, 1e-12)])
def test_swiglu_equals_plain(dtype, tol):
    torch.manual_seed(0)
    a = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    b = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    assert_same(ops.swiglu, ops.swiglu_reference, (a, b), tol)
    assert "_SwiGLU" in type(ops.swiglu(a, b).grad_fn).__name__
    assert torch.autograd.gradcheck(ops.swiglu, (a.double(), b.double()))
    frozen_b = b.detach()  # only one side needs a gradient
    assert_same(ops.swiglu, ops.swiglu_reference, (a, frozen_b), tol)


# The norm runs in fp32 whatever the input's dtype (both forms): fp32 rounding in fp64 too.
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (F64, 1e-6)])
@pytest.mark.parametrize("frozen_weight", [False, True])
def test_rms_norm_equals_plain(dtype, tol, frozen_weight):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 24, dtype=dtype, requires_grad=True) * 3
    w = (1 + 0.1 * torch.randn(24, dtype=dtype)).requires_grad_(not frozen_weight)
    lean = lambda x, w: ops.rms_norm(x, w, 1e-5)  # noqa: E731
    plain = lambda x, w: ops.rms_norm_reference(x, w, 1e-5)  # noqa: E731
    assert_same(lean, plain, (x, w), tol)
    assert "_RMSNorm" in type(lean(x, w).grad_fn).__name__
    # (No gradcheck: the norm runs in fp32 whatever the input's dtype, as the plain one does.)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (F64, 1e-12)])
def test_rope_qkv_equals_plain(dtype, tol):
    torch.manual_seed(0)
    H, K, D, T = 4, 2, 8, 6
    qkv = torch.randn(2, T, H + 2 * K, D, dtype=dtype, requires_grad=True)
    angles = torch.arange(T, dtype=dtype)[:, None] * torch.rand(D // 2, dtype=dtype)
    cos, sin = angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)

    def plain(qkv):  # what attention computed before: rope on q and k, v a view
        return torch.cat((apply_rope(qkv[:, :, : H + K], cos, sin), qkv[:, :, H + K :]), 2)

    assert_same(lambda t: ops.rope_qkv(t, cos, sin, H + K), plain, (qkv,), tol)
    assert torch.autograd.gradcheck(
        lambda t: ops.rope_qkv(t, cos.double(), sin.double(), H + K),
        (qkv.detach().double().requires_grad_(),),
    )


def test_recompute_saved_rebuilds_what_backward_reads():
    """The output of the block's first op is not kept: backward rebuilds it (once per saved
    view) and the gradients are those of plain autograd."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=F64, requires_grad=True)
    w = torch.randn(5, 8, dtype=F64, requires_grad=True)
    rebuilt = []

    def rebuild(x):
        rebuilt.append(1)
        return torch.tanh(x)

    def lean(x, w):
        p = torch.tanh(x)
        with ops.recompute_saved(p, lambda: rebuild(x)):
            return F.linear(p, w)  # saves p for w's gradient

    assert_same(lean, lambda x, w: F.linear(torch.tanh(x), w), (x, w), 1e-12)
    assert rebuilt == [1]
    # Nested: inside the inner block the outer block's tensor is still rebuilt, not kept.
    rebuilt.clear()

    def nested(x, w):
        p = torch.tanh(x)
        with ops.recompute_saved(p, lambda: rebuild(x)):
            q = torch.sigmoid(p)  # saves its own output, kept
            with ops.recompute_saved(q, lambda: torch.sigmoid(rebuild(x))):
                return F.linear(q, w) * F.linear(p, w)

    plain_nested = lambda x, w: F.linear(x.tanh().sigmoid(), w) * F.linear(x.tanh(), w)  # noqa: E731
    assert_same(nested, plain_nested, (x, w), 1e-12)
    assert len(rebuilt) == 2  # q for the first linear, p (the outer block's) for the second
    # Under someone else's saved-tensor hooks (activation checkpointing) it stands aside.
    rebuilt.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        lean(x, w).sum().backward()
    assert rebuilt == []
    # Without gradients it does nothing at all.
    with torch.no_grad():
        lean(x, w)
    assert rebuilt == []


def saved_bytes(loss: torch.Tensor, model: torch.nn.Module) -> int:
    """Bytes of the distinct storages that the autograd graph of ``loss`` holds, the model's
    parameters excluded. Read as packed (``SavedTensor.data``): a recipe counts as nothing."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total, stack, visited = set(params), 0, [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        stack.extend(n for n, _ in node.next_functions)
        for name in dir(node):
            if not name.startswith("_raw_saved_"):
                continue
            raw = getattr(node, name)
            for saved in raw if isinstance(raw, list | tuple) else [raw]:
                t = saved.data if isinstance(saved, torch._C._autograd.SavedTensor) else None
                if isinstance(t, torch.Tensor):
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in seen:
                        seen.add(ptr)
                        total += t.untyped_storage().nbytes()
    return total


def model_step(lean: bool, lora: bool, monkeypatch) -> tuple[torch.Tensor, dict, torch.Tensor]:
    if not lean:
        monkeypatch.setattr(ops, "lean_autograd", lambda *t: False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).double()
    if lora:
        model = apply_lora(
            model,
            LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj", "down_proj")),
            generator=torch.Generator().manual_seed(0),
        )
        with torch.no_grad():  # B = 0 would hide mistakes in the adapters' path
            for p in lora_parameters(model):
                p.normal_(0, 0.05)
    x = torch.randint(0, 512, (2, 24))
    y = torch.randint(0, 512, (2, 24))
    y[:, :9] = IGNORE_INDEX
    loss = next_token_loss(model, x, y)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logits = model(x)
    monkeypatch.undo()
    return loss.detach(), grads, logits


@pytest.mark.parametrize("lora", [False, True])
def test_model_lean_training_equals_plain(lora, monkeypatch):
    """A whole model's loss and every gradient: the lean ops change no result (fp64, but the
    norms run in fp32 in both forms, hence 1e-6)."""
    loss, grads, logits = model_step(True, lora, monkeypatch)
    ref_loss, ref_grads, ref_logits = model_step(False, lora, monkeypatch)
    assert torch.equal(logits, ref_logits)
    assert loss.item() == ref_loss.item()
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-6, atol=1e-8, msg=name)


def test_lean_forward_saves_less(monkeypatch):
    """What one training forward keeps for backward, measured on the graph: the lean ops save
    over a quarter less than plain autograd on the tiny model (dim 64, ffn 192)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    x = torch.randint(0, 512, (2, 64))
    counts = {}
    for lean in (True, False):
        if not lean:
            monkeypatch.setattr(ops, "lean_autograd", lambda *t: False)
        counts[lean] = saved_bytes(model(x).sum(), model)
    assert 0 < counts[True] < 0.75 * counts[False], counts
