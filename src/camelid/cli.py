"""The front door: ``camelid <subcommand>``. One subcommand per stage, nothing else here.

Errors a user can cause end in one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from camelid import __version__
from camelid.config import PRESETS, ModelConfig
from camelid.data.clean import CleanConfig
from camelid.data.pipeline import PrepareConfig
from camelid.errors import CamelidError
from camelid.io import format_bytes

_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_TEMPERATURE = 0.8  # generate / chat sampling defaults (documented in docs/cli.md)
DEFAULT_TOP_P = 0.95


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
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

    p = sub.add_parser(
        "quickstart",
        help="the whole pipeline on the built-in corpus: tokenizer, data, a small Llama, report",
        description="Train a tokenizer on this Python's standard library, prepare deduplicated "
        "token shards, pre-train a small Llama for a few minutes on whatever device is present, "
        "report its validation loss, print a sample Python completion and export Hugging Face "
        "weights. Re-running reuses the tokenizer and data; the model is trained afresh.",
    )
    p.add_argument(
        "--out", default="runs/quickstart", help="output directory (default: %(default)s)"
    )
    p.add_argument("--corpus", default="stdlib", help="corpus (default: the built-in 'stdlib')")
    p.add_argument(
        "--vocab-size", type=int, default=4096, help="tokenizer size (default: %(default)s)"
    )
    _set_arg(p, "override a key of the quickstart recipe, e.g. --set train.steps=50")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser(
        "inspect",
        help="describe a preset or checkpoint: architecture, parameters, FLOPs, memory",
        description="Describe a model preset or a Hugging Face Llama checkpoint directory "
        "without loading its weights: architecture, parameter counts, training FLOPs per "
        "token and memory needs. Presets: " + ", ".join(PRESETS) + ".",
    )
    p.add_argument("model", metavar="PRESET_OR_PATH", help="a preset name or a checkpoint dir")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="context length for the FLOPs figures (default: min(max_seq_len, 8192))",
    )
    p.add_argument(
        "--forward",
        action="store_true",
        help="also build the model with random weights (or load the checkpoint) and time one "
        "forward pass",
    )
    p.add_argument("--batch", type=int, default=1, help="batch size for --forward (default: 1)")
    p.add_argument("--device", default="cpu", help="device for --forward (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "convert",
        help="re-save and validate a checkpoint (Hugging Face safetensors)",
        description="Load a Hugging Face Llama checkpoint, check every tensor, and write it to "
        "DST as a Hugging Face directory (optionally in another dtype or shard size).",
    )
    p.add_argument("src", metavar="SRC", help="source checkpoint directory")
    p.add_argument("dst", metavar="DST", help="destination directory (created if needed)")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="cast weights (default: keep)")
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="split weights into shards of at most this size (default: 5GB)",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer (Llama 3 split pattern and special tokens)",
        description="Tokenizer tools.",
    )
    p.set_defaults(func=lambda args, p=p: p.print_help() or 2)
    tsub = p.add_subparsers(title="tokenizer commands", metavar="<command>")
    t = tsub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer on a corpus",
        description="Train a byte-level BPE tokenizer with the Llama 3 pre-tokenization pattern "
        "and special tokens on the training split of a corpus, and write tokenizer.json and "
        "tokenizer_config.json (with the Llama 3 chat template) to --out.",
    )
    _corpus_args(t)
    t.add_argument("--vocab-size", type=int, required=True, help="total size, specials included")
    t.add_argument(
        "--num-special", type=int, default=256, help="special tokens, reserved ones included "
        "(default: 256, as Llama 3)"
    )  # fmt: skip
    t.add_argument("--out", required=True, help="output directory")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser(
        "prepare",
        help="clean, deduplicate and tokenize a corpus into token shards",
        description="Clean (Unicode normalisation, quality filters), deduplicate (exact and "
        "MinHash near-duplicates) and tokenize a corpus in parallel into token shards for "
        "pre-training, with a manifest.json. Re-running with the same inputs reuses the result; "
        "an interrupted run is restarted cleanly.",
    )
    _corpus_args(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument(
        "--shard-tokens", type=int, default=PrepareConfig.shard_tokens, help="tokens per shard"
    )
    p.add_argument("--no-exact-dedup", action="store_true", help="keep exact duplicates")
    p.add_argument("--no-near-dedup", action="store_true", help="keep near duplicates")
    p.add_argument(
        "--near-dup-threshold",
        type=float,
        default=PrepareConfig.near_dup_threshold,
        help="estimated Jaccard similarity of token 5-gram sets above which a document is a "
        "near duplicate (default: %(default)s)",
    )
    defaults = CleanConfig()
    for name in (
        "normalize",
        "min_chars",
        "max_chars",
        "min_alnum_fraction",
        "max_repeated_line_fraction",
        "max_line_chars",
    ):
        value = getattr(defaults, name)
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=type(value),
            default=value,
            help=f"cleaning: {name.replace('_', ' ')} (default: %(default)s)",
        )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a different dataset already in --out"
    )
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "train",
        help="pre-train a model from a TOML recipe (one CPU to many GPUs under torchrun)",
        description="Pre-train a Llama from a TOML recipe. Run it as is on one device, or under "
        "'torchrun --nproc_per_node N -m camelid.cli train ...' to shard it with FSDP2. "
        "Writes metrics.jsonl, checkpoints, report.md and Hugging Face weights to run.out_dir.",
    )
    p.add_argument("recipe", metavar="RECIPE.toml", help="the recipe (see configs/)")
    _set_arg(p, "override a recipe key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from a checkpoint directory (default: the latest in run.out_dir)",
    )
    p.add_argument("--fresh", action="store_true", help="discard an earlier run in run.out_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "generate",
        help="complete one or more prompts with a model, streaming the text",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Complete prompts with a Hugging Face Llama directory (or a training run, "
        "whose RUN/hf\nis used). One prompt streams to stdout as it is generated; several are "
        "decoded together\nand printed in order under a '=== i/n' header. A one-line summary "
        "goes to stderr.",
        epilog="""examples:
  camelid generate runs/quickstart --prompt "def fibonacci(n):" --greedy
  camelid generate MODEL -p "Once upon a time" -p "The capital of France is" -n 64
  echo "Why is the sky blue?" | camelid generate MODEL --prompt - --chat --temperature 0.6
  camelid generate MODEL -p "2 + 2 =" --json --logprobs 5 --max-new-tokens 8""",
    )
    p.add_argument("model", metavar="MODEL", help="model directory or training run directory")
    p.add_argument(
        "-p",
        "--prompt",
        dest="prompts",
        action="append",
        type=lambda s: ("text", s),
        metavar="TEXT",
        help="a prompt; repeatable; '-' reads one prompt from stdin",
    )
    p.add_argument(
        "--prompt-file",
        dest="prompts",
        action="append",
        type=lambda s: ("file", s),
        metavar="FILE",
        help="a file whose whole content is one prompt (one final newline is dropped); repeatable",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user message in the tokenizer's chat template",
    )
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message first")
    p.add_argument("--echo", action="store_true", help="print each prompt before its completion")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per prompt (text, token_ids, finish_reason, ...) instead",
    )
    p.add_argument(
        "--logprobs",
        type=int,
        metavar="N",
        help="with --json: each generated token's log-probability and N alternatives",
    )
    p.add_argument(
        "--prompt-logprobs",
        type=int,
        metavar="N",
        help="with --json: also score the prompt's tokens, with N alternatives",
    )
    _sampling_args(p, max_new_tokens=256)
    _engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        help="chat with a model interactively, in its tokenizer's chat template",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Chat with an instruction-tuned Llama (a Hugging Face Llama directory or a "
        "training run).\nThe conversation is kept and sent with each message in the "
        "tokenizer's chat template;\nwhen it no longer fits the context, the oldest turns are "
        "dropped (the system message\nstays). Commands: /reset clears the history, /help, "
        "/exit or /quit (or Ctrl-D) leaves.\nCtrl-C stops an answer being written (what was "
        "shown stays in the history); at the\nprompt it leaves. Input is read line by line, so "
        "piped stdin works too.",
        epilog="""examples:
  camelid chat path/to/Llama-3.2-1B-Instruct
  camelid chat MODEL --system "You are a terse assistant." --temperature 0.6 --top-p 0.9
  printf 'hello\\n/reset\\nhi again\\n' | camelid chat MODEL --greedy --quiet""",
    )
    p.add_argument("model", metavar="MODEL", help="model directory or training run directory")
    p.add_argument("--system", metavar="TEXT", help="a system message at the start of the chat")
    _sampling_args(p, max_new_tokens=512, chat=True)
    _engine_args(p, chat=True)
    p.set_defaults(func=cmd_chat, truncate=False, batch_size=1)
    return parser


def _set_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int, chat: bool = False) -> None:
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
        default=DEFAULT_TEMPERATURE,
        metavar="T",
        help="divide the logits by T before sampling; 0 is greedy (default: %(default)s)",
    )
    t.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="sample from the K most likely tokens only (default: 0, off)",
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=DEFAULT_TOP_P,
        metavar="P",
        help="sample from the smallest set of tokens whose probability reaches P "
        "(default: %(default)s; 1 is off)",
    )
    g.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        metavar="P",
        help="drop tokens less than P times as likely as the most likely one (default: 0, off)",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        metavar="R",
        help="penalise tokens already in the prompt or output (default: 1, off)",
    )
    g.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        metavar="X",
        help="subtract X from the logits of tokens already generated, in [-2, 2] (default: 0)",
    )
    g.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        metavar="X",
        help="subtract X per earlier occurrence, in [-2, 2] (default: 0)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=None,
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


def _engine_args(p: argparse.ArgumentParser, chat: bool = False) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:1, ... (default: auto, cuda if available, else cpu)",
    )
    g.add_argument(
        "--dtype",
        choices=("auto", *_DTYPES),
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
    g.add_argument("--int8", action="store_true", help="decode with int8 weight-only layers")
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only the generated text (no loading line, notes or summary)",
    )


def _corpus_args(p: argparse.ArgumentParser) -> None:
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


# ----------------------------------------------------------------------------------- inspect
def _resolve(model: str) -> tuple[ModelConfig, Any]:
    """A preset name or a checkpoint path → (config, checkpoint info or None)."""
    if model in PRESETS:
        return ModelConfig.from_preset(model), None
    looks_like_path = "/" in model or model.startswith(".") or Path(model).exists()
    if not looks_like_path:
        raise CamelidError(
            f"{model!r} is neither a known preset nor an existing path; "
            f"known presets: {', '.join(PRESETS)}"
        )
    from camelid.weights.hf import inspect_checkpoint

    info = inspect_checkpoint(model)
    return info.config, info


def describe(config: ModelConfig, seq_len: int) -> dict[str, Any]:
    """The figures ``camelid inspect`` prints, as a dict."""
    counts = config.param_counts()
    total = config.num_params()
    return {
        "config": config.to_dict(),
        "params": {"total": total, **counts},
        "seq_len": seq_len,
        "flops_per_token": {
            "training": config.flops_per_token(seq_len),
            "forward": config.flops_per_token(seq_len, training=False),
        },
        "memory_bytes": {
            "weights_fp32": config.weight_bytes(4),
            "weights_bf16": config.weight_bytes(2),
            "adamw_training": config.adamw_training_bytes(),
        },
    }


def _count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def cmd_inspect(args: argparse.Namespace) -> int:
    config, info = _resolve(args.model)
    seq_len = args.seq_len or min(config.max_seq_len, 8192)
    if seq_len <= 0:
        raise CamelidError(f"--seq-len must be positive, got {seq_len}")
    figures = describe(config, seq_len)
    if info is not None:
        figures["checkpoint"] = {
            "files": [str(f) for f in info.files],
            "dtype": str(info.dtype).removeprefix("torch."),
            "bytes": info.nbytes,
        }
    if args.forward:
        figures["forward"] = _forward(config, args, info)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0

    c, p = config, figures["params"]
    name = c.name or args.model
    gqa = f"GQA {c.n_heads // c.n_kv_heads}:1" if c.n_kv_heads != c.n_heads else "MHA"
    rope = f"theta {c.rope_theta:g}"
    if c.rope_scaling:
        s = c.rope_scaling
        rope += (
            f", llama3 scaling (factor {s.factor:g}, low {s.low_freq_factor:g}, "
            f"high {s.high_freq_factor:g}, original context {s.original_max_position_embeddings})"
        )
    bias = [b for b, on in (("attention", c.attention_bias), ("mlp", c.mlp_bias)) if on]
    rows = [
        ("model", name),
        ("layers", f"{c.n_layers} x [RMSNorm > attention > RMSNorm > SwiGLU]"),
        ("dim", f"{c.dim}"),
        ("attention", f"{c.n_heads} heads, {c.n_kv_heads} kv heads ({gqa}), head_dim {c.head_dim}"),
        ("ffn hidden", f"{c.ffn_hidden_dim}"),
        ("vocab", f"{c.vocab_size} ({'tied' if c.tie_embeddings else 'untied'} output head)"),
        ("rope", rope),
        ("context", f"{c.max_seq_len}"),
        ("norm eps", f"{c.norm_eps:g}"),
        ("biases", ", ".join(bias) or "none"),
    ]
    print("\n".join(f"{k:<12} {v}" for k, v in rows))
    print(f"\nparameters   {_count(p['total'])} ({p['total']:,})")
    for key in ("embedding", "attention", "mlp", "norm", "output"):
        share = 100 * p[key] / p["total"]
        note = " (tied: shares the embedding)" if key == "output" and c.tie_embeddings else ""
        print(f"  {key:<10} {_count(p[key]):>8}  {share:5.1f}%{note}")
    f = figures["flops_per_token"]
    print(f"\nFLOPs/token  at context {seq_len}")
    print(f"  training   {f['training']:.3e}  (6N + 12·L·H·hd·T)")
    print(f"  forward    {f['forward']:.3e}")
    m = figures["memory_bytes"]
    print("\nmemory")
    print(f"  weights fp32     {format_bytes(m['weights_fp32'])}")
    print(f"  weights bf16     {format_bytes(m['weights_bf16'])}")
    print(
        f"  AdamW training   {format_bytes(m['adamw_training'])}  "
        "(fp32 weights + grads + 2 moments; activations extra)"
    )
    if info is not None:
        ck = figures["checkpoint"]
        print(
            f"\ncheckpoint   {len(ck['files'])} file(s), {ck['dtype']}, {format_bytes(ck['bytes'])}"
        )
    if args.forward:
        fw = figures["forward"]
        print(
            f"\nforward      batch {fw['batch']} x {fw['seq_len']} on {fw['device']}: logits "
            f"{tuple(fw['logits_shape'])} in {fw['seconds'] * 1e3:.1f} ms "
            f"({fw['tokens_per_s']:,.0f} tokens/s), all finite"
        )
    return 0


def _forward(config: ModelConfig, args: argparse.Namespace, info: Any) -> dict[str, Any]:
    """Run one forward pass: a smoke test that the model runs on this machine."""
    import torch

    from camelid.model import Transformer

    device = torch.device(args.device)
    need = config.weight_bytes(4)
    avail = _available_memory(device)
    if avail is not None and need > 0.8 * avail:
        raise CamelidError(
            f"--forward needs about {format_bytes(need)} for fp32 weights but {device} has "
            f"{format_bytes(avail)} available; try a smaller preset such as 'tiny'"
        )
    if args.batch <= 0:
        raise CamelidError(f"--batch must be positive, got {args.batch}")
    torch.manual_seed(0)
    if info is not None:
        from camelid.weights.hf import load

        model = load(args.model, device=device)
    else:
        with device:
            model = Transformer(config)
    seq_len = min(128, config.max_seq_len)
    tokens = torch.randint(0, config.vocab_size, (args.batch, seq_len), device=device)
    with torch.inference_mode():
        model(tokens)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    if not torch.isfinite(logits).all():
        raise CamelidError("the forward pass produced non-finite logits")
    return {
        "device": str(device),
        "batch": args.batch,
        "seq_len": seq_len,
        "logits_shape": list(logits.shape),
        "seconds": seconds,
        "tokens_per_s": args.batch * seq_len / seconds,
    }


def _available_memory(device: Any) -> int | None:
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            lines = f.readlines()
        for line in lines:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from camelid.weights.hf import inspect_checkpoint, load, save

    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    src = inspect_checkpoint(args.src)
    model = load(args.src, dtype=dtype or src.dtype)
    save(model, args.dst, max_shard_size=args.max_shard_size)
    out = inspect_checkpoint(args.dst)  # read back what was written
    print(
        f"converted {args.src} -> {args.dst}: {_count(out.config.num_params())} parameters, "
        f"{out.dtype}, {len(out.files)} file(s), {format_bytes(out.nbytes)} "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return 0


# --------------------------------------------------------------------------------- tokenizer
def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from camelid.data.pipeline import training_texts
    from camelid.tokenizer import train_tokenizer

    if args.vocab_size <= 0:
        raise CamelidError(f"--vocab-size must be positive, got {args.vocab_size}")
    t0 = time.perf_counter()
    config = PrepareConfig(
        corpus=tuple(args.corpus or ["stdlib"]),
        globs=tuple(args.glob or ()),
        text_field=args.text_field,
        val_fraction=args.val_fraction,
    )
    corpus = training_texts(config)  # resolves the corpus now: bad paths fail first
    n_docs = 0

    def texts():
        nonlocal n_docs
        for text in corpus:
            n_docs += 1
            yield text

    tok = train_tokenizer(
        texts(), args.vocab_size, num_special=args.num_special, show_progress=sys.stderr.isatty()
    )
    if n_docs == 0:
        raise CamelidError(f"no training documents in {', '.join(args.corpus or ['stdlib'])}")
    tok.save(args.out)
    print(
        f"trained a {tok.vocab_size}-token BPE tokenizer on {n_docs} documents "
        f"in {time.perf_counter() - t0:.1f}s -> {args.out}"
    )
    return 0


# ----------------------------------------------------------------------------------- prepare
def cmd_prepare(args: argparse.Namespace) -> int:
    from camelid.data import prepare

    clean_config = CleanConfig(
        normalize=args.normalize,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        min_alnum_fraction=args.min_alnum_fraction,
        max_repeated_line_fraction=args.max_repeated_line_fraction,
        max_line_chars=args.max_line_chars,
    )
    config = PrepareConfig(
        corpus=tuple(args.corpus or ["stdlib"]),
        globs=tuple(args.glob or ()),
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        clean=clean_config,
        exact_dedup=not args.no_exact_dedup,
        near_dedup=not args.no_near_dedup,
        near_dup_threshold=args.near_dup_threshold,
        shard_tokens=args.shard_tokens,
    )
    manifest = Path(args.out) / "manifest.json"
    before = manifest.stat().st_mtime_ns if manifest.exists() else None
    m = prepare(config, args.tokenizer, args.out, workers=args.workers, overwrite=args.overwrite,
                progress=sys.stderr.isatty())  # fmt: skip
    st, sp = m["stats"], m["splits"]
    tokens = sum(s["tokens"] for s in sp.values())
    if before == manifest.stat().st_mtime_ns:
        print(f"{args.out}: already prepared from the same corpus, options and tokenizer")
    removed = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in st["removed"].items() if v)
    read = st["read"]
    skipped = [
        f"{read[k]} {label}"
        for k, label in (
            ("binary_files", "binary files"),
            ("non_utf8_files", "non-UTF-8 files"),
            ("bad_json_lines", "non-JSON lines"),
            ("missing_field", f"records without '{args.text_field}'"),
        )
        if read[k]
    ]
    print(f"files        {st['files']}" + (f" (skipped {', '.join(skipped)})" if skipped else ""))
    if read["first_bad_lines"]:
        print(f"  first bad  {', '.join(read['first_bad_lines'])}")
    print(f"documents    {st['documents']} read, {st['kept']} kept" +
          (f" (removed: {removed})" if removed else ""))  # fmt: skip
    for name, s in sp.items():
        print(f"{name:<12} {s['documents']} documents, {s['tokens']:,} tokens, "
              f"{len(s['shards'])} shard(s) of {m['dtype']}")  # fmt: skip
    print(f"throughput   {tokens / max(m['seconds'], 1e-9):,.0f} tokens/s ({m['seconds']:.1f}s)")
    print(f"output       {args.out}/manifest.json")
    return 0


# -------------------------------------------------------------------------------- quickstart
def cmd_quickstart(args: argparse.Namespace) -> int:
    from camelid.quickstart import quickstart

    summary = quickstart(args.out, args.corpus, args.vocab_size, args.set)
    _print_summary(summary)
    if summary["sample"] is not None:
        print(f"\nsample completion of {summary['sample_prompt']!r}:")
        print("    " + (summary["sample_prompt"] + summary["sample"]).replace("\n", "\n    "))
    print(f"\ntotal {summary['total_s'] / 60:.1f} min")
    return 0


# ------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from camelid.train.recipe import load_recipe
    from camelid.train.trainer import train

    recipe = load_recipe(args.recipe, args.set)
    summary = train(recipe, resume=args.resume, fresh=args.fresh)
    if not summary.reports:
        return 0  # not the main rank
    _print_summary(summary)
    return 0 if summary["status"] == "finished" else 143


def _print_summary(summary: dict[str, Any]) -> None:
    val = summary["final_val_loss"]
    print(
        f"{summary['status']} after {summary['steps']} steps, {summary['tokens']:,} tokens "
        f"in {summary['wall_s']:.0f}s (goodput {100 * summary['goodput']:.0f}%)"
        + (f"; validation loss {val:.3f}, {summary['final_val_bpb']:.3f} bits/byte" if val else "")
    )
    if summary["status"] != "finished":
        print(f"resume with: camelid train {summary['run_dir']}/recipe.toml --resume")
    print(f"run          {summary['run_dir']}")
    print(f"report       {summary['report']}")
    if summary["export"]:
        print(f"weights      {summary['export']} (Hugging Face format, with the tokenizer)")


# ------------------------------------------------------------------------- generate and chat
def resolve_model_dir(model: str | Path) -> Path:
    """MODEL as given → the Hugging Face directory to load: the directory itself, or ``RUN/hf``
    for a training run. Checks for weights' config and a tokenizer before anything is loaded."""
    path = Path(model)
    if not path.exists():
        raise CamelidError(f"{model}: no such directory")
    if not path.is_dir():
        raise CamelidError(f"{model}: expected a model directory, found a file")
    if not (path / "config.json").is_file():
        run_export = path / "hf"
        if (run_export / "config.json").is_file():
            path = run_export
        else:
            is_run = (path / "checkpoints").is_dir() or (path / "recipe.toml").is_file()
            hint = (
                f"; it looks like a training run that has not exported weights to {run_export} yet"
                if is_run
                else " (expected a Hugging Face Llama directory, or a training run with hf/)"
            )
            raise CamelidError(f"{model} is not a model directory: no config.json{hint}")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise CamelidError(
            f"{path} has no tokenizer.json or tokenizer.model (copy in the tokenizer the model "
            "was trained with)"
        )
    return path


