"""Shared helpers: tiny random Llama checkpoints written by `transformers` itself.

`transformers` is the test-time reference, not a dependency: without it, the tests that need it
skip one by one (``needs_hf``), and ``random_llama_dir`` writes its checkpoint with camelid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import transformers
except ImportError:  # the suite still runs; HF-based tests skip individually
    transformers = None
else:
    transformers.utils.logging.disable_progress_bar()


def needs_hf() -> None:
    """Skip the calling test (or fixture) when transformers is not installed."""
    if transformers is None:
        pytest.skip("needs transformers (the test-time reference)")


# A small GQA config with odd sizes and llama3 RoPE scaling whose original context (32) is
# shorter than the test sequences, so every band of the scaling rule is exercised.
BASE = dict(
    vocab_size=301,
    hidden_size=96,
    intermediate_size=203,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    tie_word_embeddings=False,
)


def hf_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random `LlamaForCausalLM` (eager attention: the exact reference)."""
    needs_hf()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**BASE, **overrides})
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager")
    # Random norm weights too, so a swapped or skipped norm cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.to(dtype).eval()


def save_hf(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def to_v4_config(path: Path) -> None:
    """Rewrite a transformers-5 config.json in the 4.x style of the published checkpoints."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    cfg["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    if cfg.get("head_dim") == cfg["hidden_size"] // cfg["num_attention_heads"]:
        del cfg["head_dim"]  # 4.x configs derive it
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (path / "config.json").write_text(json.dumps(cfg))


def random_llama_dir(path: Path, seed: int = 0, **overrides) -> Path:
    """A saved tiny random Llama checkpoint (one safetensors file): ``hf_model(seed,
    **overrides)`` saved by transformers when it is installed (so it holds the very weights
    of that reference model), else the same architecture initialised and saved by camelid."""
    if transformers is not None:
        return save_hf(hf_model(seed, **overrides), path)
    import camelid

    config = camelid.ModelConfig.from_hf({**BASE, **overrides, "model_type": "llama"})
    torch.manual_seed(seed)
    model = camelid.Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    camelid.save(model, path)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A saved tiny random Llama checkpoint (single safetensors file)."""
    return random_llama_dir(tmp_path / "hf")


def camelid_main(argv: list[str]) -> int:
    """Run the `camelid` command as installed (its console-script entry point), in-process, so
    monkeypatching and capsys see it; tests never import camelid.cli themselves."""
    import importlib.metadata

    (ep,) = importlib.metadata.entry_points(group="console_scripts", name="camelid")
    return ep.load()(argv)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS`` (one thread per
    process), asserted to succeed: the 2-process tests' launcher."""
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res
