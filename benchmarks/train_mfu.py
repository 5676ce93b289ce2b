"""Model FLOPs utilisation of `camelid train` itself, on the device present.

Prepares the built-in corpus with a small tokenizer in a temporary directory, then runs the real
trainer (`camelid.train.trainer.train`) on a preset — by default Llama 3.2 1B with its full
128,256-token vocabulary (the data only uses the tokenizer's ids; the model's size and FLOPs
are the preset's) — and prints the median tokens/s and MFU over the steps after warm-up (which
includes compilation). MFU = the trainer's FLOPs per token (ModelConfig.flops_per_token) ×
tokens/s ÷ the device's dense bf16 peak (989.5 TFLOP/s for an H100 SXM).

    python benchmarks/train_mfu.py --device cuda --compile            # ~1B, bf16, one GPU
    python benchmarks/train_mfu.py --preset tiny --device cpu --steps 8 --seq-len 64 --batch 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from camelid.data import PrepareConfig, prepare, sources
from camelid.tokenizer import train_tokenizer
from camelid.train.recipe import load_recipe
from camelid.train.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--vocab-size", type=int, default=0, help="model vocab (default: preset's)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=15, help="steps left out of the medians")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
    args = ap.parse_args()

    from camelid.config import PRESETS

    # The preset's vocabulary, but never fewer ids than the 4096-token tokenizer the data uses.
    vocab = args.vocab_size or max(PRESETS[args.preset].get("vocab_size", 32000), 4096)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = [d.text for t in sources.resolve(sources.BUILTIN)[:400]
                 for d in sources.read(t, sources.ReadStats())[1]]  # fmt: skip
        train_tokenizer(texts, 4096).save(tmp / "tok")
        prepare(PrepareConfig(), tmp / "tok", tmp / "data", progress=False)
        overrides = [
            f"model.preset='{args.preset}'",
            f"model.vocab_size={vocab}",
            f"train.steps={args.steps}",
            f"schedule.warmup_steps={min(args.steps, 100)}",  # warm-up fits in the run
            f"train.batch_size={args.batch}",
            f"train.seq_len={args.seq_len}",
            f"train.device='{args.device}'",
            f"train.compile={str(args.compile).lower()}",
            f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}",
            "checkpoint.interval=0",
            "checkpoint.export_hf=false",
            "eval.interval=0",
            "eval.batches=1",
            "eval.sample_tokens=0",
            "guard.enabled=false",
            f"run.out_dir='{tmp / 'run'}'",
            f"data.dir='{tmp / 'data'}'",
        ]
        summary = train(load_recipe(None, overrides), progress=False)
        steps = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [s for s in steps if s["kind"] == "step"][args.warmup :]
    tps = statistics.median(s["tokens_per_s"] for s in steps)
    mfus = [s["mfu"] for s in steps if s["mfu"] is not None]
    mem = max(s["peak_mem_bytes"] or 0 for s in steps)
    print(
        f"train MFU: preset {args.preset} (vocab {vocab}, {summary['params'] / 1e9:.2f}B params), "
        f"batch {args.batch} x {args.seq_len}, {summary['device']}, "
        f"{'compiled' if args.compile else 'eager'}"
    )
    print(f"  median over steps {args.warmup + 1}..{args.steps}: {tps:,.0f} tokens/s")
    if mfus:
        mfu = 100 * statistics.median(mfus)
        print(f"  MFU {mfu:.1f}% (median), peak memory {mem / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
