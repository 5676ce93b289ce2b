"""Fine-tuning steps: camelid vs transformers + peft, LoRA SFT and full SFT, CPU fp32.

The same model on both sides: a transformers ``LlamaForCausalLM`` built from a camelid preset
(default ``llama-125m``: dim 768, 12 layers, 12 heads / 4 kv heads, vocab 32000, 125M
parameters; the smallest preset of the size people fine-tune on a CPU, and one step of it at
the default 4 x 256 tokens takes seconds on 2 cores), saved by transformers and read by
``camelid.load``. The same data: chat conversations (a system turn, then user/assistant
turns) rendered with the Llama 3 chat template of a small tokenizer trained here, via
``camelid.data.sft.tokenize_chat``; targets outside assistant content and its ``<|eot_id|>``
are ``IGNORE_INDEX`` (the masked share is printed). Each row is one conversation cut to
``seq_len + 1`` tokens, so no row is padded and both sides run plain causal attention.
Before anything is timed, the two models' losses on the batch must agree within 1e-4 (for
Part 1 with the adapters applied on both sides: a fresh adapter has B = 0).

Part 1, LoRA SFT step (r 16, alpha 32, dropout 0, targets q, k, v, o, gate, up, down; AdamW
on the adapters only). camelid: ``apply_lora`` + ``forward_backward`` (what ``camelid train``
runs per step: fused head and masked loss) + AdamW step + zero_grad. transformers:
``peft.get_peft_model`` + ``forward(labels=..., shift_labels=...)`` (its own masked loss, as
its Trainer and trl compute it) + backward + AdamW step + zero_grad.

Part 2, full SFT step: the same without adapters, AdamW on every parameter.

Both sides use the same optimizer (``camelid.train.step.build_optimizer``: fused AdamW with
weight-decay groups). Each side runs in its own fresh subprocess (same model files, same
batch): it loads the model, runs ``--warmup`` untimed and ``--steps`` timed steps, and reports
its step times and its peak memory: the peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` once the model is loaded) over the resident set right after loading
(``VmRSS``), i.e. what the training steps add: gradients, optimizer state, activations.
The subprocesses alternate (camelid, transformers, then transformers, camelid, ...) for
``--rounds`` rounds; tokens/s is the median over every timed step of a side, the memory the
median over its rounds. The fp32 matmul peak is measured before and after
(``camelid.train.metrics.measure_matmul_flops``) and each side's FLOP/s shown as its share.

    python benchmarks/finetune.py                          # llama-125m, batch 4 x 256
    python benchmarks/finetune.py --quick                  # tiny shapes, a smoke test
    python benchmarks/finetune.py --skip-full --rounds 3   # Part 1 only
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 deprecations

SIDES = ("camelid", "transformers")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SYLLABLES = ("ka ri to mo sa ne lu fi da po ve shi an el or um ix ba te go").split()


# ------------------------------------------------------------------------------ the data
def _words(rng: random.Random, n: int) -> str:
    vocab = [a + b + c for a in SYLLABLES[:8] for b in SYLLABLES[8:14] for c in ("", "n", "s")]
    common = "the a of to and is in it that for what how why you can".split()
    return " ".join(rng.choice(common if rng.random() < 0.35 else vocab) for _ in range(n))


def make_batch(batch: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-shaped (inputs, targets) of shape (batch, seq_len): each row one multi-turn
    conversation tokenized with the Llama 3 chat template, targets ``IGNORE_INDEX`` off the
    assistant turns (their content and end-of-turn token are learned)."""
    from camelid.data.sft import tokenize_chat
    from camelid.loss import IGNORE_INDEX
    from camelid.tokenizer import train_tokenizer

    rng = random.Random(seed)
    tok = train_tokenizer([_words(rng, 300) for _ in range(40)], 1024, num_special=256)
    xs, ys = [], []
    for _ in range(batch):
        messages = [{"role": "system", "content": _words(rng, rng.randint(5, 12))}]
        while True:
            messages.append({"role": "user", "content": _words(rng, rng.randint(8, 25)) + "?"})
            messages.append({"role": "assistant", "content": _words(rng, rng.randint(40, 110))})
            ids, mask = tokenize_chat(tok, messages)
            if len(ids) > seq_len:
                break
        ids_t = torch.tensor(ids[: seq_len + 1])
        mask_t = torch.tensor(mask[: seq_len + 1], dtype=torch.bool)
        xs.append(ids_t[:-1])
        ys.append(ids_t[1:].masked_fill(~mask_t[1:], IGNORE_INDEX))
    return torch.stack(xs), torch.stack(ys)


