"""What int8 weight-only quantisation costs in quality: perplexity of the same model with fp32
and with int8 linear layers (``camelid.infer.quantize_int8``, as ``Engine(int8=True)`` decodes),
on the same held-out token windows, plus how often the two agree on the most likely next token.

    camelid quickstart                                        # a trained model and its data
    python benchmarks/int8_quality.py --model runs/quickstart/run/hf --data runs/quickstart/data
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

import camelid
from camelid.data import TokenLoader
from camelid.infer import quantize_int8
from camelid.infer.linear import decode_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (Hugging Face safetensors)")
    ap.add_argument("--data", required=True, help="prepared data directory (its validation split)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=16, help="validation batches to score")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    model = camelid.load(args.model, dtype=torch.float32).eval()
    q = quantize_int8(model).eval()
    loader = TokenLoader(
        args.data,
        "validation",
        batch_size=args.batch,
        seq_len=args.seq_len,
        seed=0,
        rank=0,
        world_size=1,
    )
    nll = {"fp32": 0.0, "int8": 0.0}
    agree = tokens = 0
    with torch.inference_mode():
        for _, (x, y) in zip(range(args.batches), loader, strict=False):
            logits = {"fp32": model(x).float(), "int8": q(x).float()}
            for name, lg in logits.items():
                nll[name] += F.cross_entropy(lg.flatten(0, 1), y.flatten(), reduction="sum").item()
            agree += (logits["fp32"].argmax(-1) == logits["int8"].argmax(-1)).sum().item()
            tokens += y.numel()
    ppl = {k: math.exp(v / tokens) for k, v in nll.items()}
    result = {
        "tokens": tokens,
        "ppl_fp32": ppl["fp32"],
        "ppl_int8": ppl["int8"],
        "ppl_change": ppl["int8"] / ppl["fp32"] - 1,
        "top1_agreement": agree / tokens,
        "weight_mb_fp32": decode_bytes(model) / 1e6,
        "weight_mb_int8": decode_bytes(q) / 1e6,
    }
    print(
        f"{tokens} validation tokens: perplexity fp32 {ppl['fp32']:.4f}, int8 {ppl['int8']:.4f} "
        f"({result['ppl_change']:+.3%}); same top-1 token {result['top1_agreement']:.2%}; "
        f"weights read per token {result['weight_mb_fp32']:.1f} MB -> "
        f"{result['weight_mb_int8']:.1f} MB"
    )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
