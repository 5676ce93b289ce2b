"""The tokenizer every stage uses: load (Hugging Face ``tokenizer.json`` or Meta's tiktoken
``tokenizer.model``), encode, decode, chat, save.

Two back ends sit behind one class: the ``tokenizers`` library for ``tokenizer.json`` and tiktoken
for ``tokenizer.model``. Both are byte-level BPE and give the same ids for the same ranks (see
:mod:`camelid.tokenizer.bpe`). BOS and EOS are never added by the back end, only by ``encode``.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer as HFTokenizer

from camelid.errors import TokenizerError
from camelid.io import write_text_atomic
from camelid.tokenizer.bpe import (
    BOS,
    EOS,
    LLAMA3_PATTERN,
    LLAMA3_RANKS,
    LLAMA4_PATTERN,
    LLAMA4_RANKS,
    hf_from_ranks,
    llama3_special_names,
    llama4_special_names,
    tiktoken_twin,
    token_to_bytes,
)
from camelid.tokenizer.chat import (
    LLAMA3_CHAT,
    LLAMA4_CHAT,
    ChatFormat,
    chat_pieces,
    find_chat_format,
)

JSON_NAME = "tokenizer.json"
MODEL_NAME = "tokenizer.model"
CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_NAME = "special_tokens_map.json"

# The parts of a tokenizer.json that decide which ids a text gets and which text ids decode to.
# (The post-processor is left out: camelid adds BOS/EOS itself.)
_BEHAVIOUR_KEYS = ("added_tokens", "normalizer", "pre_tokenizer", "model", "decoder")


def _without_surrogates(text: str) -> str:
    """Lone surrogates (JSON can hold ``"\\ud800"``) are not Unicode text: make them U+FFFD,
    as tiktoken does, instead of failing deep in the ``tokenizers`` library."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _tiktoken_batch(enc: tiktoken.Encoding, texts: list[str]) -> list[list[int]]:
    """Encode on all cores, or in this thread inside worker processes that are themselves the
    parallelism (TOKENIZERS_PARALLELISM=false) or for one text: a thread pool costs more then."""
    if len(texts) <= 1 or os.environ.get("TOKENIZERS_PARALLELISM") == "false":
        return [enc.encode_ordinary(t) for t in texts]
    return enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)


class _HFBackend:
    """A ``tokenizers`` pipeline, kept in two copies: one that reads special-token text as
    plain text (the default) and one that turns it into control ids. Plain-text encoding goes
    through a tiktoken twin instead when one provably gives the same ids (several times faster;
    see :func:`camelid.tokenizer.bpe.tiktoken_twin`)."""

    def __init__(self, tok: HFTokenizer) -> None:
        self._specials_as_text = HFTokenizer.from_str(tok.to_str())
        self._specials_as_text.encode_special_tokens = True
        self._tok = tok
        self._tok.encode_special_tokens = False

    @cached_property
    def twin(self) -> tiktoken.Encoding | None:
        return tiktoken_twin(json.loads(self._tok.to_str()))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def special_tokens(self) -> dict[str, int]:
        added = self._tok.get_added_tokens_decoder()
        return {t.content: i for i, t in sorted(added.items()) if t.special}

    def encode(self, text: str, allow_special: bool) -> list[int]:
        if allow_special:
            return self._tok.encode(_without_surrogates(text), add_special_tokens=False).ids
        if self.twin is not None:
            return self.twin.encode_ordinary(text)
        return self._specials_as_text.encode(
            _without_surrogates(text), add_special_tokens=False
        ).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.twin is not None:
            return _tiktoken_batch(self.twin, texts)
        texts = [_without_surrogates(t) for t in texts]
        encs = self._specials_as_text.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def byte_lengths(self) -> dict[int, int]:
        added = set(self._tok.get_added_tokens_decoder())
        out = {}
        for token, i in self._tok.get_vocab(with_added_tokens=False).items():
            if i not in added:
                try:
                    out[i] = len(token_to_bytes(token))
                except KeyError:  # not a byte-level vocabulary
                    out[i] = len(token.encode())
        return out

    def to_hf(self) -> HFTokenizer:
        return self._tok


