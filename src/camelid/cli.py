"""The front door: ``camelid <subcommand>``. One subcommand per stage, nothing else here.

Errors a user can cause end in one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
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
    return parser


def _set_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)


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
    if summary.get("sample") is not None:
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
    if "report" not in summary:
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
    if summary.get("export"):
        print(f"weights      {summary['export']} (Hugging Face format, with the tokenizer)")


if __name__ == "__main__":
    sys.exit(main())
