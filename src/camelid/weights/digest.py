"""Weights digests: one SHA-256 that names the exact weights a model computes with.

Evaluation results, served answers and model cards are bound to this digest. A file hash
cannot serve: a safetensors file starts with a JSON header whose metadata, key order and
padding any writer may change, and the same weights may sit in one file or in many shards.
So the tensors are hashed, not the files: an in-memory model, its ``camelid.save`` export,
that export re-sharded, re-saved or converted without a change of dtype all have one digest;
one weight changed by one ulp, a renamed tensor or another dtype give another.

What is hashed: the model's tensors under their Hugging Face names, the interchange form
:func:`camelid.weights.hf.save` writes (:func:`camelid.weights.hf.hf_tensors` is both what is
saved and what is hashed): q, k and v projections apart, a tied output head once, as the
embedding. Tensors a checkpoint may carry that no model reads (rotary ``inv_freq`` buffers, a
tied model's redundant ``lm_head.weight``) are not hashed, nor is any file metadata.

The byte stream, exactly (every integer an unsigned 64-bit little-endian ``u64``): for each
tensor, in order of name (Unicode code points, which is the byte order of UTF-8)::

    u64 len(name)   name as UTF-8
    u64 len(dtype)  dtype as ASCII: safetensors' name for it (F32, BF16, F16, F64, ...)
    u64 ndim        u64 size of each dimension, outermost first
    u64 nbytes      the elements' raw bytes: row-major, little-endian, as stored (bf16 is
                    hashed as its own two bytes per element, never converted)

and the digest is the SHA-256 of that stream as 64 lowercase hex digits (the form of
:attr:`camelid.tokenizer.Tokenizer.digest`). Every field is length-prefixed, so no two
different sets of tensors give the same stream. A directory is read tensor by tensor, in
slices, through safetensors' memory mapping: a model of any size is never in memory whole.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from camelid.errors import CheckpointError
from camelid.model import Transformer
from camelid.weights import checkpoint as ckpt
from camelid.weights import hf

# Bytes read from a file in one slice (a big tensor is hashed in several).
_CHUNK_BYTES = 64 * 2**20
# Directories at least this big show a progress bar (when stderr is a terminal).
_BAR_BYTES = 256 * 2**20
_NAMES = {dtype: name for name, dtype in hf.SAFETENSORS_DTYPES.items()}


class Source(Protocol):
    """What :func:`source_digest` reads of a resolved MODEL
    (:class:`camelid.infer.load.ModelSource`): "hf" (a Hugging Face directory) or
    "checkpoint" (a training checkpoint), and where it is."""

    @property
    def kind(self) -> str: ...

    @property
    def path(self) -> Path: ...


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """The digest of named tensors (see the module docstring for the exact bytes hashed)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        _frame(h, name, dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size())
        h.update(_le_bytes(t))
    return h.hexdigest()


def model_digest(model: Transformer) -> str:
    """The digest of a camelid model: of the tensors :func:`camelid.weights.hf.save` would
    write for it, so equal to :func:`directory_digest` of that export. On the CPU, in one dtype
    (as loaded or trained), they are views of the parameters: nothing is copied."""
    return tensors_digest(dict(hf.hf_tensors(model)))


def directory_digest(path: str | Path, progress: bool | None = None) -> str:
    """The digest of a Hugging Face directory (one ``model.safetensors`` or shards listed by
    ``model.safetensors.index.json``), read a slice at a time. Its config.json and headers are
    checked first (:func:`camelid.weights.hf.model_tensors`): a directory that is not a whole
    model is a :class:`CheckpointError`. ``progress=None`` shows a bar over the bytes for a
    big model when stderr is a terminal."""
    path = Path(path)
    where = hf.model_tensors(path)
    headers = {}
    for file in sorted(set(where.values())):
        headers.update(_headers(file, [n for n, f in where.items() if f == file]))
    total = sum(nbytes for _, _, nbytes in headers.values())
    show = sys.stderr.isatty() and total >= _BAR_BYTES if progress is None else progress
    bar = hf.progress_bar(total, f"hashing {path.name}", show, unit="B")
    h = hashlib.sha256()
    try:
        for name in sorted(where):
            dtype, shape, nbytes = headers[name]
            _frame(h, name, dtype, shape, nbytes)
            for part in _slices(where[name], name, shape, nbytes):
                h.update(_le_bytes(part))
                bar.update(part.numel() * part.element_size())
    finally:
        bar.close()
    return h.hexdigest()


def source_digest(source: Source, progress: bool | None = None) -> str:
    """The digest of a resolved MODEL (:func:`camelid.infer.load.resolve_model`) as stored: a
    Hugging Face directory's files, or a training checkpoint's weights read at their stored
    dtype, so equal to the digest of ``camelid export`` of it at that dtype."""
    if source.kind == "checkpoint":
        info = ckpt.inspect_checkpoint(source.path)
        return model_digest(ckpt.load(source.path, dtype=info.dtype))
    if source.kind == "gguf":  # its weights as loaded (Q8_0: the exact fp32 q * scale)
        from camelid.weights import gguf

        info = gguf.inspect(source.path)
        return model_digest(gguf.load(source.path, dtype=info.dtype))
    return directory_digest(source.path, progress)


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name for a torch dtype, as the digest hashes it."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"tensors of dtype {dtype} cannot be hashed") from None


# ----------------------------------------------------------------------------------- helpers
def _frame(h, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
    """Everything about one tensor but its bytes, each field length-prefixed."""
    for field in (name.encode("utf-8"), dtype.encode("ascii")):
        h.update(struct.pack("<Q", len(field)))
        h.update(field)
    h.update(struct.pack(f"<{1 + len(shape)}Q", len(shape), *shape))
    h.update(struct.pack("<Q", nbytes))


def _le_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's raw element bytes, row-major and little-endian, without converting it."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.element_size() > 1 and sys.byteorder == "big":  # safetensors' order is little-endian
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        return memoryview(t.view(ints).numpy().byteswap())
    return memoryview(t.view(torch.uint8).numpy())


def _headers(file: Path, names: list[str]) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """Each tensor's dtype name, shape and size in bytes, from its file's header."""
    out = {}
    try:
        with safe_open(file, framework="pt") as f:
            for name in names:
                info = f.get_slice(name)
                dtype, shape = info.get_dtype(), tuple(info.get_shape())
                if dtype not in hf.SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{file}: tensor {name} has dtype {dtype}: not hashed")
                numel = 1
                for s in shape:
                    numel *= s
                out[name] = (dtype, shape, numel * hf.SAFETENSORS_DTYPES[dtype].itemsize)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return out


def _slices(file: Path, name: str, shape: tuple[int, ...], nbytes: int) -> Iterator[torch.Tensor]:
    """A tensor from its file in slices of whole rows, about ``_CHUNK_BYTES`` each, re-opening
    the mapping for each slice so the pages already hashed stop counting against the process."""

    def read(take):
        try:
            with safe_open(file, framework="pt") as f:
                return take(f)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from None

    if not shape or nbytes <= _CHUNK_BYTES:
        yield read(lambda f: f.get_tensor(name))
        return
    step = max(1, _CHUNK_BYTES * shape[0] // nbytes)
    for start in range(0, shape[0], step):
        yield read(lambda f, a=start: f.get_slice(name)[a : a + step])
