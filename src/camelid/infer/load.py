"""Loading a model for generation: from a directory name to a ready :class:`Engine`.

Every consumer that serves or reads a model (``camelid generate``, ``chat``, ``inspect``,
``convert``, the coming OpenAI server) resolves it through here, so a MODEL argument is
understood, checked and reported the same way everywhere. MODEL may be:

- a Hugging Face Llama directory (config.json, safetensors, a tokenizer);
- a training run ``RUN``: its export ``RUN/hf`` when that is at least as new as the run's
  newest checkpoint, else that checkpoint, read directly;
- one checkpoint ``RUN/checkpoints/step-N``, read directly;
- a GGUF file (llama.cpp's format: F32, F16, BF16 or Q8_0 weights, dequantised on load), with
  the tokenizer it carries.

A checkpoint read directly is loaded in memory (nothing is written) and the line saying what
MODEL resolved to gives the exact ``camelid export`` command that makes a directory of it.
Problems are found before any weights are read.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from camelid.errors import CamelidError, CheckpointError, RequestError
from camelid.infer.engine import Engine
from camelid.io import format_count
from camelid.model import Transformer
from camelid.tokenizer import Tokenizer
from camelid.tokenizer.tokenizer import JSON_NAME, MODEL_NAME
from camelid.weights import checkpoint as ckpt
from camelid.weights import gguf, hf
from camelid.weights.digest import model_digest

DTYPES = ("float32", "bfloat16", "float16")  # the weight dtypes a model can be loaded in
RUN_EXPORT = "hf"  # RUN/hf: the Hugging Face directory a finished run exports
RUN_TOKENIZER = "tokenizer"  # RUN/tokenizer: the copy of its tokenizer a run keeps
RUN_RECIPE = "recipe.toml"  # RUN/recipe.toml: the resolved recipe the run was trained with
RUN_FILES = (RUN_RECIPE, "metrics.jsonl")  # what else marks a directory as a training run


def _checkpoints_beside(missing: Path) -> str:
    """For a checkpoint that is gone (``checkpoint.keep`` removed it, a typo): the ones there."""
    run = missing.parent.parent
    if missing.parent.name != ckpt.CHECKPOINTS or not missing.parent.is_dir():
        return ""
    found = [p.name for p in ckpt.list_checkpoints(run)]
    return f"; checkpoints of {run}: {', '.join(found)}" if found else f"; {run} has none"


@dataclass(frozen=True)
class ModelSource:
    """What a MODEL argument names: where its weights and tokenizer are read from.

    ``kind`` is "hf" (``path`` is a Hugging Face directory), "checkpoint" (``path`` is a
    training checkpoint, read directly) or "gguf" (``path`` is a GGUF file). ``note`` is the
    one line that says what MODEL was resolved to, None when it is plainly the one given.
    """

    given: Path
    path: Path
    kind: str
    tokenizer: Path | None = None
    run: Path | None = None
    step: int | None = None
    note: str | None = None


def resolve_model(model: str | Path, *, need_tokenizer: bool = True) -> ModelSource:
    """MODEL as given → what to load (see the module docstring), checked before any weights
    are read. With ``need_tokenizer`` (generation) MODEL must be a model directory with a
    tokenizer; without (``inspect``, ``convert``) anything else is handed to the weight
    loader as a Hugging Face directory, whose own checks name what is wrong with it."""
    given = Path(model)
    if not given.exists():
        if given.suffix == gguf.SUFFIX:
            raise CheckpointError(f"{model}: no such file")
        raise CheckpointError(f"{model}: no such directory{_checkpoints_beside(given)}")
    if not given.is_dir():
        if gguf.is_gguf(given):
            return ModelSource(given, given, "gguf", given)
        if need_tokenizer:
            raise CheckpointError(
                f"{model}: expected a model directory or a GGUF file, found a file that is neither"
            )
        return ModelSource(given, given, "hf")
    if (given / hf.CONFIG_NAME).is_file():
        return _hf_source(given, given, need_tokenizer)
    if ckpt.looks_like_checkpoint(given):
        return _checkpoint_source(given, given, need_tokenizer)
    if is_run(given):
        return _run_source(given, need_tokenizer)
    if not need_tokenizer:
        return ModelSource(given, given, "hf")
    raise CheckpointError(
        f"{model} is not a model directory: no config.json (expected a Hugging Face Llama "
        "directory, a training run, or one of its checkpoints/step-N)"
    )


def resolve_model_dir(model: str | Path) -> Path:
    """The directory MODEL's weights are read from: a Hugging Face directory, or a training
    checkpoint when a run has no up-to-date export (see :func:`resolve_model`)."""
    return resolve_model(model).path


def training_checkpoint(path: str | Path) -> Path:
    """RUN → its newest complete checkpoint; ``RUN/checkpoints/step-N`` → itself (complete);
    anything else an error that says what it is instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory{_checkpoints_beside(path)}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a training run or checkpoint, found a file")
    if (path / hf.CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{path} is a Hugging Face directory, not a training run or checkpoint "
            "(camelid convert re-saves one)"
        )
    if ckpt.looks_like_checkpoint(path):
        ckpt.require_complete(path)
        return path
    if path.name == ckpt.CHECKPOINTS and is_run(path.parent):
        return ckpt.newest_checkpoint(path.parent)
    if is_run(path):
        return ckpt.newest_checkpoint(path)
    raise CheckpointError(
        f"{path}: not a training run or checkpoint (expected RUN with {ckpt.CHECKPOINTS}/, or "
        f"RUN/{ckpt.CHECKPOINTS}/step-N)"
    )


