"""CPU kernels for the weight products of batch-1 decoding: fp32 activations times Q8_0
weights (int8 with one fp16 scale per block of 32 inputs: llama.cpp's Q8_0, its very values
and scales) or times fp32 weights.

Why kernels of their own: a decode step reads every weight once, so its products must stream
the weights at memory speed. Compiled by ``torch.compile`` on an AVX2 CPU, every form of the
Q8_0 block product tried (a row-dot over (out, blocks, 32) then scale and sum; the scales folded
into the weight as it is read; the block sum taken lane-wise) converts int8 to fp32 element by
element and ran at ~1.3 GB/s of weights, a tenth of the fp32 row-dot; and the compiled fp32
row-dot itself streams at ~15 GB/s where a plain read reaches ~22 (docs/benchmarks.md, "Decoding
against llama.cpp"). These kernels convert 32 int8 weights with four vector conversions,
multiply by the fp32 activations, scale each block's partial sums with one fused multiply-add,
reduce horizontally once per output, and prefetch the weights 1 KiB (Q8_0) or 4 KiB (fp32)
ahead so that each core keeps enough reads in flight. The activations stay fp32 (llama.cpp
quantises them to Q8_0 too), so a result is the exact product up to fp32 summation order.

They are C compiled on first use with the C++ compiler ``torch.compile`` already needs on a
CPU (``g++ -O3 -mavx2 -mfma -mf16c -fopenmp``, into the inductor cache directory, keyed by the
source's digest), and run on the process's OpenMP threads (torch's own runtime, so
``torch.set_num_threads`` applies). They are ``torch.library`` ops, so a compiled decode step
calls them as is. Where they cannot run (no AVX2/FMA/F16C, no compiler), :func:`available` is
False and the callers (``camelid.infer.linear``) take their torch forms.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

MAX_ROWS = 8  # rows one call multiplies while reading the weight once (the kernel's registers)

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

#define MAX_ROWS 8
#ifndef PREFETCH
#define PREFETCH 1024 /* bytes ahead of the weights read: more in flight per core */
#endif
#ifndef PREFETCH_F32
#define PREFETCH_F32 4096 /* the same for fp32 weights */
#endif

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 int8 weights of one block times 32 fp32 activations: the block's 8 partial sums. */
static inline __m256 widen(const int8_t *q8) {  /* 8 int8 -> 8 fp32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q8)));
}

static inline __m256 block_dot(const int8_t *qb, const float *xb) {
    const __m256 w0 = widen(qb), w1 = widen(qb + 8), w2 = widen(qb + 16), w3 = widen(qb + 24);
    __m256 p = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
    p = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), p);
    __m256 p2 = _mm256_mul_ps(w2, _mm256_loadu_ps(xb + 16));
    p2 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), p2);
    return _mm256_add_ps(p, p2);
}

/* One output row's fp16 block scales as fp32 (nb <= 4096, i.e. rows up to 131072 inputs). */
static inline void row_scales(const uint16_t *so, int64_t nb, float *d) {
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8)
        _mm256_storeu_ps(d + b, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(so + b))));
    for (; b < nb; b++) d[b] = _cvtsh_ss(so[b]);
}

/* y (m, out) = x (m, in) @ (q * scale).T; q (out, in) int8, scale (out, in / 32) fp16. */
int q8_0_matvec(const float *x, int64_t m, const int8_t *q, const uint16_t *scale,
                int64_t out, int64_t in, float *y) {
    const int64_t nb = in / 32;
    if (m < 1 || m > MAX_ROWS || nb > 4096 || in % 32) return 1;
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const int8_t *qo = q + o * in;
        float d[4096];
        row_scales(scale + o * nb, nb, d);
        if (m == 1) {  /* decoding: two independent chains, the scale folded in by one FMA */
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int64_t b = 0;
            for (; b + 2 <= nb; b += 2) {
                _mm_prefetch((const char *)(qo + 32 * b + PREFETCH), _MM_HINT_T0);
                a0 = _mm256_fmadd_ps(block_dot(qo + 32 * b, x + 32 * b),
                                     _mm256_broadcast_ss(d + b), a0);
                a1 = _mm256_fmadd_ps(block_dot(qo + 32 * b + 32, x + 32 * b + 32),
                                     _mm256_broadcast_ss(d + b + 1), a1);
            }
            if (b < nb)
                a0 = _mm256_fmadd_ps(block_dot(qo + 32 * b, x + 32 * b),
                                     _mm256_broadcast_ss(d + b), a0);
            y[o] = hsum(_mm256_add_ps(a0, a1));
            continue;
        }
        __m256 acc[MAX_ROWS];
        for (int64_t r = 0; r < m; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            _mm_prefetch((const char *)(qo + 32 * b + PREFETCH), _MM_HINT_T0);
            const __m256 db = _mm256_broadcast_ss(d + b);
            for (int64_t r = 0; r < m; r++)
                acc[r] = _mm256_fmadd_ps(block_dot(qo + 32 * b, x + r * in + 32 * b), db, acc[r]);
        }
        for (int64_t r = 0; r < m; r++) y[r * out + o] = hsum(acc[r]);
    }
    return 0;
}

/* y (1, out) = x (1, in) @ w.T for fp32 w (out, in), in a multiple of 32: the same streaming
   pass for the fp32 weights of a batch-1 decode step. */
int f32_matvec(const float *x, const float *w, int64_t out, int64_t in, float *y) {
    if (in % 32) return 1;
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const float *wo = w + o * in;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t k = 0; k < in; k += 32) {
            _mm_prefetch((const char *)(wo + k) + PREFETCH_F32, _MM_HINT_T0);
            _mm_prefetch((const char *)(wo + k) + PREFETCH_F32 + 64, _MM_HINT_T0);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wo + k), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wo + k + 8), _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wo + k + 16), _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wo + k + 24), _mm256_loadu_ps(x + k + 24), a3);
        }
        y[o] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
    return 0;
}
"""

