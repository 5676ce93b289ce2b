"""Complete Hugging Face directories: a model and its tokenizer, as the ecosystem expects them.

    save_pretrained(model, tokenizer, "out/")          # the trainer's export does this
    export_checkpoint("runs/quickstart", "out/")       # camelid export: any training checkpoint
    convert("Llama-3.2-1B", "out/", dtype=torch.bfloat16)   # camelid convert

A complete directory holds the weights (safetensors), ``config.json`` with ``bos_token_id`` and
``eos_token_id``, ``generation_config.json`` listing every id camelid's engine stops on (end of
text, end of turn, end of message: :func:`camelid.infer.engine.default_stop_ids`), so
``transformers``' ``generate`` stops where camelid stops, and the tokenizer files. This room
may read both the weights and the tokenizer, so the directory is assembled here.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from camelid.errors import CheckpointError
from camelid.infer.engine import default_stop_ids
from camelid.infer.load import (
    RUN_TOKENIZER,
    ModelSource,
    inspect_model,
    is_run,
    load_model,
    load_tokenizer,
    resolve_model,
    run_tokenizer,
    training_checkpoint,
)
from camelid.io import copy_file_atomic
from camelid.model import Transformer
from camelid.tokenizer import Tokenizer
from camelid.tokenizer.tokenizer import CONFIG_NAME, JSON_NAME, MODEL_NAME, SPECIAL_TOKENS_NAME
from camelid.weights import checkpoint as ckpt
from camelid.weights import hf

# What a Hugging Face model directory carries besides weights and config.json, kept by convert.
TOKENIZER_FILES = (
    JSON_NAME,
    MODEL_NAME,
    CONFIG_NAME,
    SPECIAL_TOKENS_NAME,
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class Written:
    """What an export or a conversion wrote, read back from the directory itself."""

    source: ModelSource
    out: Path
    info: hf.CheckpointInfo
    tokenizer: str | None  # where the tokenizer came from (None: the source had none)
    seconds: float


def save_pretrained(
    model: Transformer, tokenizer: Tokenizer, out: str | Path, max_shard_size: int | str = "5GB"
) -> None:
    """Write ``model`` and ``tokenizer`` as one complete Hugging Face directory (see the module
    docstring). Each file is written atomically."""
    out = Path(out)
    hf.save(model, out, max_shard_size, bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id, stop_token_ids=default_stop_ids(tokenizer))  # fmt: skip
    tokenizer.save(out, model_max_length=model.config.max_seq_len)
    for name in (MODEL_NAME, "chat_template.jinja", "chat_template.json"):
        # From an earlier directory in the same place: they would describe another tokenizer.
        (out / name).unlink(missing_ok=True)


def keep_run_tokenizer(tokenizer: Tokenizer, run_dir: str | Path) -> None:
    """The run's own copy of its tokenizer (``RUN/tokenizer``): the run's checkpoints can be
    exported with it even after the original moves or is retrained."""
    tokenizer.save(Path(run_dir) / RUN_TOKENIZER)


def export_checkpoint(
    run_or_checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Written:
    """A training run (its newest complete checkpoint) or one checkpoint → a complete Hugging
    Face directory ``out``. The run is only read. Everything is checked — the checkpoint's
    index, its tokenizer, ``out`` — before ``out`` is written; a new ``out`` is written beside
    it under a temporary name and renamed when complete."""
    t0 = time.perf_counter()
    path = training_checkpoint(run_or_checkpoint)
    run = ckpt.run_of(path)
    step = ckpt.step_of(path)
    source = ModelSource(Path(run_or_checkpoint), path, "checkpoint", run=run, step=step)
    out = Path(out)
    _check_out(out, overwrite, path)
    if run is None:
        raise CheckpointError(
            f"{path}: a checkpoint outside a run (RUN/{ckpt.CHECKPOINTS}/step-N): the tokenizer "
            "it was trained with cannot be found"
        )
    tok_path = run_tokenizer(run)
    tokenizer = Tokenizer.load(tok_path)
    try:
        info = ckpt.inspect_checkpoint(path)
        if tokenizer.vocab_size > info.config.vocab_size:
            raise CheckpointError(
                f"{tok_path} has {tokenizer.vocab_size} ids but {path}'s model has "
                f"{info.config.vocab_size}: not the tokenizer it was trained with"
            )
        model = ckpt.load(path, dtype=dtype or info.dtype)
    except CheckpointError as e:
        older = [p for p in ckpt.list_checkpoints(run) if p.name < path.name]
        if path == Path(run_or_checkpoint) or not older:
            raise
        # a damaged newest checkpoint: say so, and which one to export instead (never silently)
        hint = f"camelid export {shlex.quote(str(older[-1]))} {shlex.quote(str(out))}"
        raise CheckpointError(f"{e}; to export the one before it: {hint}") from None
    if log is not None:  # only now: a bad checkpoint ends in its one error line
        log(f"read {path} (step {step}); writing {out} with the tokenizer {tok_path}")
    _write(out, lambda d: save_pretrained(model, tokenizer, d, max_shard_size))
    return Written(source, out, hf.inspect_checkpoint(out), str(tok_path),
                   time.perf_counter() - t0)  # fmt: skip


def convert(
    model: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    log: Callable[[str], None] | None = None,
) -> Written:
    """Re-save MODEL (a Hugging Face directory, a run or a checkpoint) as a Hugging Face
    directory ``out``, optionally cast, keeping what makes it complete: the tokenizer files,
    generation_config.json, and config.json's token ids (or the tokenizer's, if it has none).
    Every tensor is checked before ``out`` is written."""
    t0 = time.perf_counter()
    source = resolve_model(model, need_tokenizer=False)
    out = Path(out)
    info = inspect_model(source)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.resolve() == source.path.resolve():
        raise CheckpointError(
            f"{out}: is the directory being converted ({source.path}); name another one"
        )
    _check_not_in_a_run(out)
    if log is not None and source.note is not None:
        log(source.note)
    if source.kind == "checkpoint":
        tokenizer = load_tokenizer(source)
        weights = load_model(source, dtype=dtype or info.dtype)
        save_pretrained(weights, tokenizer, out, max_shard_size)
        origin = tokenizer.source
    else:
        origin = _convert_hf(source.path, out, info, dtype, max_shard_size, log)
    return Written(source, out, hf.inspect_checkpoint(out), origin, time.perf_counter() - t0)


def _convert_hf(
    src: Path,
    out: Path,
    info: hf.CheckpointInfo,
    dtype: torch.dtype | None,
    max_shard_size: int | str,
    log: Callable[[str], None] | None,
) -> str | None:
    tokenizer = Tokenizer.load(src) if _has_any(src, (JSON_NAME, MODEL_NAME)) else None
    ids = _token_ids(src / hf.CONFIG_NAME)
    if tokenizer is not None:
        ids.setdefault("bos_token_id", tokenizer.bos_id)
        ids.setdefault("eos_token_id", tokenizer.eos_id)
    has_generation = (src / hf.GENERATION_CONFIG_NAME).is_file()
    stops = default_stop_ids(tokenizer) if tokenizer is not None and not has_generation else None
    weights = hf.load(src, dtype=dtype or info.dtype)
    hf.save(weights, out, max_shard_size, stop_token_ids=stops, **ids)
    same = out.resolve() == src.resolve()
    for name in (*TOKENIZER_FILES, hf.GENERATION_CONFIG_NAME):
        if (src / name).is_file() and not same:
            copy_file_atomic(src / name, out / name)
    if tokenizer is None and log is not None:
        log(f"note: {src} has no {JSON_NAME} or {MODEL_NAME}; {out} holds the weights only")
    return str(src) if tokenizer is not None else None


def _token_ids(config_file: Path) -> dict[str, int | list[int]]:
    """bos_token_id / eos_token_id of a source config.json, where they are ids."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, int | list[int]] = {}
    for key in ("bos_token_id", "eos_token_id"):
        value = config.get(key) if isinstance(config, dict) else None
        ids = value if isinstance(value, list) else [value]
        if ids and all(type(v) is int for v in ids):  # not bool, not float
            out[key] = value
    return out


