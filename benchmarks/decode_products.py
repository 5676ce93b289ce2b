"""The weight products of one batch-1 decode step, form by form: how fast each streams the
weights of a preset's linear layers (every layer's own weight, in order, as a step reads them).

Forms, on one fp32 row:
- ``q8_0 kernel``: ``camelid.infer.kernels.q8_0_matvec`` (int8 + fp16 block scales), op call
  included, and ``q8_0 kernel (ctypes)``, the C function alone;
- ``q8_0 compiled``: the best ``torch.compile`` form of the block product (a row-dot over
  (out, blocks, 32), the blocks' sums scaled and summed), what ``Q8_0Linear`` runs without
  the kernel;
- ``f32 kernel``: ``camelid.infer.kernels.f32_matvec``; ``f32 row-dot``: the compiled
  ``(weight * x).sum(-1)`` (``RowDotLinear`` without the kernel); ``f32 oneDNN``: the eager
  library call.

GB/s = weight bytes (34/32 per Q8_0 weight, 4 per fp32 weight) / seconds, the best of
``--repeats`` passes; the read bandwidth is measured in the same run.

    python benchmarks/decode_products.py                 # llama-125m, 2 threads
    python benchmarks/decode_products.py --preset llama-16m --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import read_bandwidth

import camelid
from camelid.config import ModelConfig
from camelid.infer import kernels
from camelid.infer.linear import Q8_0Linear, _row_dot, linear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="llama-125m", help="model shape (default: llama-125m)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per form (default: 5)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = camelid.Transformer(ModelConfig.from_preset(args.preset))
    lins = [m for m in model.modules() if type(m) is torch.nn.Linear]
    q8 = [Q8_0Linear(m) for m in lins]
    xs = {m.in_features: torch.randn(1, m.in_features) for m in lins}
    f32_bytes = sum(m.weight.numel() * 4 for m in lins)
    q8_bytes = sum(m.q.numel() * 34 // 32 for m in q8)
    lib = kernels._library()

    def blocks(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        part = (q.view(q.shape[0], -1, 32) * x.view(1, -1, 32)).sum(-1)
        return (part * scale.float()).sum(-1)

    compiled_q8 = torch.compile(blocks, dynamic=False)
    row_dot = torch.compile(_row_dot, dynamic=False)
    forms = {
        "f32 oneDNN": (f32_bytes, lambda: [linear(xs[m.in_features], m.weight) for m in lins]),
        "f32 row-dot": (f32_bytes, lambda: [row_dot(m.weight, xs[m.in_features]) for m in lins]),
        "q8_0 compiled": (
            q8_bytes,
            lambda: [compiled_q8(m.q, xs[m.in_features], m.scale) for m in q8],
        ),
    }
    if lib is not None:

        def raw() -> None:
            for m in q8:
                x, y = xs[m.in_features], torch.empty(1, m.out_features)
                lib.q8_0_matvec(x.data_ptr(), 1, m.q.data_ptr(), m.scale.data_ptr(),
                                m.out_features, m.in_features, y.data_ptr())  # fmt: skip

        forms["f32 kernel"] = (
            f32_bytes,
            lambda: [kernels.f32_matvec(xs[m.in_features], m.weight) for m in lins],
        )
        forms["q8_0 kernel"] = (
            q8_bytes,
            lambda: [kernels.q8_0_matvec(xs[m.in_features], m.q, m.scale) for m in q8],
        )
        forms["q8_0 kernel (ctypes)"] = (q8_bytes, raw)
    bandwidth = read_bandwidth(torch.device("cpu"))
    print(
        f"{args.preset}: {len(lins)} linear layers, {f32_bytes / 1e6:.1f} MB fp32, "
        f"{q8_bytes / 1e6:.1f} MB Q8_0; {args.threads} threads; read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; kernels {'built' if lib else 'NOT available'}"
    )
    with torch.inference_mode():
        for name, (nbytes, fn) in forms.items():
            fn()  # warm-up (compiles)
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            print(
                f"  {name:>22}: {best * 1e3:7.2f} ms  {nbytes / best / 1e9:5.1f} GB/s "
                f"({nbytes / best / bandwidth:.0%} of the read bandwidth)"
            )


if __name__ == "__main__":
    main()
