"""Direct scheduler throughput (no HTTP): ``--clients`` greedy requests of ``--prompt-tokens``
random ids submitted at once to a ``Scheduler`` with that many rows, ``--new-tokens`` each;
aggregate tokens/s (prefill included) and time to each request's first token (p50/max).
A prefix-cache check: a ``--shared-tokens`` prompt cold, then again with a different last
token (warm), TTFT of each. ``--invariant`` also runs every load with
``batch_invariant=True`` and prints what that mode costs. Randomly initialised ``--preset``,
eager, CPU threads as set.

    python benchmarks/scheduler.py --clients 1 8 32 --new-tokens 64
    python benchmarks/scheduler.py --invariant --clients 1 8 16 --prompt-tokens 32 --new-tokens 32
"""

from __future__ import annotations

import argparse
import time

import torch

import camelid
from camelid.infer.scheduler import Scheduler
from camelid.tokenizer import train_tokenizer


def run(engine, prompts, new, **kw):
    sched = Scheduler(engine, max_batch=len(prompts), prefix_cache_bytes=0, **kw)
    params = camelid.SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    ids = [sched.submit(p, params) for p in prompts]
    first: dict[str, int] = {}
    tokens = 0
    while sched.has_work():
        for e in sched.step():
            tokens += len(e.token_ids)
            if e.token_ids and e.request_id not in first:
                first[e.request_id] = time.perf_counter() - start
    secs = time.perf_counter() - start
    assert tokens == new * len(prompts)
    ttft = sorted(first[i] for i in ids)
    return tokens / secs, ttft[len(ttft) // 2] * 1e3, ttft[-1] * 1e3, sched.stats.steps


def prefix(engine, shared, **kw):
    sched = Scheduler(engine, max_batch=2, **kw)
    params = camelid.SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    out = []
    for last in (1, 2):
        sched.submit([*shared, last], params)
        t = time.perf_counter()
        while sched.has_work():
            sched.step()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-125m")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=15)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--shared-tokens", type=int, default=1000)
    ap.add_argument("--invariant", action="store_true", help="also time batch_invariant=True")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = camelid.ModelConfig.from_preset(args.preset)
    model = camelid.Transformer(config)
    tok = train_tokenizer(["a tokenizer for random weights"] * 10, 600, num_special=16)
    engine = camelid.Engine(model, tok)
    g = torch.Generator().manual_seed(1)
    print(f"{args.preset}, {torch.get_num_threads()} threads, fp32, eager")
    extra = f" {'invariant':>10} {'cost':>6}" if args.invariant else ""
    print(f"{'clients':>8} {'tok/s':>8} {'TTFT ms p50':>12} {'max':>7} {'steps':>6}{extra}")
    run(engine, [[1, 2, 3]] * 2, 16)  # warm-up
    for n in args.clients:
        prompts = torch.randint(0, tok.vocab_size, (n, args.prompt_tokens), generator=g).tolist()
        tps, p50, mx, steps = run(engine, prompts, args.new_tokens)
        line = f"{n:>8} {tps:>8.1f} {p50:>12.0f} {mx:>7.0f} {steps:>6}"
        if args.invariant:
            inv = run(engine, prompts, args.new_tokens, batch_invariant=True)[0]
            line += f" {inv:>10.1f} {tps / inv:>5.2f}x"
        print(line)
    if args.shared_tokens:
        shared = torch.randint(0, tok.vocab_size, (args.shared_tokens,), generator=g).tolist()
        cold, warm = prefix(engine, shared)
        print(
            f"prefix cache, {args.shared_tokens}-token shared prompt: "
            f"cold {cold * 1e3:.0f} ms, warm {warm * 1e3:.0f} ms: {cold / warm:.1f}x"
        )


if __name__ == "__main__":
    main()
