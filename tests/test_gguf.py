"""GGUF out and in, with llama.cpp itself (llama-cpp-python) as the oracle.

llama.cpp loads the files camelid writes and its logits, greedy tokens and tokenisation are
compared with camelid's; files round-trip byte for byte; every bad input ends in one clear
error and writes nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import camelid
from camelid.config import ModelConfig, RopeScaling
from camelid.errors import CheckpointError, TokenizerError
from camelid.model import Transformer
from camelid.tokenizer import Tokenizer, train_tokenizer
from camelid.tokenizer.bpe import LLAMA4_PATTERN, hf_from_ranks, token_to_bytes
from camelid.tokenizer.gguf import CONTROL
from camelid.tokenizer.tokenizer import _HFBackend
from camelid.weights import gguf as G
from tests.conftest import camelid_main

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. It's 2026; numbers 12345 and 3.14.",
    "Über größere Straßen fährt man schneller. Съешь же ещё этих мягких булок.",
    "我能吞下玻璃而不伤身体。私はガラスを食べられます。",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "  indented   text\n\n\nwith\r\nnewlines and 😀 emoji",
    "मैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती.",
] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(TEXTS, 700, num_special=16)


def _model(tok: Tokenizer, seed: int = 0, **kw) -> Transformer:
    """A random model whose logits are far from flat (argmax decisions are not knife-edge)."""
    base = dict(vocab_size=tok.vocab_size, dim=96, n_layers=2, n_heads=6, n_kv_heads=2,
                ffn_hidden_dim=160, max_seq_len=512, rope_theta=500000.0, name="tiny")  # fmt: skip
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**base, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08)
    return model


# Two shapes: GQA with an untied head; and tied, biased, head_dim apart from dim / heads,
# Llama 3.1 RoPE scaling (rope_freqs) with an original context shorter than the prompt, and
# an FFN width that is no multiple of 32 (its Q8_0 rows fall back to F16).
CONFIGS = {
    "gqa": {},
    "tied-bias-scaled": dict(
        tie_embeddings=True,
        attention_bias=True,
        head_dim=24,
        ffn_hidden_dim=203,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=32),
    ),
}


def _llama(path: Path, **kw):
    kw = {
        "n_ctx": 512,
        "n_batch": 512,
        "n_ubatch": 512,
        "n_threads": 2,
        "logits_all": True,
        "type_k": 0,
        "type_v": 0,
        "verbose": False,
        **kw,
    }  # fmt: skip F32 KV cache: exact
    return llama_cpp.Llama(model_path=str(path), **kw)


def _prompt(tok: Tokenizer, n: int) -> list[int]:
    ids = tok.encode("".join(TEXTS), bos=True)
    assert len(ids) >= n
    return ids[:n]


@pytest.mark.parametrize("shape", sorted(CONFIGS))
def test_f32_logits_match_llamacpp_at_every_position(tmp_path, tok, shape):
    model = _model(tok, **CONFIGS[shape])
    path = G.save(model, tok, tmp_path / "m.gguf", "f32").path
    ids = _prompt(tok, 256)
    llm = _llama(path)
    try:
        llm.eval(ids)
        theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    assert ours.abs().max() > 1.0  # logits with something to get wrong
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def _llamacpp_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """llama.cpp's greedy continuation (argmax of its own logits, no sampler) and its logits
    at every position of prompt + continuation."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out, torch.tensor(np.array(llm.scores[: llm.n_tokens]))