def make_model(preset: str, root: Path, **overrides: Any) -> Any:
    """transformers' Llama from the preset (random init, seed 0), saved under ``root``."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from camelid.config import ModelConfig

    config = ModelConfig.from_preset(preset, **overrides)
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    hf = LlamaForCausalLM._from_config(
        LlamaConfig(**config.to_hf()), attn_implementation="sdpa", dtype=torch.float32
    )
    hf.save_pretrained(root)
    return config


# ------------------------------------------------------------------------- both sides
def build(side: str, mode: str, model_dir: Path, lora: dict[str, Any]) -> tuple[Any, Any]:
    """One side's model (train mode) and its step function ``step(x, y) -> loss``."""
    from camelid.train.step import build_optimizer

    lr, wd = (2e-4, 0.0) if mode == "lora" else (1e-5, 0.1)
    if side == "camelid":
        import camelid
        from camelid.model.lora import LoraConfig, apply_lora
        from camelid.train.step import forward_backward

        model = camelid.load(model_dir, dtype=torch.float32, progress=False)
        if mode == "lora":
            model = apply_lora(model, LoraConfig(**lora, target_modules=TARGETS))
        model.train()
        opt = build_optimizer(model, lr=lr, weight_decay=wd)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            loss = forward_backward(model, [(x, y)])
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

    else:
        import transformers
        from transformers import LlamaForCausalLM

        transformers.utils.logging.disable_progress_bar()
        model = LlamaForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        )
        if mode == "lora":
            import peft

            cfg = peft.LoraConfig(
                r=lora["r"],
                lora_alpha=lora["alpha"],
                lora_dropout=lora["dropout"],
                target_modules=list(TARGETS),
                task_type="CAUSAL_LM",
            )
            model = peft.get_peft_model(model, cfg)
        model.train()
        opt = build_optimizer(model, lr=lr, weight_decay=wd)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            # transformers' own masked loss; shift_labels: the targets are shifted already.
            loss = model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

    return model, step


