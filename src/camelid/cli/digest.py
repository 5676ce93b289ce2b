"""``camelid digest``: the weights digest and the tokenizer digest of a model."""

from __future__ import annotations

import argparse
import json
import sys

from camelid.errors import CamelidError, CheckpointError
from camelid.infer.load import ModelSource, inspect_model, load_tokenizer, resolve_model
from camelid.io import format_bytes
from camelid.tokenizer import Tokenizer
from camelid.weights import hf
from camelid.weights.digest import source_digest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "digest",
        help="print the SHA-256 digests of a model's weights and tokenizer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the weights digest of MODEL (a Hugging Face directory, a training "
        "run or one of its\ncheckpoints) and the digest of its tokenizer. The weights digest "
        "hashes every tensor\n(name, dtype, shape, raw bytes, in name order), not the files: "
        "re-sharding, re-saving\nor a dtype-preserving convert keep it; any changed weight, "
        "name or dtype changes it.\nA checkpoint is hashed as `camelid export` would write it "
        "at its stored dtype.\nEvaluation results, `camelid serve` (/v1/models, "
        "system_fingerprint) and model cards\ncarry these digests. See docs/evaluation.md.",
        epilog="""examples:
  camelid digest runs/quickstart/run/hf
  camelid digest runs/quickstart/run/checkpoints/step-00000200 --json""",
    )
    p.add_argument("model", metavar="MODEL", help="a Hugging Face directory, a run or a checkpoint")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    source = resolve_model(args.model, need_tokenizer=False)
    if source.note is not None:
        print(source.note, file=sys.stderr, flush=True)
    if source.kind == "hf" and source.path.is_dir() and not (source.path / hf.CONFIG_NAME).exists():
        raise CheckpointError(
            f"{source.path}: not a model directory (no {hf.CONFIG_NAME}; expected a Hugging Face "
            "Llama directory, a training run, or one of its checkpoints/step-N)"
        )
    info = inspect_model(source)  # a directory without (whole) weights fails here, by name
    weights = source_digest(source)
    tokenizer, why = _tokenizer(source)
    dtype = str(info.dtype).removeprefix("torch.")
    if args.json:
        out = {
            "model": args.model,
            "path": str(source.path),
            "kind": source.kind,
            "step": source.step,
            "dtype": dtype,
            "digest": weights,
            "tokenizer_digest": tokenizer.digest if tokenizer else None,
            "tokenizer": tokenizer.source if tokenizer else None,
        }
        print(json.dumps(out, indent=2))
        return 0
    if source.kind == "checkpoint":
        what = f"checkpoint of step {source.step}, read at its stored dtype {dtype}"
    elif source.kind == "gguf":
        what = f"{info.stored} file, {format_bytes(info.nbytes)}, its weights as loaded: {dtype}"
    else:
        what = (
            f"Hugging Face directory, {dtype}, {len(info.files)} weight file(s), "
            f"{format_bytes(info.nbytes)}"
        )
    print(f"model      {source.path} ({what})")
    print(f"weights    {weights}")
    if tokenizer is not None:
        print(f"tokenizer  {tokenizer.digest} ({tokenizer.source})")
    else:
        print(f"tokenizer  none ({why})")
    return 0


def _tokenizer(source: ModelSource) -> tuple[Tokenizer | None, str]:
    """MODEL's tokenizer, or None and why there is none (weights alone still have a digest)."""
    if source.kind == "hf" and source.tokenizer is None:
        return None, f"no tokenizer.json or tokenizer.model in {source.path}"
    try:
        return load_tokenizer(source), ""
    except CamelidError as e:
        return None, str(e)
