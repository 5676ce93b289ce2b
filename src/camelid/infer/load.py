"""Loading a model for generation: from a directory name to a ready :class:`Engine`.

Every consumer that serves a model (``camelid generate`` and ``chat``, the coming OpenAI
server) loads it through here, so a model directory is understood, checked and reported the
same way everywhere: a Hugging Face Llama directory, or a training run whose ``RUN/hf`` holds
the exported weights. Problems are found before any weights are read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from camelid.errors import CheckpointError, RequestError
from camelid.infer.engine import Engine
from camelid.io import format_count
from camelid.tokenizer import Tokenizer
from camelid.tokenizer.tokenizer import JSON_NAME, MODEL_NAME
from camelid.weights import load

DTYPES = ("float32", "bfloat16", "float16")  # the weight dtypes a model can be loaded in


def resolve_model_dir(model: str | Path) -> Path:
    """MODEL as given → the Hugging Face directory to load: the directory itself, or ``RUN/hf``
    for a training run. Checks for weights' config and a tokenizer before anything is loaded."""
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"{model}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{model}: expected a model directory, found a file")
    if not (path / "config.json").is_file():
        run_export = path / "hf"
        if (run_export / "config.json").is_file():
            path = run_export
        else:
            is_run = (path / "checkpoints").is_dir() or (path / "recipe.toml").is_file()
            hint = (
                f"; it looks like a training run that has not exported weights to {run_export} yet"
                if is_run
                else " (expected a Hugging Face Llama directory, or a training run with hf/)"
            )
            raise CheckpointError(f"{model} is not a model directory: no config.json{hint}")
    if not any((path / name).is_file() for name in (JSON_NAME, MODEL_NAME)):
        raise CheckpointError(
            f"{path} has no {JSON_NAME} or {MODEL_NAME} (copy in the tokenizer the model "
            "was trained with)"
        )
    return path


def resolve_device(name: str) -> torch.device:
    """A device name, or "auto" (CUDA if available, else the CPU), checked to exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RequestError(f"--device {name!r}: not a device (try cpu, cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RequestError(f"--device {name}: CUDA is not available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype name of :data:`DTYPES`, or "auto": bfloat16 on CUDA, float32 on the CPU (where
    half-precision matmuls are emulated and slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise RequestError(f"--dtype {name!r}: expected auto or one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_engine(
    model: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_batch_size: int = 16,
    max_seq_len: int | None = None,
    compile: bool = False,
    int8: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> Engine:
    """Load MODEL (weights and tokenizer) into an :class:`Engine`.

    ``device`` and ``dtype`` are names (see :func:`resolve_device`, :func:`resolve_dtype`);
    the other settings are the Engine's. Sizes, device and directory are checked before the
    weights are read. ``progress=None`` shows a loading bar when stderr is a terminal; ``log``
    receives one line on what was loaded (and a note if ``max_seq_len`` exceeds the model's).
    """
    if max_seq_len is not None and max_seq_len < 2:
        raise RequestError(f"--max-seq-len must be at least 2, got {max_seq_len}")
    if max_batch_size < 1:
        raise RequestError(f"--batch-size must be positive, got {max_batch_size}")
    path = resolve_model_dir(model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    tokenizer = Tokenizer.load(path)
    t0 = time.perf_counter()
    transformer = load(path, device=torch_device, dtype=torch_dtype, progress=progress)
    engine = Engine(
        transformer,
        tokenizer,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        compile=compile,
        int8=int8,
    )
    if log is not None:
        context = transformer.config.max_seq_len
        if max_seq_len and max_seq_len > context:
            log(f"note: the model's context is {context} tokens; using that")
        log(
            f"loaded {path} ({format_count(transformer.config.num_params())} parameters, "
            f"{str(torch_dtype).removeprefix('torch.')}{', int8 decode' if int8 else ''}) on "
            f"{torch_device} in {time.perf_counter() - t0:.1f}s; context {engine.max_seq_len} "
            "tokens"
        )
    return engine
