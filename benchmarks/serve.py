"""Serving throughput and latency: ``camelid serve`` under 1, 8 and 32 concurrent streaming
clients, against this machine's own limits measured in the same run, and against
``transformers serve`` on the same weights where it runs.

Every client streams one completion of ``--new-tokens`` tokens (``ignore_eos``, greedy) from a
distinct short prompt; aggregate tokens/s = all generated tokens ÷ the wall time from the first
request to the last token. Time to first token (TTFT) and inter-token latency (ITL) are taken
per client from the stream's chunk arrival times; p50/p99 over all clients. The limits:

- memory bandwidth (a streaming read, GB/s, as benchmarks/decode.py measures it): a decode step
  reads every weight once, so one stream cannot beat bandwidth ÷ weight bytes tokens/s;
- the fp32 matmul peak (the best of timed 4096² matmuls, MKL's and oneDNN's): many streams
  cannot beat the peak ÷ 2·N FLOPs per token (N parameters).

A prefix run sends a prompt of ``--prefix-tokens`` shared tokens twice more with different
endings: the first request is cold (the whole prompt is prefilled), the next ones warm (the
shared blocks come from the prefix cache). The batch-invariant mode is run with the same load.

    python benchmarks/serve.py                    # llama-125m, CPU fp32, eager
    python benchmarks/serve.py --compile          # compiled decode step
    python benchmarks/serve.py --clients 1 8 --no-peer

The model has random weights (no hub here); ``ignore_eos`` makes every request the same
length, so only speed is measured. The peer needs ``pip install accelerate`` besides
transformers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import camelid
from camelid.io import format_count
from camelid.tokenizer import train_tokenizer
from camelid.train.metrics import measure_matmul_flops

WORDS = "the of and to in is that for it as with was on be by this are from at or an".split()


def measure_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s of a plain streaming read (the best of ``reps`` sums over ``nbytes`` of fp32,
    far more than the caches hold), as benchmarks/decode.py measures it."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def measure_matmul(n: int = 4096, reps: int = 6) -> float:
    """The best of ``reps`` timed n × n fp32 matmuls, alternating MKL (``torch.mm``) and
    oneDNN: the machine's peak, whichever library reaches it (the server itself uses oneDNN)."""
    return measure_matmul_flops(n, reps)


def make_model(preset: str, root: Path) -> Path:
    """A random-weight model directory with a small trained tokenizer."""
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(200)) for i in range(50)]
    tok = train_tokenizer(texts, 2048, num_special=256)
    config = camelid.ModelConfig.from_preset(preset)
    if config.vocab_size < tok.vocab_size:  # rows past the tokenizer's ids are padding
        config = dataclasses.replace(config, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = camelid.Transformer(config)
    out = root / preset
    from camelid.infer.export import save_pretrained

    save_pretrained(model, tok, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], port: int, timeout: float = 600):
    """A server process; yields its base URL once ``/health`` answers (both servers have it;
    transformers serve's ``/v1/models`` fails without a hub cache)."""
    import httpx

    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(
                    f"{cmd[0]} exited: {log.read().decode(errors='replace')[-2000:]}"
                )
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start within {timeout:.0f}s")
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


async def one_stream(client, base: str, body: dict) -> tuple[float, list[float], int]:
    """(seconds to the first token, gaps between later tokens, tokens) of one streamed request."""
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                times.append(time.perf_counter())
    ttft = times[0] - t0 if times else float("nan")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return ttft, gaps, tokens or len(times)


async def load(base: str, model: str, prompts: list[str], new: int, extra: dict) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        bodies = [
            {
                "model": model,
                "prompt": p,
                "max_tokens": new,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                **extra,
            }
            for p in prompts
        ]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, base, b) for b in bodies))
        wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    gaps = sorted(g for r in results for g in r[1])
    tokens = sum(r[2] for r in results)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": pct(ttfts, 0.99),
        "itl_p50": pct(gaps, 0.5),
        "itl_p99": pct(gaps, 0.99),
    }


def prompts_for(n: int, salt: int = 0) -> list[str]:
    return [" ".join(WORDS[(i * 5 + j + salt) % len(WORDS)] for j in range(12)) for i in range(n)]


def run_load(base: str, model: str, clients: list[int], new: int, extra: dict) -> dict[int, dict]:
    asyncio.run(load(base, model, prompts_for(1, 99), 8, extra))  # warm-up
    return {n: asyncio.run(load(base, model, prompts_for(n), new, extra)) for n in clients}


def prefix_ttft(base: str, model: str, prefix_tokens: int) -> tuple[float, float]:
    """TTFT of a cold request with a long prompt, then the median of warm ones sharing all but
    its last few tokens."""
    words = [WORDS[(j * 3) % len(WORDS)] for j in range(prefix_tokens)]
    shared = " ".join(words)

    async def ttft(ending: str) -> float:
        import httpx

        async with httpx.AsyncClient(timeout=600) as client:
            body = {"model": model, "prompt": shared + ending, "max_tokens": 1,
                    "temperature": 0, "stream": True}  # fmt: skip
            return (await one_stream(client, base, body))[0]

    cold = asyncio.run(ttft(" and so it ends"))
    warm = statistics.median(asyncio.run(ttft(f" ending {i}")) for i in range(3))
    return cold, warm


