"""``camelid ledger``: list every evaluation of a model's variants and check the chain."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from camelid.errors import CamelidError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ledger",
        help="list the evaluation ledger of a run or model and check its chain",
        description="List the entries of an evaluation ledger (eval-ledger.jsonl: every "
        "`camelid eval` appends one, hash-chained) and check that none was edited or "
        "removed. PATH is the ledger file, or a run or model directory holding one. Prints "
        "how many variants (distinct weights) were evaluated and the head hash to publish.",
    )
    p.add_argument("path", type=Path, metavar="PATH", help="a ledger file, run or model directory")
    p.add_argument("--json", action="store_true", help="print the entries as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from camelid.eval import ledger

    path = args.path
    if path.is_dir():
        path = path / ledger.LEDGER_NAME
        if not path.exists():
            raise CamelidError(f"{args.path}: no {ledger.LEDGER_NAME} (nothing was evaluated)")
    check = ledger.read(path)
    groups = ledger.variants(check.entries)
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(path),
                    "head": check.head,
                    "entries": check.entries,
                    "variants": len(groups),
                    "problems": check.problems,
                },
                indent=1,
            )
        )
        return 1 if check.problems else 0
    print(f"{'seq':>4}  {'date':<20} {'weights':<16} {'task':<20} scores")
    for e in check.entries:
        scores = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in (e.get("metrics") or {}).items()
            if k != "items" and v is not None
        )
        print(
            f"{e.get('seq', '?'):>4}  {e.get('date', ''):<20} "
            f"{str(e.get('weights_digest', ''))[:16]:<16} {str(e.get('task', ''))[:20]:<20} "
            f"{scores}"
        )
    print(
        f"{len(check.entries)} evaluations of {len(groups)} variants (distinct weights); "
        f"head {check.head}"
    )
    if check.problems:
        for p in check.problems:
            print(f"  BROKEN: {p}")
        return 1
    return 0
