"""``camelid export``: a training checkpoint → a complete Hugging Face directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from camelid.cli.args import add_save_args, save_dtype
from camelid.errors import CamelidError
from camelid.infer.export import export_checkpoint, export_merged
from camelid.io import format_bytes, format_count


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="turn a training run or checkpoint into a Hugging Face directory with its tokenizer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a training checkpoint as a complete Hugging Face Llama directory: "
        "safetensors,\nconfig.json (with bos/eos token ids), generation_config.json (every "
        "stop id) and the\ntokenizer the run was trained with. RUN_OR_CHECKPOINT is a run "
        "directory (its newest\ncomplete checkpoint is exported) or one "
        "RUN/checkpoints/step-N directory. The run is\nonly read; OUT must be new or empty "
        "unless --overwrite.\nWith --adapter DIR --merge: the LoRA adapter DIR (peft's format) "
        "folded into the weights\nof RUN_OR_CHECKPOINT, which may then also be a Hugging Face "
        "directory.",
        epilog="""examples:
  camelid export runs/quickstart runs/quickstart/hf        # after Ctrl-C: the newest checkpoint
  camelid export runs/quickstart/checkpoints/step-00000200 exports/step-200
  camelid export runs/big exports/big --dtype bfloat16 --max-shard-size 2GB
  camelid export Llama-3.2-1B --adapter runs/lora/adapter --merge exports/merged   # LoRA merged
then: camelid generate OUT --prompt "..." or transformers' from_pretrained(OUT)""",
    )
    p.add_argument(
        "src",
        metavar="RUN_OR_CHECKPOINT",
        help="a training run or checkpoint dir (with --adapter: also a Hugging Face dir)",
    )
    p.add_argument("out", metavar="OUT", help="the Hugging Face directory to write")
    add_save_args(p, "keep, float32")
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
    if args.adapter is not None:
        done = export_merged(
            args.src,
            args.adapter,
            args.out,
            dtype=save_dtype(args),
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            log=lambda text: print(text, file=sys.stderr, flush=True),
        )
        info = done.info
        print(
            f"exported {done.source.path} + {args.adapter} (merged) -> {done.out}: "
            f"{format_count(info.config.num_params())} parameters, "
            f"{str(info.dtype).removeprefix('torch.')}, {len(info.files)} weight file(s), "
            f"{format_bytes(info.nbytes)}, with its tokenizer, in {done.seconds:.1f}s"
        )
        return 0
    done = export_checkpoint(
        args.src,
        args.out,
        dtype=save_dtype(args),
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        evaluations=_evaluations(args.src),
        log=lambda text: print(text, file=sys.stderr, flush=True),
    )
    info = done.info
    print(
        f"exported {done.source.path} (step {done.source.step}) -> {done.out}: "
        f"{format_count(info.config.num_params())} parameters, "
        f"{str(info.dtype).removeprefix('torch.')}, {len(info.files)} weight file(s), "
        f"{format_bytes(info.nbytes)}, with its tokenizer, in {done.seconds:.1f}s"
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