def test_q8_0_greedy_matches_camelid_on_the_same_bytes(tmp_path, tok):
    """camelid decodes the file's own Q8_0 blocks. llama.cpp's Q8_0 dot products also quantise
    the activations to Q8_0, camelid keeps them in fp32: the greedy sequences may part, so
    they are compared and the top-1 agreement at every position of llama.cpp's sequence is
    bounded."""
    model = _model(tok)
    path = G.save(model, tok, tmp_path / "q.gguf", "q8_0").path
    same_bytes = G.load(path)  # exactly q * scale: the weights llama.cpp computes with
    prompt = _prompt(tok, 32)
    llm = _llama(path)
    try:
        theirs, their_logits = _llamacpp_greedy(llm, prompt, 64)
    finally:
        llm.close()
    from camelid.infer.load import load_engine

    engine = load_engine(path, int8=True)  # a Q8_0 file: decoded on its own blocks
    assert engine.int8 == "q8_0"
    ours = engine.generate(prompt, max_new_tokens=64, temperature=0, ignore_eos=True).token_ids
    # camelid's int8 path is the dequantised weights' fp32 model, to fp32 rounding
    plain = camelid.Engine(same_bytes, tok)
    exact = plain.generate(prompt, max_new_tokens=64, temperature=0, ignore_eos=True).token_ids
    assert ours == exact
    with torch.no_grad():
        logits = same_bytes(torch.tensor([prompt + theirs]))[0]
    agree = logits.argmax(-1) == their_logits.argmax(-1)
    top1 = agree.float().mean().item()
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), 64)
    err = (logits - their_logits).abs().max(-1).values
    print(f"Q8_0: greedy equal for {same}/64 tokens; top-1 agreement {top1:.4f}; largest logit "
          f"difference {err.max():.4f} of logits up to {logits.abs().max():.2f}")  # fmt: skip
    # bounded: llama.cpp's logits are those of the same weights to within its rounding of the
    # activations (a wrong weight, scale or row order would be off by the logits' own size),
    # so the top-1 disagrees only where two tokens nearly tie
    assert err.max() < 0.05 * logits.abs().max()
    assert top1 >= 0.85


def test_q8_0_bytes_equal_the_gguf_reference_quantiser():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-3, 2, 64)[:, None]
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = torch.arange(32) - 15.5  # values that sit on rounding ties
    w[2, :32] = torch.tensor([127.0, 63.5, -63.5, 0.5, -0.5, 1.5] + [0.0] * 26)
    ours = G.quantize_q8_0(w).numpy()
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    back = G.dequantize_q8_0(torch.from_numpy(ours), 256)
    ref_back = gguf.quants.dequantize(ref, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(back.numpy(), ref_back)
    assert torch.equal(G.quantize_q8_0(back), torch.from_numpy(ours))  # exactly reproduced


@pytest.mark.parametrize("dtype", G.DTYPES)
def test_gguf_camelid_gguf_round_trip_is_byte_identical(tmp_path, tok, dtype):
    model = _model(tok, **CONFIGS["tied-bias-scaled"])
    first = G.save(model, tok, tmp_path / "a.gguf", dtype).path
    back = camelid.load(first)
    back_tok = Tokenizer.load(first)
    assert back_tok.digest == tok.digest  # the very tokenizer, not a look-alike
    assert back.config == model.config and back.config.name == "tiny"
    second = G.save(back, back_tok, tmp_path / "b.gguf", dtype, check=False).path
    assert first.read_bytes() == second.read_bytes()
    if dtype == "f32":  # and the weights are the model's own, exactly
        for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(),
                                     strict=True):  # fmt: skip
            assert torch.equal(a, b), name


def test_file_layout_is_llamacpps_llama(tmp_path, tok):
    model = _model(tok)
    path = G.save(model, tok, tmp_path / "m.gguf", "q8_0").path
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama" and f["general.file_type"] == 7
    assert f["llama.block_count"] == 2 and f["llama.attention.head_count_kv"] == 2
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_id
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert f["tokenizer.ggml.eot_token_id"] == tok.eot_id
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert "<|start_header_id|>" in f["tokenizer.chat_template"]
    types = f["tokenizer.ggml.token_type"]
    assert all(types[i] == CONTROL for i in tok.special_tokens.values())
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    # q rows in Meta's interleaved RoPE order: llama.cpp's permutation of HF's q_proj
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    q = G.dequantize_q8_0(torch.from_numpy(np.array(t.data)), 96)
    hf_q = model.layers[0].attention.wqkv.weight[: 6 * 16]
    meta = hf_q.reshape(6, 2, 8, 96).transpose(1, 2).reshape(96, 96)
    assert torch.equal(q, G.dequantize_q8_0(G.quantize_q8_0(meta), 96))


