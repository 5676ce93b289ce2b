"""CPU decoding and prompt processing: camelid's Engine vs llama.cpp, the same GGUF bytes.

A Llama of the preset's shape (random init, seeded) and a byte-level BPE tokenizer learned from
the stdlib are exported with ``camelid.weights.gguf.save`` as F32 and as Q8_0, and each file is
loaded back with ``camelid.weights.gguf.load``, so both sides decode the very bytes of one file:
llama.cpp (llama-cpp-python) from the file, camelid from the fp32 weights the file gives
(``q * scale`` for Q8_0, re-quantised by ``Engine(int8="q8_0")`` to exactly the file's blocks).

Precisions: ``f32`` is llama.cpp's F32 file against ``Engine(model, tok, compile=True)``;
``q8_0`` is its Q8_0 file against ``Engine(..., compile=True, int8="q8_0")``. llama.cpp runs with
an F32 KV cache (``type_k=type_v=0``) in both cases (camelid's cache is fp32), ``--threads``
threads for decode and batch, ``n_batch = n_ubatch = 512``, its default attention.

- tg128 (llama-bench style): 128 single-token decodes on an empty cache. llama.cpp is fed a
  seeded random token per step (llama-bench feeds random tokens: no sampling cost); camelid's
  ``generate`` of a 1-token prompt, 128 new tokens, greedy, end of text ignored: one prefill of
  one token and 127 compiled decode steps, its greedy choice and Python loop included.
- pp512: one 512-token batch into an empty cache. llama.cpp: ``llama_decode`` of the batch
  (logits of the last token); camelid: the engine's own prefill call (``model(tokens,
  positions, cache=..., last_only=True)`` under inference mode, on ``engine.model``, whose Q8_0
  layers dequantise per call).

Each measurement is the median of ``--repeats`` that alternate between the sides after warm-up
(which compiles camelid's step). Decode shares of the memory-bandwidth roofline are
tokens/s x weight bytes read per token / read bandwidth (measured in the same run: the best of
a few sums over 1 GiB); the bytes are each side's own: llama.cpp the file's tensors but the
embedding table (one row read per token), at 34/32 bytes per Q8_0 weight, camelid
``decode_bytes`` of the engine's model (the same, its Q8_0 layers hold the file's blocks). The
pp512 shares are of the fp32 matmul peak measured in the same run (a 2048^3 ``torch.mm``).

camelid's decode time is then broken down (:func:`breakdown`): the compiled step timed
alone, the weight products alone, the rest of the step, and the generate loop's share.

Greedy agreement: both sides continue the same prompt greedily for ``--agree`` tokens
(llama.cpp: argmax of its logits, fed back). Reported: whether the token lists are equal, the
first divergence, the top-1 agreement of camelid's argmax with llama.cpp's at each of
llama.cpp's positions (camelid's logits of llama.cpp's sequence, one forward pass), and the
largest logit difference there. llama.cpp quantises the activations to Q8_0 inside its Q8_0
dot products (camelid keeps them fp32), so Q8_0 tokens may diverge.

    python benchmarks/llamacpp.py                      # llama-125m, f32 and q8_0, 2 threads
    python benchmarks/llamacpp.py --dtypes q8_0 --repeats 5 --json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import bench_tokenizer, read_bandwidth

import camelid
from camelid.config import ModelConfig
from camelid.infer import kernels
from camelid.infer.linear import DecodeLinear, Q8_0Linear, _row_dot, decode_bytes
from camelid.model import KVCache
from camelid.system import cpu_name
from camelid.weights import gguf

TG, PP = 128, 512
AGREE_PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a big fp32 matmul, ``torch.mm`` of two n x n (the best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def prefill_flops(config: ModelConfig, body: int, head: int, tokens: int) -> float:
    """FLOPs of a causal prefill that projects only the last position to the vocabulary (as
    both sides do): 2 per weight per token in the layers' linears (``body`` weights), 2 per
    head weight once, and the attention scores and their weighted sum (half the T x T square)."""
    attn = 2 * 2 * config.n_layers * config.n_heads * config.head_dim * tokens * tokens / 2
    return 2 * body * tokens + 2 * head + attn


class LlamaCpp:
    """One GGUF file in llama.cpp, driven through its C API (decode, logits, cache clear)."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=PP,
            n_ubatch=PP,
            n_threads=threads,
            n_threads_batch=threads,
            type_k=0,  # F32 KV cache, as camelid's
            type_v=0,
            verbose=False,
        )
        self.ctx = self.llm.ctx
        self.n_vocab = self.llm.n_vocab()

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, ids: list[int]) -> None:
        arr = (self.lib.llama_token * len(ids))(*ids)
        rc = self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def last_logits(self) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                     shape=(self.n_vocab,)).copy()  # fmt: skip

    def tg(self, tokens: list[int]) -> float:
        """Seconds to decode ``tokens`` one at a time into an empty cache."""
        self.clear()
        t0 = time.perf_counter()
        for t in tokens:
            self.decode([t])
        self.lib.llama_synchronize(self.ctx)
        return time.perf_counter() - t0

    def pp(self, ids: list[int]) -> float:
        self.clear()
        t0 = time.perf_counter()
        self.decode(ids)
        self.lib.llama_synchronize(self.ctx)
        return time.perf_counter() - t0

    def greedy(self, prompt: list[int], n: int, vocab: int) -> tuple[list[int], list[np.ndarray]]:
        """``n`` greedy tokens after ``prompt`` and the logits each was chosen from."""
        self.clear()
        self.decode(prompt)
        out, logits = [], []
        for _ in range(n):
            row = self.last_logits()
            logits.append(row)
            out.append(int(np.argmax(row[:vocab])))
            self.decode([out[-1]])
        return out, logits