_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]


def _cpu_ok() -> bool:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, built once per source and flags; None where they cannot be."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None or not _cpu_ok():
        return None
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from camelid.io import atomic_path

    digest = hashlib.sha256((_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    so = Path(cache_dir()) / "camelid" / f"kernels_{digest}.so"
    try:
        if not so.exists():
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "kernels.c"
                src.write_text(_SOURCE)
                built = Path(tmp) / "kernels.so"
                done = subprocess.run(
                    [compiler, "-x", "c", *_FLAGS, str(src), "-o", str(built)],
                    capture_output=True,
                    text=True,
                )
                if done.returncode != 0:
                    return None
                with atomic_path(so) as dst:  # concurrent builders: one rename wins
                    shutil.copyfile(built, dst)
        lib = ctypes.CDLL(str(so))
    except OSError:  # a read-only cache, a compiler or library that cannot run: torch's forms
        return None
    lib.q8_0_matvec.restype = lib.f32_matvec.restype = ctypes.c_int
    lib.f32_matvec.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    lib.q8_0_matvec.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return lib


_AVAILABLE: bool | None = None  # a plain global: a compiled graph reads it without tracing


def available() -> bool:
    """Whether the kernels run here (x86 with AVX2, FMA and F16C, and a C compiler). The first
    call builds them; make it outside ``torch.compile`` (``decode_copy`` does)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _library() is not None
    return _AVAILABLE


# A plain torch.library op rather than ``torch.library.custom_op``: a decode step makes one call
# per linear layer, and custom_op's wrapper cost ~30 us a call against ~13 us (measured).
_LIB = torch.library.Library("camelid", "FRAGMENT")
_LIB.define("q8_0_matvec(Tensor x, Tensor q, Tensor scale) -> Tensor")
_LIB.define("f32_matvec(Tensor x, Tensor weight) -> Tensor")


def _q8_0_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out, cols = q.shape
    if not x.is_contiguous():
        x = x.contiguous()
    rows = x.numel() // cols
    if rows > MAX_ROWS:
        raise ValueError(f"q8_0_matvec takes at most {MAX_ROWS} rows, got {rows}")
    y = x.new_empty((*x.shape[:-1], out))
    rc = _library().q8_0_matvec(x.data_ptr(), rows, q.data_ptr(), scale.data_ptr(), out, cols,
                                y.data_ptr())  # fmt: skip
    if rc:
        raise ValueError(f"q8_0_matvec: rows of {cols} inputs (a multiple of 32, at most 131072)")
    return y


_LIB.impl("q8_0_matvec", _q8_0_matvec, "CPU")


@torch.library.register_fake("camelid::q8_0_matvec")
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], q.shape[0]))


q8_0_matvec = torch.ops.camelid.q8_0_matvec.default
"""``x @ (q * scale).T`` for up to :data:`MAX_ROWS` fp32 rows ``x`` (..., in), int8 ``q``
(out, in) and fp16 block scales ``scale`` (out, in / 32), all contiguous; fp32 (..., out).
Call it only where :func:`available` is True."""


def _f32_matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out, cols = weight.shape
    if not x.is_contiguous():
        x = x.contiguous()
    if x.numel() != cols:
        raise ValueError(f"f32_matvec takes one row, got {x.numel() // cols}")
    y = x.new_empty((*x.shape[:-1], out))
    if _library().f32_matvec(x.data_ptr(), weight.data_ptr(), out, cols, y.data_ptr()):
        raise ValueError(f"f32_matvec: rows of {cols} inputs (a multiple of 32)")
    return y


_LIB.impl("f32_matvec", _f32_matvec, "CPU")


@torch.library.register_fake("camelid::f32_matvec")
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


f32_matvec = torch.ops.camelid.f32_matvec.default
"""``x @ weight.T`` for one fp32 row ``x`` (..., in) and a contiguous fp32 ``weight``
(out, in), in a multiple of 32. Call it only where :func:`takes_f32` is True."""


def takes_f32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`f32_matvec` can compute ``x @ weight.T``: one fp32 CPU row, a contiguous
    fp32 weight whose rows are a multiple of 32 long, no autograd, and the kernels built."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.shape[1] % 32 == 0
        and weight.is_contiguous()
        and x.shape[:-1].numel() == 1
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and available()
    )
