"""Train a Llama 3-style byte-level BPE tokenizer on a corpus.

The ``tokenizers`` trainer learns the merges; the result is then rebuilt from its ranks (see
:func:`camelid.tokenizer.bpe.hf_from_ranks`) so that it behaves as tiktoken does, like Llama 3's
own tokenizer.json, and can be written as a tiktoken ``tokenizer.model`` without changing ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from camelid.errors import TokenizerError
from camelid.tokenizer.bpe import (
    LLAMA3_PATTERN,
    MIN_SPECIALS,
    hf_from_ranks,
    llama3_special_names,
    token_to_bytes,
)
from camelid.tokenizer.tokenizer import Tokenizer, _HFBackend


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, num_special: int = 256, show_progress: bool = False
) -> Tokenizer:
    """Learn ``vocab_size - num_special`` byte-level BPE tokens (the 256 bytes included), then
    append the Llama 3.1 special tokens, as Llama 3 lays out its 128000 + 256 ids.

    A corpus too small to learn that many merges gives a smaller vocabulary; the special tokens
    then follow the learned ones directly, and ``vocab_size`` reports the real size.
    """
    if num_special < MIN_SPECIALS:
        raise TokenizerError(
            f"num_special={num_special}: at least {MIN_SPECIALS} are needed "
            "(BOS, EOS, chat headers, turn ends)"
        )
    minimum = 256 + num_special + 1
    if vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: the minimum is {minimum} "
            f"(256 bytes + {num_special} special tokens + 1 merge)"
        )
    hf = HFTokenizer(models.BPE(ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - num_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer)
    ranks = {token_to_bytes(token): i for token, i in hf.get_vocab().items()}
    specials = llama3_special_names(num_special)
    return Tokenizer(_HFBackend(hf_from_ranks(ranks, specials, LLAMA3_PATTERN)), "trained")