def test_llamacpp_chat_template_and_end_of_turn(tmp_path, tok):
    """llama.cpp reads the chat template and stops on the end-of-turn token."""
    path = G.save(_model(tok), tok, tmp_path / "m.gguf", "f32").path
    llm = _llama(path)
    try:
        assert llm.metadata["tokenizer.chat_template"] == tok._chat.jinja()
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        for stop in (tok.eot_id, tok.eos_id, tok.special_tokens["<|eom_id|>"]):
            assert llama_cpp.llama_vocab_is_eog(vocab, stop)
        assert not llama_cpp.llama_vocab_is_eog(vocab, tok.special_tokens["<|start_header_id|>"])
        assert llm._model.token_bos() == tok.bos_id and llm._model.add_bos_token()
    finally:
        llm.close()


# --------------------------------------------------------------------------- tokeniser parity
def test_parity_of_a_camelid_trained_tokenizer(tok):
    parity = G.tokenizer_parity(tok)
    assert parity.texts == len(G.PARITY_TEXTS) and parity.first_difference is None


def test_parity_of_metas_llama3_vocabulary():
    llama_models = pytest.importorskip("llama_models")
    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    meta = Tokenizer.load(path)
    assert meta.vocab_size == 128256
    parity = G.tokenizer_parity(meta)
    assert parity.first_difference is None


