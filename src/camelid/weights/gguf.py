"""GGUF in and out: llama.cpp's one-file format, for Llama models and their tokenizers.

    save(model, tokenizer, "model.gguf", dtype="q8_0")   # camelid export --format gguf
    model = load("model.gguf")                            # F32, F16, BF16, Q8_0 → torch
    tokenizer = load_tokenizer("model.gguf")

Writing goes through the ``gguf`` package (llama.cpp's own Python writer). The file holds
llama.cpp's ``llama`` architecture: its metadata keys, its tensor names, and q/k rows in Meta's
interleaved RoPE order (llama.cpp rotates adjacent pairs; camelid, like Hugging Face, holds the
two halves of each head apart), plus the tokenizer as llama.cpp reads it: byte-level tokens,
their types, the merges, the special-token ids (end of turn included), the BOS policy and the
chat template.

llama.cpp picks its pre-tokenizer (the split before BPE) by name. A file is written with the
``llama-bpe`` (Llama 3) or ``llama4`` name only after llama.cpp itself has been shown to
tokenise a fixed test set (:data:`PARITY_TEXTS`: many scripts, code, whitespace) exactly as
camelid does with that very vocabulary (:func:`check_tokenizer`, llama.cpp run on a
vocabulary-only copy of the file in a child process); any difference refuses the export and
shows the first text that differs.

Q8_0 is computed here, block for block the bytes of the ``gguf`` package's reference quantiser
(and so of ggml's): 32 weights per block, one fp16 scale ``max|x| / 127``, values rounded half
away from zero. Weights loaded from a Q8_0 file are exactly ``q * scale``, so quantising them
again gives the same bytes: a file camelid wrote comes back byte for byte. The low-bit types
(:data:`LLAMACPP_DTYPES`: Q4_0, the K-quants) are made by llama.cpp's own quantiser from
camelid's exact f32 file; camelid does not read them back.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camelid.config import ModelConfig, RopeScaling
from camelid.errors import CheckpointError, ConfigError, TokenizerError
from camelid.model import Transformer
from camelid.tokenizer.gguf import (
    Vocab,
    fields_of,
    is_gguf_file,
    open_reader,
    tokenizer_from_fields,
    vocab_of,
)
from camelid.weights import hf

SUFFIX = ".gguf"
DTYPES = ("f32", "f16", "q8_0")  # what camelid writes itself
# What llama.cpp's own quantiser makes of camelid's f32 file (llama_ftype); camelid does not
# read these back (see READ_TYPES).
LLAMACPP_DTYPES = {"q4_0": 2, "q4_k_s": 14, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
WRITE_TYPES = (*DTYPES, *LLAMACPP_DTYPES)  # every --dtype a GGUF export takes
READ_TYPES = ("F32", "F16", "BF16", "Q8_0")  # what camelid reads
ARCH = "llama"
Q8_BLOCK = 32  # weights per Q8_0 block
Q8_BYTES = 2 + Q8_BLOCK  # its fp16 scale, then 32 int8 values

# camelid's own keys: what llama.cpp's rope_freqs tensor alone does not say exactly.
_ROPE_KEY = "camelid.rope_scaling."

# Hugging Face name parts → llama.cpp's (per layer: blk.N.<name>).
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
ROPE_FREQS = "rope_freqs.weight"

# A fixed test set for tokeniser parity: scripts with and without spaces between words, the
# regex's edge cases (contractions in any case, digit runs, punctuation and newline runs,
# whitespace before and after text), code, and text that looks like special tokens.
PARITY_TEXTS = (
    "Hello, world! This is a test.",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX.",
    "I'm sure you'll see they've done it; DON'T, WON'T, He'S, we'D, it'LL",
    "Numbers: 1 12 123 1234 12345 123456 3.14159 -42 1,000,000 2026-12-02 0x1F",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs\n\nnewlines\r\nwindows\rold mac\n\n\n",
    "\n",
    " ",
    "   \n\n  \t ",
    "Über größere Straßen fährt man schneller. Ça va? Déjà vu, naïve café.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Γαζέες καὶ μυρτιὲς δὲν θὰ βρῶ πιὰ στὸ χρυσαφὶ ξέφωτο.",
    "我能吞下玻璃而不伤身体。机器学习很有趣！",
    "私はガラスを食べられます。それは私を傷つけません。カタカナとひらがな",
    "나는 유리를 먹을 수 있어요. 그래도 아프지 않아요",
    "أنا قادر على أكل الزجاج و هذا لا يؤلمني.",
    "मैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती.",
    "ฉันกินกระจกได้ แต่มันไม่ทำให้ฉันเจ็บ",
    "Emoji 😀🚀🇫🇷 👩‍👩‍👧‍👦 and symbols ©®™ ∑∫√∞ ≠≤≥ →⇒ «quotes» “curly” ‘single’",
    "Zero\u200bwidth, no\u00a0break, ideographic\u3000space, e\u0301 combining, ﬁ ligature",
    'def fib(n: int) -> int:\n    """Fibonacci."""\n    if n < 2:\n        return n\n'
    "    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i]; // dot\n}\n",
    "<div class=\"x\">&nbsp;&amp;</div> $x^2 + y_1$ {'key': [1, 2, 3]} a==b!=c<=d",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%ab%';",
    "camelCase snake_case kebab-case SCREAMING_CASE PascalCase x86_64 iPhone",
    "<|begin_of_text|><|eot_id|><|start_header_id|>user<|end_header_id|> plain text",
    "!!!??? ... --- *** ((( ))) [[[ ]]] ''' \"\"\" ``` ~~~ @@@ ### $$$ %%%",
    "a" * 50 + " " + "ab" * 20 + " " + "🙂" * 5,
)


@dataclass(frozen=True)
class GGUFInfo:
    """What :func:`inspect` learns from a GGUF file's metadata and tensor index."""

    config: ModelConfig
    path: Path
    file_type: str  # the weights' type: F32, F16, BF16, Q8_0 or "mixed"
    dtype: torch.dtype  # the dtype its weights load in by default on the CPU (exactly)
    nbytes: int
    tensors: dict[str, str]  # name → GGML type name


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic bytes."""
    return Path(path).is_file() and is_gguf_file(Path(path))


# ------------------------------------------------------------------------------------ Q8_0
def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (rows, cols), cols a multiple of 32, as Q8_0 blocks: uint8 of shape
    (rows, cols / 32 * 34), each block its fp16 scale then 32 int8 values. The same bytes as
    ``gguf.quants.quantize(w, Q8_0)`` (the same fp32 operations in the same order)."""
    rows, cols = weight.shape
    if cols % Q8_BLOCK:
        raise ValueError(f"Q8_0 needs rows of a multiple of {Q8_BLOCK} values, got {cols}")
    blocks = weight.detach().to("cpu", torch.float32).reshape(-1, Q8_BLOCK)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    x = blocks * inv
    a = x.abs()  # round half away from zero, as ggml's roundf
    floored = a.floor()
    q = torch.sign(x) * (floored + (2 * (a - floored)).floor())
    out = torch.empty(blocks.shape[0], Q8_BYTES, dtype=torch.uint8)
    out[:, :2] = d.to(torch.float16).view(torch.uint8)
    out[:, 2:] = q.to(torch.int8).view(torch.uint8)
    return out.view(rows, cols // Q8_BLOCK * Q8_BYTES)


def q8_0_parts(raw: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 bytes (rows, cols / 32 * 34) → the int8 values (rows, cols) and their fp32 scales
    (rows, cols / 32)."""
    rows = raw.shape[0]
    blocks = raw.reshape(-1, Q8_BYTES)
    scale = blocks[:, :2].contiguous().view(torch.float16).float().view(rows, cols // Q8_BLOCK)
    q = blocks[:, 2:].contiguous().view(torch.int8).view(rows, cols)
    return q, scale


def dequantize_q8_0(raw: torch.Tensor, cols: int) -> torch.Tensor:
    """Q8_0 bytes (rows, cols / 32 * 34) → fp32 (rows, cols): exactly ``q * scale``."""
    q, scale = q8_0_parts(raw, cols)
    rows = q.shape[0]
    return (q.view(rows, -1, Q8_BLOCK).float() * scale.unsqueeze(-1)).view(rows, cols)


# ----------------------------------------------------------------------------- tensor names
def gguf_name(hf_name: str) -> str:
    """A Hugging Face Llama tensor name → llama.cpp's."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".")
    if parts[:2] != ["model", "layers"] or len(parts) < 5:
        raise CheckpointError(f"no GGUF name for tensor {hf_name}")
    module, kind = ".".join(parts[3:-1]), parts[-1]
    if module not in _LAYER_NAMES:
        raise CheckpointError(f"no GGUF name for tensor {hf_name}")
    return f"blk.{parts[2]}.{_LAYER_NAMES[module]}.{kind}"


def _interleave_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows (or biases) from the half layout to Meta's interleaved pairs, per head."""
    shape = t.shape
    return t.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _halve_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`_interleave_heads`."""
    shape = t.shape
    return t.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _rope_heads(config: ModelConfig, hf_name: str) -> int:
    if ".self_attn.q_proj." in hf_name:
        return config.n_heads
    if ".self_attn.k_proj." in hf_name:
        return config.n_kv_heads
    return 0


def rope_factors(scaling: RopeScaling, head_dim: int, theta: float) -> torch.Tensor:
    """llama.cpp's ``rope_freqs`` for Llama 3.1 scaling: what each frequency is divided by,
    computed as llama.cpp's converter does."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high = scaling.original_max_position_embeddings / scaling.high_freq_factor
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(scaling.factor)
        else:
            smooth = (
                scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor
            ) / (scaling.high_freq_factor - scaling.low_freq_factor)
            out.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def check_exportable(config: ModelConfig) -> None:
    """Refuse, naming the reason, a model llama.cpp's ``llama`` architecture cannot express."""
    why = []
    if config.is_moe:
        why.append("it is a mixture-of-experts model (Llama 4 MoE)")
    if config.nope_layer_interval or config.use_qk_norm or config.attention_chunk_size:
        why.append("it uses Llama 4 attention (NoPE layers, QK-norm or chunked attention)")
    if config.attn_temperature_tuning:
        why.append("it uses attention temperature tuning")
    if why:
        raise CheckpointError(
            "GGUF export writes llama.cpp's dense 'llama' architecture; this model cannot be "
            "written as one: " + "; ".join(why)
        )


def gguf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``model`` as llama.cpp's ``llama`` architecture holds it: its GGUF name
    and the tensor (fp32, CPU, (rows, cols) as torch holds it), one at a time."""
    config = model.config
    check_exportable(config)
    for hf_name, tensor in hf.hf_tensors(model):
        t = tensor.float()
        heads = _rope_heads(config, hf_name)
        if heads:
            t = _interleave_heads(t, heads).contiguous()
        yield gguf_name(hf_name), t
    if config.rope_scaling is not None:
        yield ROPE_FREQS, rope_factors(config.rope_scaling, config.head_dim, config.rope_theta)


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name → its shape (torch order) for ``config``; the tied head is absent."""
    shapes = {}
    for pieces in hf.hf_layout(config).values():
        for piece in pieces:
            shapes[gguf_name(piece.hf_name)] = piece.shape
    return shapes


# ------------------------------------------------------------------------- tokeniser parity
def _write_vocab_only(path: Path, config: ModelConfig, vocab: Vocab, name: str) -> None:
    import gguf

    w = gguf.GGUFWriter(path=None, arch=ARCH)
    _add_metadata(w, config, vocab, name, file_type=0)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def llamacpp_tokenize(path: str | Path, texts: list[str] | tuple[str, ...]) -> list[list[int]]:
    """Token ids llama.cpp gives each text with the vocabulary of the GGUF file ``path``
    (vocabulary-only load, no BOS, special-token text kept plain), in a child process so that
    llama.cpp's aborts and log lines stay out of this one."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise TokenizerError(
            "checking the tokenizer against llama.cpp needs llama-cpp-python: "
            "pip install 'camelid[gguf]' (it builds llama.cpp from source, 6-13 minutes on "
            "2 cores, once)"
        ) from None
    child = (
        "import json, sys, llama_cpp\n"
        "a = json.load(sys.stdin)\n"
        "m = llama_cpp.Llama(model_path=a['path'], vocab_only=True, verbose=False)\n"
        "out = [m.tokenize(t.encode('utf-8'), add_bos=False, special=False) for t in a['texts']]\n"
        "json.dump(out, sys.stdout)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child],
        input=json.dumps({"path": str(path), "texts": list(texts)}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise TokenizerError(
            f"llama.cpp could not load the vocabulary of {path}: {' | '.join(tail)}"
        )
    return json.loads(done.stdout)


@dataclass(frozen=True)
class Parity:
    """The outcome of :func:`check_tokenizer`: texts compared, and the first difference."""

    texts: int
    first_difference: tuple[str, list[int], list[int]] | None  # text, camelid's, llama.cpp's
    pre: str  # the pre-tokenizer llama.cpp was told


def tokenizer_parity(
    tokenizer: Any,
    config: ModelConfig | None = None,
    texts: tuple[str, ...] | list[str] = PARITY_TEXTS,
    vocab: Vocab | None = None,
) -> Parity:
    """Tokenise ``texts`` with camelid and with llama.cpp (on a vocabulary-only GGUF written as
    :func:`save` writes it) and compare. ``vocab``: the tokenizer's GGUF fields, when the
    caller has them already."""
    config = config or ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=1, n_heads=1)
    vocab = vocab or vocab_of(tokenizer, config.vocab_size)
    with tempfile.TemporaryDirectory(prefix="camelid-vocab-") as tmp:
        path = Path(tmp) / "vocab.gguf"
        _write_vocab_only(path, config, vocab, "vocab")
        theirs = llamacpp_tokenize(path, texts)
    for text, other in zip(texts, theirs, strict=True):
        ours = tokenizer.encode(text)
        if ours != other:
            return Parity(len(texts), (text, ours, other), vocab.pre)
    return Parity(len(texts), None, vocab.pre)


def check_tokenizer(
    tokenizer: Any, config: ModelConfig | None = None, vocab: Vocab | None = None
) -> int:
    """Refuse (TokenizerError, showing the first text that differs) a tokenizer that llama.cpp
    would tokenise differently from camelid under the pre-tokenizer GGUF declares for it;
    returns how many texts were compared."""
    parity = tokenizer_parity(tokenizer, config, vocab=vocab)
    if parity.first_difference is not None:
        text, ours, theirs = parity.first_difference
        at = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
            min(len(ours), len(theirs)),
        )
        raise TokenizerError(
            f"{tokenizer.source}: llama.cpp tokenises differently from camelid with pre-tokenizer "
            f"{parity.pre!r}, so no GGUF is written. First differing text: "
            f"{text!r}: camelid {ours[at : at + 8]} … llama.cpp {theirs[at : at + 8]} … "
            f"(from token {at})"
        )
    return parity.texts


# ----------------------------------------------------------------------------------- write
def _file_type(dtype: str) -> int:
    return {"f32": 0, "f16": 1, "q8_0": 7}[dtype]  # llama.cpp's LLAMA_FTYPE_ALL_F32, ...


def _add_metadata(w: Any, config: ModelConfig, vocab: Vocab, name: str, file_type: int) -> None:
    w.add_name(name)
    w.add_file_type(file_type)
    if file_type == 7:
        w.add_quantization_version(2)
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn_hidden_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.n_heads != config.dim:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    if config.rope_scaling is not None:
        s = config.rope_scaling
        w.add_float32(_ROPE_KEY + "factor", s.factor)
        w.add_float32(_ROPE_KEY + "low_freq_factor", s.low_freq_factor)
        w.add_float32(_ROPE_KEY + "high_freq_factor", s.high_freq_factor)
        w.add_uint32(_ROPE_KEY + "original_max_position_embeddings",
                     s.original_max_position_embeddings)  # fmt: skip
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    if vocab.eot_id is not None:
        w.add_eot_token_id(vocab.eot_id)
    if vocab.eom_id is not None:
        w.add_eom_token_id(vocab.eom_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if vocab.chat_template is not None:
        w.add_chat_template(vocab.chat_template)


def _encode(t: torch.Tensor, name: str, dtype: str) -> tuple[np.ndarray, Any]:
    """A tensor as written: its numpy bytes and GGML type (as :func:`_layout` plans it)."""
    kind = _layout(t, name, dtype)[3]
    if kind.name == "Q8_0":
        return quantize_q8_0(t).numpy(), kind
    if kind.name == "F16":  # f16, or a row Q8_0 cannot split into blocks
        return t.to(torch.float16).numpy(), kind
    return t.float().numpy(), kind


def _layout(t: torch.Tensor, name: str, dtype: str) -> tuple[tuple[int, ...], Any, int, Any]:
    """What :func:`_encode` will write for ``t``, without encoding it: the byte array's shape,
    numpy dtype and size, and the GGML type."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if t.dim() == 1 or name == ROPE_FREQS or dtype == "f32":
        return tuple(t.shape), np.dtype(np.float32), t.numel() * 4, Q.F32
    if dtype == "q8_0" and t.shape[-1] % Q8_BLOCK == 0:
        shape = (t.shape[0], t.shape[1] // Q8_BLOCK * Q8_BYTES)
        return shape, np.dtype(np.uint8), shape[0] * shape[1], Q.Q8_0
    return tuple(t.shape), np.dtype(np.float16), t.numel() * 2, Q.F16


def llamacpp_quantize(src: Path, dst: Path, dtype: str) -> None:
    """llama.cpp's own quantiser (``llama_model_quantize``, as its ``llama-quantize`` tool) from
    the GGUF file ``src`` to ``dst``, in a child process (llama.cpp aborts on some errors)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise CheckpointError(
            f"--dtype {dtype} is made by llama.cpp's quantiser, which needs llama-cpp-python: "
            "pip install 'camelid[gguf]'"
        ) from None
    child = (
        "import ctypes, sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        "p.ftype = int(sys.argv[3]); p.nthread = 0\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), "
        "ctypes.byref(p)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child, str(src), str(dst), str(LLAMACPP_DTYPES[dtype])],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise CheckpointError(f"llama.cpp's quantiser failed on {src} ({dtype}): {tail}")


@dataclass(frozen=True)
class Saved:
    """What :func:`save` wrote."""

    path: Path
    dtype: str
    nbytes: int
    tensors: int
    parity_texts: int  # texts llama.cpp tokenised exactly as camelid (0: not checked)


def save(
    model: Transformer,
    tokenizer: Any,
    path: str | Path,
    dtype: str = "f32",
    *,
    name: str | None = None,
    check: bool = True,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> Saved:
    """Write ``model`` and ``tokenizer`` as one GGUF file for llama.cpp (see the module
    docstring). ``check`` proves tokeniser parity with llama.cpp first (refusing on any
    difference); the file appears complete or not at all."""
    if dtype not in WRITE_TYPES:
        raise CheckpointError(
            f"GGUF dtype {dtype!r}: expected one of {', '.join(DTYPES)} (camelid's own) or "
            f"{', '.join(LLAMACPP_DTYPES)} (llama.cpp's quantiser)"
        )
    import gguf

    config = model.config
    check_exportable(config)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{config.vocab_size} embedding rows"
        )
    vocab = vocab_of(tokenizer, config.vocab_size)
    name = name or config.name or "camelid"
    checked = 0
    if check:
        if log is not None:
            log(f"checking that llama.cpp tokenises like camelid ({vocab.pre}) …")
        checked = check_tokenizer(tokenizer, config, vocab)
        if log is not None:
            log(f"llama.cpp gave the same ids on all {checked} texts of the test set")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if dtype in LLAMACPP_DTYPES:  # camelid's exact f32 file, then llama.cpp's quantiser
        f32 = path.with_name(f".{path.name}.f32-{os.getpid()}")
        try:
            written = save(model, tokenizer, f32, "f32", name=name, check=False, progress=progress)
            if log is not None:
                log(f"quantising to {dtype.upper()} with llama.cpp's quantiser …")
            llamacpp_quantize(f32, tmp, dtype)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            f32.unlink(missing_ok=True)
        return Saved(path, dtype, path.stat().st_size, written.tensors, checked)
    w = gguf.GGUFWriter(path=None, arch=ARCH)
    try:
        _add_metadata(w, config, vocab, name, _file_type(dtype))
        infos = []
        for tname, t in gguf_tensors(model):  # the index first: names, shapes, types
            shape, np_dtype, nbytes, kind = _layout(t, tname, dtype)
            w.add_tensor_info(tname, shape, np_dtype, nbytes, raw_dtype=kind)
            infos.append(tname)
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        bar = hf.progress_bar(len(infos), f"writing {path.name}", progress)
        for tname, t in gguf_tensors(model):  # then the data, encoded again one at a time
            w.write_tensor_data(_encode(t, tname, dtype)[0])
            bar.update(1)
        bar.close()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return Saved(path, dtype, path.stat().st_size, len(infos), checked)


# ------------------------------------------------------------------------------------ read
def _reader(path: Path) -> Any:
    """The file's reader, checked: a GGUF file whose every tensor lies within it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if not is_gguf(path):
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    reader = open_reader(path, CheckpointError)
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise CheckpointError(
                f"{path}: truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes} "
                f"of a {size}-byte file"
            )
    return reader


def _fields(reader: Any) -> dict[str, Any]:
    """The metadata a model's config is read from (the tokenizer's large arrays left unread)."""
    return fields_of(reader, skip="tokenizer.")


def _config(fields: dict[str, Any], tensors: dict[str, Any], source: str) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch != ARCH:
        raise CheckpointError(
            f"{source}: architecture {arch!r} is not supported (camelid reads llama.cpp's "
            f"'{ARCH}' architecture: dense Llama 1/2/3.x)"
        )

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        value = fields.get(f"{ARCH}.{key}", default)
        if value is None and required:
            raise CheckpointError(f"{source}: metadata {ARCH}.{key} is missing")
        return value

    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{source}: no tensor token_embd.weight")
    vocab_size = int(get("vocab_size", int(embd.shape[1]) if len(embd.shape) > 1 else None))
    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", dim // max(n_heads, 1)))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{source}: key and value head sizes differ; not a Llama model")
    rot = int(get("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise CheckpointError(
            f"{source}: RoPE on {rot} of {head_dim} head dimensions (partial rotary) is not a "
            "Llama model camelid reads"
        )
    if fields.get(f"{ARCH}.expert_count"):
        raise CheckpointError(
            f"{source}: a mixture-of-experts 'llama' file (Mixtral) is not supported"
        )
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_hidden_dim=int(get("feed_forward_length")),
        norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(get("rope.freq_base", 10000.0)),
        max_seq_len=int(get("context_length")),
        tie_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_gate.bias" in tensors,
        name=str(fields.get("general.name") or ""),
    )
    if fields.get(f"{ARCH}.rope.scaling.type") not in (None, "none"):
        raise CheckpointError(
            f"{source}: RoPE scaling {fields[f'{ARCH}.rope.scaling.type']!r} is not supported "
            "(camelid reads Llama 3.1's, stored as rope_freqs)"
        )
    if ROPE_FREQS in tensors:
        kw["rope_scaling"] = _rope_scaling(fields, tensors[ROPE_FREQS], kw, source)
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise CheckpointError(f"{source}: the metadata is not a valid Llama config: {e}") from None


def _f32(value: Any) -> float:
    """A float32 from the file as the shortest decimal that is that float32 (1e-05, not
    9.99999974e-06): the value that was written, for every value a config holds."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="0"))


def _rope_scaling(fields: dict, tensor: Any, kw: dict, source: str) -> RopeScaling:
    """Llama 3.1 scaling from camelid's keys, or else fitted to llama.cpp's rope_freqs (the
    converter writes only the factors): Meta's published settings are tried in turn."""
    factors = torch.from_numpy(np.array(tensor.data, dtype=np.float32)).reshape(-1)
    if factors.numel() != kw["head_dim"] // 2:
        raise CheckpointError(
            f"{source}: rope_freqs holds {factors.numel()} factors, expected {kw['head_dim'] // 2}"
        )
    if fields.get(_ROPE_KEY + "factor") is not None:
        candidates = [RopeScaling(
            factor=_f32(fields[_ROPE_KEY + "factor"]),
            low_freq_factor=_f32(fields[_ROPE_KEY + "low_freq_factor"]),
            high_freq_factor=_f32(fields[_ROPE_KEY + "high_freq_factor"]),
            original_max_position_embeddings=int(
                fields[_ROPE_KEY + "original_max_position_embeddings"]
            ),
        )]  # fmt: skip
    else:
        top = float(factors.max())
        candidates = [
            RopeScaling(
                factor=top,
                low_freq_factor=low,
                high_freq_factor=high,
                original_max_position_embeddings=orig,
            )
            for orig in (8192, 4096, 2048, 16384, 32768, 65536, 131072)
            for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0))
        ]
    for scaling in candidates:
        want = rope_factors(scaling, kw["head_dim"], kw["rope_theta"])
        if torch.allclose(want, factors, rtol=1e-5, atol=0):
            return scaling
    raise CheckpointError(
        f"{source}: rope_freqs does not follow Llama 3.1's scaling rule; camelid cannot read it"
    )


