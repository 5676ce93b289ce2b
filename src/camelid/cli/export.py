"""``camelid export``: a training checkpoint → a complete Hugging Face directory; any model →
a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from camelid.cli.args import add_format_dtype_arg, gguf_dtype, save_dtype
from camelid.errors import CamelidError
from camelid.infer.export import Written, export_checkpoint, export_gguf, export_merged
from camelid.io import format_bytes, format_count
from camelid.weights import gguf

FORMATS = ("hf", "gguf")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="turn a training run or checkpoint into a Hugging Face directory, or any model "
        "into a GGUF file for llama.cpp",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a training checkpoint as a complete Hugging Face Llama directory: "
        "safetensors,\nconfig.json (with bos/eos token ids), generation_config.json (every "
        "stop id) and the\ntokenizer the run was trained with. RUN_OR_CHECKPOINT is a run "
        "directory (its newest\ncomplete checkpoint is exported) or one "
        "RUN/checkpoints/step-N directory. The run is\nonly read; OUT must be new or empty "
        "unless --overwrite.\nWith --adapter DIR --merge: the LoRA adapter DIR (peft's format) "
        "folded into the weights\nof RUN_OR_CHECKPOINT, which may then also be a Hugging Face "
        "directory.\n\nWith --format gguf (the default when OUT ends in .gguf): one GGUF file "
        "for llama.cpp\n(and Ollama, LM Studio) from any model: a run, a checkpoint, a Hugging "
        "Face directory\nor a GGUF file, in --dtype f32 (default), f16 or q8_0, with its "
        "tokenizer and chat\ntemplate. llama.cpp itself first tokenises a fixed test set with "
        "the vocabulary; any\ndifference from camelid refuses the export (this needs "
        "llama-cpp-python: pip install\n'camelid[gguf]'). See docs/gguf.md.",
        epilog="""examples:
  camelid export runs/quickstart runs/quickstart/hf        # after Ctrl-C: the newest checkpoint
  camelid export runs/quickstart/checkpoints/step-00000200 exports/step-200
  camelid export runs/big exports/big --dtype bfloat16 --max-shard-size 2GB
  camelid export Llama-3.2-1B --adapter runs/lora/adapter --merge exports/merged   # LoRA merged
  camelid export runs/quickstart model.gguf                 # GGUF, f32
  camelid export Llama-3.2-1B model-q8.gguf --dtype q8_0    # GGUF, Q8_0 (8.5 bits a weight)
  camelid export Llama-3.2-1B model-q4.gguf --dtype q4_k_m  # llama.cpp's own Q4_K_M
then: camelid generate OUT --prompt "..." or transformers' from_pretrained(OUT);
      llama.cpp's llama-cli -m OUT.gguf, or camelid generate OUT.gguf""",
    )
    p.add_argument(
        "src",
        metavar="RUN_OR_CHECKPOINT",
        help="a training run or checkpoint dir (with --adapter, or --format gguf: any model, "
        "a Hugging Face directory or a GGUF file too)",
    )
    p.add_argument("out", metavar="OUT", help="the Hugging Face directory (or .gguf file) to write")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="hf: a Hugging Face directory; gguf: one file for llama.cpp (default: gguf when "
        "OUT ends in .gguf, else hf)",
    )
    add_format_dtype_arg(
        p,
        "hf: cast weights to float32, bfloat16 or float16 (default: keep, float32); "
        "gguf: f32, f16 or q8_0 (default: f32; a GGUF source keeps its own), or "
        "q4_0, q4_k_s, q4_k_m, q5_k_m, q6_k made by llama.cpp's quantiser from the f32 file",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="hf: split weights into shards of at most this size (default: 5GB)",
    )
    p.add_argument(
        "--adapter",
        metavar="DIR",
        help="a LoRA adapter (peft format) for the model: with --merge, write the full merged "
        "weights; RUN_OR_CHECKPOINT may then also be a Hugging Face directory (the base)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="fold --adapter into the base weights (the only form an adapter is exported in)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an OUT that is not empty, replacing its model and tokenizer files",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.merge != (args.adapter is not None):
        raise CamelidError(
            "--merge needs --adapter DIR (the LoRA adapter to fold in)"
            if args.merge
            else "--adapter needs --merge (the adapter is exported merged into full weights)"
        )
    fmt = args.format or ("gguf" if args.out.endswith(gguf.SUFFIX) else "hf")
    if fmt == "gguf":
        return _run_gguf(args)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.adapter is not None:
        done = export_merged(args.src, args.adapter, args.out, dtype=save_dtype(args),
                             max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                             log=log)  # fmt: skip
        _summary(done, f"{done.source.path} + {args.adapter} (merged)")
        return 0
    done = export_checkpoint(args.src, args.out, dtype=save_dtype(args),
                             max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                             evaluations=_evaluations(args.src), log=log)  # fmt: skip
    _summary(done, f"{done.source.path} (step {done.source.step})")
    return 0


def _summary(done: Written, what: str) -> None:
    info = done.info
    print(
        f"exported {what} -> {done.out}: {format_count(info.config.num_params())} parameters, "
        f"{str(info.dtype).removeprefix('torch.')}, {len(info.files)} weight file(s), "
        f"{format_bytes(info.nbytes)}, with its tokenizer, in {done.seconds:.1f}s"
    )


def _run_gguf(args: argparse.Namespace) -> int:
    done = export_gguf(
        args.src,
        args.out,
        dtype=gguf_dtype(args),
        adapter=args.adapter,
        overwrite=args.overwrite,
        log=lambda text: print(text, file=sys.stderr, flush=True),
    )
    saved = done.saved
    print(
        f"exported {done.source.given} -> {saved.path}: GGUF {saved.dtype.upper()}, "
        f"{format_count(done.config.num_params())} parameters, {saved.tensors} tensors, "
        f"{format_bytes(saved.nbytes)}, tokenizer checked against llama.cpp on "
        f"{saved.parity_texts} texts, in {done.seconds:.1f}s"
    )
    return 0


def _evaluations(src: str) -> list[dict] | None:
    """The run's evaluation ledger as model-card rows (none when it has no ledger)."""
    from camelid.eval import ledger
    from camelid.weights import checkpoint as ckpt

    path = Path(src)
    run = path if (path / ledger.LEDGER_NAME).exists() else ckpt.run_of(path)
    if run is None or not (Path(run) / ledger.LEDGER_NAME).exists():
        return None
    check = ledger.read(Path(run) / ledger.LEDGER_NAME)
    if check.problems:
        print(f"warning: {check.problems[0]}; the model card lists no evaluations",
              file=sys.stderr)  # fmt: skip
        return None
    return ledger.card_rows(check.entries)