@dataclass(frozen=True)
class TiktokenLayout:
    """What a tiktoken ``tokenizer.model`` leaves out: the split regex and the special tokens
    (ids right after the ranks). Meta's file holds ranks only, so its rank count tells them."""

    name: str
    ranks: int
    pattern: str
    specials: tuple[str, ...]


TIKTOKEN_LAYOUTS = {
    LLAMA3_RANKS: TiktokenLayout(
        "Llama 3", LLAMA3_RANKS, LLAMA3_PATTERN, tuple(llama3_special_names())
    ),
    LLAMA4_RANKS: TiktokenLayout(
        "Llama 4", LLAMA4_RANKS, LLAMA4_PATTERN, tuple(llama4_special_names())
    ),
}


def tiktoken_layout(path: str | Path, n_ranks: int) -> TiktokenLayout:
    """The layout of a tokenizer.model with ``n_ranks`` ranks; any other count is refused,
    never read as Llama 3 (wrong ids with no error would be the worst outcome)."""
    layout = TIKTOKEN_LAYOUTS.get(n_ranks)
    if layout is None:
        known = ", ".join(f"{n:,} ({lay.name})" for n, lay in TIKTOKEN_LAYOUTS.items())
        raise TokenizerError(
            f"{path}: {n_ranks:,} BPE ranks, which is no tokenizer.model camelid knows "
            f"(known: {known}); its split pattern and special tokens cannot be told, so it is "
            "not read. Load a tokenizer.json instead."
        )
    return layout


class _TiktokenBackend:
    """Meta's ranks through tiktoken, with the split pattern and special tokens of the Llama
    version they belong to (see :func:`tiktoken_layout`)."""

    def __init__(self, ranks: dict[bytes, int], name: str, layout: TiktokenLayout) -> None:
        self._ranks = ranks
        self.layout = layout
        self._specials = list(layout.specials)
        self._enc = tiktoken.Encoding(
            name=name,
            pat_str=layout.pattern,
            mergeable_ranks=ranks,
            special_tokens={s: len(ranks) + i for i, s in enumerate(self._specials)},
        )

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def special_tokens(self) -> dict[str, int]:
        return {s: len(self._ranks) + i for i, s in enumerate(self._specials)}

    def encode(self, text: str, allow_special: bool) -> list[int]:
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return _tiktoken_batch(self._enc, texts)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids, errors="replace")

    def byte_lengths(self) -> dict[int, int]:
        return {i: len(token) for token, i in self._ranks.items()}

    def to_hf(self) -> HFTokenizer:
        return hf_from_ranks(self._ranks, self._specials, self.layout.pattern)


