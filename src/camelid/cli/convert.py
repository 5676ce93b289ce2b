"""``camelid convert``: re-save and validate a model directory, run, checkpoint or GGUF file."""

from __future__ import annotations

import argparse
import sys

from camelid.cli.args import add_format_dtype_arg, gguf_dtype, save_dtype
from camelid.infer.export import convert, export_gguf
from camelid.io import format_bytes, format_count
from camelid.weights import gguf


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="re-save and validate a model (Hugging Face safetensors, or a GGUF file)",
        description="Load a Hugging Face Llama directory (or a training run, one of its "
        "checkpoints, or a GGUF file), check every tensor, and write it to DST as a complete "
        "Hugging Face directory (optionally in another dtype or shard size): the tokenizer "
        "files, generation_config.json and config.json's token ids are kept. A DST ending in "
        ".gguf is written as one GGUF file for llama.cpp instead (as camelid export --format "
        "gguf: --dtype f32, f16 or q8_0; the tokenizer is checked against llama.cpp first).",
        epilog="examples:\n"
        "  camelid convert Llama-3.2-1B out/ --dtype bfloat16\n"
        "  camelid convert model.gguf model-hf/          # GGUF -> Hugging Face directory\n"
        "  camelid convert model-hf/ model.gguf --dtype q8_0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="a Hugging Face directory, a training run, a checkpoint or a GGUF file",
    )
    p.add_argument(
        "dst", metavar="DST", help="destination directory (created if needed), or a .gguf file"
    )
    add_format_dtype_arg(
        p,
        "cast weights (default: keep); for a .gguf DST: f32, f16 or q8_0 (default: f32, "
        "or a GGUF source's own), or q4_0, q4_k_s, q4_k_m, q5_k_m, q6_k by llama.cpp's quantiser",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="split weights into shards of at most this size (default: 5GB)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.dst.endswith(gguf.SUFFIX):
        done = export_gguf(args.src, args.dst, dtype=gguf_dtype(args), overwrite=True, log=log)
        saved = done.saved
        print(
            f"converted {args.src} -> {saved.path}: GGUF {saved.dtype.upper()}, "
            f"{format_count(done.config.num_params())} parameters, "
            f"{format_bytes(saved.nbytes)} in {done.seconds:.1f}s"
        )
        return 0
    done = convert(
        args.src,
        args.dst,
        dtype=save_dtype(args),
        max_shard_size=args.max_shard_size,
        log=log,
    )
    out = done.info  # read back from what was written
    print(
        f"converted {args.src} -> {args.dst}: {format_count(out.config.num_params())} "
        f"parameters, {str(out.dtype).removeprefix('torch.')}, {len(out.files)} file(s), "
        f"{format_bytes(out.nbytes)} "
        f"in {done.seconds:.1f}s"
    )
    return 0
