"""``camelid tokenizer train``: train a byte-level BPE tokenizer on a corpus."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

from camelid.cli.args import add_corpus_args, corpus_config
from camelid.data.pipeline import training_texts
from camelid.errors import CamelidError
from camelid.tokenizer import train_tokenizer
from camelid.tokenizer.train import check_out_dir, save_replacing, shortfall


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer (Llama 3 split pattern and special tokens)",
        description="Tokenizer tools.",
    )
    p.set_defaults(func=lambda args, p=p: p.print_help() or 2)
    tsub = p.add_subparsers(title="tokenizer commands", metavar="<command>")
    t = tsub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer on a corpus",
        description="Train a byte-level BPE tokenizer with the Llama 3 pre-tokenization pattern "
        "and special tokens on the training split of a corpus, and write tokenizer.json and "
        "tokenizer_config.json (with the Llama 3 chat template) to --out. An --out that is a "
        "file, or holds a tokenizer already (unless --overwrite), is refused before training. "
        "A corpus too small for --vocab-size gives a smaller tokenizer, and says so.",
    )
    add_corpus_args(t)
    t.add_argument("--vocab-size", type=int, required=True, help="total size, specials included")
    t.add_argument(
        "--num-special", type=int, default=256, help="special tokens, reserved ones included "
        "(default: 256, as Llama 3)"
    )  # fmt: skip
    t.add_argument(
        "--out", required=True, help="output directory (refused if it holds a tokenizer)"
    )
    t.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    if args.vocab_size <= 0:
        raise CamelidError(f"--vocab-size must be positive, got {args.vocab_size}")
    t0 = time.perf_counter()
    check_out_dir(args.out, args.overwrite)  # before the training, not after it
    config = corpus_config(args)
    corpus = training_texts(config)  # resolves the corpus now: bad paths fail first
    n_docs = 0

    def texts() -> Iterator[str]:
        nonlocal n_docs
        for text in corpus:
            n_docs += 1
            yield text

    tok = train_tokenizer(
        texts(), args.vocab_size, num_special=args.num_special, show_progress=sys.stderr.isatty()
    )
    if n_docs == 0:
        raise CamelidError(
            f"no training documents in {', '.join(config.corpus)}: each was held out for "
            f"validation (by name, --val-fraction {config.val_fraction}) or removed by the "
            "cleaning filters; with one or a few files, try --val-fraction 0"
        )
    save_replacing(tok, args.out)
    note = shortfall(tok, args.vocab_size)
    if note:
        print(f"camelid: note: {note}", file=sys.stderr)
    asked = f" (of {args.vocab_size:,} asked: the corpus filled no more)" if note else ""
    print(
        f"trained a {tok.vocab_size:,}-token BPE tokenizer{asked} on {n_docs} documents "
        f"in {time.perf_counter() - t0:.1f}s -> {args.out}"
    )
    return 0