def _index(reader: Any) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def _type_name(t: Any) -> str:
    return t.tensor_type.name


def _plan(path: Path) -> tuple[Any, dict[str, Any], ModelConfig, dict[str, Any]]:
    """Read and check everything but the tensor data: metadata, names, shapes and types."""
    reader = _reader(path)
    fields = _fields(reader)
    tensors = _index(reader)
    config = _config(fields, tensors, str(path))
    expected = _expected_shapes(config)
    for name, t in tensors.items():
        if name == ROPE_FREQS:
            continue
        if name not in expected:
            raise CheckpointError(
                f"{path}: unexpected tensor {name} for a {config.n_layers}-layer Llama"
            )
        kind = _type_name(t)
        if kind not in READ_TYPES:
            raise CheckpointError(
                f"{path}: tensor {name} is {kind}, a type camelid does not read (it reads "
                f"{', '.join(READ_TYPES)}; llama.cpp's llama-quantize --allow-requantize can "
                "re-save the file as Q8_0, keeping the losses it already has)"
            )
        shape = tuple(int(s) for s in reversed(list(t.shape)))  # GGML lists the row length first
        if shape != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {list(shape)} but the metadata says "
                f"{list(expected[name])} (dim {config.dim}, {config.n_heads} heads of "
                f"{config.head_dim}, {config.n_kv_heads} kv heads, ffn {config.ffn_hidden_dim}, "
                f"vocab {config.vocab_size})"
            )
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, first {missing[0]}")
    return reader, fields, config, tensors


