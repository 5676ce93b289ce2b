"""A tokenizer as GGUF holds it (``tokenizer.ggml.*``, ``tokenizer.chat_template``), both ways.

llama.cpp reads byte-level BPE as the ``gpt2`` tokenizer model: every token's byte-level text,
its type (normal, control for special tokens, unused for padding), the merges in rank order and
the name of the split before BPE (``llama-bpe`` for Llama 3's, ``llama4`` for Llama 4's). This
is the one place that maps camelid's tokenizer to those fields and back; reading them back
builds the same ``tokenizers`` pipeline as :func:`camelid.tokenizer.bpe.hf_from_vocab`, so a
tokenizer camelid wrote returns with the same digest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camelid.errors import TokenizerError
from camelid.tokenizer.bpe import LLAMA3_PATTERN, LLAMA4_PATTERN, hf_from_vocab
from camelid.tokenizer.tokenizer import Tokenizer, _HFBackend

MAGIC = b"GGUF"

# llama.cpp's name for the split before BPE, by the split regex it stands for.
PRE_TOKENIZERS = {LLAMA3_PATTERN: "llama-bpe", LLAMA4_PATTERN: "llama4"}
_PATTERNS = {"llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "llama-v3": LLAMA3_PATTERN,
             "llama4": LLAMA4_PATTERN}  # fmt: skip

# llama.cpp's token types (llama_token_type / gguf.TokenType).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass(frozen=True)
class Vocab:
    """A tokenizer as GGUF holds it (``tokenizer.ggml.*`` and ``tokenizer.chat_template``)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int
    eos_id: int
    eot_id: int | None
    eom_id: int | None
    chat_template: str | None


def vocab_of(tokenizer: Tokenizer, vocab_size: int | None = None) -> Vocab:
    """camelid's tokenizer → GGUF's tokenizer fields; the model's ``vocab_size`` (when larger)
    pads the list with unused ``[PAD{id}]`` tokens, as llama.cpp's converter does."""
    spec = json.loads(tokenizer._backend.to_hf().to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    pattern = None
    if steps and len(steps) == 2 and steps[0].get("type") == "Split":
        pattern = (steps[0].get("pattern") or {}).get("Regex")
    structural = (
        spec.get("normalizer") is None
        and steps is not None
        and len(steps) == 2
        and steps[0].get("behavior") == "Isolated"
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("add_prefix_space")
        and model.get("type") == "BPE"
        and model.get("ignore_merges")
    )
    if not structural or pattern not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"{tokenizer.source}: llama.cpp knows no pre-tokenizer for this tokenizer (GGUF "
            "export takes Llama 3 or Llama 4 byte-level BPE: the Llama 3/4 split, ByteLevel, "
            "BPE with ignore_merges)"
        )
    n = tokenizer.vocab_size if vocab_size is None else max(vocab_size, tokenizer.vocab_size)
    tokens: list[str | None] = [None] * n
    types = [NORMAL] * n
    for text, i in model["vocab"].items():
        tokens[i] = text
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    for i in range(tokenizer.vocab_size, n):
        tokens[i], types[i] = f"[PAD{i}]", UNUSED
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise TokenizerError(f"{tokenizer.source}: no token has id {holes[0]}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = tokenizer.special_tokens
    chat = tokenizer._chat.jinja() if tokenizer._chat is not None else None
    return Vocab(
        tokens=tokens,  # type: ignore[arg-type]
        types=types,
        merges=merges,
        pre=PRE_TOKENIZERS[pattern],
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        eot_id=tokenizer.eot_id,
        eom_id=special.get("<|eom_id|>", special.get("<|eom|>")),
        chat_template=chat,
    )


def tokenizer_from_fields(fields: dict[str, Any], source: str) -> Tokenizer:
    """GGUF's tokenizer fields (key → value) → a camelid :class:`Tokenizer`."""

    model = fields.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"{source}: the GGUF file holds no tokenizer")
    if model != "gpt2":
        what = "SentencePiece, Llama 1/2" if model == "llama" else "not byte-level BPE"
        raise TokenizerError(
            f"{source}: tokenizer.ggml.model is {model!r} ({what}); camelid reads byte-level "
            "BPE tokenizers ('gpt2': Llama 3 and 4)"
        )
    pre = fields.get("tokenizer.ggml.pre")
    if pre not in _PATTERNS:
        raise TokenizerError(
            f"{source}: pre-tokenizer {pre!r} is not one camelid reads "
            f"({', '.join(sorted(_PATTERNS))})"
        )
    tokens = list(fields.get("tokenizer.ggml.tokens") or [])
    types = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    merges = []
    for m in fields.get("tokenizer.ggml.merges") or []:
        a, sep, b = m.partition(" ")
        if not sep:
            raise TokenizerError(f"{source}: merge {m!r} is not two tokens")
        merges.append((a, b))
    vocab, specials = {}, {}
    for i, (text, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (CONTROL, USER_DEFINED):
            specials[text] = i
        elif kind != UNUSED:
            vocab[text] = i
    try:
        backend = _HFBackend(hf_from_vocab(vocab, merges, specials, _PATTERNS[pre]))
    except Exception as e:  # the tokenizers library raises plain exceptions on bad vocabularies
        raise TokenizerError(f"{source}: the GGUF vocabulary does not load ({e})") from None
    return Tokenizer(backend, source)


def open_reader(path: str | Path, error: type[Exception] = TokenizerError) -> Any:
    """A ``gguf.GGUFReader`` of the file (memory-mapped, nothing converted), or ``error``
    naming the file when it is not a readable GGUF file."""
    import gguf

    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, ... on a bad file
        raise error(f"{path}: a truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None


def read_fields(path: str | Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file and its value (None where it cannot be decoded)."""
    return fields_of(open_reader(path))


def fields_of(reader: Any, skip: str | None = None) -> dict[str, Any]:
    """A ``gguf.GGUFReader``'s metadata as key → value, but for keys starting with ``skip``
    (a vocabulary's hundreds of thousands of strings take seconds to decode)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or (skip and key.startswith(skip)):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # a value this reader cannot decode; only the keys camelid reads matter
            out[key] = None
    return out


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer a GGUF file carries."""
    return tokenizer_from_fields(read_fields(path), str(path))


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic bytes."""
    try:
        with path.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
