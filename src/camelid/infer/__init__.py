"""Inference: the generation engine, sampling, streaming text and int8 decoding."""

from camelid.infer.engine import Completion, Engine, Score, TokenLogprob
from camelid.infer.linear import quantize_int8
from camelid.infer.sampling import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "Score", "TokenLogprob", "quantize_int8"]
