"""What the scheduler's batch-invariant mode costs: the same load through
``Scheduler(batch_invariant=False)`` and ``Scheduler(batch_invariant=True)``.

``--clients`` greedy requests (different random prompts of ``--prompt-tokens`` ids) are
submitted at once to a scheduler with that many rows, each generating exactly ``--new-tokens``
tokens; the run is timed whole (prefill included), on a randomly initialised model of
``--preset`` (eager, no compile). Aggregate tokens/s is generated tokens / seconds, the best of
``--repeats`` runs per mode after an untimed warm-up. A small check, not the serving benchmark
(``benchmarks/serve.py``).

    python benchmarks/batch_invariant.py                      # llama-125m, CPU fp32
    python benchmarks/batch_invariant.py --clients 1 8 --new-tokens 32
"""

from __future__ import annotations

import argparse
import time

import torch

import camelid
from camelid.infer.scheduler import Scheduler
from camelid.tokenizer import train_tokenizer


def run(engine: camelid.Engine, prompts: list[list[int]], new: int, invariant: bool) -> float:
    sched = Scheduler(
        engine, max_batch=len(prompts), batch_invariant=invariant, prefix_cache_bytes=0
    )
    params = camelid.SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for p in prompts:
        sched.submit(p, params)
    tokens = 0
    while sched.has_work():
        tokens += sum(len(e.token_ids) for e in sched.step())
    assert tokens == new * len(prompts)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-125m")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = camelid.ModelConfig.from_preset(args.preset)
    model = camelid.Transformer(config)
    tok = train_tokenizer(["a tokenizer for random weights"] * 10, 600, num_special=16)
    engine = camelid.Engine(model, tok)
    g = torch.Generator().manual_seed(1)
    print(f"{args.preset}, {torch.get_num_threads()} threads, fp32, eager; tokens/s aggregate")
    print(f"{'clients':>8} {'default':>9} {'invariant':>10} {'cost':>6}")
    for n in args.clients:
        prompts = torch.randint(0, tok.vocab_size, (n, args.prompt_tokens), generator=g).tolist()
        run(engine, prompts[:1], 2, False)  # warm-up
        best = {
            inv: max(run(engine, prompts, args.new_tokens, inv) for _ in range(args.repeats))
            for inv in (False, True)
        }
        print(f"{n:>8} {best[False]:>9.1f} {best[True]:>10.1f} {best[False] / best[True]:>5.2f}×")


if __name__ == "__main__":
    main()
