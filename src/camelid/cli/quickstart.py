"""``camelid quickstart``: the whole pipeline on the built-in corpus."""

from __future__ import annotations

import argparse

from camelid.cli.args import add_set_arg
from camelid.cli.train import exit_status, print_summary
from camelid.data import sources
from camelid.quickstart import quickstart


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="the whole pipeline on the built-in corpus: tokenizer, data, a small Llama, report",
        description="Train a tokenizer on this Python's standard library, prepare deduplicated "
        "token shards, pre-train a small Llama for a few minutes on whatever device is present, "
        "report its validation loss, print a sample Python completion and export Hugging Face "
        "weights. Re-running reuses the tokenizer and data made from the same corpus and "
        "vocabulary size (other ones are refused unless --overwrite); the model is trained "
        "afresh. Ctrl-C during training saves a checkpoint, says how to resume, and exits 130.",
    )
    p.add_argument(
        "--out", default="runs/quickstart", help="output directory (default: %(default)s)"
    )
    p.add_argument(
        "--corpus", default=sources.BUILTIN, help="corpus (default: the built-in 'stdlib')"
    )
    p.add_argument(
        "--vocab-size", type=int, default=4096, help="tokenizer size (default: %(default)s)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain the tokenizer and re-prepare the data in --out even if they were made "
        "from another corpus or vocabulary size",
    )
    add_set_arg(p, "override a key of the quickstart recipe, e.g. --set train.steps=50")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = quickstart(args.out, args.corpus, args.vocab_size, args.set, overwrite=args.overwrite)
    print_summary(summary)
    if summary.status != "finished":  # stopped by Ctrl-C: the trainer saved a checkpoint
        return exit_status(summary)
    if summary.sample is not None:
        print(f"\nsample completion of {summary.sample_prompt!r}:")
        print("    " + (summary.sample_prompt + summary.sample).replace("\n", "\n    "))
    print(f"\ntotal {summary.total_s / 60:.1f} min")
    return 0