def export_command(source: ModelSource) -> str:
    """The exact ``camelid export`` command that makes a Hugging Face directory of a
    checkpoint source: a run's into ``RUN/hf`` (where the run is then resolved to), a single
    checkpoint's beside the run's export."""
    if source.run is not None and source.given == source.run:
        src, out = source.run, source.run / RUN_EXPORT
    else:
        base = source.run if source.run is not None else source.path.parent
        src, out = source.path, base / f"{RUN_EXPORT}-step-{source.step}"
    overwrite = " --overwrite" if out.is_dir() and any(out.iterdir()) else ""
    return f"camelid export {shlex.quote(str(src))} {shlex.quote(str(out))}{overwrite}"


def run_tokenizer(run: Path) -> Path:
    """The tokenizer a run was trained with: the copy it keeps (``RUN/tokenizer``), or, for
    runs older than that copy, its recipe's ``data.tokenizer`` or the tokenizer its dataset
    was prepared with (matched by digest). An error lists every place tried."""
    tried: list[str] = []
    copy = run / RUN_TOKENIZER
    if _has_tokenizer(copy):
        return copy
    tried.append(f"{copy} (none)")
    data, _, dataset = _run_data(run, tried)
    manifest = _table(dataset.get("tokenizer"))
    named = [("data.tokenizer", data.get("tokenizer")), ("the dataset's", manifest.get("path"))]
    for label, value in named:
        if not isinstance(value, str) or not value:
            continue
        for path in _candidates(run, value):
            if not _has_tokenizer(path):
                tried.append(f"{path} ({label}: none)")
                continue
            digest = manifest.get("digest")
            if digest and _digest_of(path) != digest:
                tried.append(f"{path} ({label}: another tokenizer than the data's)")
                continue
            return path
    raise CheckpointError(f"{run}: cannot find the tokenizer it was trained with; tried " +
                          "; ".join(tried))  # fmt: skip


def run_dataset(run: Path) -> tuple[Path, dict[str, Any]] | None:
    """The dataset a run was trained on: its recipe's ``data.dir`` and that directory's
    manifest.json (``camelid prepare``'s record of it), or None where either is unreadable."""
    _, found, manifest = _run_data(Path(run), [])
    return None if found is None else (found, manifest)


