"""Inference: the generation engine, sampling, streaming text and int8 decoding."""

from camelid.infer.engine import Completion, Engine, Score, TokenLogprob
from camelid.infer.linear import quantize_int8
from camelid.infer.sampling import SamplingParams, derive_seed

__all__ = [
    "Completion",
    "Engine",
    "SamplingParams",
    "Score",
    "TokenLogprob",
    "derive_seed",
    "quantize_int8",
]
