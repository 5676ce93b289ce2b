"""The Transformer itself: shapes, causality, initialisation, dtypes, gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from camelid import ModelConfig, Transformer
from camelid.model.rope import inv_frequencies


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", **overrides))


def test_forward_shape_and_dtype():
    model = _model()
    x = torch.randint(0, 512, (3, 17))
    logits = model(x)
    assert logits.shape == (3, 17, 512) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_causal():
    """Changing a later token never changes the logits of earlier positions."""
    model = _model().eval()
    x = torch.randint(0, 512, (1, 20))
    y = x.clone()
    y[0, 12] = (y[0, 12] + 1) % 512
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_tied_embeddings_share_storage():
    model = _model(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.num_params() == model.config.num_params()


def test_init_scheme():
    config = ModelConfig(vocab_size=1000, dim=256, n_layers=8, n_heads=4, ffn_hidden_dim=512)
    torch.manual_seed(0)
    model = Transformer(config)
    std = lambda t: t.float().std().item()  # noqa: E731
    assert std(model.tok_embeddings.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.layers[0].attention.wqkv.weight) == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / (2 * config.n_layers) ** 0.5
    assert std(model.layers[3].attention.wo.weight) == pytest.approx(residual, rel=0.05)
    assert std(model.layers[3].feed_forward.w2.weight) == pytest.approx(residual, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_backward_gives_finite_grads():
    model = _model()
    x = torch.randint(0, 512, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bfloat16_forward():
    model = _model().to(torch.bfloat16)
    logits = model(torch.randint(0, 512, (1, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_rope_frequencies_stay_fp32_after_cast():
    model = _model().to(torch.bfloat16)
    assert model._inv_freq.dtype == torch.float32


def test_llama3_rope_scaling_bands():
    """High frequencies are kept, low ones divided by the factor, the band between smoothed."""
    base = ModelConfig.from_preset("llama-3.1-8b", rope_scaling=None)
    scaled = ModelConfig.from_preset("llama-3.1-8b")
    f0, f1 = inv_frequencies(base), inv_frequencies(scaled)
    wavelen = 2 * torch.pi / f0
    short, long = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert torch.equal(f1[short], f0[short])
    assert torch.allclose(f1[long], f0[long] / 8)
    mid = ~short & ~long
    assert mid.any() and ((f1[mid] < f0[mid]) & (f1[mid] > f0[mid] / 8)).all()


def test_meta_device_build_then_materialise():
    config = ModelConfig.from_preset("tiny")
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.randint(0, 512, (1, 4)))).all()


def test_explicit_head_dim():
    config = dataclasses.replace(ModelConfig.from_preset("tiny"), head_dim=24)
    model = Transformer(config)
    assert model.layers[0].attention.wqkv.weight.shape == ((4 + 2 * 2) * 24, 64)
    assert model(torch.randint(0, 512, (1, 5))).shape == (1, 5, 512)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_forward_and_compile():
    model = _model().cuda().to(torch.bfloat16).eval()
    x = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert eager.dtype == torch.bfloat16
    assert (eager.float() - compiled.float()).abs().max().item() < 0.1