def table(name: str, results: dict[int, dict], bound: float, peer: dict[int, dict] | None) -> None:
    print(f"\n{name}")
    head = (
        f"{'clients':>8} {'tok/s':>8} {'of bound':>9} {'TTFT p50':>9} {'p99':>7} "
        f"{'ITL p50':>8} {'p99':>7}"
    )
    print(head + ("  vs peer" if peer else ""))
    for n, r in results.items():
        line = (f"{n:>8} {r['tokens_per_s']:>8.1f} {100 * r['tokens_per_s'] / bound:>8.1f}% "
                f"{1e3 * r['ttft_p50']:>7.0f}ms {1e3 * r['ttft_p99']:>5.0f}ms "
                f"{1e3 * r['itl_p50']:>6.1f}ms {1e3 * r['itl_p99']:>5.1f}ms")  # fmt: skip
        if peer and n in peer:
            line += f"  {r['tokens_per_s'] / peer[n]['tokens_per_s']:>6.2f}×"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-125m")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    ap.add_argument("--compile", action="store_true", help="camelid serve --compile")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    ap.add_argument("--no-invariant", action="store_true", help="skip the batch-invariant run")
    ap.add_argument(
        "--invariant-clients",
        type=int,
        nargs="+",
        default=[1, 8],
        help="client counts for the batch-invariant run (default: 1 8)",
    )
    args = ap.parse_args()

    bandwidth, peak = measure_bandwidth(), measure_matmul()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(args.preset, Path(tmp))
        config = camelid.load(model_dir).config
        n_params = config.num_params()
        # A decode step reads every weight once but the embedding table (one row of it), unless
        # the head is tied to it; fp32.
        read = n_params - (0 if config.tie_embeddings else config.vocab_size * config.dim)
        bw_bound = bandwidth / (4 * read)
        compute_bound = peak / (2 * n_params)
        print(
            f"{args.preset}: {format_count(n_params)} parameters, fp32, CPU "
            f"({torch.get_num_threads()} threads){', compiled' if args.compile else ', eager'}"
        )
        print(
            f"machine: {bandwidth / 1e9:.1f} GB/s read bandwidth -> one stream <= "
            f"{bw_bound:.0f} tokens/s; {peak / 1e9:.0f} GFLOP/s fp32 matmul -> <= "
            f"{compute_bound:.0f} tokens/s at any batch (2N FLOPs per token)"
        )
        max_batch = max(args.clients)
        base_cmd = [sys.executable, "-m", "camelid", "serve", str(model_dir), "-q",
                    "--served-model-name", "m", "--max-batch", str(max_batch),
                    "--device", "cpu", "--dtype", "float32"]  # fmt: skip
        if args.compile:
            base_cmd.append("--compile")
        extra = {"ignore_eos": True}
        port = free_port()
        with server([*base_cmd, "--port", str(port)], port) as base:
            ours = run_load(base, "m", args.clients, args.new_tokens, extra)
            cold, warm = prefix_ttft(base, "m", args.prefix_tokens)
        invariant = None
        if not args.no_invariant:
            port = free_port()
            with server([*base_cmd, "--batch-invariant", "--port", str(port)], port) as base:
                invariant = run_load(base, "m", args.invariant_clients, args.new_tokens, extra)
        peer, why = None, ""
        if not args.no_peer:
            try:
                port = free_port()
                cli = str(Path(sys.executable).parent / "transformers")
                cmd = [cli, "serve", str(model_dir), "--host", "127.0.0.1", "--port",
                       str(port), "--continuous-batching", "--device", "cpu",
                       "--dtype", "float32"]  # fmt: skip
                with server(cmd, port, timeout=300) as base:
                    peer = run_load(base, str(model_dir), args.clients, args.new_tokens, {})
            except Exception as e:  # the peer may not run here: say why
                lines = str(e).strip().splitlines() or [""]
                why = f"{type(e).__name__}: {lines[-1][:300]}"

    table("camelid serve (default)", ours, compute_bound, peer)
    print(
        f"  bound = the compute bound ({compute_bound:.0f} tokens/s); one stream's bandwidth "
        f"bound is {bw_bound:.0f} tokens/s: 1 client at "
        f"{100 * ours[args.clients[0]]['tokens_per_s'] / bw_bound:.0f}% of it"
    )
    print(
        f"\nprefix cache, {args.prefix_tokens}-token shared prompt: cold TTFT {1e3 * cold:.0f} ms, "
        f"warm {1e3 * warm:.0f} ms: {cold / warm:.1f}× faster"
    )
    if invariant is not None:
        table("camelid serve --batch-invariant", invariant, compute_bound, None)
        for n in (n for n in args.invariant_clients if n in ours):
            print(
                f"  {n} clients: batch-invariant costs "
                f"{ours[n]['tokens_per_s'] / invariant[n]['tokens_per_s']:.2f}×"
            )
    if peer is not None:
        table("transformers serve --continuous-batching (peer)", peer, compute_bound, None)
    elif not args.no_peer:
        print(f"\ntransformers serve did not run here: {why}")


if __name__ == "__main__":
    main()
