"""Training checkpoints as a source of weights: the on-disk format, and the model part of a
checkpoint read back into a plain :class:`Transformer`.

A training run ``RUN`` keeps its checkpoints in ``RUN/checkpoints/step-00000200/``: the DCP
shards of ``{"model": ..., "optim": ...}`` (``.metadata`` and ``__R_K.distcp`` files) and
``trainer.json`` (step, tokens, loader, guard, ``model_config``), written last, so a directory
without it is a save that did not finish. The trainer writes checkpoints
(:mod:`camelid.train.checkpoint`, which takes these names from here); everything that reads
weights out of one — ``camelid export``, ``generate``/``chat``/``inspect`` on a run that has not
exported — reads them here, so the format has one home and reading it needs no trainer.

Reading is read-only: nothing in the run is written, locked or renamed.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from camelid.config import ModelConfig
from camelid.errors import CamelidError, CheckpointError
from camelid.model import Transformer
from camelid.model.lora import is_lora_name
from camelid.weights.hf import CheckpointInfo, load_dtype

CHECKPOINTS = "checkpoints"  # RUN/checkpoints/
STATE_FILE = "trainer.json"
STEP_NAME = re.compile(r"step-(\d{8})")
DCP_INDEX = ".metadata"
_MODEL = "model."  # the key prefix of the model's tensors in the saved bundle


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_NAME.fullmatch(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def looks_like_checkpoint(path: Path) -> bool:
    """A checkpoint directory, complete or not (a step name, a DCP index or a trainer.json)."""
    return path.is_dir() and (
        STEP_NAME.fullmatch(path.name) is not None
        or (path / STATE_FILE).exists()
        or (path / DCP_INDEX).exists()
    )


def run_of(checkpoint: Path) -> Path | None:
    """The run a checkpoint belongs to (``RUN`` of ``RUN/checkpoints/step-N``), if any."""
    parent = checkpoint.parent
    if parent.name != CHECKPOINTS:  # "." or a relative name: look at the real path
        parent = checkpoint.resolve().parent
    return parent.parent if parent.name == CHECKPOINTS else None


def newest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run, or an error saying why there is none."""
    found = list_checkpoints(run_dir)
    if found:
        return found[-1]
    root = checkpoint_dir(run_dir)
    torn = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    detail = f" ({', '.join(torn)}: incomplete, no {STATE_FILE})" if torn else ""
    raise CheckpointError(f"{run_dir}: training run with no complete checkpoint yet{detail}")