def test_a_vocabulary_llamacpp_tokenises_otherwise_is_refused(tmp_path, tok):
    """The same ranks under Llama 4's split: llama.cpp's "llama4" pre-tokenizer treats the
    combining marks of Hindi otherwise, so the export is refused, naming the text."""
    spec = tok._backend.to_hf()
    named = set(tok.special_tokens)
    ranks = {token_to_bytes(t): i for t, i in spec.get_vocab().items() if t not in named}
    specials = sorted(tok.special_tokens, key=tok.special_tokens.__getitem__)
    odd = Tokenizer(_HFBackend(hf_from_ranks(ranks, specials, LLAMA4_PATTERN)), "odd")
    model = _model(odd)
    out = tmp_path / "odd.gguf"
    with pytest.raises(TokenizerError, match=r"llama\.cpp tokenises differently") as e:
        G.save(model, odd, out, "f32")
    assert "First differing text" in str(e.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------- bad input
def _rewrite(src: Path, dst: Path, *, arch: str | None = None, set_kv=None, drop_kv=(),
             replace=None) -> Path:  # fmt: skip
    """A copy of a GGUF file with metadata or tensors changed, written by the gguf package."""
    r = gguf.GGUFReader(src)
    old_arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch or old_arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_kv:
            continue
        moved = arch and key.startswith(old_arch + ".")
        new_key = arch + key[len(old_arch) :] if moved else key
        value = (set_kv or {}).get(key, field.contents())
        sub = field.types[1] if len(field.types) > 1 else None
        w.add_key_value(new_key, value, field.types[0], sub_type=sub)
    for t in r.tensors:
        data, kind = np.array(t.data), t.tensor_type
        if replace and t.name in replace:
            data, kind = replace[t.name]
        w.add_tensor(t.name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def good(tmp_path_factory, tok) -> Path:
    return G.save(_model(tok), tok, tmp_path_factory.mktemp("g") / "good.gguf", "f32").path


def test_bf16_files_are_read(tmp_path, tok, good):
    """camelid writes F32/F16/Q8_0; files from elsewhere may hold BF16."""
    r = gguf.GGUFReader(good)
    bf16 = {}
    for t in r.tensors:
        if len(t.shape) > 1:
            halves = torch.from_numpy(np.array(t.data)).to(torch.bfloat16)
            bf16[t.name] = (halves.view(torch.int16).numpy().view(np.uint8),
                            gguf.GGMLQuantizationType.BF16)  # fmt: skip
    path = _rewrite(good, tmp_path / "bf16.gguf", replace=bf16)
    assert G.inspect(path).file_type == "BF16" and G.inspect(path).dtype == torch.bfloat16
    model, ref = G.load(path), G.load(good)
    assert model.tok_embeddings.weight.dtype == torch.float32  # upcast on the CPU
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(a, b.to(torch.bfloat16).float() if b.dim() > 1 else b), name
    assert G.load(path, dtype=torch.bfloat16).norm.weight.dtype == torch.bfloat16


def test_unsupported_architecture_is_named(tmp_path, good):
    bad = _rewrite(good, tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(CheckpointError, match="architecture 'qwen2' is not supported"):
        G.load(bad)


def test_unsupported_quantisation_type_is_named(tmp_path, good):
    r = gguf.GGUFReader(good)
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_up.weight")
    q4 = gguf.quants.quantize(np.array(t.data), gguf.GGMLQuantizationType.Q4_0)
    bad = _rewrite(good, tmp_path / "q4.gguf",
                   replace={t.name: (q4, gguf.GGMLQuantizationType.Q4_0)})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_up\.weight is Q4_0, a type camelid"):
        G.load(bad)


def test_llamacpps_own_k_quants_are_written_and_named_on_reading(tmp_path, tok, capsys):
    """--dtype q4_k_m: camelid's f32 file through llama.cpp's quantiser; llama.cpp runs it,
    camelid (which reads F32, F16, BF16, Q8_0) names what it cannot read."""
    hf_dir = tmp_path / "hf"
    camelid.save(_model(tok, dim=256, n_heads=4, ffn_hidden_dim=512), hf_dir)
    tok.save(hf_dir)
    out = tmp_path / "q4.gguf"
    assert camelid_main(["export", str(hf_dir), str(out), "--dtype", "q4_k_m"]) == 0
    assert "GGUF Q4_K_M" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "q4.gguf"]
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert "Q4_K" in kinds
    llm = _llama(out)
    try:
        llm.eval(_prompt(tok, 8))
        assert np.isfinite(np.array(llm.scores[:8])).all()
    finally:
        llm.close()
    with pytest.raises(CheckpointError, match=r"is Q[46]_K, a type camelid does not read"):
        camelid.load(out)


def test_truncated_file_is_refused(tmp_path, good):
    data = good.read_bytes()
    for keep in (len(data) - 1000, 2000, 10):
        bad = tmp_path / f"cut-{keep}.gguf"
        bad.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=r"truncated|corrupt|not a GGUF"):
            G.load(bad)


def test_metadata_that_contradicts_the_shapes_is_refused(tmp_path, good):
    bad = _rewrite(good, tmp_path / "ffn.gguf", set_kv={"llama.feed_forward_length": 192})
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_gate\.weight has shape \[160, 96\] "
                       r"but the metadata says \[192, 96\]"):  # fmt: skip
        G.load(bad)
    missing = _rewrite(good, tmp_path / "nok.gguf", drop_kv=("llama.block_count",))
    with pytest.raises(CheckpointError, match=r"llama\.block_count is missing"):
        G.load(missing)


def test_rope_freqs_without_camelids_keys_are_fitted(tmp_path, tok):
    """A file from llama.cpp's own converter carries Llama 3.1 scaling only as rope_freqs."""
    model = _model(tok, rope_scaling=RopeScaling(factor=32.0), max_seq_len=256)
    path = G.save(model, tok, tmp_path / "m.gguf", "f32", check=False).path
    keys = [k for k in gguf.GGUFReader(path).fields if k.startswith("camelid.")]
    assert len(keys) == 4
    plain = _rewrite(path, tmp_path / "plain.gguf", drop_kv=keys)
    assert G.inspect(plain).config.rope_scaling == model.config.rope_scaling


def test_models_llamacpp_cannot_hold_are_refused(tmp_path, tok):
    moe = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_experts=4,
                      moe_ffn_dim=64, ffn_hidden_dim=128)  # fmt: skip
    out = tmp_path / "moe.gguf"
    with pytest.raises(CheckpointError, match="mixture-of-experts"):
        G.save(Transformer(moe), tok, out, "f32")
    with pytest.raises(CheckpointError, match="GGUF dtype 'q4_k'"):  # no such type
        G.save(_model(tok), tok, out, "q4_k")
    assert list(tmp_path.iterdir()) == []


