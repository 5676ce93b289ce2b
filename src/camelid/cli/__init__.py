"""The front door: ``camelid <subcommand>``. One module per subcommand, each declaring its own
arguments; the work itself is done by the rooms they call.

Errors a user can cause end in one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from camelid import __version__
from camelid.cli import (
    chat,
    contamination,
    convert,
    digest,
    eval,
    export,
    generate,
    inspect,
    ledger,
    lm_eval,
    prepare,
    quickstart,
    serve,
    tokenizer,
    train,
    verify,
)
from camelid.errors import CamelidError

# help order
COMMANDS = (
    quickstart,
    inspect,
    convert,
    tokenizer,
    prepare,
    train,
    export,
    digest,
    generate,
    chat,
    serve,
    eval,
    verify,
    ledger,
    contamination,
    lm_eval,
)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return args.func(args) or 0
    except CamelidError as e:
        print(f"camelid: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("camelid: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away, e.g. `camelid generate ... | head`
        with contextlib.suppress(OSError):  # no second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="camelid",
        description="camelid: define, train, evaluate and serve Llama-family models.",
        epilog="Run 'camelid <command> --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"camelid {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="<command>")
    for command in COMMANDS:
        command.register(sub)
    return parser
