"""``camelid inspect``: describe a preset or checkpoint without loading its weights."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from camelid.config import PRESETS, ModelConfig
from camelid.errors import CamelidError
from camelid.infer.load import (
    ModelSource,
    inspect_model,
    load_model,
    resolve_device,
    resolve_model,
)
from camelid.io import format_bytes, format_count
from camelid.model import Transformer
from camelid.system import available_memory
from camelid.weights import hf


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="describe a preset or checkpoint: architecture, parameters, FLOPs, memory",
        description="Describe a model preset, a Hugging Face Llama directory, a training run or "
        "one of its checkpoints without loading its weights: architecture, parameter counts, "
        "training FLOPs per token and memory needs. Presets: " + ", ".join(PRESETS) + ".",
    )
    p.add_argument(
        "model",
        metavar="PRESET_OR_PATH",
        help="a preset name, a Hugging Face directory, a training run or a checkpoint dir",
    )
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
    p.set_defaults(func=run)


def _resolve(model: str) -> tuple[ModelConfig, ModelSource | None, hf.CheckpointInfo | None]:
    """A preset name or a path → (config, the resolved source and its info, or None)."""
    if model in PRESETS:
        return ModelConfig.from_preset(model), None, None
    looks_like_path = "/" in model or model.startswith(".") or Path(model).exists()
    if not looks_like_path:
        raise CamelidError(
            f"{model!r} is neither a known preset nor an existing path; "
            f"known presets: {', '.join(PRESETS)}"
        )
    source = resolve_model(model, need_tokenizer=False)
    if source.note is not None:
        print(source.note, file=sys.stderr, flush=True)
    info = inspect_model(source)
    return info.config, source, info


def run(args: argparse.Namespace) -> int:
    config, source, info = _resolve(args.model)
    seq_len = args.seq_len or min(config.max_seq_len, 8192)
    if seq_len <= 0:
        raise CamelidError(f"--seq-len must be positive, got {seq_len}")
    figures = config.describe(seq_len)
    if info is not None:
        figures["checkpoint"] = {
            "files": [str(f) for f in info.files],
            "dtype": info.stored or str(info.dtype).removeprefix("torch."),
            "bytes": info.nbytes,
        }
    if args.forward:
        figures["forward"] = _forward(config, args, source)
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
    if c.is_moe:
        n_moe = c.n_moe_layers
        layers = f"{c.n_layers} x [RMSNorm > attention > RMSNorm > SwiGLU or MoE] ({n_moe} MoE)"
    else:
        layers = f"{c.n_layers} x [RMSNorm > attention > RMSNorm > SwiGLU]"
    rows = [
        ("model", name),
        ("layers", layers),
        ("dim", f"{c.dim}"),
        ("attention", f"{c.n_heads} heads, {c.n_kv_heads} kv heads ({gqa}), head_dim {c.head_dim}"),
        ("ffn hidden", f"{c.ffn_hidden_dim}" + (" (dense layers)" if c.is_moe else "")),
    ]
    if c.is_moe:
        rows.append(
            (
                "experts",
                f"{c.n_experts} x SwiGLU {c.moe_ffn_dim}, top-{c.n_experts_per_tok} "
                f"{c.router_scoring}, {c.n_shared_experts} shared, every "
                f"{c.moe_interleave_step} layer(s)",
            )
        )
    attn = []
    if c.nope_layer_interval:
        attn.append(f"NoPE every {c.nope_layer_interval} layers")
    if c.attention_chunk_size:
        attn.append(f"chunked {c.attention_chunk_size} on RoPE layers")
    if c.attn_temperature_tuning:
        attn.append(f"temperature tuning (scale {c.attn_scale:g}, floor {c.floor_scale})")
    if c.use_qk_norm:
        attn.append("QK-norm")
    if attn:
        rows.append(("attn extras", ", ".join(attn)))
    rows += [
        ("vocab", f"{c.vocab_size} ({'tied' if c.tie_embeddings else 'untied'} output head)"),
        ("rope", rope),
        ("context", f"{c.max_seq_len}"),
        ("norm eps", f"{c.norm_eps:g}"),
        ("biases", ", ".join(bias) or "none"),
    ]
    print("\n".join(f"{k:<12} {v}" for k, v in rows))
    print(f"\nparameters   {format_count(p['total'])} ({p['total']:,})")
    if "active" in p:
        print(f"  active     {format_count(p['active']):>8}  per token ({p['active']:,})")
    for key in ("embedding", "attention", "mlp", "norm", "output"):
        share = 100 * p[key] / p["total"]
        note = " (tied: shares the embedding)" if key == "output" and c.tie_embeddings else ""
        print(f"  {key:<10} {format_count(p[key]):>8}  {share:5.1f}%{note}")
    f = figures["flops_per_token"]
    print(f"\nFLOPs/token  at context {seq_len}")
    print(
        f"  training   {f['training']:.3e}  (6N + 12·L·H·hd·T"
        + (", N active)" if c.is_moe else ")")
    )
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


def _forward(
    config: ModelConfig, args: argparse.Namespace, source: ModelSource | None
) -> dict[str, Any]:
    """Run one forward pass: a smoke test that the model runs on this machine."""
    device = resolve_device(args.device)
    need = config.weight_bytes(4)
    avail = available_memory(device)
    if avail is not None and need > 0.8 * avail:
        raise CamelidError(
            f"--forward needs about {format_bytes(need)} for fp32 weights but {device} has "
            f"{format_bytes(avail)} available; try a smaller preset such as 'tiny'"
        )
    if args.batch <= 0:
        raise CamelidError(f"--batch must be positive, got {args.batch}")
    torch.manual_seed(0)
    if source is not None:
        model = load_model(source, device=device)
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