def initial_loss(side: str, model: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """The loss on the batch before any update, without gradients."""
    from camelid.loss import next_token_loss

    with torch.no_grad():
        if side == "camelid":
            return float(next_token_loss(model, x, y))
        return float(model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss)


def trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_losses(
    args: argparse.Namespace, model_dir: Path, data: Path, mode: str
) -> tuple[float, int]:
    """Both sides' losses on the batch, in this process; stop unless within 1e-4."""
    x, y = torch.load(data)
    losses, counts = {}, {}
    for side in SIDES:
        model, _ = build(side, mode, model_dir, _lora(args))
        losses[side] = initial_loss(side, model, x, y)
        counts[side] = trainable(model)
        del model
        gc.collect()
    diff = abs(losses["camelid"] - losses["transformers"])
    print(
        f"  loss on the batch before training: camelid {losses['camelid']:.6f}, transformers "
        f"{losses['transformers']:.6f}, |diff| {diff:.2e}; trainable parameters: camelid "
        f"{counts['camelid']:,}, transformers {counts['transformers']:,}"
    )
    if not diff <= 1e-4:
        raise SystemExit(f"the two sides' losses differ by {diff:.2e} (> 1e-4): not timing")
    if counts["camelid"] != counts["transformers"]:
        raise SystemExit("the two sides train different numbers of parameters: not timing")
    return diff, counts["camelid"]


def _lora(args: argparse.Namespace) -> dict[str, Any]:
    return {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0}


# -------------------------------------------------------------------- the worker process
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(side: str, mode: str, model_dir: Path, data: Path, spec: dict[str, Any]) -> dict:
    """One side's steps in this (fresh) process: step times and the peak RSS increase."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    x, y = torch.load(data)
    model, step = build(side, mode, model_dir, spec["lora"])
    # Read every weight once: transformers may leave them in the safetensors file's mapping,
    # whose pages count in the RSS only once touched (by the first forward). Resident now,
    # they are part of the baseline on both sides, not of the steps' increase.
    with torch.no_grad():
        touched = sum(float(p.sum()) for p in model.parameters())
    gc.collect()
    baseline = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: loading's peak forgotten
    losses, times = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        losses.append(step(x, y))
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    peak = _status_kb("VmHWM")
    return {
        "times": times,
        "losses": losses,
        "baseline_kb": baseline,
        "peak_kb": peak,
        "threads": torch.get_num_threads(),
        "weights_sum": touched,
    }


def run_worker(side: str, mode: str, model_dir: Path, data: Path, spec: dict[str, Any]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", side, mode, str(model_dir), str(data),
         json.dumps(spec)],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{side} {mode} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ a part
def bench_part(
    args: argparse.Namespace, config: Any, model_dir: Path, data: Path, mode: str, peak: float
) -> dict[str, Any]:
    """Time one part (``mode`` "lora" or "full") side by side; print and return the figures."""
    title = {"lora": "Part 1, LoRA SFT step", "full": "Part 2, full SFT step"}[mode]
    print(f"\n{title}")
    if mode == "lora":
        print(
            f"  LoRA r {args.lora_r}, alpha {args.lora_alpha}, dropout 0, targets "
            f"{', '.join(TARGETS)}; AdamW (fused, lr 2e-4, no weight decay) on the adapters only"
        )
        print(
            "  camelid: apply_lora + forward_backward (fused head + masked loss) + AdamW + "
            "zero_grad"
        )
        print(
            "  transformers: get_peft_model + forward(labels=...) (its masked loss) + backward "
            "+ AdamW + zero_grad"
        )
    else:
        print("  every parameter trained; AdamW (fused, lr 1e-5, weight decay 0.1)")
        print("  camelid: forward_backward (fused head + masked loss) + AdamW + zero_grad")
        print(
            "  transformers: forward(labels=...) (its masked loss) + backward + AdamW + zero_grad"
        )
    loss_diff, n_trained = check_losses(args, model_dir, data, mode)
    spec = {"warmup": args.warmup, "steps": args.steps, "threads": args.threads,
            "lora": _lora(args)}  # fmt: skip
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side in SIDES if r % 2 == 0 else tuple(reversed(SIDES)):
            results[side].append(run_worker(side, mode, model_dir, data, spec))
    n_tokens = args.batch * args.seq_len
    attn = 12 * config.n_layers * config.n_heads * config.head_dim * args.seq_len
    n = (config.flops_per_token(args.seq_len) - attn) // 6  # the matmul parameters
    if mode == "lora":
        n_adapter = n_trained
        # forward 2N, backward through the frozen weights 2N (no weight gradients), the
        # attention products, and the adapters' own 6 per parameter.
        fpt = 4 * n + attn + 6 * n_adapter
        how = "4N (forward + input gradients; frozen weights) + attention + 6 x adapters"
    else:
        fpt = config.flops_per_token(args.seq_len)
        how = "6N + attention, ModelConfig.flops_per_token"
    print(f"  training FLOPs/token counted: {fpt / 1e6:.1f} M ({how})")
    out: dict[str, Any] = {"loss_diff": loss_diff}
    for side in SIDES:
        times = [t for res in results[side] for t in res["times"]]
        tps = n_tokens / statistics.median(times)
        extra = [(res["peak_kb"] - res["baseline_kb"]) / 1024 for res in results[side]]
        base = [res["baseline_kb"] / 1024 for res in results[side]]
        top = [res["peak_kb"] / 1024 for res in results[side]]
        out[side] = {"tps": tps, "peak_mib": statistics.median(extra), "rounds": extra}
        rate = tps * fpt
        print(
            f"  {side:<13} {tps:8,.0f} tokens/s  {rate / 1e9:6.1f} GFLOP/s = {rate / peak:5.1%} "
            f"of peak (median of {len(times)} steps in {len(results[side])} processes); "
            f"peak RSS +{out[side]['peak_mib']:,.0f} MiB over the loaded model "
            f"({statistics.median(base):,.0f} MiB resident after loading, peak "
            f"{statistics.median(top):,.0f} MiB; rounds: "
            f"{', '.join(f'{e:,.0f}' for e in extra)})"
        )
        first = results[side][0]["losses"]
        print(f"    {side} losses, first process: {', '.join(f'{v:.4f}' for v in first)}")
    speed = out["camelid"]["tps"] / out["transformers"]["tps"]
    memory = out["camelid"]["peak_mib"] / out["transformers"]["peak_mib"]
    out.update(speed=speed, memory=memory)
    print(f"  tokens/s ratio camelid / transformers: {speed:.2f}x (target >= 1.3x)")
    print(f"  peak memory ratio camelid / transformers: {memory:.2f}x (target <= 0.8x)")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="llama-125m", help="camelid preset (default llama-125m)")
    ap.add_argument("--batch", type=int, default=4, help="rows per step (default 4)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per process first")
    ap.add_argument("--rounds", type=int, default=2, help="processes per side, alternating")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--skip-lora", action="store_true", help="Part 2 only")
    ap.add_argument("--skip-full", action="store_true", help="Part 1 only")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test (seconds)")
    ap.add_argument("--matmul-size", type=int, default=2048, help="n for the n x n peak matmul")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # progress shows as it goes, even into a file
        sys.stdout.reconfigure(line_buffering=True)
    overrides: dict[str, Any] = {}
    if args.quick:
        args.preset, args.batch, args.seq_len = "tiny", 2, 128
        args.steps, args.warmup, args.rounds, args.matmul_size = 1, 1, 1, 256
        args.lora_r = 4
        overrides = {"vocab_size": 1536}  # the tokenizer's ids (1024 + specials) must fit

    import peft
    import transformers

    from camelid.loss import IGNORE_INDEX
    from camelid.system import cpu_name
    from camelid.train.metrics import measure_matmul_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    peak = measure_matmul_flops(args.matmul_size, 3)
    print(
        f"float32 on cpu ({cpu_name()}, {torch.get_num_threads()} threads), torch "
        f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    )
    print(
        f"fp32 matmul peak before timing: {peak / 1e9:.1f} GFLOP/s "
        f"(measure_matmul_flops, {args.matmul_size}^2); shares below use it"
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = make_model(args.preset, root / "model", **overrides)
        x, y = make_batch(args.batch, args.seq_len)
        if int(x.max()) >= config.vocab_size:
            raise SystemExit(f"the data's ids exceed the vocabulary of {config.vocab_size}")
        torch.save((x, y), root / "batch.pt")
        masked = float((y == IGNORE_INDEX).float().mean())
        print(
            f"model: preset {args.preset}, {config.num_params() / 1e6:.1f}M parameters (dim "
            f"{config.dim}, {config.n_layers} layers, {config.n_heads} heads / "
            f"{config.n_kv_heads} kv, vocab {config.vocab_size}), saved by transformers and "
            "read by camelid.load: the same weights"
        )
        print(
            f"data: batch {args.batch} x {args.seq_len}, one multi-turn chat per row (Llama 3 "
            f"template); {masked:.1%} of the targets masked (IGNORE_INDEX: system, user, "
            "headers)"
        )
        print(
            f"each side in its own subprocess: {args.warmup} untimed + {args.steps} timed "
            f"steps, {args.rounds} process(es) per side, alternating"
        )
        results["masked_share"] = masked
        for mode, skip in (("lora", args.skip_lora), ("full", args.skip_full)):
            if not skip:
                results[mode] = bench_part(args, config, root / "model", root / "batch.pt",
                                           mode, peak)  # fmt: skip
    after = measure_matmul_flops(args.matmul_size, 3)
    print(f"\nfp32 matmul peak after timing: {after / 1e9:.1f} GFLOP/s (a check on machine load)")
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        side, mode, model_dir, data, spec = sys.argv[2:7]
        print(json.dumps(worker(side, mode, Path(model_dir), Path(data), json.loads(spec))))
    else:
        main()