def require_complete(path: Path) -> None:
    """A checkpoint directory whose save finished: its trainer.json is written last."""
    if not (path / STATE_FILE).is_file():
        run = run_of(path)
        others = [p.name for p in list_checkpoints(run)] if run is not None else []
        hint = f"; complete ones in {run}: {', '.join(others)}" if others else ""
        raise CheckpointError(
            f"{path}: not a complete checkpoint (no {STATE_FILE}: its save did not finish){hint}"
        )


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer.json."""
    require_complete(path)
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not readable ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return state


def step_of(path: Path) -> int:
    """The training step a checkpoint holds."""
    state = read_state(path)
    try:
        return int(state["step"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path / STATE_FILE}: no valid 'step'") from None


def read_config(path: Path) -> ModelConfig:
    """The model configuration a checkpoint was trained with (trainer.json's model_config)."""
    saved = read_state(path).get("model_config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path / STATE_FILE}: no model_config")
    try:
        return ModelConfig(**saved)
    except (TypeError, CamelidError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: model_config is not usable ({e})") from None


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Validate a checkpoint's model tensors from its DCP index alone (no tensor data read):
    every expected name present with the shape its config gives, in files that are whole."""
    path = Path(path)
    config = read_config(path)
    metadata = _read_index(path)
    expected = _expected(config, metadata)
    files, dtype, nbytes = _check_index(path, metadata, expected)
    return CheckpointInfo(config, files, dtype, nbytes)


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> Transformer:
    """The model of a training checkpoint as a plain :class:`Transformer` (the optimizer state
    is not read). ``dtype=None`` keeps the checkpoint's (float32 for camelid's trainer), with
    half precision upcast on the CPU as :func:`camelid.weights.hf.load` does. ``progress`` is
    accepted for symmetry with that function; DCP reads in one go."""
    del progress
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    info = inspect_checkpoint(path)
    expected = _expected(info.config, _read_index(path))
    model = Transformer.empty(info.config, "cpu", info.dtype)
    state = {k: v for k, v in model.state_dict().items() if _MODEL + k in expected}
    try:
        with _quiet_single_process():
            dcp.load({"model": state}, checkpoint_id=str(path))
    except Exception as e:  # DCP raises many kinds for a damaged file; each is the user's file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: cannot read the model weights ({type(e).__name__}: {first[:200]})"
        ) from None
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():  # DCP keeps no checksums; this much shows
            raise CheckpointError(
                f"{path}: tensor {name} holds NaN or infinite values (a damaged file, or a run "
                "that diverged)"
            )
    device = torch.device(device)
    model = model.to(device=device, dtype=load_dtype(dtype, info.dtype, device))
    model.tie_weights()
    return model


def _read_index(path: Path) -> dict[str, Any]:
    """Key → storage metadata of the checkpoint's DCP index (``.metadata``)."""
    from torch.distributed.checkpoint import FileSystemReader

    index = path / DCP_INDEX
    if not index.is_file():
        raise CheckpointError(f"{path}: no {DCP_INDEX} (not a DCP checkpoint, or a torn one)")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated or foreign file fails in pickle, in many ways
        raise CheckpointError(f"{index}: not a readable DCP index ({type(e).__name__})") from None
    return {"state": metadata.state_dict_metadata, "storage": metadata.storage_data}


def _expected(config: ModelConfig, metadata: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Saved key → shape for every tensor of the model (the tied head only where it was
    saved: it is the embedding)."""
    with torch.device("meta"):
        model = Transformer(config)
    model.tie_weights()
    expected = {_MODEL + k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings and _MODEL + "output.weight" not in metadata["state"]:
        expected.pop(_MODEL + "output.weight")
    return expected


def _check_index(
    path: Path, metadata: dict[str, Any], expected: dict[str, tuple[int, ...]]
) -> tuple[list[Path], torch.dtype, int]:
    """Names, shapes and dtypes from the index, and that every file holding the model's bytes
    is at least as long as the index says (a truncated shard is found here)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state = metadata["state"]
    saved = {k for k in state if k.startswith(_MODEL)}
    missing = sorted(set(expected) - saved)
    if missing and saved and all(is_lora_name(k) for k in saved):
        run = path.parent.parent
        raise CheckpointError(
            f"{path}: a LoRA run's checkpoint, which holds its adapters only (the base is the "
            f"run's init.model): use its export ({run / 'hf'}, merged) or the base with "
            f"--adapter {run / 'adapter'}"
        )
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0][len(_MODEL) :]}{more}")
    extra = sorted(saved - set(expected))
    if extra:
        raise CheckpointError(
            f"{path}: unexpected tensor {extra[0][len(_MODEL) :]} for its model_config"
        )
    dtype, nbytes = torch.float32, 0
    for key, shape in expected.items():
        meta = state[key]
        name = key[len(_MODEL) :]
        if not isinstance(meta, TensorStorageMetadata):
            raise CheckpointError(f"{path}: {name} is not a tensor")
        if tuple(meta.size) != shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(meta.size)}, expected {shape}"
            )
        if not meta.properties.dtype.is_floating_point:
            raise CheckpointError(f"{path}: tensor {name} has dtype {meta.properties.dtype}")
        if name == "tok_embeddings.weight":
            dtype = meta.properties.dtype
        nbytes += meta.size.numel() * meta.properties.dtype.itemsize
    files = check_lengths(path, metadata["storage"], set(expected))
    return files, dtype, nbytes


def check_lengths(path: Path, storage: dict[Any, Any], keys: set[str] | None = None) -> list[Path]:
    """Every tensor file the DCP index's ``storage`` lists (for ``keys``, or for all) exists and
    is at least as long as the bytes the index places in it: how a truncated checkpoint is
    found without reading a tensor. Returns those files; raises naming the first bad one."""
    ends: dict[str, int] = {}
    for index, where in storage.items():
        if keys is None or index.fqn in keys:
            end = where.offset + where.length
            ends[where.relative_path] = max(ends.get(where.relative_path, 0), end)
    for name, end in sorted(ends.items()):
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size is None:
            raise CheckpointError(f"{path}: {name}, which its {DCP_INDEX} lists, is missing")
        if size < end:
            raise CheckpointError(
                f"{file}: truncated ({size} bytes; its {DCP_INDEX} needs at least {end})"
            )
    return [path / n for n in sorted(ends)]


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it runs without a process group; reading one checkpoint, that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
