"""``camelid contamination``: which task items appear in a prepared dataset's training data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from camelid.errors import CamelidError

EPILOG = """methods:
  ngram   words (NFKC, lower-case, punctuation as spaces); an item is dirty when any of
          its n-word n-grams (default 13) occurs inside one training document
  llama2  the dataset's tokens; a token is contaminated inside a shared n-gram of n tokens
          (default 11) or more; an item is dirty when --dirty-share (0.8) of its tokens are
          (exact matches only: the Llama 2 paper also allows a few mismatched tokens)
  An item shorter than n uses all its words (tokens) as one n-gram.

examples:
  camelid contamination --data data/web --task mmlu-like.jsonl --task qa.jsonl
  camelid contamination --data data/web --task humaneval --method llama2 --out contam.json"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "contamination",
        help="find task items that appear in a prepared dataset's training data",
        description="Check every item of one or more tasks against the training split of a "
        "dataset written by `camelid prepare`: the training tokens are decoded (ngram) or "
        "compared as tokens (llama2) with the dataset's own tokenizer. Prints a table of dirty "
        "items per task; --out writes a JSON report (every item: dirty, matched n-grams, "
        "share) that names the dataset's manifest and each task's data SHA-256.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data", required=True, type=Path, metavar="DIR", help="a prepared dataset directory"
    )
    p.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="SPEC",
        help="a task file, KIND:PATH, or humaneval (repeatable)",
    )
    p.add_argument("--method", choices=("ngram", "llama2"), default="ngram", help="(default ngram)")
    p.add_argument(
        "--n", type=int, default=None, help="n-gram length (default: 13 words; llama2 11 tokens)"
    )
    p.add_argument(
        "--dirty-share",
        type=float,
        default=None,
        metavar="SHARE",
        help="llama2: share of an item's tokens that makes it dirty (default 0.8)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="the dataset's tokenizer, when it is not at the path its manifest records",
    )
    p.add_argument(
        "--skip-bad", action="store_true", help="skip malformed task lines instead of stopping"
    )
    p.add_argument(
        "--out", type=Path, default=None, metavar="REPORT", help="write the JSON report here"
    )
    p.add_argument(
        "--show", type=int, default=10, metavar="N", help="dirty items listed per task (default 10)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from camelid.eval import contamination as c
    from camelid.eval.tasks import load_task

    if args.dirty_share is not None and args.method != "llama2":
        raise CamelidError("--dirty-share applies to --method llama2 only")
    tasks = []
    for spec in args.task:
        try:
            tasks.append(load_task(spec, skip_bad=args.skip_bad))
        except ImportError as e:  # a built-in task whose package is not installed
            raise CamelidError(f"--task {spec}: {e}") from None
    report = c.check_contamination(
        args.data,
        tasks,
        method=args.method,
        n=args.n,
        dirty_share=c.DIRTY_SHARE if args.dirty_share is None else args.dirty_share,
        tokenizer=args.tokenizer,
        progress=sys.stderr.isatty(),
    )
    if args.out is not None:
        c.write_report(report, args.out)
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
        return 0
    d = report["data"]
    unit = "words" if report["method"] == "ngram" else "tokens"
    rule = f"{report['n']}-{unit[:-1]} n-grams"
    if report["method"] == "llama2":
        rule += f", dirty at a share of {report['dirty_share']:g} or more"
    print(f"method   {report['method']} ({rule})")
    docs = f", {d['documents']:,} documents" if isinstance(d.get("documents"), int) else ""
    print(f"data     {args.data} ({d['split']} split: {d['tokens']:,} tokens{docs})")
    rows = c.summary(report)
    width = max(12, *(len(name) for name, *_ in rows))
    print(f"\n{'task':<{width}} {'items':>7} {'dirty':>7} {'dirty %':>8}")
    for name, items, dirty, pct in rows:
        print(f"{name:<{width}} {items:>7} {dirty:>7} {pct:>7.1f}%")
    for task in report["tasks"]:
        dirty = [i for i in task["items"] if i["dirty"]]
        if not dirty or args.show <= 0:
            continue
        print(f"\ndirty items of {task['name']} (id, matched n-grams, share):")
        for item in dirty[: args.show]:
            print(f"  {item['id']:<20} {item['matches']:>5}/{item['ngrams']:<5} "
                  f"{100 * item['share']:5.1f}%")  # fmt: skip
        if len(dirty) > args.show:
            more = f"--out {args.out}" if args.out else "--out or --json"
            print(f"  ... and {len(dirty) - args.show} more (every item: {more})")
    if args.out is not None:
        print(f"\nreport   {args.out}")
    return 0
