"""Llama 4 weights in and out of the Hugging Face format (weights/hf.py): tiny random
``Llama4ForCausalLM`` models saved by transformers load logit-exact in fp32, camelid's saves
load back into transformers, the text part of a ``Llama4ForConditionalGeneration`` loads, and
the digest of a model equals that of its directory."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import camelid_main as main

import camelid
from camelid import CheckpointError, ModelConfig, Transformer
from camelid.weights import hf as hfw
from camelid.weights.digest import directory_digest, model_digest

transformers = pytest.importorskip("transformers")

VOCAB = 300
# (layers, experts, top-k, MoE interleave step, NoPE interval, chunk size, QK-norm). Every case
# is chunked: transformers 5.23 cannot run a Llama 4 whose attention_chunk_size is null.
CASES = {
    "E4-top2-step2-nope2-chunk4-qknorm": (4, 4, 2, 2, 2, 4, True),
    "E2-top1-step1-nope3-chunk16": (3, 2, 1, 1, 3, 16, False),
    "E8-top1-step3-rope-chunk8-qknorm": (3, 8, 1, 3, 4, 8, True),
}


def _hf_config(case: tuple, **extra) -> dict:
    layers, experts, k, step, nope, chunk, qk = case
    return dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=16, intermediate_size_mlp=48,
        num_local_experts=experts, num_experts_per_tok=k, interleave_moe_layer_step=step,
        no_rope_layer_interval=nope, attention_chunk_size=chunk, attn_temperature_tuning=True,
        floor_scale=4, attn_scale=0.5, use_qk_norm=qk, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **extra,
    )  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Experts, router and norms away from their init, so a swapped or skipped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def _hf_llama4(case: tuple, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Llama4TextConfig(**_hf_config(case))
    model = transformers.Llama4ForCausalLM._from_config(config, attn_implementation="eager")
    _randomize(model, seed)
    return model.eval()


def _from_pretrained(path):
    cls = transformers.Llama4ForCausalLM
    return cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_load_matches_hf_logits_and_greedy_decoding(case, tmp_path):
    hf = _hf_llama4(case)
    hf.save_pretrained(tmp_path / "hf")
    model = camelid.load(tmp_path / "hf")
    assert model.config.n_moe_layers == sum(
        (i + 1) % case[3] == 0 for i in range(case[0])
    )  # the config read as it was written
    tokens = _tokens()
    with torch.no_grad():
        ref, ours = hf(tokens).logits, model(tokens)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()

    # Greedy decoding through the engine's KV cache gives HF generate's tokens.
    from camelid.tokenizer import train_tokenizer

    tok = train_tokenizer(["a tiny corpus for a tiny tokenizer"] * 4, VOCAB, 16)
    engine = camelid.Engine(model, tok, stop_token_ids=())
    prompt = tokens[0, :7].tolist()
    out = engine.generate(prompt, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    with torch.no_grad():  # the engine never picks the embedding rows past the tokenizer's ids
        want = hf.generate(
            tokens[:1, :7], max_new_tokens=8, min_new_tokens=8, do_sample=False,
            pad_token_id=0, suppress_tokens=list(range(tok.vocab_size, VOCAB)),
        )[0, 7:].tolist()  # fmt: skip
    assert len(want) == 8 and out.token_ids == want


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_save_loads_in_transformers_and_back(case, tmp_path):
    # camelid -> HF: a model camelid made itself.
    config = ModelConfig.from_hf({"model_type": "llama4_text", **_hf_config(case)})
    torch.manual_seed(3)
    model = Transformer(config).eval()
    _randomize(model, 3)
    camelid.save(model, tmp_path / "ours")
    tokens = _tokens(2)
    hf = _from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        mine, theirs = model(tokens), hf(tokens).logits
        assert torch.allclose(theirs, mine, atol=1e-4, rtol=1e-4)
        back = camelid.load(tmp_path / "ours")
        theirs_state = back.state_dict()
        for name, p in model.state_dict().items():
            assert torch.equal(p, theirs_state[name]), name
    assert model_digest(model) == directory_digest(tmp_path / "ours")

    # HF -> camelid -> HF: transformers' own save, through camelid, gives the same model.
    ref = _hf_llama4(case, seed=4)
    ref.save_pretrained(tmp_path / "theirs")
    loaded = camelid.load(tmp_path / "theirs")
    assert model_digest(loaded) == directory_digest(tmp_path / "theirs")
    camelid.save(loaded, tmp_path / "again")
    with torch.no_grad():
        want = ref(tokens).logits
        got = _from_pretrained(tmp_path / "again")(tokens).logits
    assert torch.equal(got, want)
    assert directory_digest(tmp_path / "again") == directory_digest(tmp_path / "theirs")


def test_bf16_tied_and_sharded(tmp_path):
    """A bf16 checkpoint with a tied head: upcast to fp32 on the CPU by default, kept in bf16
    when asked, and saved again in shards it is the same tensors (the same digest)."""
    case = CASES["E4-top2-step2-nope2-chunk4-qknorm"]
    torch.manual_seed(9)
    config = transformers.Llama4TextConfig(**_hf_config(case, tie_word_embeddings=True))
    hf = transformers.Llama4ForCausalLM._from_config(config, attn_implementation="eager")
    _randomize(hf, 9)
    hf = hf.to(torch.bfloat16).eval()
    hf.save_pretrained(tmp_path / "hf")
    upcast = camelid.load(tmp_path / "hf")
    assert upcast.config.tie_embeddings and upcast.output.weight is upcast.tok_embeddings.weight
    assert upcast.tok_embeddings.weight.dtype == torch.float32
    model = camelid.load(tmp_path / "hf", dtype=torch.bfloat16)
    camelid.save(model, tmp_path / "shards", max_shard_size="40KB")
    index = json.loads((tmp_path / "shards" / hfw.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"]
    assert directory_digest(tmp_path / "shards") == directory_digest(tmp_path / "hf")
    tokens = _tokens(10)
    with torch.no_grad():
        want = upcast(tokens)
        got = _from_pretrained(tmp_path / "shards")(tokens).logits  # upcast by from_pretrained
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_rope_rows_permute_and_back():
    """HF's interleaved q/k rows → camelid's halves and back is the identity, and moves the
    pair (2i, 2i+1) of each head to (i, i + head_dim/2)."""
    piece = hfw.Piece("q", 0, (2 * 8, 3), rope_heads=2)
    w = torch.arange(16 * 3, dtype=torch.float32).view(16, 3)
    ours = hfw.from_hf_rows(w, piece)
    assert torch.equal(hfw.to_hf_rows(ours, piece), w)
    assert torch.equal(ours[8 + 1], w[8 + 2]) and torch.equal(ours[8 + 4 + 1], w[8 + 3])


def test_multimodal_checkpoint_text_part_loads(tmp_path):
    """A tiny ``Llama4ForConditionalGeneration`` saved by transformers: camelid reads its
    text_config and the ``language_model.``-prefixed tensors, and skips the vision tower."""
    case = CASES["E4-top2-step2-nope2-chunk4-qknorm"]
    vision = dict(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
        projector_output_dim=32, pixel_shuffle_ratio=0.5,
    )  # fmt: skip
    torch.manual_seed(5)
    cfg = transformers.Llama4Config(text_config=_hf_config(case), vision_config=vision)
    mm = transformers.Llama4ForConditionalGeneration._from_config(
        cfg, attn_implementation="eager"
    ).eval()
    _randomize(mm, 5)
    mm.save_pretrained(tmp_path / "mm")
    names = hfw._header_names(tmp_path / "mm" / "model.safetensors")
    assert any(n.startswith("vision_model.") for n in names)
    assert "language_model.model.embed_tokens.weight" in names
    model = camelid.load(tmp_path / "mm")
    tokens = _tokens(6)
    with torch.no_grad():
        ref, ours = mm.language_model(tokens).logits, model(tokens)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
    # Saved again, it is the plain text model.
    camelid.save(model, tmp_path / "text")
    assert json.loads((tmp_path / "text" / "config.json").read_text())["architectures"] == [
        "Llama4ForCausalLM"
    ]
    assert model_digest(model) == directory_digest(tmp_path / "text")


def test_convert_inspect_and_digest_a_llama4_directory(tmp_path, capsys):
    case = CASES["E2-top1-step1-nope3-chunk16"]
    hf = _hf_llama4(case, seed=7)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["inspect", str(tmp_path / "hf")]) == 0
    assert "2 x SwiGLU 16" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    tokens = _tokens(8)
    with torch.no_grad():
        want = hf(tokens).logits
        got = _from_pretrained(tmp_path / "out")(tokens).logits
    assert torch.equal(got, want)
    capsys.readouterr()
    assert main(["digest", str(tmp_path / "out")]) == 0
    assert model_digest(camelid.load(tmp_path / "hf")) in capsys.readouterr().out


def test_moe_that_hf_cannot_express_is_refused_by_name(tmp_path):
    config = ModelConfig.from_preset("tiny", n_experts=4, moe_ffn_dim=64, n_shared_experts=1,
                                     router_scoring="softmax")  # fmt: skip
    with pytest.raises(CheckpointError, match="router_scoring 'softmax'"):
        camelid.save(Transformer(config), tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_missing_expert_tensor_is_named(tmp_path):
    hf = _hf_llama4(CASES["E2-top1-step1-nope3-chunk16"])
    hf.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    file = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.feed_forward.experts.down_proj"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor .*layers\.1\.feed_forward"):
        camelid.load(tmp_path / "hf")
