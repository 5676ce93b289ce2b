"""``camelid convert``: re-save and validate a model directory, run or checkpoint."""

from __future__ import annotations

import argparse
import sys

from camelid.cli.args import add_save_args, save_dtype
from camelid.infer.export import convert
from camelid.io import format_bytes, format_count


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="re-save and validate a checkpoint (Hugging Face safetensors)",
        description="Load a Hugging Face Llama directory (or a training run, or one of its "
        "checkpoints), check every tensor, and write it to DST as a complete Hugging Face "
        "directory (optionally in another dtype or shard size): the tokenizer files, "
        "generation_config.json and config.json's token ids are kept.",
    )
    p.add_argument(
        "src", metavar="SRC", help="a Hugging Face directory, a training run or a checkpoint"
    )
    p.add_argument("dst", metavar="DST", help="destination directory (created if needed)")
    add_save_args(p, "keep")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    done = convert(
        args.src,
        args.dst,
        dtype=save_dtype(args),
        max_shard_size=args.max_shard_size,
        log=lambda text: print(text, file=sys.stderr, flush=True),
    )
    out = done.info  # read back from what was written
    print(
        f"converted {args.src} -> {args.dst}: {format_count(out.config.num_params())} "
        f"parameters, {str(out.dtype).removeprefix('torch.')}, {len(out.files)} file(s), "
        f"{format_bytes(out.nbytes)} "
        f"in {done.seconds:.1f}s"
    )
    return 0