def run(
    args: argparse.Namespace,
    source: camelid.Transformer,
    dtype: str,
    tmp: Path,
    bandwidth: float,
    peak: float,
    flops: float,
    *,
    tok: camelid.Tokenizer,
    tg_tokens: list[int],
    pp_tokens: list[int],
    prompt: list[int],
) -> dict:
    """Export ``source`` as ``dtype``, load it back, and measure and compare both sides."""
    config = source.config
    path = tmp / f"model-{dtype}.gguf"
    saved = gguf.save(source, tok, path, dtype, progress=False)
    model = gguf.load(path, progress=False)
    reader = gguf._reader(path)
    tied = config.tie_embeddings
    file_bytes = sum(
        int(t.n_bytes) for t in reader.tensors if tied or t.name != "token_embd.weight"
    )
    del reader
    t0 = time.perf_counter()
    engine = camelid.Engine(
        model, tok, max_batch_size=1, compile=True, int8="q8_0" if dtype == "q8_0" else False
    )
    cam_bytes = decode_bytes(engine.model)
    cpp = LlamaCpp(path, args.threads, n_ctx=1024)

    def cam_tg() -> float:
        t0 = time.perf_counter()
        c = engine.generate(tg_tokens[:1], max_new_tokens=TG, temperature=0, ignore_eos=True)
        assert len(c.token_ids) == TG
        return time.perf_counter() - t0

    def cam_pp() -> float:
        with torch.inference_mode():
            cache = KVCache(config, 1, PP, torch.device("cpu"), torch.float32)
            ids = torch.tensor([pp_tokens])
            t0 = time.perf_counter()
            engine.model(ids, torch.arange(PP), cache=cache, kv_len=PP, last_only=True)
            return time.perf_counter() - t0

    sides = {
        "llama.cpp tg": lambda: cpp.tg(tg_tokens),
        "camelid tg": cam_tg,
        "llama.cpp pp": lambda: cpp.pp(pp_tokens),
        "camelid pp": cam_pp,
    }
    for name, fn in sides.items():  # warm-up; camelid compiles here
        t = fn()
        print(f"  {dtype} {name}: warm-up {t:.1f} s", flush=True)
    print(f"  {dtype}: engine built and compiled in {time.perf_counter() - t0:.0f} s")
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            times[name].append(fn())
    rate = {n: (TG if "tg" in n else PP) / statistics.median(ts) for n, ts in times.items()}

    # Greedy agreement on one prompt.
    ref, ref_logits = cpp.greedy(prompt, args.agree, tok.vocab_size)
    mine = engine.generate(
        prompt, max_new_tokens=args.agree, temperature=0, ignore_eos=True
    ).token_ids
    first = next((i for i, (a, b) in enumerate(zip(ref, mine, strict=True)) if a != b), None)
    vocab = tok.vocab_size
    cam_logits = engine.logits(torch.tensor([prompt + ref[:-1]]))[0, len(prompt) - 1 :, :vocab]
    cpp_logits = torch.from_numpy(np.stack(ref_logits))[:, :vocab]
    top1 = cam_logits.argmax(-1) == cpp_logits.argmax(-1)
    max_diff = (cam_logits - cpp_logits).abs().max().item()
    parts = breakdown(engine, statistics.median(times["camelid tg"]) / TG)
    r = {
        "file_bytes": saved.nbytes,
        "camelid_breakdown": parts,
        "bytes_per_token": {"llama.cpp": file_bytes, "camelid": cam_bytes},
        "tokens_per_s": rate,
        "times_s": times,
        "tg_ratio": rate["camelid tg"] / rate["llama.cpp tg"],
        "pp_ratio": rate["camelid pp"] / rate["llama.cpp pp"],
        "tg_roofline": {
            "llama.cpp": rate["llama.cpp tg"] * file_bytes / bandwidth,
            "camelid": rate["camelid tg"] * cam_bytes / bandwidth,
        },
        "pp_peak": {
            "llama.cpp": rate["llama.cpp pp"] * flops / PP / peak,
            "camelid": rate["camelid pp"] * flops / PP / peak,
        },
        "greedy_equal": ref == mine,
        "first_divergence": first,
        "top1_agreement": top1.float().mean().item(),
        "max_logit_diff": max_diff,
    }
    print(
        f"{dtype}: weights read per token llama.cpp {file_bytes / 1e6:.1f} MB, "
        f"camelid {cam_bytes / 1e6:.1f} MB"
    )
    for kind, label in (("tg", f"tg{TG}"), ("pp", f"pp{PP}")):
        share = r["tg_roofline"] if kind == "tg" else r["pp_peak"]
        what = "of the bandwidth roofline" if kind == "tg" else "of the fp32 matmul peak"
        mine_rate, their_rate = rate[f"camelid {kind}"], rate[f"llama.cpp {kind}"]
        print(
            f"  {label}: camelid {mine_rate:8.1f} tok/s ({share['camelid']:.0%})  llama.cpp "
            f"{their_rate:8.1f} tok/s ({share['llama.cpp']:.0%} {what})  "
            f"ratio {r[f'{kind}_ratio']:.2f}x"
        )
    print(
        f"  camelid per token: {parts['token_ms']:.1f} ms = compiled step {parts['step_ms']:.1f} "
        f"(weight products {parts['linear_ms']:.1f}, the rest {parts['rest_of_step_ms']:.1f}) "
        f"+ generate loop {parts['loop_ms']:.1f}"
    )
    print(
        f"  greedy {args.agree} tokens: {'equal' if r['greedy_equal'] else 'DIFFER'}"
        f"{'' if first is None else f' (first divergence at token {first})'}; top-1 "
        f"agreement at llama.cpp's positions {r['top1_agreement']:.1%}, largest logit "
        f"difference {max_diff:.2e}",
        flush=True,
    )
    return r


