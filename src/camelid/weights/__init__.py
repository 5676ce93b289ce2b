"""Weights in and out: Hugging Face safetensors directories, and the weights digest that names
them (:mod:`camelid.weights.digest`); GGUF comes later."""

from camelid.weights.hf import load, save

__all__ = ["load", "save"]