class Tokenizer:
    """A Llama byte-level BPE tokenizer with its special tokens and chat format.

    Build one with :meth:`load` or :func:`camelid.tokenizer.train_tokenizer`.
    """

    def __init__(self, backend: _HFBackend | _TiktokenBackend, source: str) -> None:
        self._backend = backend
        self.source = source
        self.special_tokens: dict[str, int] = backend.special_tokens()
        for name in (BOS, EOS):
            if name not in self.special_tokens:
                raise TokenizerError(
                    f"{source}: no special token {name}; camelid reads Llama 3/4 tokenizers"
                )
        self.bos_id: int = self.special_tokens[BOS]
        self.eos_id: int = self.special_tokens[EOS]
        self.eot_id: int | None = self.special_tokens.get(
            LLAMA3_CHAT.eot, self.special_tokens.get(LLAMA4_CHAT.eot)
        )
        self._chat = find_chat_format(self.special_tokens)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a directory holding tokenizer.json (preferred) or tokenizer.model, or the file
        (also a GGUF file, whose tokenizer it carries)."""
        path = Path(path)
        if path.is_dir():
            for name in (JSON_NAME, MODEL_NAME):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise TokenizerError(f"{path}: no {JSON_NAME} or {MODEL_NAME} in this directory")
        elif not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found")
        from camelid.tokenizer.gguf import is_gguf_file, load_gguf_tokenizer

        if is_gguf_file(path):  # llama.cpp's one-file format carries its tokenizer
            return load_gguf_tokenizer(path)
        if path.suffix == ".json":
            return cls(_HFBackend(_read_tokenizer_json(path)), str(path))
        ranks = _read_tiktoken_ranks(path)
        layout = tiktoken_layout(path, len(ranks))
        return cls(_TiktokenBackend(ranks, path.stem, layout), str(path))

    @property
    def vocab_size(self) -> int:
        """All ids, special tokens included (the model's embedding rows must cover them)."""
        return self._backend.vocab_size

    @cached_property
    def digest(self) -> str:
        """sha256 of the tokenizer's behaviour, so data tokenized with it can be matched to it.

        Hashes the canonical tokenizer.json form (vocab, merges, specials, regex, decoder), not
        file bytes: whitespace or key order do not change it, and a tokenizer.model has the same
        digest as the tokenizer.json that :meth:`save` writes from it.
        """
        spec = json.loads(self._backend.to_hf().to_str())
        canonical = {k: spec.get(k) for k in _BEHAVIOUR_KEYS}
        text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def encode(
        self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Text to ids. Special-token text such as ``<|eot_id|>`` stays plain text unless
        ``allow_special``: text from users must not be able to forge control tokens."""
        ids = self._backend.encode(text, allow_special)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(
        self, texts: list[str], bos: bool = False, eos: bool = False
    ) -> list[list[int]]:
        """:meth:`encode` (special-token text kept plain) for many texts, on all cores."""
        return [
            [self.bos_id] * bos + ids + [self.eos_id] * eos
            for ids in self._backend.encode_batch(list(texts))
        ]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; special tokens appear by name, broken UTF-8 as U+FFFD."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenizerError(
                f"{self.source}: cannot decode id {bad}, outside the vocabulary "
                f"(0 .. {self.vocab_size - 1})"
            )
        return self._backend.decode(ids)

    def token_byte_lengths(self) -> list[int]:
        """How many bytes of text each id stands for (0 for special tokens): the denominator
        of bits per byte, which compares models across tokenizers."""
        lengths = [0] * self.vocab_size
        for i, n in self._backend.byte_lengths().items():
            lengths[i] = n
        return lengths

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text in the Llama chat format."""
        return "".join(
            p.text for p in chat_pieces(self._chat_format(), messages, add_generation_prompt)
        )

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        return_assistant_mask: bool = False,
    ) -> list[int] | tuple[list[int], list[int]]:
        """The conversation as ids; with ``return_assistant_mask`` also a 0/1 list that is 1 on
        what a fine-tune trains on (assistant content and its turn-end token)."""
        ids: list[int] = []
        mask: list[int] = []
        for piece in chat_pieces(self._chat_format(), messages, add_generation_prompt):
            part = [self.special_tokens[piece.text]] if piece.special else self.encode(piece.text)
            ids += part
            mask += [int(piece.trained)] * len(part)
        return (ids, mask) if return_assistant_mask else ids

    def save(self, directory: str | Path, *, model_max_length: int = 131072) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, loadable by
        ``transformers``' ``AutoTokenizer`` with the same ids (it adds BOS, as
        ``encode(text, bos=True)``), each file atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": model_max_length,
        }
        if self._chat is not None:
            config["chat_template"] = self._chat.jinja()
        write_text_atomic(directory / JSON_NAME, self._backend.to_hf().to_str(pretty=True))
        write_text_atomic(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        specials = {"bos_token": BOS, "eos_token": EOS}
        write_text_atomic(directory / SPECIAL_TOKENS_NAME, json.dumps(specials, indent=2) + "\n")

    def _chat_format(self) -> ChatFormat:
        if self._chat is None:
            raise TokenizerError(
                f"{self.source}: no chat header tokens (<|start_header_id|>/<|header_start|>)"
            )
        return self._chat

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _read_tokenizer_json(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the library raises plain Exception for any bad file
        raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Meta's format: one ``base64(token) rank`` per line; ranks must be 0 .. n-1 and cover
    every single byte (else some text could not be encoded)."""
    hint = "expected tiktoken BPE ranks: one 'base64-token rank' per line"
    try:
        ranks = load_tiktoken_bpe(str(path))
    except (OSError, ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: {hint} ({e})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: {hint}; ranks must be 0 .. n-1, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{path}: {len(missing)} single bytes have no rank (first: {missing[0]:#04x})"
        )
    return ranks
