"""``camelid verify``: check a result file against a model, its data and its ledger."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check an evaluation result against the model it claims",
        description="Check RESULT (written by `camelid eval`) against MODEL: the file's seal "
        "(which section was edited), its metrics against its own items, the weights and "
        "tokenizer digests, the task data's SHA-256, its entry in the evaluation ledger, an "
        "Ed25519 signature (with --key), and a re-score of a random sample of items on the "
        "model. Exit 0 when everything holds; 1, with every mismatch named, when not.",
    )
    p.add_argument("result", type=Path, metavar="RESULT", help="a result file")
    p.add_argument("model", metavar="MODEL", help="a Hugging Face directory, a run or a checkpoint")
    p.add_argument(
        "--sample", type=int, default=16, help="items to re-score (default 16; 0: none; -1: all)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the sample (default: random)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="allowed logprob difference per token (default 1e-4)",
    )
    p.add_argument(
        "--key",
        type=Path,
        default=None,
        help="Ed25519 public key (PEM): the result must be signed with its pair",
    )
    p.add_argument(
        "--task",
        type=Path,
        default=None,
        help="the task data, when not at the path the result records",
    )
    p.add_argument(
        "--ledger",
        type=Path,
        default=None,
        help="the ledger, when not at the path the result records",
    )
    p.add_argument("--device", default="auto", help="device for re-scoring (default: auto)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from camelid.eval.results import verify

    say = (lambda _: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    verdict = verify(
        args.result,
        args.model,
        sample=args.sample,
        seed=args.seed,
        tolerance=args.tolerance,
        public_key=args.key,
        task_path=args.task,
        ledger_path=args.ledger,
        device=args.device,
        log=say,
    )
    if verdict.ok:
        if not args.quiet:
            print(f"verified: {args.result} holds for {args.model} ({', '.join(verdict.checked)})")
        return 0
    print(f"{args.result}: FAILED verification against {args.model}:", file=sys.stderr)
    for problem in verdict.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1
