"""Q8_0 decoding: llama.cpp's block-wise int8 (a fp16 scale per 32 inputs) in the engine.

The layer holds exactly the bytes of a Q8_0 GGUF file of the same weights; the engine's
logits equal a plain fp32 model whose weights are the dequantised values, within fp32
rounding, through the kernel, the compiled fallback and the dequantising path alike.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import camelid
from camelid import RequestError
from camelid.config import ModelConfig
from camelid.infer import kernels as kernel
from camelid.infer.linear import (
    Int8Linear,
    Q8_0Linear,
    RowDotLinear,
    decode_bytes,
    decode_copy,
    quantize_int8,
)
from camelid.tokenizer import train_tokenizer
from camelid.weights import gguf
from camelid.weights.gguf import dequantize_q8_0, q8_0_parts, quantize_q8_0

CORPUS = [
    "def add(a, b):\n    return a + b\n# the quick brown fox " * 4 + f"{i}" for i in range(80)
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 700, num_special=16)


@pytest.fixture(scope="module")
def model(tok):
    """A tiny Llama whose ffn input (96) is a multiple of 32, and a head of the vocabulary."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, dim=64, ffn_hidden_dim=96)
    return camelid.Transformer(cfg).eval()


def dequantized_twin(model: nn.Module, q8: nn.Module) -> nn.Module:
    """A plain fp32 copy of ``model`` whose linear weights are ``q8``'s dequantised values."""
    twin = copy.deepcopy(model)
    layers = dict(q8.named_modules())
    with torch.no_grad():
        for name, mod in twin.named_modules():
            if isinstance(layers.get(name), Q8_0Linear):
                mod.weight.copy_(layers[name].dequantized())
    return twin


def test_q8_0_layer_is_the_file_bytes():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.05
    raw = quantize_q8_0(w)
    deq = dequantize_q8_0(raw, 96)  # what a Q8_0 file loads as
    assert torch.equal(quantize_q8_0(deq), raw)  # re-quantised: the file's bytes again
    lin = nn.Linear(96, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(deq)
    layer = Q8_0Linear(lin)
    q, scale = q8_0_parts(raw, 96)
    assert layer.q.dtype == torch.int8 and layer.scale.dtype == torch.float16
    assert torch.equal(layer.q, q) and torch.equal(layer.scale.float(), scale)
    assert torch.equal(layer.dequantized(), deq)
    with pytest.raises(ValueError, match="multiple of 32"):
        Q8_0Linear(nn.Linear(40, 8))


def test_q8_0_gguf_roundtrip_bytes(tmp_path, tok, model):
    """A model loaded from a Q8_0 GGUF decodes from exactly the file's blocks."""
    path = tmp_path / "m.gguf"
    gguf.save(model, tok, path, "q8_0", check=False, progress=False)
    loaded = gguf.load(path, progress=False)
    q8 = decode_copy(loaded, int8="q8_0")
    reader = gguf._reader(path)
    raw = {t.name: torch.from_numpy(np.array(t.data)).view(torch.uint8) for t in reader.tensors}
    w2 = q8.layers[0].feed_forward.w2  # ffn_down: no RoPE row reordering
    assert isinstance(w2, Q8_0Linear)
    blocks = raw["blk.0.ffn_down.weight"].reshape(w2.out_features, -1)
    q, scale = q8_0_parts(blocks, w2.in_features)
    assert torch.equal(w2.q, q) and torch.equal(w2.scale.float(), scale)
    head = raw["output.weight"].reshape(q8.output.out_features, -1)
    assert torch.equal(q8_0_parts(head, q8.output.in_features)[0], q8.output.q)


@pytest.mark.parametrize("rows", [1, 3, kernel.MAX_ROWS, kernel.MAX_ROWS + 1, 20])
def test_q8_0_linear_matches_dequantized(rows):
    torch.manual_seed(rows)
    lin = nn.Linear(128, 40, bias=True)
    layer = Q8_0Linear(lin)
    x = torch.randn(rows, 128)
    with torch.inference_mode():
        want = x.double() @ layer.dequantized().double().T + lin.bias.double()
        got = layer(x)
        if rows > 1:
            assert torch.allclose(layer(x.view(1, rows, 128))[0], got, atol=1e-6)
    assert got.shape == (rows, 40)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not kernel.available(), reason="no AVX2/FMA/F16C CPU or C compiler")
def test_q8_0_kernel_exact_to_fp32_rounding():
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (300, 256), dtype=torch.int8)
    scale = (torch.rand(300, 8) * 0.01).half()
    x = torch.randn(kernel.MAX_ROWS, 256)
    w = (q.view(300, 8, 32).double() * scale.double().unsqueeze(-1)).view(300, 256)
    want = x.double() @ w.T
    got = kernel.q8_0_matvec(x, q, scale)
    assert got.dtype == torch.float32 and got.shape == (kernel.MAX_ROWS, 300)
    assert ((got.double() - want).abs().max() / want.abs().max()) < 1e-6
    with pytest.raises(ValueError, match="at most"):
        kernel.q8_0_matvec(torch.randn(kernel.MAX_ROWS + 1, 256), q, scale)


