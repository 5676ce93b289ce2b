"""Byte-level BPE as Llama 3 defines it: the split regex, the special-token names, and the one
function that turns a table of byte-string ranks into a Hugging Face ``tokenizers`` pipeline.

Meta ships Llama 3's tokenizer as tiktoken ranks (``tokenizer.model``); the Hugging Face
``tokenizer.json`` is the same ranks written as BPE merges. tiktoken merges, at every step, the
adjacent pair whose concatenation has the lowest rank. A BPE model reproduces that when its merge
list holds *every* way to split each token into two tokens, ordered by the rank of the result, and
when a piece that is already a whole token is taken as is (``ignore_merges``).
"""

from __future__ import annotations

from typing import Any

import tiktoken
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

# Splits text into pieces before BPE: contractions, words (with one leading non-letter), numbers
# of up to three digits, punctuation runs, newlines, other whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 4's split, copied from Meta's reference tokenizer (llama-models 0.3.0,
# llama_models/llama4/tokenizer.py, ``Tokenizer.O200K_PATTERN``): words split at case changes
# with their contraction attached, numbers of up to three digits, punctuation runs that may end
# in newlines or slashes, newlines, other whitespace.
LLAMA4_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"

# The Llama 3.1 special tokens that have a meaning, at their offsets after the ranks; the other
# offsets hold <|reserved_special_token_N|>, N counting up in id order.
_NAMED_SPECIALS = {
    0: BOS,
    1: EOS,
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}
MIN_SPECIALS = max(_NAMED_SPECIALS) + 1


def llama3_special_names(n: int = 256) -> list[str]:
    """The names of Llama 3.1's ``n`` special tokens, in id order."""
    names, reserved = [], 0
    for i in range(n):
        if i in _NAMED_SPECIALS:
            names.append(_NAMED_SPECIALS[i])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


LLAMA3_RANKS = 128_000
LLAMA4_RANKS = 200_000
LLAMA4_NUM_SPECIALS = 2048


def _reserved(group: str, count: int, start: int = 0) -> list[str]:
    return [f"<|{group}_reserved_special_token_{i}|>" for i in range(start, start + count)]


def llama4_special_names() -> list[str]:
    """Llama 4's 2,048 special tokens in id order (ids 200000 ..), as Meta's reference
    tokenizer (llama-models 0.3.0, llama_models/llama4/tokenizer.py) assigns them."""
    text_post_train = [  # 200005 .. 200079
        "<|header_start|>",
        "<|header_end|>",
        "<|eom|>",
        "<|eot|>",
        "<|step|>",
        *_reserved("text_post_train", 6),
        "<|python_start|>",
        "<|python_end|>",
        "<|finetune_right_pad|>",
        *_reserved("text_post_train", 61, 8),
    ]
    vision = [  # 200080 .. 201133
        "<|image_start|>",
        "<|image_end|>",
        *_reserved("vision", 2),
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
        *_reserved("vision", 4, 2),
        "<|image|>",
        *_reserved("vision", 1, 6),
        "<|patch|>",
        *_reserved("vision", 1041, 7),
    ]
    reasoning = [  # 201134 .. 201143
        *_reserved("reasoning", 8),
        "<|reasoning_thinking_start|>",
        "<|reasoning_thinking_end|>",
    ]
    basic = [BOS, EOS, "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    named = basic + text_post_train + vision + reasoning
    rest = [f"<|reserved_special_token_{i}|>" for i in range(LLAMA4_NUM_SPECIALS - len(named))]
    return named + rest


def _byte_to_char() -> dict[int, str]:
    """GPT-2's table: every byte as one printable character, so byte strings fit in a vocab.

    Printable Latin-1 bytes stand for themselves; the rest are shifted to code points 256 and up.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    for shift, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + shift)
    return table


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def bytes_to_token(data: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in data)


def token_to_bytes(token: str) -> bytes:
    return bytes(CHAR_TO_BYTE[c] for c in token)


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, ordered by the rank of the token they form."""
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(a, b) for a, b in splits if a in ranks and b in ranks]
        splits.sort(key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))
        merges += splits
    return merges


def tiktoken_twin(spec: dict[str, Any]) -> tiktoken.Encoding | None:
    """A tiktoken encoder that provably gives the same ids as this tokenizer.json for plain
    text (special-token text is not matched), or None.

    tiktoken runs the same byte-level BPE several times faster than ``tokenizers``. The proof
    is structural: no normalizer, the Llama 3 or Llama 4 split followed by a plain ByteLevel
    step, a BPE model with ``ignore_merges`` whose ranks are 0..n-1 over all 256 bytes, and a
    merge list that holds every two-token split of every token, in the order of the rank of its
    result (see the module docstring). Anything else returns None.
    """
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if spec.get("normalizer") is not None or not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    pattern = (split.get("pattern") or {}).get("Regex")
    if (
        split.get("type") != "Split"
        or pattern not in (LLAMA3_PATTERN, LLAMA4_PATTERN)
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex")
        or byte_level.get("add_prefix_space")
    ):
        return None
    if (
        model.get("type") != "BPE"
        or not model.get("ignore_merges")
        or model.get("byte_fallback")
        or model.get("dropout")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        return None
    added = {t["content"] for t in spec.get("added_tokens", [])}
    try:
        ranks = {token_to_bytes(t): i for t, i in model["vocab"].items() if t not in added}
        merges = [
            (token_to_bytes(a), token_to_bytes(b))
            for a, b in (m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"])
        ]
    except (KeyError, ValueError):  # a character outside the byte alphabet
        return None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(
        bytes([b]) not in ranks for b in range(256)
    ):
        return None
    order = [ranks.get(a + b, -1) for a, b in merges]
    if -1 in order or order != sorted(order) or set(merges) != set(merges_from_ranks(ranks)):
        return None
    return tiktoken.Encoding(
        name="camelid-twin", pat_str=pattern, mergeable_ranks=ranks, special_tokens={}
    )


def hf_from_ranks(ranks: dict[bytes, int], specials: list[str], pattern: str) -> HFTokenizer:
    """A ``tokenizers`` pipeline that encodes exactly as tiktoken does with these ranks.

    ``ranks`` must be the ids ``0 .. len(ranks)-1``; the specials get the ids after them.
    """
    merges = [(bytes_to_token(a), bytes_to_token(b)) for a, b in merges_from_ranks(ranks)]
    vocab = {bytes_to_token(token): rank for token, rank in ranks.items()}
    named = {name: len(ranks) + i for i, name in enumerate(specials)}
    return hf_from_vocab(vocab, merges, named, pattern)


def hf_from_vocab(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    specials: dict[str, int],
    pattern: str,
) -> HFTokenizer:
    """The Llama byte-level BPE pipeline over a vocabulary (byte-level token text → id), its
    merges in rank order and the special tokens (name → id), as :func:`hf_from_ranks` builds
    it; a GGUF file's vocabulary is read back through here. Specials whose ids follow the
    vocabulary are appended in id order; one inside it keeps its id there."""
    vocab = dict(vocab)
    run = iter(range(len(vocab), len(vocab) + len(specials)))
    for name in sorted(specials, key=specials.__getitem__):
        if specials[name] != next(run, None):  # not in the run that follows the vocabulary
            vocab[name] = specials[name]  # added tokens then take the vocabulary's id

    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    order = sorted(specials, key=specials.__getitem__)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in order])
    if BOS in specials:
        # What transformers adds when asked for special tokens; camelid adds BOS itself.
        bos_id = specials[BOS]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    return tok
