"""Weights in and out: Hugging Face safetensors directories (GGUF and digests come later)."""

from camelid.weights.hf import load, save

__all__ = ["load", "save"]
