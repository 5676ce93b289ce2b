"""``camelid prepare``: clean, deduplicate and tokenize a corpus into token shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from camelid.cli.args import add_corpus_args, corpus_config
from camelid.data import prepare
from camelid.data.clean import CleanConfig
from camelid.data.pipeline import PrepareConfig
from camelid.data.sft import SFTConfig
from camelid.errors import DataError

# The cleaning options offered as flags, each with CleanConfig's default.
_CLEAN_FLAGS = (
    "normalize",
    "min_chars",
    "max_chars",
    "min_alnum_fraction",
    "max_repeated_line_fraction",
    "max_line_chars",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="clean, deduplicate and tokenize a corpus into token shards",
        description="Clean (Unicode normalisation, quality filters), deduplicate (exact and "
        "MinHash near-duplicates) and tokenize a corpus in parallel into token shards for "
        "pre-training, with a manifest.json. Re-running with the same inputs reuses the result; "
        "an interrupted run is restarted cleanly. With --format chat or prompt-completion it "
        "tokenizes JSONL conversations with the chat template into SFT shards with a loss mask "
        "instead (assistant turns and their end-of-turn token learned, nothing else; no "
        "cleaning or deduplication).",
    )
    add_corpus_args(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    g = p.add_argument_group("SFT data (--format chat / prompt-completion)")
    g.add_argument(
        "--format",
        choices=("text", "chat", "prompt-completion"),
        default="text",
        help="text: pre-training documents (default); chat: JSONL records with 'messages' "
        "(system/user/assistant turns) or 'prompt'/'completion'; prompt-completion: only "
        "the pairs",
    )
    g.add_argument(
        "--max-len",
        type=int,
        default=SFTConfig.max_len,
        metavar="N",
        help="most tokens of one conversation, BOS and turn ends included; longer ones are "
        "skipped and counted (default: %(default)s; train with seq_len >= N - 1)",
    )
    g.add_argument(
        "--truncate",
        action="store_true",
        help="keep a too-long conversation's longest prefix of whole messages that ends with "
        "an assistant turn and fits, instead of skipping it",
    )
    g.add_argument(
        "--inspect",
        action="store_true",
        help="after preparing, print one training example with what is not learned marked",
    )
    p.add_argument(
        "--shard-tokens", type=int, default=PrepareConfig.shard_tokens, help="tokens per shard"
    )
    p.add_argument("--no-exact-dedup", action="store_true", help="keep exact duplicates")
    p.add_argument("--no-near-dedup", action="store_true", help="keep near duplicates")
    p.add_argument(
        "--near-dup-threshold",
        type=float,
        default=PrepareConfig.near_dup_threshold,
        help="estimated Jaccard similarity of token 5-gram sets above which a document is a "
        "near duplicate (default: %(default)s)",
    )
    defaults = CleanConfig()
    for name in _CLEAN_FLAGS:
        value = getattr(defaults, name)
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=type(value),
            default=value,
            help=f"cleaning: {name.replace('_', ' ')} (default: %(default)s)",
        )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a different dataset already in --out"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format != "text":
        return run_sft(args)
    if args.inspect or args.truncate:
        flag = "--inspect" if args.inspect else "--truncate"
        raise DataError(f"{flag} is for SFT data (--format chat or prompt-completion)")
    config = corpus_config(
        args,
        clean=CleanConfig(**{name: getattr(args, name) for name in _CLEAN_FLAGS}),
        exact_dedup=not args.no_exact_dedup,
        near_dedup=not args.no_near_dedup,
        near_dup_threshold=args.near_dup_threshold,
        shard_tokens=args.shard_tokens,
    )
    manifest = Path(args.out) / "manifest.json"
    before = manifest.stat().st_mtime_ns if manifest.exists() else None
    m = prepare(config, args.tokenizer, args.out, workers=args.workers, overwrite=args.overwrite,
                progress=sys.stderr.isatty())  # fmt: skip
    st, sp = m["stats"], m["splits"]
    tokens = sum(s["tokens"] for s in sp.values())
    if before == manifest.stat().st_mtime_ns:
        print(f"{args.out}: already prepared from the same corpus, options and tokenizer")
    removed = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in st["removed"].items() if v)
    read = st["read"]
    skipped = [
        f"{read[k]} {label}"
        for k, label in (
            ("binary_files", "binary files"),
            ("non_utf8_files", "non-UTF-8 files"),
            ("bad_json_lines", "non-JSON lines"),
            ("missing_field", f"records without '{args.text_field}'"),
        )
        if read[k]
    ]
    print(f"files        {st['files']}" + (f" (skipped {', '.join(skipped)})" if skipped else ""))
    if read["first_bad_lines"]:
        print(f"  first bad  {', '.join(read['first_bad_lines'])}")
    if read["missing_field"] and read.get("fields_found"):
        print(f"  they hold  {', '.join(read['fields_found'])} (choose with --text-field)")
    print(f"documents    {st['documents']} read, {st['kept']} kept" +
          (f" (removed: {removed})" if removed else ""))  # fmt: skip
    for name, s in sp.items():
        print(f"{name:<12} {s['documents']} documents, {s['tokens']:,} tokens, "
              f"{len(s['shards'])} shard(s) of {m['dtype']}")  # fmt: skip
    print(f"throughput   {tokens / max(m['seconds'], 1e-9):,.0f} tokens/s ({m['seconds']:.1f}s)")
    print(f"output       {args.out}/manifest.json")
    if sp["validation"]["documents"] == 0 and config.val_fraction > 0:
        # Files (or records) go to validation by a hash of their name: few files, none may.
        print(f"camelid: warning: no document fell into the validation split (--val-fraction "
              f"{config.val_fraction:g} of {st['documents']} documents); training will measure "
              "no validation loss: raise --val-fraction", file=sys.stderr)  # fmt: skip
    return 0


def run_sft(args: argparse.Namespace) -> int:
    """``--format chat`` / ``prompt-completion``: SFT shards with their loss mask."""
    from camelid.data.packing import SFTData, SFTLoader
    from camelid.data.sft import prepare_sft, show_example
    from camelid.tokenizer import Tokenizer

    if not args.corpus:
        raise DataError(f"--format {args.format} needs --corpus FILE.jsonl (or a directory)")
    config = SFTConfig(
        corpus=tuple(args.corpus),
        globs=tuple(args.glob or ()),
        format=args.format,
        val_fraction=args.val_fraction,
        max_len=args.max_len,
        truncate=args.truncate,
        shard_tokens=args.shard_tokens,
    )
    manifest = Path(args.out) / "manifest.json"
    before = manifest.stat().st_mtime_ns if manifest.exists() else None
    m = prepare_sft(config, args.tokenizer, args.out, overwrite=args.overwrite,
                    progress=sys.stderr.isatty())  # fmt: skip
    if before == manifest.stat().st_mtime_ns:
        print(f"{args.out}: already prepared from the same data, options and tokenizer")
    sft, sp = m["sft"], m["splits"]
    kinds = ", ".join(f"{v} {k}" for k, v in sft["by_kind"].items() if v)
    print(f"records      {sft['records']} ({kinds}) in {m['stats']['files']} file(s)")
    if sft["truncated"] or sft["skipped_too_long"]:
        print(
            f"too long     {sft['truncated']} truncated, {sft['skipped_too_long']} skipped "
            f"(over --max-len {sft['max_len']}; first: {', '.join(sft['too_long_first'])})"
        )
    for name, s in sp.items():
        share = s["learned_tokens"] / max(s["tokens"], 1)
        print(
            f"{name:<12} {s['documents']} conversations, {s['tokens']:,} tokens, "
            f"{s['learned_tokens']:,} learned ({share:.0%}), {len(s['shards'])} shard(s)"
        )
    if sp["train"]["documents"]:  # what packing into rows of max_len - 1 inputs pads
        packed = SFTLoader(args.out, "train", batch_size=1, seq_len=sft["max_len"] - 1)
        print(f"packing      {packed.num_rows} row(s) of {packed.seq_len} (--max-len - 1) tokens, "
              f"{packed.padding_share:.1%} padding")  # fmt: skip
    print(f"output       {args.out}/manifest.json")
    if sp["validation"]["documents"] == 0 and config.val_fraction > 0:
        print(f"camelid: warning: no conversation fell into the validation split "
              f"(--val-fraction {config.val_fraction:g} of {sft['records']}): raise "
              "--val-fraction to measure a validation loss", file=sys.stderr)  # fmt: skip
    if args.inspect:
        split = "train" if sp["train"]["documents"] else "validation"
        data = SFTData(args.out, split)
        tokenizer = Tokenizer.load(args.tokenizer)
        print(f"\nexample      {split} conversation 0 of {len(data)}, as the shards hold it:")
        print(show_example(tokenizer, *data.example(0), color=sys.stdout.isatty()))
    return 0
