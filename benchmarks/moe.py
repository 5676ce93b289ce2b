"""MoE throughput: camelid vs transformers' Llama 4, side by side on the same work, CPU fp32.

Part 1, the layer: ``camelid.model.moe.MoE`` vs transformers' ``Llama4TextMoe`` built from a
``Llama4TextConfig`` of the same dims, holding the SAME weights (HF's router, ``gate_up_proj``,
``down_proj`` and shared expert copied into camelid's layout). The outputs are checked to agree
within 1e-4 before timing. One timed step = forward + backward of ``loss = (out * R).sum()``
for a fixed random projection R. camelid sends each token only through its chosen experts
(grouped matmuls); transformers' layer runs EVERY token through EVERY expert (the unchosen
ones with a zero input scale), so it does E/k times the routed work. Each side's achieved
FLOP/s is counted with the FLOPs it actually needs (printed) as a share of this machine's fp32
matmul peak, measured in the same run (``camelid.train.metrics.measure_matmul_flops``).

Part 2, the whole-model training step: ``Llama4ForCausalLM`` from a config
(``ModelConfig.to_hf``), saved by transformers and read by ``camelid.load``, so both hold the
SAME weights; their losses on the batch are checked to agree within 1e-4 before timing. One
step: camelid runs what ``camelid train`` runs per step (``forward_backward`` with its fused
head and loss, the MoE accounting and the selection-bias update, AdamW, zero_grad);
transformers runs forward, fp32 cross-entropy of its logits, backward, AdamW, zero_grad.

Timed steps alternate between the two sides in one process; medians are reported, and the
ratio camelid / transformers of tokens/s (> 1: camelid is faster).

    python benchmarks/moe.py                              # dim 512, F 1024, 16 experts, top-1
    python benchmarks/moe.py --experts 8 --top-k 2 --tokens 2048
    python benchmarks/moe.py --skip-model                 # the layer only
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

import camelid
from camelid.config import ModelConfig
from camelid.loss import cross_entropy, next_token_loss
from camelid.model.moe import MoE, grouped_mm_supported
from camelid.system import cpu_name
from camelid.train import balance
from camelid.train.distributed import World
from camelid.train.metrics import measure_matmul_flops
from camelid.train.step import build_optimizer, forward_backward


def _time(runs: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each side, after ``warmup`` calls; timed calls alternate."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(reps):
        for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _layer_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.from_preset(
        "tiny",
        dim=args.dim,
        n_heads=args.dim // 64,
        n_kv_heads=args.dim // 64,
        n_experts=args.experts,
        n_experts_per_tok=args.top_k,
        n_shared_experts=1,
        moe_ffn_dim=args.ffn,
    )


def bench_layer(args: argparse.Namespace, peak: float) -> dict[str, float]:
    """Part 1: the MoE layer, same weights, forward + backward tokens/s of both."""
    import transformers
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    E, k, D, Fd, N = args.experts, args.top_k, args.dim, args.ffn, args.tokens
    hf_config = transformers.Llama4TextConfig(
        hidden_size=D,
        intermediate_size=Fd,
        num_local_experts=E,
        num_experts_per_tok=k,
        num_attention_heads=D // 64,
        num_key_value_heads=D // 64,
        head_dim=64,
    )
    torch.manual_seed(0)
    hf = Llama4TextMoe(hf_config)
    with torch.no_grad():
        for p in hf.parameters():  # HF's gate_up_proj starts at zeros: give it real values
            p.normal_(0, 0.02)
        # Router logits of std ~1: spread routing, and no sigmoid saturating to exactly 1.0
        # (ties there would make the two sides' top-k pick different experts).
        hf.router.weight.normal_(0, D**-0.5)
    ours = MoE(_layer_config(args))
    with torch.no_grad():
        ours.router.weight.copy_(hf.router.weight)
        ours.experts.w13.copy_(hf.experts.gate_up_proj)  # same [E, dim, 2F] layout, gate first
        ours.experts.w2.copy_(hf.experts.down_proj)
        ours.shared.w1.weight.copy_(hf.shared_expert.gate_proj.weight)
        ours.shared.w3.weight.copy_(hf.shared_expert.up_proj.weight)
        ours.shared.w2.weight.copy_(hf.shared_expert.down_proj.weight)

    x = torch.randn(N, D)
    proj = torch.randn(N, D)
    with torch.no_grad():
        ref, _ = hf(x)
        out = ours(x)
    diff = (out - ref).abs().max().item()
    print(f"layer outputs, camelid vs transformers (same weights): max |diff| {diff:.2e}")
    if not diff <= 1e-4:
        raise SystemExit(f"layer outputs differ by {diff:.2e} (> 1e-4): not timing")
    load = torch.bincount(ours.route(x)[0].flatten(), minlength=args.experts).tolist()
    print(f"tokens per expert (camelid's routing): min {min(load)}, max {max(load)}")

    xs = {name: x.clone().requires_grad_() for name in ("camelid", "transformers")}

    def camelid_step() -> None:
        (ours(xs["camelid"]) * proj).sum().backward()

    def transformers_step() -> None:
        (hf(xs["transformers"])[0] * proj).sum().backward()

    med = _time(
        {"camelid": camelid_step, "transformers": transformers_step}, args.warmup, args.reps
    )
    # FLOPs each side needs, forward + backward = 3 x forward (2 per multiply-add).
    expert = 2 * 3 * D * Fd  # one SwiGLU expert, forward, per row
    router = 2 * D * E
    need = {
        "camelid": 3 * N * (router + expert * (k + 1)),  # k routed rows + shared per token
        "transformers": 3 * N * (router + expert * (E + 1)),  # every token x every expert
    }
    impl = ours.impl
    if impl == "auto":
        impl = (
            "grouped_mm"
            if grouped_mm_supported(x, ours.experts.w13, ours.experts.w2)
            else "bmm (padded)"
        )
    print(
        f"MoE layer: dim {D}, expert FFN {Fd}, {E} experts top-{k} + 1 shared, {N} tokens/step; "
        f"camelid grouped path: {impl}"
    )
    print(
        f"  FLOPs/step counted: camelid {need['camelid'] / 1e9:.1f} G (routed tokens only), "
        f"transformers {need['transformers'] / 1e9:.1f} G (all {N} tokens through all {E} "
        f"experts, as its bmm does)"
    )
    tps = {name: N / t for name, t in med.items()}
    for name, t in med.items():
        rate = need[name] / t
        print(
            f"  {name:<13} {tps[name]:10,.0f} tokens/s  {rate / 1e9:6.1f} GFLOP/s "
            f"= {rate / peak:5.1%} of peak   (median of {args.reps})"
        )
    ratio = tps["camelid"] / tps["transformers"]
    print(f"  layer ratio camelid / transformers: {ratio:.2f}x (target >= 4x)")
    return {"ratio": ratio, "max_diff": diff, **{f"tps_{n}": v for n, v in tps.items()}}


def bench_model(args: argparse.Namespace, peak: float) -> dict[str, float]:
    """Part 2: the whole-model training step, the same weights on both sides."""
    import transformers
    from transformers import Llama4ForCausalLM

    config = ModelConfig.from_preset(
        "tiny",
        vocab_size=args.model_vocab,
        dim=args.model_dim,
        n_layers=args.model_layers,
        n_heads=args.model_dim // 64,
        n_kv_heads=max(1, args.model_dim // 128),
        n_experts=args.experts,
        n_experts_per_tok=args.top_k,
        n_shared_experts=1,
        moe_ffn_dim=args.model_ffn,
        moe_interleave_step=1,
        max_seq_len=args.model_seq,
        # Scout's attention: NoPE every 4th layer with temperature tuning, chunked RoPE
        # attention (chunks of 8192: the whole sequence here), QK-norm.
        nope_layer_interval=4,
        attn_temperature_tuning=True,
        attention_chunk_size=8192,
        use_qk_norm=True,
    )
    hf_fields = config.to_hf()
    hf_config = transformers.Llama4TextConfig(**hf_fields)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = Llama4ForCausalLM(hf_config).train()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = camelid.load(tmp).train()
    n_hf = sum(p.numel() for p in hf.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    print(
        f"\nwhole model: {config.n_layers} layers, dim {config.dim}, {config.n_heads} heads "
        f"({config.n_kv_heads} kv), vocab {config.vocab_size}, every layer MoE: {args.experts} "
        f"experts top-{args.top_k} + 1 shared, expert FFN {args.model_ffn}; "
        f"batch {args.model_batch} x {args.model_seq}"
    )
    print(
        f"  parameters: camelid {n_ours:,}, transformers {n_hf:,} (identical shapes; "
        "the same weights: transformers saved them, camelid.load read them)"
    )
    tokens = torch.randint(0, config.vocab_size, (args.model_batch, args.model_seq + 1))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    with torch.no_grad():
        ours_loss = float(next_token_loss(ours, x, y))
        hf_loss = float(cross_entropy(hf(input_ids=x, use_cache=False).logits, y))
    print(f"  loss on the batch: camelid {ours_loss:.6f}, transformers {hf_loss:.6f}")
    if not abs(ours_loss - hf_loss) <= 1e-4:
        raise SystemExit(f"the models' losses differ by {abs(ours_loss - hf_loss):.2e}: not timing")
    print("  step: camelid forward_backward + MoE accounting + bias update + AdamW + zero_grad;")
    print("  transformers forward + fp32 cross-entropy + backward + AdamW + zero_grad")
    opt_ours = build_optimizer(ours, lr=1e-4, weight_decay=0.1)
    opt_hf = build_optimizer(hf, lr=1e-4, weight_decay=0.1)

    world = World()

    def camelid_step() -> None:
        forward_backward(ours, [(x, y)], world=world)
        stats = balance.end_step(ours, world, x.numel())
        opt_ours.step()
        balance.update_bias(ours, stats.tokens, 1e-3)
        opt_ours.zero_grad(set_to_none=True)

    def transformers_step() -> None:
        cross_entropy(hf(input_ids=x, use_cache=False).logits, y).backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    med = _time(
        {"camelid": camelid_step, "transformers": transformers_step},
        args.warmup,
        args.model_reps,
    )
    n_tokens = args.model_batch * args.model_seq
    fpt = config.flops_per_token(args.model_seq)  # active parameters: what camelid computes
    extra = 6 * config.n_moe_layers * (args.experts - args.top_k) * 3 * config.dim * args.model_ffn
    need = {"camelid": fpt, "transformers": fpt + extra}
    print(
        f"  training FLOPs/token: camelid {fpt / 1e6:.1f} M (ModelConfig.flops_per_token, "
        f"active), transformers {(fpt + extra) / 1e6:.1f} M (+ the unchosen experts it runs)"
    )
    tps = {name: n_tokens / t for name, t in med.items()}
    for name in med:
        rate = tps[name] * need[name]
        print(
            f"  {name:<13} {tps[name]:10,.0f} tokens/s  {rate / 1e9:6.1f} GFLOP/s "
            f"= {rate / peak:5.1%} of peak   (median of {args.model_reps})"
        )
    ratio = tps["camelid"] / tps["transformers"]
    print(f"  training-step ratio camelid / transformers: {ratio:.2f}x (target >= 2x)")
    return {"ratio": ratio, **{f"tps_{n}": v for n, v in tps.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experts", type=int, default=16, help="routed experts (default 16)")
    ap.add_argument("--top-k", type=int, default=1, help="experts per token (default 1)")
    ap.add_argument("--dim", type=int, default=512, help="layer: model dim (default 512)")
    ap.add_argument("--ffn", type=int, default=1024, help="layer: expert FFN width (default 1024)")
    ap.add_argument("--tokens", type=int, default=4096, help="layer: tokens per step")
    ap.add_argument("--reps", type=int, default=10, help="layer: timed steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    ap.add_argument("--skip-model", action="store_true", help="time the layer only")
    ap.add_argument("--model-dim", type=int, default=256)
    ap.add_argument("--model-ffn", type=int, default=512, help="model: expert FFN width")
    ap.add_argument("--model-layers", type=int, default=4)
    ap.add_argument("--model-vocab", type=int, default=8192)
    ap.add_argument("--model-batch", type=int, default=4)
    ap.add_argument("--model-seq", type=int, default=256)
    ap.add_argument("--model-reps", type=int, default=6, help="model: timed steps per side")
    ap.add_argument("--matmul-size", type=int, default=2048, help="n for the n x n peak matmul")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all, the default)")
    args = ap.parse_args()
    if args.dim % 64 or args.model_dim % 128:
        ap.error("--dim must be a multiple of 64 and --model-dim of 128 (64-wide heads)")
    if not 1 <= args.top_k <= args.experts:
        ap.error("--top-k must be between 1 and --experts")

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    peak = measure_matmul_flops(args.matmul_size, 3)
    print(
        f"float32 on cpu ({cpu_name()}, {torch.get_num_threads()} threads), torch "
        f"{torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"fp32 matmul peak before timing: {peak / 1e9:.1f} GFLOP/s "
        f"(measure_matmul_flops, {args.matmul_size}^2); shares below use it"
    )
    bench_layer(args, peak)
    if not args.skip_model:
        bench_model(args, peak)
    after = measure_matmul_flops(args.matmul_size, 3)
    print(f"fp32 matmul peak after timing: {after / 1e9:.1f} GFLOP/s (a check on machine load)")


if __name__ == "__main__":
    main()