def _sampling_params(args: argparse.Namespace, **extra: Any) -> Any:
    """The sampling flags as a SamplingParams (a RequestError naming the field if invalid)."""
    from camelid.infer import SamplingParams

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


def _device_and_dtype(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise CamelidError(f"--device {args.device!r}: not a device (try cpu, cuda)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CamelidError(f"--device {args.device}: CUDA is not available here")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def _note(args: argparse.Namespace, text: str) -> None:
    """A message for the user on stderr, unless --quiet."""
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def load_engine(args: argparse.Namespace) -> Any:
    """Load MODEL (weights and tokenizer) into an Engine as the engine flags ask."""
    from camelid.infer import Engine
    from camelid.tokenizer import Tokenizer
    from camelid.weights import load

    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise CamelidError(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    if args.batch_size < 1:
        raise CamelidError(f"--batch-size must be positive, got {args.batch_size}")
    path = resolve_model_dir(args.model)
    device, dtype = _device_and_dtype(args)
    tokenizer = Tokenizer.load(path)
    t0 = time.perf_counter()
    model = load(path, device=device, dtype=dtype, progress=None if not args.quiet else False)
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        compile=args.compile,
        int8=args.int8,
    )
    if args.max_seq_len and args.max_seq_len > model.config.max_seq_len:
        _note(args, f"note: the model's context is {model.config.max_seq_len} tokens; using that")
    dtype_name = str(dtype).removeprefix("torch.")
    _note(
        args,
        f"loaded {path} ({_count(model.config.num_params())} parameters, {dtype_name}"
        f"{', int8 decode' if args.int8 else ''}) on {device} in {time.perf_counter() - t0:.1f}s;"
        f" context {engine.max_seq_len} tokens",
    )
    return engine


def _read_prompt(kind: str, value: str) -> str:
    if kind == "text" and value != "-":
        return value
    if value == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CamelidError(f"--prompt-file {value}: cannot read it ({e})") from None
    return text.removesuffix("\n").removesuffix("\r")


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    from camelid.errors import TokenizerError

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except TokenizerError as e:
        raise CamelidError(
            f"{e}: this tokenizer has no chat format, so it cannot chat; use plain prompts "
            "(camelid generate without --chat)"
        ) from None


def _summary(completions: list[Any], seconds: float) -> str:
    tokens = sum(len(c.token_ids) for c in completions)
    prompt = sum(len(c.prompt_token_ids) for c in completions)
    reasons: dict[str, int] = {}
    for c in completions:
        reasons[c.finish_reason] = reasons.get(c.finish_reason, 0) + 1
    if len(completions) == 1:
        finish = completions[0].finish_reason
    else:
        finish = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    return (
        f"[{tokens} tokens generated ({prompt} prompt tokens) in {seconds:.2f}s, "
        f"{tokens / max(seconds, 1e-9):.1f} tokens/s; finish: {finish}]"
    )


def _logprob_json(tokenizer: Any, lp: Any) -> dict[str, Any] | None:
    if lp is None:
        return None
    return {
        "token": lp.token,
        "text": tokenizer.decode([lp.token]),
        "logprob": lp.logprob,
        "rank": lp.rank,
        "top": [
            {"token": t, "text": tokenizer.decode([t]), "logprob": v} for t, v in lp.top.items()
        ],
    }


def completion_json(tokenizer: Any, index: int, prompt: str, c: Any) -> dict[str, Any]:
    """What ``camelid generate --json`` prints for one prompt."""
    out: dict[str, Any] = {
        "index": index,
        "prompt": prompt,
        "text": c.text,
        "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "prompt_tokens": len(c.prompt_token_ids),
        "completion_tokens": len(c.token_ids),
    }
    if c.logprobs is not None:
        out["logprobs"] = [_logprob_json(tokenizer, lp) for lp in c.logprobs]
    if c.prompt_logprobs is not None:
        out["prompt_logprobs"] = [_logprob_json(tokenizer, lp) for lp in c.prompt_logprobs]
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked before loading it.
    if not args.prompts:
        raise CamelidError("no prompt: give --prompt TEXT, --prompt-file FILE or --prompt -")
    if sum(v == "-" for _, v in args.prompts) > 1:
        raise CamelidError("stdin ('-') can give only one prompt")
    for flag in ("logprobs", "prompt_logprobs"):
        if getattr(args, flag) is not None and not args.json:
            raise CamelidError(f"--{flag.replace('_', '-')} needs --json")
    if args.system is not None and not args.chat:
        raise CamelidError("--system needs --chat")
    params = _sampling_params(args, logprobs=args.logprobs, prompt_logprobs=args.prompt_logprobs)
    texts = [_read_prompt(kind, value) for kind, value in args.prompts]

    engine = load_engine(args)
    tok = engine.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    prompts = [
        _chat_ids(tok, [*system, {"role": "user", "content": t}])
        if args.chat
        else tok.encode(t, bos=True)
        for t in texts
    ]
    for i, ids in enumerate(prompts):
        label = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
        if len(ids) >= engine.max_seq_len and not args.truncate:
            raise CamelidError(
                f"{label} has {len(ids)} tokens, more than fit the context of "
                f"{engine.max_seq_len} tokens; shorten it, or pass --truncate to keep its last "
                "tokens"
            )

    t0 = time.perf_counter()
    if args.json:
        completions = engine.generate(prompts, params)
        for i, (text, c) in enumerate(zip(texts, completions, strict=True)):
            print(json.dumps(completion_json(tok, i, text, c), ensure_ascii=False), flush=True)
    else:
        completions = _stream_in_order(engine, prompts, texts, params, args.echo)
    seconds = time.perf_counter() - t0
    for i, (ids, c) in enumerate(zip(prompts, completions, strict=True)):
        if len(c.prompt_token_ids) < len(ids):
            label = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
            kept = len(c.prompt_token_ids)
            _note(args, f"note: {label} was truncated from {len(ids)} to its last {kept} tokens")
    compiling = " (including compiling the decode step)" if args.compile else ""
    _note(args, _summary(completions, seconds) + compiling)
    return 0


def _stream_in_order(
    engine: Any, prompts: list[list[int]], texts: list[str], params: Any, echo: bool
) -> list[Any]:
    """Decode all prompts together; print each completion in prompt order, the current one as
    it is generated, later ones (buffered meanwhile) as soon as their turn comes."""
    n = len(prompts)
    out = sys.stdout
    pending: dict[int, list[str]] = {i: [] for i in range(n)}
    done: dict[int, Any] = {}
    current = 0

    def start(i: int) -> None:
        if n > 1:
            preview = texts[i] if len(texts[i]) <= 50 else texts[i][:47] + "..."
            out.write(f"{'' if i == 0 else chr(10)}=== {i + 1}/{n} {preview!r} ===\n")
        if echo:
            out.write(texts[i])
        out.write("".join(pending.pop(i)))
        out.flush()

    start(0)
    try:
        for i, piece, completion in engine.stream_batch(prompts, params):
            if i == current:
                out.write(piece)
                out.flush()
            else:
                pending[i].append(piece)
            if completion is not None:
                done[i] = completion
            while current in done:
                out.write("\n")
                current += 1
                if current < n:
                    start(current)
                out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        raise
    return [done[i] for i in range(n)]


# -------------------------------------------------------------------------------------- chat
CHAT_HELP = """commands:
  /reset         forget the conversation (the system message stays)
  /help          this list
  /exit, /quit   leave (as does Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C while an answer is being written stops it; what was shown stays in the history."""


def fit_history(
    tokenizer: Any, messages: list[dict[str, str]], budget: int
) -> tuple[list[int], int]:
    """The prompt ids for a chat (``messages`` ends with the new user message), dropping the
    oldest turns until at most ``budget`` tokens remain. A leading system message is kept,
    and the history always restarts at a user message. Returns the ids and how many messages
    were dropped from the front of the history (they are removed from ``messages``)."""
    system = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    ids = _chat_ids(tokenizer, messages)
    while len(ids) > budget and len(messages) - system > 1:
        del messages[system]
        dropped += 1
        while len(messages) - system > 1 and messages[system]["role"] != "user":
            del messages[system]
            dropped += 1
        ids = _chat_ids(tokenizer, messages)
    return ids, dropped


def stream_answer(engine: Any, ids: list[int], params: Any) -> tuple[str, Any, bool]:
    """Stream one answer to stdout. Returns (its text, the completion or None, whether Ctrl-C
    stopped it: then the text is the part shown)."""
    shown: list[str] = []
    completion = None
    try:
        for _, piece, c in engine.stream_batch([ids], params):
            if piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
                shown.append(piece)
            if c is not None:
                completion = c
    except KeyboardInterrupt:
        return "".join(shown), None, True
    return (completion.text if completion else "".join(shown)), completion, False


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    engine = load_engine(args)
    tok = engine.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    _chat_ids(tok, [*system, {"role": "user", "content": ""}])  # fail now if it cannot chat
    # Room kept for the answer: --max-new-tokens, but at most half the context.
    budget = engine.max_seq_len - min(params.max_new_tokens, engine.max_seq_len // 2)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    _note(args, "type a message; /help lists commands, /exit or Ctrl-D leaves")
    messages = list(system)
    turn = 0
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                messages = list(system)
                _note(args, "(conversation cleared)")
            elif command == "/help":
                print(CHAT_HELP)
            else:
                print(f"unknown command {command}; /help lists them", file=sys.stderr)
            continue
        trial = [*messages, {"role": "user", "content": line}]
        ids, dropped = fit_history(tok, trial, budget)
        if len(ids) >= engine.max_seq_len:  # the history is left as it was
            print(
                f"camelid: that message is {len(ids)} tokens with the chat framing, more than "
                f"fit the context of {engine.max_seq_len}; try a shorter one",
                file=sys.stderr,
            )
            continue
        messages = trial
        if dropped:
            context = engine.max_seq_len
            _note(args, f"(dropped the {dropped} oldest message(s) to fit the context, {context})")
        seed = None if params.seed is None else params.seed + turn
        text, completion, stopped = stream_answer(engine, ids, params.replace(seed=seed))
        print(flush=True)
        turn += 1
        if stopped:
            _note(args, "(answer stopped; the part shown is kept in the conversation)")
        elif completion is not None and completion.finish_reason == "length":
            _note(args, "(answer cut at --max-new-tokens or the end of the context)")
        messages.append({"role": "assistant", "content": text})


if __name__ == "__main__":
    sys.exit(main())
