"""``camelid eval``: score a model on tasks; every result names the exact weights and data."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from camelid.cli.args import add_engine_args, int8_of
from camelid.errors import CamelidError
from camelid.eval.runner import Options

EPILOG = """task files (JSONL, one item per line; the kind is told by the keys, or KIND:PATH):
  choice      {"context": "...", "choices": ["...", "..."], "gold": 0}   acc, acc_norm
  generate    {"prompt": "...", "answer": "..." or ["...", ...]}        exact_match
  perplexity  a .txt file, JSONL of {"text": "..."}, or a prepared dataset directory
              (its validation split): perplexity, bits per byte
  humaneval   the 164 HumanEval problems (pass@k, programs run in a sandbox)

examples:
  camelid eval runs/small --task mmlu-like.jsonl --shots 5
  camelid eval out/hf --task humaneval --samples 10 --k 1 10 --temperature 0.8
  camelid eval out/hf --task book.txt --out results/book.json
  camelid verify results/book.json out/hf"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model on tasks (multiple choice, generation, perplexity, HumanEval)",
        description="Score MODEL (a Hugging Face directory, a training run or a checkpoint) on "
        "one or more tasks. Each result file records the weights and tokenizer digests, the "
        "task data's SHA-256, the prompt template, how it was scored and every item's "
        "outputs, and is appended to the model's evaluation ledger; `camelid verify` checks "
        "it against the model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="a Hugging Face directory, a run or a checkpoint")
    p.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="SPEC",
        help="a task file or directory, KIND:PATH, or humaneval (repeatable)",
    )
    p.add_argument("--limit", type=int, default=None, help="score only the first N items")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per item (default 0)")
    p.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="seed of the few-shot draw and of sampling (default 1234)",
    )
    p.add_argument(
        "--delimiter", default=" ", help="between a context and its continuation (default: a space)"
    )
    p.add_argument(
        "--contamination",
        type=Path,
        default=None,
        metavar="REPORT",
        help="a `camelid contamination` report on the task: mark items dirty/clean and add "
        "the clean subset's metrics",
    )
    p.add_argument(
        "--clean-only",
        action="store_true",
        help="with --contamination: score only the clean items",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed task lines (counted in the result) instead of stopping",
    )
    g = p.add_argument_group("generation tasks")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate (default: 64; HumanEval 512)",
    )
    g.add_argument(
        "--until",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop string (repeatable; default: a blank line)",
    )
    g.add_argument(
        "--match",
        choices=("exact", "regex"),
        default="exact",
        help="exact: the trimmed output equals an answer; regex: --pattern's first "
        "group (or match) does",
    )
    g.add_argument("--pattern", default=None, help="the regular expression for --match regex")
    g.add_argument(
        "--chat",
        action="store_true",
        help="ask in the tokenizer's chat format: each prompt a user turn (few-shot examples "
        "earlier turns), the reply until the end of the turn scored (for chat models)",
    )
    c = p.add_argument_group("code tasks")
    c.add_argument("--samples", type=int, default=1, help="completions per problem (n)")
    c.add_argument("--k", type=int, nargs="+", default=[1], help="pass@k for each k (<= n)")
    c.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    c.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    c.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
    o = p.add_argument_group("results")
    o.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result file (one task) or directory (default: eval-results/ here)",
    )
    o.add_argument(
        "--ledger",
        type=Path,
        default=None,
        help="the ledger to append to (default: eval-ledger.jsonl in the run, or "
        "beside the model's weights)",
    )
    o.add_argument("--no-ledger", action="store_true", help="append to no ledger")
    o.add_argument(
        "--sign",
        type=Path,
        default=None,
        metavar="KEY",
        help="sign results with this Ed25519 private key (PEM)",
    )
    o.add_argument("--json", action="store_true", help="print the metrics as JSON")
    s = p.add_argument_group("through a server")
    s.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help="score through a running `camelid serve` of the same weights instead "
        "of in process (the result says so)",
    )
    s.add_argument(
        "--compare",
        default=None,
        metavar="URL",
        help="score in process AND through the server at URL; list every item whose "
        "scores differ beyond --tolerance (exit 1 if any)",
    )
    s.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="allowed log-probability difference per token (default 1e-4)",
    )
    s.add_argument("--api-key", default=None, help="the server's key (default: $CAMELID_API_KEY)")
    add_engine_args(p, adapter=False)  # results are bound to MODEL's stored weights
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=8192,
        help="padded tokens per scoring pass (default 8192)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from camelid.eval.evaluate import evaluate_model
    from camelid.infer.load import load_engine, resolve_model
    from camelid.weights.digest import source_digest

    opts = _options(args)
    say = (lambda _: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    source = resolve_model(args.model)
    engine = load_engine(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        compile=args.compile,
        int8=int8_of(args),
        progress=None if not args.quiet else False,
        log=say,
    )
    say(f"digesting the weights of {source.path}")
    digest = source_digest(source)
    api_key = args.api_key or os.environ.get("CAMELID_API_KEY")
    if args.compare:
        return _compare(args, engine, digest, opts, api_key)
    scorer, scoring = None, None
    if args.server:
        from camelid.eval.evaluate import server_scorer

        scorer = server_scorer(args.server, engine, digest, api_key)
        scoring = {"mode": "server", "server": args.server}
    outs = _outputs(args)
    rows = []
    for spec, out in zip(args.task, outs, strict=True):
        task_opts = opts
        if spec.lower() == "humaneval" and args.max_new_tokens is None:
            task_opts = Options(**{**vars(opts), "max_new_tokens": 512, "until": ()})
        result = evaluate_model(
            args.model,
            spec,
            task_opts,
            engine=engine,
            scorer=scorer,
            source=source,
            weights_digest=digest,
            out=out,
            ledger=False if args.no_ledger else args.ledger,
            private_key=args.sign,
            skip_bad=args.skip_bad,
            contamination=args.contamination,
            clean_only=args.clean_only,
            scoring=scoring,
            progress=False if args.quiet else None,
            log=say,
        )
        say(f"wrote {out}")
        rows.append((spec, result))
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "task": r["task"]["name"],
                        "file": str(o),
                        "metrics": r["metrics"],
                        "weights_digest": r["model"]["weights_digest"],
                    }
                    for (_, r), o in zip(rows, outs, strict=True)
                ],
                indent=1,
            )
        )
    else:
        _table(rows, digest)
    return 0


