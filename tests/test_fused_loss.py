"""The fused head + cross-entropy used for training: same loss and gradients as the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camelid import ModelConfig, Transformer
from camelid.loss import IGNORE_INDEX, cross_entropy, linear_cross_entropy, next_token_loss


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_matches_loss_of_logits(tie):
    """``next_token_loss(model, x, y)`` gives the loss and every gradient of the cross-entropy
    of the logits, with ignored targets (fp64, so that any difference is an error, not rounding)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", tie_embeddings=tie)).double()
    x, y = torch.randint(0, 512, (3, 37)), torch.randint(0, 512, (3, 37))
    y[0, :5] = IGNORE_INDEX

    expected_loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    expected_loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = next_token_loss(model, x, y)
    loss.backward()
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected_loss.item()) < 1e-12
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-12, msg=n)


def test_linear_cross_entropy_gradcheck_and_chunks():
    torch.manual_seed(0)
    h = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (13,))
    t[3] = IGNORE_INDEX
    expected = F.cross_entropy(F.linear(h, w), t)
    expected.backward()
    expected_grads = h.grad.clone(), w.grad.clone()
    for chunk_bytes in (4 * 11, 4 * 11 * 4, 1 << 20):  # 1 row, 4 rows (ragged), all rows
        h.grad = w.grad = None
        loss = linear_cross_entropy(h, w, t, chunk_bytes)
        assert abs(loss.item() - expected.item()) < 1e-12
        (2.5 * loss).backward()  # the backward's scaling too
        for got, want in zip((h.grad, w.grad), expected_grads, strict=True):
            torch.testing.assert_close(got, 2.5 * want, rtol=1e-12, atol=1e-14)
    # (No gradcheck: its checks run backward twice through one graph, which this head, handing
    # its gradient buffers over, refuses; the fp64 comparison above is tighter anyway.)


def test_linear_cross_entropy_backward_runs_once():
    """The weight's .grad is the very buffer the forward filled (handed over, not copied), so
    a second backward through the same graph is refused."""
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(7, 4, requires_grad=True)
    nats = linear_cross_entropy(h, w, torch.randint(0, 7, (5,)))
    buffer = nats.grad_fn.grads[1].data_ptr()
    loss = 3 * nats
    loss.backward(retain_graph=True)
    assert w.grad.data_ptr() == buffer
    with pytest.raises(RuntimeError, match="ran twice"):
        loss.backward()


def test_fused_loss_without_grad_and_fp32():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        loss = next_token_loss(model, x, y)
        expected = cross_entropy(model(x), y)
    assert loss.dtype == torch.float32 and not loss.requires_grad
    assert abs(loss.item() - expected.item()) < 1e-5


@pytest.mark.parametrize("frozen", ["weight", "h"])
def test_linear_cross_entropy_frozen_side_gets_no_gradient(frozen):
    """A frozen head (LoRA) gets no weight gradient, and the hidden state's gradient is still
    exact (and the other way round)."""
    torch.manual_seed(0)
    h = torch.randn(13, 8, dtype=torch.float64, requires_grad=frozen != "h")
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=frozen != "weight")
    t = torch.randint(0, 11, (13,))
    t[3] = IGNORE_INDEX
    F.cross_entropy(F.linear(h, w), t).backward()
    live = w if frozen == "h" else h
    expected = live.grad.clone()
    live.grad = None
    linear_cross_entropy(h, w, t, 4 * 11 * 4).backward()
    torch.testing.assert_close(live.grad, expected, rtol=1e-12, atol=1e-14)
    assert (h if frozen == "h" else w).grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_skips_masked_rows(reduction):
    """Masked rows get no logits at all (nan in them changes nothing) and an exactly zero
    gradient; the kept rows' loss and gradients are those of the plain form."""
    torch.manual_seed(0)
    h = torch.randn(40, 8, dtype=torch.float64)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (40,))
    t[::3] = IGNORE_INDEX
    keep = t != IGNORE_INDEX
    expected = F.cross_entropy(F.linear(h[keep], w), t[keep], reduction=reduction)
    expected.backward()
    expected_w = w.grad.clone()
    w.grad = None
    h_nan = h.clone()
    h_nan[~keep] = float("nan")
    h_nan.requires_grad_(True)
    loss = linear_cross_entropy(h_nan, w, t, chunk_bytes=4 * 11 * 5, reduction=reduction)
    loss.backward()
    assert abs(loss.item() - expected.item()) < 1e-12
    torch.testing.assert_close(w.grad, expected_w, rtol=1e-12, atol=1e-13)
    assert torch.equal(h_nan.grad[~keep], torch.zeros_like(h_nan.grad[~keep]))
    assert torch.isfinite(h_nan.grad).all()
    # Every target masked: the mean is nan, the sum 0, as F.cross_entropy's.
    none = torch.full((40,), IGNORE_INDEX)
    plain = F.cross_entropy(F.linear(h, w), none, ignore_index=IGNORE_INDEX, reduction=reduction)
    fused = linear_cross_entropy(h, w, none, reduction=reduction)
    assert torch.equal(fused.isnan(), plain.isnan()) and (plain.isnan() or fused == plain)
