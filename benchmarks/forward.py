"""Forward-pass throughput: camelid vs transformers' LlamaForCausalLM, side by side.

Both models get the same config, the same weights (transformers' random init, saved and loaded
by camelid), the same input and dtype. Timings alternate between the two in one process, and
the ratio of median tokens/s is printed (> 1 means camelid is faster).

    python benchmarks/forward.py                      # llama-16m, batch 4 x 256, CPU fp32
    python benchmarks/forward.py --preset tiny --batch 1 --seq-len 128
    python benchmarks/forward.py --device cuda --dtype bfloat16 --preset llama-3.2-1b [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import camelid
from camelid.config import ModelConfig
from camelid.system import cpu_name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="llama-16m", help="camelid preset (default: llama-16m)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10, help="timed forward passes per model")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile camelid's model")
    ap.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = ModelConfig.from_preset(args.preset)
    hf_config = LlamaConfig(**config.to_hf(args.dtype))
    hf = LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa", dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = camelid.load(tmp, device=device, dtype=dtype).eval()
    hf = hf.to(device).eval()
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    if args.compile:
        ours = torch.compile(ours)

    runs = {
        "camelid": lambda: ours(tokens),
        "transformers": lambda: hf(input_ids=tokens, use_cache=False).logits,
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        diff = (runs["camelid"]().float() - runs["transformers"]().float()).abs().max().item()
        for _ in range(args.warmup):
            for fn in runs.values():
                fn()
        for r in range(args.repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                times[name].append(_time(runs[name], device))

    n_tokens = args.batch * args.seq_len
    tps = {name: n_tokens / statistics.median(ts) for name, ts in times.items()}
    ratio = tps["camelid"] / tps["transformers"]
    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"forward: preset {args.preset} ({config.num_params() / 1e6:.1f}M params), "
        f"{'compiled ' if args.compile else ''}"
        f"batch {args.batch} x {args.seq_len}, {args.dtype} on {args.device} "
        f"({where}, {torch.get_num_threads()} threads)"
    )
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"max |logit difference|: {diff:.2e}")
    for name, v in tps.items():
        print(f"  {name:<13} {v:12,.0f} tokens/s   (median of {args.repeats})")
    print(f"ratio camelid / transformers: {ratio:.2f}x")
    if args.json:
        print(json.dumps({"tokens_per_s": tps, "ratio": ratio, "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