def breakdown(engine: camelid.Engine, token_s: float, reps: int = 20) -> dict[str, float]:
    """Where a camelid decode step's time goes, in ms per token: the compiled step itself
    (one token at position 64 of the engine's cache); the weight products alone (every linear
    layer of ``engine.model`` called once, in order, on one row, by the kernel or form the step
    uses, each op call's overhead included, each layer's own weight streaming from memory); the
    rest of the step (attention, norms, RoPE, the graph's glue); and what the generate loop adds
    per token (sampling, the host transfer, Python)."""
    cache = engine._cache
    tok, pos = torch.tensor([[5]]), torch.tensor([[64]])
    layers = [m for m in engine.model.modules() if isinstance(m, Q8_0Linear | DecodeLinear)]
    row_dot = torch.compile(_row_dot, dynamic=False)

    def products() -> None:  # each layer's batch-1 form in the compiled step
        for m in layers:
            x = xs[m.in_features]
            if isinstance(m, Q8_0Linear):
                m(x)
            elif kernels.takes_f32(x, m.weight):
                kernels.f32_matvec(x, m.weight)
            else:
                row_dot(m.weight, x)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t0) / reps)
        return min(times)

    with torch.inference_mode():
        xs = {m.in_features: torch.randn(1, 1, m.in_features) for m in layers}
        step = best(lambda: engine._step(tok, pos, cache, None))
        linear = best(products)
    return {
        "token_ms": token_s * 1e3,
        "step_ms": step * 1e3,
        "linear_ms": linear * 1e3,
        "rest_of_step_ms": (step - linear) * 1e3,
        "loop_ms": (token_s - step) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="llama-125m", help="model shape (default: llama-125m)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (default: 3)")
    ap.add_argument("--threads", type=int, default=2, help="threads, both sides (default: 2)")
    ap.add_argument("--dtypes", default="f32,q8_0", help="GGUF precisions (default: f32,q8_0)")
    ap.add_argument("--agree", type=int, default=64, help="greedy tokens compared (default: 64)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in ("f32", "q8_0"):
            ap.error(f"--dtypes: {d!r} is not one of f32, q8_0")
    torch.set_num_threads(args.threads)

    config = ModelConfig.from_preset(args.preset)
    tok = bench_tokenizer(config.vocab_size)
    torch.manual_seed(0)
    source = camelid.Transformer(config)
    n_linear = sum(m.weight.numel() for m in source.modules() if type(m) is torch.nn.Linear)
    n_head = source.output.weight.numel()
    n_params = sum(p.numel() for p in source.parameters())
    bandwidth = read_bandwidth(torch.device("cpu"))
    peak = matmul_peak()
    g = torch.Generator().manual_seed(1)
    tg_tokens = torch.randint(0, tok.vocab_size, (TG,), generator=g).tolist()
    pp_tokens = torch.randint(0, tok.vocab_size, (PP,), generator=g).tolist()
    agree_prompt = tok.encode(AGREE_PROMPT, bos=True)
    flops = prefill_flops(config, n_linear - n_head, n_head, PP)
    print(
        f"{args.preset} ({n_params / 1e6:.1f}M parameters, vocab {tok.vocab_size}) on "
        f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s, fp32 matmul peak {peak / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            ctx = dict(tok=tok, tg_tokens=tg_tokens, pp_tokens=pp_tokens, prompt=agree_prompt)
            results[dtype] = run(args, source, dtype, Path(tmp), bandwidth, peak, flops, **ctx)
    if args.json:
        print(json.dumps({"preset": args.preset, "threads": args.threads,
                          "read_bandwidth": bandwidth, "matmul_peak": peak,
                          "cpu": cpu_name(), "torch": torch.__version__,
                          "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
