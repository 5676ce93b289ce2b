"""Train a Llama 3-style byte-level BPE tokenizer on a corpus.

The ``tokenizers`` trainer learns the merges; the result is then rebuilt from its ranks (see
:func:`camelid.tokenizer.bpe.hf_from_ranks`) so that it behaves as tiktoken does, like Llama 3's
own tokenizer.json, and can be written as a tiktoken ``tokenizer.model`` without changing ids.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

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
from camelid.tokenizer.tokenizer import JSON_NAME, MODEL_NAME, Tokenizer, _HFBackend


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
    _train_interruptibly(hf, trainer, texts)
    ranks = {token_to_bytes(token): i for token, i in hf.get_vocab().items()}
    specials = llama3_special_names(num_special)
    return Tokenizer(_HFBackend(hf_from_ranks(ranks, specials, LLAMA3_PATTERN)), "trained")


def _train_interruptibly(
    hf: HFTokenizer, trainer: trainers.BpeTrainer, texts: Iterable[str]
) -> None:
    """``hf.train_from_iterator``, but a Ctrl-C while it reads the corpus stops it soon.

    The trainer is Rust: it holds the main thread until it ends and reads the texts on threads
    of its own, so Python would act on a Ctrl-C only when the whole training is done. Here the
    signal's wakeup byte is watched: at a Ctrl-C the feed ends, the trainer finishes on what it
    has (only its merge step, which cannot be stopped, still runs) and KeyboardInterrupt is
    raised, never a tokenizer trained on part of the corpus. The training stays on the main
    thread and is waited for: one left running in Rust (on a thread given up on) could call
    into Python while the interpreter shuts down, which aborts the process.
    """
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        hf.train_from_iterator(texts, trainer)
        return
    stop = threading.Event()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def watch() -> None:
        while data := os.read(read_end, 64):  # b"" once the write end is closed
            if signal.SIGINT in data:
                stop.set()

    def feed() -> Iterator[str]:
        for text in texts:
            if stop.is_set():
                return
            yield text

    watcher = threading.Thread(target=watch, name="camelid-sigint-watch", daemon=True)
    watcher.start()
    previous = signal.set_wakeup_fd(write_end)
    try:
        hf.train_from_iterator(feed(), trainer)
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write_end)
        watcher.join()
        os.close(read_end)
    if stop.is_set():  # the handler raises it too; this makes sure no partial result escapes
        raise KeyboardInterrupt


def check_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any training, an ``out`` that a trained tokenizer must not be written to:
    an existing file, or a directory that already holds a tokenizer (unless ``overwrite``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"--out {out}: is an existing file, not a directory")
    held = [name for name in (JSON_NAME, MODEL_NAME) if (out / name).exists()]
    if held and not overwrite:
        raise TokenizerError(
            f"--out {out}: already holds a tokenizer ({', '.join(held)}); "
            "pass --overwrite to replace it, or choose another --out"
        )
    return out


def save_replacing(tok: Tokenizer, out: str | Path) -> None:
    """Save ``tok`` into ``out``; a ``tokenizer.model`` there is the tokenizer being replaced
    (loading prefers tokenizer.json, but other tools may read the .model), so it goes."""
    out = Path(out)
    tok.save(out)
    (out / MODEL_NAME).unlink(missing_ok=True)


def shortfall(tok: Tokenizer, vocab_size: int) -> str | None:
    """A note when the corpus could not fill ``vocab_size`` (the trainer then stops early and
    the tokenizer is smaller): the size a model built for it must use."""
    if tok.vocab_size >= vocab_size:
        return None
    return (
        f"the corpus filled only {tok.vocab_size:,} of {vocab_size:,} tokens; "
        f"the tokenizer has {tok.vocab_size:,}"
    )