def _has_any(path: Path, names: tuple[str, ...]) -> bool:
    return any((path / n).is_file() for n in names)


def _check_out(out: Path, overwrite: bool, checkpoint: Path) -> None:
    """``out`` must be new or an empty directory, or ``overwrite`` given; never the checkpoint
    being read, inside it, or above it (the run itself, its checkpoints/)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is a file; name a directory")
    real, source = out.resolve(), checkpoint.resolve()
    if real == source or source in real.parents or real in source.parents:
        raise CheckpointError(
            f"{out}: would write into or over the checkpoint {checkpoint} being exported; "
            "name a directory outside it (RUN/hf is fine)"
        )
    _check_not_in_a_run(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{out}: exists and is not empty; pass --overwrite to replace its model files"
        )


def _check_not_in_a_run(out: Path) -> None:
    """A model directory is never written over a training run or among its checkpoints: the
    run would stop resolving as a run, or its checkpoints would hold a stranger."""
    real = out.resolve()
    if is_run(real):
        raise CheckpointError(
            f"{out}: is a training run; name a directory outside it (RUN/hf is fine)"
        )
    for parent in (real, *real.parents):
        if parent.name == ckpt.CHECKPOINTS and is_run(parent.parent):
            raise CheckpointError(
                f"{out}: is inside the checkpoints of the run {parent.parent}; name a directory "
                "outside them (RUN/hf is fine)"
            )


def _write(out: Path, write: Callable[[Path], None]) -> None:
    """Write a directory: in place over an existing one, else under a temporary name beside
    it, renamed when complete, so a killed export leaves no directory that looks whole."""
    if out.exists():
        write(out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        write(stage)
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