def _run_data(run: Path, tried: list[str]) -> tuple[dict, Path | None, dict]:
    """A run's recipe ``[data]`` table, its dataset directory and the dataset's manifest
    ({} and None where unreadable; what was tried is appended to ``tried``)."""
    recipe_file = run / RUN_RECIPE
    data: dict = {}
    try:
        data = _table(tomllib.loads(recipe_file.read_text()).get("data"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        tried.append(f"{recipe_file} (unreadable: {type(e).__name__})")
    if isinstance(data.get("dir"), str) and data["dir"]:
        for data_dir in _candidates(run, data["dir"]):
            file = data_dir / "manifest.json"  # the dataset's own record (camelid prepare)
            try:
                return data, data_dir, _table(json.loads(file.read_text()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                tried.append(f"{file} (no readable manifest)")
    return data, None, {}


def load_tokenizer(source: ModelSource) -> Tokenizer:
    """The tokenizer of a resolved MODEL (an error naming what was tried if it has none)."""
    if source.tokenizer is not None:
        return Tokenizer.load(source.tokenizer)
    if source.kind == "checkpoint":
        return Tokenizer.load(_checkpoint_tokenizer(source.path, source.run))
    return Tokenizer.load(source.path)


def load_model(
    source: ModelSource,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> Transformer:
    """The weights of a resolved MODEL, from its Hugging Face directory or its checkpoint."""
    loader = {"checkpoint": ckpt.load, "gguf": gguf.load}.get(source.kind, hf.load)
    return loader(source.path, device=device, dtype=dtype, progress=progress)


def inspect_model(source: ModelSource) -> hf.CheckpointInfo:
    """Config, files, dtype and size of a resolved MODEL, from headers alone."""
    if source.kind == "checkpoint":
        return ckpt.inspect_checkpoint(source.path)
    if source.kind == "gguf":
        info = gguf.inspect(source.path)
        stored = f"GGUF {info.file_type}"
        return hf.CheckpointInfo(info.config, [info.path], info.dtype, info.nbytes, stored)
    return hf.inspect_checkpoint(source.path)


def _hf_source(
    given: Path, path: Path, need_tokenizer: bool, note: str | None = None
) -> ModelSource:
    tokenizer = path if _has_tokenizer(path) else None
    if tokenizer is None and need_tokenizer:
        raise CheckpointError(
            f"{path} has no {JSON_NAME} or {MODEL_NAME} (copy in the tokenizer the model "
            "was trained with)"
        )
    return ModelSource(given, path, "hf", tokenizer, note=note)


def _run_source(run: Path, need_tokenizer: bool) -> ModelSource:
    export = run / RUN_EXPORT
    found = ckpt.list_checkpoints(run)
    exported = (export / hf.CONFIG_NAME).is_file()
    if exported and (not found or _newer_or_same(export / hf.CONFIG_NAME, found[-1])):
        note = f"{run}: training run; using its export {export}"
        return _hf_source(run, export, need_tokenizer, note)
    if not found:
        root = ckpt.checkpoint_dir(run)
        detail = f" ({root} holds no complete one)" if root.is_dir() else ""
        raise CheckpointError(
            f"{run} is a training run that has not exported weights to {export} yet and has "
            f"no complete checkpoint to read{detail}"
        )
    state = f"its export {export} is older than its newest checkpoint" if exported else "no export"
    return _checkpoint_source(run, found[-1], need_tokenizer, f"{run}: training run, {state}")


def _checkpoint_source(
    given: Path, path: Path, need_tokenizer: bool, about: str | None = None
) -> ModelSource:
    ckpt.require_complete(path)
    step, run = ckpt.step_of(path), ckpt.run_of(path)
    tokenizer = _checkpoint_tokenizer(path, run) if need_tokenizer else None
    source = ModelSource(given, path, "checkpoint", tokenizer, run, step)
    if about is None:
        what = f"{path}: checkpoint of step {step}" + (f" of run {run}" if run else "")
        what += "; reading it directly"
    else:
        what = f"{about}; reading its newest checkpoint {path} (step {step}) directly"
    note = f"{what} (nothing is written); to export it: {export_command(source)}"
    return dataclasses.replace(source, note=note)


def _checkpoint_tokenizer(path: Path, run: Path | None) -> Path:
    if run is None:
        raise CheckpointError(
            f"{path}: a checkpoint outside a run (RUN/{ckpt.CHECKPOINTS}/step-N): the tokenizer "
            "it was trained with cannot be found"
        )
    return run_tokenizer(run)


def is_run(path: Path) -> bool:
    """Whether ``path`` looks like a training run's directory."""
    return (
        ckpt.checkpoint_dir(path).is_dir()
        or (path / RUN_EXPORT / hf.CONFIG_NAME).is_file()
        or any((path / name).is_file() for name in RUN_FILES)
    )


def _has_tokenizer(path: Path) -> bool:
    if path.is_file():
        return path.name in (JSON_NAME, MODEL_NAME)
    return any((path / name).is_file() for name in (JSON_NAME, MODEL_NAME))


def _candidates(run: Path, value: str) -> list[Path]:
    """A path from a run's recipe: as written when absolute; else against the run directory
    (where the recipe lives), then against the working directory."""
    path = Path(value)
    if path.is_absolute():
        return [path]
    return list(dict.fromkeys([run / path, path]))


def _table(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _digest_of(path: Path) -> str | None:
    try:
        return Tokenizer.load(path).digest
    except CamelidError:
        return None


def _newer_or_same(export_config: Path, checkpoint: Path) -> bool:
    """An export written at or after a checkpoint's completion (its trainer.json, written
    last) holds that checkpoint's weights or later ones."""
    return export_config.stat().st_mtime_ns >= (checkpoint / ckpt.STATE_FILE).stat().st_mtime_ns


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
    int8: bool | str | None = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    adapter: str | Path | None = None,
) -> Engine:
    """Load MODEL (weights and tokenizer) into an :class:`Engine`.

    ``adapter``: a LoRA adapter directory in peft's format (:mod:`camelid.weights.lora`),
    checked against MODEL and merged into its weights at load, so decoding runs at the base
    model's speed and int8/compile apply unchanged; the merged weights' digest is then the
    engine's ``weights_digest`` (what it serves is not MODEL's stored weights).

    ``int8``: False/None (no int8), "row", "q8_0", or True/"auto": a Q8_0 GGUF file's own
    blocks ("q8_0", the very bytes llama.cpp decodes), else "row".

    ``device`` and ``dtype`` are names (see :func:`resolve_device`, :func:`resolve_dtype`);
    the other settings are the Engine's. Sizes, device and directory are checked before the
    weights are read. ``progress=None`` shows a loading bar when stderr is a terminal; ``log``
    receives a line on what MODEL resolved to (for a run or a checkpoint), one on what was
    loaded, and a note if ``max_seq_len`` exceeds the model's.
    """
    if max_seq_len is not None and max_seq_len < 2:
        raise RequestError(f"--max-seq-len must be at least 2, got {max_seq_len}")
    if max_batch_size < 1:
        raise RequestError(f"--batch-size must be positive, got {max_batch_size}")
    source = resolve_model(model)
    if int8 is True or int8 == "auto":
        q8 = source.kind == "gguf" and gguf.inspect(source.path).file_type == "Q8_0"
        int8 = "q8_0" if q8 else "row"
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if log is not None and source.note is not None:
        log(source.note)
    tokenizer = load_tokenizer(source)
    t0 = time.perf_counter()
    transformer = load_model(source, device=torch_device, dtype=torch_dtype, progress=progress)
    weights_digest = None
    if adapter is not None:
        transformer = merge_adapter(transformer, adapter, source, log)
        weights_digest = model_digest(transformer)
    engine = Engine(
        transformer,
        tokenizer,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        compile=compile,
        int8=int8,
    )
    engine.weights_digest = weights_digest
    if log is not None:
        context = transformer.config.max_seq_len
        if max_seq_len and max_seq_len > context:
            log(f"note: the model's context is {context} tokens; using that")
        form = f", int8 decode ({int8})" if int8 else ""
        log(
            f"loaded {source.path} ({format_count(transformer.config.num_params())} parameters, "
            f"{str(torch_dtype).removeprefix('torch.')}{form}) on "
            f"{torch_device} in {time.perf_counter() - t0:.1f}s; context {engine.max_seq_len} "
            "tokens"
        )
    return engine


def merge_adapter(
    model: Transformer,
    adapter: str | Path,
    source: ModelSource,
    log: Callable[[str], None] | None = None,
) -> Transformer:
    """``model`` (MODEL's weights, as loaded from ``source``) with the LoRA adapter in
    ``adapter`` checked against it and merged in: a plain Transformer."""
    from camelid.model.lora import merge_lora
    from camelid.weights.lora import load_adapter

    model = load_adapter(model, adapter, base_name=str(source.given))
    config = model.lora_config
    if log is not None:
        log(
            f"merged the LoRA adapter {adapter} (r {config.r}, alpha {config.alpha:g}, "
            f"{', '.join(config.target_modules)}) into {source.given}"
        )
    return merge_lora(model)
