"""Weights in and out: Hugging Face safetensors directories (:mod:`camelid.weights.hf`), GGUF
files for llama.cpp (:mod:`camelid.weights.gguf`), and the weights digest that names them
(:mod:`camelid.weights.digest`)."""

from __future__ import annotations

from pathlib import Path

import torch

from camelid.model import Transformer
from camelid.weights import gguf
from camelid.weights.hf import save


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> Transformer:
    """A Hugging Face Llama directory or a Llama GGUF file → a :class:`Transformer` (see
    :func:`camelid.weights.hf.load` and :func:`camelid.weights.gguf.load`)."""
    from camelid.weights import hf

    loader = gguf.load if gguf.is_gguf(path) else hf.load
    return loader(path, device=device, dtype=dtype, progress=progress)


__all__ = ["load", "save"]
