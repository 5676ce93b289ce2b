"""Decode speed: camelid's Engine vs transformers' ``generate``, side by side.

Both sides decode greedily with a KV cache from the same weights (transformers' random init of
the preset's shape, saved and loaded by camelid) and the same prompt ids, and every timed call
generates exactly ``--new-tokens`` tokens (end-of-text is ignored). A call is timed whole,
prefill included (the prompt is short); tokens/s = tokens generated / seconds, the median of
``--repeats`` calls that alternate between the two sides after an untimed warm-up (which also
compiles). For batch 1 greedy fp32 the two token sequences are checked equal.

``--sampling`` decodes with temperature 0.8 and top-p 0.95 instead (camelid seeded, so its
runs repeat; transformers ``generate(do_sample=True, temperature=0.8, top_p=0.95, top_k=0)``,
its top-k of 50 switched off): the path a server's requests take, where every step filters and
draws from each row's distribution. The two sides' tokens are not compared (their random
numbers differ).

The roofline is the memory-bandwidth bound of batch-1 decoding: each token reads every weight
once, so tokens/s ≤ read bandwidth / weight bytes (``camelid.infer.linear.decode_bytes``: all
weights but the embedding table, of which a step reads one row). The read bandwidth is measured
in the same run (the best of a few ``sum`` passes over a buffer much larger than the caches).

    python benchmarks/decode.py                                # llama-16m, CPU fp32, batch 1 and 16
    python benchmarks/decode.py --batches 1 --variants compiled,int8
    python benchmarks/decode.py --batches 16 --sampling          # sampled decoding
    python benchmarks/decode.py --device cuda --preset llama-3.2-1b --dtype bf16 --no-hf

Variants of camelid: ``eager`` (no compile), ``compiled`` (``Engine(compile=True)``), ``int8``
(``Engine(compile=True, int8=True)``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

import camelid
from camelid.config import ModelConfig
from camelid.infer.linear import decode_bytes
from camelid.system import cpu_name, device_name
from camelid.tokenizer import train_tokenizer

SAMPLING = dict(temperature=0.8, top_p=0.95)  # --sampling, on both sides


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s of a plain streaming read: the best of ``reps`` sums over ``nbytes`` of fp32."""
    x = torch.ones(nbytes // 4, device=device)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def bench_tokenizer(vocab_size: int) -> camelid.Tokenizer:
    """A byte-level BPE tokenizer of (up to) the model's vocabulary, learned from the stdlib."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:150]
    texts = [f.read_text(errors="replace") for f in files]
    return train_tokenizer(texts, vocab_size, num_special=256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="llama-16m", help="model shape (default: llama-16m)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batches", default="1,16", help="batch sizes, comma-separated")
    ap.add_argument(
        "--variants", default="eager,compiled,int8", help="camelid variants, comma-separated"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per side")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (roofline only)")
    ap.add_argument(
        "--sampling", action="store_true", help=f"sample ({SAMPLING}) instead of greedy"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    batches = [int(b) for b in args.batches.split(",")]
    variants = args.variants.split(",")

    config = ModelConfig.from_preset(args.preset)
    tok = bench_tokenizer(config.vocab_size)
    hf = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.no_hf:
            torch.manual_seed(0)
            with torch.device(device):
                model = camelid.Transformer(config).to(dtype)
        else:
            import transformers

            transformers.utils.logging.disable_progress_bar()
            torch.manual_seed(0)
            hf_config = transformers.LlamaConfig(**config.to_hf())
            hf = transformers.LlamaForCausalLM(hf_config).to(device=device, dtype=dtype).eval()
            hf.generation_config.eos_token_id = None  # exactly --new-tokens, like ignore_eos
            hf.save_pretrained(tmp)
            model = camelid.load(tmp, device=device, dtype=dtype)
    weight_bytes = decode_bytes(model)
    bandwidth = read_bandwidth(device)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, tok.vocab_size, (max(batches), args.prompt_len), generator=g)
    where = device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"{args.preset} {args.dtype} {'sampled' if args.sampling else 'greedy'} on {where} "
        f"({torch.get_num_threads()} threads); "
        f"weights read per token {weight_bytes / 1e6:.1f} MB; tokenizer vocabulary "
        f"{tok.vocab_size}; measured read bandwidth {bandwidth / 1e9:.1f} GB/s; "
        f"roofline {bandwidth / weight_bytes:.0f} tokens/s"
    )

    engines = {}
    for v in variants:
        t0 = time.perf_counter()
        engines[v] = camelid.Engine(
            model,
            tok,
            max_batch_size=max(batches),
            compile=v in ("compiled", "int8"),
            int8=v == "int8",
        )
        engines[v].build_s = time.perf_counter() - t0  # type: ignore[attr-defined]

    decoding = dict(**SAMPLING, seed=0) if args.sampling else dict(temperature=0)
    hf_decoding = (
        dict(do_sample=True, top_k=0, **SAMPLING) if args.sampling else {"do_sample": False}
    )

    def run_camelid(v: str, ids: torch.Tensor) -> list[list[int]]:
        out = engines[v].generate(
            [row.tolist() for row in ids],
            max_new_tokens=args.new_tokens,
            ignore_eos=True,
            **decoding,
        )
        return [c.token_ids for c in out]

    def run_hf(ids: torch.Tensor) -> list[list[int]]:
        out = hf.generate(
            ids.to(device),
            attention_mask=torch.ones_like(ids, device=device),
            max_new_tokens=args.new_tokens,
            pad_token_id=0,
            **hf_decoding,
        )
        return out[:, ids.shape[1] :].tolist()

    def timed(fn, *a) -> tuple[float, list[list[int]]]:
        _sync(device)
        t0 = time.perf_counter()
        out = fn(*a)
        _sync(device)
        return time.perf_counter() - t0, out

    results = []
    with torch.inference_mode():
        for batch in batches:
            ids = prompts[:batch]
            sides = {v: (run_camelid, v) for v in variants}
            if hf is not None:
                sides["transformers"] = (run_hf,)
            times: dict[str, list[float]] = {name: [] for name in sides}
            outputs = {}
            for name, (fn, *a) in sides.items():  # warm-up (and compile)
                t, outputs[name] = timed(fn, *a, ids)
                print(f"  batch {batch} {name}: warm-up {t:.1f} s", flush=True)
            for _ in range(args.repeats):
                for name, (fn, *a) in sides.items():
                    t, out = timed(fn, *a, ids)
                    assert all(len(o) == args.new_tokens for o in out), "short output"
                    times[name].append(t)
            tokens = batch * args.new_tokens
            rate = {name: tokens / statistics.median(ts) for name, ts in times.items()}
            hf_rate = rate.get("transformers")
            print(f"batch {batch}: {args.new_tokens} new tokens per prompt")
            for name in sides:
                line = f"  {name:>12}: {rate[name]:8.1f} tokens/s"
                if name != "transformers" and hf_rate:
                    line += f"  {rate[name] / hf_rate:5.2f}x transformers"
                if batch == 1:
                    wb = weight_bytes if name != "int8" else decode_bytes(engines["int8"].model)
                    line += f"  {rate[name] * wb / bandwidth:6.1%} of the bandwidth roofline"
                    if name == "int8":
                        line += f" (int8 weights: {wb / 1e6:.1f} MB)"
                compared = batch == 1 and hf is not None and not args.sampling
                if name in engines and compared and name != "int8":
                    same = outputs[name] == outputs["transformers"]
                    line += "  [same tokens]" if same else "  [tokens DIFFER]"
                print(line)
            results.append({"batch": batch, "tokens_per_s": rate})
    if args.json:
        print(
            json.dumps(
                {
                    "preset": args.preset,
                    "dtype": args.dtype,
                    "sampling": SAMPLING if args.sampling else None,
                    "device": str(device),
                    "weight_bytes": weight_bytes,
                    "read_bandwidth": bandwidth,
                    "results": results,
                }
            )
        )


if __name__ == "__main__":
    main()