def test_without_llamacpp_the_export_says_how_to_get_it(tmp_path, tok, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    out = tmp_path / "m.gguf"
    with pytest.raises(TokenizerError, match=r"pip install 'camelid\[gguf\]'"):
        G.save(_model(tok), tok, out, "f32")
    assert not out.exists()


def test_a_failed_write_leaves_nothing(tmp_path, tok, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    calls = []

    def boom(t, name, dtype):
        calls.append(name)
        if len(calls) > 10:  # half the data has been written
            raise RuntimeError("disk full")
        return real(t, name, dtype)

    real = G._encode
    monkeypatch.setattr(G, "_encode", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        G.save(_model(tok), tok, out, "f32", check=False)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# ------------------------------------------------------------------------------------- CLI
def test_cli_export_generate_convert_and_inspect(tmp_path, tok, capsys):
    model = _model(tok)
    hf_dir = tmp_path / "hf"
    camelid.save(model, hf_dir)
    tok.save(hf_dir)
    q8 = tmp_path / "m-q8.gguf"
    assert camelid_main(["export", str(hf_dir), str(q8), "--dtype", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "GGUF Q8_0" in out and "checked against llama.cpp" in out
    assert G.inspect(q8).file_type == "Q8_0"
    # every command that takes a model takes the file
    assert camelid_main(["generate", str(q8), "--prompt", "def add", "--max-new-tokens", "4",
                         "--temperature", "0"]) == 0  # fmt: skip
    assert "int8" not in capsys.readouterr().err
    assert camelid_main(["generate", str(q8), "--int8", "--prompt", "def", "--max-new-tokens",
                         "2"]) == 0  # fmt: skip
    assert "int8 decode (q8_0)" in capsys.readouterr().err  # the file's own blocks
    assert camelid_main(["generate", str(q8), "--int8-form", "row", "--prompt", "def",
                         "--max-new-tokens", "2"]) == 0  # fmt: skip
    assert "int8 decode (row)" in capsys.readouterr().err
    assert camelid_main(["inspect", str(q8)]) == 0
    back = tmp_path / "back"
    assert camelid_main(["convert", str(q8), str(back)]) == 0
    again = tmp_path / "again.gguf"
    assert camelid_main(["convert", str(back), str(again), "--dtype", "q8_0"]) == 0
    assert again.read_bytes() == q8.read_bytes()  # Q8_0 → fp32 directory → Q8_0: same bytes
    capsys.readouterr()
    # mistakes
    assert camelid_main(["export", str(hf_dir), str(q8)]) != 0
    assert "exists (--overwrite replaces it)" in capsys.readouterr().err
    assert camelid_main(["export", str(hf_dir), str(tmp_path / "x"), "--dtype", "q8_0"]) != 0
    assert "is a GGUF type" in capsys.readouterr().err
    assert camelid_main(["export", str(hf_dir), str(tmp_path / "x.gguf"), "--dtype",
                         "bfloat16"]) != 0  # fmt: skip
    assert "bfloat16" in capsys.readouterr().err


def test_gguf_engine_decodes_like_the_source(tmp_path, tok):
    model = _model(tok)
    path = G.save(model, tok, tmp_path / "m.gguf", "f32").path
    prompt = _prompt(tok, 20)
    a = camelid.Engine(model, tok).generate(prompt, max_new_tokens=16, temperature=0)
    from camelid.infer.load import load_engine

    b = load_engine(path).generate(prompt, max_new_tokens=16, temperature=0)
    assert a.token_ids == b.token_ids


def test_finetuning_can_start_from_a_gguf_file(tmp_path, tok):
    """``[init] model`` takes a GGUF file like any model (its config and tokenizer)."""
    from camelid.infer.load import inspect_model, load_model, resolve_model

    path = G.save(_model(tok), tok, tmp_path / "m.gguf", "f16").path
    source = resolve_model(path)
    assert source.kind == "gguf" and inspect_model(source).dtype == torch.float16
    weights = load_model(source)
    assert weights.tok_embeddings.weight.dtype == torch.float32  # upcast on the CPU
    assert dataclasses.replace(weights.config) == G.inspect(path).config
