"""Arguments several commands share, declared once: --set, the corpus flags, the sampling
flags and the model/engine flags, with what turns each group into the library's own objects."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import torch

from camelid.data.pipeline import PrepareConfig
from camelid.errors import CamelidError
from camelid.infer import Engine, SamplingParams
from camelid.infer.load import DTYPES, load_engine
from camelid.weights import gguf

# The library's sampling defaults are the command line's: one source of truth.
_SAMPLING = {f.name: f.default for f in dataclasses.fields(SamplingParams)}


def add_set_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)


def note(args: argparse.Namespace, text: str) -> None:
    """A message for the user on stderr, unless --quiet."""
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ corpus
def add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        action="append",
        metavar="SRC",
        help="a directory of text/code files, a .txt, .jsonl, .jsonl.gz or .parquet file, or "
        "'stdlib' (this Python's standard library source, the default); repeatable",
    )
    p.add_argument(
        "--glob",
        action="append",
        metavar="PATTERN",
        help="only files matching this pattern in corpus directories, e.g. '*.py'; repeatable",
    )
    p.add_argument(
        "--text-field", default="text", help="JSONL field / parquet column (default: text)"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=PrepareConfig.val_fraction,
        help="share of files (or records) held out for validation (default: %(default)s)",
    )


def corpus_config(args: argparse.Namespace, **extra: Any) -> PrepareConfig:
    """The corpus flags (and ``extra`` fields) as a PrepareConfig."""
    return PrepareConfig(
        corpus=tuple(args.corpus or PrepareConfig.corpus),
        globs=tuple(args.glob or ()),
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        **extra,
    )


# ---------------------------------------------------------------------------------- sampling
def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int, chat: bool = False) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "-n",
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        metavar="N",
        help="generate at most N tokens (default: %(default)s)",
    )
    t = g.add_mutually_exclusive_group()
    t.add_argument(
        "--temperature",
        type=float,
        default=_SAMPLING["temperature"],
        metavar="T",
        help="divide the logits by T before sampling; 0 is greedy (default: %(default)g)",
    )
    t.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument(
        "--top-k",
        type=int,
        default=_SAMPLING["top_k"],
        metavar="K",
        help="sample from the K most likely tokens only (default: %(default)g, off)",
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=_SAMPLING["top_p"],
        metavar="P",
        help="sample from the smallest set of tokens whose probability reaches P "
        "(default: %(default)g; 1 is off)",
    )
    g.add_argument(
        "--min-p",
        type=float,
        default=_SAMPLING["min_p"],
        metavar="P",
        help="drop tokens less than P times as likely as the most likely one "
        "(default: %(default)g, off)",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=_SAMPLING["repetition_penalty"],
        metavar="R",
        help="penalise tokens already in the prompt or output (default: %(default)g, off)",
    )
    g.add_argument(
        "--presence-penalty",
        type=float,
        default=_SAMPLING["presence_penalty"],
        metavar="X",
        help="subtract X from the logits of tokens already generated, in [-2, 2] "
        "(default: %(default)g)",
    )
    g.add_argument(
        "--frequency-penalty",
        type=float,
        default=_SAMPLING["frequency_penalty"],
        metavar="X",
        help="subtract X per earlier occurrence, in [-2, 2] (default: %(default)g)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=_SAMPLING["seed"],
        help="make sampling repeatable (default: a fresh random seed)",
    )
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="end the text just before TEXT; repeatable",
    )
    g.add_argument(
        "--stop-token-id",
        dest="stop_token_ids",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="a token id that ends generation (besides end of text / end of turn); repeatable",
    )
    g.add_argument(
        "--ignore-eos", action="store_true", help="do not stop at end-of-text / end-of-turn tokens"
    )
    if not chat:
        g.add_argument(
            "--truncate",
            action="store_true",
            help="keep the last tokens of a prompt too long for the context, leaving room "
            "for --max-new-tokens (default: refuse such a prompt)",
        )


def sampling_params(args: argparse.Namespace, **extra: Any) -> SamplingParams:
    """The sampling flags as a SamplingParams (a RequestError naming the field if invalid)."""
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_ids),
        ignore_eos=args.ignore_eos,
        truncate_prompt=args.truncate,
        **extra,
    )


# --------------------------------------------------------------------- writing a model dir
def add_format_dtype_arg(p: argparse.ArgumentParser, help: str) -> None:
    """--dtype of the commands that write a Hugging Face directory or a GGUF file."""
    p.add_argument("--dtype", choices=(*DTYPES, *gguf.WRITE_TYPES), default=None, help=help)


def gguf_dtype(args: argparse.Namespace) -> str | None:
    """--dtype for a GGUF file: its own names, float32/float16 as f32/f16 (None: the default)."""
    dtype = {"float32": "f32", "float16": "f16"}.get(args.dtype, args.dtype)
    if dtype == "bfloat16":
        raise CamelidError("--dtype bfloat16: GGUF holds f32, f16, q8_0 or llama.cpp's types")
    return dtype


def save_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """The --dtype flag as a torch dtype for a Hugging Face directory (None: keep the source's);
    a GGUF type there is refused, saying where it belongs."""
    if args.dtype in gguf.WRITE_TYPES:
        raise CamelidError(
            f"--dtype {args.dtype} is a GGUF type (for an OUT ending in .gguf); a Hugging Face "
            f"directory takes {', '.join(DTYPES)}"
        )
    return getattr(torch, args.dtype) if args.dtype else None


# ------------------------------------------------------------------------- model and engine
def add_engine_args(p: argparse.ArgumentParser, chat: bool = False, adapter: bool = True) -> None:
    """The model/engine flags; ``adapter``: offer --adapter (commands that load through
    :func:`engine_from_args`, which applies it)."""
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:1, ... (default: auto, cuda if available, else cpu)",
    )
    g.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="weight dtype (default: auto, bfloat16 on CUDA, float32 on CPU)",
    )
    g.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        metavar="N",
        help="context length, prompt and output together (default: the model's)",
    )
    if not chat:
        g.add_argument(
            "--batch-size",
            type=int,
            default=16,
            metavar="N",
            help="prompts decoded together (default: %(default)s)",
        )
    g.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step: a one-off cost, faster long outputs",
    )
    g.add_argument(
        "--int8",
        action="store_true",
        help="decode with int8 weight-only layers (a Q8_0 GGUF file: its own blocks)",
    )
    g.add_argument(
        "--int8-form",
        choices=("auto", "row", "q8_0"),
        default=None,
        help="implies --int8: row (one scale per output row), q8_0 (llama.cpp's blocks of 32, "
        "fp16 scales) or auto (default: q8_0 for a Q8_0 GGUF file, else row)",
    )
    if adapter:
        g.add_argument(
            "--adapter",
            metavar="DIR",
            default=None,
            help="a LoRA adapter directory (peft's adapter_config.json and "
            "adapter_model.safetensors) for MODEL, merged into its weights at load",
        )
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only the generated text (no loading line, notes or summary)",
    )


def int8_of(args: argparse.Namespace) -> str | None:
    """--int8 / --int8-form as ``load_engine``'s ``int8``: None (off), "auto", "row", "q8_0"."""
    return args.int8_form or ("auto" if args.int8 else None)


def engine_from_args(args: argparse.Namespace) -> Engine:
    """Load MODEL into an Engine as the engine flags ask."""
    return load_engine(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        compile=args.compile,
        int8=int8_of(args),
        progress=False if args.quiet else None,
        log=lambda text: note(args, text),
        adapter=getattr(args, "adapter", None),
    )
