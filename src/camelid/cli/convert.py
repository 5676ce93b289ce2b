"""``camelid convert``: re-save and validate a checkpoint."""

from __future__ import annotations

import argparse
import time

import torch

from camelid.infer.load import DTYPES
from camelid.io import format_bytes, format_count
from camelid.weights.hf import inspect_checkpoint, load, save


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="re-save and validate a checkpoint (Hugging Face safetensors)",
        description="Load a Hugging Face Llama checkpoint, check every tensor, and write it to "
        "DST as a Hugging Face directory (optionally in another dtype or shard size).",
    )
    p.add_argument("src", metavar="SRC", help="source checkpoint directory")
    p.add_argument("dst", metavar="DST", help="destination directory (created if needed)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast weights (default: keep)")
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="split weights into shards of at most this size (default: 5GB)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    src = inspect_checkpoint(args.src)
    model = load(args.src, dtype=dtype or src.dtype)
    save(model, args.dst, max_shard_size=args.max_shard_size)
    out = inspect_checkpoint(args.dst)  # read back what was written
    print(
        f"converted {args.src} -> {args.dst}: {format_count(out.config.num_params())} "
        f"parameters, {out.dtype}, {len(out.files)} file(s), {format_bytes(out.nbytes)} "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return 0
