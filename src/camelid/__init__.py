"""camelid: an open, PyTorch-native system for the Llama family of language models.

import camelid
model = camelid.load("path/to/Llama-3.2-1B")          # a Hugging Face Llama directory
logits = model(tokens)                                 # (B, T) ids -> (B, T, vocab)
camelid.save(model, "out/")                            # loadable by transformers
engine = camelid.Engine(model, camelid.Tokenizer.load("path/to/Llama-3.2-1B"))
print(engine.generate("The capital of France is", max_new_tokens=20, temperature=0).text)
config = camelid.ModelConfig.from_preset("llama-3.1-8b")
"""

from camelid.config import ModelConfig, RopeScaling
from camelid.errors import CamelidError, CheckpointError, ConfigError, RequestError
from camelid.infer import Completion, Engine, SamplingParams, Score
from camelid.model import Transformer
from camelid.tokenizer import Tokenizer
from camelid.weights import load, save

__version__ = "0.1.0"

__all__ = [
    "CamelidError",
    "CheckpointError",
    "Completion",
    "ConfigError",
    "Engine",
    "ModelConfig",
    "RequestError",
    "RopeScaling",
    "SamplingParams",
    "Score",
    "Tokenizer",
    "Transformer",
    "load",
    "save",
]