@pytest.mark.skipif(not kernel.available(), reason="no AVX2/FMA/F16C CPU or C compiler")
def test_f32_kernel_in_the_compiled_row_dot_layer():
    """The compiled batch-1 fp32 layer takes the streaming kernel: ``F.linear`` up to fp32
    summation order; rows that are not a multiple of 32 long keep the row-dot form."""
    torch.manual_seed(0)
    for cols in (96, 40):
        layer = decode_copy(nn.Sequential(nn.Linear(cols, 72)))[0]
        assert isinstance(layer, RowDotLinear)
        x = torch.randn(1, 1, cols)
        with torch.inference_mode():
            assert kernel.takes_f32(x, layer.weight) == (cols % 32 == 0)
            got = torch.compile(layer, fullgraph=True)(x)
            want = x.double() @ layer.weight.double().T + layer.bias.double()
        assert torch.allclose(got.double(), want, atol=1e-5)
    w = torch.randn(50, 64)
    x = torch.randn(64)
    assert torch.allclose(kernel.f32_matvec(x, w).double(), w.double() @ x.double(), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 32"):
        kernel.f32_matvec(torch.randn(40), torch.randn(8, 40))


def test_q8_0_compiled_fallback_without_kernel():
    """Without the kernel, one compiled row takes the block row-dot form: the same numbers."""
    torch.manual_seed(0)
    layer = Q8_0Linear(nn.Linear(64, 24, bias=False))
    layer.kernel = False
    x = torch.randn(1, 64)
    with torch.inference_mode():
        got = torch.compile(layer, fullgraph=True)(x)
        want = x.double() @ layer.dequantized().double().T
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_q8_0_decode_copy_layers(model):
    q8 = quantize_int8(model, "q8_0")
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, Q8_0Linear) for m in q8.modules()) == n_linear
    assert not any(isinstance(m, Int8Linear) for m in q8.modules())
    assert isinstance(quantize_int8(model).output, Int8Linear)  # the default stays per row
    assert isinstance(decode_copy(model, int8="row").output, Int8Linear)
    # Q8_0 bytes: 34 per 32 weights of every linear layer, norms in fp32.
    q8_bytes = sum(m.q.numel() * 34 // 32 for m in q8.modules() if isinstance(m, Q8_0Linear))
    norms = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    assert decode_bytes(q8) == q8_bytes + norms
    # An input size that is not a multiple of 32 stays in fp32 (llama.cpp keeps it F16).
    odd = nn.Sequential(nn.Linear(40, 8), nn.Linear(64, 8))
    copied = decode_copy(odd, int8="q8_0")
    assert isinstance(copied[0], RowDotLinear) and isinstance(copied[1], Q8_0Linear)
    with pytest.raises(ValueError, match="q4"):
        decode_copy(odd, int8="q4")


def test_q8_0_engine_equals_dequantized_fp32(model, tok):
    """Eager and compiled Q8_0 engines decode as an fp32 model of the dequantised weights."""
    e8 = camelid.Engine(model, tok, int8="q8_0", max_batch_size=2)
    assert e8.int8 == "q8_0"
    twin = dequantized_twin(model, e8.model)
    ref = camelid.Engine(twin, tok, max_batch_size=2)
    ids = tok.encode(CORPUS[3][:60], bos=True)
    tokens = torch.tensor([ids])
    assert torch.allclose(e8.logits(tokens), ref.logits(tokens), atol=1e-5)
    opts = dict(max_new_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    want = ref.generate(ids, **opts)
    for engine in (e8, camelid.Engine(model, tok, int8="q8_0", compile=True, max_batch_size=1)):
        got = engine.generate(ids, **opts)
        assert got.token_ids == want.token_ids
        lp = torch.tensor([t.logprob for t in got.logprobs])
        assert torch.allclose(lp, torch.tensor([t.logprob for t in want.logprobs]), atol=1e-4)
    # Two prompts decode together through the kernel's multi-row path, as each alone.
    pair = e8.generate([ids, ids[:20]], max_new_tokens=8, temperature=0, ignore_eos=True)
    alone = e8.generate(ids[:20], max_new_tokens=8, temperature=0, ignore_eos=True)
    assert pair[0].token_ids == want.token_ids[:8] and pair[1].token_ids == alone.token_ids


def test_engine_int8_choices(model, tok):
    assert camelid.Engine(model, tok, int8=True).int8 == "row"
    assert camelid.Engine(model, tok, int8="row").int8 == "row"
    assert camelid.Engine(model, tok).int8 is None
    with pytest.raises(RequestError, match="'q8_0'"):
        camelid.Engine(model, tok, int8="q4_0")
