"""Logit parity with Hugging Face `transformers` in both directions (fp32, max abs < 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_model, save_hf, to_v4_config

import camelid

TOL = 1e-4

CONFIGS = {
    "gqa-untied-llama3": {},
    "mha-tied-no-scaling": dict(
        num_key_value_heads=6, tie_word_embeddings=True, rope_scaling=None, rope_theta=10000.0
    ),
    "gqa-tied-llama3-head-dim": dict(
        hidden_size=80, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        tie_word_embeddings=True, vocab_size=263,
    ),
    "mqa-biases-llama1": dict(
        num_key_value_heads=1, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-6,
        rope_scaling=None, rope_theta=10000.0, num_hidden_layers=3,
    ),
}  # fmt: skip


def _tokens(vocab: int, batch: int = 2, seq: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_to_camelid(tmp_path, name):
    hf = hf_model(**CONFIGS[name])
    model = camelid.load(save_hf(hf, tmp_path / "hf")).eval()
    x = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(x).logits
        assert _max_diff(model(x), expected) < TOL
        # The training path (autograd on) must give the same logits as the inference path.
        with torch.enable_grad():
            assert _max_diff(model(x).detach(), expected) < TOL
    assert model.config.tie_embeddings == hf.config.tie_word_embeddings
    if model.config.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("name", list(CONFIGS))
def test_camelid_to_hf(tmp_path, name):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    model = camelid.load(save_hf(hf_model(seed=3, **CONFIGS[name]), tmp_path / "hf"))
    camelid.save(model, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    x = _tokens(model.config.vocab_size)
    with torch.no_grad():
        assert _max_diff(hf.eval()(x).logits, model.eval()(x)) < TOL


@pytest.mark.parametrize("name", ["gqa-untied-llama3", "gqa-tied-llama3-head-dim"])
def test_transformers_4x_config_style(tmp_path, name):
    hf = hf_model(**CONFIGS[name])
    path = save_hf(hf, tmp_path / "hf")
    to_v4_config(path)
    cfg = json.loads((path / "config.json").read_text())
    assert "rope_parameters" not in cfg and "rope_theta" in cfg
    model = camelid.load(path)
    x = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        assert _max_diff(model(x), hf(x).logits) < TOL


def test_sharded_both_ways(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    hf = hf_model()
    path = save_hf(hf, tmp_path / "hf", max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").exists()
    model = camelid.load(path)
    x = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(x).logits
        assert _max_diff(model(x), expected) < TOL

    out = tmp_path / "out"
    camelid.save(model, out, max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    back = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        assert _max_diff(back(x).logits, expected) < TOL

    # Saving again unsharded into the same directory removes the stale shards and index.
    camelid.save(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert _max_diff(camelid.load(out)(x), expected) < TOL


def test_positions_match_hf_position_ids(tiny_checkpoint):
    """input_pos shifts RoPE exactly as HF's position_ids do (the hook for KV-cache decoding)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    model = camelid.load(tiny_checkpoint).eval()
    x = _tokens(hf.config.vocab_size, seq=40)
    pos = torch.arange(70, 110)
    with torch.no_grad():
        expected = hf(x, position_ids=pos.expand(2, -1)).logits
        assert _max_diff(model(x, input_pos=pos), expected) < TOL
        assert _max_diff(model(x, input_pos=pos.expand(2, -1)), expected) < TOL


def test_bfloat16_cpu(tmp_path):
    """bf16 weights load as bf16 on request, run, and stay close to HF's bf16 eager forward."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    path = save_hf(hf_model(dtype=torch.bfloat16), tmp_path / "hf")
    assert camelid.load(path).tok_embeddings.weight.dtype == torch.float32  # CPU default
    model = camelid.load(path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    x = _tokens(301, seq=32)
    with torch.no_grad():
        ours, ref = model(x), hf(x).logits
    assert ours.dtype == torch.bfloat16
    assert _max_diff(ours, ref) < 0.1  # bf16 rounding; fp32 parity is the exact check above
    camelid.save(model, tmp_path / "bf16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    # Saved as bf16, not upcast: the same size as the bf16 source, give or take the header.
    saved, source = (p / "model.safetensors" for p in (tmp_path / "bf16", path))
    assert abs(saved.stat().st_size - source.stat().st_size) < 4096


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_hf_eager(tmp_path, dtype):
    """On a GPU: fp32 within 1e-4; bf16 against HF eager (fp32 softmax), the exact bf16 oracle."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    path = save_hf(hf_model(**CONFIGS["gqa-untied-llama3"]), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    hf = hf.cuda().eval()
    model = camelid.load(path, device="cuda", dtype=dtype).eval()
    x = _tokens(301).cuda()
    with torch.no_grad():
        diff = _max_diff(model(x), hf(x).logits)
    print(f"cuda {dtype}: max |logit diff| {diff:.3g}")
    assert diff < (TOL if dtype == torch.float32 else 0.1)