def _compare(args: argparse.Namespace, engine, digest: str, opts: Options, api_key) -> int:
    from camelid.eval.evaluate import compare, server_scorer
    from camelid.eval.tasks import load_task

    scorer = server_scorer(args.compare, engine, digest, api_key)
    failed = False
    reports = []
    for spec in args.task:
        task = load_task(spec, skip_bad=args.skip_bad)
        report = compare(
            engine,
            scorer,
            task,
            opts,
            tolerance=args.tolerance,
            progress=False if args.quiet else None,
        )
        reports.append(report)
        failed |= bool(report["differing"])
        if not args.json:
            n = len(report["differing"])
            print(
                f"{task.name}: {report['items']} items, {n} differ beyond "
                f"{args.tolerance:g}/token between in-process and {args.compare}"
            )
            for d in report["differing"][:20]:
                print(f"  {d['id']}: " + "; ".join(d["differences"]))
    if args.json:
        print(json.dumps(reports, indent=1))
    return 1 if failed else 0


def _options(args: argparse.Namespace) -> Options:
    if args.limit is not None and args.limit < 1:
        raise CamelidError(f"--limit must be at least 1, got {args.limit}")
    if args.shots < 0:
        raise CamelidError(f"--shots must be >= 0, got {args.shots}")
    if args.samples < 1 or any(k < 1 or k > args.samples for k in args.k):
        raise CamelidError(f"--k must be between 1 and --samples ({args.samples}), got {args.k}")
    if args.clean_only and args.contamination is None:
        raise CamelidError("--clean-only needs --contamination REPORT")
    if args.match == "regex" and not args.pattern:
        raise CamelidError("--match regex needs --pattern")
    return Options(
        shots=args.shots,
        seed=args.seed,
        delimiter=args.delimiter,
        max_new_tokens=args.max_new_tokens or 64,
        until=tuple(args.until) if args.until is not None else ("\n\n",),
        match=args.match,
        pattern=args.pattern,
        limit=args.limit,
        samples=args.samples,
        k=tuple(sorted(set(args.k))),
        temperature=args.temperature,
        top_p=args.top_p,
        timeout_s=args.timeout,
        batch_tokens=args.batch_tokens,
        chat=args.chat,
    )


def _outputs(args: argparse.Namespace) -> list[Path]:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    names = [Path(t.split(":", 1)[-1]).stem or t for t in args.task]
    if args.out is not None and args.out.suffix == ".json":
        if len(args.task) > 1:
            raise CamelidError("--out FILE.json takes one --task; give a directory for several")
        return [args.out]
    root = args.out or Path("eval-results")
    return [root / f"{name}-{stamp}.json" for name in names]


def _table(rows: list, digest: str) -> None:
    print(f"weights {digest[:16]}")
    print(f"{'task':<24} {'kind':<10} {'items':>6}  metrics")
    for _, r in rows:
        m = r["metrics"]
        shown = [
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in m.items()
            if k != "items" and not k.endswith("_stderr") and isinstance(v, (int, float))
        ]
        if isinstance(m.get("clean"), dict):
            shown.append(f"(clean items: {m['clean'].get('items')})")
        print(
            f"{r['task']['name'][:24]:<24} {r['task']['kind']:<10} {m.get('items', ''):>6}  "
            + ", ".join(shown)
        )
