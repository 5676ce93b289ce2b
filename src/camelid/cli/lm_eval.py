"""``camelid lm-eval ARGS...``: lm-evaluation-harness's command line with the "camelid" model.

lm-eval finds models only in its registry, which nothing outside lm-eval fills unless imported,
so its own ``lm_eval`` command has no "camelid"; this one imports the adapter
(:mod:`camelid.eval.harness`) and hands ARGS to lm-eval unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util

from camelid.errors import CamelidError

DESCRIPTION = """\
Run lm-evaluation-harness (lm-eval 0.4.13) with camelid's model adapter registered as
"camelid". Every argument goes to lm-eval's own command line unchanged (its `run` subcommand
is implied, as with `lm_eval` itself), so its --help below lists them all.

camelid --model_args (key=value, comma-separated):
  pretrained=MODEL     a Hugging Face directory, a training run or a checkpoint (required)
  dtype=auto           auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16, float16
  batch_size=N         rows per forward pass / prompts per generation batch (or --batch_size)
  max_length=N         the context in tokens (default: the model's)
  seed=1234            sampled generations draw request i's seed from (seed, i)
  compile=false        compile the decode step (worth it for long generations on CUDA)
  device=auto          or --device; a CUDA device without CUDA falls back to the CPU

The same without camelid's command: python -m camelid.eval.harness ARGS..., or in Python
lm_eval.simple_evaluate(model=camelid.eval.harness.CamelidLM("MODEL"), tasks=[...])."""

EPILOG = """\
examples:
  camelid lm-eval --model camelid --model_args pretrained=runs/quickstart --tasks hellaswag
  camelid lm-eval --model camelid --model_args pretrained=DIR,max_length=2048 \\
      --tasks my_task --include_path tasks/ --batch_size 8 --device cpu --output_path out/
  camelid lm-eval --model camelid --model_args pretrained=DIR --tasks gsm8k \\
      --apply_chat_template --limit 50 --log_samples --output_path out/"""


def register(sub: argparse._SubParsersAction) -> None:
    # No option of this parser's own: "--model", "--help" ... all belong to lm-eval.
    p = sub.add_parser(
        "lm-eval",
        help="evaluate a model with lm-evaluation-harness (arguments as lm_eval's)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        prefix_chars="\0",
        add_help=False,
    )
    p.add_argument("args", nargs="*", metavar="ARGS", help="lm-eval's arguments")
    p.set_defaults(func=run, parser=p)


def run(args: argparse.Namespace) -> int:
    missing = [m for m in ("lm_eval",) if importlib.util.find_spec(m) is None]
    if missing:
        raise CamelidError(
            "lm-evaluation-harness is not installed: pip install 'lm-eval==0.4.13' "
            "(with [api] for its API models)"
        )
    from camelid.eval import harness

    if not args.args or args.args[0] in ("-h", "--help"):
        args.parser.print_help()
        print("\nlm-eval's own options (lm-eval run --help):\n", flush=True)
        harness.main(["run", "--help"])
        return 0
    return harness.main(args.args)
