"""Training throughput: camelid vs transformers' LlamaForCausalLM, side by side.

One training step = forward, fp32 cross-entropy, backward, gradient clipping, AdamW step and
zero_grad. camelid's side runs the trainer's own pieces from ``camelid.train.step``
(``forward_backward``, ``clip_grad_norm``, ``build_optimizer``); transformers' side runs its
model's logits through the same loss, the same clipping and the same optimizer (same
hyper-parameters and weight-decay groups). Both start from the same weights (transformers'
random init, saved and loaded by camelid) and train on the same tokens. Timed steps alternate
between the two in one process; the ratio of median tokens/s is printed (> 1 means camelid is
faster), with each side's achieved FLOP/s as a share of this machine's fp32 matmul peak,
measured in the same run with large matmuls (MKL's and oneDNN's). FLOPs per token come from
``ModelConfig.flops_per_token`` (training: 6N + the attention term).

    python benchmarks/train_step.py                      # llama-16m, batch 8 x 256, CPU fp32
    python benchmarks/train_step.py --compile            # camelid's model under torch.compile
    python benchmarks/train_step.py --compile blocks     # each block, as `camelid train` does
    python benchmarks/train_step.py --preset tiny --batch 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time

import torch

import camelid
from camelid.config import ModelConfig
from camelid.loss import cross_entropy
from camelid.system import cpu_name
from camelid.train.metrics import measure_matmul_flops
from camelid.train.step import build_optimizer, clip_grad_norm, forward_backward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="llama-16m", help="camelid preset (default: llama-16m)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    ap.add_argument("--matmul-size", type=int, default=4096, help="n for the n x n peak matmul")
    ap.add_argument("--matmul-reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--compile",
        nargs="?",
        const="model",
        choices=["model", "blocks"],
        help="torch.compile camelid's whole model (default) or each block (as the trainer does)",
    )
    ap.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = ap.parse_args()

    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig.from_preset(args.preset)
    hf = LlamaForCausalLM._from_config(
        LlamaConfig(**config.to_hf()), attn_implementation="sdpa", dtype=torch.float32
    )
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = camelid.load(tmp, dtype=torch.float32, progress=False)
    hf.train()
    ours.train()
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    opt_ours = build_optimizer(ours, lr=args.lr, weight_decay=args.weight_decay)
    opt_hf = build_optimizer(hf, lr=args.lr, weight_decay=args.weight_decay)
    compile_s = None
    if args.compile == "model":
        ours = torch.compile(ours)
    elif args.compile == "blocks":
        for block in ours.layers:
            block.compile()

    def camelid_step() -> torch.Tensor:
        loss = forward_backward(ours, [(x, y)])
        clip_grad_norm(ours, args.clip)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss

    def transformers_step() -> torch.Tensor:
        logits = hf(input_ids=x, labels=None, use_cache=False).logits
        loss = cross_entropy(logits, y)
        loss.backward()
        clip_grad_norm(hf, args.clip)
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return loss.detach()

    runs = {"camelid": camelid_step, "transformers": transformers_step}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    faults: dict[str, list[int]] = {name: [] for name in runs}  # minor page faults per step

    def run(name: str) -> float:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        loss = runs[name]()
        dt = time.perf_counter() - t0
        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        losses[name].append(loss.item())
        return dt

    # The first step also compiles camelid's model under --compile; its time is reported.
    first = {name: run(name) for name in runs}
    if args.compile:
        compile_s = first["camelid"]
    for _ in range(args.warmup):
        for name in runs:
            run(name)
    peak_before = measure_matmul_flops(args.matmul_size, args.matmul_reps)
    for s in range(args.steps):
        order = list(runs) if s % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(run(name))
    peak = max(peak_before, measure_matmul_flops(args.matmul_size, args.matmul_reps))

    n_tokens = args.batch * args.seq_len
    flops_per_token = config.flops_per_token(args.seq_len)
    tps = {name: n_tokens / statistics.median(ts) for name, ts in times.items()}
    share = {name: v * flops_per_token / peak for name, v in tps.items()}
    ratio = tps["camelid"] / tps["transformers"]
    first_diff = abs(losses["camelid"][0] - losses["transformers"][0])
    max_diff = max(
        abs(a - b) for a, b in zip(losses["camelid"], losses["transformers"], strict=True)
    )

    compiled = f"compiled ({args.compile}) " if args.compile else ""
    print(
        f"train step: preset {args.preset} ({config.num_params() / 1e6:.1f}M params), "
        f"{compiled}batch {args.batch} x {args.seq_len}, "
        f"float32 on cpu ({cpu_name()}, {torch.get_num_threads()} threads)"
    )
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}; AdamW lr {args.lr}, "
        f"weight decay {args.weight_decay}, clip {args.clip}, fused {opt_ours.defaults['fused']}"
    )
    print(
        f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (best of 2 x {args.matmul_reps} "
        f"matmul {args.matmul_size}^2 (MKL and oneDNN), before and after the timed steps)"
    )
    print(f"training FLOPs per token: {flops_per_token / 1e6:.1f} M (ModelConfig.flops_per_token)")
    print(
        f"loss: first step {losses['camelid'][0]:.6f} vs {losses['transformers'][0]:.6f}, "
        f"|difference| {first_diff:.2e}; max over {len(losses['camelid'])} steps {max_diff:.2e}"
    )
    if compile_s is not None:
        print(f"first camelid step (includes torch.compile): {compile_s:.1f} s")
    n_faults = {name: statistics.median(f[-args.steps :]) for name, f in faults.items()}
    for name, v in tps.items():
        print(
            f"  {name:<13} {v:10,.0f} tokens/s  {v * flops_per_token / 1e9:6.1f} GFLOP/s "
            f"= {share[name]:5.1%} of peak   (median of {args.steps}; "
            f"{n_faults[name]:,.0f} page faults/step)"
        )
    print(f"ratio camelid / transformers: {ratio:.2f}x")
    if args.json:
        print(
            json.dumps(
                {
                    "tokens_per_s": tps,
                    "ratio": ratio,
                    "share_of_peak": share,
                    "matmul_peak_flops": peak,
                    "flops_per_token": flops_per_token,
                    "first_loss_abs_diff": first_diff,
                    "max_loss_abs_diff": max_diff,
                    "compile_s": compile_s,
                    "page_faults_per_step": n_faults,
                }
            )
        )


if __name__ == "__main__":
    main()