def _tensor(t: Any) -> torch.Tensor:
    """A GGUF tensor's values as fp32 (or bf16) torch, in torch's (rows, cols) order."""
    shape = tuple(int(s) for s in reversed(list(t.shape)))
    kind = _type_name(t)
    raw = torch.from_numpy(np.array(t.data))  # a copy: the mapping is read-only
    if kind == "Q8_0":
        return dequantize_q8_0(raw.view(torch.uint8).reshape(shape[0], -1), shape[-1])
    if kind == "BF16":
        return raw.view(torch.int16).view(torch.bfloat16).reshape(shape)
    return raw.reshape(shape)


def _stored_dtype(tensors: dict[str, Any]) -> tuple[str, torch.dtype]:
    kinds = {_type_name(t) for n, t in tensors.items() if n != ROPE_FREQS and len(t.shape) > 1}
    file_type = next(iter(kinds)) if len(kinds) == 1 else ("Q8_0" if "Q8_0" in kinds else "mixed")
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(file_type, torch.float32)
    return file_type, dtype


def inspect(path: str | Path) -> GGUFInfo:
    """Validate a GGUF file from its metadata and tensor index (no tensor data is converted)."""
    path = Path(path)
    _, _, config, tensors = _plan(path)
    file_type, dtype = _stored_dtype(tensors)
    kinds = {n: _type_name(t) for n, t in tensors.items()}
    return GGUFInfo(config, path, file_type, dtype, path.stat().st_size, kinds)


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> Transformer:
    """A Llama GGUF file → a :class:`Transformer`, its weights dequantised to ``dtype``
    (default: float32 on the CPU, where Q8_0's ``q * scale`` is exact; the stored half
    precision elsewhere)."""
    path = Path(path)
    _, _, config, tensors = _plan(path)
    _, stored = _stored_dtype(tensors)
    device = torch.device(device)
    model = Transformer.empty(config, device, hf.load_dtype(dtype, stored, device))
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    targets = {}
    for name, pieces in hf.hf_layout(config).items():
        for piece in pieces:
            targets[gguf_name(piece.hf_name)] = (name, piece)
    bar = hf.progress_bar(len(targets), f"loading {path.name}", progress)
    with torch.no_grad():
        for gname, (name, piece) in targets.items():
            t = _tensor(tensors[gname])
            heads = _rope_heads(config, piece.hf_name)
            if heads:
                t = _halve_heads(t, heads)
            rows = params[name][piece.start : piece.start + piece.shape[0]]
            rows.copy_(hf.from_hf_rows(t, piece))
            bar.update(1)
    bar.close()
    return model


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer a GGUF file carries, as a camelid Tokenizer."""
    path = Path(path)
    return tokenizer_from_fields(fields_of(_reader(path)), str(path))
